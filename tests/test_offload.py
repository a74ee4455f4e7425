"""CPU-offloaded gradients: partials where the gradients live, only the small vector moves."""

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import CPUOffloadPolicy, fully_shard

import distclip
from distclip.topology import reduction_device, resolve_topology
from models import NORM_TYPES, backward, batch, build
from reference import assert_same_on_all_ranks_in_every_case, clip_and_check_each


def _fsdp2_offload_clip():
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    model = build()
    # pin_memory needs an accelerator; without one the offloaded shards are ordinary CPU memory.
    policy = CPUOffloadPolicy(pin_memory=torch.accelerator.current_accelerator() is not None)
    for layer in model.layers:
        fully_shard(layer, mesh=mesh, offload_policy=policy)
    fully_shard(model, mesh=mesh, offload_policy=policy)
    backward(model, batch(dist.get_rank()))
    assert all(p.grad.device.type == "cpu" for p in model.parameters())
    return clip_and_check_each(model.named_parameters(), NORM_TYPES)


@pytest.mark.parametrize("world_size", [2, 4])
def test_fsdp2_cpu_offloaded_gradients_over_gloo(ranks, world_size):
    assert_same_on_all_ranks_in_every_case(ranks(world_size).run(_fsdp2_offload_clip))


def _fsdp1_offload_clip(norm_type):
    from torch.distributed.fsdp import CPUOffload
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    torch.manual_seed(0)
    model = FSDP(build(), cpu_offload=CPUOffload(offload_params=True), use_orig_params=True)
    backward(model, batch(0))
    with FSDP.summon_full_params(model, with_grads=True):
        reference = torch.cat([p.grad.double().cpu().flatten() for p in model.parameters()])
    assert all(p.grad.device.type == "cpu" for p in model.parameters() if p.grad is not None)
    total = distclip.clip_grad_norm_(model, 1.0, norm_type)
    expected = torch.linalg.vector_norm(reference, norm_type).item()
    assert abs(total.item() - expected) <= 1e-5 * abs(expected)


@pytest.mark.skipif(
    torch.accelerator.current_accelerator() is None,
    reason="FSDP1's CPUOffload pins memory, which needs an accelerator",
)
@pytest.mark.parametrize("norm_type", [2.0, float("inf")])
def test_fsdp1_cpu_offloaded_gradients(ranks, norm_type):
    ranks(2).run(_fsdp1_offload_clip, norm_type)


def _backend_without_a_usable_device():
    # A gloo group registered for CUDA tensors only, on a machine without CUDA: no tensor here
    # can carry the reduction.
    cuda_only = dist.new_group(backend="cuda:gloo")
    param = nn.Parameter(torch.randn(3))
    param.grad = torch.ones(3)
    with pytest.raises(ValueError, match="serves no device available here"):
        distclip.clip_grad_norm_([param], 1.0, group=cuda_only)
    assert torch.equal(param.grad, torch.ones(3))


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_a_backend_that_cannot_carry_the_norm_raises_on_every_rank(ranks):
    ranks(2).run(_backend_without_a_usable_device)


def _reduction_device_of_world():
    return str(reduction_device(resolve_topology(), fallback=torch.device("meta")))


def test_gloo_reduces_on_the_cpu(ranks):
    assert ranks(2).run(_reduction_device_of_world) == ["cpu", "cpu"]
