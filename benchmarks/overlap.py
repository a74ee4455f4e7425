"""Issue 9 part 3: the norm pass taken during backward (``GradClipper(overlap=True)``).

    OMP_NUM_THREADS=1 torchrun --nproc-per-node=2 benchmarks/overlap.py [--out overlap.json]

One training step = forward + backward + clip + fused AdamW step, on a stack of ``--layers``
``Linear(--width, --width)`` + tanh blocks, as plain parameters (world 1: each rank alone, no
communication), as DDP (``gradient_as_bucket_view=True``) and as FSDP2 (``fully_shard`` per
block), over the world.  Variants, each on its
own copy of the model and optimizer, run interleaved round by round (median of ``--rounds``):

* torch: ``torch.nn.utils.clip_grad_norm_(foreach=True)`` then ``optimizer.step()``
  (FSDP2: torch's clip over the DTensor gradients, its norm a DTensor reduced by DTensor);
* clip_: ``GradClipper.clip_()`` then the step; ``clip_ overlap``: the same with ``overlap=True``;
* attached: ``GradClipper.attach(optimizer)``, the clip inside the step (plain parameters: the
  coefficient goes into the fused kernel's ``grad_scale``, no pass over the gradients; FSDP2's
  DTensor parameters: clip_ inside the step); ``attached overlap``: the same with ``overlap=True``.

Reported per variant: the whole step, and the step boundary (end of backward to the end of the
optimizer step: what the norm pass under backward is meant to shrink), on rank 0, each step
after a barrier.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import time

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.nn.parallel import DistributedDataParallel as DDP

import distclip


def blocks(layers: int, width: int) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(*(nn.Sequential(nn.Linear(width, width), nn.Tanh()) for _ in range(layers)))


VARIANTS = ("torch", "clip_", "clip_ overlap", "attached", "attached overlap")


def variants(model: nn.Module, wrapping: str, alone: dist.ProcessGroup) -> dict:
    out = {}
    for name in VARIANTS:
        m = copy.deepcopy(model)
        if wrapping == "fsdp2":
            mesh = init_device_mesh("cpu", (dist.get_world_size(),))
            for block in m:
                fully_shard(block, mesh=mesh)
            fully_shard(m, mesh=mesh)
        elif wrapping == "ddp":
            m = DDP(m, gradient_as_bucket_view=True)
        optimizer = torch.optim.AdamW(m.parameters(), lr=1e-6, fused=True)
        clip = clipper = None
        if name == "torch":
            clip = lambda m=m: torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0, foreach=True)
        else:
            clipper = distclip.GradClipper(m, max_norm=1.0, overlap=name.endswith("overlap"),
                                           group=alone if wrapping == "plain" else None)
            if name.startswith("attached"):
                clipper.attach(optimizer)
            else:
                clip = clipper.clip_
        out[name] = (m, optimizer, clip, clipper)
    return out


def measure(case: str, model: nn.Module, wrapping: str, batch: torch.Tensor, rounds: int, rows: list,
            alone: dist.ProcessGroup) -> None:
    setups = variants(model, wrapping, alone)
    step_times = {name: [] for name in setups}
    clip_times = {name: [] for name in setups}
    for round_ in range(rounds + 2):
        for name, (m, optimizer, clip, _) in setups.items():
            dist.barrier()
            start = time.perf_counter()
            m(batch).square().mean().backward()
            backward_done = time.perf_counter()
            if clip is not None:
                clip()
            optimizer.step()
            end = time.perf_counter()
            optimizer.zero_grad(set_to_none=True)
            if round_ >= 2:  # warm-up: plans, and overlap's first step has no plan yet
                step_times[name].append(end - start)
                clip_times[name].append(end - backward_done)
    for name, (_, _, _, clipper) in setups.items():
        if name.endswith("overlap"):  # else it would time the normal pass under overlap's name
            partials = clipper.backward_partials
            assert partials.steps_used == rounds + 1, (case, name, vars(partials))
    torch_step, torch_clip = statistics.median(step_times["torch"]), statistics.median(clip_times["torch"])
    for name in setups:
        step, clip = statistics.median(step_times[name]), statistics.median(clip_times[name])
        rows.append({"case": case, "variant": name, "step_ms": step * 1e3, "boundary_ms": clip * 1e3,
                     "step_vs_torch": step / torch_step, "boundary_vs_torch": clip / torch_clip})


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="overlap.json")
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args()
    dist.init_process_group("gloo")
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    model = blocks(args.layers, args.width)
    batch = torch.randn(args.batch, args.width, generator=torch.Generator().manual_seed(dist.get_rank()))
    rows: list[dict] = []
    label = f"{args.layers} x Linear({args.width}, {args.width})"
    alone, _ = dist.new_subgroups(group_size=1)  # the plain case: each rank a one-rank group
    world = dist.get_world_size()
    measure(f"plain, one rank ({label})", model, "plain", batch, args.rounds, rows, alone)
    measure(f"DDP bucket views, world {world} ({label})", model, "ddp", batch, args.rounds, rows, alone)
    measure(f"FSDP2 world {world} ({label})", model, "fsdp2", batch, args.rounds, rows, alone)
    if dist.get_rank() == 0:
        print(f"world {dist.get_world_size()}, gloo on CPU, median of {args.rounds} interleaved rounds")
        print(f"{'case':50} {'variant':18} {'step ms':>8} {'x torch':>7} {'boundary ms':>11} {'x torch':>7}")
        for r in rows:
            print(f"{r['case']:50} {r['variant']:18} {r['step_ms']:8.1f} {r['step_vs_torch']:7.3f} "
                  f"{r['boundary_ms']:11.2f} {r['boundary_vs_torch']:7.2f}")
        with open(args.out, "w") as f:
            json.dump({"world_size": dist.get_world_size(), "args": vars(args), "rows": rows}, f, indent=1)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
