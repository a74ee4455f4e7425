"""Partial gradients (tensor parallel with SequenceParallel, no FSDP) are reduced in place to
their parameters' placements by one coalesced collective, then clipped exactly: the norm and the
step are torch's own (which redistributes each Partial gradient with a collective of its own)."""

import copy

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_tensor
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, SequenceParallel, parallelize_module

import distclip
from models import NORM_TYPES
from reference import assert_close_norm, by_case, collectives, every_case, full_grads, named_param_grads, reference_norm


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm_in = nn.LayerNorm(8)
        self.up = nn.Linear(8, 32)
        self.down = nn.Linear(32, 8)
        self.norm_out = nn.LayerNorm(8)

    def forward(self, x):
        return self.norm_out(self.down(torch.relu(self.up(self.norm_in(x)))))


def _sequence_parallel_block() -> nn.Module:
    """Tensor parallel over every rank, LayerNorms under SequenceParallel: their weights and
    biases are Replicate, their gradients Partial(sum) after backward."""
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    torch.manual_seed(0)
    model = Block()
    parallelize_module(model, mesh, {
        "norm_in": SequenceParallel(), "up": ColwiseParallel(input_layouts=Shard(1)),
        "down": RowwiseParallel(output_layouts=Shard(1)), "norm_out": SequenceParallel(),
    })
    return model


def _backward(model: nn.Module) -> None:
    x = torch.randn(2, 4, 8, generator=torch.Generator().manual_seed(0)) * 3
    mesh = model.up.weight.device_mesh
    out = model(distribute_tensor(x, mesh, [Shard(1)]))
    (out.full_tensor() ** 2).mean().backward()


def _partial_clip(norm_type):
    ours, theirs = _sequence_parallel_block(), _sequence_parallel_block()
    for model in (ours, theirs):
        _backward(model)
    partial = [n for n, p in ours.named_parameters() if any(pl.is_partial() for pl in p.grad.placements)]
    assert partial == ["norm_in.weight", "norm_in.bias", "norm_out.weight", "norm_out.bias"], partial
    reference = reference_norm(full_grads(named_param_grads(theirs.named_parameters())), norm_type)
    with collectives() as issued:
        total = distclip.clip_grad_norm_(ours, 0.05, norm_type)
    assert issued == ["gloo:all_reduce", "gloo:all_reduce"], issued  # the coalesced reduction, the norm's
    assert all(p.grad.placements == p.placements for p in ours.parameters())
    assert_close_norm(total.item(), reference, norm_type)
    if norm_type != 0:  # torch counts nonzero tensors for p=0, distclip elements
        expected = torch.nn.utils.clip_grad_norm_(theirs.parameters(), 0.05, norm_type)  # redistributes each
        expected = expected.full_tensor() if isinstance(expected, DTensor) else expected
        assert_close_norm(total.item(), expected.item(), norm_type)
    else:
        torch.nn.utils.clip_grads_with_norm_(theirs.parameters(), 0.05, torch.tensor(reference))
    after = full_grads(named_param_grads(theirs.named_parameters()))
    for name, grad in full_grads(named_param_grads(ours.named_parameters())).items():
        torch.testing.assert_close(grad, after[name], rtol=1e-5, atol=1e-8)
    return total.item().hex()


def test_partial_gradients_are_reduced_in_place_by_one_collective_then_clipped(ranks):
    for norm_type, norms in by_case(ranks(2).run(every_case, _partial_clip, NORM_TYPES)).items():
        assert len(set(norms)) == 1, (norm_type, norms)


def _partial_steps_with_the_clipper():
    ours, theirs = _sequence_parallel_block(), _sequence_parallel_block()
    optimizers = [torch.optim.AdamW(m.parameters(), lr=0.01, foreach=True) for m in (ours, theirs)]
    clipper = distclip.GradClipper(ours, max_norm=0.05)
    clipper.attach(optimizers[0])
    for _ in range(3):
        for model in (ours, theirs):
            model.zero_grad(set_to_none=True)
            _backward(model)
        optimizers[0].step()
        torch.nn.utils.clip_grad_norm_(theirs.parameters(), 0.05)
        optimizers[1].step()
    for a, b in zip(ours.parameters(), theirs.parameters()):
        # AdamW divides by sqrt(v): float32 rounding of the two norms shows in tiny gradients.
        torch.testing.assert_close(a.full_tensor(), b.full_tensor(), rtol=1e-4, atol=1e-5)


def test_partial_gradients_step_as_torchs_clip_and_step(ranks):
    ranks(2).run(_partial_steps_with_the_clipper)


def _partial_avg():
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    param = nn.Parameter(distribute_tensor(torch.zeros(6), mesh, [Replicate()]))
    local = torch.arange(6.0) * (dist.get_rank() + 1)
    param.grad = DTensor.from_local(local, mesh, [Partial("avg")])
    expected = reference_norm({"g": (torch.arange(6.0) * 1.5).double()}, 2.0)  # the mean of ranks 1x and 2x
    total = distclip.clip_grad_norm_([param], 1e9)
    assert_close_norm(total.item(), expected, 2.0)
    assert param.grad.placements == (Replicate(),)


def test_partial_avg_gradients_are_averaged(ranks):
    ranks(2).run(_partial_avg)
