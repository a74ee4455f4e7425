"""Ownership: which gradient elements this rank counts, so that every element is counted once.

The rule.  A DTensor gradient's elements are split among the ranks of its mesh as its
placements say: along a ``Shard`` (or FSDP2's ``_StridedShard``) mesh dim every rank holds
different elements, along a ``Replicate`` dim the ranks hold copies.  A plain tensor is a DTensor
on a one-rank mesh.  Outside its mesh, the copies follow from the mesh and ``replica_group``
together.  The root DeviceMesh (for a standalone mesh, `group`'s rank order) is cut into sibling
slices, translates of the tensor's mesh; in each, the *counterparts* are the positions holding
this rank's shard.  For each sibling slice S, let ``linked`` be the ranks of ``replica_group`` in S:

- none: S holds no copy (another pipeline stage, or no data parallelism);
- a counterpart among them: every counterpart in S is a copy.  ``replica_group`` links S to this
  slice, the placements say which ranks of S hold this shard: a ``Replicate`` DTensor on a
  pipeline stage's tp mesh, with the dp group as ``replica_group``, is copied over dp x tp; a
  LayerNorm left out of TP that sits on the dp sub-mesh, with the tp group, across tp.  Linked
  ranks holding other shards are told apart by the placements, as inside the mesh itself (the
  default ``replica_group``, all of `group`, links every rank of every slice);
- only ranks holding other shards: S is linked, but to none of the ranks of this shard, so which
  ranks hold copies is ambiguous: an OwnershipError (UNKNOWN_CORRESPONDENCE).

Ranks of ``replica_group`` inside the tensor's own mesh change nothing: the placements say it.
Every member of a copy set derives the same set locally when ``replica_group`` is the same
group up to translation across the mesh (the dp group of each tp rank); where it is not, the
members disagree about the set, which the copy check in the all-reduce finds.

So every local tensor has a *copy set*: the ranks holding a bitwise identical copy of it.
Instead of each copy doing the same norm work, the copies split it: the tensors sharing a copy
set are laid end to end and each member takes an equal, contiguous range of elements.  Every
member computes the same split from the same ordered tensor list, so no communication is needed.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import torch
from torch import Tensor
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate
from torch.distributed.tensor.placement_types import Placement

from distclip.copygroups import check_copy_group, tensor_topology
from distclip.problems import OwnershipError, Problem
from distclip.topology import Topology
from distclip.torch_internals import mesh_layout, root_mesh


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


def check_within_group(ranks: Sequence[int], topology: Topology) -> None:
    """Raise OwnershipError if a gradient is sharded or replicated over ranks outside `group`:
    their part of it would never reach the reduction."""
    outside = sorted(set(ranks) - topology.group_set)
    if outside:
        raise OwnershipError(
            Problem.MESH_OUTSIDE_GROUP,
            f"ranks {outside} of {list(ranks)} are not in `group` {list(topology.group_ranks)}",
        )


def shard_copy_set(
    shard_group: list[int], same_shard: list[int], rank_space: list[int], topology: Topology
) -> tuple[int, ...]:
    """Copies of this rank's shard, for a tensor sharded over ``shard_group``.

    ``shard_group`` lists the ranks of the tensor's mesh (or process group) in position order;
    ``same_shard`` the positions that hold the same elements as this rank (its *counterparts*).
    A sibling slice of ``shard_group`` in ``rank_space`` (the root mesh, or `group`'s order) with
    a counterpart in ``replica_group`` is linked to this slice: all its counterparts are copies.
    One with ranks of ``replica_group`` at other positions only is ambiguous (OwnershipError).
    """
    check_within_group(shard_group, topology)
    copies = {shard_group[i] for i in same_shard}
    replicas = set(topology.replica_ranks)
    if replicas <= set(shard_group):
        return tuple(sorted(copies))  # no copies outside the mesh (FSDP, HSDP, a PP stage's mesh)

    try:
        slices = _parallel_slices(shard_group, rank_space)
    except (KeyError, ValueError):
        slices = []
    if shard_group not in slices:
        raise OwnershipError(
            Problem.UNKNOWN_CORRESPONDENCE,
            f"{shard_group} is not a slice of a mesh spanning `replica_group` {sorted(replicas)}",
        )
    for sibling in slices:
        if sibling == shard_group:
            continue
        linked = replicas.intersection(sibling)
        counterparts = {sibling[i] for i in same_shard}
        if linked and linked.isdisjoint(counterparts):
            raise OwnershipError(
                Problem.UNKNOWN_CORRESPONDENCE,
                f"`replica_group` {sorted(replicas)} links ranks {sorted(linked)} of the slice "
                f"{sibling} to this rank, but none of the ranks {sorted(counterparts)} holding "
                f"this rank's shard there (a tensor sharded over {shard_group})",
            )
        if linked:
            copies.update(counterparts)
    return tuple(sorted(copies))


# Copy sets per root mesh, by identity, each dropped when its root is freed: a cache that held
# meshes would also hold their process groups (and each gloo group's threads) for the life of the
# process, and a dict keyed by meshes would compare equal meshes rank by rank.
_COPY_SETS: dict[int, dict] = {}


def _copy_sets_of(root: DeviceMesh) -> dict:
    key = id(root)
    if key not in _COPY_SETS:
        _COPY_SETS[key] = {}
        weakref.finalize(root, _COPY_SETS.pop, key, None)
    return _COPY_SETS[key]


def _mesh_key(mesh: DeviceMesh) -> object:
    """What tells ``mesh`` apart among the meshes of its root: its layout there.  Not the mesh
    itself: FSDP2 gives every parameter a mesh object of its own, and comparing two equal meshes
    compares their rank maps, a cost in the world size for every gradient."""
    layout = mesh_layout(mesh)  # None on older torch: then compare the mesh
    return mesh if layout is None else (layout, mesh.mesh_dim_names)


def _dtensor_copy_set(
    mesh: DeviceMesh, placements: tuple[Placement, ...], topology: Topology
) -> tuple[int, ...]:
    cached = _copy_sets_of(root_mesh(mesh))
    key = (_mesh_key(mesh), placements, topology)
    if key not in cached:
        cached[key] = _compute_dtensor_copy_set(mesh, placements, topology)
    return cached[key]


def _compute_dtensor_copy_set(
    mesh: DeviceMesh, placements: tuple[Placement, ...], topology: Topology
) -> tuple[int, ...]:
    if any(p.is_partial() for p in placements):
        raise OwnershipError(Problem.PARTIAL_PLACEMENT, f"placements {placements} on {mesh}")
    mesh_ranks = mesh.mesh.flatten().tolist()
    # Positions in the mesh that hold the same shard as this rank: vary the Replicate dims only.
    coordinate = mesh.get_coordinate()
    same_shard = tuple(
        slice(None) if isinstance(p, Replicate) else c for p, c in zip(placements, coordinate)
    )
    positions = torch.arange(len(mesh_ranks)).reshape(mesh.mesh.shape)[same_shard]
    replicas = set(topology.replica_ranks)
    if replicas <= set(mesh_ranks):
        rank_space = mesh_ranks  # no copies outside the mesh: no sibling slices to line up
    else:
        # Sibling slices line up through the root mesh, or, for a standalone mesh, through `group`.
        root_ranks = root_mesh(mesh).mesh.flatten().tolist()
        rank_space = root_ranks if replicas <= set(root_ranks) else list(topology.group_ranks)
    return shard_copy_set(mesh_ranks, positions.flatten().tolist(), rank_space, topology)


@dataclass(frozen=True)
class Attribution:
    """How one local gradient tensor relates to the model.

    ``copies``: the sorted ranks (this one included) holding a bitwise copy of it.
    ``ranges``: the ``(start, stop)`` ranges of its flattened elements that are model elements;
    None means all of them (FSDP1 flat gradients also hold alignment and tail padding).
    ``outside_mesh``: a DTensor whose mesh does not hold this rank, so that this rank holds
    none of it (its local tensor is empty) and counts nothing of it.
    """

    copies: tuple[int, ...]
    ranges: tuple[tuple[int, int], ...] | None = None
    outside_mesh: bool = False


def attribute(grad: Tensor, topology: Topology) -> Attribution:
    """The Attribution of a DTensor or plain gradient.  Raises OwnershipError."""
    if local_tensor(grad).layout != torch.strided:
        raise OwnershipError(Problem.NOT_DENSE, f"layout {local_tensor(grad).layout}")
    if isinstance(grad, DTensor):
        if grad.device_mesh.get_coordinate() is None:  # the mesh leaves out this rank: nothing here
            return Attribution((topology.rank,), ((0, 0),), outside_mesh=True)
        return Attribution(_dtensor_copy_set(grad.device_mesh, tuple(grad.placements), topology))
    return Attribution(topology.replica_ranks)


Segment = tuple[int, int, int]  # (tensor index, start, stop) in the flattened local tensor


def split_work(segments: Sequence[Segment], copy_sets: Sequence[tuple[int, ...]], rank: int) -> list[Segment]:
    """The element ranges this rank counts.

    Segments with the same copy set are laid end to end, in the given order, and member ``i`` of
    ``k`` takes elements ``[i*N//k, (i+1)*N//k)``: balanced by numel, at most two segments cut
    per member, deterministic, and the same on every member given the same ordered list.
    """
    buckets: dict[tuple[int, ...], list[Segment]] = {}
    for segment, members in zip(segments, copy_sets):
        buckets.setdefault(members, []).append(segment)

    owned: list[Segment] = []
    for members, bucket in buckets.items():
        if len(members) == 1:
            owned.extend(s for s in bucket if s[2] > s[1])
            continue
        total = sum(stop - start for _, start, stop in bucket)
        me, copies = members.index(rank), len(members)
        lo, hi = total * me // copies, total * (me + 1) // copies
        offset = 0
        for index, start, stop in bucket:
            first, last = max(lo, offset), min(hi, offset + stop - start)
            if first < last:
                owned.append((index, start + first - offset, start + last - offset))
            offset += stop - start
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

    ``owned`` holds ``(tensor index, start, stop)`` ranges into the local tensors (empty ranges
    never appear, so an inf-norm never sees an empty shard); ``problems`` maps each problem
    found on this rank to a detail message (the first gradient that has it).  ``owned`` and
    ``copy_buckets`` cover the gradients that could be attributed (what ``explain`` shows; a
    NormPlan with problems counts nothing).
    """

    owned: list[Segment]
    problems: dict[Problem, str] = field(default_factory=dict)
    copy_buckets: dict[tuple[int, ...], list[Segment]] = field(default_factory=dict)
    """The segments of each copy set of more than one rank, in order (what the copy check
    fingerprints)."""
    attributions: list[Attribution | OwnershipError] = field(default_factory=list)
    """Per gradient, its Attribution, or the error that kept it from having one."""


def plan_ownership(
    grads: Sequence[Tensor],
    topology: Topology,
    known: Mapping[int, Attribution | OwnershipError] | None = None,
    keys: Sequence[Tensor] | None = None,
) -> Ownership:
    """Attribute every element of ``grads`` (this rank's gradients) to exactly one rank.

    ``known`` gives the Attribution of gradients whose layout the tensor alone does not tell
    (FSDP1 flat gradients, by index; an OwnershipError where that failed); the others are
    attributed by :func:`attribute`, with the copy group a ``replica_group`` callable gives
    ``keys[i]`` (the parameters; the gradients themselves when None).
    """
    if topology.replica_of is None:  # one replica_group for all: checked once, not per tensor
        try:
            check_copy_group(topology.replica_ranks, topology, "replica_group")
        except OwnershipError as error:
            return Ownership([], {error.problem: error.detail}, attributions=[error] * len(grads))

    problems: dict[Problem, str] = {}
    attributions: list[Attribution | OwnershipError] = []
    segments: list[Segment] = []
    copy_sets: list[tuple[int, ...]] = []
    resolved: dict = {}
    for index, grad in enumerate(grads):
        try:
            attribution = known[index] if known and index in known else None
            if attribution is None:
                key = grad if keys is None else keys[index]
                attribution = attribute(grad, tensor_topology(key, topology, resolved))
            if isinstance(attribution, OwnershipError):
                raise attribution
        except OwnershipError as error:
            problems.setdefault(error.problem, f"gradient #{index}: {error.detail}")
            attributions.append(error)
            continue
        attributions.append(attribution)
        ranges = attribution.ranges or ((0, local_tensor(grad).numel()),)
        segments.extend((index, start, stop) for start, stop in ranges)
        copy_sets.extend(attribution.copies for _ in ranges)
    copy_buckets: dict[tuple[int, ...], list[Segment]] = {}
    for segment, members in zip(segments, copy_sets):
        if len(members) > 1:
            copy_buckets.setdefault(members, []).append(segment)
    return Ownership(split_work(segments, copy_sets, topology.rank), problems, copy_buckets, attributions)
