"""Train a small GPT-style causal transformer with distclip under any parallelism.

    torchrun --nproc-per-node=2 launch/train.py                      # DDP, gloo on CPU
    torchrun --nproc-per-node=2 launch/train.py --parallel fsdp2+tp  # NCCL when CUDA is there

Every parallelism starts from the same weights (built from one seed before sharding) and sees
the same global batches, so their pre-clip grad-norm histories must agree: that is the
end-to-end check that distclip counts every gradient element exactly once.
Rank 0 shows progress, writes ``metrics.jsonl`` and, at the end, ``metrics.png``.

The loss is token-weighted: each rank backpropagates its *summed* token loss, and the clipper
divides the gradients by the global token count, reduced in the same all-reduce as the norm
(``GradClipper(divide_by="tokens")``), so ranks holding different numbers of tokens still give
the gradient of the global token mean, without a collective of their own.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import math
import os
import sys
import time
import warnings
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import distclip
from distclip.partials import PNorm
from distclip.scaling import check_max_norm

PARALLELISMS = ("ddp", "fsdp2", "hsdp", "fsdp2+tp", "pp", "fsdp1")
CLIP_POLICIES = ("fixed", "zclip", "autoclip")
SPIKE_FACTOR = 50.0  # --inject-spike multiplies that step's loss (or one block's gradients) by this
DEFAULT_DATA = Path(__file__).resolve().parent / "data" / "corpus.txt"


# ----------------------------------------------------------------------------- arguments


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line on rank 0, the same exit everywhere
        fail(message)


def fail(message: str) -> None:
    """Rank 0 prints one line and exits 2; the other ranks, which found the same problem, leave
    quietly with status 0.  A worker that *fails* makes torchrun stop the others at once, which
    could kill rank 0 before it says why; workers that succeed leave torchrun waiting for rank 0,
    whose status 2 is the job's."""
    if dist.is_initialized():  # a problem found after the start (a checkpoint that cannot apply)
        dist.destroy_process_group()
    if int(os.environ.get("RANK", "0")) != 0:
        sys.exit(0)
    # One write: print() writes the text and the newline separately, and torchrun's agent shares
    # the pipe, so its log lines could land in between.
    sys.stderr.write(f"train.py: error: {message}\n")
    sys.stderr.flush()
    sys.exit(2)


def parse_args(argv=None) -> argparse.Namespace:
    """The command line, checked before any process group starts (:func:`check_args`)."""
    p = _Parser(description=__doc__.split("\n\n")[0])
    p.add_argument("--parallel", default="ddp", help=" | ".join(PARALLELISMS))
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--global-batch", type=int, default=16, help="sequences per optimizer step")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per step; clip at the boundary")
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--max-norm", type=float, default=1.0, help="the threshold of --clip fixed")
    p.add_argument("--clip", default="fixed", help="threshold: " + " | ".join(CLIP_POLICIES) +
                   " (zclip, autoclip: distclip.ZClip() / distclip.AutoClip() defaults, no clipping in warm-up)")
    p.add_argument("--skip-spikes", action="store_true",
                   help="skip steps whose grad norm or loss exceeds mean + 6 std of the last 128 (distclip.SpikeSkip())")
    p.add_argument("--inject-spike", default=None, metavar="STEP[:BLOCK]",
                   help=f"multiply STEP's loss by {SPIKE_FACTOR:g}, so that a real spike occurs; with BLOCK, "
                        "only that transformer block's gradients (a spike in one layer, as --layer-norms shows)")
    p.add_argument("--layer-norms", action="store_true",
                   help="log each transformer block's gradient norm per step (and the embedding's, the final "
                        "norm's, the head's) and draw them as a heatmap (GradClipper(groups=...))")
    p.add_argument("--norm-type", type=float, default=2.0)
    p.add_argument("--overlap", action="store_true",
                   help="take the norm partials during backward (GradClipper(overlap=True))")
    p.add_argument("--tp", type=int, default=2, help="tensor-parallel degree for fsdp2+tp")
    p.add_argument("--replicas", type=int, default=2, help="replicate degree for hsdp")
    p.add_argument("--microbatches", type=int, default=2, help="pipeline micro-batches per step")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"], help="autocast dtype")
    p.add_argument("--data", type=Path, default=DEFAULT_DATA)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("runs/latest"))
    p.add_argument("--save-every", type=int, default=0, help="steps between checkpoints (0: never)")
    p.add_argument("--resume", type=Path, default=None, help="checkpoint directory to resume from")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--pg-timeout", type=float, default=300.0,
                   help="seconds any collective may wait for the other ranks before failing (default 300)")
    p.add_argument("--inject-failure", default=None, metavar="STEP:RANK",
                   help="raise on RANK at STEP between backward and clip (to test that the others fail, not hang)")
    args = p.parse_args(argv)
    check_args(args, world=int(os.environ.get("WORLD_SIZE", "1")))
    return args


_AT_LEAST_ONE = (lambda v: v >= 1, "an integer >= 1")
# The allowed range of each numeric argument the run divides by, reshapes with or waits on:
# (test, the range in words).  --max-norm and --norm-type are distclip's to judge.
ARGUMENT_RANGES = {
    "steps": _AT_LEAST_ONE, "global_batch": _AT_LEAST_ONE, "grad_accum": _AT_LEAST_ONE,
    "seq_len": _AT_LEAST_ONE, "dim": _AT_LEAST_ONE, "layers": _AT_LEAST_ONE, "heads": _AT_LEAST_ONE,
    "tp": _AT_LEAST_ONE, "replicas": _AT_LEAST_ONE, "microbatches": _AT_LEAST_ONE,
    "save_every": (lambda v: v >= 0, "an integer >= 0 (0: never)"),
    "seed": (lambda v: 0 <= v < 2**32, "an integer in 0..2**32-1"),
    "lr": (lambda v: 0 <= v < math.inf, "a finite number >= 0"),
    "pg_timeout": (lambda v: 0 < v < math.inf, "a finite number of seconds > 0"),
}


def check_args(args: argparse.Namespace, world: int) -> None:
    """Every bad argument ends the job in one line (:func:`fail`), before any process group
    starts and before the run could divide by it or reshape with it.  ``world`` (torchrun's
    WORLD_SIZE) decides the divisibility rules.  A ``--resume`` checkpoint's state is read here
    (``args.checkpoint``), so a model of another shape or a step past ``--steps`` is caught too."""
    for name, (allowed, words) in ARGUMENT_RANGES.items():
        if not allowed(getattr(args, name)):
            fail(f"--{name.replace('_', '-')} must be {words}, got {getattr(args, name)}")
    for flag, check, value in (("--max-norm", check_max_norm, args.max_norm), ("--norm-type", PNorm.parse, args.norm_type)):
        try:
            check(value)
        except ValueError as error:
            fail(f"{flag} {value}: {error}")
    if args.parallel not in PARALLELISMS:
        fail(f"unknown --parallel {args.parallel!r}; choose one of {', '.join(PARALLELISMS)}")
    if args.clip not in CLIP_POLICIES:
        fail(f"unknown --clip {args.clip!r}; choose one of {', '.join(CLIP_POLICIES)}")
    if args.dim % args.heads:
        fail(f"--dim {args.dim} must be a multiple of --heads {args.heads}")
    if args.parallel == "hsdp" and world % args.replicas:
        fail(f"hsdp needs the world size ({world}) divisible by --replicas {args.replicas}")
    if args.parallel == "fsdp2+tp" and (world % args.tp or args.heads % args.tp):
        fail(f"fsdp2+tp needs world size ({world}) and --heads ({args.heads}) divisible by --tp {args.tp}")
    if args.parallel == "pp" and (world % 2 or args.layers % 2):
        fail(f"pp runs 2 stages: world size ({world}) and --layers ({args.layers}) must be even")
    dp = data_parallel_size(args.parallel, world, args.tp)
    pipeline = args.parallel == "pp"
    divisor = dp * args.grad_accum * (args.microbatches if pipeline else 1)
    if args.global_batch % divisor:
        fail(f"--global-batch {args.global_batch} must be a multiple of {divisor}: the data-parallel size ({dp})"
             f" x --grad-accum ({args.grad_accum}){f' x --microbatches ({args.microbatches})' if pipeline else ''}")
    if not args.data.is_file():
        fail(f"data file {args.data} does not exist")
    longest = args.data.stat().st_size - 2  # a window holds seq_len + 1 tokens (inputs and shifted targets)
    if args.seq_len > longest:
        fail(f"--seq-len must be at most {longest} for data file {args.data}, got {args.seq_len}")
    args.spike_block = None
    if args.inject_spike is not None:
        text = args.inject_spike
        try:
            numbers = [int(v) for v in text.split(":")]
        except ValueError:
            numbers = []
        if len(numbers) not in (1, 2):
            fail(f"--inject-spike wants STEP or STEP:BLOCK, got {text!r}")
        args.inject_spike, args.spike_block = numbers[0], (numbers[1] if len(numbers) == 2 else None)
        if not 1 <= args.inject_spike <= args.steps:
            fail(f"--inject-spike {text} is not a step of this run (1..{args.steps})")
        if args.spike_block is not None and not 0 <= args.spike_block < args.layers:
            fail(f"--inject-spike {text}: block {args.spike_block} is not a block of this model (0..{args.layers - 1})")
    if args.inject_failure is not None:
        try:
            step, rank = (int(v) for v in args.inject_failure.split(":"))
        except ValueError:  # not two parts, or not integers
            fail(f"--inject-failure wants STEP:RANK, got {args.inject_failure!r}")
        args.inject_failure = step, rank
        if not (1 <= step <= args.steps and 0 <= rank < world):
            fail(f"--inject-failure {step}:{rank} needs STEP in 1..{args.steps} and RANK in 0..{world - 1}")
    args.checkpoint = None if args.resume is None else read_checkpoint_state(args.resume)
    if args.checkpoint is not None:
        for name, written in args.checkpoint["model"].items():
            if getattr(args, name) != written:
                flag = "--" + name.replace("_", "-")
                fail(f"checkpoint {args.resume} holds a model of {flag} {written}; this run has {flag} {getattr(args, name)}")
        if args.checkpoint["step"] > args.steps:
            fail(f"checkpoint {args.resume} is at step {args.checkpoint['step']}, past --steps {args.steps}")


def data_parallel_size(parallel: str, world: int, tp: int) -> int:
    return {"fsdp2+tp": world // tp, "pp": world // 2}.get(parallel, world)


# ----------------------------------------------------------------------------- data


class TokenStream:
    """Byte-level tokens of a text file, served as deterministic (input, target) windows.

    Batch ``step`` is the same on every run and every parallelism: window starts come from a
    generator seeded by (seed, step); each data-parallel rank takes its contiguous slice.
    """

    vocab_size = 256

    def __init__(self, path: Path, seq_len: int, seed: int) -> None:
        self.tokens = torch.tensor(list(path.read_bytes()), dtype=torch.long)  # check_args: long enough
        self.seq_len, self.seed = seq_len, seed

    def global_batch(self, step: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        starts = torch.randint(0, self.tokens.numel() - self.seq_len - 1, (size,), generator=generator)
        windows = torch.stack([self.tokens[s : s + self.seq_len + 1] for s in starts.tolist()])
        return windows[:, :-1], windows[:, 1:]


# ----------------------------------------------------------------------------- model


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.head_dim = dim // heads
        self.q, self.k, self.v, self.out = (nn.Linear(dim, dim) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        # -1 heads: under tensor parallelism q/k/v are column shards holding heads/tp heads.
        q, k, v = (m(x).view(b, t, -1, self.head_dim).transpose(1, 2) for m in (self.q, self.k, self.v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out(y.transpose(1, 2).reshape(b, t, -1))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim), Attention(dim, heads)
        self.norm2, self.up, self.down = nn.LayerNorm(dim), nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.down(F.gelu(self.up(self.norm2(x))))


class GPT(nn.Module):
    """Blocks live in a ModuleDict keyed by their index, so a pipeline stage that keeps some of
    them keeps their names, and checkpoints of every parallelism share one set of names."""

    def __init__(self, vocab: int, dim: int, layers: int, heads: int, seq_len: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.pos = nn.Parameter(torch.randn(seq_len, dim) * 0.02)
        self.blocks = nn.ModuleDict({str(i): Block(dim, heads) for i in range(layers)})
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.embed is not None:
            x = self.embed(x) + self.pos[: x.shape[1]]
        for block in self.blocks.values():
            x = block(x)
        if self.head is not None:
            x = self.head(self.norm(x))
        return x


def keep_stage(model: GPT, stage: int) -> GPT:
    """Pipeline stage 0 keeps the embeddings and the first half of the blocks, stage 1 the rest."""
    half = len(model.blocks) // 2
    for name in list(model.blocks):
        if (int(name) < half) != (stage == 0):
            del model.blocks[name]
    if stage == 0:
        model.norm = model.head = None
    else:
        model.embed = None
        model.pos = None
    return model


# ----------------------------------------------------------------------------- parallelisms


def parallelize(model: GPT, args, device: torch.device):
    """Wrap ``model`` for ``args.parallel``.  Returns (model, replica_group, pipeline schedule)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    world, kind = dist.get_world_size(), device.type
    if args.parallel == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        # --overlap takes DDP's partials from its buckets, which needs the gradients to be their
        # views.  Not otherwise: the norm's float32 rounding follows the memory layout, and DDP
        # re-buckets after its first step, so a resumed run would differ from an uninterrupted one
        # in the last bits.
        device_ids = [device.index] if kind == "cuda" else None
        return DDP(model, device_ids=device_ids, gradient_as_bucket_view=args.overlap), None, None
    if args.parallel in ("fsdp2", "hsdp"):
        if args.parallel == "fsdp2":
            mesh = init_device_mesh(kind, (world,))
        else:
            mesh = init_device_mesh(kind, (args.replicas, world // args.replicas), mesh_dim_names=("replicate", "shard"))
        for block in model.blocks.values():
            fully_shard(block, mesh=mesh)
        return fully_shard(model, mesh=mesh), None, None
    if args.parallel == "fsdp2+tp":
        from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

        mesh = init_device_mesh(kind, (world // args.tp, args.tp), mesh_dim_names=("dp", "tp"))
        plan = {"attn.q": ColwiseParallel(), "attn.k": ColwiseParallel(), "attn.v": ColwiseParallel(),
                "attn.out": RowwiseParallel(), "up": ColwiseParallel(), "down": RowwiseParallel()}
        for block in model.blocks.values():
            parallelize_module(block, mesh["tp"], plan)
            fully_shard(block, mesh=mesh["dp"])  # its LayerNorms stay out of TP: on the dp sub-mesh
        return fully_shard(model, mesh=mesh["dp"]), None, None
    if args.parallel == "fsdp1":
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        for name, block in list(model.blocks.items()):
            model.blocks[name] = FSDP(block, device_id=device, use_orig_params=True)
        return FSDP(model, device_id=device, use_orig_params=True), None, None
    # pp: two stages; stage s on ranks with pp coordinate s, FSDP2 over the stage's dp replicas.
    from torch.distributed.pipelining import PipelineStage, ScheduleGPipe

    mesh = init_device_mesh(kind, (2, world // 2), mesh_dim_names=("pp", "dp"))
    stage_index = mesh["pp"].get_local_rank()
    stage_module = keep_stage(model, stage_index)
    if mesh["dp"].size() > 1:
        fully_shard(stage_module, mesh=mesh["dp"])
    stage = PipelineStage(stage_module, stage_index, 2, device, group=mesh["pp"].get_group())
    # The loss of each micro-batch is its summed token loss, as everywhere (see train()).
    # scale_grads=False: the schedule's own scaling divides every gradient the stage holds on
    # each step() call, so with --grad-accum it would divide the earlier micro-batches' share
    # again; the clipper divides the sum once, by the global token count.
    loss_fn = functools.partial(summed_token_loss, scale=data_parallel_size(args.parallel, world, args.tp))
    schedule = ScheduleGPipe(stage, n_microbatches=args.microbatches, loss_fn=loss_fn, scale_grads=False)
    return stage_module, mesh["dp"], schedule


def summed_token_loss(logits: torch.Tensor, targets: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """The cross-entropy summed over the tokens, times ``scale``."""
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), reduction="sum") * scale


def layer_of(name: str, _parameter: torch.Tensor) -> str:
    """The ``--layer-norms`` row of a parameter, by its name (distclip's: wrapper prefixes
    removed, so the same under every parallelism): its transformer block (``blocks.3``; a
    pipeline stage's blocks keep their indices) or its top-level module (``embed`` with the
    position embedding, ``norm``, ``head``)."""
    top, _, rest = name.partition(".")
    if top == "blocks":
        return f"blocks.{rest.split('.')[0]}"
    return "embed" if top == "pos" else top


def layer_order(name: str) -> tuple[int, int]:
    """Rows in the model's order: embedding, blocks by index, final norm, head."""
    if name.startswith("blocks."):
        return 1, int(name.split(".")[1])
    return {"embed": 0, "norm": 2, "head": 3}.get(name, 4), 0


@torch.no_grad()
def spike_block_gradients(gpt: GPT, block: int) -> None:
    """``--inject-spike STEP:BLOCK``: multiply this rank's part of one block's gradients by
    SPIKE_FACTOR, a spike in one layer (a pipeline stage without the block has nothing to do)."""
    if str(block) in gpt.blocks:
        for p in gpt.blocks[str(block)].parameters():
            if p.grad is not None:
                p.grad *= SPIKE_FACTOR


@contextlib.contextmanager
def gradient_sync(model: nn.Module, enabled: bool):
    """Reduce gradients only on the last micro-batch of an accumulation."""
    if hasattr(model, "no_sync") and not enabled:  # DDP, FSDP1
        with model.no_sync():
            yield
        return
    if hasattr(model, "set_requires_gradient_sync"):  # FSDP2
        model.set_requires_gradient_sync(enabled)
    yield


# ----------------------------------------------------------------------------- checkpoints


CHECKPOINT_STATE = "train_state.json"
MODEL_SHAPE = ("dim", "layers", "heads", "seq_len")  # the arguments that decide the parameters' shapes


def clipper_flags(args: argparse.Namespace) -> str:
    """The clipping flags of a run, as typed: what a resumed run says it differs in."""
    flags = [f"--clip {args.clip}"] + ([f"--max-norm {args.max_norm:g}"] if args.clip == "fixed" else [])
    return " ".join(flags + [f"--norm-type {args.norm_type:g}"] + (["--skip-spikes"] if args.skip_spikes else []))


def save_checkpoint(path: Path, model, optimizer, clipper, step: int, args: argparse.Namespace) -> None:
    """Model and optimizer through ``torch.distributed.checkpoint`` (each rank its shards), then
    the rest as ``train_state.json`` from rank 0: the step, the model's shape, the clipping flags
    and the clipper's state (plain values, the same on every rank).

    The clipper stays out of DCP because DCP loads into a template that must hold the
    checkpoint's keys: a run resumed with another ``--clip`` would fail inside DCP, on every rank,
    before distclip could say what does not fit.  The JSON file is written last, so a directory
    without it is a save that did not finish."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    state_file = path / CHECKPOINT_STATE
    if dist.get_rank() == 0:
        state_file.unlink(missing_ok=True)  # an earlier run's save here is being replaced
    model_state, optim_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=str(path))
    if dist.get_rank() == 0:
        state = {"step": step, "model": {name: getattr(args, name) for name in MODEL_SHAPE},
                 "clipper_flags": clipper_flags(args), "clipper": clipper.state_dict()}
        unfinished = state_file.with_suffix(".tmp")
        unfinished.write_text(json.dumps(state))  # Python's JSON: empty window slots are NaN
        unfinished.replace(state_file)


def read_checkpoint_state(path: Path) -> dict:
    """A checkpoint's ``train_state.json``; one line (:func:`fail`) when there is none."""
    if not path.is_dir():
        fail(f"checkpoint {path} does not exist")
    if not (path / CHECKPOINT_STATE).is_file():
        fail(f"checkpoint {path} has no {CHECKPOINT_STATE}: its save did not finish (or an older train.py wrote it)")
    return json.loads((path / CHECKPOINT_STATE).read_text())


def load_checkpoint(path: Path, state: dict, model, optimizer, clipper, args: argparse.Namespace) -> int:
    """Restore a checkpoint (``state``: its :func:`read_checkpoint_state`); returns its step.

    A checkpoint restores state, not settings: the optimizer takes its moments and step counts
    under this run's ``--lr`` (DCP's ``set_state_dict`` restores the checkpoint's); the clipper
    takes the checkpoint's counters, history and policy state under this run's flags
    (``GradClipper.load_state_dict``); a state that cannot apply (a policy on one side only)
    ends the job in one line that names both runs' flags."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_state, optim_state = get_state_dict(model, optimizer)
    tensors = {"model": model_state, "optim": optim_state}
    dcp.load(tensors, checkpoint_id=str(path))
    set_state_dict(model, optimizer, model_state_dict=tensors["model"], optim_state_dict=tensors["optim"])
    for group in optimizer.param_groups:  # set_state_dict restored the checkpoint's lr: this run's --lr applies
        group["lr"] = args.lr
    try:
        with warnings.catch_warnings():
            if dist.get_rank() != 0:  # every rank would warn the same: rank 0 says it once
                warnings.simplefilter("ignore")
            clipper.load_state_dict(state["clipper"])
    except ValueError as error:
        reason = " ".join(str(error).split())  # one line
        fail(f"cannot resume from {path}: {reason} (it was written with {state['clipper_flags']}; "
             f"this run has {clipper_flags(args)})")
    return int(state["step"])


# ----------------------------------------------------------------------------- metrics


def metrics_line(record: dict) -> str:
    """One line of strict JSON: a non-finite number (the threshold during a policy's warm-up, a
    NaN norm) is null, since ``Infinity`` and ``NaN`` are not JSON and strict readers reject them."""
    return json.dumps(_finite_or_null(record), allow_nan=False) + "\n"


def _finite_or_null(value):
    if isinstance(value, dict):  # the layer norms
        return {key: _finite_or_null(v) for key, v in value.items()}
    return None if isinstance(value, float) and not math.isfinite(value) else value


def open_metrics(path: Path, start: int):
    """``metrics.jsonl``, open to append step ``start + 1`` on.  A run resumed at ``start`` keeps
    the lines of steps up to ``start`` already there and drops the rest (steps a crashed run
    logged after its checkpoint, a line the crash cut short), so each step appears once, in order."""
    kept = []
    if start and path.exists():
        for line in path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:  # cut short by the crash
                continue
            if record["step"] <= start:
                kept.append(metrics_line(record))
    rewritten = path.with_suffix(".tmp")
    rewritten.write_text("".join(kept))
    rewritten.replace(path)
    return open(path, "a")


# ----------------------------------------------------------------------------- training


def setup(pg_timeout: float) -> torch.device:
    """Start the process group.  ``pg_timeout`` bounds every collective: a rank whose peer died
    or hangs fails after at most that long instead of waiting for ever (torchrun also stops the
    other workers of a node as soon as one of them exits)."""
    timeout = timedelta(seconds=pg_timeout)
    if torch.cuda.is_available():
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl", device_id=torch.device("cuda", local_rank), timeout=timeout)
        return torch.device("cuda", local_rank)
    dist.init_process_group("gloo", timeout=timeout)
    return torch.device("cpu")


def train(args: argparse.Namespace) -> None:
    device = setup(args.pg_timeout)
    rank, world = dist.get_rank(), dist.get_world_size()
    data = TokenStream(args.data, args.seq_len, args.seed)
    torch.manual_seed(args.seed)  # identical weights everywhere, before any sharding
    gpt = GPT(data.vocab_size, args.dim, args.layers, args.heads, args.seq_len).to(device)
    model, replica_group, schedule = parallelize(gpt, args, device)  # gpt: the GPT inside (under pp: its stage)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    threshold = {"fixed": lambda: args.max_norm, "zclip": distclip.ZClip, "autoclip": distclip.AutoClip}[args.clip]()
    clipper = distclip.GradClipper(
        model, max_norm=threshold, norm_type=args.norm_type, replica_group=replica_group,
        skip_spikes=distclip.SpikeSkip() if args.skip_spikes else None, overlap=args.overlap,
        groups=layer_of if args.layer_norms else None,
        divide_by="tokens",  # the gradients are of summed token losses, divided by the global count
    )
    start = 0 if args.resume is None else load_checkpoint(args.resume, args.checkpoint, model, optimizer, clipper, args)

    dp = data_parallel_size(args.parallel, world, args.tp)
    dp_rank = replica_group.get_local_rank() if replica_group is not None else (
        rank // args.tp if args.parallel == "fsdp2+tp" else rank)
    first_stage = schedule is not None and rank < world // 2  # mesh (pp, dp): stage 0 holds the first ranks
    # The ranks whose tokens count towards the global loss and token count: every rank holds its
    # own share of the batch, except that the tp ranks of one dp rank hold the same share (the
    # first counts it) and only the last pipeline stage has the loss.
    counts_tokens = not first_stage and (args.parallel != "fsdp2+tp" or rank % args.tp == 0)
    per_rank = args.global_batch // dp
    micro = per_rank // args.grad_accum
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.dtype == "bf16")

    args.out.mkdir(parents=True, exist_ok=True)
    log = open_metrics(args.out / "metrics.jsonl", start) if rank == 0 else None
    progress = None
    if rank == 0 and not args.no_progress:
        from tqdm import tqdm

        progress = tqdm(total=args.steps, initial=start, desc=args.parallel, dynamic_ncols=True)

    for step in range(start, args.steps):
        began = time.perf_counter()
        inputs, targets = data.global_batch(step, args.global_batch)
        inputs = inputs[dp_rank * per_rank : (dp_rank + 1) * per_rank].to(device)
        targets = targets[dp_rank * per_rank : (dp_rank + 1) * per_rank].to(device)
        optimizer.zero_grad(set_to_none=True)
        loss_sum = torch.zeros((), device=device)  # this rank's summed token loss
        spike = SPIKE_FACTOR if args.inject_spike == step + 1 and args.spike_block is None else 1.0
        for i in range(args.grad_accum):
            x, y = inputs[i * micro : (i + 1) * micro], targets[i * micro : (i + 1) * micro]
            with autocast:
                if schedule is not None:  # the pipeline runs forward and backward itself
                    losses = []
                    schedule.step(*([x] if first_stage else []), target=None if first_stage else y, losses=losses)
                    if losses:  # the last stage: each micro-batch's summed_token_loss, times dp
                        loss_sum += torch.stack(losses).detach().sum() / dp
                else:
                    with gradient_sync(model, i == args.grad_accum - 1):
                        loss = summed_token_loss(model(x), y, scale=spike)
                        # Times dp: DDP and FSDP average the gradients over the data-parallel
                        # ranks, and their sum is wanted (the clipper divides by the token count).
                        (loss * dp).backward()
                    loss_sum += loss.detach()
        if schedule is not None and spike != 1.0:  # the schedule ran backward: spike its result
            loss_sum *= spike
            for p in model.parameters():
                if p.grad is not None:
                    p.grad *= spike
        if args.inject_spike == step + 1 and args.spike_block is not None:
            spike_block_gradients(gpt, args.spike_block)
        if args.inject_failure == (step + 1, rank):
            raise RuntimeError(f"injected failure on rank {rank} at step {step + 1}, between backward and clip")
        # One all-reduce: every element counted once, the same coefficient everywhere, the global
        # token count the gradients are divided by (divide_by="tokens"), the summed loss, and the
        # mean of the ranks' token-mean losses for SpikeSkip (the global token mean too, since
        # every rank holds as many tokens).  Ranks that count no tokens pass none of them.
        metrics = loss = None
        if counts_tokens:
            tokens = targets.numel()
            metrics = {"tokens": distclip.Sum(torch.full((), tokens, dtype=torch.float64, device=device)),
                       "loss_sum": distclip.Sum(loss_sum)}
            loss = loss_sum / tokens
        result = clipper.clip_(loss=loss, metrics=metrics)
        skipped = bool(result.skipped)  # read for the log anyway
        if not skipped:  # a skipped step leaves parameters and optimizer state alone
            optimizer.step()

        loss_value = (result.metrics["loss_sum"] / result.metrics["tokens"]).item()  # the global token mean
        # result.coef also divides by the token count (divide_by), except on a step left as it is.
        coef = (result.coef if skipped else result.coef * result.metrics["tokens"]).item()  # the clip's factor
        norm = result.total_norm.item()
        elapsed = time.perf_counter() - began
        tokens_per_s = args.global_batch * args.seq_len / elapsed
        if rank == 0:
            record = {"step": step + 1, "loss": loss_value, "grad_norm": norm, "coef": coef,
                      "clipped_norm": None if skipped else norm * coef, "max_norm": result.max_norm.item(), "skipped": skipped,
                      "lr": optimizer.param_groups[0]["lr"], "tokens_per_s": tokens_per_s}
            if args.layer_norms:  # every block's norm, read from the same all-reduce (all stages)
                norms = dict(zip(result.group_names, result.norms[1:].tolist()))  # one host read
                record["layer_norms"] = {name: norms[name] for name in sorted(norms, key=layer_order)}
            log.write(metrics_line(record))
            log.flush()
            if progress is not None:
                progress.set_postfix(loss=f"{loss_value:.3f}", gnorm=f"{norm:.3f}", coef=f"{coef:.3f}", tok_s=f"{tokens_per_s:.0f}")
                progress.update(1)
        if args.save_every and (step + 1) % args.save_every == 0:
            save_checkpoint(args.out / f"step_{step + 1}", model, optimizer, clipper, step + 1, args)

    if progress is not None:
        progress.close()
    if rank == 0:
        log.close()
        if clipper.backward_partials is not None:
            partials = clipper.backward_partials
            print(f"overlap: partials from backward on {partials.steps_used} of {args.steps - start} steps "
                  f"({partials.steps_fallen_back} fell back to the normal pass, a gradient having changed after "
                  f"its hook; {partials.steps_unproven} took it unproven, a gradient having copies no hook sees "
                  f"agree; the rest ran before a plan existed)", flush=True)
        plot(args.out / "metrics.jsonl", args.out / "metrics.png")
        print(f"metrics: {args.out / 'metrics.jsonl'}  plot: {args.out / 'metrics.png'}", flush=True)
    dist.barrier()
    dist.destroy_process_group()


def plot(metrics: Path, png: Path) -> None:
    """Loss; pre- and post-clip norm with the threshold and skipped steps; under them, with
    ``--layer-norms``, the heatmap of every layer's pre-clip norm (layers x steps, log colours)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    steps = [r["step"] for r in rows]

    def values(key: str, rows: list[dict] = rows) -> list[float]:  # null (non-finite) is not drawn
        return [math.nan if r.get(key) is None else r[key] for r in rows]

    layers = sorted({name for r in rows for name in r.get("layer_norms") or {}}, key=layer_order)
    if layers:
        fig = plt.figure(figsize=(11, 4 + 0.25 * len(layers) + 1.5))
        grid = fig.add_gridspec(2, 2, height_ratios=[4, 0.25 * len(layers) + 1.5])
        left, right, heat = fig.add_subplot(grid[0, 0]), fig.add_subplot(grid[0, 1]), fig.add_subplot(grid[1, :])
    else:
        fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    left.plot(steps, values("loss"))
    left.set(title="loss (global token mean)", xlabel="step", ylabel="cross-entropy (nats)")
    right.plot(steps, values("grad_norm"), label="pre-clip norm")
    right.plot(steps, values("clipped_norm"), label="post-clip norm")
    right.plot(steps, values("max_norm"), color="k", linestyle="--", linewidth=1, label="threshold (max_norm)")
    skipped = [r for r in rows if r.get("skipped")]
    if skipped:
        right.scatter(values("step", skipped), values("grad_norm", skipped), color="red", marker="x",
                      zorder=3, label="skipped step")
        left.scatter(values("step", skipped), values("loss", skipped), color="red", marker="x", zorder=3)
    right.set(title="global gradient norm", xlabel="step", yscale="log")
    right.legend()
    if layers:
        layer_heatmap(fig, heat, rows, layers)
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)


def layer_heatmap(fig, ax, rows: list[dict], layers: list[str]) -> None:
    """One row per layer, one column per step, the colour the layer's pre-clip gradient norm on
    a log scale: a spike in one layer is one bright cell.  Steps logged without layer norms, and
    non-finite or zero norms, stay blank."""
    import numpy as np
    from matplotlib.colors import LogNorm

    grid = np.full((len(layers), len(rows)), np.nan)
    for column, record in enumerate(rows):
        for row, name in enumerate(layers):
            value = (record.get("layer_norms") or {}).get(name)
            if value is not None and value > 0:
                grid[row, column] = value
    shown = grid[np.isfinite(grid)]
    norm = LogNorm(vmin=shown.min(), vmax=shown.max()) if shown.size else None
    steps = [r["step"] for r in rows]
    # Cell edges half-way between logged steps (a resumed run's steps are consecutive anyway).
    edges = np.concatenate([[steps[0] - 0.5], (np.array(steps[:-1]) + np.array(steps[1:])) / 2, [steps[-1] + 0.5]])
    mesh = ax.pcolormesh(edges, np.arange(len(layers) + 1), np.ma.masked_invalid(grid), norm=norm, cmap="viridis")
    ax.set_yticks(np.arange(len(layers)) + 0.5, layers)
    ax.invert_yaxis()  # the embedding on top, the head at the bottom, as the model runs
    ax.set(title="gradient norm per layer (pre-clip)", xlabel="step", ylabel="layer")
    fig.colorbar(mesh, ax=ax, label="gradient norm (log scale)", pad=0.01)


if __name__ == "__main__":
    train(parse_args())
