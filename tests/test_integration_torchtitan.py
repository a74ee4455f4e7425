"""distclip.integrations.torchtitan against torchtitan's own clip_grad_norm_ (torchtitan 0.3.0):
the same value, the float64 reference, one collective instead of torchtitan's several.

The meshes come from torchtitan's ParallelDims; FSDP2 and TP from torch, as torchtitan applies
them.  Each setup clips the same gradients twice: torchtitan's function, then distclip's.
"""

from __future__ import annotations


import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_module, distribute_tensor
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

from models import build, batch, backward
from reference import assert_close_norm, collectives, full_grads, named_param_grads, reference_norm

pytest.importorskip("torchtitan")

# Not inf: torch.nn.utils.get_total_norm (inside torchtitan's function) raises for the inf-norm of
# an empty shard (the 1-element bias on rank 1), leaving the other ranks waiting.
NORM_TYPES = [2.0, 1.0]
MAX_NORM = 0.05  # below every setup's norm, so both functions really scale


def _parallel_dims(**degrees):
    """torchtitan's meshes on CPU.  torchtitan picks "cuda" when it finds no accelerator and
    uses the "fake" backend for its size-1 dims; both are set up here as its trainer would."""
    import torch.testing._internal.distributed.fake_pg  # noqa: F401  registers "fake"
    import torchtitan.distributed.parallel_dims as parallel_dims

    parallel_dims.device_type = "cpu"
    sizes = dict(dp_replicate=1, dp_shard=1, cp=1, tp=1, pp=1, ep=1)
    sizes.update(degrees)
    dims = parallel_dims.ParallelDims(**sizes, world_size=dist.get_world_size(), spmd_backend="partial_dtensor")
    dims.build_mesh()
    return dims


def _fsdp(dims):
    model = build(depth=2)
    for layer in model.layers:
        fully_shard(layer, mesh=dims.get_mesh("fsdp"))
    fully_shard(model, mesh=dims.get_mesh("fsdp"))
    backward(model, batch(0))
    return list(model.named_parameters())


def _fsdp_tp(dims):
    model = build(depth=2)
    # Every parameter on the (fsdp, tp) mesh, as torchtitan's plans leave them: the linears
    # split over tp, the rest replicated over it.
    parallelize_module(model, dims.get_mesh("tp"), {"layers.0": ColwiseParallel(), "layers.1": RowwiseParallel()})
    for module in (model.norm, model.head):
        _replicate_over(module, dims.get_mesh("tp"))
    fully_shard(model, mesh=dims.get_mesh("fsdp"))
    backward(model, batch(0))
    return list(model.named_parameters())


def _replicate_over(module: nn.Module, mesh) -> None:
    """``module``'s parameters replicated over ``mesh``, taking and giving plain tensors."""
    distribute_module(
        module,
        mesh,
        input_fn=lambda _, inputs, mesh: tuple(DTensor.from_local(x, mesh, [Replicate()]) for x in inputs),
        output_fn=lambda _, output, mesh: output.to_local(),
    )


def _pipeline_stage(dims):
    """This rank's stage of a 4-layer model: its half of the parameters, plain tensors, or
    FSDP2-sharded when the stage has data-parallel ranks."""
    model = build(depth=4)
    backward(model, batch(0))
    pp = dims.get_optional_mesh("pp")
    named = list(model.named_parameters())
    half = len(named) // 2
    mine = named[:half] if pp.get_local_rank() == 0 else named[half:]
    if dims.dp_shard == 1:
        return mine
    mesh = dims.get_mesh("fsdp")
    return [(name, _distributed(p.detach(), p.grad, mesh)) for name, p in mine]


def _expert_parallel(dims):
    """Dense parameters FSDP2-sharded over fsdp, experts sharded over ep (a mesh whose names
    hold "ep", which is how torchtitan tells them apart)."""
    named = _fsdp(dims)
    generator = torch.Generator().manual_seed(7)
    full = torch.randn(4, 16, 8, generator=generator)
    grad = torch.randn(4, 16, 8, generator=generator)
    named.append(("experts", _distributed(full, grad, dims.get_mesh("ep"))))
    return named


def _distributed(value, grad, mesh) -> nn.Parameter:
    param = nn.Parameter(distribute_tensor(value, mesh, [Shard(0)]))
    param.grad = distribute_tensor(grad, mesh, [Shard(0)])
    return param


# setup: (world size, gradients, ParallelDims degrees, collectives torchtitan's function issues)
SETUPS = {
    "fsdp2": (2, _fsdp, dict(dp_shard=2), 1),
    "fsdp2_tp": (4, _fsdp_tp, dict(dp_shard=2, tp=2), 2),
    "pp": (2, _pipeline_stage, dict(pp=2), 1),
    "pp_fsdp2": (4, _pipeline_stage, dict(pp=2, dp_shard=2), 2),
    "ep": (2, _expert_parallel, dict(dp_shard=2, ep=2), 2),
}


def _both_clips(setup: str, norm_type: float) -> dict:
    from torchtitan.distributed.utils import clip_grad_norm_ as torchtitan_clip

    from distclip.integrations.torchtitan import clip_grad_norm_ as distclip_clip

    _, make, degrees, _ = SETUPS[setup]
    dims = _parallel_dims(**degrees)
    named = make(dims)
    params = [p for _, p in named]
    original = [p.grad.clone() for p in params]
    before = full_grads(named_param_grads(named))
    expected = reference_norm(before, norm_type)
    kwargs = dict(pp_mesh=dims.get_optional_mesh("pp") if dims.pp_enabled else None, ep_enabled=dims.ep_enabled)

    with collectives() as theirs:
        their_norm = torchtitan_clip(params, MAX_NORM, norm_type, foreach=True, **kwargs)
    their_grads = full_grads(named_param_grads(named))
    for p, grad in zip(params, original):
        p.grad = grad
    with collectives() as ours:
        our_norm = distclip_clip(params, MAX_NORM, norm_type, foreach=True, **kwargs)
    our_grads = full_grads(named_param_grads(named))

    assert type(our_norm) is torch.Tensor, type(our_norm)
    assert_close_norm(our_norm.item(), expected, norm_type)
    assert_close_norm(our_norm.item(), their_norm.item(), norm_type)
    coefficient = MAX_NORM / (our_norm.double().item() + 1e-6)
    assert coefficient < 1, "the setup must clip"
    for name, grad in before.items():
        torch.testing.assert_close(our_grads[name], grad * coefficient, rtol=1e-5, atol=1e-9)
        torch.testing.assert_close(our_grads[name], their_grads[name], rtol=1e-5, atol=1e-9)
    return {"norm": our_norm.item().hex(), "ours": ours, "theirs": theirs}


@pytest.mark.parametrize("norm_type", NORM_TYPES)
@pytest.mark.parametrize("setup", list(SETUPS))
def test_same_norm_as_torchtitan_from_one_collective(ranks, setup, norm_type):
    world_size, _, _, theirs = SETUPS[setup]
    results = ranks(world_size).run(_both_clips, setup, norm_type)
    assert len({r["norm"] for r in results}) == 1, results
    for rank, result in enumerate(results):
        assert result["ours"] == ["gloo:all_reduce"], f"rank {rank}: {result['ours']}"
        # What torchtitan spends on the same gradients (the figures the README quotes).
        assert len(result["theirs"]) == theirs, f"rank {rank}: {result['theirs']}"


def _plain_stage_gradients_with_data_parallel_ranks() -> str:
    from distclip.integrations.torchtitan import clip_grad_norm_

    dims = _parallel_dims(pp=2, dp_shard=2)
    model = build(depth=4)
    backward(model, batch(0))
    try:
        clip_grad_norm_(model.parameters(), 1.0, pp_mesh=dims.get_optional_mesh("pp"))
    except ValueError as error:
        return str(error)
    return "no error"


def test_plain_gradients_beside_data_parallel_stages_are_an_error_on_every_rank(ranks):
    errors = ranks(4).run(_plain_stage_gradients_with_data_parallel_ranks)
    # Each rank's message names the rank that found the problem (here every rank does).
    assert all(f"rank {rank}: gradient #0: a plain gradient with pp_mesh of 2 of 4 ranks" in error
               for rank, error in enumerate(errors)), errors
