"""What attaching a clipper does to an optimizer's step.

The rules.

- The clip runs in a step pre-hook, so it sees the gradients the step will use: under
  ``torch.amp.GradScaler``, after the scaler unscaled them (ordinary optimizers, or after an
  explicit ``scaler.unscale_(optimizer)``), or still scaled (a fused optimizer, whose kernel
  unscales them with ``grad_scale``).
- **Fused zero-pass apply.**  An optimizer whose kernel takes GradScaler's ``grad_scale`` and
  ``found_inf`` (``_step_supports_amp_scaling``: fused Adam, AdamW, SGD) gets the coefficient
  folded into ``grad_scale`` (its kernel divides the gradients by it) instead of a pass over the
  gradients.  Only while the parameters it steps are exactly the clipped ones and none is a
  DTensor (``grad_scale`` is a plain tensor, which DTensor kernels reject): checked again
  whenever either list changes (:class:`FusedCheck`), so a parameter added by ``add_param_group``
  never gets a coefficient it did not contribute to.  Otherwise the step takes the normal pass,
  and warns once when the optimizer steps parameters the clipper does not clip (those are
  stepped unclipped).
- **GradScaler's scale still in the gradients** (``scaler.step`` without ``unscale_`` on a fused
  optimizer): the norm is divided by the scale (accumulated in float64, so no scale overflows
  it), and the coefficient goes into the gradients (one pass), not into ``grad_scale``:
  ``scale / coef`` can exceed float32 at the scales a scaler reaches with float32 gradients,
  and an infinite ``grad_scale`` would zero the update.
- **Skipped steps** change neither parameters nor optimizer state: a fused optimizer gets
  ``found_inf`` (no sync); others have their gradients set to None for the step (one host sync,
  only when skipping is configured).  A step another rank found a problem in (on an
  accelerator, raised at the next call) is skipped the same way by a fused optimizer; an
  ordinary one steps that once with the gradients as they were (unclipped).
- What the hook sets on the optimizer is put back after the step (:class:`FusedStep`):
  ``grad_scale`` and ``found_inf`` return to the values they had (GradScaler's own, which the
  scaler then removes itself; ``grad_scale`` is None after ``scaler.unscale_``), or are removed
  when the hook created them.
"""

from __future__ import annotations

import warnings
from typing import Sequence

import torch
from torch import Tensor
from torch.distributed.tensor import DTensor

from distclip.torch_internals import takes_grad_scale

_MISSING = object()


def discard_grads_(optimizer: torch.optim.Optimizer) -> None:
    """Set every gradient ``optimizer`` steps to None: optimizers leave such parameters and their
    state alone, so its next step changes nothing."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            p.grad = None


class GroupsWatch:
    """Tells whether an optimizer's parameter groups changed since the last call: another group
    (``add_param_group``), another list object or length for a group's ``"params"``.  The lists
    are held, so that a new list cannot pass for a freed one at its address."""

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        self.optimizer = optimizer
        self._seen: list[tuple[list, int]] | None = None

    def changed(self) -> bool:
        now = [(g["params"], len(g["params"])) for g in self.optimizer.param_groups]
        seen, self._seen = self._seen, now
        return seen is None or len(seen) != len(now) or any(a is not b or m != n for (a, m), (b, n) in zip(seen, now))


class FusedCheck:
    """Whether the fused apply may serve ``optimizer``, re-decided only when its parameter groups
    or the clipper's parameter list (``version``) change: a step costs a look at the groups."""

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        self.optimizer = optimizer
        self._groups = GroupsWatch(optimizer)
        self._version: int | None = None
        self._fused = False
        self._warned = False

    def __call__(self, params: Sequence[Tensor], version: int) -> bool:
        if self._groups.changed() or version != self._version:
            self._version = version
            self._fused = self._decide(params)
        return self._fused

    def _decide(self, params: Sequence[Tensor]) -> bool:
        stepped = [p for g in self.optimizer.param_groups for p in g["params"]]
        clipped = {id(p) for p in params}
        unclipped = [p for p in stepped if id(p) not in clipped]
        if unclipped and not self._warned:
            self._warned = True
            shapes = ", ".join(str(tuple(p.shape)) for p in unclipped[:5])
            warnings.warn(
                f"distclip: the optimizer steps {len(unclipped)} parameter(s) the clipper does not clip "
                f"(shapes {shapes}{', ...' if len(unclipped) > 5 else ''}): their gradients are stepped "
                "unclipped. Give the clipper the model (it follows new parameters) or these parameters too.",
                stacklevel=4,
            )
        return (
            takes_grad_scale(self.optimizer)
            and {id(p) for p in stepped} == clipped
            and not any(isinstance(p, DTensor) for p in stepped)
        )


class FusedStep:
    """Sets a fused optimizer's ``grad_scale`` (and ``found_inf``) for one step and puts back
    what was there after it."""

    def __init__(self) -> None:
        self._saved: dict[str, object] = {}

    def set(self, optimizer: torch.optim.Optimizer, grad_scale: Tensor, skip: Tensor) -> None:
        """``grad_scale`` (the kernel divides the gradients by it) and ``found_inf`` also where
        ``skip`` (a 0-dim bool tensor: the kernel then leaves parameters and state alone)."""
        self._saved = {name: getattr(optimizer, name, _MISSING) for name in ("grad_scale", "found_inf")}
        optimizer.grad_scale = grad_scale.to(torch.float32)
        found = skip.to(torch.float32)
        previous = self._saved["found_inf"]
        optimizer.found_inf = (
            found if previous is _MISSING or previous is None else torch.maximum(previous, found.to(previous.device))
        )

    def restore(self, optimizer: torch.optim.Optimizer) -> None:
        for name, value in self._saved.items():
            if value is _MISSING:
                if hasattr(optimizer, name):
                    delattr(optimizer, name)
            else:
                setattr(optimizer, name, value)
        self._saved = {}
