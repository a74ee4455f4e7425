"""How SpikeSkip's ``burst`` rule behaves on scripted norm sequences: which true spikes it skips,
how many other steps it skips (a lasting shift of level, noise), and the last of them.

Each scenario is a norm of 0.8 with lognormal noise (sd 5% unless named), 400 steps, over 20
seeds, judged by the real :class:`distclip.SpikeSkip` (sigmas=6, window=128, min_history=20)
with ``burst`` = 0 (OLMo-core's rule: every finite value enters the window), 1, 3 (the default)
and "never" (every spike stays out: distclip's rule before issue 28).

    python benchmarks/spike_rules.py
"""

from __future__ import annotations

import math
import random
import statistics

import torch

import distclip

STEPS, SEEDS = 400, 20
BURSTS = {"0 (OLMo-core)": 0, "1": 1, "3 (default)": 3, "never": 10**9}


def _base(seed: int, noise: float = 0.05) -> list[float]:
    r = random.Random(seed)
    return [0.8 * math.exp(noise * r.gauss(0, 1)) for _ in range(STEPS)]


def _times(norms: list[float], factors: dict[int, float]) -> list[float]:
    return [x * factors.get(i, 1.0) for i, x in enumerate(norms)]


def _shift(start: int, factor: float) -> dict[int, float]:
    return {i: factor for i in range(start, STEPS)}


def scenarios(seed: int) -> dict[str, tuple[list[float], set[int]]]:
    """name: (norms, the steps that are true spikes)."""
    b = _base(seed)
    burst = {200: 10.0, 201: 10.0, 202: 10.0}
    return {
        "lone x10 spike @200": (_times(b, {200: 10.0}), {200}),
        "burst of 3 x10 @200-202": (_times(b, burst), set(burst)),
        "burst of 3 x3 @200-202": (_times(b, {200: 3.0, 201: 3.0, 202: 3.0}), {200, 201, 202}),
        "x10 @200, then x3 @250": (_times(b, {200: 10.0, 250: 3.0}), {200, 250}),
        "burst x10 @200-202, x3 @250": (_times(b, {**burst, 250: 3.0}), {*burst, 250}),
        "burst of 10 x10 @200-209": (_times(b, dict.fromkeys(range(200, 210), 10.0)), set(range(200, 210))),
        "shift 0.8 -> 5 @300": (_times(b, _shift(300, 6.25)), set()),
        "shift x5 @200": (_times(b, _shift(200, 5.0)), set()),
        "shift x100 @200": (_times(b, _shift(200, 100.0)), set()),
        "shift x5 @200, noise 0.5%": (_times(_base(seed, 0.005), _shift(200, 5.0)), set()),
        "constant 0.8, x5 @200": (_times([0.8] * STEPS, _shift(200, 5.0)), set()),
        "noise 30%, no spike": (_base(seed, 0.3), set()),
    }


def skipped_steps(norms: list[float], burst: int) -> list[int]:
    rule = distclip.SpikeSkip(sigmas=6.0, window=128, min_history=20, burst=burst)
    no, nan = torch.zeros((), dtype=torch.bool), torch.tensor(math.nan, dtype=torch.float64)
    return [i for i, g in enumerate(norms) if bool(rule.step(torch.tensor(g, dtype=torch.float64), nan, no, no))]


def main() -> None:
    for label, burst in BURSTS.items():
        print(f"burst = {label}")
        rows: dict[str, list[tuple[int, int, int, int | None]]] = {}
        for seed in range(SEEDS):
            for name, (norms, spikes) in scenarios(seed).items():
                skipped = skipped_steps(norms, burst)
                others = [i for i in skipped if i not in spikes]
                rows.setdefault(name, []).append((len(spikes & set(skipped)), len(spikes), len(others),
                                                  max(others) if others else None))
        for name, runs in rows.items():
            caught, total = sum(r[0] for r in runs), sum(r[1] for r in runs)
            others = [r[2] for r in runs]
            last = max((r[3] for r in runs if r[3] is not None), default=None)
            print(f"  {name:30} true spikes skipped {caught:3}/{total:<3}  other skips per run: "
                  f"mean {statistics.fmean(others):5.1f} max {max(others):3d}  "
                  f"last other skip {last if last is not None else '-'}")


if __name__ == "__main__":
    main()
