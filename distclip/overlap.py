"""Partials taken during backward: ``GradClipper(..., overlap=True)``.

Rule: the partial of a gradient (the powered norm of the elements this rank owns of it,
:meth:`NormPlan.gradient_partial`) is taken in a hook as soon as the gradient is final, and used
at the step only when distclip can prove two things.

1. The hook saw the final gradient.  A gradient copied on other ranks (its copy set,
   :mod:`distclip.ownership`) is final once its copies agree, and whatever makes them agree may
   come after backward: a user's ``dist.all_reduce(p.grad)`` (manual data parallel; the tutorial's
   ``p.grad.data`` form; Megatron's tied-embedding sum).  c10d collectives and writes through
   ``.data`` do not bump the version counter, and afterwards the copies agree, so no check at the
   step could see it.  So a hook vouches only for copies on the ranks whose agreement it has seen:
   distclip's DDP communication hook, which runs after the bucket's all-reduce, for DDP's process
   group; a post-accumulate-grad hook on a DTensor for its mesh (FSDP2, HSDP included, runs its
   sharded parameters' hooks after writing the reduce-scattered, all-reduced gradient; a
   tensor-parallel DTensor's copies along its ``Replicate`` dims agree as its placements say); a
   post-accumulate-grad hook on a plain tensor for this rank alone.  If any gradient this rank
   owns part of has copies beyond those (plain gradients under a `group` of several ranks: copies
   by ``replica_group``, or by a ``replica_group`` callable's group; a DTensor's copies outside its
   mesh), the plan is *unproven*: no partials are taken under it and every step takes the normal
   pass (the first warns; ``steps_unproven`` counts them).  ``overlap="assume_final"`` is the
   user's word that nothing changes a gradient once its hook has run (no collective, no write
   through ``.data``): every gradient's partial is then taken in its hook, copies or not, and the
   norm is wrong if that word is broken.
2. Nothing changed the gradient since.  At the step it must be the memory that was normed: the
   same storage (the same tensor, or a view of the same base tensor, which the record keeps
   alive) at the same address, under the same plan, with the same version counter (torch bumps it
   on every in-place write through the tensor, and views share their base's: DDP's copy-back, a
   later micro-batch accumulating, ``zero_grad(set_to_none=False)``, a clip).  If any owned
   gradient fails that test the step takes the normal pass over all gradients (the first such
   step warns; ``steps_fallen_back`` counts them).

So the norm is always the normal pass's, up to rounding: partials are summed per gradient here,
where the normal pass may sum a run of adjacent gradients at once (:mod:`distclip.spans`), a
float32 difference of ~1e-7.  ``overlap`` only moves where the work happens.

Where it helps: FSDP2 (HSDP included); DDP with ``gradient_as_bucket_view=True`` (the gradients
are the all-reduced bucket's views); single process; tensor, pipeline and expert parallel whose
plain gradients have no copies on other ranks (``replica_group`` of this rank alone) and whose
DTensors have none outside their mesh.  Where it cannot: DDP without bucket views copies the
bucket into the gradients after the hook (every step falls back); a DDP module that has a
communication hook of its own keeps it (a warning, the normal pass); FSDP1 runs no hooks;
unproven plans (above).  The first backward of a run, and the first after the set of gradients
changed, has no plan to take partials under: that step takes the normal pass silently.
"""

from __future__ import annotations

import warnings
import weakref
from typing import Sequence

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel

from distclip.partials import PNorm
from distclip.plan import NormPlan
from distclip.torch_internals import LOCAL_TENSOR, storage_owner, version

ASSUME_FINAL = "assume_final"


def check_overlap(overlap: bool | str) -> bool | str:
    """``GradClipper``'s ``overlap``: False, True (partials from backward where distclip proves
    them final) or ``"assume_final"`` (the user's word that no gradient changes after its hook)."""
    if isinstance(overlap, bool) or overlap == ASSUME_FINAL:
        return overlap
    raise ValueError(f"distclip: overlap must be False, True or {ASSUME_FINAL!r}, got {overlap!r}")


class BackwardPartials:
    """Hooks (post-accumulate-grad on each parameter it is asked to :meth:`watch`, or ``ddp``'s
    communication hook) that take each gradient's partial under the plan of the previous step
    (:meth:`use_plan`); :meth:`take` hands them to the step.  Records are kept per parameter,
    so a clipper whose parameters change (a new adapter) watches the new ones too.
    ``assume_final``: take every gradient's partial in its hook, whatever its copies (the
    module's rule 1 waived on the user's word)."""

    def __init__(
        self, pnorm: PNorm, foreach: bool | None, ddp: nn.Module | None = None, assume_final: bool = False
    ) -> None:
        self.pnorm = pnorm
        self.foreach = foreach
        self.assume_final = assume_final
        self.wide = False  # accumulate in float64 (a fused optimizer's still-scaled gradients)
        self._plan: NormPlan | None = None
        self._taking = False  # whether the hooks take partials under ``_plan`` (it is proven)
        self._grad_index_of_param: dict[int, int] = {}
        # The plan last judged, and how many of its owned gradients no hook proves final.
        self._verdict: tuple[NormPlan, int] | None = None
        # Per parameter id: (plan, the gradient's storage owner, address, version, partial).
        self._records: dict[int, tuple[NormPlan, Tensor, int, int, Tensor]] = {}
        self._watched: set[int] = set()
        self._frozen: list[Tensor] = []  # parameters not watched because they do not require grad
        self._warned: set[str] = set()
        self.steps_used = 0  # steps whose partials all came from backward
        self.steps_fallen_back = 0  # steps that took the normal pass although partials were taken
        self.steps_unproven = 0  # steps that took the normal pass: a gradient no hook proves final
        self._ddp = isinstance(ddp, DistributedDataParallel)
        # The ranks whose copies DDP's all-reduce, and so distclip's hook after it, sees agree.
        self._ddp_ranks: frozenset[int] = frozenset()
        if self._ddp:
            self._hook_ddp(ddp)

    def watch(self, params: Sequence[Tensor], unfrozen_only: bool = False) -> None:
        """Take the partials of ``params``' gradients in backward (hooks on those not yet
        watched; a DDP module's communication hook already covers its parameters).  A frozen
        parameter takes no hook (torch refuses one): it is watched from the call after it is
        unfrozen (``unfrozen_only``: look only at those), its first gradient normed by the
        normal pass."""
        if self._ddp:
            return
        if unfrozen_only:
            if not any(p.requires_grad for p in self._frozen):
                return
            params = self._frozen
        frozen = []
        for param in params:
            if id(param) in self._watched:
                continue
            if not param.requires_grad:
                frozen.append(param)
                continue
            self._watched.add(id(param))
            param.register_post_accumulate_grad_hook(self._hook())
        self._frozen = frozen

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
            return
        self._ddp_ranks = frozenset(dist.get_process_group_ranks(ddp.process_group))

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
        if not self._taking or grad_index is None:
            return
        local = LOCAL_TENSOR(grad) if isinstance(grad, DTensor) else grad
        if grad_index not in plan.owned_ranges:
            self._records.pop(id(param), None)  # nothing owned: its partial is the identity
            return
        value = plan.gradient_partial(grad_index, local, self.pnorm, self.foreach, wide=self.wide)
        self._records[id(param)] = (plan, storage_owner(local), local.data_ptr(), version(local), value)

    def use_plan(self, plan: NormPlan, params_of_grads: Sequence[Tensor]) -> None:
        """The plan (and the parameter each of its gradients belongs to) for the next backward."""
        if plan is not self._plan:
            self._plan = plan
            self._grad_index_of_param = {id(p): i for i, p in enumerate(params_of_grads)}
            self._taking = not self._unproven(plan, params_of_grads)  # no work that could not count

    def take(self, plan: NormPlan, local: Sequence[Tensor], params_of_grads: Sequence[Tensor]) -> Tensor | None:
        """This step's partials (:meth:`NormPlan.partials`) from the hooks, or None when any
        owned gradient is not proven final in its hook or is not the unchanged tensor its hook
        normed.  Clears the records."""
        records, self._records = self._records, {}
        unproven = self._unproven(plan, params_of_grads)
        if unproven:
            self.steps_unproven += 1
            self._warn_once(
                "unproven",
                f"distclip: overlap=True: {unproven} of {len(plan.owned_indices)} gradients have copies on other "
                "ranks that no hook of distclip sees agree (plain gradients under a `group` of several ranks, "
                "a replica_group callable's groups, a DTensor's copies outside its mesh): a collective of "
                "yours after backward, such as dist.all_reduce(p.grad), would change them unseen.  Every "
                "step takes the normal pass (exact, not overlapped); if nothing changes a gradient once "
                f"backward has written it, pass overlap={ASSUME_FINAL!r}",
            )
            return None
        values, stale, recorded = [], 0, 0
        for grad_index in plan.owned_indices:
            record = records.get(id(params_of_grads[grad_index]))
            tensor = local[grad_index]
            recorded += record is not None and record[0] is plan
            if (
                record is None
                or record[0] is not plan
                or storage_owner(tensor) is not record[1]
                or tensor.data_ptr() != record[2]
                or version(tensor) != record[3]
            ):
                stale += 1
                continue
            values.append(record[4])
        if not stale:
            self.steps_used += 1
            return plan.partials_from_gradients(values, self.pnorm)
        if recorded:  # backward took partials, yet some gradient changed after its own
            self.steps_fallen_back += 1
            self._warn_once(
                "stale",
                f"distclip: overlap=True: {stale} of {len(plan.owned_indices)} gradients changed after "
                "backward took their partials (DDP's all-reduce, accumulation after the hook, an in-place "
                "edit); this step, and any other like it, takes the normal pass (exact, not overlapped)",
            )
        return None

    def _warn_once(self, kind: str, message: str) -> None:
        if kind not in self._warned:
            self._warned.add(kind)
            warnings.warn(message, stacklevel=7)  # the caller of GradClipper.clip_ (under no_grad)

    def _unproven(self, plan: NormPlan, params_of_grads: Sequence[Tensor]) -> int:
        """How many of the gradients this rank owns part of under ``plan`` have copies beyond
        the ranks their hook sees agree (rule 1; none under ``assume_final``).  Judged once per
        plan: a plan fixes the gradients, their parameters and their copy sets."""
        if self._verdict is None or self._verdict[0] is not plan:
            unproven = 0
            if not self.assume_final:
                mesh_ranks: dict[int, frozenset[int]] = {}
                for index in plan.owned_indices:
                    copies = plan.copy_sets.get(index)  # None: no copy on another rank
                    if copies is not None:
                        unproven += not self._seen_agree(params_of_grads[index], mesh_ranks).issuperset(copies)
            self._verdict = (plan, unproven)
        return self._verdict[1]

    def _seen_agree(self, param: Tensor, mesh_ranks: dict[int, frozenset[int]]) -> frozenset[int]:
        """The ranks whose copies of ``param``'s gradient are known to agree when its hook runs:
        DDP's process group (its all-reduce comes first) and, for a DTensor, its mesh (FSDP2
        reduces over it before the hook; DTensor's placements hold along it); none for a plain
        tensor outside DDP (only a copy set of this rank alone is final there).
        ``mesh_ranks``: memo by mesh."""
        if not isinstance(param, DTensor):
            return self._ddp_ranks
        mesh = param.device_mesh
        if id(mesh) not in mesh_ranks:
            mesh_ranks[id(mesh)] = frozenset(mesh.mesh.flatten().tolist())
        return self._ddp_ranks | mesh_ranks[id(mesh)]

    def set_norm_type(self, pnorm: PNorm) -> None:
        """A new norm type (a clipper's restored state): partials taken so far no longer apply."""
        self.pnorm = pnorm
        self._records = {}
