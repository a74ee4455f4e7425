"""GradClipper follows the training loop: whatever the loop changes after the clipper was made
(parameters loaded, added, replaced, removed, unfrozen, retyped; FSDP1 units; param groups;
GradScaler recipes), each step's norm and clipped gradients are those of the model as it is then.

References: the float64 norm of the model's gradients at that step, or torch's own clip and
step on an identical twin."""

import contextlib
import copy
import math

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

import distclip
from models import MLP, backward, batch, build


class Net(nn.Module):
    """A body, a head and adapters added later (LoRA-style: ``h + adapter(h)``)."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(16, 16)
        self.head = nn.Linear(16, 1)
        self.adapters = nn.ModuleList()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.body(x)
        for adapter in self.adapters:
            h = h + adapter(h)
        return self.head(torch.tanh(h))


def _net(seed: int = 0) -> Net:
    torch.manual_seed(seed)
    return Net()


def _reference(model: nn.Module, norm_type: float = 2.0) -> float:
    grads = [p.grad.detach().double().flatten() for p in model.parameters() if p.grad is not None]
    return torch.linalg.vector_norm(torch.cat(grads), norm_type).item()


def _step_and_check(clipper: distclip.GradClipper, model: nn.Module, x: torch.Tensor, max_norm: float) -> float:
    """A fresh backward, then the clip against the float64 reference: the norm and every
    gradient (the model's, as it is now)."""
    model.zero_grad(set_to_none=True)
    backward(model, x)
    before = {name: p.grad.double().clone() for name, p in model.named_parameters() if p.grad is not None}
    expected = _reference(model)
    result = clipper.clip_()
    assert result.total_norm.item() == pytest.approx(expected, rel=1e-6)
    coefficient = min(max_norm / (expected + 1e-6), 1.0)
    for name, p in model.named_parameters():
        if name in before:
            torch.testing.assert_close(p.grad.double(), before[name] * coefficient, rtol=1e-5, atol=1e-8)
    return expected


def test_a_model_loaded_with_assign_after_the_clipper_was_made_is_clipped():
    with torch.device("meta"):
        model = MLP()
    clipper = distclip.GradClipper(model, max_norm=0.1)
    model.load_state_dict(build().state_dict(), assign=True)
    assert _step_and_check(clipper, model, batch(0), 0.1) > 0


def test_a_model_materialized_with_to_empty_after_the_clipper_was_made_is_clipped():
    with torch.device("meta"):
        model = MLP()
    clipper = distclip.GradClipper(model, max_norm=0.1)
    model.to_empty(device="cpu")
    torch.manual_seed(0)
    for p in model.parameters():
        nn.init.normal_(p, std=0.3)
    assert _step_and_check(clipper, model, batch(0), 0.1) > 0


def test_an_adapter_added_after_the_clipper_was_made_is_clipped():
    model = _net()
    clipper = distclip.GradClipper(model, max_norm=0.1)
    _step_and_check(clipper, model, batch(0), 0.1)
    model.adapters.append(nn.Linear(16, 16))
    _step_and_check(clipper, model, batch(1), 0.1)
    assert model.adapters[0].weight.grad is not None and any(p is model.adapters[0].weight for p in clipper.params)


def test_a_replaced_parameter_is_clipped_instead_of_the_old_one():
    model = _net()
    clipper = distclip.GradClipper(model, max_norm=0.1)
    _step_and_check(clipper, model, batch(0), 0.1)
    old = model.body.weight
    model.body.weight = nn.Parameter(torch.randn(16, 16) * 10)  # resize_token_embeddings-style
    _step_and_check(clipper, model, batch(1), 0.1)
    assert old.grad is not None  # left over from step 0, and not counted


def test_a_removed_adapter_is_no_longer_clipped():
    model = _net()
    model.adapters.append(nn.Linear(16, 16))
    model.adapters.append(nn.Linear(16, 16))
    clipper = distclip.GradClipper(model, max_norm=0.1)
    _step_and_check(clipper, model, batch(0), 0.1)
    removed = model.adapters[0]
    del model.adapters[0]  # ModuleList builds a new _modules dict: no registration hook runs
    _step_and_check(clipper, model, batch(1), 0.1)
    assert removed.weight.grad is not None  # stale, and not counted


def test_layers_unfrozen_later_are_clipped_from_the_step_they_get_gradients():
    model = build()
    for p in model.layers.parameters():
        p.requires_grad_(False)
    clipper = distclip.GradClipper(model, max_norm=0.1)
    _step_and_check(clipper, model, batch(0), 0.1)
    for p in model.layers.parameters():
        p.requires_grad_(True)
    _step_and_check(clipper, model, batch(1), 0.1)


def test_a_dtype_change_after_the_clipper_was_made_is_planned_afresh():
    model = build()
    clipper = distclip.GradClipper(model, max_norm=0.1)
    _step_and_check(clipper, model, batch(0), 0.1)
    model.double()
    _step_and_check(clipper, model, batch(1).double(), 0.1)
    assert clipper.last.total_norm.dtype == torch.float64


def test_each_layout_a_loop_alternates_between_is_planned_once():
    model = _net()
    model.adapters.append(nn.Linear(16, 16))
    clipper = distclip.GradClipper(model, max_norm=0.1)
    plans = []
    for step in range(4):
        model.adapters[0].requires_grad_(step % 2 == 0)  # the adapter trains every other step
        _step_and_check(clipper, model, batch(step), 0.1)
        plans.append(clipper._plan)
    assert plans[0] is plans[2] and plans[1] is plans[3] and plans[0] is not plans[1]


def _train_twins(ours, theirs, clipper, optimizers, steps, change=None, max_norm=0.05):
    """``steps`` steps of ours (clipped by the attached clipper) and theirs (torch's clip, then
    the step); ``change(step, model, optimizer)`` runs on both before a step."""
    opt_ours, opt_theirs = optimizers
    for step in range(steps):
        if change is not None:
            change(step, ours, opt_ours)
            change(step, theirs, opt_theirs)
        x = batch(step)
        for model in (ours, theirs):
            model.zero_grad(set_to_none=True)
            backward(model, x)
        opt_ours.step()
        expected = torch.nn.utils.clip_grad_norm_(theirs.parameters(), max_norm)
        opt_theirs.step()
        assert clipper.last.total_norm.item() == pytest.approx(expected.item(), rel=1e-5)
    for a, b in zip(ours.parameters(), theirs.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def _add_adapter(step, model, optimizer):
    if step == 1:
        torch.manual_seed(7)
        model.adapters.append(nn.Linear(16, 16))
        optimizer.add_param_group({"params": model.adapters[0].parameters()})


def test_a_param_group_added_to_an_attached_fused_optimizer_is_clipped_with_the_rest():
    ours = _net()
    theirs = copy.deepcopy(ours)
    optimizers = [torch.optim.AdamW(m.parameters(), lr=0.01, fused=True) for m in (ours, theirs)]
    clipper = distclip.GradClipper(ours, max_norm=0.05)
    clipper.attach(optimizers[0])
    _train_twins(ours, theirs, clipper, optimizers, steps=3, change=_add_adapter)


def test_parameters_stepped_but_not_clipped_take_the_normal_pass_and_warn():
    ours = _net()
    theirs = copy.deepcopy(ours)
    optimizers = [torch.optim.AdamW(m.parameters(), lr=0.01, fused=True) for m in (ours, theirs)]
    # Given the list of the first parameters: the adapter's are stepped, never clipped.
    clipper = distclip.GradClipper(list(ours.parameters()), max_norm=0.05)
    clipper.attach(optimizers[0])
    _train_twins(ours, theirs, clipper, optimizers, steps=1)
    _add_adapter(1, ours, optimizers[0])
    _add_adapter(1, theirs, optimizers[1])
    x = batch(1)
    for model in (ours, theirs):
        model.zero_grad(set_to_none=True)
        backward(model, x)
    with pytest.warns(UserWarning, match="steps 2 parameter.*the clipper does not clip"):
        optimizers[0].step()
    clipped = [p for name, p in theirs.named_parameters() if not name.startswith("adapters")]
    expected = torch.nn.utils.clip_grad_norm_(clipped, 0.05)
    optimizers[1].step()
    assert clipper.last.total_norm.item() == pytest.approx(expected.item(), rel=1e-5)
    for a, b in zip(ours.parameters(), theirs.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_an_optimizer_stepping_other_parameters_than_the_clipped_ones_is_not_fused():
    ours = _net()
    ours.adapters.append(nn.Linear(16, 16))
    theirs = copy.deepcopy(ours)
    # As many parameters each, but the optimizer steps the adapter's bias, the clipper clips
    # its weight instead: the bias must not get a coefficient it did not contribute to.
    clipped, stepped = ([p for name, p in model.named_parameters() if name != skip] for model, skip in
                        ((ours, "adapters.0.bias"), (ours, "adapters.0.weight")))
    optimizer = torch.optim.AdamW(stepped, lr=0.01, fused=True)
    clipper = distclip.GradClipper(clipped, max_norm=0.05)
    clipper.attach(optimizer)
    their_clipped, their_stepped = ([p for name, p in theirs.named_parameters() if name != skip]
                                    for skip in ("adapters.0.bias", "adapters.0.weight"))
    their_optimizer = torch.optim.AdamW(their_stepped, lr=0.01, fused=True)
    for step in range(2):
        for model in (ours, theirs):
            model.zero_grad(set_to_none=True)
            backward(model, batch(step))
        with pytest.warns(UserWarning, match="steps 1 parameter") if step == 0 else contextlib.nullcontext():
            optimizer.step()
        torch.nn.utils.clip_grad_norm_(their_clipped, 0.05)
        their_optimizer.step()
    for a, b in zip(ours.parameters(), theirs.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def _scaler_twins(fused: bool, init_scale: float, nonfinite: str = "propagate", unscale_first: bool = False):
    """Ours: an attached clipper under the GradScaler recipe (with ``scaler.unscale_`` before
    ``scaler.step`` when ``unscale_first``); theirs: unscale_, torch's clip, step."""
    ours = build()
    theirs = copy.deepcopy(ours)
    optimizers = [torch.optim.AdamW(m.parameters(), lr=0.01, fused=fused) for m in (ours, theirs)]
    scalers = [torch.amp.GradScaler("cpu", init_scale=init_scale, growth_interval=2) for _ in range(2)]
    clipper = distclip.GradClipper(ours, max_norm=0.05, nonfinite=nonfinite)
    clipper.attach(optimizers[0])
    scales = ([], [])
    for step in range(4):
        x = batch(step)
        for model, scaler in zip((ours, theirs), scalers):
            model.zero_grad(set_to_none=True)
            loss = model(x).square().mean() * (math.inf if step == 2 else 1.0)  # step 2 overflows
            scaler.scale(loss).backward()
        if unscale_first:
            scalers[0].unscale_(optimizers[0])
        scalers[0].step(optimizers[0])
        scalers[1].unscale_(optimizers[1])
        torch.nn.utils.clip_grad_norm_(theirs.parameters(), 0.05)
        scalers[1].step(optimizers[1])
        for scaler, history in zip(scalers, scales):
            scaler.update()
            history.append(scaler.get_scale())
    assert scales[0] == scales[1]
    for a, b in zip(ours.parameters(), theirs.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    return clipper


@pytest.mark.parametrize("fused", [False, True], ids=["foreach", "fused"])
def test_grad_scaler_unscale_then_step_with_an_attached_clipper(fused):
    _scaler_twins(fused, init_scale=2.0**10, unscale_first=True)


@pytest.mark.parametrize("unscale_first", [False, True], ids=["step", "unscale_-then-step"])
@pytest.mark.parametrize("fused", [False, True], ids=["foreach", "fused"])
def test_an_overflow_step_is_the_scalers_business_under_nonfinite_error(fused, unscale_first):
    _scaler_twins(fused, init_scale=2.0**10, nonfinite="error", unscale_first=unscale_first)


@pytest.mark.parametrize("exponent", [120, 126, 127])
def test_the_fused_path_at_a_huge_loss_scale_steps_as_torch(exponent):
    # Neither the norm of the scaled gradients nor scale / coef may overflow float32 (steps the
    # scaler finds inf in are its business); clipped steps at such a scale must have happened.
    clipper = _scaler_twins(True, init_scale=2.0**exponent, nonfinite="error")
    finite = [norm.item() for norm in clipper.history if math.isfinite(norm.item())]
    assert finite and max(finite) > 0.05, list(clipper.history)


# -- FSDP1 ------------------------------------------------------------------------------


class TwoHeads(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(12, 12)
        self.heads = nn.ModuleList([nn.Linear(12, 3), nn.Linear(12, 7)])

    def forward(self, x: torch.Tensor, head: int) -> torch.Tensor:
        return self.heads[head](torch.tanh(self.body(x)))


def _fsdp1_two_heads():
    """The heads are units of different sizes used on alternate steps: as many gradients every
    step, held by another unit each time.  FSDP's own clip is the reference."""
    models = []
    for _ in range(2):
        torch.manual_seed(0)
        model = TwoHeads()
        for i in range(2):
            model.heads[i] = FSDP(model.heads[i], device_id=torch.device("cpu"))
        models.append(FSDP(model, device_id=torch.device("cpu")))
    ours, theirs = models
    clipper = distclip.GradClipper(ours, max_norm=1e9)
    norms = []
    for step in range(4):
        x = batch(dist.get_rank() + step, width=12)
        for model in models:
            model.zero_grad(set_to_none=True)
            model(x, head=step % 2).square().mean().backward()
        got = clipper.clip_().total_norm.item()
        expected = theirs.clip_grad_norm_(1e9).item()
        assert got == pytest.approx(expected, rel=1e-5), (step, got, expected)
        norms.append(got)
    return norms


def test_fsdp1_units_holding_the_gradients_in_turn_are_each_planned(ranks):
    norms = ranks(2).run(_fsdp1_two_heads)
    assert norms[0] == norms[1]


def _overflow_in_one_ranks_shard() -> str:
    """FSDP1 + ShardedGradScaler + a fused AdamW, ``scaler.step`` without ``unscale_``: the
    scaler's ``found_inf`` is per rank there.  An overflow in rank 0's shard only: rank 0's
    optimizer skips the step, rank 1's does not, so the non-finite norm is an error on every
    rank (a rank that tolerated it alone left the other waiting in the error's report)."""
    from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

    torch.manual_seed(0)
    model = FSDP(nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 1)), device_id=torch.device("cpu"))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    clipper = distclip.GradClipper(model, max_norm=1.0, nonfinite="error")
    clipper.attach(optimizer)
    scaler = ShardedGradScaler("cpu", init_scale=2.0**10)
    scaler.scale(model(torch.randn(4, 8)).sum()).backward()
    if dist.get_rank() == 0:
        next(model.parameters()).grad[0] = float("inf")
    try:
        scaler.step(optimizer)
    except RuntimeError as error:
        return str(error)
    return "stepped"


def test_a_non_finite_norm_is_tolerated_only_where_every_ranks_optimizer_skips_the_step(ranks):
    outcomes = ranks(2).run(_overflow_in_one_ranks_shard)
    assert all("the global gradient norm is non-finite" in outcome for outcome in outcomes), outcomes
