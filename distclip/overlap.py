"""Partials taken during backward: ``GradClipper(..., overlap=True)``.

Rule: the partial of a gradient (the powered norm of the elements this rank owns of it,
:meth:`NormPlan.gradient_partial`) is taken as soon as the gradient is final: in a
post-accumulate-grad hook, which autograd runs when it has accumulated a parameter's gradient
and FSDP2 when its reduce-scatter (HSDP: all-reduce) has written a sharded gradient; for a DDP
module, in a communication hook once a bucket's all-reduce has completed.  At the step a partial
is used only when its gradient is provably the memory that was normed, unchanged: the same
storage (the same tensor, or a view of the same base tensor, which the record keeps alive) at
the same address, under the same plan, with the same version counter (torch bumps it on every
in-place write, and views share their base's: DDP's copy-back, a later micro-batch accumulating,
``zero_grad(set_to_none=False)``, a clip).  If any owned gradient fails that test the step takes
the normal pass over all gradients (and the first such step warns), so the norm is always the
normal pass's, up to rounding: partials are summed per gradient here, where the normal pass may
sum a run of adjacent gradients at once (:mod:`distclip.spans`), a float32 difference of ~1e-7.
``overlap`` only moves where the work happens.

Where it helps: FSDP2 (HSDP included); DDP with ``gradient_as_bucket_view=True`` (the gradients
are the all-reduced bucket's views); plain or DTensor parameters whose gradients are final when
autograd writes them (single process, tensor, pipeline and expert parallel without DDP).  Where it
cannot: DDP without bucket views copies the bucket into the gradients after the hook (every step
falls back); a DDP module that has a communication hook of its own keeps it (a warning, the
normal pass); FSDP1 runs no hooks.  The first backward of a run, and the first after the set of
gradients changed, has no plan to take partials under: that step takes the normal pass silently.
"""

from __future__ import annotations

import warnings
import weakref
from typing import Sequence

import torch
from torch import Tensor, nn
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel

from distclip.partials import PNorm
from distclip.plan import NormPlan


class BackwardPartials:
    """Hooks (post-accumulate-grad on each parameter it is asked to :meth:`watch`, or ``ddp``'s
    communication hook) that take each gradient's partial under the plan of the previous step
    (:meth:`use_plan`); :meth:`take` hands them to the step.  Records are kept per parameter,
    so a clipper whose parameters change (a new adapter) watches the new ones too."""

    def __init__(self, pnorm: PNorm, foreach: bool | None, ddp: nn.Module | None = None) -> None:
        self.pnorm = pnorm
        self.foreach = foreach
        self.wide = False  # accumulate in float64 (a fused optimizer's still-scaled gradients)
        self._plan: NormPlan | None = None
        self._grad_index_of_param: dict[int, int] = {}
        # Per parameter id: (plan, the gradient's storage owner, address, version, partial).
        self._records: dict[int, tuple[NormPlan, Tensor, int, int, Tensor]] = {}
        self._watched: set[int] = set()
        self._warned = False
        self.steps_used = 0  # steps whose partials all came from backward
        self.steps_fallen_back = 0  # steps that took the normal pass although partials were taken
        self._ddp = isinstance(ddp, DistributedDataParallel)
        if self._ddp:
            self._hook_ddp(ddp)

    def watch(self, params: Sequence[Tensor]) -> None:
        """Take the partials of ``params``' gradients in backward (hooks on those not yet
        watched; a DDP module's communication hook already covers its parameters)."""
        if self._ddp:
            return
        for param in params:
            if id(param) not in self._watched:
                self._watched.add(id(param))
                param.register_post_accumulate_grad_hook(self._hook())

    def _hook_ddp(self, ddp: DistributedDataParallel) -> None:
        """DDP's all-reduce comes after the post-accumulate-grad hooks: take the partials from
        the all-reduced bucket instead (torch's own all-reduce hook, then this)."""
        owner = weakref.ref(self)

        def after_all_reduce(state, bucket):  # no annotations: DDP checks them, and these would be strings
            def take(future):
                self_ = owner()
                if self_ is not None:
                    for param, grad in zip(bucket.parameters(), bucket.gradients()):
                        self_._take_partial(param, grad)
                return future.value()

            return allreduce_hook(state, bucket).then(take)

        try:
            ddp.register_comm_hook(ddp.process_group, after_all_reduce)
        except RuntimeError as error:  # DDP takes one communication hook: the user's stays
            warnings.warn(f"distclip: overlap=True cannot hook this DDP module ({error}); the normal pass is used")

    def _hook(self):
        # A weak reference: the parameters' hooks must not keep the clipper alive.
        owner = weakref.ref(self)

        def hook(param: Tensor) -> None:
            self_ = owner()
            if self_ is not None and param.grad is not None:
                self_._take_partial(param, param.grad)

        return hook

    @torch.no_grad()
    def _take_partial(self, param: Tensor, grad: Tensor) -> None:
        plan, grad_index = self._plan, self._grad_index_of_param.get(id(param))
        if plan is None or grad_index is None:
            return
        local = grad._local_tensor if isinstance(grad, DTensor) else grad
        if grad_index not in plan.owned_ranges:
            self._records.pop(id(param), None)  # nothing owned: its partial is the identity
            return
        value = plan.gradient_partial(grad_index, local, self.pnorm, self.foreach, wide=self.wide)
        self._records[id(param)] = (plan, _storage_owner(local), local.data_ptr(), local._version, value)

    def use_plan(self, plan: NormPlan, params_of_grads: Sequence[Tensor]) -> None:
        """The plan (and the parameter each of its gradients belongs to) for the next backward."""
        if plan is not self._plan:
            self._plan = plan
            self._grad_index_of_param = {id(p): i for i, p in enumerate(params_of_grads)}

    def take(self, plan: NormPlan, local: Sequence[Tensor], params_of_grads: Sequence[Tensor]) -> Tensor | None:
        """This step's partials (:meth:`NormPlan.partials`) from the hooks, or None when any
        owned gradient is not the unchanged tensor its hook normed.  Clears the records."""
        records, self._records = self._records, {}
        values, stale, recorded = [], 0, 0
        for grad_index in plan.owned_indices:
            record = records.get(id(params_of_grads[grad_index]))
            tensor = local[grad_index]
            recorded += record is not None and record[0] is plan
            if (
                record is None
                or record[0] is not plan
                or _storage_owner(tensor) is not record[1]
                or tensor.data_ptr() != record[2]
                or tensor._version != record[3]
            ):
                stale += 1
                continue
            values.append(record[4])
        if not stale:
            self.steps_used += 1
            return plan.partials_from_gradients(values, self.pnorm)
        if recorded:  # backward took partials, yet some gradient changed after its own
            self.steps_fallen_back += 1
            if not self._warned:
                self._warned = True
                warnings.warn(
                    f"distclip: overlap=True: {stale} of {len(plan.owned_indices)} gradients changed after "
                    "backward took their partials (DDP's all-reduce, accumulation after the hook, an in-place "
                    "edit); this step, and any other like it, takes the normal pass (exact, not overlapped)",
                    stacklevel=5,  # the caller of GradClipper.clip_
                )
        return None

    def set_norm_type(self, pnorm: PNorm) -> None:
        """A new norm type (a clipper's restored state): partials taken so far no longer apply."""
        self.pnorm = pnorm
        self._records = {}


def _storage_owner(tensor: Tensor) -> Tensor:
    """The tensor whose storage ``tensor`` is (its base, for a view).  Held by the record, so the
    memory cannot be freed and reused by another tensor while the record stands."""
    return tensor._base if tensor._base is not None else tensor
