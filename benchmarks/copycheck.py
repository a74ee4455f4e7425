"""The copy check's cost: the same clip with and without it, interleaved in one run.

    OMP_NUM_THREADS=1 torchrun --nproc-per-node=2 benchmarks/copycheck.py [--out copycheck.json]

DDP-style replicated fp32 gradients (every tensor is a copy across the 2 ranks, so the check
fingerprints one copy set of all of them) at 150, 2,000 and 20,000 small tensors and GPT-2
small's shapes, for p = 2 and p = inf (whose partials ride as per-rank slots).  "without" swaps
in an empty check (no copy set), which is what the reduction cost before the check existed.
Each round times both variants and torch's ``clip_grad_norm_(foreach=True)`` on the same
gradients back to back; figures are medians over rounds.  Before that,
rank 0 times the check's own work alone (``CopyCheck.contributions``, one copy set holding
every tensor): on 2 cores shared by 2 ranks that is the precise figure, the ratios the noisy one.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time

import torch
import torch.distributed as dist

import distclip
from distclip.copycheck import CopyCheck
from distributed import plain_params
from timing import gpt2_small_shapes

CASES = {
    "150 x (64, 64)": [(64, 64)] * 150,
    "2,000 x (32, 32)": [(32, 32)] * 2000,
    "20,000 x (8, 8)": [(8, 8)] * 20000,
    "GPT-2 small (148 tensors, 124M)": gpt2_small_shapes(),
}


def seconds(fn, calls: int) -> float:
    dist.barrier()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    dist.barrier()
    return (time.perf_counter() - start) / calls


def compare(fn, plan, calls: int, rounds: int, torch_fn) -> tuple[float, float, float]:
    """Medians of (with the check, without it, torch's clip), timed back to back each round."""
    checked = plan.copy_check
    unchecked = CopyCheck({}, [], dist.get_rank())
    with_check, without, torch_times = [], [], []
    for _ in range(rounds):
        plan.copy_check = checked
        with_check.append(seconds(fn, calls))
        plan.copy_check = unchecked
        without.append(seconds(fn, calls))
        torch_times.append(seconds(torch_fn, calls))
    plan.copy_check = checked
    return statistics.median(with_check), statistics.median(without), statistics.median(torch_times)


def check_alone(shapes, calls: int = 200, rounds: int = 15) -> float:
    """Seconds per call of the check's own work for one copy set of tensors of ``shapes``."""
    local = [torch.randn(shape) for shape in shapes]
    check = CopyCheck({(0, 1): [(i, 0, t.numel()) for i, t in enumerate(local)]}, local, 0)
    cpu = torch.device("cpu")
    for _ in range(20):
        check.contributions(local, cpu)
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(calls):
            check.contributions(local, cpu)
        times.append((time.perf_counter() - start) / calls)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=None)
    parser.add_argument("--rounds", type=int, default=9)
    args = parser.parse_args()
    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    rows = []
    for case, shapes in CASES.items():
        if dist.get_rank() == 0:
            alone = check_alone(shapes)
            rows.append({"case": case, "check_alone_us": alone * 1e6})
            print(f"{case:34s} the check alone: {alone * 1e6:7.1f} us per step", flush=True)
        dist.barrier()
        params = plain_params(shapes)
        calls = 3 if len(shapes) < 1000 and "GPT" not in case else 1
        for p in (2.0, math.inf):
            clipper = distclip.GradClipper(params, max_norm=1e9, norm_type=p)
            clipper.clip_()  # plans
            torch_clip = lambda: torch.nn.utils.clip_grad_norm_(params, 1e9, p, foreach=True)  # noqa: E731
            checked, unchecked, torch_s = compare(clipper.clip_, clipper._plan, calls, args.rounds, torch_clip)
            rows.append({"case": case, "p": p, "with_check_ms": checked * 1e3, "without_ms": unchecked * 1e3,
                         "torch_ms": torch_s * 1e3, "overhead": checked / unchecked - 1,
                         "vs_torch": checked / torch_s})
            if dist.get_rank() == 0:
                r = rows[-1]
                print(f"{case:34s} p={p:<4} GradClipper.clip_: {r['with_check_ms']:8.3f} ms with the check, "
                      f"{r['without_ms']:8.3f} without ({100 * r['overhead']:+.1f}%); torch {r['torch_ms']:8.3f} ms: "
                      f"{r['vs_torch']:.2f}x torch", flush=True)
    if dist.get_rank() == 0 and args.out:
        with open(args.out, "w") as f:
            json.dump({"world_size": dist.get_world_size(), "rows": rows}, f, indent=1)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
