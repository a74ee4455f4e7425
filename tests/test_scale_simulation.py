"""Ownership proven by simulation: every rank of a run simulated on the fake process group, what
``distclip.explain`` says it counts mapped back to the model's elements, each counted exactly once.

Small worlds here (every rank, FSDP2 itself laying out the gradients); 1k to 16k ranks in
``benchmarks/scale.py``.  See ``tests/simulation.py`` for the run's meshes and the model.
"""

from __future__ import annotations

import pytest
import torch.distributed as dist

from simulation import Model, Run, as_rank, layout_stage, light_meshes, real_meshes, real_stage, simulate

# Small widths against 8 dp shards: norms of 6 elements leave two shards empty, a vocabulary of
# 7 rows split over tp leaves uneven ones, experts split over ep and then strided by FSDP.
SMALL_MODEL = Model(layers=3, hidden=6, ffn=10, vocab=7)
RUNS = {
    "gpt pp2 x hsdp2x2 x tp2": (SMALL_MODEL, Run(pp=2, dp_replicate=2, dp_shard=2, tp=2)),
    "gpt dp_shard4 x cp2 x tp2": (SMALL_MODEL, Run(dp_shard=4, cp=2, tp=2)),
    "moe pp2 x dp_shard4 (ep2) x tp2": (Model(layers=3, hidden=6, ffn=10, vocab=7, experts=4), Run(pp=2, dp_shard=4, tp=2, ep=2)),
    "moe hsdp2x4 (ep4), no tp": (Model(layers=2, hidden=6, ffn=10, vocab=7, experts=8), Run(dp_replicate=2, dp_shard=4, ep=4)),
}


def _layouts(stage) -> dict:
    return {
        name: (
            tuple(param.grad.shape),
            tuple(getattr(param.grad, "placements", ())),
            param.grad.device_mesh.mesh.tolist() if hasattr(param.grad, "device_mesh") else None,
            tuple(param.grad.to_local().shape) if hasattr(param.grad, "to_local") else tuple(param.grad.shape),
        )
        for name, param in stage
    }


@pytest.mark.parametrize("name", RUNS)
def test_fsdp2_lays_out_every_gradient_as_the_simulation_does(name):
    model, run = RUNS[name]
    try:
        for rank in range(run.world_size):
            as_rank(rank, run.world_size)
            real = _layouts(real_stage(model, run, real_meshes(run)))
            light = _layouts(layout_stage(model, run, light_meshes(run)))
            assert real == light, f"rank {rank}"
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("name", RUNS)
def test_every_element_is_counted_once_over_every_rank_under_fully_shard(name):
    model, run = RUNS[name]
    counts, _ = simulate(model, run, range(run.world_size), build=real_stage, meshes=real_meshes)
    assert counts.problems() == []
    assert int(counts.counts.sum()) == len(counts.counts)


def test_every_element_is_counted_once_over_128_ranks():
    model, run = Model(layers=9, experts=8), Run(pp=2, dp_replicate=2, dp_shard=8, cp=2, tp=2, ep=4)
    counts, _ = simulate(model, run, range(run.world_size))
    assert counts.problems() == []


def test_a_rank_left_out_or_counted_twice_is_reported():
    model, run = RUNS["gpt pp2 x hsdp2x2 x tp2"]
    counts, _ = simulate(model, run, [0, 0, *range(2, run.world_size)])
    problems = "\n".join(counts.problems())
    assert "never counted" in problems and "counted more than once" in problems
