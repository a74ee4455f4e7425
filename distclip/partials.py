"""Local partials: this rank's contribution to the global p-norm, from the elements it owns.

For a finite ``p != 0`` the global norm is ``(sum over ranks of S_r) ** (1/p)`` with
``S_r = sum |x|**p`` over the elements rank r owns (for ``p < 0`` too, as torch computes it: a
zero element makes ``S_r`` infinite and the norm 0); for ``p = 0`` it is the sum of the nonzero
counts; for ``p = inf`` (``-inf``) the max (min) of the ranks' max (min) of ``|x|``.  A partial is
therefore *additive* (or max/min-able) and one all-reduce combines them.

Per-tensor norms come from ``torch._foreach_norm`` grouped by (device, dtype), accumulated in
float32 (float64 for float64 gradients) so fp16/bf16 gradients can neither overflow nor lose the
norm; they are raised to the p-th power and summed in float64, where ``|x|**p`` cannot overflow
for any norm float32 can represent.  A complex element counts as ``|x|``, as in torch (complex64
accumulated like float32, complex128 like float64).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence, Union

import torch
from torch import Tensor
from distclip.torch_internals import device_has_foreach_support, has_foreach_support


@dataclass(frozen=True)
class PNorm:
    """A norm type: any float ``p`` but NaN: ``0`` counts nonzeros, ``inf``/``-inf`` take the
    max/min of ``|x|``, any other ``p`` (negative included) is ``(sum |x|**p) ** (1/p)``."""

    p: float

    @staticmethod
    def parse(norm_type: Union[float, int, str]) -> "PNorm":
        """Accept what ``torch.nn.utils.clip_grad_norm_`` accepts (``'inf'`` included).

        Raises ValueError for anything else (NaN, or what ``float()`` cannot read).
        """
        try:
            p = float(norm_type)
        except (TypeError, ValueError):
            p = math.nan
        if math.isnan(p):
            raise ValueError(
                f"distclip: unknown norm_type {norm_type!r}; use a float p (0, inf and -inf included)"
            )
        return PNorm(p)

    @property
    def reduce_op(self) -> str:
        """How partials of different ranks combine: 'sum', 'max' or 'min'."""
        return "max" if self.p == math.inf else "min" if self.p == -math.inf else "sum"

    @property
    def identity(self) -> float:
        """The partial of a rank that owns no element."""
        return math.inf if self.p == -math.inf else 0.0

    def powered(self, norms: Tensor) -> Tensor:
        """Per-tensor norms -> the additive (or max/min-able) quantities, in float64: the p-th
        powers for finite p != 0 (infinite for a zero norm when p < 0), the norms themselves for
        0 (counts) and +-inf."""
        norms = norms.to(torch.float64)
        return norms.pow(self.p) if self.reduce_op == "sum" and self.p != 0 else norms

    def combine(self, values: Tensor, dim: int | None = None) -> Tensor:
        """Combine partials with this norm's op (sum, max or min), over ``dim`` or all."""
        op = {"sum": torch.sum, "max": torch.amax, "min": torch.amin}[self.reduce_op]
        return op(values) if dim is None else op(values, dim)

    def combine_by_group(self, values: Tensor, slots: Tensor, num_groups: int) -> Tensor:
        """Powered values -> one partial per group (``slots[i]`` is value i's group; slot
        ``num_groups`` collects values in no group and is dropped)."""
        reduce = {"sum": "sum", "max": "amax", "min": "amin"}[self.reduce_op]
        out = torch.full((num_groups + 1,), self.identity, dtype=torch.float64, device=values.device)
        return out.scatter_reduce_(0, slots, values, reduce)[:num_groups]

    def merge(self, partials: Sequence[Tensor], size: int, device: torch.device) -> Tensor:
        """Combine partial vectors of ``size`` entries (from different devices/dtypes) on
        ``device``; no partials at all give the identity."""
        if not partials:
            return torch.full((size,), self.identity, dtype=torch.float64, device=device)
        return self.combine(torch.stack([partial.to(device) for partial in partials]), dim=0)

    def finish(self, combined: Tensor) -> Tensor:
        """The global partial -> the norm."""
        if self.reduce_op == "sum" and self.p != 0:
            return combined.pow(1.0 / self.p)
        return combined


def use_foreach(
    foreach: bool | None, tensors: list[Tensor], device: torch.device, supported: bool | None = None
) -> bool:
    """torch's rule: None picks foreach where supported; True where unsupported is an error.

    ``supported``: torch's support check for these tensors, when a plan already made it (it
    depends on their types and device only, and it is a Python loop over them).
    """
    if foreach is None:
        return has_foreach_support(tensors, device) if supported is None else supported
    if foreach and not device_has_foreach_support(device):
        raise RuntimeError(
            f"foreach=True was passed, but can't use the foreach API on {device.type} tensors"
        )
    return foreach
