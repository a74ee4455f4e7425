"""The copy contract, checked inside the one collective.

distclip assumes that certain ranks hold bitwise copies of certain gradients (``replica_group``,
DTensor ``Replicate`` mesh dims, FSDP1 NO_SHARD / hybrid replicas) and splits their norm work.
If the assumption is wrong (pipeline stages called with the default ``replica_group``, gradients
not yet synchronized, a parameter DDP was told to ignore), the norm is silently wrong.  So every
rank adds a fingerprint of what it believes are copies to the vector of the existing all-reduce,
and a wrong assumption is raised on every rank together.

The rule.  For each copy set ``C`` (the sorted ranks holding copies of a list of tensors, in
order), each member computes features ``x`` of its list: the number of tensors, a hash of their
shapes, dtypes and counted ranges, and a hash of the bit patterns of sampled elements.  Member
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
(the elements' bit patterns as integers; 16-byte elements are two words), with multipliers
``m_e`` in ``[1, PRIME)`` that depend on the position in the sample: one word that differs
changes it unless its two patterns are congruent modulo PRIME.
"""

from __future__ import annotations

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

_INT_VIEW = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


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


def _gathered(tensor: Tensor, index: Tensor) -> Tensor:
    """``tensor``'s elements at flat logical positions ``index`` (1-byte dtypes as uint8: torch
    gathers no float8)."""
    return torch.take(tensor.view(torch.uint8) if tensor.element_size() == 1 else tensor, index)


def _words(values: Tensor) -> Tensor:
    """The bit patterns of a 1-D tensor's elements as int64 (a 16-byte element gives two)."""
    return values.view(_INT_VIEW[min(values.element_size(), 8)]).to(torch.int64)


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

    def sampled(self, step: int) -> list[int]:
        first = (step % self.windows) * self.window
        return [(first + i) % self.units for i in range(self.window)]


@dataclass(frozen=True)
class _SampledSet:
    """One copy set's units: the local tensor of each and the flat positions gathered from it."""

    tensors: list[int]
    positions: list[list[int]]
    rotation: _Rotation


class CopyCheck:
    """The fingerprints of this rank's copy sets, planned once, contributed every call.

    ``copy_buckets`` maps each copy set of more than one rank to the ordered segments this rank
    holds of it (see :func:`distclip.ownership.plan_ownership`).  Per call the work is one
    gather per sampled unit (at most ``UNITS_PER_STEP`` per set) and a fixed handful of tensor
    ops per set; no host sync, no tensor made from host values after the first call on a device.
    """

    def __init__(
        self,
        copy_buckets: Mapping[tuple[int, ...], Sequence[Segment]],
        local: Sequence[Tensor],
        rank: int,
    ) -> None:
        base = torch.zeros(SIZE, dtype=torch.float64)
        self.sets: list[_SampledSet] = []
        offsets: list[int] = []  # per sampled set: where its value-hash feature goes
        weights: list[float] = []
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
            rotation = _Rotation.of(len(sampled))
            words = sorted((len(p) * (2 if local[i].element_size() > 8 else 1) for i, p in sampled), reverse=True)
            longest = max(longest, sum(words[: rotation.window]))
            self.sets.append(_SampledSet([i for i, _ in sampled], [p for _, p in sampled], rotation))
            offsets.append((slot * FEATURES + 2) * 2)
            weights.append(weight)
        # Multipliers in [1, PRIME), position-dependent, so that permuted values hash differently.
        multipliers = torch.arange(longest, dtype=torch.int64) * 7919 % (PRIME - 1) + 1
        self._host = {
            "base": base,
            "multipliers": multipliers,
            "offsets": torch.tensor(offsets + [o + 1 for o in offsets], dtype=torch.int64),
            "weights": torch.tensor(weights, dtype=torch.float64),
        }
        self._on_device: dict[torch.device, dict[str, Tensor]] = {}
        self._indices: dict[torch.device, list[list[Tensor]]] = {}  # per set, per unit: its positions

    def _constants(self, device: torch.device) -> dict[str, Tensor]:
        if device not in self._on_device:
            self._on_device[device] = {name: t.to(device) for name, t in self._host.items()}
        return self._on_device[device]

    def _unit_indices(self, device: torch.device) -> list[list[Tensor]]:
        """Every unit's positions as index tensors on ``device``, made once with one copy."""
        if device not in self._indices:
            flat = [p for sampled in self.sets for p in sampled.positions]
            views = iter(torch.tensor([x for p in flat for x in p], device=device).split([len(p) for p in flat]))
            self._indices[device] = [[next(views) for _ in sampled.positions] for sampled in self.sets]
        return self._indices[device]

    def _value_hash(self, n: int, local: Sequence[Tensor], device: torch.device, step: int, multipliers: Tensor) -> Tensor:
        """Set ``n``'s value hash for the units sampled at ``step``: 0-dim int64 on ``device``."""
        sampled = self.sets[n]
        picked: dict[tuple[torch.device, torch.dtype], list[Tensor]] = {}
        for unit in sampled.rotation.sampled(step):
            tensor = local[sampled.tensors[unit]]
            index = self._unit_indices(tensor.device)[n][unit]
            picked.setdefault((tensor.device, tensor.dtype), []).append(_gathered(tensor, index))
        # One conversion per (device, dtype); members agree on the order, as on the layout.
        words = [_words(p[0] if len(p) == 1 else torch.cat(p)).to(device) for p in picked.values()]
        bits = words[0] if len(words) == 1 else torch.cat(words)
        return ((bits % PRIME) * multipliers[: bits.numel()]).sum() % PRIME

    def contributions(self, local: Sequence[Tensor], device: torch.device, step: int = 0) -> Tensor:
        """This rank's float64 contribution to the check slots, on ``device``, for the call made
        after ``step`` distclip reductions over the group (which selects the units sampled)."""
        constants = self._constants(device)
        if not self.sets:
            return constants["base"]
        hashes = [self._value_hash(n, local, device, step, constants["multipliers"]) for n in range(len(self.sets))]
        x = torch.stack(hashes).to(torch.float64)
        weighted = constants["weights"] * x
        return constants["base"].index_add(0, constants["offsets"], torch.cat([weighted, weighted * x]))


def copies_differ(check_sums: Tensor) -> Tensor:
    """0-dim bool: some copy set's members disagreed (the reduced check slots are not all 0)."""
    return (check_sums != 0).any()
