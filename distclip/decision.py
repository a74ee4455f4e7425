"""One step's decision from its global norms: the non-finite policy, spike skipping, the threshold
and the coefficient.

The rule, in order, from the global pre-clip norm ``g`` and the global loss:

1. ``nonfinite`` says what a NaN/inf ``g`` does: ``"propagate"`` (torch's behaviour: the
   coefficient is NaN or 0), ``"error"`` (RuntimeError on every rank naming where the NaN/inf
   gradients are; reading ``g`` on the host is the one sync of this policy), ``"skip"`` (the
   step is skipped).  A non-finite ``g`` the optimizer skips anyway (GradScaler's overflow step,
   ``tolerated``) is the scaler's business: no error.
2. :class:`~distclip.SpikeSkip` may skip the step too (a spike of ``g`` or of the loss).
3. The threshold is ``max_norm`` or a threshold policy's value (:mod:`distclip.policies`); a
   skipped step enters no policy's state.
4. The coefficient is torch's, ``min(threshold / (g + 1e-6), 1)``, and exactly 1 (gradients left
   as they are) when the step is skipped or a rank reported a problem (``invalid``).  Gradients
   that hold sums to be divided by a reduced metric (``GradClipper(divide_by=...)``: a
   token-weighted loss) have ``g`` of the divided gradients, and the coefficient includes the
   division.

Everything stays on the device as 0-dim tensors: no host sync but rule 1's ``"error"``.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import Tensor

from distclip.policies import SpikeSkip, ThresholdPolicy
from distclip.scaling import clip_coefficient

NONFINITE_POLICIES = ("propagate", "error", "skip")


@dataclass
class ClipResult:
    """One clipping step, every field identical on every rank.

    ``total_norm`` is the global norm *before* clipping; ``coef`` the factor the gradients were
    (or, for a fused optimizer, will be) multiplied by; ``nonfinite`` a 0-dim bool tensor, True
    when the norm was NaN or infinite; ``max_norm`` the threshold applied (the float, or the
    policy's value); ``skipped`` a 0-dim bool tensor, True when this step's update is skipped (a
    spike, or a non-finite norm under ``nonfinite="skip"``: the gradients are then left as they
    are); ``loss`` the mean of the losses passed on the ranks that passed one, on every rank (a
    pipeline stage without the loss gets it too); NaN when no rank passed one (None would need
    every rank to know, on the host, whether another passed one: a device sync); ``metrics`` the
    reduced metrics (:mod:`distclip.metrics`).

    ``group_norms``: the pre-clip norm of each group this rank holds, by name;
    ``all_group_norms``: of every group any rank holds (:mod:`distclip.groups`); both made when
    first read, from ``norms`` (``[total, every group in layout order]``): a step with thousands
    of groups pays for no dictionary unless it is read.
    """

    total_norm: Tensor
    coef: Tensor
    nonfinite: Tensor
    max_norm: Tensor | None = None
    skipped: Tensor | None = None
    loss: Tensor | None = None
    norms: Tensor | None = None
    group_names: list[str] = field(default_factory=list)
    own_groups: list[str] = field(default_factory=list)
    metrics: dict[str, Tensor] = field(default_factory=dict)

    @functools.cached_property
    def all_group_norms(self) -> dict[str, Tensor]:
        return dict(zip(self.group_names, self.norms[1:].unbind())) if self.group_names else {}

    @functools.cached_property
    def group_norms(self) -> dict[str, Tensor]:
        every = self.all_group_norms
        return {name: every[name] for name in self.own_groups if name in every}


def check_nonfinite_policy(nonfinite: str) -> str:
    if nonfinite not in NONFINITE_POLICIES:
        raise ValueError(f"distclip: nonfinite must be one of {NONFINITE_POLICIES}, got {nonfinite!r}")
    return nonfinite


def decide(
    norms: Tensor,
    invalid: Tensor,
    loss_sums: Tensor,
    *,
    nonfinite: str,
    max_norm: float | ThresholdPolicy,
    skip_spikes: SpikeSkip | None,
    locate: Callable[[], str],
    step: int,
    tolerated: Tensor | None = None,
    divisor: Tensor | None = None,
) -> ClipResult:
    """The step's :class:`ClipResult` from the reduction's outcome.

    ``norms``: ``[total, group 0, ...]`` in the output dtype (kept in the result); ``invalid``: True when a rank
    reported a problem; ``loss_sums``: ``[sum of the losses passed, how many ranks passed one]``
    (float64); ``locate``: describes where the NaN/inf gradients are (a collective: every rank
    calls it, which they do together since the norm they read is the same); ``tolerated``: a
    0-dim tensor, nonzero when the optimizer skips this step anyway (GradScaler's ``found_inf``);
    ``divisor``: what the gradients are divided by (``GradClipper(divide_by=...)``; ``norms``
    are already of the divided gradients), folded into the coefficient.
    """
    total = norms[0]
    nonfinite_now = total.isnan() | total.isinf()
    # An invalid step's NaN is another rank's problem, raised at the next call (distclip.deferred).
    if nonfinite == "error" and bool(nonfinite_now & ~invalid) and not (tolerated is not None and bool(tolerated)):
        raise RuntimeError(
            f"distclip: the global gradient norm is non-finite ({total.item()}) on step {step}: "
            f"NaN/inf gradients in {locate()}"
        )
    # A step a rank found a problem in is never applied (it is raised, at once or at the next call).
    skipped = (nonfinite_now if nonfinite == "skip" else torch.zeros_like(nonfinite_now)) | invalid
    norm = total.to(torch.float64)
    loss_sum, loss_count = loss_sums.to(total.device).unbind()
    global_loss = loss_sum / loss_count  # NaN when no rank passed one
    if skip_spikes is not None:
        skipped = skipped | skip_spikes.step(norm, global_loss, loss_count > 0, skipped)
    if isinstance(max_norm, float):
        threshold = torch.full((), max_norm, dtype=total.dtype, device=total.device)
        coef = clip_coefficient(max_norm, total, keep=invalid | skipped)
    else:
        threshold = max_norm.step(norm, ~skipped).to(total.dtype)
        coef = clip_coefficient(threshold, total, keep=invalid | skipped)
    if divisor is not None:  # a step left as it is is not divided either
        coef = torch.where(invalid | skipped, coef, coef / divisor.to(coef.device, coef.dtype))
    return ClipResult(total, coef, nonfinite_now, threshold, skipped, global_loss.to(total.dtype), norms)
