"""Per-parameter and per-module norms of an FSDP1 model: each original parameter's range of its
unit's flat gradient counts towards its own group, for every sharding strategy, flat or
original parameters, named as the unwrapped model names them."""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
from torch.distributed.fsdp import ShardingStrategy

import distclip
from models import MLP, batch
from reference import assert_close_norm, reference_norm

S = ShardingStrategy
NAMES = [f"layers.{i}.{kind}" for i in range(3) for kind in ("weight", "bias")] + [
    "norm.weight", "norm.bias", "head.weight", "head.bias"]


def _wrapped(strategy, use_orig_params):
    torch.manual_seed(0)
    model = MLP()
    kwargs = dict(sharding_strategy=strategy, use_orig_params=use_orig_params, device_id=torch.device("cpu"))
    if strategy == S.HYBRID_SHARD:
        kwargs["device_mesh"] = init_device_mesh("cpu", (2, dist.get_world_size() // 2), mesh_dim_names=("replicate", "shard"))
    model.layers[1] = FSDP(model.layers[1], **kwargs)
    return FSDP(model, **kwargs)


def _reference(strategy):
    """The full gradients by name, from an identical model run with original parameters."""
    model = _wrapped(strategy, True)
    model(batch(0)).square().mean().backward()
    with FSDP.summon_full_params(model, with_grads=True):
        return {distclip.gradients.clean_name(n): p.grad.double().clone() for n, p in model.named_parameters()}


def _fsdp1_groups(strategy, use_orig_params, norm_types):
    full = _reference(strategy)
    outcome = []
    for norm_type in norm_types:
        for groups in ("parameters", "modules"):
            model = _wrapped(strategy, use_orig_params)
            model(batch(0)).square().mean().backward()
            result = distclip.GradClipper(model, max_norm=1e9, norm_type=norm_type, groups=groups).clip_()
            of = (lambda name: name) if groups == "parameters" else (lambda name: name.split(".")[0])
            expected: dict[str, dict] = {}
            for name in NAMES:
                expected.setdefault(of(name), {})[name] = full[name]
            assert set(result.all_group_norms) == set(expected), (groups, sorted(result.all_group_norms))
            for name, members in expected.items():
                assert_close_norm(result.all_group_norms[name].item(), reference_norm(members, norm_type), norm_type)
            assert_close_norm(result.total_norm.item(), reference_norm(full, norm_type), norm_type)
            outcome.append([v.item().hex() for v in result.all_group_norms.values()])
    return outcome


@pytest.mark.parametrize("use_orig_params", [False, True], ids=["flat", "orig"])
@pytest.mark.parametrize("strategy", [S.FULL_SHARD, S.NO_SHARD, S.HYBRID_SHARD], ids=lambda s: s.name)
def test_fsdp1_per_parameter_and_module_norms_are_exact(ranks, strategy, use_orig_params):
    per_rank = ranks(4).run(_fsdp1_groups, strategy, use_orig_params, [2.0, math.inf, 0.0])
    assert all(r == per_rank[0] for r in per_rank)
