"""Accelerate's ``accelerator.clip_grad_norm_``, exact under every configuration it runs.

Accelerate (1.15) clips FSDP1 models with FSDP's own method, and everything else by grouping
gradients per DeviceMesh plus one group of plain tensors, taking torch's norm of each and
combining them: plain tensors beside DTensors are taken as this rank's alone, gradients on a
mesh that spans other ranks' copies are counted once per copy, and offloaded CPU gradients go
to an accelerator backend.  Here the same call goes to :func:`distclip.clip_grad_norm_`: one
all-reduce over the world, every element counted once, on any mix of meshes and devices.

The rule for the gradients counted: ``parameters`` as given; when they are exactly the
parameters of an FSDP1 model that ``accelerator.prepare`` wrapped, that model, so its flat
gradients are attributed to their original parameters.  Gradients are unscaled first
(``accelerator.unscale_gradients()``), as Accelerate does.  DeepSpeed and XLA clip inside their
own engines: those configurations keep Accelerate's method.

Use it per call, ``clip_grad_norm_(accelerator, model.parameters(), 1.0)``, or once for all
calls, ``install(accelerator)``, after which ``accelerator.clip_grad_norm_`` is this function.
"""

from __future__ import annotations

import functools
from typing import Any, Iterable

import torch
from torch import Tensor

import distclip
from distclip.gradients import fsdp1_root_among

# DistributedType values whose clipping happens inside another engine.
_OWN_ENGINES = ("DEEPSPEED", "XLA")


@torch.no_grad()
def clip_grad_norm_(
    accelerator: Any,
    parameters: Iterable[Tensor],
    max_norm: float,
    norm_type: float = 2.0,
) -> Tensor:
    """Clip the gradients of ``parameters`` by their global norm; ``accelerator.clip_grad_norm_``'s
    arguments with the accelerator first.

    Returns:
        The global norm before clipping: a plain 0-dim tensor, identical on every rank (with
        DeepSpeed or XLA, what Accelerate's own method returns).
    """
    if accelerator.distributed_type.name in _OWN_ENGINES:
        return type(accelerator).clip_grad_norm_(accelerator, parameters, max_norm, norm_type)
    accelerator.unscale_gradients()
    parameters = list(parameters)
    fsdp1_model = fsdp1_root_among(accelerator._models, parameters)
    return distclip.clip_grad_norm_(parameters if fsdp1_model is None else fsdp1_model, max_norm, norm_type)


def install(accelerator: Any) -> Any:
    """Make ``accelerator.clip_grad_norm_`` this module's function; returns ``accelerator``."""
    accelerator.clip_grad_norm_ = functools.partial(clip_grad_norm_, accelerator)
    return accelerator
