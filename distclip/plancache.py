"""Plans once: NormPlans cached by what decides them, for the functional API and GradClipper.

``clip_grad_norm_`` and ``get_total_norm`` are called every step with the same parameters, and
planning (ownership, copy sets, (device, dtype) buckets) costs more than the kernels on models
of many small tensors.  So plans are kept, keyed by everything a plan is a function of:

- the topology (the ``group`` and ``replica_group`` objects and their ranks) and, for a
  ``replica_group`` callable, the group it returns for each gradient's parameter;
- per gradient, in order: its type (which decides foreach support), element count, number of
  dims, dtype, device; for a DTensor its mesh (by identity: equal-valued meshes may hang off
  different roots), placements, global shape, and its local tensor's element count, dims, dtype,
  device and type; for an FSDP1 flat gradient, its unit's Attribution (the copies and the
  padding-free ranges, recomputed every call);
- the current accelerator (where the reduction runs).

Not the parameters' identity or the gradients' values: two calls with equal keys get equal plans
whatever tensors they hold, so a swapped ``.grad``, a re-created model or a new parameter at a
freed one's address is planned exactly as a fresh call would plan it.  Nothing is kept alive but
process groups (meshes are keyed by id and their plans dropped when they are freed).

When every gradient is a DTensor (FSDP2, tensor parallel), a second, cheaper key is tried
first: the gradients' DTensorSpecs by identity (each one dropping its entries when freed, as
meshes do) and their local tensors' layout, all from C-level maps.  FSDP2 gives every step's
gradient of a parameter the same spec, so from the second step on the per-gradient layout key
above (a Python function per gradient) is not computed at all.  Planning
communicates nothing, so a rank hitting the cache while another misses changes nothing that is
sent.  The one layout change the key does not see is an
in-place reshape keeping element count and number of dims (only ``.data`` assignment or
``resize_`` can reshape a parameter's gradient); the norm does not depend on it, only the copy
check's layout hash would lag.  Inputs with problems are never cached (they raise anyway).

A :class:`distclip.GradClipper` keeps a cache of its own with the same key, except that in place
of the copy groups it puts what they and its per-group membership are a function of: its
parameter list's version and which of those parameters have gradients (``fixed``).  So a dtype
or device change, a new FSDP1 unit holding the gradients, a strided or DTensor gradient where
there was another, or a new parameter list all find (or make) the plan made for exactly that.
"""

from __future__ import annotations

import operator
import weakref
from typing import Callable, Hashable, Mapping, Sequence

from torch import Tensor
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor

from distclip.ownership import Attribution, OwnershipError
from distclip.plan import GroupOf, NormPlan
from distclip.topology import Topology, current_accelerator
from distclip.torch_internals import LOCAL_TENSOR, SPEC, DTensorSpec

# Enough for a few models (or a model and its EMA copy) clipped alternately.
MAX_PLANS = 16

_dtype = operator.attrgetter("dtype")
_device = operator.attrgetter("device")


class PlanCache:
    """Plans by key, at most ``size`` of them (the oldest goes), each dropped when a mesh or
    DTensorSpec in its key is freed; and the same plans again by the identity of DTensor
    gradients' specs (see :func:`_specs_key`)."""

    def __init__(self, size: int = MAX_PLANS) -> None:
        self.size = size
        self.plans: dict[Hashable, tuple[NormPlan, list[weakref.ref]]] = {}
        self.by_specs: dict[Hashable, tuple[NormPlan, list[weakref.ref]]] = {}

    def remember(self, by_specs: bool, key: Hashable, referents: Sequence[object], plan: NormPlan) -> None:
        """Keep ``plan`` under ``key`` until one of ``referents`` is freed: they are in ``key``
        by id and not kept alive (a mesh holds the user's process groups), so a new object at a
        freed one's address cannot match.  Hashing a key again to keep LRU order costs, so the
        oldest entry goes, not the least used."""
        cache = self.by_specs if by_specs else self.plans
        forget = lambda _, key=key: cache.pop(key, None)  # noqa: E731
        cache[key] = (plan, [weakref.ref(referent, forget) for referent in referents])
        if len(cache) > self.size:
            del cache[next(iter(cache))]

    def clear(self) -> None:
        self.plans.clear()
        self.by_specs.clear()


# The functional API's plans, shared by all its calls in the process.
_shared = PlanCache()


def cached_plan(
    grads: Sequence[Tensor],
    topology: Topology,
    known: Mapping[int, Attribution | OwnershipError] | None = None,
    keys: Sequence[Tensor] | None = None,
    *,
    group_of: Callable[[], Sequence[GroupOf] | None] | None = None,
    num_groups: int = 0,
    cache: PlanCache | None = None,
    fixed: Hashable | None = None,
) -> NormPlan:
    """The NormPlan for ``grads`` (arguments as for :class:`NormPlan`), reused across calls.

    ``cache``: a caller's own cache instead of the process-wide one.  ``fixed``: from a caller
    that knows what ``keys``, ``group_of`` and the copy groups of ``keys`` are a function of (a
    GradClipper: its parameter list's version and which parameters have gradients); it goes in
    the key instead of the groups a ``replica_group`` callable returns, which is then asked only
    when a plan is made.  ``group_of`` is a function giving NormPlan's ``group_of``, called
    only then too (a GradClipper's is a lookup per parameter).
    """
    cache = _shared if cache is None else cache
    by_specs = _specs_key(grads, topology, known, fixed)
    if by_specs is not None:
        entry = cache.by_specs.get(by_specs[0])
        if entry is not None:
            return entry[0]
    key, meshes = _plan_key(grads, topology, known, keys, fixed)
    try:
        entry = None if key is None else cache.plans.get(key)
    except TypeError:  # a replica_group callable returned something unhashable: the plan reports it
        key = entry = None
    if entry is not None:
        plan = entry[0]
    else:
        plan = NormPlan(grads, topology, known, None if group_of is None else group_of(), num_groups, keys)
        if key is None or plan.problems:
            return plan
        cache.remember(False, key, meshes, plan)
    if by_specs is not None:
        cache.remember(True, *by_specs, plan)
    return plan


def clear_plans() -> None:
    """Forget every plan of the process-wide cache (and the process groups and meshes they
    hold)."""
    _shared.clear()


def _specs_key(
    grads: Sequence[Tensor],
    topology: Topology,
    known: Mapping[int, Attribution | OwnershipError] | None,
    fixed: Hashable | None,
) -> tuple[Hashable, list[DTensorSpec]] | None:
    """A cheaper key when every gradient is a DTensor (FSDP2, tensor parallel): their specs by
    identity, with their local tensors' layout, all from C-level maps.  A spec stands for its
    mesh, placements and global shape because torch never changes one in place (a DTensor whose
    layout changes gets a new spec; FSDP2 gives every step's gradient of a parameter the same
    one).  None where it does not apply (plain tensors, FSDP1, a ``replica_group`` callable
    without ``fixed``)."""
    if not grads or known or (topology.replica_of is not None and fixed is None) or set(map(type, grads)) != {DTensor}:
        return None
    specs = list(map(SPEC, grads))
    local = list(map(LOCAL_TENSOR, grads))
    key = (
        topology,
        current_accelerator(),
        fixed,
        tuple(map(id, specs)),
        tuple(map(Tensor.numel, local)),
        tuple(map(Tensor.dim, local)),
        tuple(map(_dtype, local)),
        tuple(map(_device, local)),
        tuple(map(type, local)),
    )
    return key, list({id(spec): spec for spec in specs}.values())


def layout_key(grads: Sequence[Tensor], meshes: dict[int, DeviceMesh]) -> Hashable:
    """Per gradient, in order, what a plan depends on: type, element count, dims, dtype, device;
    for a DTensor its mesh (by id, added to ``meshes``), placements, global shape and its local
    tensor's.  Per attribute a C-level map over the list where no DTensor is involved; there
    the device is read as its index (``get_device``: -1 on the CPU), which costs less than
    making a ``torch.device`` per gradient per step: one process uses one accelerator type, so
    the index tells CPU from accelerator and one accelerator from another."""
    types = tuple(map(type, grads))
    if any(issubclass(kind, DTensor) for kind in set(types)):
        return types, tuple(
            _dtensor_layout(grad, meshes) if isinstance(grad, DTensor) else _tensor_layout(grad) for grad in grads
        )
    return (
        types,
        tuple(map(Tensor.numel, grads)),
        tuple(map(Tensor.dim, grads)),
        tuple(map(_dtype, grads)),
        tuple(map(Tensor.get_device, grads)),
    )


def _plan_key(
    grads: Sequence[Tensor],
    topology: Topology,
    known: Mapping[int, Attribution | OwnershipError] | None,
    keys: Sequence[Tensor] | None,
    fixed: Hashable | None,
) -> tuple[Hashable | None, list[DeviceMesh]]:
    if known and any(isinstance(a, OwnershipError) for a in known.values()):
        return None, []
    meshes: dict[int, DeviceMesh] = {}
    layout = layout_key(grads, meshes)
    copy_groups = None
    if topology.replica_of is not None and fixed is None:
        try:
            returned = tuple(map(topology.replica_of, grads if keys is None else keys))
        except Exception:  # reported by the ownership pass, through the reduction: no plan kept
            return None, []
        # A 1-D mesh stands for its process group (the same ranks): the key keeps no mesh alive.
        as_group = {id(g): g.get_group() if isinstance(g, DeviceMesh) and g.ndim == 1 else g for g in returned}
        copy_groups = tuple(as_group[id(g)] for g in returned)
    return (
        topology,
        current_accelerator(),
        fixed,
        layout,
        tuple(sorted(known.items())) if known else (),
        copy_groups,
    ), list(meshes.values())


def _tensor_layout(grad: Tensor) -> tuple:
    return (grad.numel(), grad.dim(), grad.dtype, grad.device)


def _dtensor_layout(grad: DTensor, meshes: dict[int, DeviceMesh]) -> tuple:
    # Through the spec and the local tensor: DTensor's own numel()/dim() dispatch in Python.
    spec, local = SPEC(grad), LOCAL_TENSOR(grad)
    meshes[id(spec.mesh)] = spec.mesh
    return (id(spec.mesh), spec.placements, spec.shape, local.numel(), local.dim(), local.dtype, local.device, type(local))
