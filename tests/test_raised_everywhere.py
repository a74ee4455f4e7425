"""Nothing raises on one rank alone: whatever raises before the collective on some ranks (a
``replica_group`` callable, a ``groups`` mapping or callable, a user's iterable, a bad metric)
still takes part in the all-reduce and is raised on every rank, with the type and text of the
rank that raised it, no gradient modified; and the accelerator's rule (problems raised at the
next call, gradients untouched meanwhile), taken on the CPU with ``distclip.deferred.deferred()``.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import Shard, distribute_tensor

import distclip
from distclip.deferred import deferred
from models import build
from reference import assert_close_norm, collectives


def _model(rank: int) -> nn.Module:
    model = build(seed=rank)  # a pipeline stage of its own: other tensors on every rank
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    return model


def _snapshot(model: nn.Module) -> list[torch.Tensor]:
    return [p.grad.clone() for p in model.parameters()]


def _untouched(model: nn.Module, before: list[torch.Tensor]) -> bool:
    return all(torch.equal(p.grad, b) for p, b in zip(model.parameters(), before))


def _raises_everywhere(call, error_type, match):
    """Run ``call`` (which raises on rank 1 alone before communicating) on a model of this
    rank's own; returns whether the gradients were left as they were."""
    model = _model(dist.get_rank())
    before = _snapshot(model)
    with pytest.raises(error_type, match=match) as raised:
        call(model)
    assert any("raised on rank 1" in note for note in getattr(raised.value, "__notes__", [])), raised.value
    return _untouched(model, before)


def _own_copy_group(parameter):
    return parameter.copy_group  # rank 1's parameters lack the attribute (the README's lambda)


def _callable_raising_on_one_rank(api):
    alone = dist.new_subgroups(group_size=1)[0]

    def call(model):
        if dist.get_rank() == 0:
            for p in model.parameters():
                p.copy_group = alone
        if api == "functional":
            distclip.clip_grad_norm_(model, 0.1, replica_group=_own_copy_group)
        else:
            distclip.GradClipper(model, 0.1, replica_group=_own_copy_group).clip_()

    return _raises_everywhere(call, AttributeError, "copy_group")


@pytest.mark.parametrize("api", ["functional", "clipper"])
def test_a_replica_group_callable_raising_on_one_rank_raises_on_every_rank(ranks, api):
    assert ranks(2).run(_callable_raising_on_one_rank, api) == [True, True]


def _groups_raising_on_one_rank(kind):
    alone = dist.new_subgroups(group_size=1)[0]

    def call(model):
        if kind == "callable":
            def block(name, _):
                if dist.get_rank() == 1 and name.startswith("head"):
                    raise KeyError(f"no block for {name}")
                return name.split(".")[0]
            groups = block
        else:
            stray = nn.Parameter(torch.ones(1))  # not a parameter of the model, on rank 1 only
            groups = {"layers": list(model.layers.parameters()) + ([stray] if dist.get_rank() == 1 else [])}
        distclip.GradClipper(model, 0.1, replica_group=alone, groups=groups).clip_()

    error, match = (KeyError, "no block for head") if kind == "callable" else (ValueError, "does not clip")
    return _raises_everywhere(call, error, match)


@pytest.mark.parametrize("kind", ["callable", "mapping"])
def test_groups_raising_on_one_rank_raise_on_every_rank(ranks, kind):
    assert ranks(2).run(_groups_raising_on_one_rank, kind) == [True, True]


def _iterable_raising_on_one_rank():
    alone = dist.new_subgroups(group_size=1)[0]

    def parameters(model):
        for i, p in enumerate(model.parameters()):
            if dist.get_rank() == 1 and i == 3:
                raise RuntimeError("the data loader's hook failed")
            yield p

    return _raises_everywhere(
        lambda model: distclip.clip_grad_norm_(parameters(model), 0.1, replica_group=alone),
        RuntimeError, "data loader's hook failed",
    )


def test_a_parameter_iterable_raising_on_one_rank_raises_on_every_rank(ranks):
    assert ranks(2).run(_iterable_raising_on_one_rank) == [True, True]


def _metrics_raise_on_every_rank(metrics_of_rank, match: str) -> bool:
    """Clip with ``metrics_of_rank(rank)``: a ValueError matching ``match``, gradients untouched."""
    alone = dist.new_subgroups(group_size=1)[0]
    model = _model(dist.get_rank())
    before = _snapshot(model)
    clipper = distclip.GradClipper(model, 0.1, replica_group=alone)
    with pytest.raises(ValueError, match=match):
        clipper.clip_(metrics=metrics_of_rank(dist.get_rank()))
    return _untouched(model, before)


def _integer_tokens_on_rank_1(rank):
    return {"tokens": distclip.Sum(torch.tensor(5) if rank == 1 else torch.tensor(5.0))}


def test_a_bad_metric_value_on_one_rank_raises_on_every_rank(ranks):
    match = "`metrics` values must be 0-dim floating-point tensors"
    assert ranks(2).run(_metrics_raise_on_every_rank, _integer_tokens_on_rank_1, match) == [True, True]


def _other_name_on_rank_1(rank):
    return {"tokens" if rank == 0 else "samples": distclip.Sum(torch.tensor(5.0))}


def test_metrics_passed_under_other_names_on_another_rank_raise_on_every_rank(ranks):
    assert ranks(2).run(_metrics_raise_on_every_rank, _other_name_on_rank_1, "other names or kinds") == [True, True]


# -- a mesh without this rank ------------------------------------------------------------


def _mesh_without_some_ranks():
    """World 4: a DTensor on a mesh of ranks 0 and 1, passed on every rank (ranks 2 and 3 hold
    an empty local tensor), beside plain tensors that are each rank's own."""
    pair = DeviceMesh("cpu", [0, 1])
    full = torch.arange(12.0) - 5
    sharded = distribute_tensor(full, pair, [Shard(0)])
    plain = torch.full((3,), float(dist.get_rank() + 1))
    alone = dist.new_subgroups(group_size=1)[0]
    expected = torch.linalg.vector_norm(torch.cat([full.double()] + [torch.full((3,), r + 1.0).double() for r in range(4)]))
    with collectives() as issued:
        norm = distclip.get_total_norm([sharded, plain], replica_group=alone)
    explained = distclip.explain([_with_grad(sharded), _with_grad(plain)], replica_group=alone)
    assert_close_norm(norm.item(), expected.item(), 2.0)
    assert issued == ["gloo:all_reduce"], issued
    return [(row.counted, row.note) for row in explained]


def _with_grad(grad):
    param = nn.Parameter(torch.zeros_like(grad))
    param.grad = grad
    return param


def test_a_dtensor_on_a_mesh_without_this_rank_counts_nothing_here(ranks):
    rows = ranks(4).run(_mesh_without_some_ranks)
    assert [row[0] for row in rows[2]] == [0, 3] and rows[2][0][1] == distclip.explain.__globals__["OUTSIDE_MESH"]
    assert [row[0] for row in rows[0]] == [6, 3] and rows[0][0][1] is None


# -- the accelerator's rule, on the CPU ---------------------------------------------------


def _model_with_a_sparse_gradient_on_rank_1() -> nn.Module:
    """This rank's model; rank 1's also holds a sparse gradient (a problem only it can see)."""
    model = _model(dist.get_rank())
    if dist.get_rank() == 1:
        embedding = nn.Embedding(10, 4, sparse=True)
        embedding(torch.tensor([1, 2])).sum().backward()
        model.embedding = embedding
    return model


def _deferred_problem(api):
    """Rank 1 holds a sparse gradient (its own problem); rank 0 cannot see it.  Under the
    accelerator's rule rank 1 raises at once, rank 0 gets a NaN norm and untouched gradients,
    and both raise at the next call over the group."""
    alone = dist.new_subgroups(group_size=1)[0]
    model = _model_with_a_sparse_gradient_on_rank_1()
    before = [p.grad.clone() for p in model.parameters()]
    outcome = []
    with deferred():
        try:
            if api == "functional":
                norm = distclip.get_total_norm([p.grad for p in model.parameters()], replica_group=alone)
                distclip.clip_grads_with_norm_(model.parameters(), 0.1, norm)
            else:
                norm = distclip.GradClipper(model, 0.1, replica_group=alone, nonfinite="skip").clip_().total_norm
            outcome.append(("returned", bool(norm.isnan())))
        except ValueError as error:
            outcome.append(("raised", "not a dense" in str(error)))
        outcome.append(("untouched", all(torch.equal(p.grad.to_dense() if p.grad.is_sparse else p.grad,
                                                   b.to_dense() if b.is_sparse else b)
                                          for p, b in zip(model.parameters(), before))))
        try:
            distclip.get_total_norm([torch.ones(2)], replica_group=alone)  # the next call over WORLD
            outcome.append(("next call", "returned"))
        except ValueError as error:
            outcome.append(("next call", "previous distclip reduction" in str(error) and "not a dense" in str(error)))
    return outcome


@pytest.mark.parametrize("api", ["functional", "clipper"])
def test_on_an_accelerator_a_problem_is_raised_on_every_rank_at_the_next_call(ranks, api):
    rank0, rank1 = ranks(2).run(_deferred_problem, api)
    assert rank0 == [("returned", True), ("untouched", True), ("next call", True)]
    assert rank1 == [("raised", True), ("untouched", True), ("next call", True)]


# -- found by review: raising beside Partial gradients; the accelerator rule's corners -----


def _partial_beside_groups_raising_on_one_rank():
    """A Partial(sum) gradient (its reduction is a collective before the norm's) beside a groups
    callable raising on rank 1 alone: the same error on both ranks, no collective mismatch."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Partial, Replicate

    mesh = init_device_mesh("cpu", (2,))
    model = nn.Module()
    model.norm_weight = nn.Parameter(distribute_tensor(torch.ones(8), mesh, [Replicate()]))
    model.plain = nn.Parameter(torch.ones(4))
    model.norm_weight.grad = DTensor.from_local(torch.full((8,), float(dist.get_rank() + 1)), mesh, [Partial()])
    model.plain.grad = torch.full((4,), 0.5)

    def group_of(name, _):
        if dist.get_rank() == 1:
            raise KeyError(f"no group for {name}")
        return name

    with pytest.raises(KeyError, match="no group for"):
        distclip.GradClipper(model, 1.0, groups=group_of).clip_()


def test_a_groups_callable_raising_beside_partial_gradients_raises_on_every_rank(ranks):
    ranks(2).run(_partial_beside_groups_raising_on_one_rank)


def _deferred_invalid_step(api):
    """Under the accelerator's rule, a step another rank found a problem in is not mistaken for
    a non-finite norm (whose error path gathers, and would wait for the rank that raised)."""
    alone = dist.new_subgroups(group_size=1)[0]
    model = _model_with_a_sparse_gradient_on_rank_1()
    outcome = []
    with deferred():
        try:
            if api == "error_if_nonfinite":
                distclip.clip_grad_norm_(model, 0.1, error_if_nonfinite=True, replica_group=alone)
            else:
                distclip.GradClipper(model, 0.1, replica_group=alone, nonfinite="error").clip_()
            outcome.append("returned")
        except ValueError as error:
            outcome.append("not a dense" in str(error))
        except RuntimeError as error:  # the non-finite error: the wrong one
            outcome.append(str(error)[:80])
        try:
            distclip.get_total_norm([torch.ones(2)], replica_group=alone)
            outcome.append("next call returned")
        except ValueError as error:
            outcome.append("not a dense" in str(error))
    return outcome


@pytest.mark.parametrize("api", ["error_if_nonfinite", "nonfinite=error"])
def test_on_an_accelerator_another_ranks_problem_is_no_nonfinite_error(ranks, api):
    rank0, rank1 = ranks(2).run(_deferred_invalid_step, api)
    assert rank0 == ["returned", True] and rank1 == [True, True], (rank0, rank1)


def _relayout_beside_a_raise():
    """Under the accelerator's rule: at one step both stages add a module (new group names) and
    rank 1's groups callable raises.  Every rank keeps the request to agree again, so the
    steps after the error agree together (no rank agrees alone)."""
    alone = dist.new_subgroups(group_size=1)[0]
    torch.manual_seed(dist.get_rank())
    stage = nn.Sequential(nn.Linear(4, 4))
    fail = {"now": False}

    def group_of(name, _):
        if fail["now"] and dist.get_rank() == 1:
            raise KeyError("no group")
        return name.split(".")[0]

    clipper = distclip.GradClipper(stage, 1e9, replica_group=alone, groups=group_of)
    seen = []
    with deferred():
        for step in range(4):
            if step == 1:
                stage.append(nn.Linear(4, 4))
            fail["now"] = step == 1
            stage.zero_grad()
            stage(torch.ones(2, 4)).sum().backward()
            try:
                seen.append(sorted(clipper.clip_().all_group_norms))
            except (KeyError, ValueError) as error:
                seen.append(type(error).__name__)
    return seen


def test_on_an_accelerator_names_are_agreed_together_after_a_raise(ranks):
    rank0, rank1 = ranks(2).run(_relayout_beside_a_raise)
    assert rank1[:3] == [["0"], "KeyError", "KeyError"] and rank0[0] == ["0"] and rank0[2] == "KeyError", (rank0, rank1)
    assert rank0[3] == rank1[3] == ["0", "1"], (rank0, rank1)
