"""Ownership: which gradient elements this rank counts, so that every element is counted once.

The rule.  A DTensor gradient's elements are split among the ranks of its mesh as its
placements say: along a ``Shard`` (or FSDP2's ``_StridedShard``) mesh dim every rank holds
different elements, along a ``Replicate`` dim the ranks hold copies.  A plain tensor is a DTensor
on a one-rank mesh.  Outside its mesh, the corresponding tensor on another rank (found through
the root DeviceMesh: the same position in a parallel slice of the root) is a copy when that rank
is in ``replica_group`` (DDP; a LayerNorm left out of TP that sits on the dp sub-mesh is copied
across tp) and a different tensor otherwise (another pipeline stage).

So every local tensor has a *copy set*: the ranks holding a bitwise identical copy of it.
Instead of each copy doing the same norm work, the copies split it: the tensors sharing a copy
set are laid end to end and each member takes an equal, contiguous range of elements.  Every
member computes the same split from the same ordered tensor list, so no communication is needed.
"""

from __future__ import annotations

import enum
import functools
from dataclasses import dataclass, field
from typing import Sequence

import torch
from torch import Tensor
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate
from torch.distributed.tensor.placement_types import Placement

from distclip.topology import Topology


class Problem(enum.Enum):
    """Bad input found in a rank's own gradients.

    Such a problem may be visible on some ranks only (a pipeline stage), so it is not raised on
    the spot: it rides the single all-reduce as a flag and every rank raises it together.
    """

    MESH_OUTSIDE_GROUP = "a DTensor gradient lives on a DeviceMesh that holds ranks outside `group`"
    PARTIAL_PLACEMENT = (
        "a DTensor gradient has a Partial placement (a pending reduction); its norm is not defined "
        "until it is reduced: redistribute it to Shard/Replicate before clipping"
    )
    REPLICA_GROUP_OUTSIDE_GROUP = "`replica_group` must contain this rank and lie within `group`"
    UNKNOWN_CORRESPONDENCE = (
        "cannot tell which ranks hold copies of a DTensor gradient: `replica_group` reaches ranks "
        "outside its mesh that no common root DeviceMesh (or `group`) lines up with it"
    )


class OwnershipError(Exception):
    def __init__(self, problem: Problem, detail: str) -> None:
        super().__init__(detail)
        self.problem = problem
        self.detail = detail


def _root_mesh(mesh: DeviceMesh) -> DeviceMesh:
    if hasattr(mesh, "_get_root_mesh"):  # torch >= 2.9
        return mesh._get_root_mesh()
    from torch.distributed.device_mesh import _mesh_resources

    return _mesh_resources.get_root_mesh(mesh)


def _parallel_slices(mesh_ranks: list[int], rank_space: list[int]) -> list[list[int]]:
    """Cut ``rank_space`` into translates of the sub-mesh ``mesh_ranks`` (same position order).

    A sub-mesh sliced (or flattened) out of a root mesh is an affine pattern of positions in the
    root; its sibling slices are the same pattern at other offsets.  The smallest position not yet
    covered always starts the next slice.  Raises ValueError if the pattern does not tile.
    """
    position = {r: i for i, r in enumerate(rank_space)}
    offsets = [position[r] for r in mesh_ranks]
    lowest = min(offsets)
    pattern = [o - lowest for o in offsets]
    taken = [False] * len(rank_space)
    slices = []
    for base in range(len(rank_space)):
        if taken[base]:
            continue
        indices = [base + d for d in pattern]
        if any(i >= len(rank_space) or taken[i] for i in indices):
            raise ValueError("the mesh does not tile its rank space")
        for i in indices:
            taken[i] = True
        slices.append([rank_space[i] for i in indices])
    return slices


@functools.lru_cache(maxsize=4096)
def _dtensor_copy_set(
    mesh: DeviceMesh, placements: tuple[Placement, ...], topology: Topology
) -> tuple[int, ...]:
    mesh_ranks_nd = mesh.mesh
    mesh_ranks = mesh_ranks_nd.flatten().tolist()
    outside = sorted(set(mesh_ranks) - set(topology.group_ranks))
    if outside:
        raise OwnershipError(
            Problem.MESH_OUTSIDE_GROUP,
            f"{mesh} holds ranks {outside} that are not in `group` {list(topology.group_ranks)}",
        )
    if any(p.is_partial() for p in placements):
        raise OwnershipError(Problem.PARTIAL_PLACEMENT, f"placements {placements} on {mesh}")

    # Positions in the mesh that hold the same shard as this rank: vary the Replicate dims only.
    coordinate = mesh.get_coordinate()
    same_shard = tuple(
        slice(None) if isinstance(p, Replicate) else c for p, c in zip(placements, coordinate)
    )
    positions = torch.arange(len(mesh_ranks)).reshape(mesh_ranks_nd.shape)[same_shard]
    positions = positions.flatten().tolist()
    copies = {mesh_ranks[i] for i in positions}

    replicas = set(topology.replica_ranks)
    if replicas <= set(mesh_ranks):
        return tuple(sorted(copies))  # no copies outside the mesh (FSDP, HSDP, a PP stage's mesh)

    # Ranks of replica_group outside the mesh: line the sibling slices up through the root mesh
    # (or, for a standalone mesh, through the order of `group`).
    root_ranks = _root_mesh(mesh).mesh.flatten().tolist()
    rank_space = root_ranks if replicas <= set(root_ranks) else list(topology.group_ranks)
    try:
        slices = _parallel_slices(mesh_ranks, rank_space)
    except ValueError:
        slices = []
    if mesh_ranks not in slices:
        raise OwnershipError(
            Problem.UNKNOWN_CORRESPONDENCE,
            f"{mesh} is not a slice of a mesh spanning `replica_group` {sorted(replicas)}",
        )
    for sibling in slices:
        if sibling == mesh_ranks:
            continue
        counterparts = [sibling[i] for i in positions]
        in_replicas = [r in replicas for r in counterparts]
        if any(in_replicas) and not all(in_replicas):
            raise OwnershipError(
                Problem.UNKNOWN_CORRESPONDENCE,
                f"`replica_group` {sorted(replicas)} holds only part of the ranks {counterparts} "
                f"that share a shard of a gradient on {mesh}",
            )
        if all(in_replicas):
            copies.update(counterparts)
    return tuple(sorted(copies))


def copy_set(grad: Tensor, topology: Topology) -> tuple[int, ...]:
    """The sorted global ranks (this rank included) holding a copy of ``grad``'s local data.

    Raises OwnershipError for a gradient whose elements cannot be attributed.
    """
    if isinstance(grad, DTensor):
        return _dtensor_copy_set(grad.device_mesh, tuple(grad.placements), topology)
    return topology.replica_ranks


def split_work(
    numels: Sequence[int], copy_sets: Sequence[tuple[int, ...]], rank: int
) -> list[tuple[int, int, int]]:
    """The element ranges ``(tensor index, start, stop)`` this rank counts.

    Tensors with the same copy set are laid end to end, in the given order, and member ``i`` of
    ``k`` takes elements ``[i*N//k, (i+1)*N//k)``: balanced by numel, at most two tensors cut per
    member, deterministic, and the same on every member given the same ordered list.
    """
    buckets: dict[tuple[int, ...], list[int]] = {}
    for index, members in enumerate(copy_sets):
        buckets.setdefault(members, []).append(index)

    owned: list[tuple[int, int, int]] = []
    for members, indices in buckets.items():
        if len(members) == 1:
            owned.extend((i, 0, numels[i]) for i in indices if numels[i] > 0)
            continue
        total = sum(numels[i] for i in indices)
        me, copies = members.index(rank), len(members)
        lo, hi = total * me // copies, total * (me + 1) // copies
        offset = 0
        for i in indices:
            start, stop = max(lo, offset), min(hi, offset + numels[i])
            if start < stop:
                owned.append((i, start - offset, stop - offset))
            offset += numels[i]
            if offset >= hi:
                break
    owned.sort()
    return owned


def local_tensor(grad: Tensor) -> Tensor:
    """The plain tensor behind ``grad`` on this rank (DTensor dispatch is never needed here)."""
    return grad.to_local() if isinstance(grad, DTensor) else grad


@dataclass
class Ownership:
    """What this rank counts of a list of gradients.

    ``owned`` holds ``(tensor index, start, stop)`` ranges into ``local_tensors`` (empty ranges
    and empty tensors never appear, so an inf-norm never sees an empty shard); ``problems`` maps
    each problem found on this rank to a detail message.
    """

    owned: list[tuple[int, int, int]]
    problems: dict[Problem, str] = field(default_factory=dict)

    def pieces(self, local_tensors: Sequence[Tensor]) -> list[Tensor]:
        """The owned ranges as tensors: whole tensors where owned whole, else flat views."""
        pieces = []
        for index, start, stop in self.owned:
            tensor = local_tensors[index]
            if start == 0 and stop == tensor.numel():
                pieces.append(tensor)
            else:
                pieces.append(tensor.reshape(-1)[start:stop])
        return pieces


def plan_ownership(grads: Sequence[Tensor], topology: Topology) -> Ownership:
    """Attribute every element of ``grads`` (this rank's gradients) to exactly one rank."""
    problems: dict[Problem, str] = {}
    replicas = topology.replica_ranks
    if topology.rank not in replicas or not set(replicas) <= set(topology.group_ranks):
        problems[Problem.REPLICA_GROUP_OUTSIDE_GROUP] = (
            f"rank {topology.rank}: replica_group {list(replicas)}, group {list(topology.group_ranks)}"
        )
        return Ownership([], problems)

    copy_sets = []
    for index, grad in enumerate(grads):
        try:
            copy_sets.append(copy_set(grad, topology))
        except OwnershipError as error:
            problems.setdefault(error.problem, f"gradient #{index}: {error.detail}")
            copy_sets.append((topology.rank,))
    if problems:
        return Ownership([], problems)
    numels = [local_tensor(g).numel() for g in grads]
    return Ownership(split_work(numels, copy_sets, topology.rank), problems)
