"""Without torch.distributed: a drop-in for torch.nn.utils' clipping, checked against torch and
a float64 reference."""

import math
import warnings

import pytest
import torch
from torch import nn

import distclip

TORCH_PARITY_NORMS = [2.0, 1.0, 3.0, 0.5, math.inf, -math.inf, -1.0, -2.0, -0.5]


def _params(seed=0, dtype=torch.float32, shapes=((10, 10), (7,), (3, 4, 5), (1,))):
    generator = torch.Generator().manual_seed(seed)
    params = []
    for shape in shapes:
        p = nn.Parameter(torch.randn(shape, generator=generator).to(dtype))
        p.grad = (torch.randn(shape, generator=generator) * 3).to(dtype)
        params.append(p)
    return params


def _reference(grads, norm_type):
    flat = torch.cat([g.detach().double().flatten() for g in grads])
    return torch.linalg.vector_norm(flat, norm_type).item()


@pytest.mark.parametrize("foreach", [None, True, False])
@pytest.mark.parametrize("norm_type", TORCH_PARITY_NORMS)
def test_matches_torch_clip_grad_norm(norm_type, foreach):
    ours, theirs = _params(), _params()
    reference = _reference([p.grad for p in ours], norm_type)
    total = distclip.clip_grad_norm_(ours, 1.0, norm_type, foreach=foreach)
    expected = torch.nn.utils.clip_grad_norm_(theirs, 1.0, norm_type, foreach=foreach)
    torch.testing.assert_close(total, expected, rtol=1e-6, atol=0)
    assert total.item() == pytest.approx(reference, rel=1e-6)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("norm_type", [-1.0, -2.0, -0.5])
def test_negative_norm_type_is_zero_when_any_element_is_zero_as_in_torch(norm_type):
    ours, theirs = _params(), _params()
    for p in ours + theirs:
        if p.numel() == 7:
            p.grad[3] = 0
    total = distclip.clip_grad_norm_(ours, 1.0, norm_type)
    expected = torch.nn.utils.clip_grad_norm_(theirs, 1.0, norm_type)
    assert total.item() == expected.item() == 0.0
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a.grad, b.grad, rtol=0, atol=0)


def test_negative_norm_type_is_exact_on_bf16_and_large_tensors():
    # Accumulated in float64: torch's float32 sum is ~1e-3 off on both.
    for dtype, shapes in ((torch.bfloat16, ((64, 64), (5,))), (torch.float32, ((1 << 19) + 3,))):
        ours, theirs = _params(1, dtype, shapes), _params(1, dtype, shapes)
        reference = _reference([p.grad for p in ours], -1.5)
        total = distclip.clip_grad_norm_(ours, 1.0, -1.5)
        expected = torch.nn.utils.clip_grad_norm_(theirs, 1.0, -1.5)
        assert total.item() == pytest.approx(reference, rel=1e-6)
        torch.testing.assert_close(total.double(), expected.double(), rtol=2e-3, atol=0)


def test_zero_norm_counts_nonzero_elements():
    # torch's get_total_norm(p=0) counts nonzero *tensors* (the 0-norm of per-tensor norms);
    # the 0-"norm" of the gradient viewed as one vector counts its nonzero elements.
    params = _params()
    params[0].grad[0, :5] = 0
    total = distclip.get_total_norm([p.grad for p in params], 0)
    assert total.item() == sum(int((p.grad != 0).sum()) for p in params)


def test_accepts_a_module_a_tensor_and_a_generator():
    model = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))
    model(torch.randn(5, 4)).pow(2).sum().backward()
    reference = _reference([p.grad for p in model.parameters()], 2.0)
    assert distclip.get_total_norm(model).item() == pytest.approx(reference, rel=1e-6)

    total = distclip.clip_grad_norm_((p for p in model.parameters()), 0.01)
    assert total.item() == pytest.approx(reference, rel=1e-6)
    # The generator was consumed once, yet every gradient was clipped.
    assert distclip.get_total_norm(model).item() == pytest.approx(0.01, rel=1e-4)

    weight = model[0].weight
    assert distclip.clip_grad_norm_(weight, 1e9).item() == pytest.approx(
        _reference([weight.grad], 2.0), rel=1e-6
    )


def test_parameters_without_grad_are_skipped():
    params = _params()
    params[1].grad = None
    reference = _reference([p.grad for p in params if p.grad is not None], 2.0)
    assert distclip.clip_grad_norm_(params, 1.0).item() == pytest.approx(reference, rel=1e-6)
    assert params[1].grad is None


@pytest.mark.parametrize("norm_type", [2.0, 0.0, math.inf, -math.inf])
def test_no_gradients_gives_zero(norm_type):
    params = _params()
    for p in params:
        p.grad = None
    total = distclip.clip_grad_norm_(params, 1.0, norm_type)
    assert total.item() == 0.0 and total.dtype == torch.float32


def test_empty_generator_warns_like_torch():
    with pytest.warns(UserWarning, match="empty generator"):
        distclip.clip_grad_norm_((p for p in []), 1.0)


def test_returns_a_float32_norm_for_half_precision_and_float64_for_double():
    assert distclip.get_total_norm([p.grad for p in _params(dtype=torch.bfloat16)]).dtype == torch.float32
    assert distclip.get_total_norm([p.grad for p in _params(dtype=torch.float16)]).dtype == torch.float32
    mixed = [p.grad for p in _params()] + [p.grad for p in _params(dtype=torch.float64)]
    assert distclip.get_total_norm(mixed).dtype == torch.float64


def test_clip_grads_with_norm_equals_clip_grad_norm():
    ours, theirs = _params(), _params()
    total = distclip.get_total_norm([p.grad for p in ours])
    distclip.clip_grads_with_norm_(ours, 1.0, total)
    distclip.clip_grad_norm_(theirs, 1.0)
    for a, b in zip(ours, theirs):
        assert torch.equal(a.grad, b.grad)


def test_norm_below_max_norm_leaves_gradients_unchanged_up_to_rounding():
    params = _params()
    before = [p.grad.clone() for p in params]
    distclip.clip_grad_norm_(params, 1e9)
    for p, b in zip(params, before):
        assert torch.equal(p.grad, b)


def test_foreach_true_on_a_device_without_foreach_raises_like_torch():
    grads = [torch.empty(3, device="meta")]
    with pytest.raises(RuntimeError, match="foreach=True"):
        distclip.get_total_norm(grads, foreach=True)


def test_group_without_initialized_process_group_is_an_error():
    with pytest.raises(ValueError, match="not initialized"):
        distclip.get_total_norm([p.grad for p in _params()], group=object())
