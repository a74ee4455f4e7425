"""Half-precision gradients: accumulated in float32, reduced in float64, never overflowing."""

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Shard, distribute_tensor

import distclip
from models import NORM_TYPES
from reference import assert_same_on_all_ranks_in_every_case, clip_and_check_each


def test_fp16_gradients_whose_norm_exceeds_fp16_range_do_not_overflow():
    grads = [torch.full((100, 100), 1000.0, dtype=torch.float16)]  # norm 1e5 > fp16 max 65504
    assert torch.nn.utils.get_total_norm(grads).isinf()  # what torch gives
    assert distclip.get_total_norm(grads).item() == pytest.approx(1e5, rel=1e-5)


def test_large_p_does_not_overflow_the_sum_of_powers():
    grads = [torch.full((1000,), 1e4), torch.full((10,), 3e4)]  # |x|**8 ~ 1e36..1e32 per element
    reference = torch.linalg.vector_norm(torch.cat(grads).double(), 8.0).item()
    assert distclip.get_total_norm(grads, 8.0).item() == pytest.approx(reference, rel=1e-6)


def _bf16_sharded_clip():
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    named = []
    for i, shape in enumerate([(64, 33), (17,), (5, 5, 5)]):
        generator = torch.Generator().manual_seed(i)
        full = (torch.randn(shape, generator=generator) * 10).to(torch.bfloat16)
        param = nn.Parameter(distribute_tensor(full.clone(), mesh, [Shard(0)]))
        param.grad = distribute_tensor(full, mesh, [Shard(0)])
        named.append((f"p{i}", param))
    results = clip_and_check_each(named, NORM_TYPES, rtol=1e-5, clipped_rtol=2**-8)
    assert all(result["dtype"] == "torch.float32" for result in results.values()), results
    return results


@pytest.mark.parametrize("world_size", [2, 4])
def test_bf16_sharded_gradients_match_the_float64_reference(ranks, world_size):
    # Within float32 rounding of the float64 norm however the tensors are split: the norm of a
    # bf16 model no longer depends on its sharding.
    assert_same_on_all_ranks_in_every_case(ranks(world_size).run(_bf16_sharded_clip))


@pytest.mark.parametrize("norm_type", [2.0, 1.0])
def test_large_cpu_tensor_norm_stays_within_float32_rounding(norm_type):
    # torch's CPU norm kernel sums long runs sequentially in float32 (7e-5 off here for p=2);
    # distclip reduces long CPU ranges as short rows and adds the rows in float64.
    grad = torch.randn(1 << 22, generator=torch.Generator().manual_seed(0)) + 1.0
    reference = torch.linalg.vector_norm(grad.double(), norm_type).item()
    assert distclip.get_total_norm([grad], norm_type).item() == pytest.approx(reference, rel=1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_large_half_precision_cpu_tensor_norm_is_accumulated_in_float32(dtype):
    # torch's own bf16 norm rounds the result to bf16 (2**-9); distclip's rows are float32 sums.
    grad = (torch.randn(5_000_001, generator=torch.Generator().manual_seed(0)) + 1.0).to(dtype)
    reference = torch.linalg.vector_norm(grad.double()).item()
    assert distclip.get_total_norm([grad]).item() == pytest.approx(reference, rel=1e-6)
