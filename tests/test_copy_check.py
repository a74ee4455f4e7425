"""The copy contract checked inside the one collective: ranks assumed to hold copies that do not
raise the same ValueError on every rank, gradients untouched; ranks that do hold copies never
see a false alarm (every other distributed test checks that too, with exact norms).  Values are
sampled from every tensor of a copy set: all of them on every call up to UNITS_PER_STEP, a
rotating window beyond, which every member chooses alike from the group's reduction count."""

import math

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FullyShardedDataParallel, ShardingStrategy
from torch.distributed.tensor import DTensor, Replicate, Shard

import distclip
from distclip.copycheck import SIZE, SLOTS, UNITS_PER_STEP, CopyCheck, _Rotation
from reference import NoHostSync, assert_close_norm, collectives, full_grads, reference_norm

NORMS = [2.0, 1.0, 0.0, math.inf, -math.inf]


def _stage(out_features: int, seed: int) -> list[nn.Parameter]:
    torch.manual_seed(seed)
    layer = nn.Linear(8, out_features)
    layer(torch.randn(4, 8)).square().sum().backward()
    return list(layer.parameters())


def _grads(params):
    return [p.grad.clone() for p in params]


def _stages_with_default_arguments(norm_type, same_shapes, stages_per_replica):
    """Pipeline stages (``stages_per_replica`` of them, the rest data-parallel replicas of them)
    called with the default ``replica_group``: the user forgot to pass the dp group."""
    stage = dist.get_rank() % stages_per_replica
    params = _stage(8 if same_shapes or stage == 0 else 4, seed=stage)
    before = _grads(params)
    with collectives() as issued:
        with pytest.raises(ValueError, match=r"Pipeline stages.*pass replica_group=") as raised:
            distclip.clip_grad_norm_(params, 0.01, norm_type)
    assert issued == ["gloo:all_reduce"], issued  # found in the one collective, none added
    for grad, was in zip(_grads(params), before):
        assert torch.equal(grad, was), "no gradient may be touched"
    return str(raised.value)


@pytest.mark.parametrize("norm_type", NORMS)
@pytest.mark.parametrize("same_shapes", [False, True], ids=["different-shapes", "same-shapes-different-values"])
def test_pipeline_stages_with_default_arguments_raise_on_every_rank(ranks, norm_type, same_shapes):
    messages = ranks(2).run(_stages_with_default_arguments, norm_type, same_shapes, 2)
    assert messages[0] == messages[1]


@pytest.mark.parametrize("same_shapes", [False, True], ids=["different-shapes", "same-shapes-different-values"])
def test_two_stages_of_two_replicas_with_default_arguments_raise_on_every_rank(ranks, same_shapes):
    messages = ranks(4).run(_stages_with_default_arguments, 2.0, same_shapes, 2)
    assert len(set(messages)) == 1


def _different_tensor_counts():
    params = _stage(8, seed=0) + (_stage(8, seed=1) if dist.get_rank() == 1 else [])
    before = _grads(params)
    with pytest.raises(ValueError, match="hold different ones"):
        distclip.clip_grad_norm_(params, 0.01)
    assert all(torch.equal(g, b) for g, b in zip(_grads(params), before))


def test_different_tensor_counts_raise_on_every_rank(ranks):
    ranks(2).run(_different_tensor_counts)


def _explicit_replica_group_of_different_stages():
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("pp", "dp"))
    params = _stage(8, seed=mesh["pp"].get_local_rank())  # stages differ, dp replicas are copies
    with pytest.raises(ValueError, match="hold different ones"):
        distclip.clip_grad_norm_(params, 0.01, replica_group=mesh["pp"])  # the wrong dim
    assert distclip.clip_grad_norm_(params, 1e9, replica_group=mesh["dp"]).isfinite()


def test_a_wrong_explicit_replica_group_raises_and_the_right_one_passes(ranks):
    ranks(4).run(_explicit_replica_group_of_different_stages)


def _replicate_dim_that_is_not_a_copy():
    # A DTensor that claims Replicate over tp while each tp rank holds different values.
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
    torch.manual_seed(dist.get_rank())
    grad = DTensor.from_local(torch.randn(6), mesh, [Shard(0), Replicate()], run_check=False)
    with pytest.raises(ValueError, match="hold different ones"):
        distclip.get_total_norm([grad])


def test_a_replicate_placement_whose_copies_differ_raises(ranks):
    ranks(4).run(_replicate_dim_that_is_not_a_copy)


def _nan_on_one_replica_is_a_nonfinite_norm_not_a_copy_error():
    params = _stage(8, seed=0)
    if dist.get_rank() == 1:
        params[0].grad.fill_(math.nan)
    return repr(distclip.clip_grad_norm_(params, 1.0).item())


def test_a_nan_on_one_replica_is_reported_as_a_nan_norm(ranks):
    # The nonfinite policies own that case ("skip" must skip, not raise).
    assert ranks(2).run(_nan_on_one_replica_is_a_nonfinite_norm_not_a_copy_error) == ["nan", "nan"]


def _contributions(members, rank, tensors):
    segments = [(i, 0, t.numel()) for i, t in enumerate(tensors)]
    return CopyCheck({members: segments}, tensors, rank).contributions(tensors, torch.device("cpu"))


def test_members_that_agree_sum_to_exactly_zero_whatever_shares_their_slot():
    torch.manual_seed(0)
    total = torch.zeros(())
    for size in range(1, 3 * SLOTS + 1):  # more sets than slots: collisions are certain
        members = tuple(range(100 * size, 100 * size + 1 + size % 4))
        tensors = [torch.randn(size, 3), torch.randn(size).to(torch.bfloat16), torch.randn(2).double()]
        for rank in members:
            total = total + _contributions(members, rank, tensors)
    assert torch.equal(total, torch.zeros_like(total))


@pytest.mark.parametrize("copies", [2, 3, 5])
def test_one_member_that_differs_is_always_found(copies):
    members = tuple(range(copies))
    torch.manual_seed(1)
    tensors = [torch.randn(7, 3), torch.randn(5)]
    for differing in members:
        for change in ("value", "shape", "count"):
            total = torch.zeros(())
            for rank in members:
                mine = [t.clone() for t in tensors]
                if rank == differing:
                    if change == "value":
                        mine[0][0, 0] += 1  # the first element is always sampled
                    elif change == "shape":
                        mine[1] = mine[1].reshape(5, 1)
                    else:
                        mine.append(torch.ones(1))
                total = total + _contributions(members, rank, mine)
            assert bool((total != 0).any()), (differing, change)


def test_check_values_stay_exact_integers_in_float64():
    members = tuple(range(1 << 14))  # a copy set of 16,384 ranks
    tensors = [torch.randn(10)]
    leader, member = _contributions(members, 0, tensors), _contributions(members, 1, tensors)
    whole_set = leader.abs() + (len(members) - 1) * member.abs()  # bounds every partial sum
    assert float(whole_set.max()) < 2**53 / 64, "64 such sets sharing a slot must stay exact"


def test_segments_of_one_flat_tensor_are_each_sampled():
    # FSDP1: one flat gradient holds several parameters' ranges, of different lengths.
    flat = torch.randn(40)
    segments = [(0, 0, 2), (0, 2, 30), (0, 30, 40)]
    agree = sum(CopyCheck({(0, 1): segments}, [flat], rank).contributions([flat], torch.device("cpu")) for rank in (0, 1))
    assert torch.equal(agree, torch.zeros_like(agree))
    changed = flat.clone()
    changed[20] += 1  # a sampled position of the second range only (2 + 28 * 2 // 3)
    differ = CopyCheck({(0, 1): segments}, [flat], 0).contributions([flat], torch.device("cpu")) + CopyCheck(
        {(0, 1): segments}, [changed], 1
    ).contributions([changed], torch.device("cpu"))
    assert bool((differ != 0).any())


# -- Every tensor of a copy set is sampled ------------------------------------------------------


def _calls_to_sample_every_tensor(tensors: int) -> int:
    """The README's bound N: the smallest prime >= ceil(tensors / UNITS_PER_STEP); 1 when all
    tensors fit in one call's window."""
    windows = math.ceil(tensors / UNITS_PER_STEP)
    if windows == 1:
        return 1
    return next(n for n in range(max(windows, 2), 2 * windows + 2) if all(n % d for d in range(2, math.isqrt(n) + 1)))


def _copies(count: int, layout: str, shape=(3, 4), seed: int = 0) -> list[nn.Parameter]:
    """``count`` parameters whose gradients are the same on every rank (as after DDP's
    all-reduce): separate tensors, or views into one flat buffer (``gradient_as_bucket_view``)."""
    values = torch.randn(count, *shape, generator=torch.Generator().manual_seed(seed))
    params = [nn.Parameter(torch.empty(shape)) for _ in range(count)]
    for param, value in zip(params, values):  # iterating the buffer: views into it, end to end
        param.grad = value if layout == "bucket-view" else value.clone()
    in_one_buffer = params[1].grad.data_ptr() == params[0].grad.data_ptr() + params[0].grad.nbytes
    assert in_one_buffer == (layout == "bucket-view")
    return params


def _last_of_six_not_synchronized(layout):
    params = _copies(6, layout)
    if dist.get_rank() == 1:
        params[5].grad.add_(1.0)  # a parameter DDP was told to ignore: never all-reduced
    before = _grads(params)
    with collectives() as issued:
        with pytest.raises(ValueError, match="hold different ones") as raised:
            distclip.clip_grad_norm_(params, 0.01)
    assert issued == ["gloo:all_reduce"], issued
    assert all(torch.equal(g, b) for g, b in zip(_grads(params), before)), "no gradient may be touched"
    return str(raised.value)


@pytest.mark.parametrize("layout", ["separate", "bucket-view"])
def test_the_sixth_of_six_tensors_not_synchronized_raises_on_every_rank(ranks, layout):
    messages = ranks(2).run(_last_of_six_not_synchronized, layout)
    assert messages[0] == messages[1]


def _one_of_many_not_synchronized(count, layout):
    params = _copies(count, layout, shape=(2, 2))
    clipper = distclip.GradClipper(params, max_norm=1e9)  # never scales: agreeing calls change nothing
    for _ in range(3):
        clipper.clip_()
    if dist.get_rank() == 1:
        params[count // 2].grad.add_(1.0)
    bound = _calls_to_sample_every_tensor(count)
    before = _grads(params)  # what every call must leave as it is (agreeing ones change nothing)
    for call in range(1, bound + 1):
        try:
            clipper.clip_()
        except ValueError as error:
            assert "hold different ones" in str(error)
            assert all(torch.equal(g, b) for g, b in zip(_grads(params), before)), "no gradient may be touched"
            return call
    pytest.fail(f"the unsynchronized tensor was not found within {bound} calls")


@pytest.mark.parametrize("layout", ["separate", "bucket-view"])
def test_one_unsynchronized_tensor_of_2000_is_found_within_the_stated_number_of_calls(ranks, layout):
    found_at = ranks(2).run(_one_of_many_not_synchronized, 2000, layout)
    assert found_at[0] == found_at[1], found_at  # on every rank together
    assert found_at[0] <= _calls_to_sample_every_tensor(2000) == 127


def _parameter_of_an_fsdp1_flat_gradient_not_synchronized():
    # NO_SHARD: each rank's flat gradient is a whole copy of 100 parameters' gradients, one
    # tensor: one gather samples every parameter's range on every call.
    torch.manual_seed(0)
    layers = nn.Sequential(*(nn.Linear(3, 3) for _ in range(50)))
    model = FullyShardedDataParallel(layers, sharding_strategy=ShardingStrategy.NO_SHARD, device_id=torch.device("cpu"))
    model(torch.randn(2, 3)).square().sum().backward()
    flat = model._handle.flat_param
    assert len(flat._numels) == 100
    if dist.get_rank() == 1:  # the last bias only: its range, padding before it counted
        sizes = list(zip(flat._numels_with_padding, flat._is_padding_mask))
        last = max(k for k, (_, padding) in enumerate(sizes) if not padding)
        start = sum(n for n, _ in sizes[:last])
        flat.grad[start : start + sizes[last][0]].add_(1.0)
    before = flat.grad.clone()
    with pytest.raises(ValueError, match="hold different ones"):
        distclip.clip_grad_norm_(model, 0.01)
    assert torch.equal(flat.grad, before)


def test_a_parameter_inside_an_fsdp1_flat_gradient_not_synchronized_is_found_on_the_first_call(ranks):
    ranks(2).run(_parameter_of_an_fsdp1_flat_gradient_not_synchronized)


def _copied_over(group, seed: int, count: int, name: str) -> list[tuple[str, nn.Parameter]]:
    values = torch.randn(count, 2, 3, generator=torch.Generator().manual_seed(seed))
    named = []
    for k, value in enumerate(values):
        param = nn.Parameter(torch.empty(2, 3))
        param.grad, param.copy_group = value.clone(), group
        named.append((f"{name}.{k}", param))
    return named


def _agreeing_copies_among_other_calls(calls):
    rank = dist.get_rank()
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
    dp, tp = mesh["dp"], mesh["tp"]
    tp_coordinate, dp_coordinate = tp.get_local_rank(), dp.get_local_rank()
    # Three copy sets per rank, 40 tensors each (three windows): over all ranks, over dp (its
    # values follow the tp coordinate), over tp (they follow the dp coordinate).
    named = (
        _copied_over(dist.group.WORLD, 0, 40, "world")
        + _copied_over(dp.get_group(), 1 + tp_coordinate, 40, f"dp-copies@tp{tp_coordinate}")
        + _copied_over(tp.get_group(), 3 + dp_coordinate, 40, f"tp-copies@dp{dp_coordinate}")
    )
    params = [p for _, p in named]
    by_copy_group = lambda p: p.copy_group  # noqa: E731
    expected = reference_norm(full_grads([(name, p.grad) for name, p in named]), 2.0)
    clipper = distclip.GradClipper(params, max_norm=1e9, replica_group=by_copy_group)
    differing = _copies(20, "separate", seed=rank)  # "copies" that differ: a true alarm
    for call in range(calls):
        # Ranks' histories on the dp groups differ: {0, 2} reduces once, {1, 3} twice.
        for _ in range(1 + tp_coordinate if call % 3 == 0 else 0):
            dp_norm = distclip.get_total_norm([p.grad for _, p in named[40:80]], group=dp)
            assert dp_norm.isfinite()
        if call % 5 == 2:  # an error caught, and the loop goes on
            with pytest.raises(ValueError, match="hold different ones"):
                distclip.clip_grad_norm_(differing, 1.0)
        if call % 7 == 3 and rank in (0, 1):  # only some ranks use this subgroup
            distclip.get_total_norm([p.grad for _, p in named[80:]], group=tp)
        assert_close_norm(clipper.clip_().total_norm.item(), expected, 2.0)
        assert_close_norm(distclip.clip_grad_norm_(params, 1e9, replica_group=by_copy_group).item(), expected, 2.0)


def test_agreeing_copies_never_raise_whatever_other_calls_each_rank_made(ranks):
    ranks(4).run(_agreeing_copies_among_other_calls, calls=30)


@pytest.mark.parametrize("units", [1, 6, 16, 17, 40, 2000, 20000])
def test_the_rotation_covers_every_tensor_within_the_stated_number_of_calls(units):
    rotation = _Rotation.of(units)
    bound = _calls_to_sample_every_tensor(units)
    assert rotation.window == min(units, UNITS_PER_STEP)
    # From any reduction count, calling every reduction or every k-th (other distclip calls over
    # the same group in between), for every k the bound does not divide.
    for first in (0, 1, 7, 10**9 + 3):
        for every in sorted({1, 2, 3, 16, max(bound - 1, 1), bound + 1}):
            if bound > 1 and every % bound == 0:
                continue
            sampled = set()
            for call in range(bound):
                sampled.update(rotation.window_units(rotation.window_at(first + call * every)))
            assert sampled == set(range(units)), (first, every)


def _agreeing_clips_after_the_first_do_not_wait_for_the_device():
    params = _copies(40, "separate")  # three windows: every call samples other tensors
    clipper = distclip.GradClipper(params, max_norm=1e9)
    for step in range(4):
        with NoHostSync(host_data=step > 0):
            clipper.clip_()


def test_the_rotating_check_makes_no_host_sync(ranks):
    ranks(2).run(_agreeing_clips_after_the_first_do_not_wait_for_the_device)


# -- Bit patterns of every dtype, logical elements of any strides -------------------------------


def _check_sum(per_member: list[list[torch.Tensor]], members=(0, 1)) -> torch.Tensor:
    return sum(_contributions(tuple(members), rank, tensors) for rank, tensors in zip(members, per_member))


def _last_word_of_first_element_flipped(tensor: torch.Tensor) -> torch.Tensor:
    """A copy of ``tensor`` whose first element differs in its last bit pattern word only (the
    imaginary part of a complex128, the only byte of a bool)."""
    changed = tensor.clone()
    word = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64, 16: torch.int64}[tensor.element_size()]
    changed.view(-1)[:1].view(word)[-1:] ^= 1
    return changed


DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16, torch.complex64, torch.complex128,
          torch.float8_e4m3fn, torch.bool]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_copies_of_every_dtype_agree_and_one_changed_bit_is_found(dtype):
    torch.manual_seed(2)
    tensors = [torch.randn(5, 3).to(dtype) if dtype != torch.bool else torch.randn(5, 3) > 0 for _ in range(3)]
    assert torch.equal(_check_sum([tensors, [t.clone() for t in tensors]]), torch.zeros(SIZE))
    changed = tensors[:2] + [_last_word_of_first_element_flipped(tensors[2])]
    assert not torch.equal(changed[2].view(torch.uint8), tensors[2].view(torch.uint8))
    assert bool((_check_sum([tensors, changed]) != 0).any())


def _strided_views(fill_outside: float):
    """Three non-contiguous views (transposed, every other column, a permuted slice with an
    offset) of buffers whose elements outside the views are ``fill_outside``."""
    torch.manual_seed(3)
    base = [torch.full((5, 3), fill_outside), torch.full((4, 10), fill_outside), torch.full((3, 4, 5), fill_outside)]
    views = [base[0].t(), base[1][:, 1::2], base[2][1:, :, 2:].permute(2, 0, 1)]
    for view in views:
        view.copy_(torch.randn(view.shape, generator=torch.Generator().manual_seed(view.numel())))
    assert not any(v.is_contiguous() for v in views)
    return views


def test_non_contiguous_copies_are_compared_by_their_logical_elements():
    mine, theirs = _strided_views(fill_outside=0.0), _strided_views(fill_outside=7.0)
    assert torch.equal(_check_sum([mine, theirs]), torch.zeros(SIZE))  # storage outside differs: no alarm
    for n, view in enumerate(theirs):
        changed = list(theirs)
        changed[n] = view.clone()
        changed[n][torch.unravel_index(torch.tensor(view.numel() // 3), view.shape)] += 1  # sampled, in logical order
        assert bool((_check_sum([mine, changed]) != 0).any()), n


def _non_contiguous_copies(differ: bool):
    views = _strided_views(fill_outside=float(dist.get_rank()))  # storage outside the views differs
    params = [nn.Parameter(torch.empty(v.shape)) for v in views]
    for param, view in zip(params, views):
        param.grad = view
    if differ and dist.get_rank() == 1:
        params[2].grad[-1, -1, -1] += 1  # the last element in logical order: always sampled
    if differ:
        with pytest.raises(ValueError, match="hold different ones"):
            distclip.get_total_norm([p.grad for p in params])
    else:  # the check only: the norm of strided gradients is issue 29's part 1, tested there
        assert distclip.get_total_norm([p.grad for p in params]).isfinite()


@pytest.mark.parametrize("differ", [False, True], ids=["agreeing", "differing"])
def test_non_contiguous_gradients_as_copies(ranks, differ):
    ranks(2).run(_non_contiguous_copies, differ)


# -- Views into one buffer: read in one gather, the same elements as one gather per tensor -------


def _in_one_buffer(tensors: list[torch.Tensor], reverse: bool = True) -> list[torch.Tensor]:
    """Copies of ``tensors`` as views into one flat buffer, laid out in reverse order (as DDP
    fills its buckets), so that memory order is not list order."""
    order = list(reversed(range(len(tensors)))) if reverse else list(range(len(tensors)))
    buffer = torch.cat([tensors[i].reshape(-1) for i in order])
    views, at = [None] * len(tensors), 0
    for i in order:
        views[i] = buffer[at : at + tensors[i].numel()].view(tensors[i].shape)
        at += tensors[i].numel()
    return views


def _planned(members, rank, planned):
    """Member ``rank``'s check, planned on its tensors ``planned`` (one copy set of them all)."""
    return CopyCheck({members: [(i, 0, t.numel()) for i, t in enumerate(planned)]}, planned, rank)


def test_members_holding_copies_in_a_buffer_and_as_separate_tensors_agree():
    torch.manual_seed(4)
    separate = [torch.randn(3, 4) for _ in range(40)]  # three windows
    in_buffer, copies = _in_one_buffer(separate), [t.clone() for t in separate]
    buffered, apart = _planned((0, 1), 0, in_buffer), _planned((0, 1), 1, copies)
    assert all(b is not None for b in buffered.sets[0].buffers), "each window is read in one gather"
    for step in range(6):
        total = buffered.contributions(in_buffer, CPU, step) + apart.contributions(copies, CPU, step)
        assert torch.equal(total, torch.zeros(SIZE, dtype=torch.float64)), step


def test_a_gradient_moved_out_of_its_buffer_is_read_where_it_now_is():
    torch.manual_seed(5)
    separate = [torch.randn(3, 4) for _ in range(40)]
    in_buffer, copies = _in_one_buffer(separate), [t.clone() for t in separate]
    buffered, apart = _planned((0, 1), 0, in_buffer), _planned((0, 1), 1, copies)
    moved = list(in_buffer)
    moved[5] = in_buffer[5].clone()  # p.grad replaced on this rank only, same values
    in_buffer[5].fill_(123.0)  # what is left in the buffer is no gradient any more
    agree = buffered.contributions(moved, CPU, 0) + apart.contributions(copies, CPU, 0)
    assert torch.equal(agree, torch.zeros(SIZE, dtype=torch.float64)), "the stale buffer must not be read"
    moved[5][0, 0] += 1  # the gradient itself now differs (its first element is always sampled)
    differ = buffered.contributions(moved, CPU, 0) + apart.contributions(copies, CPU, 0)
    assert bool((differ != 0).any())


CPU = torch.device("cpu")
