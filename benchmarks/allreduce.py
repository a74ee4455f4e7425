"""Latency of one small gloo all-reduce by vector length: what distclip's one collective costs.

    OMP_NUM_THREADS=1 torchrun --standalone --nproc-per-node=2 benchmarks/allreduce.py [--rounds 200]

FSDP1's own ``clip_grad_norm_`` all-reduces one float; distclip's vector carries the norms, the
NaN, presence and problem flags and the copy check (about 35 float64 for one norm).  Each round
runs every length once after a barrier (interleaved); medians and 90th percentiles on rank 0.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.distributed as dist


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=200)
    args = parser.parse_args()
    dist.init_process_group("gloo")
    vectors = {
        f"{str(dtype).split('.')[1]} x {n}": torch.zeros(n, dtype=dtype)
        for dtype, n in [(torch.float32, 1), (torch.float64, 1), (torch.float64, 4), (torch.float64, 35), (torch.float64, 256)]
    }
    times: dict[str, list[float]] = {name: [] for name in vectors}
    for _ in range(args.rounds):
        for name, vector in vectors.items():
            dist.barrier()
            start = time.perf_counter()
            dist.all_reduce(vector)
            times[name].append(time.perf_counter() - start)
    if dist.get_rank() == 0:
        print(f"gloo all-reduce, world {dist.get_world_size()}, {args.rounds} interleaved rounds")
        print(f"{'vector':16} {'median us':>10} {'p90 us':>8}")
        for name, seconds in times.items():
            p90 = statistics.quantiles(seconds, n=10)[-1]
            print(f"{name:16} {statistics.median(seconds) * 1e6:10.0f} {p90 * 1e6:8.0f}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
