"""FSDP2 (fully_shard) and HSDP: shards are summed, replicas counted once."""

import pytest
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh

from models import NORM_TYPES, backward, batch, build, shard_layers
from reference import assert_same_on_all_ranks_in_every_case, clip_and_check_each


def _fsdp2_clip(norm_types):
    model = shard_layers(build())
    backward(model, batch(dist.get_rank()))
    assert model.head.bias.grad.numel() == 1  # smaller than the world: empty shards exist
    return clip_and_check_each(model.named_parameters(), norm_types)


@pytest.mark.parametrize("world_size", [2, 4])
def test_fsdp2_norm_equals_full_gradient_norm(ranks, world_size):
    norm_types = NORM_TYPES + [-1.0]  # negative p: as torch defines it
    assert_same_on_all_ranks_in_every_case(ranks(world_size).run(_fsdp2_clip, norm_types))


def _hsdp_clip(shape):
    mesh = init_device_mesh("cpu", shape, mesh_dim_names=("replicate", "shard"))
    model = shard_layers(build(), mesh)
    backward(model, batch(dist.get_rank()))
    return clip_and_check_each(model.named_parameters(), NORM_TYPES)


@pytest.mark.parametrize("shape", [(2, 1), (2, 2), (1, 4)], ids=str)
def test_hsdp_counts_each_replica_once(ranks, shape):
    assert_same_on_all_ranks_in_every_case(ranks(shape[0] * shape[1]).run(_hsdp_clip, shape))
