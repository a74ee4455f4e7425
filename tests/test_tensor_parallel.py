"""FSDP2 + tensor parallel: TP-replicated LayerNorms counted once, params on two meshes."""

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor, Shard
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    RowwiseParallel,
    SequenceParallel,
    parallelize_module,
)

from models import NORM_TYPES
from reference import assert_same_on_all_ranks_in_every_case, clip_and_check_each

HIDDEN = 8


class Block(nn.Module):
    """norm_in (left out of TP) -> up (colwise) -> down (rowwise, sequence-sharded output) ->
    norm_out (SequenceParallel: a DTensor replicated over tp)."""

    def __init__(self) -> None:
        super().__init__()
        self.norm_in = nn.LayerNorm(HIDDEN)
        self.up = nn.Linear(HIDDEN, 4 * HIDDEN)
        self.down = nn.Linear(4 * HIDDEN, HIDDEN)
        self.norm_out = nn.LayerNorm(HIDDEN)

    def forward(self, x):
        return self.norm_out(self.down(torch.relu(self.up(self.norm_in(x)))))


def _fsdp_tp_model(dp: int, tp: int) -> nn.Module:
    mesh = init_device_mesh("cpu", (dp, tp), mesh_dim_names=("dp", "tp"))
    torch.manual_seed(0)
    model = Block()
    parallelize_module(
        model,
        mesh["tp"],
        {
            "up": ColwiseParallel(),
            "down": RowwiseParallel(output_layouts=Shard(1)),
            "norm_out": SequenceParallel(),
        },
    )
    fully_shard(model, mesh=mesh["dp"])
    # Every tp rank of one dp rank sees the same batch; dp ranks see different ones.
    dp_rank = mesh["dp"].get_local_rank()
    x = torch.randn(2, 2 * tp, HIDDEN, generator=torch.Generator().manual_seed(dp_rank)) * 3
    out = model(x)
    (out.full_tensor() ** 2).mean().backward()
    return model


def _fsdp_tp_clip(dp, tp):
    model = _fsdp_tp_model(dp, tp)
    meshes = {p.grad.device_mesh for p in model.parameters()}
    assert len(meshes) == 2  # norm_in on the dp sub-mesh, the rest on the 2-D mesh
    return clip_and_check_each(model.named_parameters(), NORM_TYPES)


@pytest.mark.parametrize("shape", [(1, 2), (2, 2)], ids=str)
def test_fsdp2_tp_counts_tp_replicated_norms_once(ranks, shape):
    assert_same_on_all_ranks_in_every_case(ranks(shape[0] * shape[1]).run(_fsdp_tp_clip, *shape))


def _torch_clip_error():
    model = _fsdp_tp_model(2, 2)
    try:
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    except Exception as error:  # torch's own clip cannot stack DTensors of two meshes
        return str(error)
    return None


def test_torch_clip_fails_where_distclip_works_across_meshes(ranks):
    errors = ranks(4).run(_torch_clip_error)
    assert all(e is not None and "mesh" in e for e in errors), errors


def _sequence_parallel_norm_is_tp_replicated():
    model = _fsdp_tp_model(2, 2)
    grad = model.norm_out.weight.grad
    assert isinstance(grad, DTensor) and grad.placements[1].is_replicate(), grad.placements
    grad = model.norm_in.weight.grad
    assert isinstance(grad, DTensor) and grad.device_mesh.ndim == 1, grad.device_mesh


def test_layer_norm_placements_are_as_the_tests_assume(ranks):
    ranks(4).run(_sequence_parallel_norm_is_tp_replicated)
