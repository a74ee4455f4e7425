"""The copy contract, checked inside the one collective.

distclip assumes that certain ranks hold bitwise copies of certain gradients (``replica_group``,
DTensor ``Replicate`` mesh dims, FSDP1 NO_SHARD / hybrid replicas) and splits their norm work.
If the assumption is wrong (pipeline stages called with the default ``replica_group``, gradients
not yet synchronized), the norm is silently wrong.  So every rank adds a fingerprint of what it
believes are copies to the vector of the existing all-reduce, and a wrong assumption is raised on
every rank together.

The rule.  For each copy set ``C`` (the sorted ranks holding copies of a list of tensors, in
order), each member computes features ``x`` of its list: the number of tensors, a hash of their
shapes, dtypes and counted ranges, and a hash of the bit patterns of a few deterministic
elements.  Member ``i`` adds ``w_i * x`` and ``w_i * x**2`` to slot ``hash(C) mod SLOTS``, with
``w = k - 1`` for the lowest rank of ``C`` and ``w = -1`` for the other ``k - 1``.  The SUM over
the group of a slot is then::

    sum over sets C in the slot of  sum_{i>0} (x_0 - x_i)   and   sum_{i>0} (x_0**2 - x_i**2)

which is exactly 0 for every set whose members agree, whatever else shares the slot: **no false
alarm**, as every value is an integer below 2**53 and float64 adds them exactly.  A set whose
members disagree gives a nonzero pair (with ``e_i = x_i - x_0``, both sums zero imply
``sum e_i**2 = 0``), so a disagreement is always found unless two disagreeing sets cancel in the
same slot.  Counts are exact; shapes/dtypes and values are 15-bit hashes, so a difference in them
escapes only when the hash collides (about 1 in 32,749 per hashed feature; shapes and values
are hashed separately).  A member that holds nothing of the set contributes nothing, which reads
as ``x = 0`` and is found too (a list always has a count >= 1).
"""

from __future__ import annotations

import zlib
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
# Elements sampled for the value hash: from the first SAMPLED_TENSORS tensors of each set, at
# up to 4 spread positions each.  Bounded, so the cost does not grow with the model.
SAMPLED_TENSORS = 4

_INT_VIEW = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _stable_hash(value: object) -> int:
    """A hash that is the same in every process (Python's ``hash`` of a str is salted)."""
    return zlib.crc32(repr(value).encode())


def _positions(start: int, stop: int) -> list[int]:
    n = stop - start
    return sorted({start, start + n // 3, start + 2 * n // 3, stop - 1})


class CopyCheck:
    """The fingerprints of this rank's copy sets, planned once, contributed every step.

    ``copy_buckets`` maps each copy set of more than one rank to the ordered segments this rank
    holds of it (see :func:`distclip.ownership.plan_ownership`).  Per step the work is one
    gather per sampled tensor (at most ``SAMPLED_TENSORS`` per set) and a fixed handful of
    tensor ops for all sets together; no host sync.
    """

    def __init__(
        self,
        copy_buckets: Mapping[tuple[int, ...], Sequence[Segment]],
        local: Sequence[Tensor],
        rank: int,
    ) -> None:
        base = torch.zeros(SIZE, dtype=torch.float64)
        self.sampled: list[tuple[int, list[int]]] = []  # (tensor index, flat positions)
        set_of_sample: list[int] = []  # per sampled element: which set it hashes into
        multipliers: list[int] = []
        offsets: list[int] = []  # per set: where its value-hash feature goes
        weights: list[float] = []
        for s, (members, segments) in enumerate(copy_buckets.items()):
            slot = _stable_hash(members) % SLOTS
            weight = float(len(members) - 1 if rank == members[0] else -1)
            layout = [(tuple(local[i].shape), str(local[i].dtype), start, stop) for i, start, stop in segments]
            for feature, x in enumerate((len(segments), _stable_hash(layout) % PRIME)):
                offset = (slot * FEATURES + feature) * 2
                base[offset] += weight * x
                base[offset + 1] += weight * x * x
            offsets.append((slot * FEATURES + 2) * 2)
            weights.append(weight)
            sampled = [(i, _positions(start, stop)) for i, start, stop in segments if stop > start]
            for j, (i, positions) in enumerate(sampled[:SAMPLED_TENSORS]):
                self.sampled.append((i, positions))
                set_of_sample.extend([s] * len(positions))
                # Position-dependent multipliers, so that permuted values hash differently.
                multipliers.extend((2 * j + 3) * (n + 1) for n in range(len(positions)))
        self.num_sets = len(copy_buckets)
        self._host = {
            "base": base,
            "set_of_sample": torch.tensor(set_of_sample, dtype=torch.int64),
            "multipliers": torch.tensor(multipliers, dtype=torch.int64),
            "offsets": torch.tensor(offsets + [o + 1 for o in offsets], dtype=torch.int64),
            "weights": torch.tensor(weights, dtype=torch.float64),
        }
        self._on_device: dict[torch.device, dict[str, Tensor]] = {}
        self._positions: dict[tuple[int, torch.device], Tensor] = {}  # (sample, device) -> indices

    def _constants(self, device: torch.device) -> dict[str, Tensor]:
        if device not in self._on_device:
            self._on_device[device] = {name: t.to(device) for name, t in self._host.items()}
        return self._on_device[device]

    def _sample_bits(self, local: Sequence[Tensor], device: torch.device) -> Tensor:
        """The sampled elements' bit patterns as int64 on ``device`` (one gather per tensor)."""
        bits = []
        for n, (i, positions) in enumerate(self.sampled):
            tensor = local[i]
            # Keyed by the sample, not the tensor: one flat tensor (FSDP1) holds several segments.
            index = self._positions.get((n, tensor.device))
            if index is None:
                index = self._positions[(n, tensor.device)] = torch.tensor(positions, device=tensor.device)
            picked = tensor.reshape(-1).index_select(0, index)
            bits.append(picked.view(_INT_VIEW[tensor.element_size()]).to(device=device, dtype=torch.int64))
        return torch.cat(bits)

    def contributions(self, local: Sequence[Tensor], device: torch.device) -> Tensor:
        """This rank's float64 contribution to the check slots, on ``device``."""
        constants = self._constants(device)
        if not self.sampled:
            return constants["base"]
        bits = self._sample_bits(local, device)
        bits = (bits ^ (bits >> 32)) & 0xFFFFFFFF  # 64-bit patterns folded to 32 bits
        terms = (bits % PRIME) * constants["multipliers"]
        per_set = torch.zeros(self.num_sets, dtype=torch.int64, device=device)
        x = (per_set.index_add_(0, constants["set_of_sample"], terms) % PRIME).to(torch.float64)
        weighted = constants["weights"] * x
        return constants["base"].index_add(0, constants["offsets"], torch.cat([weighted, weighted * x]))


def copies_differ(check_sums: Tensor) -> Tensor:
    """0-dim bool: some copy set's members disagreed (the reduced check slots are not all 0)."""
    return (check_sums != 0).any()
