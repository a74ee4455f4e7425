"""Per-call host overhead with many small tensors (LoRA / MoE-like), single process.

    OMP_NUM_THREADS=1 python benchmarks/overhead.py [--count 150 2000 20000] [--layout separate buffer] [--rounds 9]

torch's ``clip_grad_norm_(foreach=True)``, ``distclip.clip_grad_norm_`` (its plan cached across
calls) and ``GradClipper.clip_`` on the same gradients, interleaved round by round.  Layout
``separate``: each gradient its own tensor; ``buffer``: the gradients are consecutive views into
one flat buffer, as DDP's ``gradient_as_bucket_view`` buckets and Megatron's or DeepSpeed's
contiguous gradient buffers hold them (distclip then norms and scales runs, distclip/spans.py).
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch

import distclip
import distclip.plancache
from timing import interleaved_seconds


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--count", type=int, nargs="+", default=[150, 2000, 20000])
    parser.add_argument("--layout", nargs="+", default=["separate", "buffer"], choices=["separate", "buffer"])
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--out", default="overhead.json")
    args = parser.parse_args()
    rows = []
    for layout, count in [(layout, count) for layout in args.layout for count in args.count]:
        # A process clips one model: no plan from an earlier case (same shapes, other layout).
        distclip.plancache.clear_plans()
        params = [torch.nn.Parameter(torch.empty(16, 8)) for _ in range(count)]
        buffer = torch.randn(count, 16, 8)
        for i, p in enumerate(params):
            p.grad = buffer[i] if layout == "buffer" else buffer[i].clone()
        clipper = distclip.GradClipper(params, max_norm=1e9)
        # Enough calls per timing that each lasts milliseconds, not microseconds.
        calls = max(1, 20000 // count)

        def repeat(fn):
            return lambda: [fn() for _ in range(calls)]

        times = interleaved_seconds(
            {
                "torch foreach": repeat(lambda: torch.nn.utils.clip_grad_norm_(params, 1e9, foreach=True)),
                "distclip.clip_grad_norm_": repeat(lambda: distclip.clip_grad_norm_(params, 1e9)),
                "distclip.GradClipper": repeat(clipper.clip_),
            },
            rounds=args.rounds,
        )
        torch_median = statistics.median(times["torch foreach"])
        for name, seconds in times.items():
            median = statistics.median(seconds)
            rows.append(
                {
                    "layout": layout,
                    "tensors": count,
                    "case": name,
                    "ms": median / calls * 1e3,
                    "min_ms": min(seconds) / calls * 1e3,
                    "vs_torch": median / torch_median,
                }
            )
    print(f"{'layout':>8} {'tensors':>8} {'case':28} {'median ms':>10} {'min ms':>8} {'x torch':>8}")
    for r in rows:
        print(f"{r['layout']:>8} {r['tensors']:8} {r['case']:28} {r['ms']:10.3f} {r['min_ms']:8.3f} {r['vs_torch']:8.2f}")
    with open(args.out, "w") as f:
        json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
