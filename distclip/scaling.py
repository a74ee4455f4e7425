"""The coefficient and the in-place scaling of every local gradient."""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor

from distclip.partials import use_foreach
from distclip.torch_internals import group_tensors_by_device_and_dtype


def check_max_norm(max_norm: float) -> float:
    """``max_norm`` as a float; ValueError when negative or NaN (it would flip or destroy grads)."""
    value = float(max_norm)
    if math.isnan(value) or value < 0:
        raise ValueError(f"distclip: max_norm must be a non-negative number, got {max_norm!r}")
    return value


def clip_coefficient(max_norm: float, total_norm: Tensor, keep: Tensor | None = None) -> Tensor:
    """``min(max_norm / (total_norm + 1e-6), 1)``, torch's coefficient, on total_norm's device;
    1 wherever the 0-dim bool ``keep`` is True (the gradients are then left as they are).

    Clamping and ``torch.where`` instead of ``if`` keep the host from waiting for the device.
    """
    coefficient = torch.clamp(max_norm / (total_norm + 1e-6), max=1.0)
    if keep is None:
        return coefficient
    return torch.where(keep.to(coefficient.device), 1.0, coefficient)


def scale_grouped_(
    groups: Sequence[Sequence[Tensor]],
    coefficient: Tensor,
    foreach: bool | None = None,
    supported: Sequence[bool] | None = None,
) -> None:
    """Multiply tensors in place by the 0-dim ``coefficient``: one foreach call per group of
    same-(device, dtype) tensors, the coefficient copied once to each device.  ``supported``:
    per group, torch's foreach support check if already made (see :func:`use_foreach`)."""
    for g, tensors in enumerate(groups):
        tensors = list(tensors)
        device = tensors[0].device
        device_coefficient = coefficient.to(device)
        if use_foreach(foreach, tensors, device, None if supported is None else supported[g]):
            torch._foreach_mul_(tensors, device_coefficient)
        else:
            for tensor in tensors:
                tensor.mul_(device_coefficient)


def scale_(tensors: Sequence[Tensor], coefficient: Tensor, foreach: bool | None = None) -> None:
    """Multiply every tensor in place by the 0-dim ``coefficient`` (see :func:`scale_grouped_`)."""
    grouped = group_tensors_by_device_and_dtype([list(tensors)])
    scale_grouped_([device_tensors for [device_tensors], _ in grouped.values()], coefficient, foreach)
