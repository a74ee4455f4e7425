"""GradClipper: the stateful clipper for a training loop.

A training loop clips the same model every step, but the model changes around the clipper: it
is loaded with ``load_state_dict(assign=True)`` after the clipper was made, adapters are added,
layers unfrozen, dtypes changed, parameter groups added.  So the clipper re-reads what it clips
at every step (:class:`distclip.gradients.Parameters`: a model's parameters as they are now, or
the fixed list it was given) and finds its plan by the same key as the functional API
(:mod:`distclip.plancache`): a plan made for other parameters, dtypes, devices, layouts or FSDP1
units is never used.  Re-reading costs C-level maps over the tree and the gradients; planning
happens only when what the plan depends on changed.

The clipper keeps the loop's state: the plans, per-group assignment, counters, history and the
policies' state (checkpointed: a checkpoint restores state, never settings).  The step's
decision (non-finite policy, spike skip, threshold -> coefficient) is :mod:`distclip.decision`;
what attaching does to an optimizer (the fused zero-pass apply, GradScaler, skipped steps) is
:mod:`distclip.attach`.  Per-group norms and this rank's loss ride the same single all-reduce as
the total.
"""

from __future__ import annotations

import collections
import copy
import warnings
from typing import Iterable, Mapping, Union

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from distclip import nonfinite as nonfinite_location
from distclip.attach import FusedCheck, FusedStep, GroupsWatch, discard_grads_
from distclip.decision import NONFINITE_POLICIES, ClipResult, check_nonfinite_policy, decide
from distclip.deferred import NextCall
from distclip.gradients import Gradients, Parameters
from distclip.groups import Assignment, GroupsSpec, check_groups, group_of_holders
from distclip.layout import Layout, agree
from distclip.layout import checks as layout_checks
from distclip.metrics import Metric, bad_scalar, bad_value, decode, encode, local_scalar, names_of
from distclip.metrics import slots as metric_slots
from distclip.overlap import ASSUME_FINAL, BackwardPartials, check_overlap
from distclip.partial import reduce_partial_gradients_
from distclip.partials import PNorm
from distclip.plan import NormPlan
from distclip.plancache import PlanCache, cached_plan
from distclip.policies import SpikeSkip, ThresholdPolicy
from distclip.problems import Problem
from distclip.reduction import all_reduce_contributions, failed_contribution, raise_pending, raise_problems
from distclip.scaling import check_max_norm
from distclip.topology import GroupLike, ReplicaGroupLike, reduction_device, resolve_topology

__all__ = ["ClipResult", "GradClipper", "GroupsSpec", "NONFINITE_POLICIES"]

# Plans a clipper keeps: enough for the layouts a loop alternates between (two heads used on
# alternate steps, a frozen phase and an unfrozen one).
PLANS_KEPT = 8


class GradClipper:
    """Clip gradients by their global norm every step, at the cost of the kernels alone.

    Args:
        model_or_params: an ``nn.Module`` (FSDP1 root modules included), whose parameters are
            read as they are at every step, or parameters (that list, every step).
        max_norm: a float, or a threshold policy (:class:`distclip.ZClip`,
            :class:`distclip.AutoClip`) that sets the threshold each step from the global norm.
        norm_type, group, replica_group: as in :func:`distclip.clip_grad_norm_`
            (``replica_group`` may be a per-parameter callable, :mod:`distclip.copygroups`; the
            clipper asks it about each parameter when its parameters change, not every step).
        skip_spikes: a :class:`distclip.SpikeSkip` to skip steps whose norm or loss is a spike.
        groups: per-group norms to report (:mod:`distclip.groups`): a mapping name ->
            parameters, ``"modules"`` (the model's top-level submodules) or ``"param_groups"``
            (the attached optimizer's).
        nonfinite: ``"propagate"`` (torch's behaviour: NaN/inf norms scale gradients by NaN),
            ``"error"`` (RuntimeError on every rank naming the parameters and ranks holding
            NaN/inf; reads the norm on the host) or ``"skip"`` (gradients are left as they are
            and an attached optimizer's step is a no-op).
        foreach: as in torch.
        history: how many past total norms to keep (in ``state_dict``).
        divide_by: the name of a metric (:mod:`distclip.metrics`) whose reduced value the
            gradients are divided by before clipping, folded into the coefficient (no extra pass):
            for gradients of a summed loss, e.g. a token-weighted loss whose token count
            ``clip_(metrics={"tokens": distclip.Sum(n)})`` reduces in the same all-reduce.  The
            norms are of the divided gradients.
        overlap: True: take each gradient's partial during backward, as soon as it is final,
            where distclip can prove it final (:mod:`distclip.overlap`: FSDP2, DDP with
            ``gradient_as_bucket_view=True``, gradients with no copy on another rank; otherwise the
            normal pass).  The same norm either way, up to float32 rounding.
            ``"assume_final"``: also for gradients copied on other ranks, on your word that nothing
            (no ``dist.all_reduce(p.grad)``) changes a gradient after backward wrote it.
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
        overlap: bool | str = False,
        divide_by: str | None = None,
    ) -> None:
        overlap = check_overlap(overlap)
        self.nonfinite = check_nonfinite_policy(nonfinite)
        if divide_by is not None and not isinstance(divide_by, str):
            raise ValueError(f"distclip: divide_by must be the name of a metric, got {divide_by!r}")
        self.divide_by = divide_by
        self.policy = max_norm if isinstance(max_norm, ThresholdPolicy) else None
        self.max_norm = max_norm if self.policy is not None else check_max_norm(max_norm)
        if skip_spikes is not None and not isinstance(skip_spikes, SpikeSkip):
            raise ValueError(f"distclip: skip_spikes must be None or a distclip.SpikeSkip, got {skip_spikes!r}")
        self.skip_spikes = skip_spikes
        self.pnorm = PNorm.parse(norm_type)
        self.foreach = foreach
        self.topology = resolve_topology(group, replica_group)
        self.source = Parameters(model_or_params)
        self.module = self.source.module
        check_groups(groups, self.source)
        self._groups_spec = groups
        self._optimizer: torch.optim.Optimizer | None = None  # the attached one
        self._plans = PlanCache(PLANS_KEPT)
        self._plan: NormPlan | None = None
        self._assigned_for: int | None = None  # the parameter-list version groups were assigned for
        self._assignments = 0  # how many times, and the layouts agreed: in the plans' key
        self._layouts = 0
        self._optimizer_groups: GroupsWatch | None = None
        self._group_of_holder: list[Assignment] = []
        self._own_groups: list[str] = []  # the groups of this rank's parameters, in their order
        self.layout: Layout | None = None  # the agreed names (distclip.layout); made at the first step
        self._relayout = NextCall()
        self._unplaced_metrics: list[tuple[str, str]] = []  # passed since the last agreement, not in it
        self._follow_failure: Exception | None = None  # raised while re-reading the model

        self.backward_partials: BackwardPartials | None = None
        if overlap and self.source.fsdp1 is not None:
            warnings.warn("distclip: overlap=True has no effect on FSDP1 models (FSDP1 runs no gradient hooks)")
        elif overlap:
            self.backward_partials = BackwardPartials(
                self.pnorm, foreach, ddp=self.module, assume_final=overlap == ASSUME_FINAL
            )
            self.backward_partials.watch(self.source.params)
        self.steps = 0
        self._clipped_steps = torch.zeros((), dtype=torch.int64)
        self._nonfinite_steps = torch.zeros((), dtype=torch.int64)
        self._skipped_steps = torch.zeros((), dtype=torch.int64)
        self.history: collections.deque[Tensor] = collections.deque(maxlen=history)
        self.last: ClipResult | None = None  # the latest step's result (attach() returns none)
        self._observed: tuple[Tensor | None, Mapping[str, Metric] | None] = (None, None)

    @property
    def params(self) -> list[Tensor]:
        """The parameters clipped now (a model's, as of the latest step)."""
        return self.source.params

    # -- what this step clips -------------------------------------------------------------

    def _assign_groups(self) -> None:
        """Each parameter's group name, assigned again when the parameters or the attached
        optimizer's groups changed."""
        if self._groups_spec is None:
            return
        optimizer_changed = self._groups_spec == "param_groups" and self._optimizer_groups is not None and self._optimizer_groups.changed()
        if self._assigned_for == self.source.version and not optimizer_changed:
            return
        self._group_of_holder = group_of_holders(self._groups_spec, self.source, self._optimizer)
        self._own_groups = list(dict.fromkeys(
            name
            for assigned in self._group_of_holder
            for name in ([assigned] if not isinstance(assigned, tuple) else [name for _, _, name in assigned])
            if name is not None
        ))
        self._assigned_for = self.source.version
        self._assignments += 1

    def _agree_on_names(self, metric_names: list[tuple[str, str]]) -> None:
        """Agree on the layout of group norms and metrics with every rank: at the first step,
        and at the step after a rank had names the layout lacked (its flag, read now).  Metric
        names are never dropped: the layout's, those this rank passed since that it lacked, and
        this step's (a metric passed every few steps keeps its slot)."""
        flag = self._relayout.take()
        if self.layout is None or (flag is not None and flag[0] != 0):
            known = [] if self.layout is None else self.layout.metrics
            metrics = list(dict.fromkeys([*known, *self._unplaced_metrics, *metric_names]))
            self.layout = agree(self._own_groups, metrics, self.topology)
            self._unplaced_metrics = []
            self._layouts += 1

    def _lacks_names(self, layout: Layout, metric_names: list[tuple[str, str]]) -> bool:
        """Whether this rank has names ``layout`` lacks (metric names it lacks are kept for the
        next agreement)."""
        self._unplaced_metrics += [m for m in metric_names if m not in layout.metrics and m not in self._unplaced_metrics]
        return layout.lacks(self._own_groups, metric_names)

    @property
    def group_names(self) -> list[str]:
        """The names of the groups whose norms every step reports (all ranks' groups)."""
        return [] if self.layout is None else self.layout.groups

    def _follow_model(self) -> None:
        """Re-read the model (a list stays as it is): new parameters are clipped from this step.
        What this raises is kept for the step's reduction, so that every rank raises it."""
        try:
            refreshed = self.source.refresh()
            if self.backward_partials is not None:
                self.backward_partials.watch(self.source.params, unfrozen_only=not refreshed)
        except Exception as error:
            self._follow_failure = error

    def _gradients(self) -> Gradients:
        """This step's gradients, Partial ones reduced in place (a collective: before anything
        that could raise on one rank alone, see :mod:`distclip.partial`)."""
        gradients = self.source.gradients(self.topology)
        reduce_partial_gradients_(gradients.grads, gradients.params)
        return gradients

    def _plan_for(self, gradients: Gradients) -> NormPlan:
        """The plan for exactly these gradients (made only when what a plan depends on changed:
        a local check, so every rank that needs one makes one)."""
        def group_of() -> list | None:
            # Looked up only for a new plan: the key's `fixed` holds what this depends on.
            if self._groups_spec is None:
                return None
            slot = self.layout.group_slot
            slots = [_slots(assigned, slot) for assigned in self._group_of_holder]
            if gradients.presence is not True:
                slots = [g for g, present in zip(slots, gradients.presence) if present]
            return slots

        plan = cached_plan(
            gradients.grads,
            self.topology,
            gradients.known,
            gradients.params,
            group_of=group_of,
            num_groups=len(self.group_names),
            cache=self._plans,
            fixed=(self.source.version, self._assignments, self._layouts, gradients.presence),
        )
        self._plan = plan  # the latest step's, for introspection
        return plan

    # -- the step -------------------------------------------------------------------------

    def _norms(
        self,
        loss_scale: Tensor | None = None,
        loss: Tensor | None = None,
        metrics: Mapping[str, Metric] | None = None,
        tolerated: Tensor | None = None,
    ) -> tuple[ClipResult, NormPlan | None, list[Tensor]]:
        """Global norms, threshold, skip decision and coefficient, without touching the
        gradients: one all-reduce carries the norms, the loss and the metrics.  ``loss_scale``:
        GradScaler's scale, still in the gradients (the norms are divided by it);
        ``tolerated``: the optimizer's ``found_inf`` (a non-finite norm it skips anyway raises
        no error).  Whatever raises before the all-reduce takes part in it, so that every rank
        raises it together (:mod:`distclip.reduction`)."""
        raise_pending(self.topology)
        failure: Exception | None = None
        gradients, metric_names = None, []
        try:
            gradients = self._gradients()
            if self._follow_failure is not None:
                failure, self._follow_failure = self._follow_failure, None
                raise failure
            self._assign_groups()
            metric_names = names_of(metrics)
        except Exception as error:  # still agree on names below, with what this rank has
            failure = error
        self._agree_on_names(metric_names)
        layout_now = self.layout
        if self.divide_by is not None and self.divide_by not in layout_now.metric_names:
            # The layout is the same on every rank: so is this error, raised before the all-reduce.
            raise ValueError(
                f"distclip: divide_by={self.divide_by!r} names no metric any rank passed (metrics: "
                f"{sorted(layout_now.metric_names)}): pass it at every step, e.g. "
                f"clip_(metrics={{{self.divide_by!r}: distclip.Sum(tokens)}})"
            )
        ranks, position = len(self.topology.group_ranks), self.topology.group_ranks.index(self.topology.rank)
        device = reduction_device(self.topology, fallback=torch.device("cpu"))
        checks = layout_checks(layout_now, metric_names, device)
        plan, local = None, []
        try:
            if failure is not None:
                raise failure
            plan = self._plan_for(gradients)
            local = plan.local_tensors(gradients.grads)
            partials = None
            if self.backward_partials is not None:
                partials = self.backward_partials.take(plan, local, gradients.params)
                self.backward_partials.use_plan(plan, gradients.params)
            loss_terms, problems = _step_terms(loss, tolerated, plan.device)
            bad_metric = bad_value(metrics)
            if bad_metric is not None:
                problems[Problem.INVALID_METRIC] = bad_metric
                metrics = None
            extra = loss_terms
            if layout_now.metrics:
                extra = torch.cat([loss_terms, encode(metrics, layout_now.metrics, ranks, position, plan.device)])
            contribution = plan.contribution(
                local, self.pnorm, self.foreach, wide=loss_scale is not None, partials=partials, problems=problems,
                checks=checks, extra=extra,
                relayout=self._lacks_names(layout_now, metric_names),
            )
        except Exception as error:
            extra_size = STEP_TERMS + sum(metric_slots(kind, ranks) for _, kind in layout_now.metrics)
            contribution = failed_contribution(error, 1 + len(layout_now.groups), extra_size, checks, self.pnorm, device)
        reduced = all_reduce_contributions(contribution, self.pnorm, self.topology)
        self._relayout.put(reduced.relayout.reshape(1))  # before raising: every rank keeps it
        raise_problems(reduced, contribution, self.topology)
        norms = reduced.norms
        metric_values = decode(reduced.extra[STEP_TERMS:], layout_now.metrics, ranks)
        divisor = self._divisor(metric_values, norms.device)
        # The norm of c * g is |c| times g's for every p but 0: a count of nonzeros does not scale.
        if loss_scale is not None and self.pnorm.p != 0:
            norms = norms / loss_scale.to(norms.device, torch.float64)
        if divisor is not None and self.pnorm.p != 0:
            norms = norms / divisor
        norms = norms.to(device=plan.out_device, dtype=plan.out_dtype)
        result = decide(
            norms,
            reduced.invalid,
            reduced.extra[:2],
            nonfinite=self.nonfinite,
            max_norm=self.max_norm if self.policy is None else self.policy,
            skip_spikes=self.skip_spikes,
            locate=lambda: nonfinite_location.describe(self.nonfinite_report()),
            step=self.steps,
            tolerated=None if tolerated is None else reduced.extra[2] == ranks,
            divisor=divisor,
        )
        result.group_names, result.own_groups = layout_now.groups, self._own_groups
        result.metrics = metric_values
        self._record(result)
        return result, plan, local

    def _divisor(self, metrics: dict[str, Tensor], device: torch.device) -> Tensor | None:
        """The reduced metric the gradients are divided by (``divide_by``), NaN when no rank
        passed it this step (the norm is then NaN: the non-finite policy applies)."""
        if self.divide_by is None:
            return None
        if self.divide_by in metrics:
            return metrics[self.divide_by].to(device)
        return torch.full((), float("nan"), dtype=torch.float64, device=device)

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
    def clip_(self, loss: Tensor | None = None, metrics: Mapping[str, Metric] | None = None) -> ClipResult:
        """Compute the global (and per-group) norms with one all-reduce and scale every local
        gradient in place by ``min(max_norm / (total + 1e-6), 1)``.  No host sync unless
        ``nonfinite="error"``.

        ``loss``: this rank's loss (a 0-dim floating tensor), or None; its mean over the ranks
        that passed one comes back in ``result.loss`` on every rank from the same all-reduce, and
        :class:`~distclip.SpikeSkip` judges it.  ``metrics``: this rank's scalars to reduce in
        the same all-reduce, ``{name: distclip.Sum/Mean/Max/Min(value)}``, back in
        ``result.metrics`` on every rank (:mod:`distclip.metrics`).  A skipped step leaves the
        gradients as they are: do not step the optimizer when ``result.skipped`` (:meth:`attach`
        does that).
        """
        self._follow_model()
        return self._clip_followed(loss, metrics)

    def _clip_followed(self, loss: Tensor | None, metrics: Mapping[str, Metric] | None) -> ClipResult:
        result, plan, local = self._norms(loss=loss, metrics=metrics)
        plan.scale_(local, result.coef, self.foreach)
        return result

    def observe_loss(self, loss: Tensor | None, metrics: Mapping[str, Metric] | None = None) -> None:
        """With :meth:`attach`: the loss (and metrics) used by the clip inside the next
        ``optimizer.step()`` (as ``clip_(loss=..., metrics=...)``).  Kept for one step only."""
        self._observed = (loss, metrics)

    def _take_observed(self) -> tuple[Tensor | None, Mapping[str, Metric] | None]:
        observed, self._observed = self._observed, (None, None)
        return observed

    @torch.no_grad()
    def nonfinite_report(self) -> dict[str, list[int]]:
        """Parameter name -> sorted global ranks whose gradients of it hold NaN/inf (empty when
        all are finite), identical on every rank: a collective, every rank must call it.
        Names as :mod:`distclip.gradients` gives them (``parameters[i]`` for a list)."""
        return nonfinite_location.locate(self.source.named_pieces(), self.topology)

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
        discard_grads_(optimizer)
        return True

    # -- optimizer integration ------------------------------------------------------------

    def attach(self, optimizer: torch.optim.Optimizer) -> "_Attachment":
        """Clip automatically inside ``optimizer.step()`` (a step pre-hook); see
        :mod:`distclip.attach` for what it does to the optimizer.

        Works under every ``torch.amp.GradScaler`` recipe (``scaler.step(opt)``, or
        ``scaler.unscale_(opt)`` then ``scaler.step(opt)``): ordinary optimizers are clipped
        after the scaler unscaled the gradients, and a step the scaler skips for inf/NaN is not
        clipped at all; a fused optimizer (``fused=True`` Adam, AdamW, SGD) whose parameters are
        exactly the clipped ones gets the coefficient folded into ``grad_scale``, so the clip
        costs no extra pass over the gradients; with GradScaler's scale still in the gradients
        the norm is divided by it (accumulated in float64, so no scale overflows it), the
        coefficient goes into the gradients (one pass) and a step the scaler skips raises no
        ``nonfinite="error"``.  A skipped step (``nonfinite="skip"``, ``skip_spikes``)
        changes neither parameters nor optimizer state.  The loss of :meth:`observe_loss` rides
        the clip; the result is in ``last``.
        """
        self._optimizer = optimizer
        self._optimizer_groups = GroupsWatch(optimizer)  # "param_groups" are this optimizer's
        fused_check = FusedCheck(optimizer)
        fused_step = FusedStep()

        def clip_before_step(opt, args, kwargs):
            loss, metrics = self._take_observed()
            self._follow_model()
            if not fused_check(self.source.params, self.source.version):
                with torch.no_grad():
                    self.discard_if_skipped_(opt, self._clip_followed(loss, metrics))
                return None
            loss_scale = getattr(opt, "grad_scale", None)  # GradScaler's, unless unscale_ ran
            if self.backward_partials is not None:
                self.backward_partials.wide = True  # its gradients may hold GradScaler's scale
            with torch.no_grad():
                result, plan, local = self._norms(loss_scale, loss, metrics, tolerated=getattr(opt, "found_inf", None))
                if loss_scale is None:  # the zero-pass apply: the kernel divides by 1 / coef
                    fused_step.set(opt, 1.0 / result.coef, result.skipped)
                else:  # scale / coef could exceed float32 (distclip.attach): the coefficient goes in
                    plan.scale_(local, result.coef, self.foreach)
                    fused_step.set(opt, loss_scale, result.skipped)
            return None

        def clean_after_step(opt, args, kwargs):
            fused_step.restore(opt)

        return _Attachment(
            optimizer.register_step_pre_hook(clip_before_step),
            optimizer.register_step_post_hook(clean_after_step),
        )

    # -- checkpointing --------------------------------------------------------------------

    def _settings(self) -> dict:
        return {
            "max_norm": self.max_norm if self.policy is None else None,
            "norm_type": self.pnorm.p,
            "nonfinite": self.nonfinite,
        }

    def state_dict(self) -> dict:
        """Counters, history and the policies' state (with the settings they were made under):
        plain Python values, identical on every rank.  A run resumed from it makes the same
        threshold and skip decisions."""
        return {
            **self._settings(),
            "steps": self.steps,
            "clipped_steps": int(self._clipped_steps),
            "nonfinite_steps": int(self._nonfinite_steps),
            "skipped_steps": int(self._skipped_steps),
            "history": [float(t) for t in self.history],
            "threshold_policy": None if self.policy is None else self.policy.state_dict(),
            "skip_spikes": None if self.skip_spikes is None else self.skip_spikes.state_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore the state of :meth:`state_dict`: counters, history, the policies' state.

        A checkpoint restores state, not settings: ``max_norm``, ``norm_type``, ``nonfinite``
        and the policies' parameters stay as this clipper was made, so a run resumed with other
        settings runs with them (a setting that differs from the checkpoint's warns, naming
        both).  ValueError when a state cannot apply: a policy configured on one side only, or
        one whose state has another shape (see the policies' ``load_state_dict``)."""
        for key, mine in (("threshold_policy", self.policy), ("skip_spikes", self.skip_spikes)):
            if (state.get(key) is None) != (mine is None):
                raise ValueError(
                    f"distclip: the checkpoint has {key}={'none' if state.get(key) is None else 'one'}, "
                    f"this clipper {'none' if mine is None else 'one'}: its state cannot apply"
                )
        saved = {name: state.get(name) for name in self._settings()}
        differing = {name: (saved[name], value) for name, value in self._settings().items() if saved[name] != value}
        if saved["nonfinite"] not in NONFINITE_POLICIES:
            raise ValueError(f"distclip: unknown nonfinite policy {saved['nonfinite']!r} in state")
        if differing:
            warnings.warn(
                "distclip: a checkpoint restores state, not settings; keeping this clipper's "
                + ", ".join(f"{name}={mine!r} (the checkpoint has {theirs!r})" for name, (theirs, mine) in differing.items()),
                stacklevel=2,
            )
        # All or nothing: a spike state that cannot apply leaves the threshold policy as it was.
        policy_before = None if self.policy is None else copy.deepcopy(self.policy.state_dict())
        if self.policy is not None:
            self.policy.load_state_dict(state["threshold_policy"])
        if self.skip_spikes is not None:
            try:
                self.skip_spikes.load_state_dict(state["skip_spikes"])
            except Exception:
                if policy_before is not None:
                    self.policy.load_state_dict(policy_before)
                raise
        self.steps = int(state["steps"])
        self._clipped_steps.fill_(int(state["clipped_steps"]))
        self._nonfinite_steps.fill_(int(state["nonfinite_steps"]))
        self._skipped_steps.fill_(int(state.get("skipped_steps", 0)))
        self.history.clear()
        self.history.extend(torch.tensor(v) for v in state["history"])


def _slots(assigned: Assignment, slot: dict[str, int]) -> int | tuple[tuple[int, int, int], ...]:
    """A holder's group name(s) as slots of the agreed layout (-1: none, or not in it yet)."""
    if isinstance(assigned, tuple):
        return tuple((start, stop, -1 if name is None else slot.get(name, -1)) for start, stop, name in assigned)
    return -1 if assigned is None else slot.get(assigned, -1)


STEP_TERMS = 3  # the entries of _step_terms, ahead of the metrics in the reduction's extra vector


def _step_terms(loss: Tensor | None, tolerated: Tensor | None, device: torch.device) -> tuple[Tensor, dict[Problem, str]]:
    """``[loss, 1, found_inf]`` (``[0, 0, ...]`` without a loss) in float64 on ``device``, to be
    summed over the group; a loss that is not a 0-dim floating tensor is a problem every rank
    raises.  ``found_inf`` is 1 where the optimizer skips this step anyway (``tolerated``):
    its sum says whether every rank's optimizer does (GradScaler's ``found_inf`` is per rank
    where no ``unscale_`` all-reduced it), so that every rank decides the same."""
    skipped = torch.zeros(1, dtype=torch.float64, device=device)
    if tolerated is not None:
        skipped = (tolerated.detach().to(device).reshape(1) != 0).to(torch.float64)
    wrong = None if loss is None else bad_scalar(loss)
    if loss is None or wrong is not None:
        problems = {} if loss is None else {Problem.INVALID_LOSS: f"got {wrong}"}
        return torch.cat([torch.zeros(2, dtype=torch.float64, device=device), skipped]), problems
    value = local_scalar(loss).to(device=device, dtype=torch.float64).reshape(1)
    return torch.cat([value, torch.ones(1, dtype=torch.float64, device=device), skipped]), {}


class _Attachment:
    """What :meth:`GradClipper.attach` returns: ``remove()`` detaches the clipper."""

    def __init__(self, *handles: RemovableHandle) -> None:
        self._handles = handles

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
