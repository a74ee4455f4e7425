"""Issue 26 part 4: what per-parameter norms and metrics cost, against the plain clip and
against what users do today, measured in the same run, interleaved round by round.

    OMP_NUM_THREADS=1 torchrun --nproc-per-node=2 benchmarks/layer_norms.py [--out layer_norms.json]

Cases, at 150 / 2,000 / 20,000 parameters of 16x8 (``--counts``):

* FSDP2 shards (DTensors built with ``DTensor.from_local``, as ``distributed.py``: wrapping
  20,000 parameters with ``fully_shard`` takes minutes):
  ``GradClipper(groups="parameters")`` (reading ``result.all_group_norms``) against the plain
  ``GradClipper`` and against today's per-parameter norms, ``p.grad.full_tensor().norm()``
  (one all-gather each) after torch's clip (at 20,000 the norms alone: torch's first clip of
  20,000 DTensors spends ~900 s in sharding propagation).
* DDP-replicated gradients (identical on both ranks): the same, today's being torch's clip and
  ``p.grad.norm()`` per parameter on one rank.
* Metrics: ``clip_(metrics={Sum, Max, Mean})`` against ``clip_()`` followed by one
  ``all_reduce`` per metric (the Mean as a sum divided by the world size).

Times are medians on rank 0 of calls each started right after a barrier.  The bandwidth floor (3 x gradient bytes / measured copy bandwidth: the norm's read,
the scale's read and write) is printed per count; at these sizes per-tensor work, not bytes,
sets the time.
"""

from __future__ import annotations

import argparse
import json
import os

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Shard

import distclip
from distributed import interleaved_medians
from timing import copy_bandwidth

SHAPE = (16, 8)


def module_of(params: list[nn.Parameter]) -> nn.Module:
    """A module holding ``params`` under the names ``layers.<i>.weight`` (what the per-parameter
    norms are keyed by)."""
    layers = nn.ModuleList(nn.Module() for _ in params)
    for layer, p in zip(layers, params):
        layer.register_parameter("weight", p)
    model = nn.Module()
    model.layers = layers
    return model


def sharded_params(count: int) -> list[nn.Parameter]:
    world = dist.get_world_size()
    mesh = init_device_mesh("cpu", (world,))
    generator = torch.Generator().manual_seed(count + dist.get_rank())
    params = []
    for _ in range(count):
        local = torch.randn(SHAPE[0] // world, SHAPE[1], generator=generator)
        p = nn.Parameter(DTensor.from_local(torch.empty_like(local), mesh, [Shard(0)]))
        p.grad = DTensor.from_local(local, mesh, [Shard(0)])
        params.append(p)
    return params


def replicated_params(count: int) -> list[nn.Parameter]:
    generator = torch.Generator().manual_seed(count)  # the same on every rank, as after DDP
    params = [nn.Parameter(torch.empty(SHAPE)) for _ in range(count)]
    for p in params:
        p.grad = torch.randn(SHAPE, generator=generator)
    return params


def per_parameter_cases(layout: str, count: int) -> dict:
    params = sharded_params(count) if layout == "FSDP2" else replicated_params(count)
    model = module_of(params)
    named = list(model.named_parameters())
    plain = distclip.GradClipper(model, max_norm=1e9)
    per_parameter = distclip.GradClipper(model, max_norm=1e9, groups="parameters")
    if layout == "FSDP2":

        def today():
            # Above 2,000 DTensors torch's clip is left out (its first call spends ~900 s in
            # DTensor sharding propagation, RESULTS.md case 3): the norms alone, a lower bound.
            norm = torch.nn.utils.clip_grad_norm_(params, 1e9, foreach=True).full_tensor() if count <= 2000 else None
            return norm, {name: p.grad.full_tensor().norm() for name, p in named}

    else:

        def today():
            norm = torch.nn.utils.clip_grad_norm_(params, 1e9, foreach=True)
            if dist.get_rank() == 0:  # the rank that logs
                return norm, {name: p.grad.norm() for name, p in named}
            return norm, {}

    # The per-parameter norms agree with today's (checked once, outside the timing; each
    # clipper's first step, which makes its plan and agrees on names, is not timed).
    plain.clip_()
    theirs = today()[1]
    ours = per_parameter.clip_().all_group_norms
    if theirs:
        worst = max(abs(ours[name].item() - theirs[name].item()) / theirs[name].item() for name in theirs)
        assert worst < 1e-5, worst
    cases = {
        "GradClipper, plain": plain.clip_,
        'GradClipper(groups="parameters")': lambda: per_parameter.clip_().all_group_norms,
        "today: torch clip + a norm per parameter": today,
    }
    return cases


def metric_cases(count: int) -> dict:
    params = sharded_params(count)
    clipper = distclip.GradClipper(params, max_norm=1e9)
    world = dist.get_world_size()
    tokens, logit, z = torch.tensor(1000.0), torch.tensor(3.5), torch.tensor(0.25)

    def in_the_clip():
        metrics = {"tokens": distclip.Sum(tokens), "max_logit": distclip.Max(logit), "z": distclip.Mean(z)}
        return clipper.clip_(metrics=metrics).metrics

    def separately():
        clipper.clip_()
        summed, largest, mean = tokens.clone(), logit.clone(), z.clone()
        dist.all_reduce(summed)
        dist.all_reduce(largest, op=dist.ReduceOp.MAX)
        dist.all_reduce(mean)
        return summed, largest, mean / world

    in_the_clip()  # the first step with metrics agrees on their names: not timed
    return {"clip_() alone": clipper.clip_, "clip_(metrics=3)": in_the_clip, "clip_() + 3 all_reduce": separately}


def report(rows: list[dict], case: str, medians: dict, plain: str, today: str, floor_ms: float) -> None:
    """Add one case's rows (each variant against ``plain`` and ``today``) and print them at once."""
    for variant, seconds in medians.items():
        row = {"case": case, "variant": variant, "ms": seconds * 1e3, "vs_plain": seconds / medians[plain],
               "vs_today": seconds / medians[today], "floor_ms": floor_ms}
        rows.append(row)
        if dist.get_rank() == 0:
            print(f"{case:28} {variant:42} {row['ms']:9.3f} {row['vs_plain']:8.3f} {row['vs_today']:8.3f} {floor_ms:9.4f}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="layer_norms.json")
    parser.add_argument("--counts", type=int, nargs="+", default=[150, 2000, 20000])
    args = parser.parse_args()
    dist.init_process_group("gloo")
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    bandwidth = copy_bandwidth(torch.device("cpu"))
    if dist.get_rank() == 0:
        print(f"world {dist.get_world_size()}, gloo on CPU, copy bandwidth {bandwidth / 1e9:.1f} GB/s")
        print(f"{'case':28} {'variant':42} {'ms':>9} {'x plain':>8} {'x today':>8} {'floor ms':>9}", flush=True)
    rows: list[dict] = []
    for count in args.counts:
        # 20,000 full_tensor() calls take tens of seconds: there the correctness check's call is
        # the warm-up, and one round is timed.
        rounds, warmup = (15, 2) if count <= 150 else (9, 2) if count <= 2000 else (1, 0)
        floor_ms = 3 * count * SHAPE[0] * SHAPE[1] * 4 / bandwidth * 1e3
        for layout in ("FSDP2", "DDP"):
            cases = per_parameter_cases(layout, count)
            medians = interleaved_medians(cases, rounds=rounds, warmup=warmup)
            report(rows, f"{layout} {count} params", medians, "GradClipper, plain",
                   "today: torch clip + a norm per parameter", floor_ms)
        medians = interleaved_medians(metric_cases(count), rounds=rounds, warmup=warmup)
        report(rows, f"metrics, FSDP2 {count} params", medians, "clip_() alone", "clip_() + 3 all_reduce", floor_ms)
        if dist.get_rank() == 0:
            with open(args.out, "w") as f:
                json.dump({"world_size": dist.get_world_size(), "bandwidth": bandwidth, "rows": rows}, f, indent=1)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
