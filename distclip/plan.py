"""The per-step work, planned once: which pieces this rank counts, grouped for foreach kernels.

A :class:`NormPlan` is built from one list of gradients (ownership, (device, dtype) buckets,
per-group ids) and then executed on the *current* gradient tensors of the same parameters: the
functional API builds one per call, :class:`distclip.GradClipper` keeps one across steps, so a
step costs the foreach kernels, one all-reduce and list building, nothing that rediscovers
meshes or ownership.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import torch
from torch import Tensor

from distclip.copycheck import CopyCheck
from distclip.ownership import Attribution, Ownership, OwnershipError, Problem, plan_ownership
from distclip.partials import PNorm, use_foreach
from distclip.reduction import all_reduce_partials, raise_problems
from distclip.scaling import scale_grouped_
from distclip.spans import Runs, find_runs
from distclip.topology import Topology, reduction_device
from torch.distributed.tensor import DTensor
from torch.utils._foreach_utils import _has_foreach_support


# Elements per CPU chunk: 2**18 keeps a GPT-2-sized norm within ~1e-6 of float64 (torch's
# unchunked CPU kernel: ~1e-3) at ~1.2x the cost of torch's own norm; 2**16 gives ~1e-7 at ~1.5x.
CPU_CHUNK = 1 << 18


@dataclass
class _Bucket:
    """Owned pieces of one (device, dtype): whole tensors and flat ranges, by gradient index;
    and, where pieces lie end to end in memory, the same elements as runs (:mod:`distclip.spans`)."""

    device: torch.device
    dtype: torch.dtype
    pieces: list[tuple[int, int, int, bool]]  # (grad index, start, stop, whole)
    group_ids: Tensor | None  # per piece, the group it counts towards (on ``device``)
    foreach_supported: bool  # torch's check, made once: the plan fixes the tensors' types
    runs: Runs | None = None
    run_pieces: list[tuple[int, int, int, bool]] | None = None  # (run, start, stop, whole run)
    run_group_ids: Tensor | None = None


def _chunked(unit: int, start: int, stop: int, whole: bool, device: torch.device) -> list[tuple[int, int, int, bool]]:
    """A piece as pieces the norm kernel sums accurately: on the CPU, equal chunks of about
    CPU_CHUNK elements (at most 1.5 x CPU_CHUNK; a piece under that stays whole).

    torch's CPU norm kernels sum each thread's share sequentially in float32: a 38M-element tensor
    comes out ~3e-3 off.  Chunks keep each sum short; their p-th powers are added in float64.
    Equal chunks rather than CPU_CHUNK and a remainder: an FSDP1 shard of 2.002 x CPU_CHUNK
    elements is 2 kernels, not 3.
    """
    count = round((stop - start) / CPU_CHUNK) if device.type == "cpu" else 1
    if count <= 1 or (stop - start) <= CPU_CHUNK * 3 // 2:
        return [(unit, start, stop, whole)]
    bounds = [start + (stop - start) * k // count for k in range(count + 1)]
    return [(unit, a, b, False) for a, b in zip(bounds, bounds[1:])]


class NormPlan:
    """Ownership and grouping of a fixed list of gradients, ready to run every step.

    ``group_of`` optionally assigns each gradient a group index in ``range(num_groups)`` (or
    -1 for none); each group's norm then rides the same collective as the total.  ``keys``
    are the parameters of ``grads``, for a per-parameter ``replica_group`` callable.
    """

    def __init__(
        self,
        grads: Sequence[Tensor],
        topology: Topology,
        known: Mapping[int, Attribution | OwnershipError] | None = None,
        group_of: Sequence[int] | None = None,
        num_groups: int = 0,
        keys: Sequence[Tensor] | None = None,
    ) -> None:
        self.topology = topology
        self.num_groups = num_groups
        self.is_dtensor = [isinstance(g, DTensor) for g in grads]
        local = self.local_tensors(grads)
        self.device = reduction_device(topology, fallback=local[0].device if local else torch.device("cpu"))
        # The norms are returned where the gradients live (the reduction's device if none here).
        self.out_device = local[0].device if local else self.device
        self.out_dtype = torch.float64 if any(t.dtype == torch.float64 for t in local) else torch.float32

        ownership = plan_ownership(grads, topology, known, keys)
        self.problems: dict[Problem, str] = ownership.problems
        if self.problems:  # the norm will be NaN (or raised): count and check nothing
            ownership = Ownership([], self.problems)
        self.copy_check = CopyCheck(ownership.copy_buckets, local, topology.rank)
        owned: dict[tuple[torch.device, torch.dtype], list[tuple[int, int, int]]] = {}
        for index, start, stop in ownership.owned:
            owned.setdefault((local[index].device, local[index].dtype), []).append((index, start, stop))
        # Gradients in no group count towards a spare slot k, dropped after the reduction.
        slot = [num_groups if g < 0 else g for g in group_of] if group_of is not None else None
        self.buckets = [self._bucket(device, dtype, segments, local, slot) for (device, dtype), segments in owned.items()]
        # The same ranges per gradient, for partials taken one gradient at a time (distclip.overlap).
        self.owned_ranges: dict[int, list[tuple[int, int]]] = {}
        for index, start, stop in ownership.owned:
            self.owned_ranges.setdefault(index, []).append((start, stop))
        self.owned_indices = list(self.owned_ranges)
        self.owned_slot_ids = (
            None if slot is None else torch.tensor([slot[i] for i in self.owned_indices], device=self.device)
        )
        owned_slots = {slot[index] for index, _, _ in ownership.owned} if slot is not None else set()
        self.presence = [bool(ownership.owned)] + [g in owned_slots for g in range(num_groups)]
        # Every local gradient is scaled, copies included: one list of indices per (device, dtype).
        scale: dict[tuple[torch.device, torch.dtype], list[int]] = {}
        for index, tensor in enumerate(local):
            scale.setdefault((tensor.device, tensor.dtype), []).append(index)
        self.scale_groups = list(scale.values())
        self.scale_foreach_supported = [
            _has_foreach_support([local[i] for i in indices], local[indices[0]].device) for indices in self.scale_groups
        ]
        # Empty gradients need no scaling, so runs leave them out.
        self.scale_runs = [
            find_runs([(i, 0, local[i].numel()) for i in indices if local[i].numel()], local) for indices in self.scale_groups
        ]

    @staticmethod
    def _bucket(
        device: torch.device,
        dtype: torch.dtype,
        segments: list[tuple[int, int, int]],
        local: Sequence[Tensor],
        slot: Sequence[int] | None,
    ) -> _Bucket:
        pieces = [
            piece
            for index, start, stop in segments
            for piece in _chunked(index, start, stop, start == 0 and stop == local[index].numel(), device)
        ]
        group_ids = None if slot is None else torch.tensor([slot[p[0]] for p in pieces], device=device)
        bucket = _Bucket(device, dtype, pieces, group_ids, _has_foreach_support([local[p[0]] for p in pieces], device))
        runs = find_runs(segments, local, None if slot is None else [slot[index] for index, _, _ in segments])
        if runs is not None:
            bucket.runs = runs
            bucket.run_pieces = [
                piece for r, (_, _, length) in enumerate(runs.runs) for piece in _chunked(r, 0, length, True, device)
            ]
            if slot is not None:  # a run's pieces share one group: its first gradient's
                bucket.run_group_ids = torch.tensor([slot[runs.runs[p[0]][0]] for p in bucket.run_pieces], device=device)
        return bucket

    def local_tensors(self, grads: Sequence[Tensor]) -> list[Tensor]:
        # DTensor._local_tensor instead of to_local(): no autograd function per gradient.
        return [g._local_tensor if d else g for g, d in zip(grads, self.is_dtensor)]

    def _bucket_norms(
        self, bucket: _Bucket, local: Sequence[Tensor], pnorm: PNorm, foreach: bool | None
    ) -> tuple[Tensor, Tensor | None]:
        """Per-piece norms (float64) of one bucket, and each one's group id."""
        views = bucket.runs.views(local) if bucket.runs is not None else None
        if views is not None:
            tensors = [views[r] if whole else views[r][start:stop] for r, start, stop, whole in bucket.run_pieces]
            group_ids = bucket.run_group_ids
        else:
            tensors = [
                local[i] if whole else local[i].reshape(-1)[start:stop]
                for i, start, stop, whole in bucket.pieces
            ]
            group_ids = bucket.group_ids
        return _piece_norms(tensors, bucket.dtype, bucket.device, pnorm, foreach, bucket.foreach_supported), group_ids

    def gradient_partial(self, index: int, tensor: Tensor, pnorm: PNorm, foreach: bool | None) -> Tensor:
        """The partial of gradient ``index`` alone (its local tensor ``tensor``): its owned
        elements' powered norms combined, float64, 0-dim, on the reduction device.
        :meth:`partials_from_gradients` combines these as :meth:`partials` combines buckets."""
        numel = tensor.numel()
        pieces = [
            piece
            for start, stop in self.owned_ranges[index]
            for piece in _chunked(index, start, stop, start == 0 and stop == numel, tensor.device)
        ]
        tensors = [tensor if whole else tensor.reshape(-1)[start:stop] for _, start, stop, whole in pieces]
        norms = _piece_norms(tensors, tensor.dtype, tensor.device, pnorm, foreach)
        return pnorm.combine(pnorm.powered(norms)).to(self.device)

    def partials_from_gradients(self, values: Sequence[Tensor], pnorm: PNorm) -> Tensor:
        """:meth:`partials` from :meth:`gradient_partial` of every gradient in
        ``owned_indices``, in that order."""
        if not values:
            return pnorm.merge([], 1 + self.num_groups, self.device)
        stacked = torch.stack(list(values))
        total = pnorm.combine(stacked).reshape(1)
        if not self.num_groups:
            return total
        return torch.cat([total, pnorm.combine_by_group(stacked, self.owned_slot_ids, self.num_groups)])

    def partials(self, local: Sequence[Tensor], pnorm: PNorm, foreach: bool | None) -> Tensor:
        """This rank's partials: ``[total, group 0, ..., group k-1]``, float64 on the
        reduction device."""
        totals, per_group = [], []
        for bucket in self.buckets:
            norms, group_ids = self._bucket_norms(bucket, local, pnorm, foreach)
            values = pnorm.powered(norms)
            totals.append(pnorm.combine(values).reshape(1))
            if self.num_groups:
                per_group.append(pnorm.combine_by_group(values, group_ids, self.num_groups))
        total = pnorm.merge(totals, 1, self.device)
        if not self.num_groups:
            return total
        return torch.cat([total, pnorm.merge(per_group, self.num_groups, self.device)])

    def global_norms(
        self,
        local: Sequence[Tensor],
        pnorm: PNorm,
        foreach: bool | None,
        divide_by: Tensor | None = None,
        extra: Tensor | None = None,
        problems: Mapping[Problem, str] | None = None,
        partials: Tensor | None = None,
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        """Partials and the copy check -> the one all-reduce -> ``(norms, invalid, extra)``: the
        k norms ``[total, groups]`` in the output dtype on the output device (divided by
        ``divide_by`` first, in float64: GradScaler's scale), True where a rank reported a
        problem or the copies assumed differ, and the float64 vector ``extra`` summed over the
        group (None when not given).  Problems (the plan's, and ``problems`` the caller found in
        this step's other input) are raised on every rank that knows of them.  ``partials``:
        this rank's partials when already taken (:mod:`distclip.overlap`)."""
        problems = {**self.problems, **problems} if problems else self.problems
        reduced = all_reduce_partials(
            self.partials(local, pnorm, foreach) if partials is None else partials,
            self.presence,
            problems,
            pnorm,
            self.topology,
            self.copy_check.contributions(local, self.device),
            extra,
        )
        raise_problems(reduced, problems)
        norms = reduced.norms
        if divide_by is not None:
            norms = norms / divide_by.to(norms.device, torch.float64)
        return norms.to(device=self.out_device, dtype=self.out_dtype), reduced.invalid, reduced.extra

    def scale_(self, local: Sequence[Tensor], coefficient: Tensor, foreach: bool | None) -> None:
        """Multiply every local gradient in place by ``coefficient``."""
        groups = []
        for indices, runs in zip(self.scale_groups, self.scale_runs):
            views = runs.views(local) if runs is not None else None
            groups.append(views if views is not None else [local[i] for i in indices])
        scale_grouped_(
            groups,
            coefficient,
            foreach,
            self.scale_foreach_supported,
        )


def _piece_norms(
    tensors: list[Tensor],
    dtype: torch.dtype,
    device: torch.device,
    pnorm: PNorm,
    foreach: bool | None,
    foreach_supported: bool | None = None,
) -> Tensor:
    """The norms of ``tensors`` (all of ``dtype`` on ``device``) as one float64 vector."""
    # p < 0: the sum is ruled by the few smallest elements' huge |x|**p, which float32
    # adds ~1e-3 off over a large tensor (rarely used, so exactness wins over speed here).
    wide = dtype == torch.float64 or pnorm.p < 0
    accumulate = torch.float64 if wide else torch.float32
    if use_foreach(foreach, tensors, device, foreach_supported):
        norms = torch._foreach_norm(tensors, pnorm.p, dtype=accumulate)
    else:
        norms = [torch.linalg.vector_norm(t, pnorm.p, dtype=accumulate) for t in tensors]
    return torch.stack(norms).to(torch.float64)
