"""Where a non-finite gradient norm comes from: which parameters, on which ranks.

The norm's one all-reduce says *that* some element is NaN or infinite, not where.  Finding where
costs a second collective, so it is done only on the error path (``nonfinite="error"``, once the
norm is known to be non-finite, which every rank knows together) or on demand
(:meth:`distclip.GradClipper.nonfinite_report`).  Each rank tests its own local gradients (its
shards, its copies) and the names are gathered, so the report, and the error text built from
it, is identical on every rank: parameter names in the order the ranks report them, each with
the sorted global ranks whose gradients hold NaN/inf there.

Names follow :mod:`distclip.gradients`' one rule (qualified names without wrapper prefixes,
``parameters[i]`` for a list); FSDP1 flat gradients are located per original parameter
(:meth:`distclip.gradients.Parameters.named_pieces`).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from distclip.exchange import all_gather_objects
from distclip.topology import Topology

NonfiniteReport = dict[str, list[int]]


def locate(named: Sequence[tuple[str, Tensor]], topology: Topology) -> NonfiniteReport:
    """Parameter name -> sorted global ranks whose gradient of it holds NaN or inf.

    A collective over ``topology``'s group when it communicates: every rank must call it.
    """
    flags = [bool(~torch.isfinite(grad).all()) if grad.numel() else False for _, grad in named]
    mine = (dist.get_rank() if dist.is_initialized() else 0, [name for (name, _), bad in zip(named, flags) if bad])
    everyone = all_gather_objects(mine, topology)
    report: NonfiniteReport = {}
    for rank, names in everyone:
        for name in names:
            report.setdefault(name, []).append(rank)
    return {name: sorted(ranks) for name, ranks in report.items()}


def describe(report: NonfiniteReport, limit: int = 20) -> str:
    """The report as one line: ``name (ranks 0, 1); ...``, at most ``limit`` names."""
    if not report:
        return (
            "no gradient: no rank's gradients hold NaN/inf (the non-finite value came from the reduction itself: "
            "a divide_by metric no rank passed this step, or a norm too large for its dtype)"
        )
    parts = [f"{name} (rank{'s' if len(r) > 1 else ''} {', '.join(map(str, r))})" for name, r in report.items()]
    more = f"; and {len(parts) - limit} more" if len(parts) > limit else ""
    return "; ".join(parts[:limit]) + more
