"""Bad input: a clear error on every rank together, no hang, no gradient touched."""

import math

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Partial, Shard, distribute_tensor

import distclip
from reference import collectives


def _params(rank, n=3):
    torch.manual_seed(rank)
    params = [nn.Parameter(torch.randn(4, 3)) for _ in range(n)]
    for p in params:
        p.grad = torch.randn(4, 3)
    return params


def _grads(params):
    return [p.grad.clone() if not isinstance(p.grad, DTensor) else p.grad.to_local().clone() for p in params]


def _assert_untouched(params, before):
    for p, b in zip(params, before):
        local = p.grad.to_local() if isinstance(p.grad, DTensor) else p.grad
        torch.testing.assert_close(local, b, rtol=0, atol=0, equal_nan=True)


def _bad_arguments():
    params = _params(dist.get_rank())
    before = _grads(params)
    with collectives() as issued:
        for max_norm in (-1.0, math.nan):
            with pytest.raises(ValueError, match="max_norm"):
                distclip.clip_grad_norm_(params, max_norm)
        for norm_type in (math.nan, "fro"):
            with pytest.raises(ValueError, match="norm_type"):
                distclip.clip_grad_norm_(params, 1.0, norm_type)
            with pytest.raises(ValueError, match="norm_type"):
                distclip.get_total_norm([p.grad for p in params], norm_type)
    assert issued == [], issued  # argument errors are raised before any communication
    _assert_untouched(params, before)


def test_bad_max_norm_or_norm_type_raises_value_error_on_every_rank(ranks):
    ranks(2).run(_bad_arguments)


def _mesh_outside_group():
    world = init_device_mesh("cpu", (dist.get_world_size(),))
    pair, _ = dist.new_subgroups(group_size=2)
    param = nn.Parameter(distribute_tensor(torch.ones(8), world, [Shard(0)]))
    param.grad = distribute_tensor(torch.arange(8.0), world, [Shard(0)])
    before = _grads([param])
    with pytest.raises(ValueError, match="ranks outside `group`"):
        distclip.clip_grad_norm_([param], 1.0, group=pair)
    _assert_untouched([param], before)


def test_dtensor_on_a_mesh_beyond_group_raises_on_every_rank(ranks):
    ranks(4).run(_mesh_outside_group)


def _partial_on_some_ranks(everywhere):
    # Rank 0 (or every rank) holds a gradient with a pending reduction on its own one-rank mesh,
    # given without its parameter (so it cannot be reduced in place); the others hold plain
    # gradients and cannot see the problem themselves.
    own = init_device_mesh("cpu", (dist.get_world_size(), 1), mesh_dim_names=("all", "own"))["own"]
    params = _params(dist.get_rank())
    if everywhere or dist.get_rank() == 0:
        params[0].grad = DTensor.from_local(params[0].grad, own, [Partial()])
    before = _grads(params)
    with pytest.raises(ValueError, match="Partial placement"):
        distclip.get_total_norm([p.grad for p in params], 2.0)
    _assert_untouched(params, before)


@pytest.mark.parametrize("everywhere", [True, False], ids=["on-every-rank", "on-one-rank"])
def test_partial_gradient_raises_on_every_rank(ranks, everywhere):
    ranks(2).run(_partial_on_some_ranks, everywhere)


def _sparse_gradient_on_one_rank():
    # Rank 1 alone holds a sparse gradient (a pipeline stage with an nn.Embedding(sparse=True)).
    params = _params(dist.get_rank())
    if dist.get_rank() == 1:
        embedding = nn.Embedding(10, 4, sparse=True)
        embedding(torch.tensor([1, 2, 2])).sum().backward()
        params.append(embedding.weight)
    before = [p.grad.clone() for p in params]
    alone, _ = dist.new_subgroups(group_size=1)  # no copies across the ranks
    with pytest.raises(ValueError, match="not a dense"):
        distclip.clip_grad_norm_(params, 0.1, replica_group=alone)
    for p, b in zip(params, before):
        torch.testing.assert_close(p.grad.to_dense(), b.to_dense(), rtol=0, atol=0)


def test_a_sparse_gradient_on_one_rank_raises_on_every_rank(ranks):
    ranks(2).run(_sparse_gradient_on_one_rank)


def _replica_group_outside_group():
    pair, _ = dist.new_subgroups(group_size=2)
    params = _params(dist.get_rank())
    before = _grads(params)
    with pytest.raises(ValueError, match="replica_group"):
        distclip.clip_grad_norm_(params, 0.1, group=pair, replica_group=dist.group.WORLD)
    _assert_untouched(params, before)


def test_replica_group_outside_group_raises_on_every_rank(ranks):
    ranks(4).run(_replica_group_outside_group)


def _copy_group_without_this_rank(per_parameter: bool):
    # new_group([0, 1]) returns GroupMember.NON_GROUP_MEMBER on ranks 2 and 3: they hold no
    # group, ranks 0 and 1 see nothing wrong and are already on their way into the collective.
    pair = dist.new_group([0, 1])
    params = _params(dist.get_rank())
    before = _grads(params)
    replica_group = (lambda p: pair if p is params[0] else None) if per_parameter else pair
    with pytest.raises(ValueError, match="NON_GROUP_MEMBER"):
        distclip.clip_grad_norm_(params, 0.1, replica_group=replica_group)
    _assert_untouched(params, before)


@pytest.mark.parametrize("per_parameter", [True, False], ids=["callable", "one-group"])
def test_copy_group_without_this_rank_raises_on_every_rank(ranks, per_parameter):
    ranks(4).run(_copy_group_without_this_rank, per_parameter)


def _copy_group_callable_returning_something_else():
    params = _params(dist.get_rank())
    before = _grads(params)
    returned = "dp" if dist.get_rank() == 0 else None  # a name instead of a group, on one rank
    with pytest.raises(ValueError, match="callable must return a ProcessGroup"):
        distclip.clip_grad_norm_(params, 0.1, replica_group=lambda p: returned)
    _assert_untouched(params, before)


def test_copy_group_callable_returning_something_else_raises_on_every_rank(ranks):
    ranks(2).run(_copy_group_callable_returning_something_else)


def _copy_group_members_disagreeing_on_shapes():
    # Ranks 0 and 1 claim params[0] as a copy of each other's, but hold different shapes (the
    # same element count): no rank can tell alone, the one collective's copy check does.
    rank = dist.get_rank()
    pairs = [dist.new_group([0, 1]), dist.new_group([2, 3])]
    params = _params(rank)
    if rank == 1:
        params[0] = nn.Parameter(torch.randn(3, 4))
        params[0].grad = torch.randn(3, 4)
    before = _grads(params)
    mine = pairs[rank // 2]
    with collectives() as issued:
        with pytest.raises(ValueError, match="hold different ones"):
            distclip.clip_grad_norm_(params, 0.1, replica_group=lambda p: mine if p is params[0] else None)
    assert issued == ["gloo:all_reduce"], issued
    _assert_untouched(params, before)


def test_copy_group_members_disagreeing_on_shapes_raise_on_every_rank(ranks):
    ranks(4).run(_copy_group_members_disagreeing_on_shapes)


def _nonfinite_on_one_shard(norm_type, value, error_if_nonfinite):
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    torch.manual_seed(0)
    param = nn.Parameter(distribute_tensor(torch.randn(8, 2), mesh, [Shard(0)]))
    grad = torch.randn(8, 2)
    if dist.get_rank() == 1:
        grad[-1, 1] = value  # in rank 1's shard
    param.grad = DTensor.from_local(grad.chunk(dist.get_world_size())[dist.get_rank()].clone(), mesh, [Shard(0)])
    before = _grads([param])
    if error_if_nonfinite:
        with pytest.raises(RuntimeError, match="non-finite"):
            distclip.clip_grad_norm_([param], 1.0, norm_type, error_if_nonfinite=True)
        _assert_untouched([param], before)
        return None
    return repr(distclip.clip_grad_norm_([param], 1.0, norm_type).item())


@pytest.mark.parametrize("norm_type", [2.0, 1.0, math.inf, -math.inf])
def test_nan_on_one_rank_shard_reaches_every_rank(ranks, norm_type):
    # MAX/MIN all-reduces may drop NaN; the NaN flag carried in the same vector restores it.
    assert ranks(2).run(_nonfinite_on_one_shard, norm_type, math.nan, False) == ["nan", "nan"]


@pytest.mark.parametrize("norm_type", [2.0, math.inf])
def test_inf_on_one_rank_shard_gives_inf_on_every_rank(ranks, norm_type):
    assert ranks(2).run(_nonfinite_on_one_shard, norm_type, math.inf, False) == ["inf", "inf"]


@pytest.mark.parametrize("norm_type", [2.0, math.inf, -math.inf])
def test_error_if_nonfinite_raises_on_every_rank(ranks, norm_type):
    ranks(2).run(_nonfinite_on_one_shard, norm_type, math.nan, True)
