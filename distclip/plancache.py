"""The functional API plans once: NormPlans cached by what decides them.

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
"""

from __future__ import annotations

import operator
import weakref
from typing import Hashable, Mapping, Sequence

from torch import Tensor
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor
from torch.distributed.tensor._dtensor_spec import DTensorSpec

from distclip.ownership import Attribution, OwnershipError
from distclip.plan import NormPlan
from distclip.topology import Topology, current_accelerator

# Enough for a few models (or a model and its EMA copy) clipped alternately.
MAX_PLANS = 16

_plans: dict[Hashable, tuple[NormPlan, list[weakref.ref]]] = {}
# The same plans again, keyed by the identity of DTensor gradients' specs (see _specs_key).
_by_specs: dict[Hashable, tuple[NormPlan, list[weakref.ref]]] = {}
_dtype = operator.attrgetter("dtype")
_device = operator.attrgetter("device")
_spec = operator.attrgetter("_spec")
_local = operator.attrgetter("_local_tensor")


def cached_plan(
    grads: Sequence[Tensor],
    topology: Topology,
    known: Mapping[int, Attribution | OwnershipError] | None = None,
    keys: Sequence[Tensor] | None = None,
) -> NormPlan:
    """The NormPlan for ``grads`` (arguments as for :class:`NormPlan`), reused across calls."""
    by_specs = _specs_key(grads, topology, known)
    if by_specs is not None:
        entry = _by_specs.get(by_specs[0])
        if entry is not None:
            return entry[0]
    key, meshes = _plan_key(grads, topology, known, keys)
    try:
        entry = None if key is None else _plans.get(key)
    except TypeError:  # a replica_group callable returned something unhashable: the plan reports it
        key = entry = None
    if entry is not None:
        plan = entry[0]
    else:
        plan = NormPlan(grads, topology, known, keys=keys)
        if key is None or plan.problems:
            return plan
        _remember(_plans, key, meshes, plan)
    if by_specs is not None:
        _remember(_by_specs, *by_specs, plan)
    return plan


def _remember(cache: dict, key: Hashable, referents: Sequence[object], plan: NormPlan) -> None:
    """``cache[key] = plan`` until one of ``referents`` is freed: they are in ``key`` by id and
    not kept alive (a mesh holds the user's process groups), so a new object at a freed one's
    address cannot match.  At most MAX_PLANS entries: the oldest goes (hashing a key again to
    keep LRU order costs)."""
    forget = lambda _, key=key: cache.pop(key, None)  # noqa: E731
    cache[key] = (plan, [weakref.ref(referent, forget) for referent in referents])
    if len(cache) > MAX_PLANS:
        del cache[next(iter(cache))]


def clear_plans() -> None:
    """Forget every cached plan (and the process groups and meshes they hold)."""
    _plans.clear()
    _by_specs.clear()


def _specs_key(
    grads: Sequence[Tensor], topology: Topology, known: Mapping[int, Attribution | OwnershipError] | None
) -> tuple[Hashable, list[DTensorSpec]] | None:
    """A cheaper key when every gradient is a DTensor (FSDP2, tensor parallel): their specs by
    identity, with their local tensors' layout, all from C-level maps.  A spec stands for its
    mesh, placements and global shape because torch never changes one in place (a DTensor whose
    layout changes gets a new spec; FSDP2 gives every step's gradient of a parameter the same
    one).  None where it does not apply (plain tensors, FSDP1, a ``replica_group`` callable)."""
    if not grads or known or topology.replica_of is not None or set(map(type, grads)) != {DTensor}:
        return None
    specs = list(map(_spec, grads))
    local = list(map(_local, grads))
    key = (
        topology,
        current_accelerator(),
        tuple(map(id, specs)),
        tuple(map(Tensor.numel, local)),
        tuple(map(Tensor.dim, local)),
        tuple(map(_dtype, local)),
        tuple(map(_device, local)),
        tuple(map(type, local)),
    )
    return key, list({id(spec): spec for spec in specs}.values())


def _plan_key(
    grads: Sequence[Tensor],
    topology: Topology,
    known: Mapping[int, Attribution | OwnershipError] | None,
    keys: Sequence[Tensor] | None,
) -> tuple[Hashable | None, list[DeviceMesh]]:
    if known and any(isinstance(a, OwnershipError) for a in known.values()):
        return None, []
    types = tuple(map(type, grads))
    meshes: dict[int, DeviceMesh] = {}
    if any(issubclass(kind, DTensor) for kind in set(types)):
        layout: tuple = tuple(
            _dtensor_layout(grad, meshes) if isinstance(grad, DTensor) else _tensor_layout(grad) for grad in grads
        )
    else:  # per attribute a map over the list: the common case, kept in C
        layout = (
            tuple(map(Tensor.numel, grads)),
            tuple(map(Tensor.dim, grads)),
            tuple(map(_dtype, grads)),
            tuple(map(_device, grads)),
        )
    copy_groups = None
    if topology.replica_of is not None:
        try:
            returned = tuple(map(topology.replica_of, grads if keys is None else keys))
        except ValueError:  # reported by the ownership pass, through the reduction: no plan kept
            return None, []
        # A 1-D mesh stands for its process group (the same ranks): the key keeps no mesh alive.
        as_group = {id(g): g.get_group() if isinstance(g, DeviceMesh) and g.ndim == 1 else g for g in returned}
        copy_groups = tuple(as_group[id(g)] for g in returned)
    return (
        topology,
        current_accelerator(),
        types,
        layout,
        tuple(sorted(known.items())) if known else (),
        copy_groups,
    ), list(meshes.values())


def _tensor_layout(grad: Tensor) -> tuple:
    return (grad.numel(), grad.dim(), grad.dtype, grad.device)


def _dtensor_layout(grad: DTensor, meshes: dict[int, DeviceMesh]) -> tuple:
    # Through the spec and the local tensor: DTensor's own numel()/dim() dispatch in Python.
    spec, local = grad._spec, grad._local_tensor
    meshes[id(spec.mesh)] = spec.mesh
    return (id(spec.mesh), spec.placements, spec.shape, local.numel(), local.dim(), local.dtype, local.device, type(local))
