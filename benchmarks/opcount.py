"""How many aten ops one clipping call dispatches, and its time, on small separate tensors.

    OMP_NUM_THREADS=1 python benchmarks/opcount.py [--count 150]

Explains the per-call overhead at few tensors (RESULTS.md): each small op costs microseconds on
the host, on a GPU as on the CPU.
"""

from __future__ import annotations

import argparse
import collections
import time

import torch
from torch.utils._python_dispatch import TorchDispatchMode

import distclip


class CountOps(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[str(func)] += 1
        return func(*args, **(kwargs or {}))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--count", type=int, default=150)
    parser.add_argument("--calls", type=int, default=300)
    args = parser.parse_args()
    torch.set_num_threads(1)
    generator = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.empty(16, 8)) for _ in range(args.count)]
    for p in params:
        p.grad = torch.randn(16, 8, generator=generator)
    clipper = distclip.GradClipper(params, max_norm=1e9)
    calls = {
        "torch clip_grad_norm_(foreach=True)": lambda: torch.nn.utils.clip_grad_norm_(params, 1e9, foreach=True),
        "distclip.clip_grad_norm_": lambda: distclip.clip_grad_norm_(params, 1e9),
        "GradClipper.clip_": clipper.clip_,
    }
    for name, call in calls.items():
        for _ in range(20):  # plans, caches
            call()
        with CountOps() as counter:
            call()
        start = time.perf_counter()
        for _ in range(args.calls):
            call()
        microseconds = (time.perf_counter() - start) / args.calls * 1e6
        print(f"{name:38} {sum(counter.ops.values()):4d} ops {microseconds:8.1f} us/call")
        print("    " + ", ".join(f"{op.removeprefix('aten.')} x{n}" for op, n in counter.ops.most_common()))


if __name__ == "__main__":
    main()
