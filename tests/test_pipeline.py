"""Pipeline parallel: stages hold different tensors, summed across the group; ranks without
gradients still take part in the one collective."""

import pytest
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh

from models import NORM_TYPES, backward, batch, build
from reference import assert_same_on_all_ranks_in_every_case, clip_and_check_each


def _stage_parameters(pp: int, dp: int, frozen_stage=None):
    """Named parameters of this rank's stage, with the gradients data-parallel training gives:
    the full model's, averaged over the stage's dp replicas.  Other stages' grads are dropped."""
    mesh = init_device_mesh("cpu", (pp, dp), mesh_dim_names=("pp", "dp"))
    stage, dp_rank = mesh["pp"].get_local_rank(), mesh["dp"].get_local_rank()
    model = build(depth=4)
    backward(model, batch(dp_rank))
    named = list(model.named_parameters())
    per_stage = -(-len(named) // pp)
    mine = named[stage * per_stage : (stage + 1) * per_stage]
    for _, p in named[: stage * per_stage] + named[(stage + 1) * per_stage :]:
        p.grad = None
    for _, p in mine:
        dist.all_reduce(p.grad, group=mesh["dp"].get_group())
        p.grad /= dp
        if stage == frozen_stage:
            p.grad = None
    return mine, mesh


def _pipeline_clip(pp, dp):
    mine, mesh = _stage_parameters(pp, dp)
    return clip_and_check_each(mine, NORM_TYPES, replica_group=mesh["dp"])


@pytest.mark.parametrize("shape", [(2, 1), (2, 2), (4, 1)], ids=str)
def test_pipeline_stages_are_summed_and_dp_replicas_counted_once(ranks, shape):
    assert_same_on_all_ranks_in_every_case(ranks(shape[0] * shape[1]).run(_pipeline_clip, *shape))


def _frozen_stage_clip(pp, dp):
    mine, mesh = _stage_parameters(pp, dp, frozen_stage=1)
    return clip_and_check_each(mine, NORM_TYPES, replica_group=mesh["dp"])


@pytest.mark.parametrize("shape", [(2, 1), (2, 2)], ids=str)
def test_ranks_without_gradients_take_part_without_hanging(ranks, shape):
    assert_same_on_all_ranks_in_every_case(ranks(shape[0] * shape[1]).run(_frozen_stage_clip, *shape))
