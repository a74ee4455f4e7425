"""What the fused AdamW step's ``grad_scale`` path costs, against torch's clip: the floor of
``GradClipper.attach``'s zero-pass clip besides the norm pass (case 5 of distributed.py).

    OMP_NUM_THREADS=1 python benchmarks/grad_scale.py

One process, GPT-2-small fp32 shapes; the fused AdamW step alone, the same step with a
``grad_scale`` tensor (as GradScaler and GradClipper.attach hand it to the kernel), and torch's
``clip_grad_norm_(foreach=True)`` then the step; 9 interleaved rounds, medians.
"""

from __future__ import annotations

import statistics

import torch

from timing import gpt2_small_shapes, interleaved_seconds


def main() -> None:
    generator = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(shape, generator=generator)) for shape in gpt2_small_shapes()]
    for p in params:
        p.grad = torch.randn(p.shape, generator=generator) * 1e-3
    optimizer = torch.optim.AdamW(params, lr=1e-9, fused=True)
    optimizer.step()  # the optimizer state exists before timing
    scale = torch.ones((), dtype=torch.float32)

    def step_with_grad_scale() -> None:
        optimizer.grad_scale = scale
        optimizer.step()
        optimizer.grad_scale = None

    def clip_then_step() -> None:
        torch.nn.utils.clip_grad_norm_(params, 1e9, foreach=True)
        optimizer.step()

    times = interleaved_seconds(
        {"step": optimizer.step, "step with grad_scale": step_with_grad_scale, "torch clip, then step": clip_then_step}
    )
    medians = {name: statistics.median(seconds) * 1e3 for name, seconds in times.items()}
    for name, ms in medians.items():
        print(f"{name:24} {ms:8.1f} ms   (+{ms - medians['step']:.1f} ms over the step alone)")


if __name__ == "__main__":
    main()
