"""DTensors on a sub-mesh together with a ``replica_group``: copies are the union the two imply.

A pipeline stage with tensor parallelism keeps its DTensors on ``mesh["tp"]`` and passes its
data-parallel group as ``replica_group``: the mesh's placements say which ranks of the tp slice
hold copies (a ``Replicate`` dim), the replica group says which other tp slices are copies of
this one.  World 4 throughout, against the float64 reference of the full gradients; every rank's
copy sets (``explain``) must agree with the copy sets of the ranks they name.  A replica group
that links this rank only to ranks holding other shards, or that differs across the mesh, is
refused on every rank.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Replicate, Shard

import distclip
from models import NORM_TYPES, parameter
from reference import assert_same_on_all_ranks, clip_and_check, gather_objects


def _assert_copy_sets_consistent(parameters, replica_group) -> list[tuple[int, ...]]:
    """Every member of a copy set computed the same set: rank r names r' as a copy of a tensor
    iff r' names r, with the same members (what splitting the work among copies relies on).
    Collective over WORLD.  Returns this rank's copy sets."""
    mine = [row.copies for row in distclip.explain(parameters, replica_group=replica_group)]
    every = gather_objects(mine)
    for rank, copy_sets in enumerate(every):
        for index, copies in enumerate(copy_sets):
            assert rank in copies, (rank, index, copies)
            for other in copies:
                assert every[other][index] == copies, (
                    f"tensor #{index}: rank {rank} says copies {copies}, rank {other} says "
                    f"{every[other][index]}"
                )
    return mine


def _clip_every_norm_type(named_parameters, replica_group) -> list[dict]:
    """``clip_and_check`` for each p of NORM_TYPES, on gradients made afresh each time
    (``named_parameters()``: clipping changes them)."""
    return [
        clip_and_check(named_parameters(), norm_type, replica_group=replica_group)
        for norm_type in NORM_TYPES
    ]


def _assert_same_on_all_ranks_for_every_norm_type(results: list[list[dict]]) -> None:
    for per_norm_type in zip(*results):
        assert_same_on_all_ranks(list(per_norm_type))


def _tp_stage_with_dp_replicas():
    """(dp 2, tp 2): a Shard(0) and a Replicate() DTensor on mesh["tp"], a plain tensor split
    by tp rank, all copied over dp (replica_group=mesh["dp"])."""
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
    tp_rank = mesh["tp"].get_local_rank()

    def named_parameters():
        return [
            ("sharded", parameter((6, 5), mesh["tp"], [Shard(0)], seed=1)),
            ("replicated", parameter((7,), mesh["tp"], [Replicate()], seed=2)),
            (f"plain_tp{tp_rank}", parameter((3, 4), seed=10 + tp_rank)),
        ]

    copies = _assert_copy_sets_consistent([p for _, p in named_parameters()], mesh["dp"])
    dp_peers = tuple(mesh["dp"].mesh.tolist())
    assert copies == [dp_peers, (0, 1, 2, 3), dp_peers], (dist.get_rank(), copies)
    return _clip_every_norm_type(named_parameters, mesh["dp"])


def test_replicate_on_tp_mesh_with_dp_replica_group_is_copied_over_both(ranks):
    _assert_same_on_all_ranks_for_every_norm_type(ranks(4).run(_tp_stage_with_dp_replicas))


def _tp_stages_without_replicas():
    """(pp 2, tp 2): each stage holds its own tensors, a one-rank replica_group per rank."""
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("pp", "tp"))
    alone, _ = dist.new_subgroups(group_size=1)
    stage, tp_rank = mesh["pp"].get_local_rank(), mesh["tp"].get_local_rank()

    def named_parameters():
        seed = 100 * stage
        return [
            (f"sharded_s{stage}", parameter((6, 5), mesh["tp"], [Shard(0)], seed=seed + 1)),
            (f"replicated_s{stage}", parameter((7,), mesh["tp"], [Replicate()], seed=seed + 2)),
            (f"plain_s{stage}_tp{tp_rank}", parameter((3, 4), seed=seed + 10 + tp_rank)),
        ]

    copies = _assert_copy_sets_consistent([p for _, p in named_parameters()], alone)
    rank, tp_peers = dist.get_rank(), tuple(mesh["tp"].mesh.tolist())
    assert copies == [(rank,), tp_peers, (rank,)], (rank, copies)
    return _clip_every_norm_type(named_parameters, alone)


def test_tp_stages_with_one_rank_replica_groups_copy_only_within_tp(ranks):
    _assert_same_on_all_ranks_for_every_norm_type(ranks(4).run(_tp_stages_without_replicas))


def _tp_of_one_stages_with_dp_replicas():
    """(pp 2, dp 2, tp 1): each stage holds its own tensors on its one-rank tp mesh, copied over
    dp (replica_group=mesh["dp"]): of the three other tp slices only the dp peer is linked."""
    mesh = init_device_mesh("cpu", (2, 2, 1), mesh_dim_names=("pp", "dp", "tp"))
    stage = mesh["pp"].get_local_rank()

    def named_parameters():
        seed = 100 * stage
        return [
            (f"sharded_s{stage}", parameter((6, 5), mesh["tp"], [Shard(0)], seed=seed + 1)),
            (f"replicated_s{stage}", parameter((7,), mesh["tp"], [Replicate()], seed=seed + 2)),
            (f"plain_s{stage}", parameter((3, 4), seed=seed + 10)),
        ]

    copies = _assert_copy_sets_consistent([p for _, p in named_parameters()], mesh["dp"])
    dp_peers = tuple(mesh["dp"].mesh.tolist())
    assert copies == [dp_peers] * 3, (dist.get_rank(), copies)
    return _clip_every_norm_type(named_parameters, mesh["dp"])


def test_tp_slices_without_replica_group_ranks_hold_no_copies(ranks):
    _assert_same_on_all_ranks_for_every_norm_type(ranks(4).run(_tp_of_one_stages_with_dp_replicas))


def _dp_mesh_with_tp_replicas():
    """(dp 2, tp 2): a Replicate() and a Shard(0) DTensor on mesh["dp"] (a LayerNorm left out
    of TP), a plain tensor split by dp rank, all copied over tp (replica_group=mesh["tp"])."""
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
    dp_rank = mesh["dp"].get_local_rank()

    def named_parameters():
        return [
            ("replicated", parameter((7,), mesh["dp"], [Replicate()], seed=2)),
            ("sharded", parameter((5, 3), mesh["dp"], [Shard(0)], seed=1)),
            (f"plain_dp{dp_rank}", parameter((3, 4), seed=10 + dp_rank)),
        ]

    copies = _assert_copy_sets_consistent([p for _, p in named_parameters()], mesh["tp"])
    tp_peers = tuple(mesh["tp"].mesh.tolist())
    assert copies == [(0, 1, 2, 3), tp_peers, tp_peers], (dist.get_rank(), copies)
    return _clip_every_norm_type(named_parameters, mesh["tp"])


def test_replicate_on_dp_mesh_with_tp_replica_group_is_copied_over_both(ranks):
    _assert_same_on_all_ranks_for_every_norm_type(ranks(4).run(_dp_mesh_with_tp_replicas))


def _stage_ranks_as_replica_group():
    """(dp 2, tp 2) with replica_group = all four ranks (a stage's dp x tp): DTensors on
    mesh["tp"] and on mesh["dp"], a plain tensor copied everywhere.  Linked sibling slices hold
    replica_group ranks at every position, this shard's and the others'."""
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
    stage = dist.new_group(list(range(4)))

    def named_parameters():
        return [
            ("tp_sharded", parameter((6, 5), mesh["tp"], [Shard(0)], seed=1)),
            ("tp_replicated", parameter((7,), mesh["tp"], [Replicate()], seed=2)),
            ("dp_sharded", parameter((5, 3), mesh["dp"], [Shard(0)], seed=3)),
            ("dp_replicated", parameter((4,), mesh["dp"], [Replicate()], seed=4)),
            ("plain", parameter((3, 4), seed=5)),
        ]

    copies = _assert_copy_sets_consistent([p for _, p in named_parameters()], stage)
    dp_peers, tp_peers = tuple(mesh["dp"].mesh.tolist()), tuple(mesh["tp"].mesh.tolist())
    everyone = (0, 1, 2, 3)
    assert copies == [dp_peers, everyone, tp_peers, everyone, everyone], (dist.get_rank(), copies)
    return _clip_every_norm_type(named_parameters, stage)


def test_stage_ranks_as_replica_group_link_every_sibling_slice(ranks):
    _assert_same_on_all_ranks_for_every_norm_type(ranks(4).run(_stage_ranks_as_replica_group))


def _twisted_replica_group():
    """(dp 2, tp 2), Shard(0) on mesh["tp"], replica_group linking rank 0 with rank 3 (tp
    position 1 of the other slice, which holds the other shard): no copy of rank 0's shard is
    named, so the layout is ambiguous."""
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
    twisted, _ = dist.new_subgroups_by_enumeration([[0, 3], [1, 2]])
    grads = [parameter((6, 5), mesh["tp"], [Shard(0)], seed=1).grad]
    try:
        distclip.get_total_norm(grads, replica_group=twisted)
    except ValueError as error:
        return str(error)
    return None


def test_replica_group_linking_a_different_shard_is_refused_on_every_rank(ranks):
    errors = ranks(4).run(_twisted_replica_group)
    assert all(e is not None and "cannot tell which ranks hold copies" in e for e in errors), errors


def _replica_groups_not_alike_across_tp():
    """(dp 2, tp 2), a Replicate() DTensor on mesh["tp"]; tp rank 0 passes its dp group, tp rank
    1 a one-rank group.  Rank 0 finds the copies {0, 1, 2, 3}, rank 1 only {0, 1}: the members
    disagree about the set, which the copy check in the all-reduce reports."""
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
    unlike, _ = dist.new_subgroups_by_enumeration([[0, 2], [1], [3]])
    grads = [parameter((7,), mesh["tp"], [Replicate()], seed=2).grad]
    try:
        distclip.get_total_norm(grads, replica_group=unlike)
    except ValueError as error:
        return str(error)
    return None


def test_replica_groups_that_differ_across_the_mesh_are_refused_on_every_rank(ranks):
    errors = ranks(4).run(_replica_groups_not_alike_across_tp)
    assert all(e is not None and "hold different ones" in e for e in errors), errors
