"""Bad input found while planning, and how it travels.

A problem may be visible on some ranks only (a pipeline stage's gradients, a per-parameter copy
group), so it is never raised on the spot: it rides the single all-reduce as a flag (see
:mod:`distclip.reduction`) and every rank raises it together.
"""

from __future__ import annotations

import enum


class Problem(enum.Enum):
    """Bad input found in a rank's own gradients or arguments (COPIES_DIFFER and LAYOUTS_DIFFER
    are found by no rank alone: the checks in the all-reduce find them)."""

    MESH_OUTSIDE_GROUP = (
        "a gradient is sharded or replicated over ranks outside `group` (a DTensor's DeviceMesh, "
        "an FSDP1 process group)"
    )
    PARTIAL_PLACEMENT = (
        "a DTensor gradient has a Partial placement (a pending reduction) that distclip cannot "
        "reduce in place (given without its parameter, or to a placement other than Replicate, "
        "see distclip/partial.py); its norm is not defined until it is reduced: redistribute it "
        "to Shard/Replicate before clipping"
    )
    REPLICA_GROUP_OUTSIDE_GROUP = (
        "`replica_group` (or the group it returns for a parameter) must contain this rank and lie "
        "within `group` (new_group(ranks) returns GroupMember.NON_GROUP_MEMBER, no group, to the "
        "ranks outside `ranks`)"
    )
    REPLICA_GROUP_INVALID = (
        "a `replica_group` callable must return a ProcessGroup, a 1-D DeviceMesh or None for every "
        "parameter"
    )
    COPIES_DIFFER = (
        "ranks assumed to hold copies of the same gradients hold different ones (a different "
        "number of tensors, shapes, dtypes or values), so the norm would be wrong. Pipeline "
        "stages or other ranks holding different tensors? pass replica_group=<the data-parallel "
        "group> (a one-rank group without data parallelism). Gradients not yet synchronized "
        "(no_sync, gradient accumulation)? clip after the synchronizing backward"
    )
    NOT_DENSE = (
        "a gradient is not a dense (strided) tensor, e.g. the sparse gradient of "
        "nn.Embedding(sparse=True); torch's norm kernels take dense tensors only (torch's own "
        "clip_grad_norm_ fails on it too): use a dense gradient for that parameter"
    )
    INVALID_LOSS = "`loss` must be None or a 0-dim floating-point tensor (this rank's loss)"
    INVALID_METRIC = "`metrics` values must be 0-dim floating-point tensors"
    RAISED = "an exception was raised while planning the clip on some rank"
    LAYOUTS_DIFFER = (
        "ranks laid out their per-group norms or metrics differently, or passed metrics under "
        "other names or kinds than other ranks: the ranks that pass metrics must pass the same "
        "names of the same kinds (a rank may pass none)"
    )
    UNKNOWN_CORRESPONDENCE = (
        "cannot tell which ranks hold copies of a DTensor gradient: `replica_group` reaches ranks "
        "outside its mesh that no common root DeviceMesh (or `group`) lines up with it"
    )


class OwnershipError(Exception):
    """A gradient that cannot be attributed, with the Problem it is an instance of."""

    def __init__(self, problem: Problem, detail: str) -> None:
        super().__init__(detail)
        self.problem = problem
        self.detail = detail
