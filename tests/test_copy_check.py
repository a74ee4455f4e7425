"""The copy contract checked inside the one collective: ranks assumed to hold copies that do not
raise the same ValueError on every rank, gradients untouched; ranks that do hold copies never
see a false alarm (every other distributed test checks that too, with exact norms)."""

import math

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Replicate, Shard

import distclip
from distclip.copycheck import PRIME, SLOTS, CopyCheck
from reference import collectives

NORMS = [2.0, 1.0, 0.0, math.inf, -math.inf]


def _stage(out_features: int, seed: int) -> list[nn.Parameter]:
    torch.manual_seed(seed)
    layer = nn.Linear(8, out_features)
    layer(torch.randn(4, 8)).square().sum().backward()
    return list(layer.parameters())


def _grads(params):
    return [p.grad.clone() for p in params]


def _stages_with_default_arguments(norm_type, same_shapes, stages_per_replica):
    """Pipeline stages (``stages_per_replica`` of them, the rest data-parallel replicas of them)
    called with the default ``replica_group``: the user forgot to pass the dp group."""
    stage = dist.get_rank() % stages_per_replica
    params = _stage(8 if same_shapes or stage == 0 else 4, seed=stage)
    before = _grads(params)
    with collectives() as issued:
        with pytest.raises(ValueError, match=r"Pipeline stages.*pass replica_group=") as raised:
            distclip.clip_grad_norm_(params, 0.01, norm_type)
    assert issued == ["gloo:all_reduce"], issued  # found in the one collective, none added
    for grad, was in zip(_grads(params), before):
        assert torch.equal(grad, was), "no gradient may be touched"
    return str(raised.value)


@pytest.mark.parametrize("norm_type", NORMS)
@pytest.mark.parametrize("same_shapes", [False, True], ids=["different-shapes", "same-shapes-different-values"])
def test_pipeline_stages_with_default_arguments_raise_on_every_rank(ranks, norm_type, same_shapes):
    messages = ranks(2).run(_stages_with_default_arguments, norm_type, same_shapes, 2)
    assert messages[0] == messages[1]


@pytest.mark.parametrize("same_shapes", [False, True], ids=["different-shapes", "same-shapes-different-values"])
def test_two_stages_of_two_replicas_with_default_arguments_raise_on_every_rank(ranks, same_shapes):
    messages = ranks(4).run(_stages_with_default_arguments, 2.0, same_shapes, 2)
    assert len(set(messages)) == 1


def _different_tensor_counts():
    params = _stage(8, seed=0) + (_stage(8, seed=1) if dist.get_rank() == 1 else [])
    before = _grads(params)
    with pytest.raises(ValueError, match="hold different ones"):
        distclip.clip_grad_norm_(params, 0.01)
    assert all(torch.equal(g, b) for g, b in zip(_grads(params), before))


def test_different_tensor_counts_raise_on_every_rank(ranks):
    ranks(2).run(_different_tensor_counts)


def _explicit_replica_group_of_different_stages():
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("pp", "dp"))
    params = _stage(8, seed=mesh["pp"].get_local_rank())  # stages differ, dp replicas are copies
    with pytest.raises(ValueError, match="hold different ones"):
        distclip.clip_grad_norm_(params, 0.01, replica_group=mesh["pp"])  # the wrong dim
    assert distclip.clip_grad_norm_(params, 1e9, replica_group=mesh["dp"]).isfinite()


def test_a_wrong_explicit_replica_group_raises_and_the_right_one_passes(ranks):
    ranks(4).run(_explicit_replica_group_of_different_stages)


def _replicate_dim_that_is_not_a_copy():
    # A DTensor that claims Replicate over tp while each tp rank holds different values.
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
    torch.manual_seed(dist.get_rank())
    grad = DTensor.from_local(torch.randn(6), mesh, [Shard(0), Replicate()], run_check=False)
    with pytest.raises(ValueError, match="hold different ones"):
        distclip.get_total_norm([grad])


def test_a_replicate_placement_whose_copies_differ_raises(ranks):
    ranks(4).run(_replicate_dim_that_is_not_a_copy)


def _nan_on_one_replica_is_a_nonfinite_norm_not_a_copy_error():
    params = _stage(8, seed=0)
    if dist.get_rank() == 1:
        params[0].grad.fill_(math.nan)
    return repr(distclip.clip_grad_norm_(params, 1.0).item())


def test_a_nan_on_one_replica_is_reported_as_a_nan_norm(ranks):
    # The nonfinite policies own that case ("skip" must skip, not raise).
    assert ranks(2).run(_nan_on_one_replica_is_a_nonfinite_norm_not_a_copy_error) == ["nan", "nan"]


def _contributions(members, rank, tensors):
    segments = [(i, 0, t.numel()) for i, t in enumerate(tensors)]
    return CopyCheck({members: segments}, tensors, rank).contributions(tensors, torch.device("cpu"))


def test_members_that_agree_sum_to_exactly_zero_whatever_shares_their_slot():
    torch.manual_seed(0)
    total = torch.zeros(())
    for size in range(1, 3 * SLOTS + 1):  # more sets than slots: collisions are certain
        members = tuple(range(100 * size, 100 * size + 1 + size % 4))
        tensors = [torch.randn(size, 3), torch.randn(size).to(torch.bfloat16), torch.randn(2).double()]
        for rank in members:
            total = total + _contributions(members, rank, tensors)
    assert torch.equal(total, torch.zeros_like(total))


@pytest.mark.parametrize("copies", [2, 3, 5])
def test_one_member_that_differs_is_always_found(copies):
    members = tuple(range(copies))
    torch.manual_seed(1)
    tensors = [torch.randn(7, 3), torch.randn(5)]
    for differing in members:
        for change in ("value", "shape", "count"):
            total = torch.zeros(())
            for rank in members:
                mine = [t.clone() for t in tensors]
                if rank == differing:
                    if change == "value":
                        mine[0][0, 0] += 1  # the first element is always sampled
                    elif change == "shape":
                        mine[1] = mine[1].reshape(5, 1)
                    else:
                        mine.append(torch.ones(1))
                total = total + _contributions(members, rank, mine)
            assert bool((total != 0).any()), (differing, change)


def test_check_values_stay_exact_integers_in_float64():
    members = tuple(range(1 << 14))  # a copy set of 16,384 ranks
    tensors = [torch.randn(10)]
    leader, member = _contributions(members, 0, tensors), _contributions(members, 1, tensors)
    whole_set = leader.abs() + (len(members) - 1) * member.abs()  # bounds every partial sum
    assert float(whole_set.max()) < 2**53 / 64, "64 such sets sharing a slot must stay exact"


def test_segments_of_one_flat_tensor_are_each_sampled():
    # FSDP1: one flat gradient holds several parameters' ranges, of different lengths.
    flat = torch.randn(40)
    segments = [(0, 0, 2), (0, 2, 30), (0, 30, 40)]
    agree = sum(CopyCheck({(0, 1): segments}, [flat], rank).contributions([flat], torch.device("cpu")) for rank in (0, 1))
    assert torch.equal(agree, torch.zeros_like(agree))
    changed = flat.clone()
    changed[20] += 1  # a sampled position of the second range only (2 + 28 * 2 // 3)
    differ = CopyCheck({(0, 1): segments}, [flat], 0).contributions([flat], torch.device("cpu")) + CopyCheck(
        {(0, 1): segments}, [changed], 1
    ).contributions([changed], torch.device("cpu"))
    assert bool((differ != 0).any())
