"""What a threshold policy or spike skipping adds to GradClipper.clip_() per step.

Single process, 150 small fp32 gradients (the per-call host overhead regime, where the few
extra tensor ops of a policy weigh most), interleaved against the fixed-threshold clipper and
torch's clip_grad_norm_ on the same gradients.  Medians of 25 rounds of 100 calls.

    python benchmarks/policies.py
"""

from __future__ import annotations

import statistics

import torch

import distclip
from timing import interleaved_seconds

CALLS = 100


def main() -> None:
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(64, 64)) for _ in range(150)]
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3  # below the threshold: nothing is rescaled
    clippers = {
        "fixed": distclip.GradClipper(params, max_norm=1.0),
        "zclip": distclip.GradClipper(params, max_norm=distclip.ZClip(warmup_steps=5)),
        "autoclip": distclip.GradClipper(params, max_norm=distclip.AutoClip(window=1000, warmup_steps=5)),
        "fixed+spikeskip": distclip.GradClipper(params, max_norm=1.0, skip_spikes=distclip.SpikeSkip()),
        "zclip+spikeskip+loss": distclip.GradClipper(params, max_norm=distclip.ZClip(warmup_steps=5),
                                                     skip_spikes=distclip.SpikeSkip()),
    }
    loss = torch.tensor(2.0)
    cases = {"torch": lambda: [torch.nn.utils.clip_grad_norm_(params, 1e9) for _ in range(CALLS)]}
    for name, clipper in clippers.items():
        with_loss = name.endswith("+loss")
        cases[name] = lambda c=clipper, w=with_loss: [c.clip_(loss=loss if w else None) for _ in range(CALLS)]
    times = {name: statistics.median(t) / CALLS * 1e6 for name, t in interleaved_seconds(cases, rounds=25).items()}
    print(f"{'case':24} {'us/call':>8} {'vs fixed':>9} {'vs torch':>9}")
    for name, us in times.items():
        print(f"{name:24} {us:8.1f} {us / times['fixed']:9.2f} {us / times['torch']:9.2f}")


if __name__ == "__main__":
    main()
