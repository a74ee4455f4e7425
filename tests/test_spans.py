"""Contiguous spans: gradients lying end to end in one buffer are normed and scaled as one run,
verified on every call, and never stand for anything but exactly their pieces' elements."""

import math

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

import distclip
from distclip.pieces import ROW
from distclip.plan import NormPlan
from distclip.plancache import clear_plans
from distclip.topology import resolve_topology
from models import NORM_TYPES, backward, batch, build
from reference import assert_same_on_all_ranks, clip_and_check

SHAPES = ((10, 10), (7,), (3, 4, 5), (1,), (50, 40))


def _flat_params(seed=0, shapes=SHAPES, dtype=torch.float32):
    """Parameters whose gradients are consecutive views into one buffer (as DDP's bucket views
    and FSDP1's flat gradients are), and the buffer."""
    generator = torch.Generator().manual_seed(seed)
    buffer = (torch.randn(sum(math.prod(s) for s in shapes), generator=generator) * 3).to(dtype)
    params, offset = [], 0
    for shape in shapes:
        p = nn.Parameter(torch.zeros(shape, dtype=dtype))
        p.grad = buffer[offset : offset + math.prod(shape)].view(shape)
        offset += math.prod(shape)
        params.append(p)
    return params, buffer


def _reference(grads, norm_type):
    return torch.linalg.vector_norm(torch.cat([g.double().flatten() for g in grads]), norm_type).item()


def test_gradients_in_one_buffer_are_one_run():
    params, _ = _flat_params()
    plan = NormPlan([p.grad for p in params], resolve_topology())
    [bucket] = plan.buckets
    assert bucket.runs is not None and len(bucket.runs.runs) == 1
    assert plan.scale_runs[0] is not None and len(plan.scale_runs[0].runs) == 1


@pytest.mark.parametrize("norm_type", NORM_TYPES)
def test_a_run_gives_the_exact_norm_and_scales_every_element(norm_type):
    params, buffer = _flat_params()
    before = [p.grad.clone() for p in params]
    expected = _reference(before, norm_type)
    max_norm = 0.5 * expected if expected > 0 else 1.0
    total = distclip.clip_grad_norm_(params, max_norm, norm_type)
    assert total.item() == pytest.approx(expected, rel=1e-6)
    coefficient = min(max_norm / (total.double().item() + 1e-6), 1.0)
    for p, grad in zip(params, before):
        torch.testing.assert_close(p.grad, grad * coefficient, rtol=1e-6, atol=0)
    assert params[0].grad.data_ptr() == buffer.data_ptr()  # scaled in place, in the buffer


def test_a_long_cpu_run_is_reduced_as_rows_and_its_remainder_whole():
    params, _ = _flat_params(shapes=((300, 1000), (7,), (300, 1000)))
    plan = NormPlan([p.grad for p in params], resolve_topology())
    [bucket] = plan.buckets
    rows = 600_007 // ROW
    assert bucket.run_pieces.blocks == ((0, 0, rows),)
    assert bucket.run_pieces.whole == ((0, rows * ROW, 600_007, False),)
    expected = _reference([p.grad for p in params], 2.0)
    assert distclip.get_total_norm([p.grad for p in params]).item() == pytest.approx(expected, rel=1e-6)


def test_gradients_moved_out_of_their_buffer_are_clipped_one_by_one():
    params, buffer = _flat_params()
    clipper = distclip.GradClipper(params, max_norm=1.0)
    clipper.clip_()
    # Same shapes, so the plan is kept; new storage, so its runs no longer hold.
    for p in params:
        p.grad = p.grad.clone() * 2
    moved = [p.grad.clone() for p in params]
    buffer_before = buffer.clone()
    result = clipper.clip_()
    assert result.total_norm.item() == pytest.approx(_reference(moved, 2.0), rel=1e-6)
    coefficient = result.coef.item()
    assert coefficient < 1
    for p, grad in zip(params, moved):
        torch.testing.assert_close(p.grad, grad * coefficient, rtol=1e-6, atol=0)
    torch.testing.assert_close(buffer, buffer_before, rtol=0, atol=0)


def test_gradients_swapped_inside_their_buffer_are_clipped_one_by_one():
    buffer = torch.randn(4 * 6)  # four slots, the gradients in the first three
    params = [nn.Parameter(torch.zeros(6)) for _ in range(3)]
    for i, p in enumerate(params):
        p.grad = buffer[6 * i : 6 * (i + 1)]
    clipper = distclip.GradClipper(params, max_norm=1.0)
    clipper.clip_()
    # The first two trade places and the third moves out: a run from the first gradient would
    # now cover slots 1-3, the last two of which are no gradient's.
    params[0].grad, params[1].grad = buffer[6:12], buffer[0:6]
    params[2].grad = torch.full((6,), 5.0)
    grads = [p.grad.clone() for p in params]
    untouched = buffer[12:].clone()
    result = clipper.clip_()
    assert result.total_norm.item() == pytest.approx(_reference(grads, 2.0), rel=1e-6)
    for p, grad in zip(params, grads):
        torch.testing.assert_close(p.grad, grad * result.coef, rtol=1e-6, atol=0)
    torch.testing.assert_close(buffer[12:], untouched, rtol=0, atol=0)


def test_non_contiguous_gradients_never_join_a_run():
    buffer = torch.randn(2 * 12)
    params = [nn.Parameter(torch.zeros(4, 3)) for _ in range(2)]
    for i, p in enumerate(params):
        p.grad = buffer[12 * i : 12 * (i + 1)].view(3, 4).t()
    plan = NormPlan([p.grad for p in params], resolve_topology())
    assert plan.buckets[0].runs is None and plan.scale_runs[0] is None
    before = [p.grad.clone() for p in params]
    total = distclip.clip_grad_norm_(params, 0.1)
    assert total.item() == pytest.approx(_reference(before, 2.0), rel=1e-6)


def test_group_norms_stay_apart_when_their_gradients_share_a_buffer():
    params, _ = _flat_params()
    groups = {"first": params[:2], "rest": params[2:]}
    clipper = distclip.GradClipper(params, max_norm=1e9, groups=groups)
    before = {name: [p.grad.clone() for p in ps] for name, ps in groups.items()}
    result = clipper.clip_()
    for name, grads in before.items():
        assert result.group_norms[name].item() == pytest.approx(_reference(grads, 2.0), rel=1e-6)
    assert len(clipper._plan.buckets[0].runs.runs) == 2


def _ddp_bucket_views(norm_type):
    model = DDP(build(), gradient_as_bucket_view=True)
    backward(model, batch(dist.get_rank()))
    plan = NormPlan([p.grad for p in model.parameters()], resolve_topology())
    runs = [len(b.runs.runs) if b.runs else 0 for b in plan.buckets]
    result = clip_and_check(model.module.named_parameters(), norm_type)
    return {**result, "pieces": [len(b.pieces) for b in plan.buckets], "runs": runs}


@pytest.mark.parametrize("norm_type", [2.0, math.inf])
def test_ddp_bucket_view_gradients_are_exact_and_merged(ranks, norm_type):
    results = ranks(2).run(_ddp_bucket_views, norm_type)
    assert_same_on_all_ranks(results)
    for result in results:
        assert 0 < sum(result["runs"]) < sum(result["pieces"]), result


def test_the_norm_does_not_depend_on_where_the_runs_lie_in_memory():
    # The same gradients as two runs, the runs in either order in their buffer: the norm must
    # come out with the same bits (the packed runs are summed in float32, so order could show).
    a = torch.full((100,), 1e-3)
    a[0] = 4096.0
    b = torch.full((100,), 0.37)
    assert not torch.equal(torch.linalg.vector_norm(torch.cat([a, b])), torch.linalg.vector_norm(torch.cat([b, a])))
    norms = []
    for a_first in (True, False):
        buffer = torch.cat([a, torch.zeros(1), b]) if a_first else torch.cat([b, torch.zeros(1), a])
        a_at, b_at = (0, 101) if a_first else (101, 0)
        grads = [buffer[a_at : a_at + 50], buffer[a_at + 50 : a_at + 100], buffer[b_at : b_at + 50], buffer[b_at + 50 : b_at + 100]]
        assert len(NormPlan(grads, resolve_topology()).buckets[0].runs.runs) == 2
        clear_plans()  # a plan of its own for each layout, as two processes would make
        norms.append(distclip.get_total_norm(grads))
    assert torch.equal(norms[0], norms[1]), norms
