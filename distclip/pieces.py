"""Norm-kernel inputs: owned ranges whole in one foreach call or, on the CPU, as rows and packs.

The rule.  On the CPU, a range of more than ``ROWS_FROM`` elements is viewed as rows of ``ROW``
elements and reduced along the rows (``torch.linalg.vector_norm(block, p, dim=1)``, one call per
block of at most ``BLOCK`` elements); what is left of it (fewer than ``ROW`` elements) and every
shorter range go into one ``torch._foreach_norm`` call.  On other devices every range goes into
the foreach call whole.  Also on the CPU, whole units of at most ``PACK_UP_TO`` elements are
*packed*: copied together into one flat tensor (``torch._utils._flatten_dense_tensors``, one C++
call) of at most ``ROWS_FROM`` elements, which the foreach call then takes as one input.  Where
the norms are kept per group (``keys``: per-parameter or per-layer norms), whole units of the
same element count are packed instead, whatever their groups, into *row packs*: one flat copy
viewed as one row per unit and reduced along the rows like a block, so that every unit keeps its
own norm and 2,000 per-parameter norms cost one copy and a few row reductions, not one foreach
input per parameter.

Why rows.  torch's CPU norm kernel sums each thread's share of a tensor sequentially in float32:
the norm of GPT-2's 38.6M-element embedding gradient comes out 2.6e-3 off the float64 value.  A
row is a short float32 sum, and the rows' p-th powers are added in float64: GPT-2-small's fp32
norm is then ~3e-9 off, and it takes ~0.6x the time of torch's own foreach norm, because the row
reduction spreads rows over threads instead of splitting one long sum (measured on the 2-core CI
machine, ``benchmarks/RESULTS.md``).  Why blocks: for bf16/fp16 gradients (and float32 ones under
``p < 0``, reduced in float64) torch's CPU kernel first copies its whole input to the accumulation
dtype; a 38.6M-element copy runs at DRAM speed, 2^21-element ones stay in cache.  CUDA kernels
reduce in a tree and upcast inside the kernel, so whole tensors are accurate there.  Why packs:
torch's CPU foreach norm is a loop calling the norm kernel once per tensor (~1.2 us each, whatever
its size); copying 2,000 tensors of 128 elements into one costs a third of that.  On CUDA the
foreach kernels take many tensors per launch, so nothing is copied there.

A *unit* is what a range indexes into: a gradient, or a run of adjacent gradients
(:mod:`distclip.spans`); its flat elements ``[start, stop)`` (in row-major order, whatever its
strides) are what the range covers.  A unit may have any strided layout: a strided view of a
larger buffer is read through its own strides, never as if it were dense.  Complex units are
normed by ``|x|``, as torch norms them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Sequence

import torch
from torch import Tensor

from distclip.partials import PNorm, use_foreach
from distclip.torch_internals import flatten_dense_tensors

ROW = 1 << 12
BLOCK = 1 << 21
ROWS_FROM = 1 << 16
PACK_UP_TO = 1 << 12


@dataclass(frozen=True)
class Pieces:
    """One (device, dtype)'s ranges as kernel inputs.

    ``whole``: ``(unit, start, stop, is_whole_unit)`` for the foreach call; ``packs``: units
    (whole) normed together as one flattened copy; ``row_packs``: units (whole) of one element
    count, copied together and normed one row per unit; ``blocks``: ``(unit, start, rows)``,
    ``rows x ROW`` elements from ``start``; ``value_units``: the unit of every norm
    :func:`piece_norms` returns, in its order (whole pieces, packs by their first unit, every
    unit of the row packs, then each block's rows); ``value_keys``: the ``keys`` entry of every
    norm's range, in the same order (empty without keys).
    """

    whole: tuple[tuple[int, int, int, bool], ...]
    packs: tuple[tuple[int, ...], ...]
    blocks: tuple[tuple[int, int, int], ...]
    value_units: tuple[int, ...]
    value_keys: tuple[object, ...] = ()
    row_packs: tuple[tuple[int, ...], ...] = ()

    def __len__(self) -> int:
        """How many tensors the norm kernels take: whole pieces, packs, row packs and blocks."""
        return len(self.whole) + len(self.packs) + len(self.row_packs) + len(self.blocks)


def split_ranges(
    ranges: Iterable[tuple[int, int, int, int]], device: torch.device, keys: Sequence[object] | None = None
) -> Pieces:
    """``(unit, start, stop, unit numel)`` ranges -> :class:`Pieces` by the module's rule.

    Without ``keys`` small whole units go into packs; with ``keys`` (e.g. the group a per-group
    norm counts each range towards) into row packs by element count, each unit keeping its
    norm and its key."""
    whole, blocks = [], []
    whole_keys, block_keys = [], []
    packs: dict[object, list[list[int]]] = {}  # numel (row packs) or None -> packs, the last one filling
    pack_keys: dict[object, list[list[object]]] = {}
    filled: dict[object, int] = {}
    for n, (unit, start, stop, numel) in enumerate(ranges):
        key = keys[n] if keys is not None else None
        if device.type == "cpu" and start == 0 and stop == numel and 0 < numel <= PACK_UP_TO:
            kind = None if keys is None else numel
            if kind not in packs or filled[kind] + numel > ROWS_FROM:
                packs.setdefault(kind, []).append([])
                pack_keys.setdefault(kind, []).append([])
                filled[kind] = 0
            packs[kind][-1].append(unit)
            pack_keys[kind][-1].append(key)
            filled[kind] += numel
        elif device.type != "cpu" or stop - start <= ROWS_FROM:
            whole.append((unit, start, stop, start == 0 and stop == numel))
            whole_keys.append(key)
        else:
            rows = (stop - start) // ROW
            for first in range(0, rows, BLOCK // ROW):
                blocks.append((unit, start + first * ROW, min(BLOCK // ROW, rows - first)))
                block_keys.append(key)
            if start + rows * ROW < stop:
                whole.append((unit, start + rows * ROW, stop, False))
                whole_keys.append(key)
    every_pack = [tuple(pack) for kind_packs in packs.values() for pack in kind_packs]
    packed, row_packs = (tuple(every_pack), ()) if keys is None else ((), tuple(every_pack))
    value_units = (
        [unit for unit, _, _, _ in whole]
        + [pack[0] for pack in packed]
        + [unit for pack in row_packs for unit in pack]
        + [unit for unit, _, rows in blocks for _ in range(rows)]
    )
    value_keys = () if keys is None else tuple(
        whole_keys
        + [key for kind_keys in pack_keys.values() for pack in kind_keys for key in pack]
        + [key for key, (_, _, rows) in zip(block_keys, blocks) for _ in range(rows)]
    )
    return Pieces(tuple(whole), packed, tuple(blocks), tuple(value_units), value_keys, row_packs)


def piece_tensors(pieces: Pieces, units: Sequence[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
    """The tensors :func:`piece_norms` reduces: whole pieces (flat ranges or whole units), one
    flat copy of each pack, and as blocks one ``(units, numel)`` copy of each row pack then the
    ``(rows, ROW)`` blocks viewed over the current ``units``."""
    # Per unit, its elements in flat (row-major) order as (tensor, step): flat element k sits at
    # ``tensor.storage_offset() + k * step``.  A contiguous unit is that with step 1 as it is; any
    # other is flattened once, however many pieces it has: ``reshape(-1)`` gives a 1-D tensor, a
    # view of the unit when its strides allow (``base[::2]`` stays a stride-2 view, an expanded
    # unit a stride-0 one, counted per logical element as torch counts it) or a contiguous copy.
    flat: dict[int, tuple[Tensor, int]] = {}

    def view(unit: int, start: int, shape: tuple[int, ...]) -> Tensor:
        # One as_strided per piece (not flatten, slice, view: each op costs ~1 us on the CPU).
        if unit not in flat:
            tensor = units[unit]
            if not tensor.is_contiguous():
                tensor = tensor.reshape(-1)
                flat[unit] = tensor, tensor.stride(0)
            else:
                flat[unit] = tensor, 1
        tensor, step = flat[unit]
        strides = (shape[-1] * step, step)[-len(shape) :]
        return tensor.as_strided(shape, strides, tensor.storage_offset() + start * step)

    whole = [units[u] if is_whole else view(u, start, (stop - start,)) for u, start, stop, is_whole in pieces.whole]
    whole += [flatten_dense_tensors([units[u] for u in pack]) for pack in pieces.packs]
    blocks = [
        flatten_dense_tensors([units[u] for u in pack]).view(len(pack), -1) for pack in pieces.row_packs
    ]
    blocks += [view(u, start, (rows, ROW)) for u, start, rows in pieces.blocks]
    return whole, blocks


def piece_norms(
    whole: list[Tensor],
    blocks: list[Tensor],
    dtype: torch.dtype,
    device: torch.device,
    pnorm: PNorm,
    foreach: bool | None,
    foreach_supported: bool | None = None,
    wide: bool = False,
) -> Tensor:
    """The norms of ``whole`` and of every row of ``blocks`` (all of ``dtype`` on ``device``), as
    one float64 vector in :attr:`Pieces.value_units` order; accumulated in float64 where
    ``wide`` (else in float32 unless the gradients are float64)."""
    # p < 0: the sum is ruled by the few smallest elements' huge |x|**p, which float32
    # adds ~1e-3 off over a large tensor (rarely used, so exactness wins over speed here).
    wide = wide or dtype.to_real() == torch.float64 or pnorm.p < 0
    accumulate = torch.float64 if wide else torch.float32
    if dtype.is_complex:  # torch norms complex elements by |x| and wants a complex dtype for it
        accumulate = accumulate.to_complex()
    norms: list[Tensor] = []
    if use_foreach(foreach, whole, device, foreach_supported):
        norms += torch._foreach_norm(whole, pnorm.p, dtype=accumulate) if whole else []
    else:
        norms += [torch.linalg.vector_norm(t, pnorm.p, dtype=accumulate) for t in whole]
    rows = [torch.linalg.vector_norm(block, pnorm.p, dim=1, dtype=accumulate) for block in blocks]
    if norms:
        rows.insert(0, torch.stack(norms))
    if not rows:
        return torch.empty(0, dtype=torch.float64, device=device)
    return (rows[0] if len(rows) == 1 else torch.cat(rows)).to(torch.float64)
