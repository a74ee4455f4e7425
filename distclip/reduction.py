"""The one reduction: every rank's partials, NaN signals and problem flags in a single all-reduce.

The vector sent by each rank (float64, on the backend's device) is::

    [ values (k) | nan flags (k) | has-elements flags (k) | problem flags (len(Problem)) ]

and it is reduced with one op: SUM for finite p (p-th powers, nonzero counts), MAX for inf,
MIN for -inf.  Flags are 0/1 (stored as 0/-1 under MIN) so the same op also ORs them.  A NaN is
replaced by the op's identity before sending and restored from its flag after, because a
MAX/MIN all-reduce may drop NaN (comparisons with NaN are false); inf survives every op.
``k`` is 1 for the functional API and 1 + number of groups when per-group norms ride along.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from distclip.ownership import Problem
from distclip.partials import PNorm
from distclip.topology import Topology

_PROBLEMS = list(Problem)
_OPS = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}


@dataclass
class Reduced:
    """The outcome of the reduction, identical on every rank of the group.

    ``norms``: the k global norms (float64).  ``problems``: problems some rank reported, read on
    the host only when that costs no device sync (``None`` when left unread).  ``invalid``: a
    0-dim bool tensor, True when any rank reported a problem (then ``norms`` are NaN).
    """

    norms: Tensor
    invalid: Tensor
    problems: list[Problem] | None


def all_reduce_partials(
    partials: Tensor,
    has_elements: list[bool],
    local_problems: dict[Problem, str],
    pnorm: PNorm,
    topology: Topology,
) -> Reduced:
    """Combine the k partials of every rank of ``topology``'s group with one collective.

    ``partials`` is a float64 vector of k entries on the reduction device.  Without a
    process group nothing is communicated and the same decoding applies.
    """
    k = partials.numel()
    device = partials.device
    nan = partials.isnan()
    flag_sign = -1.0 if pnorm.reduce_op == "min" else 1.0
    flags = [flag_sign * float(f) for f in has_elements]
    flags += [flag_sign * float(problem in local_problems) for problem in _PROBLEMS]
    vector = torch.cat(
        [
            torch.where(nan, torch.full_like(partials, pnorm.identity), partials),
            nan.to(torch.float64) * flag_sign,
            torch.tensor(flags, dtype=torch.float64, device=device),
        ]
    )
    if topology.communicates:
        dist.all_reduce(vector, op=_OPS[pnorm.reduce_op], group=topology.process_group)

    values, nan_flags, presence, problem_flags = vector.split([k, k, k, len(_PROBLEMS)])
    # -inf norm of no element at all: 0, as torch returns for no gradients.
    values = torch.where(presence != 0, values, torch.zeros_like(values))
    invalid = (problem_flags != 0).any()
    norms = torch.where((nan_flags != 0) | invalid, torch.full_like(values, float("nan")), pnorm.finish(values))

    problems = None
    if device.type == "cpu":  # reading flags on the host is free here
        problems = [p for p, flag in zip(_PROBLEMS, problem_flags.tolist()) if flag != 0]
    return Reduced(norms, invalid, problems)


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
        detail = local_problems.get(problem, "reported by another rank of the group")
        lines.append(f"{problem.value} ({detail})")
    raise ValueError("distclip: " + "; ".join(lines) + ". No gradient was modified.")
