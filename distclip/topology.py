"""Who takes part: the process group that combines partials, the replica group, the reduction device.

``group`` is the set of ranks whose partial norms are summed into the global norm (every rank that
holds a piece of the model).  ``replica_group`` is the set of ranks across which *plain*
(non-DTensor) gradients are identical copies: all of ``group`` for DDP, a pipeline stage's
data-parallel group for PP, a one-rank group when nothing is replicated; or, for models whose
plain tensors are copied over different groups, a callable giving each parameter its own (see
:mod:`distclip.copygroups`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property, lru_cache
from typing import Callable, Union

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed.device_mesh import DeviceMesh

GroupLike = Union[dist.ProcessGroup, DeviceMesh, None]
ReplicaGroupLike = Union[GroupLike, Callable[[Tensor], GroupLike]]

# Backends that serve only CPU tensors natively; an accelerator tensor handed to them is staged
# through host memory, so the reduction vector stays on the CPU for them.
_HOST_BACKENDS = ("gloo", "mpi")


@dataclass(frozen=True)
class Topology:
    """The ranks one clipping call talks to, resolved once from ``group`` and ``replica_group``.

    ``process_group`` is None when there is nothing to communicate (``torch.distributed`` not
    initialized, or a one-rank group); then ``group_ranks == replica_ranks == (rank,)``.
    ``replica_of`` is the per-parameter ``replica_group`` callable, if one was given; then
    ``replica_ranks`` is only the fallback of nothing and each tensor gets its own Topology
    (:func:`distclip.copygroups.tensor_topology`).
    """

    process_group: dist.ProcessGroup | None
    rank: int
    group_ranks: tuple[int, ...]
    replica_ranks: tuple[int, ...]
    replica_of: Callable[[Tensor], GroupLike] | None = field(default=None, compare=False)

    @property
    def communicates(self) -> bool:
        return self.process_group is not None

    # A Topology keys the planner's caches for every gradient: its hash and rank set are taken
    # once, not for each gradient at a cost in the world size.
    @cached_property
    def _hash(self) -> int:
        return hash((self.process_group, self.rank, self.group_ranks, self.replica_ranks))

    def __hash__(self) -> int:
        return self._hash

    @cached_property
    def group_set(self) -> frozenset[int]:
        """``group_ranks`` as a set."""
        return frozenset(self.group_ranks)


@lru_cache(maxsize=64)
def _interned(ranks: tuple[int, ...]) -> tuple[int, ...]:
    """One tuple object per distinct rank tuple, so that equal Topologies (one per call) compare
    by identity in the planner's caches instead of rank by rank."""
    return ranks


def is_non_member(group: object) -> bool:
    """Whether ``group`` is what ``new_group(ranks)`` returns to a rank not in ``ranks``."""
    return type(group) is int and group == dist.GroupMember.NON_GROUP_MEMBER


def as_process_group(group: GroupLike, argument: str) -> dist.ProcessGroup:
    """The ProcessGroup of a ProcessGroup or 1-D DeviceMesh; ValueError naming ``argument``
    for anything else."""
    if isinstance(group, DeviceMesh):
        if group.ndim != 1:
            raise ValueError(
                f"distclip: `{argument}` must be a ProcessGroup or a 1-D DeviceMesh, "
                f"got a {group.ndim}-D DeviceMesh {group}; pass mesh[dim_name] instead"
            )
        return group.get_group()
    if not isinstance(group, dist.ProcessGroup):
        raise ValueError(
            f"distclip: `{argument}` must be a ProcessGroup, a 1-D DeviceMesh or None, "
            f"got {type(group).__name__}"
        )
    return group


def resolve_topology(group: GroupLike = None, replica_group: ReplicaGroupLike = None) -> Topology:
    """Resolve the ``group`` / ``replica_group`` arguments of the public functions.

    Raises ValueError at once (before any communication) for arguments that every rank passes
    alike: a group given while ``torch.distributed`` is not initialized, a rank calling with a
    group it is not a member of, a multi-dimensional mesh.  What a ``replica_group`` callable
    returns is checked per parameter, later, and travels as a problem (it may differ by rank).
    """
    initialized = dist.is_available() and dist.is_initialized()
    if not initialized:
        if group is not None or replica_group is not None:
            raise ValueError(
                "distclip: `group`/`replica_group` was given but torch.distributed is not initialized"
            )
        return Topology(None, 0, (0,), (0,))

    replica_of = None
    if callable(replica_group) and not isinstance(replica_group, (dist.ProcessGroup, DeviceMesh)):
        replica_of, replica_group = replica_group, None

    rank = dist.get_rank()
    if is_non_member(group):
        raise ValueError(
            f"distclip: rank {rank} called with a `group` it is not a member of "
            "(GroupMember.NON_GROUP_MEMBER, what new_group(ranks) returns to ranks outside `ranks`)"
        )
    process_group = as_process_group(
        group if group is not None else dist.group.WORLD, "group"
    )
    group_ranks = _interned(tuple(dist.get_process_group_ranks(process_group)))
    if rank not in group_ranks:
        raise ValueError(
            f"distclip: rank {rank} called with a `group` it is not a member of ({list(group_ranks)})"
        )
    if replica_of is not None:
        replica_ranks = (rank,)
    elif is_non_member(replica_group):
        # Not raised here: the other ranks are on their way into the collective.  No ranks at
        # all reads as REPLICA_GROUP_OUTSIDE_GROUP, which every rank raises together.
        replica_ranks = ()
    elif replica_group is None:
        replica_ranks = group_ranks
    else:
        replica_ranks = _interned(
            tuple(dist.get_process_group_ranks(as_process_group(replica_group, "replica_group")))
        )
    if len(group_ranks) == 1:
        process_group = None
    return Topology(process_group, rank, group_ranks, replica_ranks, replica_of)


def _backend_device_types(process_group: dist.ProcessGroup) -> dict[str, str]:
    """Map device type -> backend name, e.g. {'cpu': 'gloo', 'cuda': 'nccl'}."""
    config = dist.get_backend_config(process_group)
    if ":" not in config:  # older releases report just the backend name
        return {"cpu" if config in _HOST_BACKENDS else "cuda": config}
    return dict(entry.split(":", 1) for entry in config.split(","))


def current_accelerator() -> torch.device | None:
    """This process's current accelerator device (with its index), or None."""
    if hasattr(torch, "accelerator"):  # torch >= 2.6
        accelerator = torch.accelerator.current_accelerator()
        if accelerator is None:
            return None
        module = getattr(torch, accelerator.type)
        return torch.device(accelerator.type, module.current_device())
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return None


def reduction_device(topology: Topology, fallback: torch.device) -> torch.device:
    """The device the reduction vector lives on for the collective.

    Every rank of the group must pick the same device type, so the choice depends on the
    backend only, never on where this rank's gradients happen to live: an accelerator served by
    a native backend (NCCL, XCCL, ...) when there is one, else the CPU.  Gradients elsewhere (CPU
    offload, mixed devices) keep their partials local; only the small vector moves.
    Without communication, ``fallback`` (the gradients' own device) is used.
    """
    if not topology.communicates:
        return fallback
    served = _backend_device_types(topology.process_group)
    accelerator = current_accelerator()
    if accelerator is not None and served.get(accelerator.type, "gloo") not in _HOST_BACKENDS:
        return accelerator
    if "cpu" in served:
        return torch.device("cpu")
    raise ValueError(
        f"distclip: the backend of `group` ({dist.get_backend_config(topology.process_group)}) "
        f"serves no device available here ({'no accelerator' if accelerator is None else accelerator.type}), "
        "so no tensor can carry the norm; use a gloo group or one whose device is present"
    )
