"""Named slots: per-group norms and metrics laid out by name, the same on every rank.

Every rank's reduction vector must have the same layout, but ranks may hold different groups
(pipeline stages report their own layers) and some ranks pass metrics while others pass none.
So the names are agreed, never taken by position.

The rule.  At a clipper's first step every rank sends the names it has (its groups; its metrics
with their kinds) in one gather of Python objects (:mod:`distclip.exchange`); the layout is every
name in the order the ranks list them, rank by rank.  Every rank lays out its vector by it,
writing the identity where it has nothing.  When a rank later has a name the layout lacks (a new
adapter's group, a metric passed for the first time), it cannot place it: that step it raises a
flag in the all-reduce, and the name's value is missing from the step's result (a group norm:
absent; a metric: absent, and NaN on later steps it is not passed); at the next step every rank,
having read the flag without waiting for the device (:mod:`distclip.deferred`), agrees again,
keeping the metric names already agreed.  So a name new on a step is reported from the next step
on, and the agreement's gather runs only on the first step and on steps after a change.

Every all-reduce carries a fingerprint of the layout each rank used and of the metric names
each rank passed; ranks that disagree (a metric passed under other names or kinds on another
rank) make every rank raise a ValueError instead of combining other names' values.
"""

from __future__ import annotations

import functools
import zlib
from dataclasses import dataclass, field
from typing import Sequence

import torch
from torch import Tensor

from distclip.exchange import all_gather_objects
from distclip.topology import Topology

# A prime below 2**15: hashes h < 2**15, so that count * sum(h**2) and sum(h)**2 stay below 2**62
# (int64) for up to 2**16 ranks, and every sum is exact in float64.
PRIME = 32749
CHECKS = 6  # (count, sum h, sum h**2) for the layout and for the metric names passed


def stable_hash(value: object) -> int:
    """A hash that is the same in every process (``hash`` of a str is salted), below PRIME."""
    return zlib.crc32(repr(value).encode()) % PRIME


@dataclass
class Layout:
    """The agreed names: ``groups`` (per-group norms) and ``metrics`` (``(name, kind)``)."""

    groups: list[str] = field(default_factory=list)
    metrics: list[tuple[str, str]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.group_slot = {name: i for i, name in enumerate(self.groups)}
        self.metric_names = {name for name, _ in self.metrics}
        self.fingerprint = stable_hash((self.groups, self.metrics))

    def lacks(self, groups: Sequence[str], metrics: Sequence[tuple[str, str]]) -> bool:
        """Whether a rank having ``groups`` and ``metrics`` has a name this layout lacks."""
        return any(name not in self.group_slot for name in groups) or any(
            (name, kind) not in self.metrics for name, kind in metrics
        )


def agree(groups: Sequence[str], metrics: Sequence[tuple[str, str]], topology: Topology) -> Layout:
    """The layout of every rank's names (a collective over ``topology``'s group: every rank calls
    it at the same step).  ValueError on every rank alike when a metric name has two kinds."""
    everyone = all_gather_objects((list(groups), list(metrics)), topology)
    names: dict[str, None] = {}
    kinds: dict[str, str] = {}
    for rank_groups, rank_metrics in everyone:
        names.update(dict.fromkeys(rank_groups))
        for name, kind in rank_metrics:
            if kinds.setdefault(name, kind) != kind:
                raise ValueError(f"distclip: metric {name!r} is a {kinds[name]} on one rank and a {kind} on another")
    return Layout(list(names), list(kinds.items()))


def checks(layout: Layout, metrics: Sequence[tuple[str, str]], device: torch.device) -> Tensor:
    """This rank's entries of the fingerprints: ``(1, h, h**2)`` of the layout it uses and of the
    metric names it passed (zeros when it passed none)."""
    return _check_entries(layout.fingerprint, stable_hash(sorted(metrics)) if metrics else None, device)


@functools.lru_cache(maxsize=256)
def _check_entries(h: int, m: int | None, device: torch.device) -> Tensor:
    # Made once per value: a tensor made from host values every step would be a host-to-device
    # copy, which PyTorch makes wait for the device.
    values = [1.0, h, h * h] + ([0.0, 0.0, 0.0] if m is None else [1.0, m, m * m])
    return torch.tensor(values, dtype=torch.float64, device=device)


def disagree(summed: Tensor) -> Tensor:
    """0-dim bools (layout, metric names) from the summed fingerprints: True where the ranks
    that contributed did not all contribute the same hash (``c * sum h**2 - (sum h)**2`` is the
    sum of their squared pairwise differences, exact in int64)."""
    parts = summed.to(torch.int64).reshape(2, 3)
    count, total, squares = parts.unbind(1)
    return (count * squares - total * total) != 0
