"""Threshold policies (ZClip, AutoClip) and spike skipping, step by step against independent
float64 re-implementations of their rules, on a scripted sequence of global norms (warm-up,
jitter, spikes, a NaN), under DDP and FSDP2 at world 1, 2 and 4."""

from __future__ import annotations

import contextlib
import copy
import math
import statistics

import pytest
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import distclip
from models import backward, batch, build, local, wrap
from reference import NoHostSync, by_case, clipper_step, collectives, every_case

# --------------------------------------------------------------------------- float64 references


class ZClipReference:
    """ZClip as the authors' code computes it, in Python floats."""

    def __init__(self, alpha, z_thresh, warmup_steps, mode, max_norm=math.inf):
        self.alpha, self.z, self.warmup, self.mode, self.cap = alpha, z_thresh, warmup_steps, mode, max_norm
        self.buffer, self.mean, self.var = [], None, None

    def step(self, g, accept):
        finite = math.isfinite(g)
        if self.mean is None:
            if accept and finite:
                self.buffer.append(g)
                if len(self.buffer) == self.warmup:
                    self.mean = sum(self.buffer) / len(self.buffer)
                    self.var = sum((x - self.mean) ** 2 for x in self.buffer) / len(self.buffer)
            return self.cap
        std = math.sqrt(self.var)
        z = (g - self.mean) / (std + 1e-6) if finite else math.nan
        spike = z > self.z
        target = {"reciprocal": self.mean + self.z**2 * std / z if spike else None,
                  "mean": self.mean, "fixed": self.mean + self.z * std}[self.mode]
        threshold = min(target if spike else self.mean + self.z * (std + 1e-6), self.cap)
        if accept and finite:
            e = target if spike else g
            self.mean = self.alpha * self.mean + (1 - self.alpha) * e
            self.var = self.alpha * self.var + (1 - self.alpha) * (e - self.mean) ** 2
        return threshold


class AutoClipReference:
    def __init__(self, quantile, window, warmup_steps, max_norm=math.inf):
        self.q, self.window, self.warmup, self.cap = quantile, window, warmup_steps, max_norm
        self.history = []

    def step(self, g, accept):
        finite = math.isfinite(g)
        candidates = sorted((self.history + [g] if finite else self.history)[-self.window :])
        if len(candidates) < self.warmup:
            threshold = self.cap
        else:  # numpy.percentile's linear interpolation
            h = (len(candidates) - 1) * self.q
            lo = math.floor(h)
            hi = min(lo + 1, len(candidates) - 1)
            threshold = min(candidates[lo] + (h - lo) * (candidates[hi] - candidates[lo]), self.cap)
        if accept and finite:
            self.history = (self.history + [g])[-self.window :]
        return threshold


class SpikeSkipReference:
    """SpikeSkip's rule in Python floats: a step's finite values enter the windows unless it is
    one of the first ``burst`` spikes in a row or was skipped for another reason."""

    def __init__(self, sigmas, window, min_history, burst=3):
        self.sigmas, self.window, self.min, self.burst = sigmas, window, min_history, burst
        self.norms, self.losses, self.run = [], [], 0

    def _spike(self, values, x):
        return len(values) >= self.min and x > statistics.fmean(values) + self.sigmas * statistics.stdev(values)

    def step(self, g, loss, skipped_anyway):
        spike = self._spike(self.norms, g) or (loss is not None and self._spike(self.losses, loss))
        self.run = self.run + 1 if spike else 0
        if not skipped_anyway and (not spike or self.run > self.burst):
            if math.isfinite(g):
                self.norms = (self.norms + [g])[-self.window :]
            if loss is not None and math.isfinite(loss):
                self.losses = (self.losses + [loss])[-self.window :]
        return spike


# --------------------------------------------------------------------------- the scripted run

# Loss multipliers: jitter around 1, spikes at 30 and 36, a NaN at 33, a slow rise after 40.
STEPS = 48
SPIKE_STEPS = {30: 40.0, 36: 9.0}
NAN_STEP = 33


def multiplier(step: int) -> float:
    if step == NAN_STEP:
        return math.nan
    jitter = 1.0 + 0.04 * ((step * 7) % 5 - 2) + 0.02 * max(0, step - 40)
    return jitter * SPIKE_STEPS.get(step, 1.0)


def scripted_loss(world: int, step: int, rank: int) -> float | None:
    """Every rank passes a loss but rank 1 of more than 2 (it passes none); a loss spike at 40."""
    if world > 2 and rank == 1:
        return None
    return (2.0 + 0.01 * ((step * 3) % 7) + rank * 0.1) * (25.0 if step == 40 else 1.0)


def _run_sequence(kind: str, policy: dict, spikes: dict | None, nonfinite: str, with_loss: bool):
    """Clip the scripted sequence; check every step's gradients were scaled by exactly the
    coefficient reported (or left alone when skipped); return the reported values."""
    torch.manual_seed(0)
    model = wrap(build(), kind)
    max_norm = {"zclip": distclip.ZClip, "autoclip": distclip.AutoClip}[policy["name"]](**policy["args"]) if (
        policy["name"] != "fixed") else policy["args"]["max_norm"]
    clipper = distclip.GradClipper(
        model, max_norm=max_norm, nonfinite=nonfinite, skip_spikes=distclip.SpikeSkip(**spikes) if spikes else None
    )
    rank = dist.get_rank()
    # The model does not train: each step's gradients are one backward's times the step's
    # multiplier, fresh tensors every step as after zero_grad() and a backward.
    backward(model, batch(rank))
    first = [p.grad for p in model.parameters()]
    return [_step(model, clipper, first, step, rank, with_loss) for step in range(STEPS)]


# Steps whose collectives are counted (profiling every step would triple the test's time).
PROFILED_STEPS = (0, 10, 30, NAN_STEP, 40)


def _step(model, clipper, first, step, rank, with_loss) -> dict:
    for param, grad in zip(model.parameters(), first):
        param.grad = grad * multiplier(step)
    before = [local(p.grad).clone() for p in model.parameters()]
    loss = scripted_loss(dist.get_world_size(), step, rank) if with_loss else None
    with collectives() if step in PROFILED_STEPS else contextlib.nullcontext([]) as issued:
        result = clipper.clip_(loss=None if loss is None else torch.tensor(loss))
    if step in PROFILED_STEPS:  # one rank alone communicates nothing
        assert issued == (clipper_step(first=step == 0) if dist.get_world_size() > 1 else []), (step, issued)
    after = [local(p.grad) for p in model.parameters()]
    if bool(result.skipped):
        for a, b in zip(after, before):  # bitwise, NaN included
            assert torch.equal(a.view(torch.int32), b.view(torch.int32)), f"step {step}: a skipped step changed gradients"
    elif not bool(result.nonfinite):
        for a, b in zip(after, before):
            torch.testing.assert_close(a, b * result.coef, rtol=0, atol=0)
    return {
        "norm": float(result.total_norm),
        "max_norm": float(result.max_norm),
        "coef": float(result.coef),
        "skipped": bool(result.skipped),
        "loss": float(result.loss),
        "bits": (result.total_norm.item().hex(), result.max_norm.item().hex(), result.coef.item().hex()),
    }


def _reference_losses(world: int, step: int) -> float | None:
    passed = [scripted_loss(world, step, r) for r in range(world)]
    passed = [v for v in passed if v is not None]
    return sum(passed) / len(passed) if passed else None


def _check_against_references(per_rank, world, policy, spikes, nonfinite, with_loss):
    def bits(steps):  # NaN != NaN: compare bit patterns
        return [(s["bits"], s["skipped"], s["loss"].hex()) for s in steps]

    assert all(bits(r) == bits(per_rank[0]) for r in per_rank), "ranks disagree on a norm, threshold, skip or loss"
    steps = per_rank[0]
    threshold_ref = {
        "fixed": lambda: None,
        "zclip": lambda: ZClipReference(**{"alpha": 0.97, "z_thresh": 2.5, "warmup_steps": 25, "mode": "reciprocal",
                                            **policy["args"]}),
        "autoclip": lambda: AutoClipReference(**{"quantile": 0.9, "window": 1000, "warmup_steps": 25,
                                                 **policy["args"]}),
    }[policy["name"]]()
    spike_ref = SpikeSkipReference(**spikes) if spikes else None
    decisions = []
    for step, got in enumerate(steps):
        g = got["norm"]
        loss = _reference_losses(world, step) if with_loss else None
        if with_loss:
            assert got["loss"] == pytest.approx(loss, rel=1e-6), (step, got["loss"], loss)
        else:
            assert math.isnan(got["loss"]), "no rank passed a loss: NaN"
        skipped = nonfinite == "skip" and not math.isfinite(g)
        if spike_ref is not None:
            skipped = spike_ref.step(g, loss, skipped) or skipped
        assert got["skipped"] == skipped, f"step {step}: skipped {got['skipped']}, reference {skipped}"
        expected = policy["args"]["max_norm"] if threshold_ref is None else threshold_ref.step(g, not skipped)
        assert got["max_norm"] == pytest.approx(expected, rel=2e-7), f"step {step}: {got['max_norm']} vs {expected}"
        if math.isfinite(g) and not skipped:
            coef = min(got["max_norm"] / (g + 1e-6), 1.0)
            assert got["coef"] == pytest.approx(coef, rel=2e-7), (step, got["coef"], coef)
        decisions.append((skipped, got["coef"] < 1))
    return decisions


def _run_and_check(ranks, kind, world, policy, spikes=None, nonfinite="propagate", with_loss=False):
    per_rank = ranks(world).run(_run_sequence, kind, policy, spikes, nonfinite, with_loss)
    return _check_against_references(per_rank, world, policy, spikes, nonfinite, with_loss)


ZCLIP = {"name": "zclip", "args": {"warmup_steps": 10}}
AUTOCLIP = {"name": "autoclip", "args": {"quantile": 0.9, "window": 12, "warmup_steps": 5}}
SPIKE_SKIP = {"sigmas": 6.0, "window": 16, "min_history": 8}


# --------------------------------------------------------------------------- the rules


@pytest.mark.parametrize("mode", ["reciprocal", "mean", "fixed"])
def test_zclip_threshold_follows_the_papers_rule(ranks, mode):
    decisions = _run_and_check(ranks, "ddp", 2, {"name": "zclip", "args": {"warmup_steps": 10, "mode": mode}})
    clipped = [step for step, (_, was_clipped) in enumerate(decisions) if was_clipped]
    assert 30 in clipped and 36 in clipped and not any(step < 10 for step in clipped), clipped


def test_zclip_with_a_cap_clips_during_warm_up_too(ranks):
    decisions = _run_and_check(ranks, "ddp", 2, {"name": "zclip", "args": {"warmup_steps": 10, "max_norm": 1e-3}})
    assert all(was_clipped for _, was_clipped in decisions[:10])


@pytest.mark.parametrize("kind,world", [("ddp", 1), ("fsdp2", 2), ("fsdp2", 4)])
def test_zclip_is_identical_on_every_rank_under_sharding(ranks, kind, world):
    _run_and_check(ranks, kind, world, ZCLIP)


@pytest.mark.parametrize("kind,world", [("ddp", 2), ("fsdp2", 2)])
def test_autoclip_threshold_is_the_quantile_of_the_recent_norms(ranks, kind, world):
    decisions = _run_and_check(ranks, kind, world, AUTOCLIP)
    assert sum(was_clipped for _, was_clipped in decisions) >= 4


@pytest.mark.parametrize("kind,world", [("ddp", 2), ("fsdp2", 4)])
def test_spike_skip_skips_grad_norm_and_nonfinite_steps(ranks, kind, world):
    decisions = _run_and_check(ranks, kind, world, {"name": "fixed", "args": {"max_norm": 1e3}}, SPIKE_SKIP, "skip")
    assert [step for step, (skipped, _) in enumerate(decisions) if skipped] == [30, NAN_STEP, 36]


@pytest.mark.parametrize("world", [2, 4])
def test_spike_skip_judges_the_global_loss(ranks, world):
    decisions = _run_and_check(ranks, "ddp", world, {"name": "fixed", "args": {"max_norm": 1e3}}, SPIKE_SKIP, "skip",
                               with_loss=True)
    assert 40 in [step for step, (skipped, _) in enumerate(decisions) if skipped]


def test_skipped_steps_stay_out_of_the_threshold_policy(ranks):
    _run_and_check(ranks, "ddp", 2, ZCLIP, SPIKE_SKIP, "skip", with_loss=True)
    _run_and_check(ranks, "fsdp2", 2, AUTOCLIP, SPIKE_SKIP, "skip")


# --------------------------------------------------------------------------- a lasting shift of level

SHIFT_AT, SHIFT_STEPS, SAVE_IN_THE_RUN = 32, 48, 34
SHIFT_SPIKE_SKIP = {"sigmas": 6.0, "window": 16, "min_history": 8}  # burst: the default, 3


def shift_multiplier(step: int) -> float:
    """The scripted jitter, a lone x40 spike at step 20, then the norm x5 for good from SHIFT_AT
    (a new data mix)."""
    jitter = 1.0 + 0.04 * ((step * 7) % 5 - 2)
    return jitter * (40.0 if step == 20 else 1.0) * (5.0 if step >= SHIFT_AT else 1.0)


def _through_a_shift(save_at: int) -> dict:
    """GradClipper under DDP through the shift (the model does not train, so each step's norm is
    the first one times ``shift_multiplier``); then a second clipper, loaded from the state saved
    before step ``save_at``, clips the steps from ``save_at`` on again.  Both decision lists."""
    torch.manual_seed(0)
    model = DDP(build())
    backward(model, batch(dist.get_rank()))
    first = [p.grad for p in model.parameters()]

    def clipper():
        return distclip.GradClipper(model, max_norm=1e3, skip_spikes=distclip.SpikeSkip(**SHIFT_SPIKE_SKIP))

    def clip(clipper, step):
        for param, grad in zip(model.parameters(), first):
            param.grad = grad * shift_multiplier(step)  # fresh tensors, as after a backward
        result = clipper.clip_()
        return bool(result.skipped), result.total_norm.item().hex()

    uninterrupted, saved = clipper(), None
    steps = []
    for step in range(SHIFT_STEPS):
        if step == save_at:
            saved = copy.deepcopy(uninterrupted.state_dict())
        steps.append(clip(uninterrupted, step))
    resumed = clipper()
    resumed.load_state_dict(saved)
    return {"uninterrupted": steps, "resumed": [clip(resumed, step) for step in range(save_at, SHIFT_STEPS)]}


def _skipped(steps, first=0):
    return [step for step, (skipped, _) in enumerate(steps, start=first) if skipped]


@pytest.fixture(scope="module")
def through_a_shift(ranks):
    """Both ranks' decision lists of ``_through_a_shift(SAVE_IN_THE_RUN)`` (two tests read them)."""
    return ranks(2).run(_through_a_shift, SAVE_IN_THE_RUN)


def test_spike_skip_skips_a_lone_spike_and_learns_a_lasting_shift_within_a_window(through_a_shift):
    per_rank = through_a_shift
    assert per_rank[0]["uninterrupted"] == per_rank[1]["uninterrupted"], "ranks disagree on a norm or a skip"
    skipped = _skipped(per_rank[0]["uninterrupted"])
    reference = SpikeSkipReference(**SHIFT_SPIKE_SKIP)
    assert skipped == [s for s in range(SHIFT_STEPS) if reference.step(shift_multiplier(s), None, False)]
    # The spike; then the first burst (3) spikes of the shift stay out of the window, the 4th
    # enters it and the window has learnt the new level: 4 skips, not every later step.
    assert skipped == [20, SHIFT_AT, SHIFT_AT + 1, SHIFT_AT + 2, SHIFT_AT + 3]


def test_a_run_resumed_in_a_spike_run_makes_the_uninterrupted_decisions(through_a_shift):
    # Saved after two spikes of the shift: the run length (2 of burst 3) is state too.
    for result in through_a_shift:
        assert result["resumed"] == result["uninterrupted"][SAVE_IN_THE_RUN:]
        assert _skipped(result["resumed"], SAVE_IN_THE_RUN) == [SAVE_IN_THE_RUN, SAVE_IN_THE_RUN + 1]


def _judge(rule: distclip.SpikeSkip, norms: list[float]) -> list[int]:
    no, nan = torch.zeros((), dtype=torch.bool), torch.tensor(math.nan, dtype=torch.float64)
    return [i for i, g in enumerate(norms) if bool(rule.step(torch.tensor(g, dtype=torch.float64), nan, no, no))]


@pytest.mark.parametrize("burst,skipped", [(3, [20, 26]), (0, [20])], ids=["burst-3", "burst-0-olmo-core"])
def test_a_spike_kept_out_of_the_window_leaves_the_next_spike_visible(burst, skipped):
    # x10 at 20, x3 at 26: with burst=0 (every value enters, OLMo-core's rule) the first spike
    # inflates the window's deviation and the second passes.
    norms = [(1.0 + 0.04 * ((s * 7) % 5 - 2)) * {20: 10.0, 26: 3.0}.get(s, 1.0) for s in range(40)]
    assert _judge(distclip.SpikeSkip(**SHIFT_SPIKE_SKIP, burst=burst), norms) == skipped


def test_a_spike_skip_state_saved_before_burst_existed_loads():
    rule = distclip.SpikeSkip(**SHIFT_SPIKE_SKIP)
    norms = [shift_multiplier(s) for s in range(SHIFT_AT + 2)]
    _judge(rule, norms[:SHIFT_AT])
    old = rule.state_dict()
    del old["run"], old["config"]["burst"]  # the format before issue 28
    loaded = distclip.SpikeSkip(**SHIFT_SPIKE_SKIP)
    loaded.load_state_dict(old)
    assert repr(loaded.state_dict()) == repr(rule.state_dict())  # repr: NaN marks the empty slots
    assert _judge(loaded, norms[SHIFT_AT:]) == _judge(rule, norms[SHIFT_AT:]) == [0, 1]


def test_loading_a_spike_skip_state_of_another_burst_keeps_this_burst_and_warns():
    saved = distclip.SpikeSkip(burst=3).state_dict()
    loaded = distclip.SpikeSkip(burst=0)
    with pytest.warns(UserWarning, match=r"burst=0 \(the checkpoint has 3\)"):
        loaded.load_state_dict(saved)
    assert loaded.burst == 0


@pytest.mark.parametrize("saved_by,loaded_by,match", [
    (lambda: distclip.SpikeSkip(window=8, min_history=4), lambda: distclip.SpikeSkip(window=16, min_history=4), "window=8.*window=16"),
    (lambda: distclip.AutoClip(window=8, warmup_steps=4), lambda: distclip.AutoClip(window=16, warmup_steps=4), "window=8.*window=16"),
    (lambda: distclip.ZClip(warmup_steps=4), lambda: distclip.ZClip(warmup_steps=5), "warmup_steps=4.*warmup_steps=5"),
    (lambda: distclip.ZClip(), lambda: distclip.AutoClip(), "of 'ZClip', this clipper has AutoClip"),
], ids=["spike-window", "autoclip-window", "zclip-warmup", "another-policy"])
def test_a_policy_state_of_another_shape_cannot_apply(saved_by, loaded_by, match):
    with pytest.raises(ValueError, match=match):
        loaded_by().load_state_dict(saved_by().state_dict())


# --------------------------------------------------------------------------- skipping a step

OPTIMIZERS = {
    "adamw": lambda ps, fused: torch.optim.AdamW(ps, lr=0.01, fused=fused),
    "sgd-momentum": lambda ps, fused: torch.optim.SGD(ps, lr=0.05, momentum=0.9, fused=fused),
}
SPIKE_STEP = 5


def _bits(tensor):
    return tensor.detach().clone().view(torch.int32) if tensor.dtype == torch.float32 else tensor.detach().clone()


def _optimizer_state(optimizer):
    return {f"{id(p)}.{k}": _bits(v) for p, s in optimizer.state.items() for k, v in s.items() if torch.is_tensor(v)}


def _skipped_step_changes_nothing(case):
    optimizer_name, fused, with_scaler = case
    model = DDP(build())
    optimizer = OPTIMIZERS[optimizer_name](model.parameters(), fused)
    clipper = distclip.GradClipper(model, max_norm=1.0, skip_spikes=distclip.SpikeSkip(sigmas=50.0, window=8, min_history=3))
    clipper.attach(optimizer)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8) if with_scaler else None
    x = batch(dist.get_rank())
    for step in range(SPIKE_STEP + 2):
        optimizer.zero_grad()
        loss = (model(x).float() ** 2).mean() * (1e4 if step == SPIKE_STEP else 1.0)
        clipper.observe_loss(loss.detach())
        params = [_bits(p) for p in model.parameters()]
        state = _optimizer_state(optimizer)
        if scaler is None:
            loss.backward()
            optimizer.step()
        else:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        unchanged = all(torch.equal(_bits(p), b) for p, b in zip(model.parameters(), params))
        state_after = _optimizer_state(optimizer)
        same_state = state_after.keys() == state.keys() and all(torch.equal(state_after[k], state[k]) for k in state)
        skipped = bool(clipper.last.skipped)
        assert skipped == (step == SPIKE_STEP), f"step {step}: skipped={skipped}"
        if skipped:
            assert unchanged and same_state, "a skipped step changed parameters or optimizer state"
            assert not hasattr(optimizer, "found_inf") or scaler is not None
        else:
            assert not unchanged, f"step {step} did not update the parameters"
    return clipper.state_dict()["skipped_steps"]


def test_skipped_step_leaves_parameters_and_optimizer_state_bitwise_unchanged(ranks):
    # (optimizer, fused, with a GradScaler)
    cases = [(name, fused, with_scaler) for name in sorted(OPTIMIZERS) for fused in (False, True)
             for with_scaler in (False, True)]
    for case, skipped in by_case(ranks(2).run(every_case, _skipped_step_changes_nothing, cases)).items():
        assert skipped == [1, 1], case


# --------------------------------------------------------------------------- checkpoints


def _clipper_for(policy_name):
    policy = {"zclip": lambda: distclip.ZClip(warmup_steps=4),
              "autoclip": lambda: distclip.AutoClip(quantile=0.5, window=5, warmup_steps=3)}[policy_name]()
    return policy, distclip.SpikeSkip(sigmas=3.0, window=6, min_history=3)


def _train(model, optimizer, clipper, steps):
    x = batch(dist.get_rank())
    record = []
    for step in steps:
        optimizer.zero_grad()
        loss = (model(x).float() ** 2).mean() * (30.0 if step in (7, 10) else 1.0 + 0.1 * (step % 3))
        clipper.observe_loss(loss.detach())
        loss.backward()
        optimizer.step()
        record.append((clipper.last.max_norm.item().hex(), bool(clipper.last.skipped),
                       [p.detach().clone() for p in model.parameters()]))
    return record


def _resume_makes_the_same_decisions(policy_name, save_at, total):
    def fresh():
        model = DDP(build())
        optimizer = torch.optim.AdamW(model.parameters(), lr=0.01)
        policy, spikes = _clipper_for(policy_name)
        clipper = distclip.GradClipper(model, max_norm=policy, skip_spikes=spikes)
        clipper.attach(optimizer)
        return model, optimizer, clipper

    model, optimizer, clipper = fresh()
    _train(model, optimizer, clipper, range(save_at))
    saved = copy.deepcopy((model.state_dict(), optimizer.state_dict(), clipper.state_dict()))
    uninterrupted = _train(model, optimizer, clipper, range(save_at, total))

    model, optimizer, clipper = fresh()
    model.load_state_dict(saved[0])
    optimizer.load_state_dict(saved[1])
    clipper.load_state_dict(saved[2])
    resumed = _train(model, optimizer, clipper, range(save_at, total))
    for step, (a, b) in enumerate(zip(uninterrupted, resumed), start=save_at):
        assert a[:2] == b[:2], f"step {step}: threshold/skip {a[:2]} uninterrupted, {b[:2]} resumed"
        assert all(torch.equal(p, q) for p, q in zip(a[2], b[2])), f"step {step}: parameters differ"
    return [a[1] for a in uninterrupted]


@pytest.mark.parametrize("policy_name", ["zclip", "autoclip"])
def test_resumed_run_makes_the_same_thresholds_and_skips(ranks, policy_name):
    skipped = ranks(2).run(_resume_makes_the_same_decisions, policy_name, 6, 12)
    assert skipped[0] == skipped[1] and any(skipped[0]), skipped


def test_a_checkpoint_of_other_policy_parameters_keeps_this_clippers_and_warns():
    saved = distclip.GradClipper([torch.zeros(1, requires_grad=True)], max_norm=distclip.ZClip(alpha=0.9)).state_dict()
    other = distclip.GradClipper([torch.zeros(1, requires_grad=True)], max_norm=distclip.ZClip(alpha=0.8))
    with pytest.warns(UserWarning, match=r"alpha=0.8 \(the checkpoint has 0.9\)"):
        other.load_state_dict(saved)
    assert other.policy.alpha == 0.8
    with pytest.raises(ValueError, match="threshold_policy"):
        distclip.GradClipper([torch.zeros(1, requires_grad=True)]).load_state_dict(saved)


# --------------------------------------------------------------------------- one collective, no host sync


def _loss_rides_the_norm_collective(norm_type):
    model = DDP(build())
    clipper = distclip.GradClipper(model, max_norm=distclip.ZClip(warmup_steps=2), norm_type=norm_type,
                                   skip_spikes=distclip.SpikeSkip(window=4, min_history=2))
    rank, world = dist.get_rank(), dist.get_world_size()
    losses = []
    for step in range(4):
        model.zero_grad()
        backward(model, batch(rank))
        loss = torch.tensor(1.0 + rank) if step % 2 == 0 or rank == 0 else None  # odd steps: rank 0 alone
        with collectives() as issued:
            result = clipper.clip_(loss=loss)
        assert issued == clipper_step(first=step == 0), issued
        expected = (sum(1.0 + r for r in range(world)) / world) if step % 2 == 0 else 1.0
        assert result.loss.item() == pytest.approx(expected, rel=1e-7), (step, result.loss, expected)
        losses.append(result.loss.item().hex())
    return losses


def test_loss_mean_rides_the_one_collective(ranks):
    norm_types = [2.0, 1.0, math.inf, -math.inf]
    for norm_type, per_rank in by_case(ranks(2).run(every_case, _loss_rides_the_norm_collective, norm_types)).items():
        assert per_rank[0] == per_rank[1], norm_type


def _no_host_sync(case):
    policy_name, fused = case
    model = DDP(build())
    policy = {"fixed": lambda: 0.5,
              "zclip": lambda: distclip.ZClip(warmup_steps=2),
              "autoclip": lambda: distclip.AutoClip(window=4, warmup_steps=2)}
    clipper = distclip.GradClipper(model, max_norm=policy[policy_name](),
                                   skip_spikes=distclip.SpikeSkip(window=4, min_history=2))
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01, fused=fused) if fused is not None else None
    if optimizer is not None:
        clipper.attach(optimizer)
    for step in range(5):
        model.zero_grad()
        loss = (model(batch(dist.get_rank())).float() ** 2).mean() * (100.0 if step == 4 else 1.0)
        loss.backward()
        with NoHostSync(host_data=step > 0):
            if optimizer is None:
                clipper.clip_(loss=loss.detach())
            else:
                clipper.observe_loss(loss.detach())
                optimizer.step()
    return bool(clipper.last.skipped)


def test_policies_and_spike_skip_never_wait_for_the_device(ranks):
    # (policy, fused): None clips with clip_(), True steps a fused AdamW the clipper is attached to
    cases = [(policy_name, fused) for policy_name in ("fixed", "zclip", "autoclip") for fused in (None, True)]
    for case, skipped in by_case(ranks(2).run(every_case, _no_host_sync, cases)).items():
        assert skipped == [True, True], case


def test_the_host_sync_audit_catches_a_sync():
    with pytest.raises(AssertionError, match="host sync"), NoHostSync():
        torch.ones(()).item()


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "make,argument",
    [
        (lambda: distclip.ZClip(alpha=0.0), "alpha"),
        (lambda: distclip.ZClip(alpha=1.0), "alpha"),
        (lambda: distclip.ZClip(z_thresh=0.0), "z_thresh"),
        (lambda: distclip.ZClip(warmup_steps=0), "warmup_steps"),
        (lambda: distclip.ZClip(mode="zscore"), "mode"),
        (lambda: distclip.AutoClip(quantile=0.0), "quantile"),
        (lambda: distclip.AutoClip(quantile=1.0), "quantile"),
        (lambda: distclip.AutoClip(window=1), "window"),
        (lambda: distclip.AutoClip(window=10, warmup_steps=11), "warmup_steps"),
        (lambda: distclip.SpikeSkip(sigmas=0.0), "sigmas"),
        (lambda: distclip.SpikeSkip(sigmas=-1.0), "sigmas"),
        (lambda: distclip.SpikeSkip(window=1), "window"),
        (lambda: distclip.SpikeSkip(window=8, min_history=1), "min_history"),
        (lambda: distclip.SpikeSkip(burst=-1), "burst"),
        (lambda: distclip.SpikeSkip(burst=1.5), "burst"),
        (lambda: distclip.GradClipper([torch.zeros(1)], skip_spikes=6.0), "skip_spikes"),
    ],
)
def test_bad_policy_argument_raises_value_error_naming_it(make, argument):
    with pytest.raises(ValueError, match=argument):
        make()


def _bad_loss_on_one_rank(bad):
    model = DDP(build())
    clipper = distclip.GradClipper(model, max_norm=distclip.ZClip(warmup_steps=2))
    backward(model, batch(dist.get_rank()))
    before = [p.grad.clone() for p in model.parameters()]
    loss = {"vector": torch.ones(2), "integer": torch.tensor(3), "float": 3.0}[bad] if dist.get_rank() == 1 else torch.tensor(1.0)
    with pytest.raises(ValueError, match="`loss` must be None or a 0-dim floating-point tensor"):
        clipper.clip_(loss=loss)
    assert all(torch.equal(p.grad, b) for p, b in zip(model.parameters(), before)), "gradients were modified"
    return True


@pytest.mark.parametrize("bad", ["vector", "integer", "float"])
def test_bad_loss_on_one_rank_raises_on_every_rank(ranks, bad):
    assert ranks(2).run(_bad_loss_on_one_rank, bad) == [True, True]


def test_bad_loss_without_a_process_group_raises_and_modifies_nothing():
    model = build()
    clipper = distclip.GradClipper(model, max_norm=1e-3)
    backward(model, batch(0))
    before = [p.grad.clone() for p in model.parameters()]
    with pytest.raises(ValueError, match="`loss` must be None or a 0-dim floating-point tensor"):
        clipper.clip_(loss=torch.ones(2))
    assert all(torch.equal(p.grad, b) for p, b in zip(model.parameters(), before)), "gradients were modified"


def test_a_checkpoint_whose_spike_state_cannot_apply_leaves_the_threshold_policy_as_it_was():
    model = torch.nn.Linear(4, 1)

    def clipper(window):
        return distclip.GradClipper(model, max_norm=distclip.ZClip(warmup_steps=2), skip_spikes=distclip.SpikeSkip(window=window))

    saved, mine = clipper(128), clipper(64)
    for steps, made in ((5, saved), (1, mine)):
        for _ in range(steps):
            model.zero_grad()
            model(torch.randn(8, 4)).sum().backward()
            made.clip_()
    before = repr(mine.state_dict())  # repr: NaN slots compare equal as text
    with pytest.raises(ValueError, match="window=128, this one window=64"):
        mine.load_state_dict(saved.state_dict())
    assert repr(mine.state_dict()) == before
