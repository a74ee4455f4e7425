"""distclip in Lightning: a Trainer callback and a Fabric helper.

Lightning's Trainer refuses norm-based clipping under its FSDP strategy
(``gradient_clip_algorithm="norm"`` raises "does not support clipping gradients by norm") and
Fabric's ``clip_gradients`` reads the norm on the host by default (``error_if_nonfinite=True``).
:class:`GlobalNormClipping` clips by the exact global norm under every strategy (DDP, FSDP,
``ModelParallelStrategy``), in ``on_before_optimizer_step``: after backward and, with AMP, after
Lightning has unscaled the gradients, before the optimizer steps.  It logs ``grad_norm`` (the
norm *before* clipping) and, with ``groups``, ``grad_norm/<group>`` through ``pl_module.log``.

One clipper: Lightning clips by ``Trainer(gradient_clip_val=...)`` right *after* the
``on_before_optimizer_step`` hooks (``Precision._after_closure`` calls
``configure_gradient_clipping`` after them), so with both the gradients would be clipped twice,
Lightning's threshold last.  The callback raises a ValueError in ``setup`` (every rank, before
any step) when ``gradient_clip_val`` is set too: which of the two thresholds was meant is the
user's to say.

Group names are the LightningModule's own under every strategy: ``groups="modules"`` names its
children, not those of the strategy's DDP or FSDP wrapper (:mod:`distclip.gradients` names
parameters as the unwrapped model does), and under ``FSDPStrategy`` each original parameter's
range of a flat gradient counts towards its own group.

:func:`clip_gradients` is the Fabric counterpart of ``fabric.clip_gradients(module, optimizer,
max_norm=...)``: no host sync.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from torch import Tensor, nn

import distclip
from distclip.clipper import GroupsSpec


class GlobalNormClipping(pl.Callback):
    """Clip every step by the global gradient norm, identical on every rank.

    Args:
        max_norm: a float, or a threshold policy (:class:`distclip.ZClip`, :class:`distclip.AutoClip`).
        norm_type: ``p`` of the norm.
        groups: per-group norms to log, as in :class:`distclip.GradClipper`; ``"modules"``:
            the LightningModule's children, whatever wrapper the strategy puts around it.
        log: log ``grad_norm`` (and the group norms) each step through ``pl_module.log``.
        **clipper_kwargs: the other arguments of :class:`distclip.GradClipper`
            (``skip_spikes``, ``nonfinite``, ``replica_group``, ...).

    A skipped step (``skip_spikes``, ``nonfinite="skip"``) reaches the optimizer without
    gradients, so it changes neither parameters nor optimizer state.  Spikes are judged on the
    norm: the loss is not known to a callback before the optimizer steps.

    ``self.clipper`` is the :class:`distclip.GradClipper`, made at the first step over the
    strategy's wrapped model (so FSDP's flat parameters are attributed to their originals);
    ``self.clipper.last`` is the latest :class:`distclip.ClipResult`.
    """

    def __init__(
        self, max_norm: Any = 1.0, norm_type: float = 2.0, *, groups: GroupsSpec = None, log: bool = True,
        **clipper_kwargs: Any,
    ) -> None:
        self.max_norm = max_norm
        self.norm_type = norm_type
        self.groups = groups
        self.log = log
        self.clipper_kwargs = clipper_kwargs
        self.clipper: distclip.GradClipper | None = None
        self._pending_state: dict | None = None  # a checkpoint's, loaded before the clipper exists

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Refuse, on every rank before any step, what would clip wrongly: the Trainer's own
        clipping on top of this one."""
        if stage != "fit":
            return
        if (trainer.gradient_clip_val or 0) > 0:  # Lightning clips only by a positive value
            raise ValueError(
                f"distclip: GlobalNormClipping clips the gradients, and Trainer(gradient_clip_val="
                f"{trainer.gradient_clip_val!r}) would clip them again after it (Lightning clips right after "
                f"on_before_optimizer_step); leave gradient_clip_val unset and give the threshold to "
                f"GlobalNormClipping (max_norm={self.max_norm!r} now)"
            )

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        if self.clipper is None:
            self.clipper = distclip.GradClipper(
                _wrapped(trainer, pl_module), self.max_norm, self.norm_type, groups=self.groups, **self.clipper_kwargs
            )
            if self._pending_state:
                self.clipper.load_state_dict(self._pending_state)
        result = self.clipper.clip_()
        # Lightning steps the optimizer whatever a callback says: a skipped step must reach it
        # with no gradients.
        self.clipper.discard_if_skipped_(optimizer, result)
        if self.log:
            pl_module.log("grad_norm", result.total_norm, on_step=True, on_epoch=False)
            for name, norm in result.group_norms.items():
                pl_module.log(f"grad_norm/{name}", norm, on_step=True, on_epoch=False)

    def state_dict(self) -> dict:
        if self.clipper is None:
            return self._pending_state or {}
        return self.clipper.state_dict()

    def load_state_dict(self, state_dict: dict) -> None:
        self._pending_state = state_dict


def _wrapped(trainer: pl.Trainer, pl_module: pl.LightningModule) -> nn.Module:
    """The module the strategy trains: FSDP's root (holding the flat parameters) or DDP's
    wrapper; the LightningModule itself where nothing wraps it."""
    model = getattr(trainer.strategy, "model", None)
    return model if isinstance(model, nn.Module) else pl_module


def clip_gradients(
    fabric: Any, module: nn.Module, optimizer: Any, max_norm: float, norm_type: float = 2.0,
    error_if_nonfinite: bool = False,
) -> Tensor:
    """Fabric: unscale ``optimizer``'s gradients (mixed precision) and clip ``module``'s by
    their global norm.  Returns the norm before clipping, a plain tensor identical on every
    rank; no host sync unless ``error_if_nonfinite``."""
    fabric.strategy.precision.unscale_gradients(optimizer)
    wrapped = getattr(module, "_forward_module", module)  # the strategy's DDP/FSDP module
    return distclip.clip_grad_norm_(wrapped, max_norm, norm_type, error_if_nonfinite)
