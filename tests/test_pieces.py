"""Long CPU ranges are reduced as rows and small CPU tensors packed (distclip.pieces): each row
and each packed tensor counted once, towards its own gradient's group, on every path that takes
norms (foreach or not, plan or overlap, sharded)."""

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Shard, distribute_tensor

import distclip
from distclip.pieces import BLOCK, PACK_UP_TO, ROW, ROWS_FROM, split_ranges
from models import NORM_TYPES
from reference import assert_close_norm, assert_same_on_all_ranks, clip_and_check, reference_norm

# Long enough to be rows on the CPU, not a multiple of a row, more than one block.
LONG = BLOCK + 3 * ROW + 5


def _params(shapes, dtype=torch.float32, seed=0):
    generator = torch.Generator().manual_seed(seed)
    params = []
    for shape in shapes:
        p = nn.Parameter(torch.zeros(shape, dtype=dtype))
        p.grad = ((torch.randn(shape, generator=generator) + 0.5) * 3).to(dtype)
        params.append(p)
    return params


def test_a_long_cpu_range_becomes_blocks_of_rows_and_a_whole_remainder():
    pieces = split_ranges([(0, 7, 7 + LONG, 7 + LONG), (1, 0, ROWS_FROM, ROWS_FROM)], torch.device("cpu"))
    rows = LONG // ROW
    assert pieces.blocks == ((0, 7, BLOCK // ROW), (0, 7 + BLOCK, rows - BLOCK // ROW))
    assert pieces.whole == ((0, 7 + rows * ROW, 7 + LONG, False), (1, 0, ROWS_FROM, True))
    assert pieces.value_units == (0, 1) + (0,) * rows


def test_small_whole_cpu_units_are_packed_up_to_rows_from_elements():
    small = PACK_UP_TO
    ranges = [(u, 0, small, small) for u in range(ROWS_FROM // small + 1)] + [(99, 0, 5, 5), (7, 0, 3, 10)]
    pieces = split_ranges(ranges, torch.device("cpu"))
    full = tuple(range(ROWS_FROM // small))
    assert pieces.packs == (full, (ROWS_FROM // small, 99))  # a full pack, then the next
    assert pieces.whole == ((7, 0, 3, False),)  # part of a unit: never packed
    assert pieces.row_packs == ()
    assert pieces.value_units == (7, 0, ROWS_FROM // small)


def test_with_keys_small_whole_cpu_units_are_row_packed_by_element_count_each_keeping_its_key():
    small = PACK_UP_TO
    ranges = [(u, 0, small, small) for u in range(ROWS_FROM // small + 1)] + [(99, 0, 5, 5), (7, 0, 3, 10), (8, 0, 5, 5)]
    keys = [u % 3 for u in range(ROWS_FROM // small + 1)] + [1, 0, 2]
    pieces = split_ranges(ranges, torch.device("cpu"), keys)
    full = tuple(range(ROWS_FROM // small))
    # Packs of one element count, whatever the keys: a full pack, the next, the 5-element units.
    assert pieces.row_packs == (full, (ROWS_FROM // small,), (99, 8)) and pieces.packs == ()
    assert pieces.whole == ((7, 0, 3, False),)
    assert pieces.value_units == (7,) + full + (ROWS_FROM // small, 99, 8)
    assert pieces.value_keys == (0,) + tuple(keys[: ROWS_FROM // small + 1]) + (1, 2)


def test_ranges_on_other_devices_stay_whole():
    pieces = split_ranges([(0, 0, LONG, LONG), (1, 0, 5, 5)], torch.device("meta"))
    assert pieces.whole == ((0, 0, LONG, True), (1, 0, 5, True)) and pieces.blocks == pieces.packs == ()


@pytest.mark.parametrize("norm_type", NORM_TYPES)
@pytest.mark.parametrize("foreach", [None, False])
def test_long_gradients_give_the_float64_norm_with_and_without_foreach(norm_type, foreach):
    params = _params([(LONG,), (3, 5), (ROWS_FROM + 1,)])
    before = {str(i): p.grad.double() for i, p in enumerate(params)}
    total = distclip.get_total_norm([p.grad for p in params], norm_type, foreach=foreach)
    assert_close_norm(total.item(), reference_norm(before, norm_type), norm_type, rtol=1e-6)


@pytest.mark.parametrize(
    "make",
    # Views that leave out elements of their storage (set to 1e3, so counting one would show):
    # every other column, transposed (not contiguous); all but the first 3 (at an offset).
    [lambda t: t[: 2 * LONG // 200 * 200].view(-1, 100)[:, ::2].t(), lambda t: t[3 : LONG + 3]],
    ids=["strided", "offset"],
)
def test_long_gradients_that_are_views_give_the_float64_norm(make):
    storage = torch.full((2 * LONG,), 1e3)
    grad = make(storage)
    grad.copy_(torch.randn(grad.shape, generator=torch.Generator().manual_seed(1)) + 0.5)
    total = distclip.get_total_norm([grad])
    assert total.item() == pytest.approx(torch.linalg.vector_norm(grad.double()).item(), rel=1e-6)


@pytest.mark.parametrize("norm_type", [2.0, 1.0, float("inf"), 0.0])
def test_rows_count_towards_their_own_gradients_group(norm_type):
    params = _params([(LONG,), (40, 40), (ROWS_FROM * 2,), (7,)])
    groups = {"a": [params[0], params[1]], "b": [params[2], params[3]]}
    clipper = distclip.GradClipper(params, max_norm=1e9, norm_type=norm_type, groups=groups)
    before = {name: {str(i): p.grad.double() for i, p in enumerate(ps)} for name, ps in groups.items()}
    result = clipper.clip_()
    for name, grads in before.items():
        assert_close_norm(result.group_norms[name].item(), reference_norm(grads, norm_type), norm_type, rtol=1e-6)


def test_partials_taken_during_backward_reduce_long_gradients_as_rows():
    model = nn.Linear(ROWS_FROM // 16 + 3, 40)  # a 2.6M-element weight gradient
    clipper = distclip.GradClipper(model, max_norm=1e9, overlap=True)
    for step in range(2):
        model.zero_grad(set_to_none=True)
        model(torch.randn(4, model.in_features, generator=torch.Generator().manual_seed(step))).square().sum().backward()
        expected = reference_norm({n: p.grad.double() for n, p in model.named_parameters()}, 2.0)
        assert clipper.clip_().total_norm.item() == pytest.approx(expected, rel=1e-6)
    assert clipper.backward_partials.steps_used == 1


def _long_sharded_clip(norm_type):
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    named = []
    # Each rank's shard of the two long gradients is rows and a remainder.
    for i, (shape, dtype) in enumerate([((3 * ROWS_FROM // 100, 100), torch.float32), ((33,), torch.float32),
                                        ((3 * ROWS_FROM // 100, 100), torch.bfloat16)]):
        generator = torch.Generator().manual_seed(i)
        full = ((torch.randn(shape, generator=generator) + 0.5) * 3).to(dtype)
        param = nn.Parameter(distribute_tensor(torch.zeros(shape, dtype=dtype), mesh, [Shard(0)]))
        param.grad = distribute_tensor(full, mesh, [Shard(0)])
        named.append((f"p{i}", param))
    return clip_and_check(named, norm_type, rtol=1e-6, clipped_rtol=2**-8)


@pytest.mark.parametrize("norm_type", [2.0, float("inf")])
def test_long_sharded_gradients_match_the_float64_reference(ranks, norm_type):
    assert_same_on_all_ranks(ranks(2).run(_long_sharded_clip, norm_type))
