"""Metrics ride the norm's all-reduce: Sum, Mean, Max and Min of 0-dim tensors, identical on
every rank, at world 1, 2 and 4 under DDP, FSDP2 and pipeline-style groups (a rank may pass
none), against float64 references, one collective per step after the first step's agreement."""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import distclip
from models import backward, batch, build, shard_layers
from reference import NoHostSync, clipper_step, collectives

STEPS = 3


def _value(rank: int, step: int, salt: float) -> float:
    return (rank + 1) * 1.25 + step * 0.5 + salt


def _metrics(kind: str):
    """Each rank passes tokens (Sum), z (Mean), max_logit (Max), min_margin (Min); in the
    pipeline-style run the odd ranks (stages without the loss) pass none."""
    world, rank = dist.get_world_size(), dist.get_rank()
    model = build()
    wrapped = DDP(model) if kind == "ddp" else shard_layers(model) if kind == "fsdp2" else model
    replica_group = dist.new_subgroups(group_size=1)[0] if kind == "pipeline" else None
    clipper = distclip.GradClipper(wrapped, max_norm=1.0, replica_group=replica_group)
    passing = [r for r in range(world) if kind != "pipeline" or r % 2 == 0]
    results = []
    for step in range(STEPS):
        model.zero_grad(set_to_none=True)
        backward(wrapped, batch(rank, seed=step))
        metrics = None
        if rank in passing:
            metrics = {
                "tokens": distclip.Sum(torch.tensor(_value(rank, step, 0.0))),
                "z": distclip.Mean(torch.tensor(_value(rank, step, 0.25), dtype=torch.float64)),
                "max_logit": distclip.Max(torch.tensor(_value(rank, step, 0.75), dtype=torch.bfloat16)),
                "min_margin": distclip.Min(torch.tensor(-_value(rank, step, 0.5))),
            }
        with collectives() as issued, NoHostSync(host_data=step > 0):
            result = clipper.clip_(metrics=metrics)
        if world > 1:
            assert issued == clipper_step(first=step == 0), issued
        expected = {
            "tokens": sum(_value(r, step, 0.0) for r in passing),
            "z": sum(_value(r, step, 0.25) for r in passing) / len(passing),
            "max_logit": max(float(torch.tensor(_value(r, step, 0.75), dtype=torch.bfloat16)) for r in passing),
            "min_margin": min(-_value(r, step, 0.5) for r in passing),
        }
        assert set(result.metrics) == set(expected)
        for name, value in expected.items():
            got = result.metrics[name]
            assert got.dtype == torch.float64 and got.dim() == 0
            assert got.item() == pytest.approx(value, rel=1e-12), (name, got.item(), value)
        results.append({name: value.item().hex() for name, value in result.metrics.items()})
    return results


@pytest.mark.parametrize("kind,world", [("local", 1), ("ddp", 2), ("fsdp2", 2), ("ddp", 4), ("fsdp2", 4), ("pipeline", 2), ("pipeline", 4)])
def test_metrics_are_reduced_in_the_one_all_reduce(ranks, kind, world):
    per_rank = ranks(world).run(_metrics, kind)
    assert all(results == per_rank[0] for results in per_rank)


def test_a_metric_no_rank_passed_this_step_is_nan():
    model = build()
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    clipper = distclip.GradClipper(model)
    clipper.clip_(metrics={"tokens": distclip.Sum(torch.tensor(3.0))})
    result = clipper.clip_()
    assert math.isnan(result.metrics["tokens"].item())


def test_a_metric_must_be_a_sum_mean_max_or_min():
    model = build()
    with pytest.raises(ValueError, match="Sum/Mean/Max/Min"):
        distclip.GradClipper(model).clip_(metrics={"tokens": torch.tensor(3.0)})
