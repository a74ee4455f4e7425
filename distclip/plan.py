"""The per-step work, planned once: which pieces this rank counts, grouped for foreach kernels.

A :class:`NormPlan` is built from one list of gradients (ownership, (device, dtype) buckets,
per-group ids) and then executed on the *current* gradient tensors of the same parameters: the
functional API builds one per call, :class:`distclip.GradClipper` keeps one across steps, so a
step costs the foreach kernels, one all-reduce and list building, nothing that rediscovers
meshes or ownership.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence, Union

import torch
from torch import Tensor

from distclip.copycheck import CopyCheck
from distclip.ownership import Attribution, Ownership, OwnershipError, Problem, plan_ownership
from distclip.partials import PNorm
from distclip.pieces import Pieces, piece_norms, piece_tensors, split_ranges
from distclip import layout
from distclip.reduction import Contribution, reductions_over
from distclip.scaling import scale_grouped_
from distclip.spans import Runs, find_runs
from distclip.topology import Topology, reduction_device
from distclip.torch_internals import LOCAL_TENSOR, has_foreach_support
from torch.distributed.tensor import DTensor


@dataclass
class _Bucket:
    """Owned pieces of one (device, dtype), units being gradients; and, where pieces lie end to
    end in memory, the same elements as runs (:mod:`distclip.spans`), units being runs."""

    device: torch.device
    dtype: torch.dtype
    pieces: Pieces
    group_ids: Tensor | None  # per norm value, the group it counts towards (on ``device``)
    foreach_supported: bool  # torch's check, made once: the plan fixes the tensors' types
    runs: Runs | None = None
    run_pieces: Pieces | None = None
    run_group_ids: Tensor | None = None


class NormPlan:
    """Ownership and grouping of a fixed list of gradients, ready to run every step.

    ``group_of`` optionally assigns each gradient a group index in ``range(num_groups)`` (or
    -1 for none; or, for a gradient holding several parameters, a group per range: see
    :func:`_slot_of`); each group's norm then rides the same collective as the total.  ``keys``
    are the parameters of ``grads``, for a per-parameter ``replica_group`` callable.
    """

    def __init__(
        self,
        grads: Sequence[Tensor],
        topology: Topology,
        known: Mapping[int, Attribution | OwnershipError] | None = None,
        group_of: Sequence[GroupOf] | None = None,
        num_groups: int = 0,
        keys: Sequence[Tensor] | None = None,
    ) -> None:
        self.topology = topology
        self.num_groups = num_groups
        self.is_dtensor = [isinstance(g, DTensor) for g in grads]
        self._all_plain = not any(self.is_dtensor)
        local = self.local_tensors(grads)
        self.device = reduction_device(topology, fallback=local[0].device if local else torch.device("cpu"))
        # The norms are returned where the gradients live (the reduction's device if none here).
        self.out_device = local[0].device if local else self.device
        # As torch's norm: float64 when any gradient is float64 or complex128.
        self.out_dtype = torch.float64 if any(t.dtype.to_real() == torch.float64 for t in local) else torch.float32

        ownership = plan_ownership(grads, topology, known, keys)
        self.problems: dict[Problem, str] = ownership.problems
        # The copy set of each gradient held by other ranks too: a collective over those ranks
        # may still change it after backward, which distclip.overlap must rule out.
        self.copy_sets: dict[int, tuple[int, ...]] = {
            index: attribution.copies
            for index, attribution in enumerate(ownership.attributions)
            if isinstance(attribution, Attribution) and len(attribution.copies) > 1
        }
        if self.problems:  # the norm will be NaN (or raised): count and check nothing
            ownership = Ownership([], self.problems)
        self.copy_check = CopyCheck(ownership.copy_buckets, local, topology.rank)
        owned: dict[tuple[torch.device, torch.dtype], list[tuple[int, int, int]]] = {}
        for index, start, stop in ownership.owned:
            owned.setdefault((local[index].device, local[index].dtype), []).append((index, start, stop))
        slot = None if group_of is None else functools.partial(_slot_of, group_of, num_groups)
        self.buckets = [self._bucket(device, dtype, segments, local, slot) for (device, dtype), segments in owned.items()]
        # The same ranges per gradient, for partials taken one gradient at a time (distclip.overlap).
        self.owned_ranges: dict[int, list[tuple[int, int]]] = {}
        for index, start, stop in ownership.owned:
            self.owned_ranges.setdefault(index, []).append((start, stop))
        self.owned_indices = list(self.owned_ranges)
        # A gradient's partial taken alone (overlap) counts towards its first range's group: only
        # FSDP1 flat gradients have several, and FSDP1 runs no overlap.
        self.owned_slot_ids = (
            None if slot is None
            else torch.tensor([slot(i, self.owned_ranges[i][0][0]) for i in self.owned_indices], device=self.device)
        )
        owned_slots = {slot(index, start) for index, start, _ in ownership.owned} if slot is not None else set()
        self.presence = (bool(ownership.owned),) + tuple(g in owned_slots for g in range(num_groups))
        # Every local gradient is scaled, copies included: one list of indices per (device, dtype).
        scale: dict[tuple[torch.device, torch.dtype], list[int]] = {}
        for index, tensor in enumerate(local):
            scale.setdefault((tensor.device, tensor.dtype), []).append(index)
        self.scale_groups = list(scale.values())
        self.scale_foreach_supported = [
            has_foreach_support([local[i] for i in indices], local[indices[0]].device) for indices in self.scale_groups
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
        slot: Callable[[int, int], int] | None,
    ) -> _Bucket:
        keys = None if slot is None else [slot(i, start) for i, start, _ in segments]
        pieces = split_ranges(((i, start, stop, local[i].numel()) for i, start, stop in segments), device, keys)
        group_ids = None if keys is None else torch.tensor(pieces.value_keys, dtype=torch.int64, device=device)
        supported = has_foreach_support([local[i] for i, _, _ in segments], device)
        bucket = _Bucket(device, dtype, pieces, group_ids, supported)
        runs = find_runs(segments, local, keys)
        if runs is not None:
            bucket.runs = runs
            # A run's pieces share one group (find_runs joins only pieces of one key).
            range_keys = None if keys is None else [keys[n] for n in runs.range_pieces]
            bucket.run_pieces = split_ranges(runs.ranges, device, range_keys)
            if keys is not None:
                bucket.run_group_ids = torch.tensor(bucket.run_pieces.value_keys, dtype=torch.int64, device=device)
        return bucket

    def local_tensors(self, grads: Sequence[Tensor]) -> list[Tensor]:
        """The plain local tensor of each gradient (a DTensor's shard)."""
        # The local tensor without to_local(): no autograd function per gradient.
        if self._all_plain:
            return list(grads)
        return [LOCAL_TENSOR(g) if d else g for g, d in zip(grads, self.is_dtensor)]

    def _bucket_norms(
        self, bucket: _Bucket, local: Sequence[Tensor], pnorm: PNorm, foreach: bool | None, wide: bool
    ) -> tuple[Tensor, Tensor | None]:
        """Per-piece norms (float64) of one bucket, and each one's group id."""
        views = bucket.runs.views(local) if bucket.runs is not None else None
        if views is not None:
            whole, blocks = piece_tensors(bucket.run_pieces, views)
            group_ids = bucket.run_group_ids
        else:
            whole, blocks = piece_tensors(bucket.pieces, local)
            group_ids = bucket.group_ids
        norms = piece_norms(whole, blocks, bucket.dtype, bucket.device, pnorm, foreach, bucket.foreach_supported, wide)
        return norms, group_ids

    def gradient_partial(
        self, index: int, tensor: Tensor, pnorm: PNorm, foreach: bool | None, wide: bool = False
    ) -> Tensor:
        """The partial of gradient ``index`` alone (its local tensor ``tensor``): its owned
        elements' powered norms combined, float64, 0-dim, on the reduction device.
        :meth:`partials_from_gradients` combines these as :meth:`partials` combines buckets."""
        numel = tensor.numel()
        pieces = split_ranges(((0, start, stop, numel) for start, stop in self.owned_ranges[index]), tensor.device)
        whole, blocks = piece_tensors(pieces, [tensor])
        norms = piece_norms(whole, blocks, tensor.dtype, tensor.device, pnorm, foreach, wide=wide)
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

    def partials(self, local: Sequence[Tensor], pnorm: PNorm, foreach: bool | None, wide: bool = False) -> Tensor:
        """This rank's partials: ``[total, group 0, ..., group k-1]``, float64 on the
        reduction device.  ``wide``: accumulate every norm in float64 (gradients still
        multiplied by a large loss scale, whose squares float32 cannot hold)."""
        totals, per_group = [], []
        for bucket in self.buckets:
            norms, group_ids = self._bucket_norms(bucket, local, pnorm, foreach, wide)
            values = pnorm.powered(norms)
            totals.append(pnorm.combine(values).reshape(1))
            if self.num_groups:
                per_group.append(pnorm.combine_by_group(values, group_ids, self.num_groups))
        total = pnorm.merge(totals, 1, self.device)
        if not self.num_groups:
            return total
        return torch.cat([total, pnorm.merge(per_group, self.num_groups, self.device)])

    def contribution(
        self,
        local: Sequence[Tensor],
        pnorm: PNorm,
        foreach: bool | None,
        *,
        wide: bool = False,
        partials: Tensor | None = None,
        problems: Mapping[Problem, str] | None = None,
        checks: Tensor | None = None,
        extra: Tensor | None = None,
        relayout: bool = False,
    ) -> Contribution:
        """This rank's part of the one all-reduce (:mod:`distclip.reduction`): its partials
        (``partials`` when already taken, :mod:`distclip.overlap`; ``wide``: accumulated in
        float64, for gradients still multiplied by GradScaler's scale), the plan's problems and
        ``problems`` the caller found in the step's other input, the copy check, the layout
        ``checks`` (:mod:`distclip.layout`), ``extra`` (summed as it is) and ``relayout``."""
        return Contribution(
            partials=self.partials(local, pnorm, foreach, wide=wide) if partials is None else partials,
            present=self.presence,
            problems={**self.problems, **problems} if problems else self.problems,
            copy_check=self.copy_check.contributions(local, self.device, reductions_over(self.topology.process_group)),
            checks=layout.checks(layout.Layout(), [], self.device) if checks is None else checks,
            extra=extra,
            relayout=relayout,
        )

    def scale_(self, local: Sequence[Tensor], coefficient: Tensor, foreach: bool | None) -> None:
        """Multiply every local gradient in place by ``coefficient``."""
        groups = []
        for indices, runs in zip(self.scale_groups, self.scale_runs):
            views = runs.views(local) if runs is not None else None
            if views is None:
                # One device and dtype for all: the list itself, not a copy made per step.
                views = local if len(indices) == len(local) else [local[i] for i in indices]
            groups.append(views)
        scale_grouped_(
            groups,
            coefficient,
            foreach,
            self.scale_foreach_supported,
        )


GroupOf = Union[int, tuple[tuple[int, int, int], ...]]


def _slot_of(group_of: Sequence[GroupOf], num_groups: int, index: int, start: int) -> int:
    """The slot element ``start`` of gradient ``index`` counts towards: its group, or the spare
    slot ``num_groups`` (dropped after the reduction) for none.  ``group_of[index]`` is a group
    (-1: none) or, for a gradient holding several parameters (an FSDP1 flat gradient),
    ``(start, stop, group)`` per range."""
    entry = group_of[index]
    if isinstance(entry, tuple):
        entry = next((group for first, stop, group in entry if first <= start < stop), -1)
    return num_groups if entry < 0 else entry
