"""Metrics in the same collective: the scalars a trainer all-reduces every step ride the norm's.

Trainers reduce a few scalars every step besides the norm, each with a collective of its own:
the token count of a token-weighted loss, the max attention logit (QK-clip / MuonClip), MoE load
statistics.  ``GradClipper.clip_(metrics={"tokens": Sum(n), "max_logit": Max(x), "z": Mean(v)})``
carries them in the one all-reduce instead.

The rule.  Each value is this rank's 0-dim floating-point tensor (on any device).  On every rank
the result ``result.metrics[name]`` is the same float64 0-dim tensor:

- :class:`Sum`: the sum of the values of the ranks that passed ``name``;
- :class:`Mean`: their mean;
- :class:`Max` / :class:`Min`: their max / min;

NaN when no rank passed it this step.  A rank may pass no metrics at all (a pipeline stage
without the loss); the ranks that pass metrics pass the same names of the same kinds (else a
ValueError on every rank, through the reduction), and a value that is not a 0-dim floating
tensor is a ValueError on every rank too.  The names are agreed once, at the first step (see
:mod:`distclip.layout`); a name first passed later counts from the step after.

Slots.  A Sum or Mean takes two float64 entries (sum, count).  A Max or Min takes one entry per
rank of the group (each rank writes its own, ``-inf``/``+inf`` where it has none, the others
0: the sum of one value and zeros is that value exactly), so it costs 8 bytes per rank: 128 KiB
at 16,384 ranks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, Mapping, Sequence

import torch
from torch import Tensor
from torch.distributed.tensor import DTensor


@dataclass(frozen=True)
class Metric:
    """This rank's value of a metric (a 0-dim floating tensor)."""

    value: Tensor
    kind: ClassVar[str] = ""


class Sum(Metric):
    """The sum over the ranks that pass it."""

    kind = "sum"


class Mean(Metric):
    """The mean over the ranks that pass it."""

    kind = "mean"


class Max(Metric):
    """The max over the ranks that pass it."""

    kind = "max"


class Min(Metric):
    """The min over the ranks that pass it."""

    kind = "min"


KINDS = {cls.kind: cls for cls in (Sum, Mean, Max, Min)}
_ABSENT = {"max": -math.inf, "min": math.inf}


def names_of(metrics: Mapping[str, Metric] | None) -> list[tuple[str, str]]:
    """``(name, kind)`` of the metrics passed, in their order; ValueError (raised where every
    rank raises alike: it is the caller's own argument) for what is not a Metric."""
    if not metrics:
        return []
    for name, metric in metrics.items():
        if not isinstance(name, str) or not isinstance(metric, Metric) or type(metric) is Metric:
            raise ValueError(
                f"distclip: metrics must map names to distclip.Sum/Mean/Max/Min(value), got {name!r}: {metric!r}"
            )
    return [(name, metric.kind) for name, metric in metrics.items()]


def bad_value(metrics: Mapping[str, Metric] | None) -> str | None:
    """What is wrong with the first value that is not a 0-dim floating tensor, if any."""
    for name, metric in (metrics or {}).items():
        wrong = bad_scalar(metric.value)
        if wrong is not None:
            return f"metric {name!r} must be a 0-dim floating tensor, got {wrong}"
    return None


def bad_scalar(value: object) -> str | None:
    """What is wrong with ``value`` as this rank's scalar (a loss, a metric), if anything.  A
    DTensor is taken where it is replicated (``loss_parallel``'s loss): its local value is this
    rank's; a Partial or sharded one holds only part of it here."""
    if isinstance(value, DTensor) and not all(p.is_replicate() for p in value.placements):
        return f"a DTensor with placements {value.placements} (pass value.full_tensor())"
    if not isinstance(value, Tensor) or value.dim() != 0 or not value.is_floating_point():
        return type(value).__name__ if not isinstance(value, Tensor) else f"shape {tuple(value.shape)}, {value.dtype}"
    return None


def local_scalar(value: Tensor) -> Tensor:
    """``value`` as a plain tensor (a replicated DTensor's local value), detached."""
    return (value.to_local() if isinstance(value, DTensor) else value).detach()


def slots(kind: str, ranks: int) -> int:
    """Entries of the reduction vector a metric of ``kind`` takes."""
    return 2 if kind in ("sum", "mean") else ranks


def encode(
    metrics: Mapping[str, Metric] | None,
    layout: Sequence[tuple[str, str]],
    ranks: int,
    position: int,
    device: torch.device,
) -> Tensor:
    """This rank's entries for every metric of ``layout`` (float64 on ``device``): its values
    where it passed them, the identity elsewhere; ``position`` is this rank's index in the
    group."""
    metrics = metrics or {}
    parts = []
    for name, kind in layout:
        metric = metrics.get(name)
        if kind in ("sum", "mean"):
            if metric is None or metric.kind != kind:
                parts.append(torch.zeros(2, dtype=torch.float64, device=device))
            else:
                value = local_scalar(metric.value).to(device=device, dtype=torch.float64).reshape(1)
                parts.append(torch.cat([value, torch.ones(1, dtype=torch.float64, device=device)]))
            continue
        if metric is None or metric.kind != kind:
            value = torch.full((), _ABSENT[kind], dtype=torch.float64, device=device)
        else:
            value = local_scalar(metric.value).to(device=device, dtype=torch.float64)
        # This rank's entry of the row, the others 0 (no index made from host values: no copy).
        mine = torch.arange(ranks, device=device) == position
        parts.append(torch.where(mine, value, torch.zeros((), dtype=torch.float64, device=device)))
    if not parts:
        return torch.zeros(0, dtype=torch.float64, device=device)
    return torch.cat(parts)


def decode(summed: Tensor, layout: Sequence[tuple[str, str]], ranks: int) -> dict[str, Tensor]:
    """The metrics from the summed entries of :func:`encode`: 0-dim float64 tensors, NaN where
    no rank passed one."""
    result, offset = {}, 0
    for name, kind in layout:
        size = slots(kind, ranks)
        entries = summed[offset : offset + size]
        offset += size
        if kind == "sum":
            value = torch.where(entries[1] > 0, entries[0], math.nan)
        elif kind == "mean":
            value = entries[0] / entries[1]  # 0 / 0: NaN when no rank passed it
        else:
            extreme = entries.amax() if kind == "max" else entries.amin()
            value = torch.where(extreme.isinf() & (extreme == _ABSENT[kind]), math.nan, extreme)
        result[name] = value
    return result
