"""The private torch names distclip reads, in one place, each with the torch versions it was
checked on.

distclip reads a few private attributes and helpers of torch: where the public way costs a
Python-level dispatch per tensor on the hot path (``DTensor.to_local()`` runs an autograd
function, ``DTensor.placements`` builds a tuple), or where there is no public way at all.  Apart
from :mod:`distclip.fsdp1` (FSDP1 keeps its layout in private attributes only), every such read
goes through this module, so a torch release that renames one breaks here, in one place.

Checked on torch 2.13.0 (installed here and in CI); the branches for older releases follow
torch's source of those releases (the package requires torch >= 2.6).
"""

from __future__ import annotations

import operator

import torch
from torch import Tensor
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor._dtensor_spec import DTensorSpec
from torch.utils._foreach_utils import (
    _device_has_foreach_support,
    _group_tensors_by_device_and_dtype,
    _has_foreach_support,
)

__all__ = [
    "DTensorSpec",
    "LOCAL_TENSOR",
    "SPEC",
    "device_has_foreach_support",
    "flatten_dense_tensors",
    "group_tensors_by_device_and_dtype",
    "has_foreach_support",
    "mesh_layout",
    "root_mesh",
    "storage_owner",
    "takes_grad_scale",
    "unflatten_dense_tensors",
    "version",
]

# DTensor._local_tensor / DTensor._spec (torch 2.0-2.13): this rank's tensor and the layout
# (mesh, placements, global shape) without DTensor's dispatch; a spec is never changed in place.
LOCAL_TENSOR = operator.attrgetter("_local_tensor")
SPEC = operator.attrgetter("_spec")

# torch.utils._foreach_utils (torch 2.0-2.13; what torch's own clip_grad_norm_ uses): whether a
# list of tensors can take the foreach kernels, and their grouping by (device, dtype).
has_foreach_support = _has_foreach_support
device_has_foreach_support = _device_has_foreach_support
group_tensors_by_device_and_dtype = _group_tensors_by_device_and_dtype

# torch._utils (torch 1.x-2.13; what DDP's and FSDP's bucketing use): many tensors copied into
# one flat tensor by one C++ call, and views of it back in their shapes.
flatten_dense_tensors = _flatten_dense_tensors
unflatten_dense_tensors = _unflatten_dense_tensors


def root_mesh(mesh: DeviceMesh) -> DeviceMesh:
    """The DeviceMesh ``mesh`` was sliced (or flattened) from: ``_get_root_mesh()`` (torch 2.9-
    2.13), ``_mesh_resources.get_root_mesh`` before (2.6-2.8)."""
    if hasattr(mesh, "_get_root_mesh"):
        return mesh._get_root_mesh()
    from torch.distributed.device_mesh import _mesh_resources

    return _mesh_resources.get_root_mesh(mesh)


def mesh_layout(mesh: DeviceMesh) -> object | None:
    """``mesh``'s layout within its root (``_layout``, torch 2.9-2.13), a cheap key among the
    meshes of one root; None where torch has none (then compare the meshes)."""
    return getattr(mesh, "_layout", None)


def takes_grad_scale(optimizer: torch.optim.Optimizer) -> bool:
    """Whether ``optimizer``'s step applies GradScaler's ``grad_scale``/``found_inf`` itself
    (``_step_supports_amp_scaling``, set by fused Adam, AdamW and SGD: torch 1.13-2.13)."""
    return bool(getattr(optimizer, "_step_supports_amp_scaling", False))


def version(tensor: Tensor) -> int:
    """The version counter torch bumps on every in-place write (``_version``, torch 1.x-2.13;
    shared by views and their base)."""
    return tensor._version


def storage_owner(tensor: Tensor) -> Tensor:
    """The tensor whose storage ``tensor`` is: its base for a view (``_base``, torch 1.x-2.13)."""
    return tensor._base if tensor._base is not None else tensor
