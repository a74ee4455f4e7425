"""The one reduction: every rank's partials, flags, checks and metrics in a single SUM all-reduce.

The vector sent by each rank (float64, on the backend's device) is::

    [ total (1, or group size for inf/-inf) | total's NaN flag | total's has-elements flag
      | group partials (G, finite p only) | groups' has-elements flags (G, p < 0 only)
      | problem flags (len(LOCAL_PROBLEMS)) | relayout flag | layout checks (layout.CHECKS)
      | copy check (copycheck.SIZE) | extra (e: the loss, the metrics) ]

Everything is reduced with SUM, for every norm type, because the checks need sums (see
:mod:`distclip.copycheck`, :mod:`distclip.layout`).  For finite p the values are the p-th powers
(or nonzero counts), which add.  For the total under inf/-inf each rank writes its max/min of
``|x|`` into its own entry of a block of group-size entries and zeros elsewhere: a sum of one
value and zeros is that value exactly, so after the reduction every rank holds every rank's
partial and takes the max/min locally, in the same order, with the same bits (8 bytes per rank:
128 KiB at 16,384 ranks).  Per-group norms under inf/-inf would need that block per group, so
they take a second all-reduce instead, with MAX (MIN), of the groups' values and flags: the one
case of two collectives, documented.  The total's NaN is replaced by 0 before sending and
restored from its flag after (a NaN explains differing copies, see below); a group's NaN
propagates through the sum by itself.  ``k = 1 + G`` norms come back.

Problems.  A rank that found a problem in its own input (or raised while planning) sets its
flag; every rank learns of it from the sum.  On the CPU the flags are read at once and every
rank raises together; on an accelerator reading them would cost a device sync, so they are kept
for the next call over the group (:mod:`distclip.deferred`) and the step's norms are NaN with
``invalid`` set, which leaves the gradients untouched.  An exception raised while planning is
re-raised on every rank with the type and text of the lowest rank that raised it (a gather of
the exceptions, on this error path only).

Each process counts the reductions it takes part in, per process group
(:func:`reductions_over`): every rank of a group takes part in every reduction over it, so the
count is the same on all of them whatever else each rank did, and the copy check reads it to
choose, without communicating, which copies all members sample (:mod:`distclip.copycheck`).
Without a process group nothing is sent, so nothing is encoded either (``_reduce_alone``).
"""

from __future__ import annotations

import functools
import weakref
from dataclasses import dataclass, field
from typing import NoReturn

import torch
import torch.distributed as dist
from torch import Tensor

from distclip import copycheck, layout
from distclip.copycheck import copies_differ
from distclip.deferred import NextCall, read_now
from distclip.exchange import all_gather_objects
from distclip.partials import PNorm
from distclip.problems import Problem
from distclip.topology import Topology

# Problems a rank finds in its own input; COPIES_DIFFER and LAYOUTS_DIFFER are found by the
# reduction itself.
FOUND_BY_REDUCTION = (Problem.COPIES_DIFFER, Problem.LAYOUTS_DIFFER)
LOCAL_PROBLEMS = [p for p in Problem if p not in FOUND_BY_REDUCTION]

# Per process group, the distclip reductions over it so far, and what the latest one left for
# the next call; weak, so that a destroyed group takes them along.
_REDUCTIONS: weakref.WeakKeyDictionary[dist.ProcessGroup, int] = weakref.WeakKeyDictionary()
_PENDING: weakref.WeakKeyDictionary[dist.ProcessGroup, "_Pending"] = weakref.WeakKeyDictionary()


def reductions_over(process_group: dist.ProcessGroup | None) -> int:
    """How many distclip reductions this process has made over ``process_group``: the same on
    every rank of it (0 without one)."""
    return 0 if process_group is None else _REDUCTIONS.get(process_group, 0)


@dataclass
class Contribution:
    """One rank's part of the reduction, laid out as every rank lays it out.

    ``partials``: ``[total, group 0, ..., group G-1]`` (float64, on the reduction device, the
    identity where this rank owns nothing); ``present``: per entry, whether this rank owns an
    element of it; ``problems``: what this rank found, with details; ``raised``: the exception
    this rank raised while planning (then ``Problem.RAISED`` is among the problems);
    ``extra``: summed as it is.
    """

    partials: Tensor
    present: tuple[bool, ...]
    problems: dict[Problem, str]
    copy_check: Tensor
    checks: Tensor
    extra: Tensor | None = None
    relayout: bool = False
    raised: BaseException | None = None


@dataclass
class Reduced:
    """The outcome of the reduction, identical on every rank of the group.

    ``norms``: the k global norms (float64), NaN when ``invalid``; ``invalid``: a 0-dim bool
    tensor, True when a rank reported a problem or the checks failed (the gradients must then be
    left as they are); ``problems``: the problems, read on the host when that costs no device
    sync (None when left for the next call); ``relayout``: 0-dim, nonzero when a rank has names
    the layout lacks.
    """

    norms: Tensor
    invalid: Tensor
    problems: list[Problem] | None
    extra: Tensor | None = None
    relayout: Tensor | None = None


@dataclass
class _Pending:
    """What the latest reduction over a group left for the next call: its flags, and the
    exception this rank raised in it."""

    flags: NextCall = field(default_factory=NextCall)
    local: dict[Problem, str] = field(default_factory=dict)
    raised: BaseException | None = None


def all_reduce_contributions(contribution: Contribution, pnorm: PNorm, topology: Topology) -> Reduced:
    """Combine every rank's contribution with one collective (two for per-group inf norms)."""
    if not topology.communicates:
        return _reduce_alone(contribution, pnorm)
    c = contribution
    device = c.partials.device
    total, groups = c.partials[:1], c.partials[1:]
    spread = pnorm.reduce_op != "sum"
    nan = total.isnan()
    total = torch.where(nan, torch.zeros_like(total), total)
    if spread:  # this rank's entry of the (ranks,) block; the others stay exactly 0
        block = torch.zeros(len(topology.group_ranks), dtype=torch.float64, device=device)
        block[topology.group_ranks.index(topology.rank)] = total[0]
        total = block
    group_present = [float(p) for p in c.present[1:]] if pnorm.p < 0 and not spread else []
    flags = [float(c.present[0])] + group_present + [float(p in c.problems) for p in LOCAL_PROBLEMS] + [float(c.relayout)]
    parts = {
        "total": total,
        "nan": nan.to(torch.float64),
        "groups": groups[:0] if spread else groups,
        "flags": _constant(tuple(flags), torch.float64, device),
        "checks": c.checks.to(device),
        "copy_check": c.copy_check.to(device),
        "extra": c.extra.to(device, torch.float64) if c.extra is not None else total[:0],
    }
    vector = torch.cat(list(parts.values()))
    _REDUCTIONS[topology.process_group] = reductions_over(topology.process_group) + 1
    dist.all_reduce(vector, op=dist.ReduceOp.SUM, group=topology.process_group)
    summed = dict(zip(parts, vector.split([part.numel() for part in parts.values()])))
    present, group_present, problem_flags, relayout = summed["flags"].split(
        [1, len(group_present), len(LOCAL_PROBLEMS), 1]
    )

    total = summed["total"]
    if spread:  # entry r is exactly what rank r wrote (its partial, or the identity)
        total = pnorm.combine(total).reshape(1)
        groups = _extreme_groups(groups, c.present[1:], pnorm, topology)
    else:
        groups = summed["groups"]
    finished = pnorm.finish(torch.cat([total, groups]))
    # The norm of no element at all is 0, as torch returns for no gradients (set after finishing:
    # for p < 0 the empty sum 0 would finish as inf).
    finished[:1] = torch.where(present != 0, finished[:1], torch.zeros_like(finished[:1]))
    if group_present.numel():
        finished[1:] = torch.where(group_present != 0, finished[1:], torch.zeros_like(finished[1:]))
    # Judged on the norm, not the sum: for p < 0 an infinite sum is a zero norm.
    nan = summed["nan"] != 0
    nonfinite = nan | finished[:1].isinf()
    # A non-finite norm explains differing copies (a NaN on one replica) and has its own policy.
    differ = copies_differ(summed["copy_check"]) & ~nonfinite.any()
    layouts_differ = layout.disagree(summed["checks"]).any()
    invalid = (problem_flags != 0).any() | differ | layouts_differ
    finished = torch.cat([torch.where(nan, torch.full_like(finished[:1], float("nan")), finished[:1]), finished[1:]])
    norms = torch.where(invalid, torch.full_like(finished, float("nan")), finished)

    problems = None
    pending = _PENDING.setdefault(topology.process_group, _Pending())
    pending.local, pending.raised = c.problems, c.raised
    if read_now(device):
        problems = _problems_read_on_host(problem_flags, differ, layouts_differ)
    else:  # read at the next call: reading now would make this step wait for the device
        pending.flags.put(torch.cat([problem_flags, differ.reshape(1).double(), layouts_differ.reshape(1).double()]))
    extra = summed["extra"] if c.extra is not None else None
    return Reduced(norms, invalid, problems, extra, relayout[0])


def failed_contribution(
    error: BaseException, k: int, extra_size: int, checks: Tensor, pnorm: PNorm, device: torch.device
) -> Contribution:
    """The contribution of a rank that raised ``error`` while planning: nothing counted, the
    RAISED flag set, laid out as the others lay theirs out (``k`` norms, ``extra_size`` extra
    entries), so that the all-reduce still happens and every rank raises ``error``."""
    return Contribution(
        partials=torch.full((k,), pnorm.identity, dtype=torch.float64, device=device),
        present=(False,) * k,
        problems={Problem.RAISED: f"{type(error).__name__}: {error}"},
        copy_check=torch.zeros(copycheck.SIZE, dtype=torch.float64, device=device),
        checks=checks,
        extra=torch.zeros(extra_size, dtype=torch.float64, device=device) if extra_size else None,
        raised=error,
    )


def reduce_and_raise(contribution: Contribution, pnorm: PNorm, topology: Topology) -> Reduced:
    """:func:`all_reduce_contributions`, then :func:`raise_problems`."""
    reduced = all_reduce_contributions(contribution, pnorm, topology)
    raise_problems(reduced, contribution, topology)
    return reduced


def _extreme_groups(values: Tensor, present: tuple[bool, ...], pnorm: PNorm, topology: Topology) -> Tensor:
    """Per-group max (min) of ``|x|`` over the group: a second all-reduce, with MAX (MIN), of the
    values, their NaN flags and has-elements flags (negated under MIN)."""
    if not values.numel():
        return values
    nan = values.isnan()
    sign = 1.0 if pnorm.reduce_op == "max" else -1.0
    values = torch.where(nan, torch.full_like(values, pnorm.identity), values)
    present_flags = _constant(tuple(float(p) for p in present), torch.float64, values.device)
    vector = torch.cat([values, sign * nan.to(torch.float64), sign * present_flags])
    op = dist.ReduceOp.MAX if pnorm.reduce_op == "max" else dist.ReduceOp.MIN
    dist.all_reduce(vector, op=op, group=topology.process_group)
    values, nan_flags, present_flags = vector.split(values.numel())
    values = torch.where(sign * present_flags > 0, values, torch.zeros_like(values))
    return torch.where(sign * nan_flags > 0, torch.full_like(values, float("nan")), values)


def _reduce_alone(contribution: Contribution, pnorm: PNorm) -> Reduced:
    """The reduction without a process group: the encoded path's outcome without the encoding,
    which exists only to send.  A NaN partial gives a NaN norm by itself; no copy can differ
    with no other rank; the problems are this rank's, known on the host."""
    c = contribution
    values = c.partials
    norms = pnorm.finish(values)  # with problems these are never seen: raise_problems raises
    if not all(c.present):  # the norm of no element at all: 0, as in the encoded path
        present = _constant(c.present, torch.bool, values.device)
        norms = torch.where(present, norms, torch.zeros_like(norms))
    invalid = _constant(bool(c.problems), torch.bool, values.device)
    problems = [p for p in LOCAL_PROBLEMS if p in c.problems]
    extra = None if c.extra is None else c.extra.to(values.device, torch.float64)
    relayout = _constant(float(c.relayout), torch.float64, values.device)
    return Reduced(norms, invalid, problems, extra, relayout)


@functools.lru_cache(maxsize=256)
def _constant(values: tuple | bool | float, dtype: torch.dtype, device: torch.device) -> Tensor:
    """``values`` as a tensor on ``device``, made once and only ever read.  Made from host values
    on every step it would be a host-to-device copy, which PyTorch makes wait for the device."""
    return torch.tensor(values, dtype=dtype, device=device)


def _problems_read_on_host(problem_flags: Tensor, differ: Tensor, layouts_differ: Tensor) -> list[Problem]:
    """The problems flagged, read on the host: only for a CPU reduction, where it is free (on an
    accelerator it would make every step wait for the device)."""
    flags = problem_flags.tolist() + [float(differ), float(layouts_differ)]
    return [p for p, flag in zip(LOCAL_PROBLEMS + list(FOUND_BY_REDUCTION), flags) if flag != 0]


def raise_problems(reduced: Reduced, contribution: Contribution, topology: Topology) -> None:
    """Raise the reduction's problems on every rank that knows of them (see the module
    docstring): at once where they were read on the host, or on this rank alone for its own
    problems when the others learn at the next call."""
    problems = reduced.problems if reduced.problems is not None else list(contribution.problems)
    if not problems:
        return
    _raise(problems, contribution.problems, contribution.raised, topology, everyone_knows=reduced.problems is not None)


def raise_pending(topology: Topology) -> None:
    """At the start of a call: raise, on every rank, the problems the latest reduction over
    ``topology``'s group left for it (an accelerator's deferred flags)."""
    pending = _PENDING.get(topology.process_group) if topology.communicates else None
    flags = None if pending is None else pending.flags.take()
    if not flags or not any(flags):
        return
    problems = [p for p, flag in zip(LOCAL_PROBLEMS + list(FOUND_BY_REDUCTION), flags) if flag != 0]
    _raise(problems, pending.local, pending.raised, topology, everyone_knows=True, deferred=True)


def _raise(
    problems: list[Problem],
    local: dict[Problem, str],
    raised: BaseException | None,
    topology: Topology,
    everyone_knows: bool,
    deferred: bool = False,
) -> NoReturn:
    """One error on every rank: the exception the lowest rank raised while planning, or a
    ValueError naming every problem (with this rank's details where it found one itself).  The
    exceptions are exchanged only where every rank knows one was raised (a gather, on this error
    path only); otherwise this rank raises with its own."""
    when = " (found in the previous distclip reduction over this group)" if deferred else ""
    reports = [(topology.rank, {p.name: d for p, d in local.items()}, _portable(raised))]
    if Problem.RAISED in problems and everyone_knows and topology.communicates:
        reports = list(zip(topology.group_ranks, *zip(*all_gather_objects(reports[0][1:], topology))))
    if Problem.RAISED in problems:
        rank, error = next(((r, e) for r, _, e in reports if e is not None), (topology.rank, raised))
        if raised is not None and rank == topology.rank:
            error = raised  # this rank's own, with its traceback
        error.add_note(f"distclip: raised on rank {rank} while planning the clip{when}; every rank of the group raises it")
        raise error
    lines = []
    for problem in problems:
        if problem in FOUND_BY_REDUCTION:
            lines.append(f"{problem.value} (found by the checks in the reduction)")
            continue
        found = [(r, details[problem.name]) for r, details, _ in reports if problem.name in details]
        detail = f"rank {found[0][0]}: {found[0][1]}" if found else "found by another rank of the group"
        lines.append(f"{problem.value} ({detail})")
    raise ValueError("distclip: " + "; ".join(lines) + when + ". No gradient was modified.")


def _portable(raised: BaseException | None) -> BaseException | None:
    """``raised`` as it can be sent to other processes (a RuntimeError naming its type when the
    exception itself does not pickle)."""
    if raised is None:
        return None
    import pickle

    try:
        pickle.loads(pickle.dumps(raised))
        return raised
    except Exception:
        return RuntimeError(f"{type(raised).__module__}.{type(raised).__qualname__}: {raised}")
