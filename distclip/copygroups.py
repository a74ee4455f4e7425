"""Per-parameter copy groups: the ranks holding copies of each plain gradient, one group each.

The rule.  A parameter's *copy group* is the set of ranks whose gradient for it is a bitwise
copy of this rank's.  A single ``replica_group`` gives every plain gradient the same one (DDP:
all ranks; a pipeline stage: its data-parallel group).  Megatron- and DeepSpeed-style models
keep plain tensors with several kinds of copies at once, so ``replica_group`` may instead be a
callable ``parameter -> ProcessGroup | 1-D DeviceMesh | None``:

- a tensor-parallel *split* weight (Column/RowParallelLinear): the data-parallel group;
- a tensor-parallel *duplicated* LayerNorm or bias: the data-parallel x tensor-parallel ranks;
- an expert weight: the expert-data-parallel group;
- a tied embedding held by the first and last pipeline stage: those stages' data-parallel
  ranks together (after the embedding group's all-reduce they hold one gradient);
- None: no copy anywhere (a one-rank group).

A callable that cannot tell raises ValueError: like every ownership problem it rides the one
all-reduce, so every rank raises it together, whichever ranks asked.

``get_total_norm`` calls it with each gradient tensor, the other functions with each
parameter.  A DTensor gradient keeps following its placements; its group plays the part of
``replica_group`` for copies outside its mesh.  The contract is the one of ``replica_group``:
the members of a copy group list the tensors they share in the same order (each member's
tensors with that group, in parameter order).  Copies split their norm work among themselves as
before, and every copy group rides the same single all-reduce, as does the copy check that
catches a group whose members hold different tensors.
"""

from __future__ import annotations

import torch.distributed as dist
from torch import Tensor

from distclip.problems import OwnershipError, Problem
from distclip.topology import Topology, as_process_group, is_non_member


def tensor_topology(key: Tensor, topology: Topology, resolved: dict | None = None) -> Topology:
    """The Topology whose ``replica_ranks`` are ``key``'s copy group.

    ``key`` is the parameter (or, for ``get_total_norm``, the gradient) the ``replica_group``
    callable is asked about.  Without a callable this is ``topology`` itself.  ``resolved``
    memoizes per returned group object (a model has a handful of groups and many parameters).
    Raises OwnershipError (REPLICA_GROUP_INVALID, REPLICA_GROUP_OUTSIDE_GROUP): what a callable
    returns may differ by rank, so it is reported through the reduction, not raised here.
    """
    if topology.replica_of is None:
        return topology
    try:
        returned = topology.replica_of(key)
    except ValueError as error:  # the callable's own verdict, raised on every rank together
        raise OwnershipError(Problem.REPLICA_GROUP_INVALID, str(error)) from None
    resolved = {} if resolved is None else resolved
    if id(returned) not in resolved:
        try:
            resolved[id(returned)] = (returned, _copy_group_topology(returned, topology))
        except OwnershipError as error:
            resolved[id(returned)] = (returned, error)
    outcome = resolved[id(returned)][1]  # the group is kept alongside so its id stays its own
    if isinstance(outcome, OwnershipError):
        raise outcome
    return outcome


def _copy_group_topology(returned: object, topology: Topology) -> Topology:
    if returned is None:
        ranks: tuple[int, ...] = (topology.rank,)
    elif is_non_member(returned):
        raise OwnershipError(
            Problem.REPLICA_GROUP_OUTSIDE_GROUP,
            f"rank {topology.rank}: the copy group is GroupMember.NON_GROUP_MEMBER (what "
            "new_group(ranks) returns to ranks outside `ranks`)",
        )
    else:
        try:
            ranks = tuple(dist.get_process_group_ranks(as_process_group(returned, "replica_group")))
        except ValueError as error:
            raise OwnershipError(Problem.REPLICA_GROUP_INVALID, str(error)) from None
    check_copy_group(ranks, topology, "copy group")
    return Topology(topology.process_group, topology.rank, topology.group_ranks, ranks)


def check_copy_group(ranks: tuple[int, ...], topology: Topology, what: str) -> None:
    """Raise OwnershipError(REPLICA_GROUP_OUTSIDE_GROUP) unless ``ranks`` (a ``replica_group``,
    or the copy group a callable returned) hold this rank and lie within ``group``."""
    if topology.rank not in ranks or not topology.group_set.issuperset(ranks):
        raise OwnershipError(
            Problem.REPLICA_GROUP_OUTSIDE_GROUP,
            f"rank {topology.rank}: {what} {list(ranks)}, group {list(topology.group_ranks)}",
        )
