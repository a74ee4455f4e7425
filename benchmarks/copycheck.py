"""The copy check's cost: the same clip with and without it, interleaved in one run.

    OMP_NUM_THREADS=1 torchrun --nproc-per-node=2 benchmarks/copycheck.py [--out copycheck.json]

DDP-style replicated fp32 gradients (every tensor is a copy across the 2 ranks, so the check
fingerprints one copy set of all of them) at 2,000 and 20,000 small tensors, each as separate
tensors and as views into one flat buffer (DDP's ``gradient_as_bucket_view=True``, whose clip is
faster: distclip norms and scales the buffer's runs as one tensor each), for p = 2.  "without"
swaps in an empty check (no copy set), which is what the reduction cost before the check
existed.  Each round times, back to back on the same gradients: the check's own work alone
(``CopyCheck.contributions`` at successive reduction counts, so that the window rotates as in
training), the clip with the check, without it, torch's ``clip_grad_norm_(foreach=True)`` and,
for the buffer, the per-call pointer check (``spans.Runs.views``) that sampling every tensor of
it with one gather would need, every other round in reverse order; figures are medians over
rounds.  On 2 cores shared by 2 ranks
the check alone over the clip without it is the precise figure, the with/without ratio the
noisy one.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import time

import torch
import torch.distributed as dist
from torch import nn

import distclip
from distclip.copycheck import UNITS_PER_STEP, CopyCheck
from distclip.spans import find_runs
from distributed import plain_params

CASES = {
    "2,000 x (32, 32)": (2000, (32, 32)),
    "20,000 x (8, 8)": (20000, (8, 8)),
}
LAYOUTS = ("separate", "bucket-view")


def bucket_view_params(count: int, shape: tuple[int, ...], seed: int = 0) -> list[nn.Parameter]:
    """``count`` parameters whose gradients are views into one flat buffer, end to end."""
    buffer = torch.randn(count, *shape, generator=torch.Generator().manual_seed(seed))
    params = [nn.Parameter(torch.empty(shape)) for _ in range(count)]
    for param, view in zip(params, buffer.unbind()):
        param.grad = view
    return params


def seconds(fn, calls: int) -> float:
    dist.barrier()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    dist.barrier()
    return (time.perf_counter() - start) / calls


def measure(params: list[nn.Parameter], calls: int, rounds: int) -> dict[str, float]:
    """Medians over ``rounds`` of seconds per call, each round timing back to back: the check's
    own work, the clip with the check, without it, torch's clip, and (views into one buffer
    only) the per-call pointer check a gather per buffer would need."""
    clipper = distclip.GradClipper(params, max_norm=1e9)
    clipper.clip_()  # plans
    plan, local = clipper._plan, [p.grad for p in params]
    checked, unchecked = plan.copy_check, CopyCheck({}, [], dist.get_rank())
    device, step = plan.device, itertools.count(10**6)
    runs = find_runs([(i, 0, t.numel()) for i, t in enumerate(local)], local)

    def with_check():
        plan.copy_check = checked
        clipper.clip_()

    def without_check():
        plan.copy_check = unchecked
        clipper.clip_()

    cases = {
        "check_alone": lambda: checked.contributions(local, device, next(step)),  # the window rotates
        "with_check": with_check,
        "without": without_check,
        "torch": lambda: torch.nn.utils.clip_grad_norm_(params, 1e9, 2.0, foreach=True),
    }
    if runs is not None:
        cases["pointer_check"] = lambda: runs.views(local)
    times: dict[str, list[float]] = {name: [] for name in cases}
    for round_ in range(rounds):
        # Every other round in reverse order, so that no case always follows the same one.
        for name, fn in list(cases.items())[:: 1 if round_ % 2 else -1]:
            # The short ones many times over, so that the barriers around them do not count.
            times[name].append(seconds(fn, calls if name in ("with_check", "without", "torch") else 30 * calls))
    plan.copy_check = checked
    return {name: statistics.median(t) for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=None)
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args()
    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    rows = []
    for case, (count, shape) in CASES.items():
        for layout in LAYOUTS:
            params = plain_params([shape] * count) if layout == "separate" else bucket_view_params(count, shape)
            t = measure(params, calls=3, rounds=args.rounds)
            row = {"case": f"{case}, {layout}", "units_per_step": UNITS_PER_STEP,
                   **{f"{name}_ms": value * 1e3 for name, value in t.items()},
                   "check_alone_vs_clip": t["check_alone"] / t["without"],
                   "overhead": t["with_check"] / t["without"] - 1, "vs_torch": t["with_check"] / t["torch"]}
            if "pointer_check" in t:
                row["pointer_check_vs_clip"] = t["pointer_check"] / t["without"]
            rows.append(row)
            if dist.get_rank() == 0:
                pointers = f"; pointer check {100 * row['pointer_check_vs_clip']:.1f}%" if "pointer_check" in t else ""
                print(f"{row['case']:32s} check alone {1e3 * row['check_alone_ms']:6.1f} us = "
                      f"{100 * row['check_alone_vs_clip']:.2f}% of the clip | clip {row['with_check_ms']:7.3f} ms with, "
                      f"{row['without_ms']:7.3f} without ({100 * row['overhead']:+.1f}%); torch {row['torch_ms']:7.3f} ms"
                      f"{pointers}", flush=True)
    if dist.get_rank() == 0 and args.out:
        with open(args.out, "w") as f:
            json.dump({"world_size": dist.get_world_size(), "rows": rows}, f, indent=1)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
