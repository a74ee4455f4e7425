"""The functional API plans once (distclip/plancache.py) and never runs a stale plan: whatever
changed between two calls, each gives the float64-reference norm and clips exactly."""

import gc
import math

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FullyShardedDataParallel, ShardingStrategy
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor

import distclip
from distclip import plancache
from models import backward, batch, build, shard_layers
from reference import assert_same_on_all_ranks, clip_and_check
from test_fsdp1 import _fsdp1_against_reference_and_fsdp


def _params(shapes, seed=0):
    generator = torch.Generator().manual_seed(seed)
    params = [nn.Parameter(torch.empty(shape)) for shape in shapes]
    for p in params:
        p.grad = torch.randn(p.shape, generator=generator) * 3
    return params


def _norm(tensors):
    return torch.linalg.vector_norm(torch.cat([t.detach().double().flatten() for t in tensors])).item()


def _assert_each_call_same_on_all_ranks(per_rank, calls):
    """``per_rank[r][c]``: what rank r's call c returned (clip_and_check's dict); every call
    agrees across the ranks."""
    for call in range(calls):
        assert_same_on_all_ranks([results[call] for results in per_rank])


def _clip_exactly(params, max_norm=1.0):
    """Clip and check the norm and the clipped gradients against float64 (single process)."""
    before = [p.grad.clone() for p in params if p.grad is not None]
    expected = _norm(before)
    total = distclip.clip_grad_norm_(params, max_norm)
    assert total.item() == pytest.approx(expected, rel=1e-6)
    coefficient = min(max_norm / (expected + 1e-6), 1.0)
    after = [p.grad for p in params if p.grad is not None]
    for a, b in zip(after, before):
        torch.testing.assert_close(a, b * coefficient, rtol=1e-6, atol=1e-7)


def test_repeated_calls_on_the_same_parameters_reuse_one_plan():
    plancache.clear_plans()
    params = _params([(8, 4), (4,)])
    _clip_exactly(params)
    (plan,) = [entry[0] for entry in plancache._shared.plans.values()]
    for seed in range(3):  # new values each step: still the one plan
        for p, fresh in zip(params, _params([(8, 4), (4,)], seed=seed + 1)):
            p.grad = fresh.grad
        _clip_exactly(params)
    assert [entry[0] for entry in plancache._shared.plans.values()] == [plan]


def test_a_swapped_grad_tensor_is_clipped_and_the_old_one_left_alone():
    params = _params([(8, 4), (4,)])
    _clip_exactly(params)
    old = params[0].grad
    kept = old.clone()
    params[0].grad = torch.full((8, 4), 5.0)
    _clip_exactly(params)
    assert torch.equal(old, kept)


def test_a_parameter_gaining_and_losing_its_grad_changes_what_is_counted():
    params = _params([(8, 4), (4,), (3, 3)])
    _clip_exactly(params)
    params[1].grad = None
    _clip_exactly(params)
    params[1].grad = torch.full((4,), 7.0)
    _clip_exactly(params)


def test_toggled_requires_grad_follows_the_gradients_it_leaves():
    model = nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 2))
    model(torch.randn(3, 4)).square().sum().backward()
    _clip_exactly(list(model.parameters()))
    model[0].requires_grad_(False)
    model.zero_grad()  # set_to_none: the frozen layer has no gradient any more
    model(torch.randn(3, 4)).square().sum().backward()
    assert model[0].weight.grad is None
    _clip_exactly(list(model.parameters()))
    model[0].requires_grad_(True)
    model(torch.randn(3, 4)).square().sum().backward()
    _clip_exactly(list(model.parameters()))


def test_two_models_clipped_alternately_each_get_their_own_norm():
    first, second = _params([(8, 4), (4,)], seed=1), _params([(16,), (2, 2), (5,)], seed=2)
    for _ in range(2):
        _clip_exactly(first, max_norm=1e9)
        _clip_exactly(second, max_norm=1e9)


def _new_parameters_at_freed_addresses():
    # Same count, types and dims, other sizes: only the sizes tell the plans apart.  The copies
    # split their work by ranges, so a stale plan would count wrong ranges.
    first = _params([(64, 8), (8,)], seed=0)
    results = [clip_and_check([(f"a{i}", p) for i, p in enumerate(first)], 2.0)]
    ids = [id(p) for p in first]
    del first
    gc.collect()
    second = _params([(32, 8), (40,)], seed=3)
    results.append(clip_and_check([(f"b{i}", p) for i, p in enumerate(second)], 2.0))
    return results, [id(p) for p in second] == ids


def test_new_parameters_at_freed_addresses_get_a_new_plan(ranks):
    per_rank = ranks(2).run(_new_parameters_at_freed_addresses)
    _assert_each_call_same_on_all_ranks([results for results, _ in per_rank], calls=2)


def _model_rewrapped_with_fsdp2(norm_type):
    # Sharded over both ranks, then the same architecture replicated over them (HSDP, shard
    # size 1): the gradients' element counts and dims are equal, only placements differ.
    world = dist.get_world_size()
    results = []
    for shape in [(1, world), (world, 1)]:
        mesh = init_device_mesh("cpu", shape, mesh_dim_names=("replicate", "shard"))
        model = shard_layers(build(), mesh)
        backward(model, batch(dist.get_rank()))
        results.append(clip_and_check(model.named_parameters(), norm_type))
    return results


@pytest.mark.parametrize("norm_type", [2.0, math.inf])
def test_a_model_rewrapped_with_fsdp2_gets_a_new_plan(ranks, norm_type):
    _assert_each_call_same_on_all_ranks(ranks(2).run(_model_rewrapped_with_fsdp2, norm_type), calls=2)


def _fsdp1_units_rewrapped():
    # Each call wraps new FSDP1 units; the NO_SHARD flat gradients are whole copies, the
    # FULL_SHARD ones distinct halves (their attributions are part of the key).
    strategies = [ShardingStrategy.FULL_SHARD, ShardingStrategy.NO_SHARD, ShardingStrategy.FULL_SHARD]
    return [_fsdp1_against_reference_and_fsdp(strategy, False, [2.0]) for strategy in strategies]


def test_fsdp1_units_rewrapped_between_calls_each_give_the_exact_norm(ranks):
    per_rank = ranks(2).run(_fsdp1_units_rewrapped)
    assert all(norms == per_rank[0] for norms in per_rank)


def _fsdp1_equal_sizes_other_copies():
    # One unit each: Linear(4, 3) unsharded (15 elements and alignment padding: a flat gradient
    # of 16, a copy on both ranks) and Linear(9, 3) fully sharded (30 elements: 16 distinct on
    # each rank).  Only the units' attributions tell the two flat gradients apart.
    norms = []
    for strategy, shape in [(ShardingStrategy.NO_SHARD, (4, 3)), (ShardingStrategy.FULL_SHARD, (9, 3))]:
        torch.manual_seed(0)
        model = FullyShardedDataParallel(nn.Linear(*shape), sharding_strategy=strategy, device_id=torch.device("cpu"), use_orig_params=True)
        model(batch(dist.get_rank(), width=shape[0])).square().mean().backward()
        assert model._handle.flat_param.grad.numel() == 16
        with FullyShardedDataParallel.summon_full_params(model, with_grads=True):
            expected = _norm([p.grad for p in model.parameters()])
        total = distclip.clip_grad_norm_(model, 1e9)
        assert total.item() == pytest.approx(expected, rel=1e-6), strategy
        norms.append(total.item().hex())
    return norms


def test_fsdp1_units_of_equal_sizes_but_other_copies_get_their_own_plan(ranks):
    per_rank = ranks(2).run(_fsdp1_equal_sizes_other_copies)
    assert all(norms == per_rank[0] for norms in per_rank)


def _fsdp2_steps_reuse_the_plan_by_spec():
    model = shard_layers(build())
    results, specs = [], []
    for step in range(3):
        model.zero_grad(set_to_none=True)
        backward(model, batch(dist.get_rank(), seed=step))
        specs.append([p.grad._spec for p in model.parameters()])
        if step == 2:  # the plan must now come from the specs alone
            real_plan_key, plancache._plan_key = plancache._plan_key, None
        try:
            results.append(clip_and_check(model.named_parameters(), 2.0))
        finally:
            if step == 2:
                plancache._plan_key = real_plan_key
    # FSDP2 gives every step's gradient of a parameter the same spec: what the key relies on.
    assert all(a is b for a, b in zip(specs[0], specs[2]))
    return results


def test_fsdp2_steps_reuse_the_plan_found_by_their_gradients_specs(ranks):
    _assert_each_call_same_on_all_ranks(ranks(2).run(_fsdp2_steps_reuse_the_plan_by_spec), calls=3)


def _dtensor_grads_with_new_specs():
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    params = [nn.Parameter(distribute_tensor(torch.zeros(8, 4), mesh, [Shard(0)])) for _ in range(3)]
    results = []
    for step, placement in enumerate([Shard(0), Replicate(), Shard(1)]):
        generator = torch.Generator().manual_seed(step)
        for p in params:  # new specs with other placements, maybe where the freed ones were
            p.grad = distribute_tensor(torch.randn(8, 4, generator=generator), mesh, [placement])
        gc.collect()
        results.append(clip_and_check([(f"p{i}", p) for i, p in enumerate(params)], 2.0))
        results.append(clip_and_check([(f"p{i}", p) for i, p in enumerate(params)], math.inf))
    return results


def test_dtensor_gradients_with_new_specs_get_their_own_plan(ranks):
    _assert_each_call_same_on_all_ranks(ranks(2).run(_dtensor_grads_with_new_specs), calls=6)


def _plans_by_spec_go_with_their_specs():
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    grads = [DTensor.from_local(torch.randn(4, 4), mesh, [Shard(0)]) for _ in range(3)]
    plancache.clear_plans()
    distclip.get_total_norm(grads)
    entries = len(plancache._shared.by_specs)
    del grads
    gc.collect()
    # A new spec at a freed one's address must not find the freed one's plan.
    return entries, len(plancache._shared.by_specs)


def test_plans_found_by_specs_are_forgotten_when_a_spec_is_freed(ranks):
    assert ranks(2).run(_plans_by_spec_go_with_their_specs) == [(1, 0), (1, 0)]
