"""GradClipper: the stateful clipper for a training loop.

The functional API rediscovers ownership and foreach groupings on every call; a training loop
has the same parameters every step, so :class:`GradClipper` plans that once (a
:class:`~distclip.plan.NormPlan`) and only checks, locally and cheaply, whether the set of
parameters that have gradients changed.  Per-group norms ride the same single all-reduce as the
total.  Attached to an optimizer it clips inside ``optimizer.step()``; for fused optimizers it
hands the coefficient to the kernel through ``grad_scale`` instead of rewriting the gradients.
The threshold may adapt (:mod:`distclip.policies`), spikes may be skipped, and this rank's loss
may ride the same all-reduce to come back as the global mean.
"""

from __future__ import annotations

import collections
import warnings
from dataclasses import dataclass, field
from typing import Iterable, Mapping, Union

import torch
from torch import Tensor, nn
from torch.distributed.tensor import DTensor
from torch.utils.hooks import RemovableHandle

from distclip import fsdp1, nonfinite as nonfinite_location
from distclip.clip_grad import _gradients
from distclip.overlap import BackwardPartials
from distclip.partials import PNorm
from distclip.plan import NormPlan
from distclip.policies import SpikeSkip, ThresholdPolicy
from distclip.problems import Problem
from distclip.scaling import check_max_norm, clip_coefficient
from distclip.topology import GroupLike, ReplicaGroupLike, resolve_topology

NONFINITE_POLICIES = ("propagate", "error", "skip")
GroupsSpec = Union[None, str, Mapping[str, Iterable[Tensor]]]


@dataclass
class ClipResult:
    """One clipping step, every field identical on every rank.

    ``total_norm`` is the global norm *before* clipping; ``coef`` the factor the gradients were
    (or, for a fused optimizer, will be) multiplied by; ``nonfinite`` a 0-dim bool tensor, True
    when the norm was NaN or infinite; ``group_norms`` the pre-clip norm of each group;
    ``max_norm`` the threshold applied (the float, or the policy's value); ``skipped`` a 0-dim
    bool tensor, True when this step's update is skipped (a spike, or a non-finite norm under
    ``nonfinite="skip"``: the gradients are then left as they are); ``loss`` the mean of the
    losses passed on the ranks that passed one, on every rank (a pipeline stage without the
    loss gets it too); NaN when no rank passed one (None would need every rank to know, on the
    host, whether another passed one: a device sync).
    """

    total_norm: Tensor
    coef: Tensor
    nonfinite: Tensor
    group_norms: dict[str, Tensor] = field(default_factory=dict)
    max_norm: Tensor | None = None
    skipped: Tensor | None = None
    loss: Tensor | None = None


class GradClipper:
    """Clip gradients by their global norm every step, at the cost of the kernels alone.

    Args:
        model_or_params: an ``nn.Module`` (FSDP1 root modules included) or parameters.
        max_norm: a float, or a threshold policy (:class:`distclip.ZClip`,
            :class:`distclip.AutoClip`) that sets the threshold each step from the global norm.
        norm_type, group, replica_group: as in :func:`distclip.clip_grad_norm_`
            (``replica_group`` may be a per-parameter callable, :mod:`distclip.copygroups`).
        skip_spikes: a :class:`distclip.SpikeSkip` to skip steps whose norm or loss is a spike.
        groups: per-group norms to report: a mapping name -> parameters, ``"modules"`` (the
            model's top-level submodules) or ``"param_groups"`` (the attached optimizer's).
        nonfinite: ``"propagate"`` (torch's behaviour: NaN/inf norms scale gradients by NaN),
            ``"error"`` (RuntimeError on every rank naming the parameters and ranks holding
            NaN/inf; reads the norm on the host) or ``"skip"`` (gradients are left as they are
            and an attached optimizer's step is a no-op).
        foreach: as in torch.
        history: how many past total norms to keep (in ``state_dict``).
        overlap: take each gradient's partial during backward, as soon as it is final
            (:mod:`distclip.overlap`: FSDP2, DDP with ``gradient_as_bucket_view=True``, gradients
            final when autograd writes them; otherwise the normal pass).  The same norm either way, up
            to float32 rounding.
    """

    def __init__(
        self,
        model_or_params: Union[nn.Module, Iterable[Tensor]],
        max_norm: Union[float, ThresholdPolicy] = 1.0,
        norm_type: float = 2.0,
        *,
        skip_spikes: SpikeSkip | None = None,
        group: GroupLike = None,
        replica_group: ReplicaGroupLike = None,
        groups: GroupsSpec = None,
        nonfinite: str = "propagate",
        foreach: bool | None = None,
        history: int = 1000,
        overlap: bool = False,
    ) -> None:
        if nonfinite not in NONFINITE_POLICIES:
            raise ValueError(f"distclip: nonfinite must be one of {NONFINITE_POLICIES}, got {nonfinite!r}")
        self.policy = max_norm if isinstance(max_norm, ThresholdPolicy) else None
        self.max_norm = max_norm if self.policy is not None else check_max_norm(max_norm)
        if skip_spikes is not None and not isinstance(skip_spikes, SpikeSkip):
            raise ValueError(f"distclip: skip_spikes must be None or a distclip.SpikeSkip, got {skip_spikes!r}")
        self.skip_spikes = skip_spikes
        self.pnorm = PNorm.parse(norm_type)
        self.nonfinite = nonfinite
        self.foreach = foreach
        self.topology = resolve_topology(group, replica_group)
        self.module = model_or_params if isinstance(model_or_params, nn.Module) else None
        self.params = list(model_or_params.parameters() if self.module is not None else model_or_params)
        is_fsdp1 = self.module is not None and fsdp1.has_units(self.module)
        self._fsdp1_gradients = fsdp1.ModuleGradients(self.module) if is_fsdp1 else None
        if groups is not None and is_fsdp1:
            raise ValueError("distclip: per-group norms are not supported for FSDP1 flat parameters")
        self._groups_spec = groups
        self.group_names: list[str] = []
        self._group_of_param: list[int] | None = None
        if groups is not None and groups != "param_groups":
            self._set_groups(self._named_groups(groups))

        self._plan: NormPlan | None = None
        self._plan_key: object = None
        self._param_index_of_grad: list[int] = []
        self.backward_partials: BackwardPartials | None = None
        if overlap and is_fsdp1:
            warnings.warn("distclip: overlap=True has no effect on FSDP1 models (FSDP1 runs no gradient hooks)")
        elif overlap:
            self.backward_partials = BackwardPartials(self.params, self.pnorm, foreach, ddp=self.module)
        self.steps = 0
        self._clipped_steps = torch.zeros((), dtype=torch.int64)
        self._nonfinite_steps = torch.zeros((), dtype=torch.int64)
        self._skipped_steps = torch.zeros((), dtype=torch.int64)
        self.history: collections.deque[Tensor] = collections.deque(maxlen=history)
        self.last: ClipResult | None = None  # the latest step's result (attach() returns none)
        self._observed_loss: Tensor | None = None

    # -- groups ---------------------------------------------------------------------------

    def _named_groups(self, groups: GroupsSpec) -> dict[str, list[Tensor]]:
        if groups == "modules":
            if self.module is None:
                raise ValueError('distclip: groups="modules" needs a model, not parameters')
            named = {name: list(child.parameters()) for name, child in self.module.named_children()}
            own = list(self.module.parameters(recurse=False))
            return {**named, **({"(root)": own} if own else {})}
        if isinstance(groups, Mapping):
            return {name: list(params) for name, params in groups.items()}
        raise ValueError(f'distclip: groups must be a mapping, "modules" or "param_groups", got {groups!r}')

    def _set_groups(self, named: dict[str, list[Tensor]]) -> None:
        index_of = {id(p): i for i, p in enumerate(self.params)}
        group_of = [-1] * len(self.params)
        for g, (name, params) in enumerate(named.items()):
            for p in params:
                if id(p) not in index_of:
                    raise ValueError(f"distclip: group {name!r} holds a parameter the clipper does not clip")
                if group_of[index_of[id(p)]] != -1:
                    raise ValueError(f"distclip: a parameter is in group {name!r} and another group")
                group_of[index_of[id(p)]] = g
        self.group_names = list(named)
        self._group_of_param = group_of
        self._plan_key = None

    # -- the step -------------------------------------------------------------------------

    def _current(self) -> tuple[list[Tensor], NormPlan]:
        """This step's gradients and the plan for them, rebuilt only when the set of
        parameters with gradients changed (a local check: every rank rebuilds alike)."""
        if self._fsdp1_gradients is not None:
            grads, known, keys = self._fsdp1_gradients(self.topology)
            key: object = len(grads)
            group_of = None
        else:
            all_grads = [p.grad for p in self.params]
            present = [g is not None for g in all_grads]  # not `None in all_grads`: that runs Tensor.__eq__
            key = True if all(present) else tuple(present)
            grads = all_grads if key is True else [g for g in all_grads if g is not None]
            known, group_of = None, self._group_of_param
            if key is not True and group_of is not None:
                group_of = [g for g, grad in zip(group_of, all_grads) if grad is not None]
        if self._groups_spec == "param_groups" and self._group_of_param is None:
            raise ValueError('distclip: groups="param_groups" needs attach(optimizer) first')
        if key != self._plan_key or self._plan is None:
            if known is None:
                _, known, keys = _gradients([p for p in self.params if p.grad is not None], self.topology)
            self._plan = NormPlan(grads, self.topology, known, group_of, len(self.group_names), keys)
            self._plan_key = key
            if self._fsdp1_gradients is None:
                self._param_index_of_grad = [i for i, p in enumerate(self.params) if p.grad is not None]
        return grads, self._plan

    def _norms(
        self, loss_scale: Tensor | None = None, loss: Tensor | None = None
    ) -> tuple[ClipResult, NormPlan, list[Tensor], Tensor]:
        """Global norms, threshold, skip decision and coefficient, without touching the
        gradients: one all-reduce carries the norms and the loss."""
        grads, plan = self._current()
        local = plan.local_tensors(grads)
        partials = None
        if self.backward_partials is not None:
            partials = self.backward_partials.take(plan, local, self._param_index_of_grad)
            self.backward_partials.use_plan(plan, self._param_index_of_grad)
        loss_terms, problems = _loss_terms(loss, plan.device)
        # With GradScaler's scale still in the gradients, the norm is divided by it.
        norms, invalid, loss_sums = plan.global_norms(
            local, self.pnorm, self.foreach, divide_by=loss_scale, extra=loss_terms, problems=problems, partials=partials
        )
        total = norms[0]
        nonfinite = total.isnan() | total.isinf()
        if self.nonfinite == "error" and bool(nonfinite):
            located = nonfinite_location.describe(self.nonfinite_report())
            raise RuntimeError(
                f"distclip: the global gradient norm is non-finite ({total.item()}) on step {self.steps}: "
                f"NaN/inf gradients in {located}"
            )
        skipped = nonfinite if self.nonfinite == "skip" else torch.zeros_like(nonfinite)
        norm = total.to(torch.float64)
        loss_sum, loss_count = loss_sums.to(total.device).unbind()
        global_loss = loss_sum / loss_count  # NaN when no rank passed one
        if self.skip_spikes is not None:
            skipped = skipped | self.skip_spikes.step(norm, global_loss, loss_count > 0, skipped)
        if self.policy is not None:
            max_norm = self.policy.step(norm, ~skipped).to(total.dtype)
            coef = clip_coefficient(max_norm, total, keep=invalid | skipped)
        else:
            max_norm = torch.full((), self.max_norm, dtype=total.dtype, device=total.device)
            coef = clip_coefficient(self.max_norm, total, keep=invalid | skipped)
        groups = {name: norms[1 + i] for i, name in enumerate(self.group_names)}
        result = ClipResult(total, coef, nonfinite, groups, max_norm, skipped, global_loss.to(total.dtype))
        self._record(result)
        return result, plan, local, coef

    def _record(self, result: ClipResult) -> None:
        # The counters follow the norm to its device: adding a GPU value into a CPU counter
        # would be a blocking device-to-host copy on every step.
        device = result.coef.device
        if self._clipped_steps.device != device:
            self._clipped_steps = self._clipped_steps.to(device)
            self._nonfinite_steps = self._nonfinite_steps.to(device)
            self._skipped_steps = self._skipped_steps.to(device)
        self.steps += 1
        self._clipped_steps += result.coef < 1
        self._nonfinite_steps += result.nonfinite.to(device)
        self._skipped_steps += result.skipped.to(device)
        self.history.append(result.total_norm.detach())
        self.last = result

    @torch.no_grad()
    def clip_(self, loss: Tensor | None = None) -> ClipResult:
        """Compute the global (and per-group) norms with one all-reduce and scale every local
        gradient in place by ``min(max_norm / (total + 1e-6), 1)``.  No host sync unless
        ``nonfinite="error"``.

        ``loss``: this rank's loss (a 0-dim floating tensor), or None; its mean over the ranks
        that passed one comes back in ``result.loss`` on every rank from the same all-reduce, and
        :class:`~distclip.SpikeSkip` judges it.  A skipped step leaves the gradients as they
        are: do not step the optimizer when ``result.skipped`` (:meth:`attach` does that).
        """
        result, plan, local, coef = self._norms(loss=loss)
        plan.scale_(local, coef, self.foreach)
        return result

    def observe_loss(self, loss: Tensor | None) -> None:
        """With :meth:`attach`: the loss used by the clip inside the next ``optimizer.step()``
        (as ``clip_(loss=...)``).  Kept for one step only."""
        self._observed_loss = loss

    def _take_observed_loss(self) -> Tensor | None:
        loss, self._observed_loss = self._observed_loss, None
        return loss

    @torch.no_grad()
    def nonfinite_report(self) -> dict[str, list[int]]:
        """Parameter name -> sorted global ranks whose gradients of it hold NaN/inf (empty when
        all are finite), identical on every rank: a collective, every rank must call it.
        Qualified names when the clipper was given a module, else ``parameter {index}``."""
        named = nonfinite_location.named_gradients(self.module, self.params)
        return nonfinite_location.locate(named, self.topology)

    @property
    def _may_skip(self) -> bool:
        return self.nonfinite == "skip" or self.skip_spikes is not None

    def discard_if_skipped_(self, optimizer: torch.optim.Optimizer, result: ClipResult) -> bool:
        """After :meth:`clip_`, make ``optimizer``'s next step change nothing when ``result``
        skips it: its gradients are set to None (optimizers leave such parameters and their
        state alone).  One host sync, and only when skipping is configured.  Returns whether the
        step is skipped.  :meth:`attach` does this itself."""
        if not self._may_skip or not bool(result.skipped):
            return False
        for group in optimizer.param_groups:
            for p in group["params"]:
                p.grad = None
        return True

    # -- optimizer integration ------------------------------------------------------------

    def attach(self, optimizer: torch.optim.Optimizer) -> "_Attachment":
        """Clip automatically inside ``optimizer.step()`` (a step pre-hook).

        Works under ``torch.amp.GradScaler``: for ordinary optimizers the scaler unscales the
        gradients in place and skips the step on inf before the hook runs; for fused ones
        (``fused=True`` Adam, AdamW, SGD) the hook divides the norm by the scaler's scale and
        folds the coefficient into ``optimizer.grad_scale``, so the clip costs no extra pass over
        the gradients.  A skipped step (``nonfinite="skip"``, ``skip_spikes``) changes neither
        parameters nor optimizer state: a fused optimizer gets ``found_inf`` (no sync); others
        have their gradients set to None for the step (one host sync, only when skipping is
        possible).  The loss of :meth:`observe_loss` rides the clip; the result is in ``last``.
        """
        if self._groups_spec == "param_groups":
            self._set_groups(
                {g.get("name", f"param_group_{i}"): list(g["params"]) for i, g in enumerate(optimizer.param_groups)}
            )
        optimizer_params = {id(p) for g in optimizer.param_groups for p in g["params"]}
        fused = (
            getattr(optimizer, "_step_supports_amp_scaling", False)
            and optimizer_params == {id(p) for p in self.params}
            # grad_scale/found_inf are plain tensors, which DTensor kernels would reject.
            and not any(isinstance(p, DTensor) for p in self.params)
        )
        created: list[str] = []

        def clip_before_step(opt, args, kwargs):
            loss = self._take_observed_loss()
            if not fused:
                self.discard_if_skipped_(opt, self.clip_(loss))
                return None
            loss_scale = getattr(opt, "grad_scale", None)
            with torch.no_grad():
                result, _, _, coef = self._norms(loss_scale, loss)
            scale = (loss_scale if loss_scale is not None else torch.ones((), device=coef.device)).to(coef.device)
            created.clear()
            created.extend(name for name in ("grad_scale", "found_inf") if getattr(opt, name, None) is None)
            opt.grad_scale = (scale / coef).to(torch.float32)
            if self._may_skip:
                found = result.skipped.to(torch.float32)
                previous = getattr(opt, "found_inf", None)
                opt.found_inf = found if previous is None else torch.maximum(previous, found.to(previous.device))
            return None

        def clean_after_step(opt, args, kwargs):
            for name in created:  # only what the hook set; GradScaler removes its own
                if hasattr(opt, name):
                    delattr(opt, name)
            created.clear()

        return _Attachment(
            optimizer.register_step_pre_hook(clip_before_step),
            optimizer.register_step_post_hook(clean_after_step),
        )

    # -- checkpointing --------------------------------------------------------------------

    def state_dict(self) -> dict:
        """Counters, history and the policies' state: plain Python values, identical on every
        rank.  A run resumed from it makes the same threshold and skip decisions."""
        return {
            "max_norm": self.max_norm if self.policy is None else None,
            "norm_type": self.pnorm.p,
            "nonfinite": self.nonfinite,
            "steps": self.steps,
            "clipped_steps": int(self._clipped_steps),
            "nonfinite_steps": int(self._nonfinite_steps),
            "skipped_steps": int(self._skipped_steps),
            "history": [float(t) for t in self.history],
            "threshold_policy": None if self.policy is None else self.policy.state_dict(),
            "skip_spikes": None if self.skip_spikes is None else self.skip_spikes.state_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict`.  The policies must be configured as when it was saved
        (ValueError otherwise); a float ``max_norm`` is taken from the state."""
        for key, mine in (("threshold_policy", self.policy), ("skip_spikes", self.skip_spikes)):
            if (state.get(key) is None) != (mine is None):
                raise ValueError(
                    f"distclip: the checkpoint has {key}={'none' if state.get(key) is None else 'one'}, "
                    f"this clipper {'none' if mine is None else 'one'}"
                )
        if state["nonfinite"] not in NONFINITE_POLICIES:
            raise ValueError(f"distclip: unknown nonfinite policy {state['nonfinite']!r} in state")
        if self.policy is None:
            self.max_norm = check_max_norm(state["max_norm"])
        else:
            self.policy.load_state_dict(state["threshold_policy"])
        if self.skip_spikes is not None:
            self.skip_spikes.load_state_dict(state["skip_spikes"])
        self.pnorm = PNorm.parse(state["norm_type"])
        if self.backward_partials is not None:
            self.backward_partials.set_norm_type(self.pnorm)
        self.nonfinite = state["nonfinite"]
        self.steps = int(state["steps"])
        self._clipped_steps.fill_(int(state["clipped_steps"]))
        self._nonfinite_steps.fill_(int(state["nonfinite_steps"]))
        self._skipped_steps.fill_(int(state.get("skipped_steps", 0)))
        self.history.clear()
        self.history.extend(torch.tensor(v) for v in state["history"])


def _loss_terms(loss: Tensor | None, device: torch.device) -> tuple[Tensor, dict[Problem, str]]:
    """``[loss, 1]`` (``[0, 0]`` without one) in float64 on ``device``, to be summed over the
    group; a loss that is not a 0-dim floating tensor is a problem every rank raises."""
    if loss is None:
        return torch.zeros(2, dtype=torch.float64, device=device), {}
    if not isinstance(loss, Tensor) or loss.dim() != 0 or not loss.is_floating_point():
        shape = tuple(loss.shape) if isinstance(loss, Tensor) else None
        what = f"a {type(loss).__name__}" if shape is None else f"a tensor of shape {shape} and dtype {loss.dtype}"
        return torch.zeros(2, dtype=torch.float64, device=device), {Problem.INVALID_LOSS: f"got {what}"}
    value = loss.detach().to(device=device, dtype=torch.float64).reshape(1)
    return torch.cat([value, torch.ones(1, dtype=torch.float64, device=device)]), {}


class _Attachment:
    """What :meth:`GradClipper.attach` returns: ``remove()`` detaches the clipper."""

    def __init__(self, *handles: RemovableHandle) -> None:
        self._handles = handles

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
