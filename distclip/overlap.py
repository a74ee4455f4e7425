"""Partials taken during backward: ``GradClipper(..., overlap=True)``.

Rule: the partial of a gradient (the powered norm of the elements this rank owns of it,
:meth:`NormPlan.gradient_partial`) is taken as soon as the gradient is written, in a
post-accumulate-grad hook: autograd runs it when it has accumulated a parameter's gradient,
FSDP2 when its reduce-scatter (and, for HSDP, all-reduce) has written a sharded gradient.  At the
step a partial is used only when its gradient is provably the tensor that was normed, unchanged:
the same tensor object, under the same plan, with the same version counter (torch bumps it on
every in-place write: DDP's bucket all-reduce and copy-back, a later micro-batch accumulating
into it, ``zero_grad(set_to_none=False)``, a clip).  If any owned gradient fails that test the
step takes the normal pass over all gradients (and the first such step warns), so the result is
always the normal pass's; overlap only moves where the work happens.

Where it helps: FSDP2 (HSDP included) and plain or DTensor parameters whose gradients are final
when autograd writes them (single process, tensor, pipeline and expert parallel without DDP):
at the step only the one all-reduce and the scaling remain.  Where it cannot: DDP all-reduces
after the hook (every step falls back); FSDP1 writes flat gradients without running the hooks.
The first backward of a run, and the first after the set of gradients changed, has no plan to
take partials for: that step takes the normal pass without a warning.
"""

from __future__ import annotations

import warnings
import weakref
from typing import Sequence

import torch
from torch import Tensor
from torch.distributed.tensor import DTensor
from torch.utils.hooks import RemovableHandle

from distclip.partials import PNorm
from distclip.plan import NormPlan


class BackwardPartials:
    """Post-accumulate-grad hooks on ``params`` that take each gradient's partial under the plan
    of the previous step (:meth:`use_plan`); :meth:`take` hands them to the step."""

    def __init__(self, params: Sequence[Tensor], pnorm: PNorm, foreach: bool | None) -> None:
        self.pnorm = pnorm
        self.foreach = foreach
        self._plan: NormPlan | None = None
        self._grad_index_of_param: list[int | None] = [None] * len(params)
        # Per parameter: (plan, weak reference to the local gradient, its version, partial).
        self._records: list[tuple[NormPlan, weakref.ref, int, Tensor] | None] = [None] * len(params)
        self._warned = False
        self.steps_used = 0  # steps whose partials all came from backward
        self.steps_fallen_back = 0  # steps that took the normal pass although partials were taken
        self._handles: list[RemovableHandle] = [
            param.register_post_accumulate_grad_hook(self._hook_for(index)) for index, param in enumerate(params)
        ]

    def _hook_for(self, param_index: int):
        # A weak reference: the parameters' hooks must not keep the clipper alive.
        owner = weakref.ref(self)

        def hook(param: Tensor) -> None:
            self_ = owner()
            if self_ is not None:
                self_._take_partial(param_index, param)

        return hook

    @torch.no_grad()
    def _take_partial(self, param_index: int, param: Tensor) -> None:
        plan, grad_index = self._plan, self._grad_index_of_param[param_index]
        grad = param.grad
        if plan is None or grad_index is None or grad is None:
            return
        local = grad._local_tensor if isinstance(grad, DTensor) else grad
        if grad_index not in plan.owned_ranges:
            self._records[param_index] = None  # nothing owned: its partial is the identity
            return
        value = plan.gradient_partial(grad_index, local, self.pnorm, self.foreach)
        self._records[param_index] = (plan, weakref.ref(local), local._version, value)

    def use_plan(self, plan: NormPlan, param_index_of_grad: Sequence[int]) -> None:
        """The plan (and which parameter each of its gradients belongs to) for the next backward."""
        if plan is not self._plan:
            self._plan = plan
            self._grad_index_of_param = [None] * len(self._grad_index_of_param)
            for grad_index, param_index in enumerate(param_index_of_grad):
                self._grad_index_of_param[param_index] = grad_index

    def take(self, plan: NormPlan, local: Sequence[Tensor], param_index_of_grad: Sequence[int]) -> Tensor | None:
        """This step's partials (:meth:`NormPlan.partials`) from the hooks, or None when any
        owned gradient is not the unchanged tensor its hook normed.  Clears the records."""
        records, self._records = self._records, [None] * len(self._records)
        values, stale, recorded = [], 0, 0
        for grad_index in plan.owned_indices:
            record = records[param_index_of_grad[grad_index]]
            tensor = local[grad_index]
            recorded += record is not None and record[0] is plan
            if record is None or record[0] is not plan or record[1]() is not tensor or tensor._version != record[2]:
                stale += 1
                continue
            values.append(record[3])
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
        self._records = [None] * len(self._records)

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
