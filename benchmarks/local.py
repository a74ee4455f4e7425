"""Case 1 and 6: one process, GPT-2-small gradient shapes, against torch and the floor.

    python benchmarks/local.py [--device cuda] [--out benchmarks/local.json]

The floor: clipping reads every gradient once for the norm and reads and writes it once for the
scaling, so it cannot beat 3 x gradient bytes / measured copy bandwidth (2 x bytes per copy).
"""

from __future__ import annotations

import argparse
import json

import torch

import distclip
import statistics

from timing import copy_bandwidth, gpt2_small_shapes, interleaved_seconds


def per_tensor_loop(params, max_norm):
    norms = [torch.linalg.vector_norm(p.grad) for p in params]
    total = torch.linalg.vector_norm(torch.stack(norms))
    coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    for p in params:
        p.grad.mul_(coef)
    return total


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default="local.json")
    args = parser.parse_args()
    device = torch.device(args.device)
    bandwidth = copy_bandwidth(device)
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        params = [torch.nn.Parameter(torch.empty(s, device=device, dtype=dtype)) for s in gpt2_small_shapes()]
        for p in params:
            p.grad = torch.randn(p.shape, device=device, dtype=dtype)
        nbytes = sum(p.grad.numel() * p.grad.element_size() for p in params)
        clipper = distclip.GradClipper(params, max_norm=1e9)  # 1e9: measure the work, keep the values
        cases = {
            "torch foreach": lambda: torch.nn.utils.clip_grad_norm_(params, 1e9, foreach=True),
            "torch per-tensor loop": lambda: per_tensor_loop(params, 1e9),
            "distclip.clip_grad_norm_": lambda: distclip.clip_grad_norm_(params, 1e9),
            "distclip.GradClipper": lambda: clipper.clip_().total_norm,
        }
        # Each variant's norm of the same gradients (max_norm 1e9 leaves them as they are),
        # against the float64 norm.
        exact = torch.linalg.vector_norm(torch.cat([p.grad.double().flatten() for p in params])).item()
        errors = {name: abs(fn().double().item() - exact) / exact for name, fn in cases.items()}
        times = {name: statistics.median(t) for name, t in interleaved_seconds(cases, rounds=9).items()}
        floor = 3 * nbytes / bandwidth
        for name, seconds in times.items():
            rows.append({"dtype": str(dtype).split(".")[1], "case": name, "ms": seconds * 1e3,
                         "vs_torch": seconds / times["torch foreach"], "vs_floor": seconds / floor,
                         "relative_error": errors[name], "tensors": len(params), "grad_bytes": nbytes})
    sweep = []
    for total_mb in (4, 16, 64, 256):  # 150 equal fp32 tensors, growing total size
        numel = total_mb * (1 << 20) // 4 // 150
        params = [torch.nn.Parameter(torch.empty(numel, device=device)) for _ in range(150)]
        for p in params:
            p.grad = torch.randn(numel, device=device)
        nbytes = 150 * numel * 4
        clipper = distclip.GradClipper(params, max_norm=1e9)
        times = interleaved_seconds(
            {"torch": lambda: torch.nn.utils.clip_grad_norm_(params, 1e9, foreach=True), "distclip": clipper.clip_}, rounds=9
        )
        torch_s, ours_s = statistics.median(times["torch"]), statistics.median(times["distclip"])
        sweep.append({"grad_bytes": nbytes, "torch_ms": torch_s * 1e3, "distclip_ms": ours_s * 1e3,
                      "floor_ms": 3 * nbytes / bandwidth * 1e3})
    print(f"device {device}, copy bandwidth {bandwidth / 1e9:.1f} GB/s")
    print(f"{'dtype':9} {'case':28} {'ms':>9} {'x torch':>8} {'x floor':>8} {'norm vs float64':>16}")
    for r in rows:
        print(f"{r['dtype']:9} {r['case']:28} {r['ms']:9.2f} {r['vs_torch']:8.2f} {r['vs_floor']:8.2f} {r['relative_error']:16.1e}")
    print(f"{'grad MB':>8} {'torch ms':>9} {'GradClipper ms':>15} {'floor ms':>9}")
    for r in sweep:
        print(f"{r['grad_bytes'] / 2**20:8.0f} {r['torch_ms']:9.2f} {r['distclip_ms']:15.2f} {r['floor_ms']:9.2f}")
    with open(args.out, "w") as f:
        json.dump({"device": str(device), "copy_bandwidth_GBps": bandwidth / 1e9, "rows": rows, "sweep": sweep}, f, indent=1)


if __name__ == "__main__":
    main()
