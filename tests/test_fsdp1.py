"""FSDP1 (FullyShardedDataParallel): every sharding strategy, flat or original parameters,
nested units, ignored modules, mixed dtypes.  Padding never counted, replicas counted once."""

import math

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
from torch.distributed.fsdp import MixedPrecision, ShardingStrategy

import distclip
from models import NORM_TYPES, batch
from reference import assert_close_norm, assert_explain_counts_every_element_once, collectives

S = ShardingStrategy
# FSDP1's own clip_grad_norm_ is right for these p (it gets 0 and -inf wrong).
FSDP_CORRECT = {2.0, 1.0, 3.0, 0.5, math.inf}


class Model(nn.Module):
    """Nested units of different sizes, plus an ignored (unsharded, replicated) module."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(12, 12), nn.Tanh(), nn.Linear(12, 12), nn.LayerNorm(12))
        self.extra = nn.Linear(12, 5)
        self.ignored = nn.Linear(5, 3)

    def forward(self, x):
        return self.ignored(self.extra(self.body(x)).float())  # ignored: not cast by MixedPrecision


def _wrap(strategy, use_orig_params, mixed_precision=False, seed=0):
    torch.manual_seed(seed)
    model = Model()
    kwargs = dict(sharding_strategy=strategy, use_orig_params=use_orig_params, device_id=torch.device("cpu"))
    if strategy in (S.HYBRID_SHARD, S._HYBRID_SHARD_ZERO2):
        kwargs["device_mesh"] = init_device_mesh("cpu", (2, dist.get_world_size() // 2), mesh_dim_names=("replicate", "shard"))
    if mixed_precision:
        kwargs["mixed_precision"] = MixedPrecision(param_dtype=torch.bfloat16, reduce_dtype=torch.bfloat16)
    model.body[2] = FSDP(model.body[2], **kwargs)
    model.body = FSDP(model.body, **kwargs)
    return FSDP(model, ignored_states=[model.ignored], **kwargs)


def _step(model):
    x = batch(0, width=12)  # one batch on every rank: ignored-module grads are then copies
    model(x).square().mean().backward()


def _reference_grads(strategy, mixed_precision):
    """The exact full gradients of the same model and batch, from summon_full_params."""
    model = _wrap(strategy, True, mixed_precision)
    _step(model)
    with FSDP.summon_full_params(model, with_grads=True):
        return {n: p.grad.double().clone() for n, p in model.named_parameters() if p.grad is not None}


def _saved_grads(model):
    return [p.grad.clone() if p.grad is not None else None for p in model.parameters()]


def _restore_grads(model, saved):
    for p, g in zip(model.parameters(), saved):
        if g is not None:
            p.grad.copy_(g)


def _fsdp1_against_reference_and_fsdp(strategy, use_orig_params, norm_types, mixed_precision=False):
    """For each p: distclip's norm against the float64 reference of the full gradients and
    against FSDP's own method, from one all-reduce; gradients as FSDP's.  The models are wrapped
    and stepped once; each p starts again from the same saved gradients."""
    reference = _reference_grads(strategy, mixed_precision)
    flat_reference = torch.cat([g.flatten() for g in reference.values()])
    ours, theirs = _wrap(strategy, use_orig_params, mixed_precision), _wrap(strategy, use_orig_params, mixed_precision)
    _step(ours)
    _step(theirs)
    assert_explain_counts_every_element_once(ours, flat_reference.numel())
    saved = [_saved_grads(ours), _saved_grads(theirs)]
    norms = {}
    for norm_type in norm_types:
        for model, grads in zip((ours, theirs), saved):
            _restore_grads(model, grads)
        expected = torch.linalg.vector_norm(flat_reference, norm_type).item()
        max_norm = 0.5 * expected
        with collectives() as issued:
            total = distclip.clip_grad_norm_(ours, max_norm, norm_type)
        assert issued == ["gloo:all_reduce"], issued
        assert type(total) is torch.Tensor
        assert_close_norm(total.item(), expected, norm_type)
        if norm_type in FSDP_CORRECT and not mixed_precision:
            torch.testing.assert_close(total, theirs.clip_grad_norm_(max_norm, norm_type), rtol=1e-6, atol=0)
            for a, b in zip(ours.parameters(), theirs.parameters()):
                if a.grad is not None:
                    torch.testing.assert_close(a.grad, b.grad, rtol=1e-6, atol=1e-8)
        norms[norm_type] = total.item().hex()
    return norms


STRATEGIES = [S.FULL_SHARD, S.SHARD_GRAD_OP, S.NO_SHARD, S.HYBRID_SHARD, S._HYBRID_SHARD_ZERO2]


@pytest.mark.parametrize("world_size", [2, 4])
@pytest.mark.parametrize("use_orig_params", [False, True], ids=["flat", "orig"])
@pytest.mark.parametrize("strategy", STRATEGIES, ids=lambda s: s.name)
def test_fsdp1_norm_is_exact_for_every_strategy_and_norm_type(ranks, strategy, use_orig_params, world_size):
    norms = ranks(world_size).run(_fsdp1_against_reference_and_fsdp, strategy, use_orig_params, NORM_TYPES)
    assert all(n == norms[0] for n in norms), norms


def test_fsdp1_mixed_precision_gradients(ranks):
    ranks(2).run(_fsdp1_against_reference_and_fsdp, S.FULL_SHARD, False, [2.0, math.inf, -math.inf, 0.0], True)


def _flat_parameters_without_module(strategy, norm_types):
    reference = _reference_grads(strategy, False)
    flat_reference = torch.cat([g.flatten() for g in reference.values()])
    model = _wrap(strategy, False)
    _step(model)
    flat = list(model.parameters())
    assert any(getattr(p, "_is_flat_param", False) for p in flat)
    saved = _saved_grads(model)
    for norm_type in norm_types:
        _restore_grads(model, saved)
        expected = torch.linalg.vector_norm(flat_reference, norm_type).item()
        total = distclip.clip_grad_norm_(flat, 0.5 * expected, norm_type)
        assert_close_norm(total.item(), expected, norm_type)


@pytest.mark.parametrize("strategy", STRATEGIES, ids=lambda s: s.name)
def test_fsdp1_flat_parameters_alone_give_the_exact_norm(ranks, strategy):
    ranks(4).run(_flat_parameters_without_module, strategy, [2.0, -math.inf, 0.0])


def _mixed_dtype_units():
    torch.manual_seed(0)
    model = Model()
    model.extra.double()
    kwargs = dict(device_id=torch.device("cpu"))
    model.extra = FSDP(model.extra, **kwargs)
    model.body = FSDP(model.body, **kwargs)
    model = FSDP(model, ignored_states=[model.ignored], **kwargs)
    x = batch(0, width=12)
    out = model.ignored(model.extra(model.body(x).double()).float())
    out.square().mean().backward()
    with pytest.raises(Exception):
        model.clip_grad_norm_(1.0)  # FSDP's own method rejects FlatParameters of several dtypes
    total = distclip.get_total_norm(model)
    assert total.dtype == torch.float64
    return total.item()


def test_fsdp1_flat_parameters_of_different_dtypes(ranks):
    norms = ranks(2).run(_mixed_dtype_units)
    assert norms[0] == norms[1] and norms[0] > 0
