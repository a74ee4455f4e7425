"""Gradients of any strided layout and complex gradients: exact norms, exact scaling.

A gradient may be any view of a larger buffer (every other element, transposed, permuted, a
column slice at an offset) or a DTensor whose local tensor is one: its norm is the float64 norm
of its logical elements, and clipping writes exactly those elements, never another element of
the buffer (the buffers hold 1e3 elsewhere, so counting one would show, and are compared
bitwise).  Complex gradients are normed by ``|x|`` per element, as torch norms them, and scaled
by the real coefficient.
"""

import math

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Replicate, Shard

import distclip
from distclip.pieces import ROW, ROWS_FROM
from distclip.plan import NormPlan
from distclip.topology import resolve_topology
from models import NORM_TYPES
from reference import (
    assert_close_norm,
    assert_same_on_all_ranks_in_every_case,
    by_case,
    clip_and_check,
    every_case,
    gather_objects,
)

# More than ROWS_FROM elements (reduced as rows on the CPU) and not a multiple of a row.
LONG = ROWS_FROM + 3 * ROW + 5
OUTSIDE = 1e3  # what the buffers hold outside the gradient views

# Views of a buffer, by name: a 1-D buffer of the given size -> the gradient.  Every other
# element and every other column flatten to a stride-2 view (reshape(-1) keeps them views);
# the others flatten to a copy.
LAYOUTS = {
    "every other element, long": (2 * LONG + 1, lambda b: b[1::2]),
    "every other element, short": (2001, lambda b: b[1::2]),
    "transposed": (120_005, lambda b: b[5:].view(300, 400).t()),
    "permuted 3-D, padded": (122_007, lambda b: b[7:].view(40, 50, 61)[:, :, :60].permute(2, 0, 1)),
    "column slice at an offset": (200_000, lambda b: b.view(400, 500)[:, 3:303]),
    "every other column at an offset": (240_000, lambda b: b.view(400, 600)[:, 1::2]),
}


def _view_in_buffer(layout, seed=0):
    """(buffer, gradient view, mask of the buffer elements the view covers)."""
    size, make = LAYOUTS[layout]
    buffer = torch.full((size,), OUTSIDE)
    grad = make(buffer)
    grad.copy_(torch.randn(grad.shape, generator=torch.Generator().manual_seed(seed)) + 0.5)
    covered = torch.zeros(size, dtype=torch.bool)
    make(covered).fill_(True)
    return buffer, grad, covered


def _param_with_grad(grad):
    param = nn.Parameter(torch.zeros(grad.shape, dtype=grad.dtype))
    param.grad = grad
    return param


def _reference(grads, norm_type):
    """The float64 (complex128 for complex gradients) norm of all elements end to end."""
    wide = torch.complex128 if any(g.is_complex() for g in grads) else torch.float64
    return torch.linalg.vector_norm(torch.cat([g.to(wide).flatten() for g in grads]), norm_type).item()


def _assert_untouched_outside(buffer_before, buffer, covered):
    assert torch.equal(buffer[~covered], buffer_before[~covered]), "clipping wrote outside the gradient view"


def _clip(params, max_norm, norm_type, api):
    if api == "clip_grad_norm_":
        return distclip.clip_grad_norm_(params, max_norm, norm_type)
    return distclip.GradClipper(params, max_norm=max_norm, norm_type=norm_type).clip_().total_norm


def _assert_clipped(params, before, total, max_norm):
    coefficient = min(max_norm / (total.double().item() + 1e-6), 1.0)
    assert coefficient < 1
    for param, grad in zip(params, before):
        torch.testing.assert_close(param.grad, grad * coefficient, rtol=1e-6, atol=0)


# -- strided gradients, one process ---------------------------------------------------------


@pytest.mark.parametrize("api", ["clip_grad_norm_", "GradClipper"])
@pytest.mark.parametrize("norm_type", NORM_TYPES)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_a_strided_gradient_gives_the_float64_norm_and_scales_only_its_own_elements(layout, norm_type, api):
    buffer, grad, covered = _view_in_buffer(layout)
    param = _param_with_grad(grad)
    before, buffer_before = grad.clone(), buffer.clone()
    expected = _reference([before], norm_type)
    total = _clip([param], 0.5 * expected, norm_type, api)
    assert_close_norm(total.item(), expected, norm_type, rtol=1e-6)
    _assert_clipped([param], [before], total, 0.5 * expected)
    _assert_untouched_outside(buffer_before, buffer, covered)


@pytest.mark.parametrize("norm_type", NORM_TYPES)
def test_an_expanded_gradient_is_counted_per_logical_element_as_torch_counts_it(norm_type):
    # Zero strides: one stored element stands for many logical ones.  torch accepts such a
    # .grad and its get_total_norm counts every logical element.
    values = torch.randn(1000, generator=torch.Generator().manual_seed(3)) + 0.5
    grads = [torch.tensor([4.0]).expand(LONG), values.expand(70, 1000), values[:10].expand(3, 10)]
    total = distclip.get_total_norm(grads, norm_type)
    # 1e-5: the same values repeated round alike in every float32 row, so their errors add up
    # instead of averaging out (4.0, whose powers and their sums are exact, gives none).
    assert_close_norm(total.item(), _reference(grads, norm_type), norm_type, rtol=1e-5)


def test_clipping_an_expanded_gradient_raises_torchs_own_error():
    # Scaling one stored element in place for many logical ones is what torch's in-place
    # multiply refuses; distclip scales gradients with it, as torch's clip does.
    param = _param_with_grad(torch.tensor([3.0]).expand(10))
    with pytest.raises(RuntimeError, match="single memory location"):
        torch.nn.utils.clip_grad_norm_([param], 1.0)
    with pytest.raises(RuntimeError, match="single memory location"):
        distclip.clip_grad_norm_([param], 1.0)


def _buffer_of(sizes, seed):
    """One buffer holding 1e3: its dense gradients of ``sizes`` end to end from element 0, and
    room after them for a stride-2 view of ``LONG`` elements; the buffer and the dense ones."""
    generator = torch.Generator().manual_seed(seed)
    buffer = torch.full((sum(sizes) + 2 * LONG,), OUTSIDE)
    dense = list(torch.split(buffer[: sum(sizes)], sizes))
    for grad in dense:
        grad.copy_(torch.randn(grad.shape, generator=generator) + 0.5)
    return buffer, dense


def _strided_from(buffer, first, seed):
    """The stride-2 view of ``LONG`` elements of ``buffer`` from element ``first``, filled."""
    view = buffer[first : first + 2 * LONG : 2]
    view.copy_(torch.randn(LONG, generator=torch.Generator().manual_seed(seed)) + 0.5)
    return view


def _covered(buffer, grads):
    """Which elements of ``buffer`` the views ``grads`` cover."""
    covered = torch.zeros(buffer.shape, dtype=torch.bool)
    for grad in grads:
        covered.as_strided(grad.shape, grad.stride(), grad.storage_offset()).fill_(True)
    return covered


@pytest.mark.parametrize("norm_type", NORM_TYPES)
def test_strided_and_dense_gradients_in_one_call_keep_runs_and_packs_for_the_dense_ones(norm_type):
    # Three dense gradients end to end (a run), the strided one starting right after them in
    # the same buffer (adjacent, yet never part of the run), three small separate ones (packed).
    buffer, dense = _buffer_of([100, 100, 100], seed=4)
    strided = _strided_from(buffer, 300, seed=5)
    generator = torch.Generator().manual_seed(6)
    small = [torch.randn(50, generator=generator) for _ in range(3)]
    params = [_param_with_grad(g) for g in dense + [strided] + small]
    grads = [p.grad for p in params]
    plan = NormPlan(grads, resolve_topology())
    [bucket] = plan.buckets
    assert bucket.runs is not None and bucket.runs.runs == ((0, 0, 300),)
    assert bucket.runs.views(grads) is not None and bucket.run_pieces.packs
    assert plan.scale_runs[0] is not None and plan.scale_runs[0].views(grads) is not None
    before, buffer_before = [g.clone() for g in grads], buffer.clone()
    expected = _reference(before, norm_type)
    total = distclip.clip_grad_norm_(params, 0.5 * expected, norm_type)
    assert_close_norm(total.item(), expected, norm_type, rtol=1e-6)
    _assert_clipped(params, before, total, 0.5 * expected)
    _assert_untouched_outside(buffer_before, buffer, _covered(buffer, dense + [strided]))


@pytest.mark.parametrize("norm_type", NORM_TYPES)
def test_a_clipper_stays_exact_when_a_gradient_turns_strided_and_back(norm_type):
    # The clipper's plan is made on dense gradients lying end to end (one run), and kept.  Then
    # the long one is a stride-2 view starting where it lay: at the address the run expects it.
    buffer, (first, last, long) = _buffer_of([30, 20, LONG], seed=7)
    params = [_param_with_grad(g) for g in (first, long, last)]
    clipper = distclip.GradClipper(params, max_norm=1.0, norm_type=norm_type)
    for step in range(3):
        params[1].grad = _strided_from(buffer, 50, seed=8) if step == 1 else long
        grads = [p.grad for p in params]
        before, buffer_before = [g.clone() for g in grads], buffer.clone()
        expected = _reference(before, norm_type)
        clipper.max_norm = 0.5 * expected
        total = clipper.clip_().total_norm
        assert_close_norm(total.item(), expected, norm_type, rtol=1e-6)
        _assert_clipped(params, before, total, 0.5 * expected)
        _assert_untouched_outside(buffer_before, buffer, _covered(buffer, grads))
    assert len(clipper._plan.buckets[0].runs.runs) == 1


@pytest.mark.filterwarnings("ignore:grad and param do not obey the gradient layout contract")
def test_partials_taken_during_backward_of_a_strided_gradient_are_exact():
    buffer, grad, covered = _view_in_buffer("every other element, long")
    param = _param_with_grad(grad.zero_())  # autograd accumulates into the strided view in place
    clipper = distclip.GradClipper([param], max_norm=1e9, overlap=True)
    for step in range(2):  # the first step plans, the second uses the partials of backward
        param.grad.zero_()
        x = torch.randn(LONG, generator=torch.Generator().manual_seed(step)) + 0.5
        (param * x).sum().backward()
        assert param.grad.data_ptr() == grad.data_ptr()
        expected = _reference([param.grad], 2.0)
        buffer_before = buffer.clone()
        assert clipper.clip_().total_norm.item() == pytest.approx(expected, rel=1e-6)
        _assert_untouched_outside(buffer_before, buffer, covered)
    assert clipper.backward_partials.steps_used == 1


# -- strided gradients, two ranks ------------------------------------------------------------


def _strided_copies(norm_type):
    # The same views on both ranks: copies (the default replica_group), whose elements the
    # ranks split, so every layout is also read as ranges of its flat elements.
    held = [_view_in_buffer(layout, seed=n) for n, layout in enumerate(LAYOUTS)]
    named = [(layout, _param_with_grad(grad)) for layout, (_, grad, _) in zip(LAYOUTS, held)]
    buffers_before = [buffer.clone() for buffer, _, _ in held]
    # The default rtol 1e-5: a rank's half of a 120,000-element gradient is one range, below
    # ROWS_FROM, summed whole in float32 (~2e-6); one 1e3 element counted would be far above.
    result = clip_and_check(named, norm_type, clipped_rtol=1e-6)
    for (buffer, _, covered), buffer_before in zip(held, buffers_before):
        _assert_untouched_outside(buffer_before, buffer, covered)
    return result


def test_strided_gradients_held_as_copies_on_two_ranks_give_the_float64_norm(ranks):
    assert_same_on_all_ranks_in_every_case(ranks(2).run(every_case, _strided_copies, NORM_TYPES))


def _dtensors_from_strided_locals(norm_type):
    mesh = init_device_mesh("cpu", (2,))
    rank = dist.get_rank()
    # Replicate: the same 1-D stride-2 view on both ranks (copies: each rank counts a range).
    # Shard(0): each rank's own 70,000-element stride-2 view (rows).
    held = [(10_000, Replicate(), 0), (70_000, Shard(0), 1 + rank)]
    named, checks = [], []
    for n, (numel, placement, seed) in enumerate(held):
        buffer = torch.full((2 * numel + 1,), OUTSIDE)
        local = buffer[1::2]
        local.copy_(torch.randn(numel, generator=torch.Generator().manual_seed(seed)) + 0.5)
        param = nn.Parameter(DTensor.from_local(torch.zeros(numel), mesh, [placement], run_check=False))
        param.grad = DTensor.from_local(local, mesh, [placement], run_check=False)
        assert param.grad._local_tensor.stride() == (2,) and param.grad._local_tensor.data_ptr() == local.data_ptr()
        named.append((f"p{n}", param))
        checks.append((buffer, buffer.clone(), _covered(buffer, [local])))
    result = clip_and_check(named, norm_type, clipped_rtol=1e-6)
    for buffer, buffer_before, covered in checks:
        _assert_untouched_outside(buffer_before, buffer, covered)
    return result


def test_dtensors_from_local_on_strided_views_give_the_float64_norm(ranks):
    assert_same_on_all_ranks_in_every_case(ranks(2).run(every_case, _dtensors_from_strided_locals, NORM_TYPES))


# -- complex gradients -----------------------------------------------------------------------

COMPLEX_NORM_TYPES = NORM_TYPES + [-1.0]


def _complex_grads(seed=0):
    """Complex64 (long: rows; short; a strided view in a buffer), complex128 and float32
    gradients, and the strided one's buffer and mask."""
    generator = torch.Generator().manual_seed(seed)
    buffer = torch.full((2 * LONG + 1,), OUTSIDE, dtype=torch.complex64)
    strided = buffer[1::2]
    strided.copy_(torch.randn(LONG, generator=generator, dtype=torch.complex64) + 0.5)
    grads = [
        torch.randn(LONG, generator=generator, dtype=torch.complex64) + 0.5,
        torch.randn(7, 9, generator=generator, dtype=torch.complex64),
        strided,
        torch.randn(33, generator=generator, dtype=torch.complex128),
        torch.randn(12, generator=generator) + 0.5,
    ]
    return grads, buffer, _covered(buffer, [strided])


def _assert_close_complex_norm(actual, expected, norm_type):
    # complex64's |x| is rounded in float32, so even a max differs from the complex128 one by
    # a rounding; counts (p = 0) are exact.
    if norm_type == 0:
        assert actual == expected
    else:
        assert actual == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("foreach", [None, False])
@pytest.mark.parametrize("norm_type", COMPLEX_NORM_TYPES)
def test_complex_gradients_are_normed_by_their_absolute_value_as_torch(norm_type, foreach):
    grads, _, _ = _complex_grads()
    total = distclip.get_total_norm(grads, norm_type, foreach=foreach)
    _assert_close_complex_norm(total.item(), _reference(grads, norm_type), norm_type)


@pytest.mark.parametrize(
    "dtypes",
    [(torch.complex64,), (torch.complex128,), (torch.complex64, torch.float32), (torch.complex64, torch.float64),
     (torch.complex128, torch.float32)],
)
def test_a_complex_norm_has_the_dtype_torch_gives_it(dtypes):
    grads = [torch.randn(5, dtype=dtype) for dtype in dtypes]
    assert distclip.get_total_norm(grads).dtype == torch.nn.utils.get_total_norm(grads).dtype


@pytest.mark.parametrize("api", ["clip_grad_norm_", "GradClipper"])
def test_complex_gradients_are_scaled_by_the_real_coefficient(api):
    grads, buffer, covered = _complex_grads()
    params = [_param_with_grad(g) for g in grads]
    theirs = [_param_with_grad(g.clone()) for g in grads]
    before, buffer_before = [g.clone() for g in grads], buffer.clone()
    expected = _reference(before, 2.0)
    total = _clip(params, 0.5 * expected, 2.0, api)
    assert total.dtype == torch.float64 and total.item() == pytest.approx(expected, rel=1e-6)
    torch.nn.utils.clip_grad_norm_(theirs, 0.5 * expected)
    coefficient = min(0.5 * expected / (total.item() + 1e-6), 1.0)
    for param, theirs_param, grad in zip(params, theirs, before):
        assert param.grad.dtype == grad.dtype
        torch.testing.assert_close(param.grad, grad * coefficient, rtol=1e-6, atol=0)
        # torch's own float32 norm of 77,000 elements is a few 1e-6 off, and its coefficient too.
        torch.testing.assert_close(param.grad, theirs_param.grad, rtol=1e-5, atol=0)
    _assert_untouched_outside(buffer_before, buffer, covered)


def _complex_without_copies(norm_type):
    rank = dist.get_rank()
    # Each rank's plain gradients are its own (a one-rank replica group each), and a complex
    # DTensor is sharded over both: no copies anywhere, so the copy check has nothing to read.
    alone = [dist.new_group([r]) for r in range(dist.get_world_size())][rank]
    grads, buffer, covered = _complex_grads(seed=rank)
    mesh = init_device_mesh("cpu", (2,))
    shard = torch.randn(1000, generator=torch.Generator().manual_seed(10 + rank), dtype=torch.complex64)
    params = [_param_with_grad(g) for g in grads]
    sharded = nn.Parameter(DTensor.from_local(torch.zeros(1000, dtype=torch.complex64), mesh, [Shard(0)]))
    sharded.grad = DTensor.from_local(shard, mesh, [Shard(0)])
    params.append(sharded)
    before = [g.clone() for g in grads] + [shard.clone()]
    everything = [t for per_rank in gather_objects(before) for t in per_rank]
    expected = _reference(everything, norm_type)
    max_norm = 0.5 * expected if math.isfinite(expected) and expected > 0 else 1.0
    buffer_before = buffer.clone()
    total = distclip.clip_grad_norm_(params, max_norm, norm_type, replica_group=alone)
    _assert_close_complex_norm(total.item(), expected, norm_type)
    coefficient = min(max_norm / (total.double().item() + 1e-6), 1.0)
    for grad, original in zip(grads + [shard], before):
        torch.testing.assert_close(grad, original * coefficient, rtol=1e-6, atol=0)
    _assert_untouched_outside(buffer_before, buffer, covered)
    return {"norm": total.item().hex(), "dtype": str(total.dtype)}


def test_complex_gradients_on_two_ranks_without_copies_give_the_complex128_norm(ranks):
    per_rank = ranks(2).run(every_case, _complex_without_copies, COMPLEX_NORM_TYPES)
    for norm_type, results in by_case(per_rank).items():
        assert {r["norm"] for r in results} == {results[0]["norm"]}, norm_type
        assert results[0]["dtype"] == "torch.float64", norm_type
