"""Megatron-core's mixed-dtype clip table, ported: every dtype mix, in both orders, on every rank
layout, with gradients that are views into padded buffers.

Megatron-core (``tests/unit_tests/optimizer/test_clip_grads.py``, ``TestMixedDtypeGradNormAndClip``)
norms a bf16 and an fp32 gradient list in both orders (its fused kernels dispatch on the first
tensor) on four layouts of two ranks: both ranks hold both lists, rank 0 holds nothing, each rank
holds one list (disjoint), nobody holds anything; its gradients are the head of a larger buffer
whose tail must survive the scaling untouched.  Here: world 2, p = 2 and inf, the same four layouts
with each rank's tensors its own (a one-rank ``replica_group``, as Megatron sums over its group
without deduplication), plus one variant with a per-parameter copy group (the first list copied
over both ranks, the second each rank's own).  Each list is contiguous views of one flat buffer
per dtype: adjacent views, a gap, a view long enough for the CPU's row reduction, and tail padding
-- the elements outside the views are checked bitwise untouched after clipping.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.distributed as dist
from torch import nn

from reference import assert_same_on_all_ranks, clip_and_check, every_case

ORDERS = {"bf16,fp32": (torch.bfloat16, torch.float32), "fp32,bf16": (torch.float32, torch.bfloat16)}
LAYOUTS = ["both", "rank0_empty", "disjoint", "all_empty", "copy_groups"]
NORM_TYPES = [2.0, math.inf]

# (offset, shape) of each gradient in its dtype's flat buffer: a partial 4-vector (Megatron's 127
# elements) at the start, an adjacent 2-D view, one after a gap, one of more than 2**16 elements
# (reduced as rows on the CPU), then tail padding.
VIEWS = [(0, (127,)), (127, (5, 7)), (171, (3, 11)), (256, (66_001,))]
BUFFER_NUMEL = 256 + 66_001 + 64
PADDING = 7.5  # no gradient value: a scaled padding element cannot pass for untouched
BF16_ULP = 2.0**-7  # bf16 gradients are scaled in bf16


def _gradient_list(dtype: torch.dtype, seed: int) -> tuple[list[nn.Parameter], torch.Tensor, torch.Tensor]:
    """Parameters whose gradients are the ``VIEWS`` of one flat ``dtype`` buffer filled with
    ``seed``'s random values; returns them, the buffer and the mask of its padding."""
    buffer = torch.full((BUFFER_NUMEL,), PADDING, dtype=dtype)
    padding = torch.ones(BUFFER_NUMEL, dtype=torch.bool)
    generator = torch.Generator().manual_seed(seed)
    params = []
    for offset, shape in VIEWS:
        numel = math.prod(shape)
        view = buffer[offset : offset + numel].view(shape)
        view.copy_(torch.randn(shape, generator=generator))
        padding[offset : offset + numel] = False
        param = nn.Parameter(torch.zeros(shape, dtype=dtype))
        param.grad = view
        params.append(param)
    return params, buffer, padding


def _copy_group(tensor: torch.Tensor):
    """The ``replica_group`` callable of the copy-group variant: what each parameter (and, for
    ``get_total_norm``, its gradient) was marked with."""
    return tensor.copy_group


def _holdings(layout: str, dtypes, rank: int, alone) -> list[tuple[str, torch.dtype, int, object]]:
    """``(name, dtype, seed, copy group)`` of each list this rank holds: names and seeds are
    shared by copies, distinct for each rank's own tensors."""
    own = [(f"rank{rank}.{dtype}", dtype, 10 * rank + kind, alone) for kind, dtype in enumerate(dtypes)]
    if layout == "both":
        return own
    if layout == "rank0_empty":
        return [] if rank == 0 else own
    if layout == "disjoint":
        return [own[rank % 2]]
    if layout == "all_empty":
        return []
    assert layout == "copy_groups", layout
    shared = (f"shared.{dtypes[0]}", dtypes[0], 100, dist.group.WORLD)
    return [shared, own[1]]


def _clip_layout(case: tuple[str, str]) -> list[dict]:
    """On every rank, for ``case`` (layout, order): for each p, lay the gradients out afresh, clip against the float64
    reference (``clip_and_check``) and check every buffer's padding untouched."""
    layout, order = case
    rank = dist.get_rank()
    alone, _ = dist.new_subgroups(group_size=1)
    replica_group = _copy_group if layout == "copy_groups" else alone
    results = []
    for norm_type in NORM_TYPES:
        named, buffers = [], []
        for name, dtype, seed, group in _holdings(layout, ORDERS[order], rank, alone):
            params, buffer, padding = _gradient_list(dtype, seed)
            for index, param in enumerate(params):
                param.copy_group = param.grad.copy_group = group
                named.append((f"{name}.{index}", param))
            buffers.append((buffer, padding))
        results.append(clip_and_check(named, norm_type, clipped_rtol=BF16_ULP, replica_group=replica_group))
        for buffer, padding in buffers:
            untouched = buffer[padding] == PADDING
            assert bool(untouched.all()), (
                f"p={norm_type}: {int((~untouched).sum())} padding elements of the {buffer.dtype} "
                "buffer changed"
            )
    return results


def test_megatron_mixed_dtype_layouts(ranks):
    per_rank = ranks(2).run(every_case, _clip_layout, list(itertools.product(LAYOUTS, ORDERS)))
    for case in per_rank[0]:
        for norm_type, per_norm_type in zip(NORM_TYPES, zip(*(results[case] for results in per_rank))):
            assert_same_on_all_ranks(list(per_norm_type), case=f"{case}, p={norm_type}: ")
