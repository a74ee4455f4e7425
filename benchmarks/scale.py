"""Ownership at 1k-16k ranks, simulated on the fake process group: exact partition, planning time.

    OMP_NUM_THREADS=1 python benchmarks/scale.py [--worlds 1024 4096 16384] [--models gpt moe]
        [--workers 2] [--sample N] [--out scale.json]

For each world size: a 100-layer GPT (or MoE GPT, 16 experts) on ``pp=8 x dp_replicate=2 x
dp_shard x cp=2 x tp=8`` (ep=8 borrowed from dp_shard for the MoE), every rank simulated one after
the other (``tests/simulation.py``: real meshes, FSDP2's layouts, ``distclip.explain``), split over
``--workers`` processes.  Reported: whether the counted elements partition the model (each counted
exactly once), and ``explain``'s time per rank (median, 90th percentile, max): the whole planning
of one rank, cold (every rank's meshes are new).  ``--sample N`` simulates N ranks spread over the
world instead (planning time only; no partition claim), e.g. for ``pp=1`` where every rank holds
all 100 layers (``--pp 1``).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from simulation import Model, Run, simulate  # noqa: E402


def configuration(kind: str, world_size: int, pp: int) -> tuple[Model, Run]:
    dp_shard = world_size // (pp * 2 * 2 * 8)
    run = Run(pp=pp, dp_replicate=2, dp_shard=dp_shard, cp=2, tp=8, ep=min(8, dp_shard) if kind == "moe" else 1)
    assert run.world_size == world_size, f"{world_size} ranks do not fit pp={pp} x 2 x dp_shard x 2 x 8"
    return Model(layers=100, experts=16 if kind == "moe" else 0), run


def _worker(args: tuple) -> tuple:
    kind, world_size, pp, ranks = args
    model, run = configuration(kind, world_size, pp)
    counts, seconds = simulate(model, run, ranks)
    return counts.counts, seconds


def measure(kind: str, world_size: int, pp: int, workers: int, sample: int | None) -> dict:
    model, run = configuration(kind, world_size, pp)
    ranks = list(range(world_size))
    if sample:
        ranks = ranks[:: max(1, world_size // sample)][:sample]
    chunks = [ranks[i::workers] for i in range(workers)]
    start = time.perf_counter()
    with multiprocessing.get_context("spawn").Pool(workers) as pool:
        results = pool.map(_worker, [(kind, world_size, pp, chunk) for chunk in chunks])
    wall = time.perf_counter() - start
    counts = sum(c for c, _ in results)
    seconds = sorted(s for _, rank_seconds in results for s in rank_seconds)
    row = {
        "model": kind,
        "world_size": world_size,
        "run": run.__dict__,
        "layers_per_rank": f"{model.layers // pp}-{-(-model.layers // pp)}",
        "model_elements": int(counts.numel()),
        "ranks_simulated": len(seconds),
        "explain_ms_median": 1e3 * statistics.median(seconds),
        "explain_ms_p90": 1e3 * seconds[int(0.9 * (len(seconds) - 1))],
        "explain_ms_max": 1e3 * seconds[-1],
        "wall_s": wall,
    }
    if not sample:
        row["never_counted"] = int((counts == 0).sum())
        row["counted_more_than_once"] = int((counts > 1).sum())
        row["partition"] = row["never_counted"] == 0 and row["counted_more_than_once"] == 0
    return row


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--worlds", type=int, nargs="+", default=[1024, 4096, 16384])
    parser.add_argument("--models", nargs="+", default=["gpt", "moe"], choices=["gpt", "moe"])
    parser.add_argument("--pp", type=int, default=8)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--sample", type=int, default=None)
    parser.add_argument("--out", default="scale.json")
    args = parser.parse_args()
    rows = []
    for kind in args.models:
        for world_size in args.worlds:
            row = measure(kind, world_size, args.pp, args.workers, args.sample)
            rows.append(row)
            print(json.dumps(row), flush=True)
            Path(args.out).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
