"""Cases 2-5: distributed clipping against torch, measured in the same run.

    OMP_NUM_THREADS=1 torchrun --nproc-per-node=2 benchmarks/distributed.py [--out distributed.json]

2. DDP-replicated gradients: distclip (norm work split across the replicas) vs torch's local clip.
3. FSDP2-style DTensor shards (built with DTensor.from_local: wrapping 20,000 parameters with
   fully_shard takes minutes) at 150, 2,000 and 20,000 parameters: torch's clip on DTensor grads
   plus the ``full_tensor()`` users need for a plain norm, vs distclip and GradClipper.
4. FSDP1: ``FullyShardedDataParallel.clip_grad_norm_`` vs distclip on the root module.
5. Clipping overhead inside a fused AdamW step: GradClipper attached (zero-pass, the coefficient
   goes through grad_scale) vs torch's clip before the step; overhead = step with clip - step alone.
Times are medians on rank 0, every call preceded by a barrier so the ranks start together.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Shard

import distclip
from timing import gpt2_small_shapes, median_seconds


def timed(fn, repeats=7):
    def call():
        dist.barrier()
        fn()

    # The barrier is in every variant, so the ratios compare clipping alone.
    return median_seconds(call, repeats=repeats) - median_seconds(dist.barrier, repeats=repeats)


def plain_params(shapes, seed=0):
    generator = torch.Generator().manual_seed(seed)
    params = [nn.Parameter(torch.empty(s)) for s in shapes]
    for p in params:
        p.grad = torch.randn(p.shape, generator=generator)
    return params


def case_ddp(rows):
    params = plain_params(gpt2_small_shapes())  # identical on both ranks, as after DDP's all-reduce
    clipper = distclip.GradClipper(params, max_norm=1e9)
    medians = interleaved_medians(
        {
            "torch local clip": lambda: torch.nn.utils.clip_grad_norm_(params, 1e9, foreach=True),
            "distclip.clip_grad_norm_": lambda: distclip.clip_grad_norm_(params, 1e9),
            "distclip.GradClipper": clipper.clip_,
        },
        rounds=9,
    )
    for name, seconds in medians.items():
        add(rows, "2 DDP GPT-2-small (124M fp32)", name, seconds, medians["torch local clip"])


def case_fsdp2(rows, counts):
    world, rank = dist.get_world_size(), dist.get_rank()
    mesh = init_device_mesh("cpu", (world,))
    for count in counts:
        generator = torch.Generator().manual_seed(count)
        params = []
        for _ in range(count):
            local = torch.randn(16 // world, 8, generator=generator)
            p = nn.Parameter(DTensor.from_local(torch.empty_like(local), mesh, [Shard(0)]))
            p.grad = DTensor.from_local(local, mesh, [Shard(0)])
            params.append(p)
        clipper = distclip.GradClipper(params, max_norm=1e9)
        medians = interleaved_medians(
            {
                "torch clip + full_tensor()": lambda: torch.nn.utils.clip_grad_norm_(params, 1e9, foreach=True).full_tensor(),
                "distclip.clip_grad_norm_": lambda: distclip.clip_grad_norm_(params, 1e9),
                "distclip.GradClipper": clipper.clip_,
            },
            rounds=25 if count <= 2000 else 3,
        )
        for name, seconds in medians.items():
            add(rows, f"3 FSDP2 shards, {count} params", name, seconds, medians["torch clip + full_tensor()"])


def interleaved_medians(cases, rounds=25, warmup=2):
    """Median seconds of each case, every round running each once after a barrier (on rank 0)."""
    times = {name: [] for name in cases}
    for round_ in range(warmup + rounds):
        for name, fn in cases.items():
            dist.barrier()
            start = time.perf_counter()
            fn()
            if round_ >= warmup:
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(seconds) for name, seconds in times.items()}


def case_fsdp1(rows):
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(1024, 1024) for _ in range(24)])
    for i, layer in enumerate(model):
        model[i] = FSDP(layer, device_id=torch.device("cpu"))
    model = FSDP(model, device_id=torch.device("cpu"))
    model(torch.randn(4, 1024)).square().mean().backward()
    clipper = distclip.GradClipper(model, max_norm=1e9)
    # Interleaved round by round: the three differ by ~1 ms, less than the drift between runs.
    medians = interleaved_medians(
        {
            "FSDP.clip_grad_norm_": lambda: model.clip_grad_norm_(1e9),
            "distclip.clip_grad_norm_": lambda: distclip.clip_grad_norm_(model, 1e9),
            "distclip.GradClipper": clipper.clip_,
        }
    )
    label = "4 FSDP1 24x Linear(1024,1024)"
    torch_s = medians["FSDP.clip_grad_norm_"]
    for name, seconds in medians.items():
        add(rows, label, name, seconds, torch_s)
    plan = clipper._plan
    pieces = sum(len(b.pieces) for b in plan.buckets)
    merged = sum(len(b.run_pieces) if b.run_pieces is not None else len(b.pieces) for b in plan.buckets)
    if dist.get_rank() == 0:
        print(f"FSDP1 norm kernel inputs per rank: {pieces} pieces, {merged} after merging runs; FSDP's own: 24")


def case_fused_step(rows, rounds=15):
    params = plain_params(gpt2_small_shapes())
    optimizer = torch.optim.AdamW(params, lr=1e-6, fused=True)
    clipper = distclip.GradClipper(params, max_norm=1e9)

    def clipped_by_torch():
        torch.nn.utils.clip_grad_norm_(params, 1e9, foreach=True)
        optimizer.step()

    def clipped_by_distclip():
        attachment = clipper.attach(optimizer)
        optimizer.step()
        attachment.remove()

    # Overheads are differences of ~70 ms steps on a shared machine: interleave the three
    # variants round by round and take the median of the per-round differences.
    torch_overheads, our_overheads = [], []
    for _ in range(rounds):
        alone = timed(optimizer.step, repeats=1)
        torch_overheads.append(timed(clipped_by_torch, repeats=1) - alone)
        our_overheads.append(timed(clipped_by_distclip, repeats=1) - alone)
    torch_clip, ours = statistics.median(torch_overheads), statistics.median(our_overheads)
    label = "5 clip overhead in a fused AdamW step (124M fp32)"
    add(rows, label, "torch clip, then step", torch_clip, torch_clip)
    add(rows, label, "GradClipper attached (zero-pass)", ours, torch_clip)


def add(rows, case, variant, seconds, torch_seconds):
    rows.append({"case": case, "variant": variant, "ms": seconds * 1e3, "vs_torch": seconds / torch_seconds})


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="distributed.json")
    parser.add_argument("--counts", type=int, nargs="+", default=[150, 2000, 20000])
    parser.add_argument("--cases", type=int, nargs="+", default=[2, 3, 4, 5], help="which cases to run")
    args = parser.parse_args()
    dist.init_process_group("gloo")
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    rows: list[dict] = []
    cases = {2: case_ddp, 3: lambda r: case_fsdp2(r, args.counts), 4: case_fsdp1, 5: case_fused_step}
    for case in (cases[number] for number in args.cases):
        began = time.perf_counter()
        case(rows)
        if dist.get_rank() == 0:
            print(f"case done in {time.perf_counter() - began:.0f} s: {rows[-1]['case']}", flush=True)
    if dist.get_rank() == 0:
        print(f"world {dist.get_world_size()}, gloo on CPU")
        print(f"{'case':50} {'variant':34} {'ms':>9} {'x torch':>8}")
        for r in rows:
            print(f"{r['case']:50} {r['variant']:34} {r['ms']:9.2f} {r['vs_torch']:8.2f}")
        with open(args.out, "w") as f:
            json.dump({"world_size": dist.get_world_size(), "rows": rows}, f, indent=1)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
