"""The copy contract, checked inside the one collective.

distclip assumes that certain ranks hold bitwise copies of certain gradients (``replica_group``,
DTensor ``Replicate`` mesh dims, FSDP1 NO_SHARD / hybrid replicas) and splits their norm work.
If the assumption is wrong (pipeline stages called with the default ``replica_group``, gradients
not yet synchronized, a parameter DDP was told to ignore), the norm is silently wrong.  So every
rank adds a fingerprint of what it believes are copies to the vector of the existing all-reduce,
and a wrong assumption is raised on every rank together.

The rule.  For each copy set ``C`` (the sorted ranks holding copies of a list of tensors, in
order), each member computes features ``x`` of its list: the number of tensors, a hash of their
shapes, dtypes, counted ranges and which ranges share a tensor, and a hash of the bit patterns
of sampled elements.  Member
``i`` adds ``w_i * x`` and ``w_i * x**2`` to slot ``hash(C) mod SLOTS``, with ``w = k - 1`` for
the lowest rank of ``C`` and ``w = -1`` for the other ``k - 1``.  The SUM over the group of a
slot is then::

    sum over sets C in the slot of  sum_{i>0} (x_0 - x_i)   and   sum_{i>0} (x_0**2 - x_i**2)

which is exactly 0 for every set whose members agree, whatever else shares the slot: **no false
alarm**, as every value is an integer below 2**53 and float64 adds them exactly.  A set whose
members disagree gives a nonzero pair (with ``e_i = x_i - x_0``, both sums zero imply
``sum e_i**2 = 0``), so a disagreement is always found unless two disagreeing sets cancel in the
same slot.  Counts are exact; shapes/dtypes and values are 15-bit hashes, so a difference in them
escapes only when the hash collides (about 1 in 32,749 per hashed feature; shapes and values
are hashed separately).  A member that holds nothing of the set contributes nothing, which reads
as ``x = 0`` and is found too (a list always has a count >= 1).

What is sampled, and when.  The set's tensors are its *units*: one per local tensor, however
many of the set's ranges it holds (an FSDP1 flat gradient is one unit).  Sampling a unit is one
gather (``torch.take``: by logical, row-major index, whatever the strides) of up to 4 spread
positions -- first, ``n // 3``, ``2n // 3`` and last -- of each of its ranges.  A call samples a
window of ``w = min(n, UNITS_PER_STEP)`` of the set's ``n`` units: window ``j = s mod N``, units
``(j * w + i) mod n`` for ``i < w``, where ``s`` is the number of distclip reductions over the
process group so far (:func:`distclip.reduction.reductions_over`) and ``N`` the smallest prime
``>= ceil(n / w)`` (1 when ``n <= w``).  ``s`` is the same on every rank of the group whatever
each rank did before (every rank takes part in every reduction over it), so the members sample
the same elements without communicating, and a caught error or a call over another group
changes nothing.  ``N`` consecutive windows cover every unit; so does any ``N`` calls made every
``k``-th reduction over the group (other distclip calls over the group between them in a fixed
pattern) when ``N`` does not divide ``k``, which ``N`` prime makes true for every ``k < N``.
The value hash is ``sum_e m_e * (b_e mod PRIME) mod PRIME`` over the sampled words ``b_e``
(the elements' bit patterns as integers: 1- and 2-byte elements one word each, larger ones
32-bit words, two for an 8-byte element, four for a 16-byte one), with multipliers
``m_e`` in ``[1, PRIME)`` that depend on the position in the sample: one word that differs
changes it unless its two patterns are congruent modulo PRIME.

How it is read changes nothing of what is read: when a window's units are views into one
buffer (DDP's ``gradient_as_bucket_view``, a flat gradient buffer), one gather over the buffer
reads the same elements as one gather per unit, after checking, for the window's units only,
that each still lies where the plan found it (otherwise: one gather per unit).
"""

from __future__ import annotations

import itertools
import math
import zlib
from dataclasses import dataclass
from typing import Mapping, Sequence

import torch
from torch import Tensor

from distclip.ownership import Segment

# A prime below 2**15: hashes x < 2**15, x**2 < 2**30; with |w| < 2**15 ranks per set and a few
# sets per rank, every partial sum of the all-reduce stays far below 2**53.
PRIME = 32749
SLOTS = 4
FEATURES = 3  # count, layout hash, value hash
SIZE = SLOTS * FEATURES * 2
# Units (local tensors) of each copy set sampled per call: bounded, so the cost of a call does
# not grow with the model (one gather per unit); the window rotates to cover the rest.
UNITS_PER_STEP = 16

_WORD_VIEW = {1: torch.uint8, 2: torch.int16}  # larger elements are read as 32-bit words


def _stable_hash(value: object) -> int:
    """A hash that is the same in every process (Python's ``hash`` of a str is salted)."""
    return zlib.crc32(repr(value).encode())


def _positions(start: int, stop: int) -> list[int]:
    n = stop - start
    return sorted({start, start + n // 3, start + 2 * n // 3, stop - 1})


def _smallest_prime_at_least(n: int) -> int:
    candidate = max(n, 2)
    while any(candidate % d == 0 for d in range(2, math.isqrt(candidate) + 1)):
        candidate += 1
    return candidate


def _gatherable(tensor: Tensor) -> Tensor:
    """``tensor``, or its uint8 view for 1-byte dtypes: torch gathers no float8."""
    return tensor.view(torch.uint8) if tensor.element_size() == 1 else tensor


def _words(values: Tensor) -> Tensor:
    """The bit patterns of a 1-D tensor's elements as float64 integers: one word per element up
    to 2 bytes, 32-bit words beyond (an 8-byte element gives two, a 16-byte one four), all
    below 2**31 in magnitude, so exact in float64."""
    return values.view(_WORD_VIEW.get(values.element_size(), torch.int32)).to(torch.float64)


@dataclass(frozen=True)
class _Rotation:
    """Which units of one copy set a call samples: ``window`` of them, window ``s mod windows``."""

    units: int
    window: int
    windows: int

    @classmethod
    def of(cls, units: int) -> _Rotation:
        window = min(units, UNITS_PER_STEP)
        needed = -(-units // window)
        return cls(units, window, 1 if needed == 1 else _smallest_prime_at_least(needed))

    def window_at(self, step: int) -> int:
        """The window sampled by the call made after ``step`` reductions over the group."""
        return step % self.windows

    def window_units(self, window: int) -> list[int]:
        first = window * self.window
        return [(first + i) % self.units for i in range(self.window)]


@dataclass(frozen=True)
class _Buffer:
    """A window whose units were, at planning, contiguous views into one storage: unit ``k``
    starts ``offsets[k]`` elements after the first unit; the window's positions, in window
    order, are ``index`` into the ``length`` elements from ``start`` elements after the first
    unit's first element."""

    offsets: tuple[int, ...]
    numels: tuple[int, ...]
    start: int
    length: int
    index: list[int]

    @classmethod
    def of(cls, tensors: Sequence[Tensor], positions: Sequence[list[int]]) -> _Buffer | None:
        if len(tensors) < 2 or not all(type(t) is Tensor and t.is_contiguous() for t in tensors):
            return None
        first = tensors[0]
        if any(
            (t.device, t.dtype, t.untyped_storage().data_ptr()) != (first.device, first.dtype, first.untyped_storage().data_ptr())
            for t in tensors
        ):
            return None
        offsets = [(t.data_ptr() - first.data_ptr()) // t.element_size() for t in tensors]
        start = min(offsets)
        length = max(o + t.numel() for o, t in zip(offsets, tensors)) - start
        index = [o - start + p for o, unit in zip(offsets, positions) for p in unit]
        return cls(tuple(offsets), tuple(t.numel() for t in tensors), start, length, index)

    def view(self, tensors: Sequence[Tensor]) -> Tensor | None:
        """The flat view of the buffer the plan found, over this call's ``tensors``; None unless
        each still lies where it did (then it reads exactly their elements)."""
        first = tensors[0]
        base, size = first.data_ptr(), first.element_size()
        for tensor, offset, numel in zip(tensors, self.offsets, self.numels):
            if not tensor.is_contiguous() or tensor.data_ptr() != base + offset * size or tensor.numel() != numel:
                return None
        begin = first.storage_offset() + self.start
        if begin < 0 or (begin + self.length) * size > first.untyped_storage().nbytes():
            return None
        return _gatherable(first).as_strided((self.length,), (1,), begin)


@dataclass(frozen=True)
class _SampledSet:
    """One copy set's units: per unit the local tensor, the flat positions gathered from it and
    its kind (an index into ``kinds``, the (device, dtype)s in order of first use); per window,
    its buffer if its units are views into one."""

    tensors: list[int]
    positions: list[list[int]]
    kind_of: list[int]
    kinds: list[tuple[torch.device, torch.dtype]]
    rotation: _Rotation
    buffers: list[_Buffer | None]


class CopyCheck:
    """The fingerprints of this rank's copy sets, planned once, contributed every call.

    ``copy_buckets`` maps each copy set of more than one rank to the ordered segments this rank
    holds of it (see :func:`distclip.ownership.plan_ownership`).  Per call the work is one
    gather per sampled unit (at most ``UNITS_PER_STEP`` per set; one for a window of views into
    one buffer) and a fixed handful of tensor ops per set; no host sync, no tensor made from
    host values after the first call.
    """

    def __init__(
        self,
        copy_buckets: Mapping[tuple[int, ...], Sequence[Segment]],
        local: Sequence[Tensor],
        rank: int,
    ) -> None:
        base = torch.zeros(SIZE, dtype=torch.float64)
        self.sets: list[_SampledSet] = []
        placed: list[tuple[int, float]] = []  # per sampled set: its value-hash slot offset, weight
        longest = 0  # the most words one call samples from one set: the multipliers needed
        for members, segments in copy_buckets.items():
            slot = _stable_hash(members) % SLOTS
            weight = float(len(members) - 1 if rank == members[0] else -1)
            unit_of: dict[int, int] = {}  # local tensor index -> unit number, in order of first use
            layout, positions = [], []
            for i, start, stop in segments:
                unit = unit_of.setdefault(i, len(unit_of))
                layout.append((tuple(local[i].shape), str(local[i].dtype), start, stop, unit))
                if unit == len(positions):
                    positions.append([])
                if stop > start:
                    positions[unit].extend(_positions(start, stop))
            for feature, x in enumerate((len(segments), _stable_hash(layout) % PRIME)):
                offset = (slot * FEATURES + feature) * 2
                base[offset] += weight * x
                base[offset + 1] += weight * x * x
            sampled = [(i, p) for i, p in zip(unit_of, positions) if p]
            if not sampled:  # nothing but empty ranges: no values to hash (x = 0 on every member)
                continue
            tensors, positions = [i for i, _ in sampled], [p for _, p in sampled]
            rotation = _Rotation.of(len(sampled))
            words = sorted((len(p) * max(1, local[i].element_size() // 4) for i, p in sampled), reverse=True)
            longest = max(longest, sum(words[: rotation.window]))
            kinds = list(dict.fromkeys((local[i].device, local[i].dtype) for i in tensors))
            buffers = []
            for window in range(rotation.windows):
                units = rotation.window_units(window)
                buffers.append(_Buffer.of([local[tensors[u]] for u in units], [positions[u] for u in units]))
            kind_of = [kinds.index((local[i].device, local[i].dtype)) for i in tensors]
            self.sets.append(_SampledSet(tensors, positions, kind_of, kinds, rotation, buffers))
            placed.append(((slot * FEATURES + 2) * 2, weight))
        # Multipliers in [1, PRIME), position-dependent, so that permuted values hash differently.
        multipliers = (torch.arange(longest, dtype=torch.int64) * 7919 % (PRIME - 1) + 1).to(torch.float64)
        # (w * x, w * x**2) of every sampled set into its slot: weigh @ [x, x**2], one kernel.
        weigh = torch.zeros(SIZE, 2 * len(placed), dtype=torch.float64)
        for n, (offset, weight) in enumerate(placed):
            weigh[offset, n] = weigh[offset + 1, len(placed) + n] = weight
        self._host = {"base": base, "multipliers": multipliers, "weigh": weigh}
        self._on_device: dict[torch.device, dict[str, Tensor]] = {}
        # Per set: each unit's positions and each buffer window's, as index tensors on their
        # device; made at the first call, with one copy per device.
        self._unit_indices: list[list[Tensor]] = []
        self._buffer_indices: list[list[Tensor | None]] = []

    def _constants(self, device: torch.device) -> dict[str, Tensor]:
        if device not in self._on_device:
            self._on_device[device] = {name: t.to(device) for name, t in self._host.items()}
        return self._on_device[device]

    def _make_indices(self) -> None:
        wanted: dict[torch.device, list[tuple[list, int, list[int]]]] = {}  # device -> (where, at, positions)
        for sampled in self.sets:
            units: list = [None] * len(sampled.positions)
            buffers: list = [None] * len(sampled.buffers)
            for unit, kind in enumerate(sampled.kind_of):
                wanted.setdefault(sampled.kinds[kind][0], []).append((units, unit, sampled.positions[unit]))
            for window, buffer in enumerate(sampled.buffers):
                if buffer is not None:
                    device = sampled.kinds[sampled.kind_of[sampled.rotation.window_units(window)[0]]][0]
                    wanted.setdefault(device, []).append((buffers, window, buffer.index))
            self._unit_indices.append(units)
            self._buffer_indices.append(buffers)
        for device, entries in wanted.items():
            flat = torch.tensor(list(itertools.chain.from_iterable(p for _, _, p in entries)), device=device)
            for (where, at, _), index in zip(entries, flat.split([len(p) for _, _, p in entries])):
                where[at] = index

    def _sampled_words(self, n: int, local: Sequence[Tensor], step: int) -> list[Tensor]:
        """The bit-pattern words of set ``n``'s units sampled at ``step``, per (device, dtype) in
        the set's order of them (the members agree on it), unit by unit in window order."""
        sampled = self.sets[n]
        window = sampled.rotation.window_at(step)
        units = sampled.rotation.window_units(window)
        tensors = [local[sampled.tensors[u]] for u in units]
        buffer = sampled.buffers[window]
        view = buffer.view(tensors) if buffer is not None else None
        if view is not None:  # one gather over the buffer, the same elements
            return [_words(torch.take(view, self._buffer_indices[n][window]))]
        picked: list[list[Tensor]] = [[] for _ in sampled.kinds]
        for unit, tensor in zip(units, tensors):
            picked[sampled.kind_of[unit]].append(torch.take(_gatherable(tensor), self._unit_indices[n][unit]))
        return [_words(p[0] if len(p) == 1 else torch.cat(p)) for p in picked if p]

    def contributions(self, local: Sequence[Tensor], device: torch.device, step: int = 0) -> Tensor:
        """This rank's float64 contribution to the check slots, on ``device``, for the call made
        after ``step`` distclip reductions over the group (which selects the units sampled)."""
        constants = self._constants(device)
        if not self.sets:
            return constants["base"]
        if not self._unit_indices:
            self._make_indices()
        hashes = []
        for n in range(len(self.sets)):
            words = [w if w.device == device else w.to(device) for w in self._sampled_words(n, local, step)]
            bits = words[0] if len(words) == 1 else torch.cat(words)
            # Every term is below 2**30, the sum an exact integer in float64.
            hashes.append(torch.dot(torch.remainder(bits, PRIME), constants["multipliers"][: bits.numel()]))
        x = torch.stack(hashes).remainder_(PRIME)
        return torch.addmv(constants["base"], constants["weigh"], torch.cat([x, torch.square(x)]))


def copies_differ(check_sums: Tensor) -> Tensor:
    """0-dim bool: some copy set's members disagreed (the reduced check slots are not all 0)."""
    return (check_sums != 0).any()
