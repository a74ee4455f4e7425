"""The one reduction: every rank's partials, NaN signals, problem flags and the copy check in a
single SUM all-reduce.

The vector sent by each rank (float64, on the backend's device) is::

    [ values (k, or k * group size) | nan flags (k) | has-elements flags (k)
      | problem flags (len(LOCAL_PROBLEMS)) | copy check (copycheck.SIZE) | extra (e) ]

Everything is reduced with SUM, for every norm type, because the copy check needs a sum (see
:mod:`distclip.copycheck`).  For finite p the values are the p-th powers (or nonzero counts),
which add.  For inf/-inf each rank writes its max/min of ``|x|`` into its own row of a
``(group size, k)`` block and zeros elsewhere: a sum of one value and zeros is that value
exactly, so after the reduction every rank holds every rank's partial and takes the max/min
locally, in the same order, with the same bits.  (That block grows with the group: 8 bytes per
rank and norm, 128 KiB at 16,384 ranks, for the inf norms only.)  A NaN is replaced by 0 before
sending and restored from its flag after; flags are 0/1 and their sums count.
``k`` is 1 for the functional API and 1 + number of groups when per-group norms ride along.
Without a process group nothing is sent, so nothing is encoded either (``_reduce_alone``).
``extra`` is any other float64 vector the caller wants summed over the group in the same
collective (the clipper's loss sum and loss count); a NaN in it stays in its own entry.

Each process counts the reductions it takes part in, per process group
(:func:`reductions_over`): every rank of a group takes part in every reduction over it, so the
count is the same on all of them whatever else each rank did, and the copy check reads it to
choose, without communicating, which copies all members sample (:mod:`distclip.copycheck`).
"""

from __future__ import annotations

import functools
import weakref
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from distclip.copycheck import copies_differ
from distclip.ownership import Problem
from distclip.partials import PNorm
from distclip.topology import Topology

# Problems a rank finds in its own gradients; COPIES_DIFFER is found by the reduction itself.
LOCAL_PROBLEMS = [p for p in Problem if p is not Problem.COPIES_DIFFER]

# Per process group, the distclip reductions over it so far; weak, so that a destroyed group
# takes its count along (a new group may reuse its id, never its count).
_REDUCTIONS: weakref.WeakKeyDictionary[dist.ProcessGroup, int] = weakref.WeakKeyDictionary()


def reductions_over(process_group: dist.ProcessGroup | None) -> int:
    """How many distclip reductions this process has made over ``process_group``: the same on
    every rank of it (0 without one)."""
    return 0 if process_group is None else _REDUCTIONS.get(process_group, 0)


@dataclass
class Reduced:
    """The outcome of the reduction, identical on every rank of the group.

    ``norms``: the k global norms (float64).  ``problems``: problems some rank reported or the
    copy check found, read on the host only when that costs no device sync (``None`` when left
    unread).  ``invalid``: a 0-dim bool tensor, True when there is a problem (then ``norms``
    are NaN).
    """

    norms: Tensor
    invalid: Tensor
    problems: list[Problem] | None
    extra: Tensor | None = None


def all_reduce_partials(
    partials: Tensor,
    has_elements: list[bool],
    local_problems: dict[Problem, str],
    pnorm: PNorm,
    topology: Topology,
    copy_check: Tensor,
    extra: Tensor | None = None,
) -> Reduced:
    """Combine the k partials of every rank of ``topology``'s group with one collective.

    ``partials`` is a float64 vector of k entries on the reduction device, ``copy_check`` this
    rank's contribution to the copy check (see :mod:`distclip.copycheck`), ``extra`` a float64
    vector summed as it is (same length on every rank).  Without a process group nothing is
    communicated and nothing encoded: the outcome is the same.
    """
    if not topology.communicates:
        return _reduce_alone(partials, has_elements, local_problems, pnorm, extra)
    k = partials.numel()
    device = partials.device
    nan = partials.isnan()
    values = torch.where(nan, torch.zeros_like(partials), partials)
    ranks = len(topology.group_ranks)
    spread = pnorm.reduce_op != "sum"
    if spread:  # this rank's row of the (ranks, k) block; the others stay exactly 0
        block = torch.zeros(ranks, k, dtype=torch.float64, device=device)
        block[topology.group_ranks.index(topology.rank)] = values
        values = block.reshape(-1)
    flags = [float(f) for f in has_elements] + [float(p in local_problems) for p in LOCAL_PROBLEMS]
    parts = [values, nan.to(torch.float64), _constant(tuple(flags), torch.float64, device), copy_check.to(device)]
    if extra is not None:  # the functional API sends none: its vector stays as it was
        parts.append(extra.to(device, torch.float64))
    vector = torch.cat(parts)
    _REDUCTIONS[topology.process_group] = reductions_over(topology.process_group) + 1
    dist.all_reduce(vector, op=dist.ReduceOp.SUM, group=topology.process_group)

    sizes = [values.numel(), k, k, len(LOCAL_PROBLEMS), copy_check.numel()] + [part.numel() for part in parts[4:]]
    values, nan_flags, presence, problem_flags, check, *extra_sum = vector.split(sizes)
    if spread:  # row r is exactly what rank r wrote (its partial, or the identity)
        values = pnorm.combine(values.reshape(ranks, k), dim=0)
    # -inf norm of no element at all: 0, as torch returns for no gradients.
    values = torch.where(presence != 0, values, torch.zeros_like(values))
    # Judged on the norms, not the sums: for p < 0 an infinite sum is a zero norm.
    finished = pnorm.finish(values)
    nonfinite = (nan_flags != 0) | finished.isinf()
    # A non-finite norm explains differing copies (a NaN on one replica) and has its own policy.
    differ = copies_differ(check) & ~nonfinite.any()
    invalid = (problem_flags != 0).any() | differ
    norms = torch.where((nan_flags != 0) | invalid, torch.full_like(values, float("nan")), finished)

    problems = _problems_read_on_host(problem_flags, differ) if device.type == "cpu" else None
    return Reduced(norms, invalid, problems, extra_sum[0] if extra_sum else None)


def _reduce_alone(
    partials: Tensor,
    has_elements: list[bool],
    local_problems: dict[Problem, str],
    pnorm: PNorm,
    extra: Tensor | None,
) -> Reduced:
    """The reduction without a process group: the encoded path's outcome without the encoding,
    which exists only to send.  A NaN partial gives a NaN norm by itself; no copy
    can differ with no other rank; the problems are this rank's, known on the host."""
    values = partials
    if not all(has_elements):  # -inf norm of no element at all: 0, as in the encoded path
        present = _constant(tuple(has_elements), torch.bool, partials.device)
        values = torch.where(present, partials, torch.zeros_like(partials))
    norms = pnorm.finish(values)  # with problems these are never seen: raise_problems raises
    invalid = _constant(bool(local_problems), torch.bool, partials.device)
    problems = [p for p in LOCAL_PROBLEMS if p in local_problems]
    return Reduced(norms, invalid, problems, None if extra is None else extra.to(partials.device, torch.float64))


@functools.lru_cache(maxsize=256)
def _constant(values: tuple | bool, dtype: torch.dtype, device: torch.device) -> Tensor:
    """``values`` as a tensor on ``device``, made once and only ever read.  Made from host values
    on every step it would be a host-to-device copy, which PyTorch makes wait for the device."""
    return torch.tensor(values, dtype=dtype, device=device)


def _problems_read_on_host(problem_flags: Tensor, differ: Tensor) -> list[Problem]:
    """The problems flagged, read on the host: only for a CPU reduction, where it is free (on an
    accelerator it would make every step wait for the device)."""
    problems = [p for p, flag in zip(LOCAL_PROBLEMS, problem_flags.tolist()) if flag != 0]
    if bool(differ):
        problems.append(Problem.COPIES_DIFFER)
    return problems


def raise_problems(reduced: Reduced, local_problems: dict[Problem, str]) -> None:
    """Raise the problems as one ValueError, on every rank that knows of them.

    A rank that found a problem in its own gradients always knows; the others know when the
    vector was read on the host (CPU reduction).  On an accelerator the others get NaN norms and
    untouched gradients instead, since reading the flags would cost a device sync.
    """
    problems = reduced.problems if reduced.problems is not None else list(local_problems)
    if not problems:
        return
    lines = []
    for problem in problems:
        if problem is Problem.COPIES_DIFFER:
            lines.append(f"{problem.value} (found by the copy check in the reduction)")
            continue
        detail = local_problems.get(problem, "reported by another rank of the group")
        lines.append(f"{problem.value} ({detail})")
    raise ValueError("distclip: " + "; ".join(lines) + ". No gradient was modified.")
