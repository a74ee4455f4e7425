"""Per-step Python overhead with many small tensors (LoRA / MoE-like): 20,000 parameters.

    python benchmarks/overhead.py [--count 20000]
"""

from __future__ import annotations

import argparse
import json

import torch

import distclip
from timing import median_seconds


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--count", type=int, nargs="+", default=[150, 2000, 20000])
    parser.add_argument("--out", default="overhead.json")
    args = parser.parse_args()
    rows = []
    for count in args.count:
        params = [torch.nn.Parameter(torch.empty(16, 8)) for _ in range(count)]
        for p in params:
            p.grad = torch.randn(16, 8)
        clipper = distclip.GradClipper(params, max_norm=1e9)
        times = {
            "torch foreach": median_seconds(lambda: torch.nn.utils.clip_grad_norm_(params, 1e9, foreach=True)),
            "distclip.clip_grad_norm_": median_seconds(lambda: distclip.clip_grad_norm_(params, 1e9)),
            "distclip.GradClipper": median_seconds(clipper.clip_),
        }
        for name, seconds in times.items():
            rows.append({"tensors": count, "case": name, "ms": seconds * 1e3, "vs_torch": seconds / times["torch foreach"]})
    print(f"{'tensors':>8} {'case':28} {'ms':>9} {'x torch':>8}")
    for r in rows:
        print(f"{r['tensors']:8} {r['case']:28} {r['ms']:9.2f} {r['vs_torch']:8.2f}")
    with open(args.out, "w") as f:
        json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
