"""Stateful fuzz: a training loop in which, between steps, random things users do happen.

A hypothesis ``RuleBasedStateMachine`` drives two identical models: ours, clipped by a
:class:`distclip.GradClipper` made once at the start, and theirs, clipped by torch's own
``clip_grad_norm_`` at every step.  Between steps it adds an adapter (and maybe a param group),
replaces or re-assigns a parameter, removes an adapter, freezes or unfreezes a module, changes
the dtype, sets some gradients to None, makes a gradient a strided view of a larger buffer,
and turns a GradScaler on or off; a step either calls ``clip_()`` or steps an optimizer the
clipper is attached to (fused or foreach AdamW).  After every step: our norm equals the float64
reference of the model's gradients as they are then (unscaled), clipped gradients equal the
reference times the coefficient, and parameters stepped by the attached optimizer equal theirs.

Single process, and at world 2 under DDP and FSDP2 (the rules those wrappers allow: freezing,
None and strided gradients, the scaler; the structure of a wrapped model is fixed).  The ranks
keep the loop in a module global and apply each rule the test process draws, in lockstep.
CI runs a fixed, derandomized set of examples (well under a minute); a longer run by hand:
``DISTCLIP_FUZZ_PROFILE=long python -m pytest tests/test_loop_fuzz.py``.
"""

from __future__ import annotations

import copy
import os
import warnings

import pytest
import torch
import torch.distributed as dist
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, precondition, rule
from torch import nn

import distclip

# (examples, steps per example): single process / world 2, whose steps are round trips to ranks.
PROFILES = {"ci": ((20, 10), (3, 6)), "long": ((300, 25), (60, 15))}
PROFILE = os.environ.get("DISTCLIP_FUZZ_PROFILE", "ci")


def _settings(world: int) -> settings:
    examples, steps = PROFILES[PROFILE][world > 1]
    return settings(
        max_examples=examples, stateful_step_count=steps, derandomize=PROFILE == "ci", deadline=None,
        suppress_health_check=list(HealthCheck),
    )
MAX_NORM = 0.05


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(16, 16)
        self.mid = nn.Linear(16, 16)
        self.head = nn.Linear(16, 1)
        self.adapters = nn.ModuleList()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.body(x.to(self.body.weight.dtype)))
        for adapter in self.adapters:
            h = h + adapter(h)
        return self.head(torch.tanh(self.mid(h)))


# -- the loop, kept per process (the ranks of a world-2 run each keep their own) ----------

_LOOP: dict = {}


def _apply(action: str, *args):
    """Run one rule on this process's loop; what the test process compares across ranks."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the stepped-but-not-clipped warning, FSDP's notes
        return ACTIONS[action](_LOOP, *args)


def _reset(loop: dict, kind: str, seed: int, attach: bool, fused: bool) -> None:
    loop.clear()
    torch.manual_seed(seed)
    ours = Net()
    theirs = copy.deepcopy(ours)
    if kind == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        ours_wrapped, theirs_wrapped = (DDP(m, find_unused_parameters=True) for m in (ours, theirs))
    elif kind == "fsdp2":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (dist.get_world_size(),))
        ours_wrapped, theirs_wrapped = (fully_shard(m, mesh=mesh) for m in (ours, theirs))
    else:
        ours_wrapped, theirs_wrapped = ours, theirs
    loop.update(kind=kind, ours=ours, theirs=theirs, wrapped=(ours_wrapped, theirs_wrapped), attach=attach,
                fused=fused and kind != "fsdp2", scalers=None, step=0)
    loop["clipper"] = distclip.GradClipper(ours_wrapped, max_norm=MAX_NORM)
    _new_optimizers(loop)


def _new_optimizers(loop: dict) -> None:
    loop["optimizers"] = [
        torch.optim.AdamW(m.parameters(), lr=0.01, fused=loop["fused"], foreach=None if loop["fused"] else True)
        for m in (loop["ours"], loop["theirs"])
    ]
    if loop["attach"]:
        loop["clipper"].attach(loop["optimizers"][0])


def _both(loop: dict):
    return loop["ours"], loop["theirs"]


def _add_adapter(loop: dict, seed: int, param_group: bool) -> None:
    for model, optimizer in zip(_both(loop), loop["optimizers"]):
        torch.manual_seed(seed)
        model.adapters.append(nn.Linear(16, 16).to(model.body.weight.dtype))
        if param_group:
            optimizer.add_param_group({"params": list(model.adapters[-1].parameters())})


def _replace_parameter(loop: dict, seed: int) -> None:
    for model in _both(loop):
        torch.manual_seed(seed)
        model.mid.weight = nn.Parameter(torch.randn_like(model.mid.weight) * 0.3)


def _remove_adapter(loop: dict) -> None:
    for model in _both(loop):
        if len(model.adapters):
            del model.adapters[0]


def _freeze(loop: dict, module: str, trainable: bool) -> None:
    for model in _both(loop):
        getattr(model, module).requires_grad_(trainable)


def _dtype(loop: dict, dtype: str) -> None:
    for model in _both(loop):
        model.to(getattr(torch, dtype))
    _new_optimizers(loop)  # optimizer state of the old dtype would not step the new


def _scaler(loop: dict, on: bool) -> None:
    loop["scalers"] = [torch.amp.GradScaler("cpu", init_scale=2.0**8) for _ in range(2)] if on else None


def _full(grad: torch.Tensor) -> torch.Tensor:
    return (grad.full_tensor() if hasattr(grad, "full_tensor") else grad).detach().double()


def _step(loop: dict, seed: int, use_optimizer: bool, none_mask: int, strided_mask: int):
    """Backward on both models, the same gradient edits on both, then ours clipped by the
    clipper and theirs by torch; returns our norm (hex) or the error we raised."""
    loop["step"] += 1
    ours, theirs = _both(loop)
    x = torch.randn(8, 16, generator=torch.Generator().manual_seed(seed + (dist.get_rank() if dist.is_initialized() else 0)))
    scalers = loop["scalers"]
    for n, (model, wrapped) in enumerate(zip(_both(loop), loop["wrapped"])):
        model.zero_grad(set_to_none=True)
        loss = wrapped(x).float().square().mean()
        (scalers[n].scale(loss) if scalers else loss).backward()
    for bit, (a, b) in enumerate(zip(ours.parameters(), theirs.parameters())):
        if a.grad is None:
            continue
        if none_mask >> bit & 1:
            a.grad = b.grad = None
        elif strided_mask >> bit & 1 and loop["kind"] != "fsdp2":
            for p in (a, b):  # the same values, now every other element of a larger buffer
                buffer = torch.zeros((2 * p.grad.numel(),), dtype=p.grad.dtype)
                buffer[::2] = p.grad.flatten()
                p.grad = buffer[::2].view(p.grad.shape)
    scale = scalers[0].get_scale() if scalers else 1.0
    named = [(name, p.grad) for name, p in ours.named_parameters() if p.grad is not None]
    before = {name: _full(g) / scale for name, g in named}
    flat = [g.flatten() for g in before.values()]
    expected = torch.linalg.vector_norm(torch.cat(flat)).item() if flat else 0.0
    clipper, (opt_ours, opt_theirs) = loop["clipper"], loop["optimizers"]
    if use_optimizer and loop["attach"]:
        (scalers[0].step if scalers else lambda opt: opt.step())(opt_ours)
        if scalers:
            scalers[1].unscale_(opt_theirs)
        torch.nn.utils.clip_grad_norm_(theirs.parameters(), MAX_NORM)
        (scalers[1].step if scalers else lambda opt: opt.step())(opt_theirs)
        if scalers:
            for scaler in scalers:
                scaler.update()
            stepped = not torch.isinf(torch.cat(flat)).any().item() if flat else True
        else:
            stepped = True
        if stepped:  # the clip ran in the step: its norm is this step's
            _assert_norm(clipper.last.total_norm.item(), expected)
        for a, b in zip(ours.parameters(), theirs.parameters()):
            torch.testing.assert_close(_full(a), _full(b), rtol=1e-4, atol=1e-6)
        return clipper.last.total_norm.item().hex() if clipper.last is not None else None
    if scalers:  # the recipe: unscale before clipping
        for scaler, optimizer in zip(scalers, loop["optimizers"]):
            scaler.unscale_(optimizer)
            scaler.update()
    result = clipper.clip_()
    _assert_norm(result.total_norm.item(), expected)
    coefficient = min(MAX_NORM / (expected + 1e-6), 1.0)
    for name, grad in named:
        torch.testing.assert_close(_full(grad), before[name] * coefficient, rtol=1e-4, atol=1e-7)
    return result.total_norm.item().hex()


def _assert_norm(got: float, expected: float) -> None:
    assert got == pytest.approx(expected, rel=1e-5), (got, expected)


ACTIONS = {
    "reset": _reset, "add_adapter": _add_adapter, "replace_parameter": _replace_parameter,
    "remove_adapter": _remove_adapter, "freeze": _freeze, "dtype": _dtype, "scaler": _scaler, "step": _step,
}


class Loop(RuleBasedStateMachine):
    """The rules; ``run`` applies one on every process of the loop and checks they agree."""

    kind = "local"
    pool = None

    def run(self, action: str, *args):
        results = [_apply(action, *args)] if self.pool is None else self.pool.run(_apply, action, *args)
        assert len(set(results)) == 1, f"ranks disagree on {action}{args}: {results}"
        return results[0]

    @initialize(seed=st.integers(0, 2**16), attach=st.booleans(), fused=st.booleans())
    def start(self, seed, attach, fused):
        self.structural = self.kind == "local"
        self.run("reset", self.kind, seed, attach, fused)

    @precondition(lambda self: self.structural)
    @rule(seed=st.integers(0, 2**16), param_group=st.booleans())
    def add_adapter(self, seed, param_group):
        self.run("add_adapter", seed, param_group)

    @precondition(lambda self: self.structural)
    @rule(seed=st.integers(0, 2**16))
    def replace_parameter(self, seed):
        self.run("replace_parameter", seed)

    @precondition(lambda self: self.structural)
    @rule()
    def remove_adapter(self):
        self.run("remove_adapter")

    @precondition(lambda self: self.kind != "fsdp2")
    @rule(module=st.sampled_from(["body", "mid"]), trainable=st.booleans())
    def freeze(self, module, trainable):
        self.run("freeze", module, trainable)

    @precondition(lambda self: self.structural)
    @rule(dtype=st.sampled_from(["float32", "float64"]))
    def dtype(self, dtype):
        self.run("dtype", dtype)

    @precondition(lambda self: self.kind != "fsdp2")
    @rule(on=st.booleans())
    def scaler(self, on):
        self.run("scaler", on)

    @rule(seed=st.integers(0, 2**16), use_optimizer=st.booleans(), none_mask=st.integers(0, 63),
          strided_mask=st.integers(0, 63))
    def step(self, seed, use_optimizer, none_mask, strided_mask):
        self.run("step", seed, use_optimizer, none_mask, strided_mask)


def _run_machine(kind: str, pool=None) -> None:
    machine = _settings(1 if pool is None else 2)(type(f"Loop_{kind}", (Loop,), {"kind": kind, "pool": pool}))
    machine.TestCase().runTest()


def test_the_clipper_follows_a_random_single_process_loop():
    _run_machine("local")


@pytest.mark.parametrize("kind", ["ddp", "fsdp2"])
def test_the_clipper_follows_a_random_loop_at_world_2(ranks, kind):
    _run_machine(kind, ranks(2))
