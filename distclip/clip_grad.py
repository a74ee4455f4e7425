"""The public functions: drop-in replacements for torch.nn.utils' clipping, made global.

The data flows: gradients -> ownership (who counts which element) -> local partials -> one
all-reduce -> global norm -> coefficient -> in-place scaling of every local gradient.
"""

from __future__ import annotations

import functools
from typing import Callable

import torch
from torch import Tensor, nn
from torch.distributed.tensor import DTensor

from distclip import layout
from distclip.gradients import Gradients, TensorOrTensors, as_list, collect
from distclip.ownership import local_tensor
from distclip.partial import reduce_partial_gradients_
from distclip.partials import PNorm
from distclip.plan import NormPlan
from distclip.plancache import cached_plan
from distclip.reduction import failed_contribution, raise_pending, reduce_and_raise
from distclip.scaling import check_max_norm, clip_coefficient, scale_
from distclip.topology import GroupLike, ReplicaGroupLike, Topology, reduction_device, resolve_topology

_NONFINITE_MESSAGE = (
    "The total norm of order {} for gradients from `parameters` is non-finite, so it cannot be "
    "clipped. To disable this error and scale the gradients by the non-finite norm anyway, set "
    "`error_if_nonfinite=False`"
)


def _global_norm(
    gather: Callable[[], tuple[Gradients, list[Tensor] | None]],
    pnorm: PNorm,
    error_if_nonfinite: bool,
    foreach: bool | None,
    topology: Topology,
) -> tuple[Tensor, Tensor, NormPlan | None, list[Tensor]]:
    """(total norm, invalid flag, plan, local tensors) for this rank's gradients: one collective.

    ``gather()`` collects the gradients and what a ``replica_group`` callable is asked about
    (the parameters; None: the gradients themselves).  Whatever raises before the collective
    (collecting, planning, computing the partials) still takes part in it, carrying the
    exception, so that every rank raises it together (:mod:`distclip.reduction`)."""
    raise_pending(topology)
    try:
        gradients, keys = gather()
        plan = cached_plan(gradients.grads, topology, gradients.known, keys)
        local = plan.local_tensors(gradients.grads)
        contribution = plan.contribution(local, pnorm, foreach)
    except Exception as error:
        device = reduction_device(topology, fallback=torch.device("cpu"))
        checks = layout.checks(layout.Layout(), [], device)
        plan, local, contribution = None, [], failed_contribution(error, 1, 0, checks, pnorm, device)
    reduced = reduce_and_raise(contribution, pnorm, topology)
    total = reduced.norms[0].to(device=plan.out_device, dtype=plan.out_dtype)
    # An invalid step's NaN is another rank's problem, raised at the next call (distclip.deferred).
    if error_if_nonfinite and bool((total.isnan() | total.isinf()) & ~reduced.invalid):
        raise RuntimeError(_NONFINITE_MESSAGE.format(pnorm.p))
    return total, reduced.invalid, plan, local


def _collect_parameters(parameters: TensorOrTensors, topology: Topology) -> tuple[Gradients, list[Tensor]]:
    """The parameters' gradients, Partial ones reduced in place first (:mod:`distclip.partial`)."""
    gradients = collect(parameters, topology)
    reduce_partial_gradients_(gradients.grads, gradients.params)
    return gradients, gradients.params


@torch.no_grad()
def get_total_norm(
    tensors: TensorOrTensors,
    norm_type: float = 2.0,
    error_if_nonfinite: bool = False,
    foreach: bool | None = None,
    *,
    group: GroupLike = None,
    replica_group: ReplicaGroupLike = None,
) -> Tensor:
    r"""The global norm of gradient tensors spread over the ranks of ``group``.

    .. math::
        \|g\|_p = \Big(\sum_{\text{ranks } r} \sum_{x \text{ owned by } r} |x|^p\Big)^{1/p}

    with every element of the model owned by exactly one rank (see :mod:`distclip.ownership`):
    DTensor shards are distinct, ``Replicate`` mesh dims and ranks of ``replica_group`` outside
    the mesh hold copies whose work is split among them, other ranks of ``group`` hold other
    tensors.  ``inf``/``-inf`` take the max/min of ``|x|``, ``0`` counts nonzeros.

    Args:
        tensors: gradient tensors (plain or DTensor, on any devices and dtypes), a Tensor, or
            an ``nn.Module`` (its parameters, for parity with ``clip_grad_norm_``).
        norm_type: ``p``; any float but NaN, as in torch: ``0``, ``inf``/``'inf'``, ``-inf``
            and negative ``p`` (``(sum |x|**p) ** (1/p)``, 0 when any element is 0) included.
        error_if_nonfinite: raise RuntimeError on every rank if the global norm is NaN or
            infinite (this reads the norm on the host: the one device sync of this API).
        foreach: as in torch: None uses ``torch._foreach_norm`` where supported.
        group: ProcessGroup or 1-D DeviceMesh over which partials are summed.  Default: WORLD
            when ``torch.distributed`` is initialized, else no communication.
        replica_group: ranks across which plain gradients are identical copies.  Default: all of
            ``group`` (DDP).  A pipeline stage passes its data-parallel group.  Or a callable
            ``tensor -> ProcessGroup | 1-D DeviceMesh | None`` giving each one its own copy
            group (None: no copies), called with each gradient here and with each parameter by
            the other functions: Megatron/DeepSpeed-style models, see :mod:`distclip.copygroups`.

    Returns:
        The global norm: a 0-dim plain tensor, float32 (float64 if any gradient is float64), on
        the device of the first gradient (of the reduction when this rank has none), bitwise
        identical on every rank.  Exactly one all-reduce when the group has more than one rank.

    Raises:
        ValueError: unknown ``norm_type``; a DTensor on a mesh with ranks outside ``group``; a
            Partial placement; a ``replica_group`` (or a group its callable returns) without
            this rank or outside ``group``, or a callable returning something else; ranks assumed to hold
            copies (``replica_group``, ``Replicate`` dims) holding different tensors or values
            (found by the copy check, :mod:`distclip.copycheck`).  Problems found in a rank's
            gradients ride the one all-reduce, so all ranks raise together.
    """
    pnorm = PNorm.parse(norm_type)
    topology = resolve_topology(group, replica_group)

    def gather() -> tuple[Gradients, list[Tensor] | None]:
        if isinstance(tensors, nn.Module):
            return _collect_parameters(tensors, topology)
        return Gradients(as_list(tensors, "tensors"), []), None

    total, _, _, _ = _global_norm(gather, pnorm, error_if_nonfinite, foreach, topology)
    return total


@torch.no_grad()
def clip_grads_with_norm_(
    parameters: TensorOrTensors,
    max_norm: float,
    total_norm: Tensor,
    foreach: bool | None = None,
) -> None:
    r"""Scale every local gradient in place by ``min(max_norm / (total_norm + 1e-6), 1)``.

    No communication: ``total_norm`` must already be global (from :func:`get_total_norm`, maybe
    combined further by the caller).  A DTensor ``total_norm`` (torch's own FSDP2 result) is
    materialized with ``full_tensor()``.  Gradients that are DTensors are scaled through their
    local tensors.  A deliberate difference from torch: a NaN or infinite ``total_norm`` leaves
    the gradients untouched (torch multiplies them by NaN or 0), because on an accelerator a
    problem found on another rank comes back as a NaN norm, raised at the next call.
    """
    max_norm = check_max_norm(max_norm)
    if isinstance(total_norm, DTensor):
        total_norm = total_norm.full_tensor()
    grads = [local_tensor(p.grad) for p in as_list(parameters, "parameters") if p.grad is not None]
    if grads:
        # Unlike torch, a NaN or infinite norm leaves the gradients as they are: it may be another
        # rank's problem that this rank could not see without a device sync (distclip.deferred).
        scale_(grads, clip_coefficient(max_norm, total_norm, keep=~total_norm.isfinite()), foreach)


@torch.no_grad()
def clip_grad_norm_(
    parameters: TensorOrTensors,
    max_norm: float,
    norm_type: float = 2.0,
    error_if_nonfinite: bool = False,
    foreach: bool | None = None,
    *,
    group: GroupLike = None,
    replica_group: ReplicaGroupLike = None,
) -> Tensor:
    r"""Clip the gradients of a model split across ranks by its *global* norm, in place.

    Equivalent to :func:`get_total_norm` on the parameters' gradients followed by
    :func:`clip_grads_with_norm_` with the norm it returns: every gradient on every rank is
    multiplied by the same coefficient ``min(max_norm / (total_norm + 1e-6), 1)``.

    Args:
        parameters: an ``nn.Module``, a Tensor or any iterable of Tensors (a generator is
            consumed once and still clipped).  Parameters whose ``.grad`` is None are skipped.
        max_norm: the largest allowed global norm; must be >= 0.
        norm_type, error_if_nonfinite, foreach, group, replica_group: as in :func:`get_total_norm`.

    Returns:
        The global norm of the gradients *before* clipping (plain 0-dim tensor, identical on
        every rank).  No host-device sync unless ``error_if_nonfinite=True``.
    """
    max_norm = check_max_norm(max_norm)
    pnorm = PNorm.parse(norm_type)
    topology = resolve_topology(group, replica_group)
    gather = functools.partial(_collect_parameters, parameters, topology)
    total, invalid, plan, local = _global_norm(gather, pnorm, error_if_nonfinite, foreach, topology)
    # A problem reported by another rank that could not be raised here without a sync leaves
    # the gradients as they are rather than scaling them by NaN.
    coefficient = clip_coefficient(max_norm, total, keep=invalid)
    plan.scale_(local, coefficient, foreach)
    return total
