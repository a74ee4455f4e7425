"""Adaptive thresholds and spike skipping, driven by the global pre-clip norm.

Each rule reads only the global norm (and the global loss), which the one all-reduce makes
bitwise identical on every rank, and keeps its state in a few float64 tensors on the norm's
device, updated with tensor operations alone.  So thresholds and decisions are identical on
every rank without any communication, and no step waits for the device (no ``.item()``, no
indexing by a device value).  State is checkpointed through ``state_dict`` as plain Python
values.

Rules common to all of them:

- A non-finite norm (or loss) never enters a policy's state: one NaN would poison an average
  or a variance for the rest of the run.
- A skipped step (a spike under :class:`SpikeSkip`, or a non-finite norm under
  ``nonfinite="skip"``) never enters a threshold policy's state: the update did not happen.
- :class:`SpikeSkip`'s own windows keep a short burst of spikes out, but take in every spike of
  a longer run: a spike kept out of the window that judges it is never learnt, so a lasting
  shift of the norm's level would be skipped for the rest of the run.
- The coefficient is torch's, ``min(threshold / (norm + 1e-6), 1)``.

:class:`ZClip` and :class:`AutoClip` are threshold policies: pass one as ``max_norm`` to
:class:`distclip.GradClipper`.  :class:`SpikeSkip` is passed as ``skip_spikes``.
"""

from __future__ import annotations

import math
import warnings

import torch
from torch import Tensor

from distclip.scaling import check_max_norm

ZCLIP_MODES = ("reciprocal", "mean", "fixed")


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(f"distclip: {message}")


def _optional_cap(max_norm: float | None) -> float:
    return math.inf if max_norm is None else check_max_norm(max_norm)


def _scalar(value: float, like: Tensor) -> Tensor:
    return torch.full((), value, dtype=torch.float64, device=like.device)


class _Window:
    """The last ``size`` accepted values, NaN where none was written yet.

    A ring written through a mask: indexing by the device-side write position would read it on
    the host (``aten._local_scalar_dense``), a sync on every step.
    """

    def __init__(self, size: int) -> None:
        self.size = size
        self.values: Tensor = torch.full((size,), math.nan, dtype=torch.float64)
        self.written: Tensor = torch.zeros((), dtype=torch.int64)
        self._slots: Tensor = torch.arange(size)

    def to(self, device: torch.device) -> None:
        if self.values.device != device:
            self.values, self.written, self._slots = (t.to(device) for t in (self.values, self.written, self._slots))

    def with_value(self, value: Tensor, accept: Tensor) -> Tensor:
        """The window's values with ``value`` written in the next slot where ``accept``."""
        slot = self._slots == self.written % self.size
        return torch.where(slot & accept, value, self.values)

    def append(self, value: Tensor, accept: Tensor) -> None:
        """Write ``value`` where ``accept`` (a 0-dim bool tensor), dropping the oldest."""
        self.values = self.with_value(value, accept)
        self.written = self.written + accept.to(torch.int64)

    def count(self, values: Tensor | None = None) -> Tensor:
        return (~(self.values if values is None else values).isnan()).sum()

    def mean_std(self) -> tuple[Tensor, Tensor, Tensor]:
        """(count, mean, unbiased standard deviation) of the values written (NaN when too few)."""
        known = ~self.values.isnan()
        count = known.sum()
        mean = torch.where(known, self.values, 0.0).sum() / count
        variance = torch.where(known, (self.values - mean) ** 2, 0.0).sum() / (count - 1)
        return count, mean, variance.sqrt()

    def state_dict(self) -> dict:
        return {"values": self.values.tolist(), "written": int(self.written)}

    def load_state_dict(self, state: dict) -> None:
        values = torch.tensor(state["values"], dtype=torch.float64)
        _require(values.shape == (self.size,), f"a saved window holds {values.numel()} values, not {self.size}")
        device = self.values.device
        self.values = values.to(device)
        self.written = torch.tensor(int(state["written"]), dtype=torch.int64, device=device)


class ZClip:
    r"""ZClip (Kumar et al., 2025, arXiv 2504.02507): a z-score of the norm against an EMA of
    its mean and variance.

    Warm-up: the first ``warmup_steps`` accepted norms are collected; then :math:`\mu` is their
    mean and :math:`\sigma^2` their population variance.  Until then the threshold is
    ``max_norm`` (``None``: no clipping).  After it, with
    :math:`z = (g - \mu) / (\sigma + 10^{-6})`, the step is a spike when ``z > z_thresh``, and
    the norm is clipped to

    - ``"reciprocal"`` (the paper's rule): :math:`\mu + z_{thresh}^2 \sigma / z`, which pulls
      larger outliers further down;
    - ``"mean"``: :math:`\mu`;
    - ``"fixed"``: :math:`\mu + z_{thresh}\,\sigma`.

    Otherwise the threshold is the spike boundary :math:`\mu + z_{thresh}(\sigma + 10^{-6})`,
    at or above the norm: no clipping.  The threshold is never above ``max_norm``.  Each
    accepted step then updates the statistics with the clipped value :math:`e` (the norm when
    it was no spike), so a spike cannot inflate them:
    :math:`\mu \leftarrow \alpha\mu + (1-\alpha)e`, then
    :math:`\sigma^2 \leftarrow \alpha\sigma^2 + (1-\alpha)(e - \mu)^2` with the new :math:`\mu`
    (as the authors' code does).
    """

    def __init__(
        self,
        alpha: float = 0.97,
        z_thresh: float = 2.5,
        warmup_steps: int = 25,
        mode: str = "reciprocal",
        max_norm: float | None = None,
    ) -> None:
        _require(0.0 < float(alpha) < 1.0, f"ZClip alpha must lie in (0, 1), got {alpha!r}")
        _require(float(z_thresh) > 0.0, f"ZClip z_thresh must be positive, got {z_thresh!r}")
        _require(int(warmup_steps) == warmup_steps and warmup_steps >= 1,
                 f"ZClip warmup_steps must be an integer >= 1, got {warmup_steps!r}")
        _require(mode in ZCLIP_MODES, f"ZClip mode must be one of {ZCLIP_MODES}, got {mode!r}")
        self.alpha, self.z_thresh, self.warmup_steps, self.mode = float(alpha), float(z_thresh), int(warmup_steps), mode
        self.max_norm = _optional_cap(max_norm)
        self._warmup = _Window(self.warmup_steps)
        self.mean = torch.zeros((), dtype=torch.float64)
        self.var = torch.zeros((), dtype=torch.float64)
        self.ready = torch.zeros((), dtype=torch.bool)

    def config(self) -> dict:
        return {"policy": "ZClip", "alpha": self.alpha, "z_thresh": self.z_thresh,
                "warmup_steps": self.warmup_steps, "mode": self.mode, "max_norm": self.max_norm}

    def step(self, norm: Tensor, accept: Tensor) -> Tensor:
        """This step's threshold for the float64 global ``norm``; the state takes the norm in
        where ``accept`` (and the norm is finite)."""
        self._warmup.to(norm.device)
        self.mean, self.var, self.ready = (t.to(norm.device) for t in (self.mean, self.var, self.ready))
        std = self.var.sqrt()
        z = (norm - self.mean) / (std + 1e-6)
        spike = self.ready & (z > self.z_thresh)
        if self.mode == "reciprocal":
            clipped_to = self.mean + self.z_thresh**2 * std / z
        elif self.mode == "mean":
            clipped_to = self.mean
        else:
            clipped_to = self.mean + self.z_thresh * std
        boundary = self.mean + self.z_thresh * (std + 1e-6)
        cap = _scalar(self.max_norm, norm)
        threshold = torch.where(self.ready, torch.minimum(torch.where(spike, clipped_to, boundary), cap), cap)

        accept = accept & norm.isfinite()
        effective = torch.where(spike, clipped_to, norm)
        mean = self.alpha * self.mean + (1 - self.alpha) * effective
        var = self.alpha * self.var + (1 - self.alpha) * (effective - mean) ** 2
        self._warmup.append(norm, accept & ~self.ready)
        warmed = ~self.ready & (self._warmup.written >= self.warmup_steps)
        warm_mean = self._warmup.values.mean()
        warm_var = ((self._warmup.values - warm_mean) ** 2).mean()
        update = self.ready & accept
        self.mean = torch.where(warmed, warm_mean, torch.where(update, mean, self.mean))
        self.var = torch.where(warmed, warm_var, torch.where(update, var, self.var))
        self.ready = self.ready | warmed
        return threshold

    def state_dict(self) -> dict:
        return {"config": self.config(), "mean": float(self.mean), "var": float(self.var),
                "ready": bool(self.ready), "warmup": self._warmup.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        _check_config(self.config(), state, shaped_by=("warmup_steps",))
        device = self.mean.device
        self.mean = torch.tensor(float(state["mean"]), dtype=torch.float64, device=device)
        self.var = torch.tensor(float(state["var"]), dtype=torch.float64, device=device)
        self.ready = torch.tensor(bool(state["ready"]), device=device)
        self._warmup.load_state_dict(state["warmup"])


class AutoClip:
    r"""AutoClip (Seetharaman et al., 2020): clip to a quantile of the norm history.

    The threshold is the ``quantile`` (linear interpolation, as ``numpy.percentile``) of the
    last ``window`` norms, this step's included: the authors' code appends the norm to the
    history before taking the percentile.  Only accepted norms stay in the history.  While fewer than ``warmup_steps`` norms are known
    (this one included), the threshold is ``max_norm`` (``None``: no clipping); it is never above
    ``max_norm``.  (The paper recommends the 10th percentile, ``quantile=0.1``, of the whole
    history; ``window`` bounds memory and lets the threshold follow the run.)
    """

    def __init__(
        self, quantile: float = 0.9, window: int = 1000, warmup_steps: int = 25, max_norm: float | None = None
    ) -> None:
        _require(0.0 < float(quantile) < 1.0, f"AutoClip quantile must lie in (0, 1), got {quantile!r}")
        _require(int(window) == window and window >= 2, f"AutoClip window must be an integer >= 2, got {window!r}")
        _require(int(warmup_steps) == warmup_steps and 1 <= warmup_steps <= window,
                 f"AutoClip warmup_steps must be an integer in [1, window], got {warmup_steps!r}")
        self.quantile, self.window, self.warmup_steps = float(quantile), int(window), int(warmup_steps)
        self.max_norm = _optional_cap(max_norm)
        self._history = _Window(self.window)

    def config(self) -> dict:
        return {"policy": "AutoClip", "quantile": self.quantile, "window": self.window,
                "warmup_steps": self.warmup_steps, "max_norm": self.max_norm}

    def step(self, norm: Tensor, accept: Tensor) -> Tensor:
        """This step's threshold for the float64 global ``norm``; the history takes the norm in
        where ``accept`` (and the norm is finite)."""
        self._history.to(norm.device)
        finite = norm.isfinite()
        candidates = self._history.with_value(norm, finite)
        # nanquantile skips the empty (NaN) slots; an all-NaN window gives NaN, i.e. warm-up.
        quantile = torch.nanquantile(candidates, self.quantile)
        warming = self._history.count(candidates) < self.warmup_steps
        cap = _scalar(self.max_norm, norm)
        threshold = torch.where(warming, cap, torch.minimum(quantile, cap))
        self._history.append(norm, accept & finite)
        return threshold

    def state_dict(self) -> dict:
        return {"config": self.config(), "history": self._history.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        _check_config(self.config(), state, shaped_by=("window",))
        self._history.load_state_dict(state["history"])


class SpikeSkip:
    r"""Skip a step whose grad norm, or global loss, is a spike (as OLMo-core's skip-step
    optimizers do), and learn a lasting shift of level instead of skipping it forever.

    A step is a spike when its global pre-clip norm :math:`g` exceeds
    :math:`\bar g + \text{sigmas} \cdot s_g` over the norm window, or, when a loss was passed on
    some rank, when the global loss exceeds :math:`\bar L + \text{sigmas} \cdot s_L` over the
    loss window; each test applies once its window holds ``min_history`` values (``s``: the
    unbiased standard deviation).  A spike is skipped.

    The windows hold the last ``window`` values that entered them.  A step's finite values enter
    unless the step is one of the first ``burst`` spikes in a row, or was skipped for another
    reason (a non-finite norm under ``nonfinite="skip"``):

    - a lone spike or a burst of up to ``burst`` spikes stays out, so it cannot inflate the
      standard deviation and hide the next spike for a whole window;
    - from the ``burst + 1``-th spike in a row on, the run is a new level (a new data mix, a
      learning-rate change): its values enter, still skipped until the windows have learnt it,
      which takes a few steps and never more than ``window``.  Every skip counts in
      ``GradClipper.state_dict()["skipped_steps"]``.

    ``burst=0`` is OLMo-core's rule (every finite value enters).  With the defaults, on a norm of
    0.8 with 5% noise: a shift to x5 or x100 is skipped for 7-8 steps (OLMo-core's rule: 4-5;
    keeping every spike out, as distclip did before: every later step), and a x3 spike 50 steps
    after a x10 spike or a burst of three is still skipped (OLMo-core's rule misses it).
    """

    def __init__(self, sigmas: float = 6.0, window: int = 128, min_history: int = 20, burst: int = 3) -> None:
        _require(float(sigmas) > 0.0, f"SpikeSkip sigmas must be positive, got {sigmas!r}")
        _require(int(window) == window and window >= 2, f"SpikeSkip window must be an integer >= 2, got {window!r}")
        _require(int(min_history) == min_history and 2 <= min_history <= window,
                 f"SpikeSkip min_history must be an integer in [2, window], got {min_history!r}")
        _require(int(burst) == burst and burst >= 0, f"SpikeSkip burst must be an integer >= 0, got {burst!r}")
        self.sigmas, self.window, self.min_history = float(sigmas), int(window), int(min_history)
        self.burst = int(burst)
        self._norms = _Window(self.window)
        self._losses = _Window(self.window)
        self._run = torch.zeros((), dtype=torch.int64)  # spikes in a row, up to the latest step

    def config(self) -> dict:
        return {"policy": "SpikeSkip", "sigmas": self.sigmas, "window": self.window, "min_history": self.min_history,
                "burst": self.burst}

    def _spike(self, window: _Window, value: Tensor) -> Tensor:
        count, mean, std = window.mean_std()
        return (count >= self.min_history) & (value > mean + self.sigmas * std)

    def step(self, norm: Tensor, loss: Tensor, has_loss: Tensor, skipped_anyway: Tensor) -> Tensor:
        """Whether this step is a spike (a 0-dim bool tensor).  The windows take the float64
        ``norm`` and ``loss`` in where finite (``loss`` only where ``has_loss``), unless the
        step is one of the first ``burst`` spikes in a row or ``skipped_anyway`` (skipped for
        another reason)."""
        self._norms.to(norm.device)
        self._losses.to(norm.device)
        self._run = self._run.to(norm.device)
        spike = self._spike(self._norms, norm) | (has_loss & self._spike(self._losses, loss))
        self._run = torch.where(spike, self._run + 1, 0)
        enters = ~skipped_anyway & (~spike | (self._run > self.burst))
        self._norms.append(norm, enters & norm.isfinite())
        self._losses.append(loss, enters & has_loss & loss.isfinite())
        return spike

    def state_dict(self) -> dict:
        return {"config": self.config(), "norms": self._norms.state_dict(), "losses": self._losses.state_dict(),
                "run": int(self._run)}

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict`; a state saved before ``burst`` existed (whose rule kept
        every spike out of the windows) loads into this rule with no spike run."""
        saved = state.get("config")
        if isinstance(saved, dict) and "burst" not in saved:
            saved = {**saved, "burst": self.burst}
        _check_config(self.config(), {**state, "config": saved}, shaped_by=("window",))
        self._norms.load_state_dict(state["norms"])
        self._losses.load_state_dict(state["losses"])
        self._run = torch.tensor(int(state.get("run", 0)), dtype=torch.int64, device=self._run.device)


ThresholdPolicy = ZClip | AutoClip


def _check_config(config: dict, state: dict, shaped_by: tuple[str, ...]) -> None:
    """A checkpoint restores state, not settings: parameters that differ from the checkpoint's
    keep this policy's value (a warning names both); a state of another policy, or one whose
    shape a parameter in ``shaped_by`` fixes (a window's size), cannot apply: ValueError."""
    saved = state.get("config")
    _require(isinstance(saved, dict) and saved.get("policy") == config["policy"],
             f"the checkpoint's state is of {saved.get('policy') if isinstance(saved, dict) else saved!r}, "
             f"this clipper has {config['policy']}: it cannot apply")
    for name in shaped_by:
        _require(saved.get(name) == config[name],
                 f"the checkpoint's {config['policy']} has {name}={saved.get(name)!r}, this one {name}={config[name]!r}: "
                 "its state cannot apply")
    differing = {name: (saved.get(name), value) for name, value in config.items() if saved.get(name) != value}
    if differing:
        warnings.warn(
            f"distclip: a checkpoint restores state, not settings; keeping this {config['policy']}'s "
            + ", ".join(f"{name}={mine!r} (the checkpoint has {theirs!r})" for name, (theirs, mine) in differing.items()),
            stacklevel=3,
        )
