"""GradClipper: cached plans, per-group norms in the one collective, non-finite policies,
optimizer and AMP integration, fused zero-pass apply, checkpointing."""

import copy
import math

import pytest
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.nn.parallel import DistributedDataParallel as DDP

import distclip
from models import backward, batch, build, local, wrap
from reference import assert_close_norm, by_case, clipper_step, collectives, every_case, full_grads, reference_norm

OPTIMIZERS = {
    "sgd": lambda ps, fused: torch.optim.SGD(ps, lr=0.1, momentum=0.9, fused=fused),
    "adam": lambda ps, fused: torch.optim.Adam(ps, lr=0.01, fused=fused),
    "adamw": lambda ps, fused: torch.optim.AdamW(ps, lr=0.01, fused=fused),
}


def _twin_models(kind):
    """Two identical models with identical gradients: DDP or FSDP2 on the WORLD."""
    models = []
    for _ in range(2):
        model = wrap(build(), kind)
        backward(model, batch(dist.get_rank()))
        models.append(model)
    return models


def _clipper_matches_functional(norm_type, kind):
    ours, theirs = _twin_models(kind)
    clipper = distclip.GradClipper(ours, max_norm=0.05, norm_type=norm_type)
    with collectives() as issued:
        result = clipper.clip_()
    assert issued == clipper_step(first=True), issued
    expected = distclip.clip_grad_norm_(theirs, 0.05, norm_type)
    assert torch.equal(result.total_norm, expected)
    for a, b in zip(ours.parameters(), theirs.parameters()):
        assert torch.equal(local(a.grad), local(b.grad))
    return result.total_norm.item().hex()


@pytest.mark.parametrize("kind,world_size", [("ddp", 2), ("fsdp2", 4)])
def test_clipper_equals_the_functional_clip(ranks, kind, world_size):
    norm_types = [2.0, math.inf, -math.inf, 0.0]
    for norm_type, norms in by_case(ranks(world_size).run(every_case, _clipper_matches_functional, norm_types, kind)).items():
        assert len(set(norms)) == 1, (norm_type, norms)


def test_plan_is_built_once_and_rebuilt_when_the_set_of_gradients_changes():
    model = build()
    backward(model, batch(0))
    clipper = distclip.GradClipper(model, max_norm=1e9)
    clipper.clip_()
    plan = clipper._plan
    model.zero_grad(set_to_none=True)
    backward(model, batch(1))  # new gradient tensors, same parameters
    clipper.clip_()
    assert clipper._plan is plan
    model.layers[0].weight.grad = None  # a frozen parameter
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    expected = torch.linalg.vector_norm(torch.cat([g.double().flatten() for g in grads])).item()
    assert clipper.clip_().total_norm.item() == pytest.approx(expected, rel=1e-6)
    assert clipper._plan is not plan


def _group_norms(groups):
    model = build()
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    fully_shard(model, mesh=mesh)
    backward(model, batch(dist.get_rank()))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    if groups == "param_groups":
        optimizer = torch.optim.SGD(
            [{"params": model.layers.parameters(), "name": "layers"}, {"params": list(model.norm.parameters()) + list(model.head.parameters())}],
            lr=0.1,
        )
    clipper = distclip.GradClipper(model, max_norm=1e9, groups=groups)
    if groups == "param_groups":
        clipper.attach(optimizer)
    full = full_grads([(n, p.grad) for n, p in model.named_parameters()])
    with collectives() as issued:
        result = clipper.clip_()
    assert issued == clipper_step(first=True), issued  # every group's norm rides the same collective
    members = {
        "modules": {"layers": "layers.", "norm": "norm.", "head": "head."},
        "param_groups": {"layers": "layers.", "param_group_1": ("norm.", "head.")},
    }[groups]
    assert set(result.group_norms) == set(members)
    for name, prefix in members.items():
        expected = reference_norm({n: g for n, g in full.items() if n.startswith(prefix)}, 2.0)
        assert_close_norm(result.group_norms[name].item(), expected, 2.0)
    assert_close_norm(result.total_norm.item(), reference_norm(full, 2.0), 2.0)


@pytest.mark.parametrize("groups", ["modules", "param_groups"])
def test_group_norms_ride_the_single_collective(ranks, groups):
    ranks(2).run(_group_norms, groups)


def _nonfinite_policy(policy, optimizer_name, fused):
    model = DDP(build())
    backward(model, batch(dist.get_rank()))
    if dist.get_rank() == 1:
        model.module.head.weight.grad[0, 0] = math.nan  # a copy that differs: its owner may be any rank
        for p in model.parameters():
            p.grad.fill_(math.nan)
    optimizer = OPTIMIZERS[optimizer_name](model.parameters(), fused)
    params_before = [p.detach().clone() for p in model.parameters()]
    clipper = distclip.GradClipper(model, max_norm=1.0, nonfinite=policy)
    clipper.attach(optimizer)
    if policy == "error":
        with pytest.raises(RuntimeError, match="non-finite"):
            optimizer.step()
        return
    optimizer.step()
    after = [p.detach() for p in model.parameters()]
    if policy == "skip":
        assert all(torch.equal(a, b) for a, b in zip(after, params_before)), "skip must leave params alone"
        states = [s for s in optimizer.state.values()]
        assert all(float(s.get("step", 0)) == 0 for s in states), states
    else:
        assert all(bool(a.isnan().all()) for a in after), "propagate scales by NaN like torch"


@pytest.mark.parametrize("fused", [False, True], ids=["foreach", "fused"])
@pytest.mark.parametrize("optimizer_name", ["sgd", "adam"])
@pytest.mark.parametrize("policy", ["propagate", "error", "skip"])
def test_nonfinite_policies(ranks, policy, optimizer_name, fused):
    ranks(2).run(_nonfinite_policy, policy, optimizer_name, fused)


def _attached_step_equals_clip_then_step(optimizer_name, fused):
    ours, theirs = DDP(build()), DDP(build())
    opt_ours = OPTIMIZERS[optimizer_name](ours.parameters(), fused)
    opt_theirs = OPTIMIZERS[optimizer_name](theirs.parameters(), fused)
    distclip.GradClipper(ours, max_norm=0.05).attach(opt_ours)
    seen_by_optimizer = []
    opt_ours.register_step_pre_hook(  # runs after the clipper's hook
        lambda *_: seen_by_optimizer.__setitem__(slice(None), [p.grad.clone() for p in ours.parameters()])
    )
    for step in range(3):
        for model in (ours, theirs):
            model.zero_grad()
            backward(model, batch(dist.get_rank() + 10 * step))
        unclipped = [p.grad.clone() for p in ours.parameters()]
        opt_ours.step()
        distclip.clip_grad_norm_(theirs, 0.05)
        opt_theirs.step()
        assert not hasattr(opt_ours, "grad_scale") and not hasattr(opt_ours, "found_inf")
        # Zero-pass: a fused optimizer gets the coefficient through grad_scale, so the clipper
        # never rewrote the gradients before the optimizer's own kernel read them.
        rewritten = [not torch.equal(g, u) for g, u in zip(seen_by_optimizer, unclipped)]
        assert not any(rewritten) if fused else all(rewritten)
    for a, b in zip(ours.parameters(), theirs.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("fused", [False, True], ids=["foreach", "fused-zero-pass"])
@pytest.mark.parametrize("optimizer_name", sorted(OPTIMIZERS))
def test_attached_step_equals_explicit_clip_then_step(ranks, optimizer_name, fused):
    ranks(2).run(_attached_step_equals_clip_then_step, optimizer_name, fused)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("fused", [False, True], ids=["foreach", "fused-zero-pass"])
def test_grad_scaler_with_autocast_clips_the_unscaled_gradients(dtype, fused):
    torch.manual_seed(0)
    ours = build()
    theirs = copy.deepcopy(ours)
    opt_ours = torch.optim.AdamW(ours.parameters(), lr=0.01, fused=fused)
    opt_theirs = torch.optim.AdamW(theirs.parameters(), lr=0.01, fused=fused)
    scaler_ours, scaler_theirs = torch.amp.GradScaler("cpu", init_scale=2.0**10), torch.amp.GradScaler("cpu", init_scale=2.0**10)
    clipper = distclip.GradClipper(ours, max_norm=0.05)
    clipper.attach(opt_ours)
    for step in range(3):
        x = batch(step)
        for model, scaler in ((ours, scaler_ours), (theirs, scaler_theirs)):
            model.zero_grad()
            with torch.autocast("cpu", dtype=dtype):
                loss = model(x).float().square().mean()
            scaler.scale(loss).backward()
        scaler_ours.step(opt_ours)
        scaler_ours.update()
        scaler_theirs.unscale_(opt_theirs)  # the documented recipe: unscale, clip, step
        expected = distclip.clip_grad_norm_(theirs.parameters(), 0.05)
        scaler_theirs.step(opt_theirs)
        scaler_theirs.update()
        torch.testing.assert_close(clipper.history[-1], expected, rtol=1e-6, atol=0)
    for a, b in zip(ours.parameters(), theirs.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def _resume():
    model = DDP(build())
    clipper = distclip.GradClipper(model, max_norm=0.05, nonfinite="skip")
    norms = []
    for step in range(4):
        model.zero_grad()
        backward(model, batch(dist.get_rank() + step))
        norms.append(clipper.clip_().total_norm.item())
        if step == 1:
            saved = copy.deepcopy(clipper.state_dict())
    resumed = distclip.GradClipper(model, max_norm=0.05, nonfinite="skip")
    resumed.load_state_dict(saved)
    assert resumed.steps == 2
    for step in (2, 3):
        model.zero_grad()
        backward(model, batch(dist.get_rank() + step))
        resumed.clip_()
    state = resumed.state_dict()
    assert state == clipper.state_dict(), (state, clipper.state_dict())
    assert state["history"] == pytest.approx(norms, rel=0, abs=0)
    return state


def test_a_checkpoint_restores_state_not_settings():
    model = build()
    saved_by = distclip.GradClipper(model, max_norm=1.0, norm_type=2.0, nonfinite="propagate")
    backward(model, batch(0))
    saved_by.clip_()
    state = saved_by.state_dict()
    resumed = distclip.GradClipper(model, max_norm=0.05, norm_type=1.0, nonfinite="error")
    with pytest.warns(UserWarning, match=r"max_norm=0.05 \(the checkpoint has 1.0\).*norm_type=1.0 \(the checkpoint has 2.0\)"
                      r".*nonfinite='error' \(the checkpoint has 'propagate'\)"):
        resumed.load_state_dict(state)
    assert resumed.steps == 1 and list(resumed.history) == list(saved_by.history)
    model.zero_grad()
    backward(model, batch(1))
    grads = [p.grad.double().flatten() for p in model.parameters()]
    result = resumed.clip_()
    expected = torch.linalg.vector_norm(torch.cat(grads), 1.0).item()
    assert result.total_norm.item() == pytest.approx(expected, rel=1e-6)
    assert result.max_norm.item() == pytest.approx(0.05)
    model.layers[0].weight.grad[0, 0] = float("nan")
    with pytest.raises(RuntimeError, match="non-finite"):
        resumed.clip_()


def test_state_dict_resume_continues_the_same_history_on_every_rank(ranks):
    states = ranks(2).run(_resume)
    assert states[0] == states[1]
    assert states[0]["steps"] == 4 and states[0]["clipped_steps"] == 4
