"""GradClipper(overlap=True): partials taken during backward give the normal pass's norm, are
used only for gradients whose hook saw them final (their copies agreeing) and that are provably
unchanged since, and the step takes the normal pass otherwise.

Every step is checked against the float64 reference of the full gradients; ``steps_used``
(every partial came from backward), ``steps_fallen_back`` (a gradient changed after its hook)
and ``steps_unproven`` (a gradient no hook proves final) say which path the step took."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import distribute_module
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module
from torch.nn.parallel import DistributedDataParallel as DDP

import distclip
from models import backward, batch, build, shard_layers, wrap
from reference import NoHostSync, assert_close_norm, clipper_step, collectives, full_grads, named_param_grads, reference_norm

NORM_TYPES = [2.0, 1.0, math.inf, -math.inf, 0.0]


def _reference(model, norm_type) -> float:
    return reference_norm(full_grads(named_param_grads(model.named_parameters())), norm_type)


def _steps(model, clipper, norm_type, steps=3, micro_batches=1, sync=None):
    """``steps`` training steps of ``micro_batches`` backward passes each; every clip checked
    against the reference.  ``sync(model, flag)`` turns gradient synchronisation on or off."""
    norms = []
    for step in range(steps):
        model.zero_grad(set_to_none=True)
        for micro in range(micro_batches):
            if sync is not None:
                sync(model, micro == micro_batches - 1)
            backward(model, batch(dist.get_rank() if dist.is_initialized() else 0, seed=100 * step + micro))
        expected = _reference(model, norm_type) if dist.is_initialized() else None
        with collectives() as issued:
            result = clipper.clip_()
        if expected is not None:
            assert_close_norm(result.total_norm.item(), expected, norm_type, rtol=1e-6)
            assert issued == clipper_step(first=step == 0), issued
        norms.append(result.total_norm.item().hex())
    return norms


@pytest.mark.parametrize("norm_type", NORM_TYPES)
def test_partials_from_backward_give_the_normal_pass_norm_and_gradients(norm_type):
    ours, theirs = build(), build()
    overlapped = distclip.GradClipper(ours, max_norm=0.05, norm_type=norm_type, overlap=True)
    normal = distclip.GradClipper(theirs, max_norm=0.05, norm_type=norm_type)
    for step in range(3):
        for model in (ours, theirs):
            model.zero_grad(set_to_none=True)
            backward(model, batch(0, seed=step))
        expected = reference_norm({n: p.grad.double() for n, p in ours.named_parameters()}, norm_type)
        result = overlapped.clip_()
        assert_close_norm(result.total_norm.item(), expected, norm_type, rtol=1e-6)
        torch.testing.assert_close(result.total_norm, normal.clip_().total_norm, rtol=1e-6, atol=0)
        for a, b in zip(ours.parameters(), theirs.parameters()):
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-6, atol=0)
    # The first backward had no plan to take partials under; the two after it had.
    assert overlapped.backward_partials.steps_used == 2
    assert overlapped.backward_partials.steps_fallen_back == 0


@pytest.mark.parametrize("norm_type", [2.0, math.inf, 0.0])
def test_per_group_norms_from_backward_equal_the_normal_pass(norm_type):
    ours, theirs = build(), build()
    overlapped = distclip.GradClipper(ours, max_norm=0.05, norm_type=norm_type, groups="modules", overlap=True)
    normal = distclip.GradClipper(theirs, max_norm=0.05, norm_type=norm_type, groups="modules")
    for step in range(2):
        for model in (ours, theirs):
            model.zero_grad(set_to_none=True)
            backward(model, batch(0, seed=step))
        mine, reference = overlapped.clip_().group_norms, normal.clip_().group_norms
        assert list(mine) == list(reference) == ["layers", "norm", "head"]
        for name in reference:
            torch.testing.assert_close(mine[name], reference[name], rtol=1e-6, atol=0)
    assert overlapped.backward_partials.steps_used == 1


def test_a_gradient_edited_after_backward_is_normed_as_edited():
    model = build()
    clipper = distclip.GradClipper(model, max_norm=1e9, overlap=True)
    for step in range(2):
        model.zero_grad(set_to_none=True)
        backward(model, batch(0, seed=step))
        if step == 1:
            model.layers[0].weight.grad.mul_(3.0)  # after its partial was taken
        expected = reference_norm({n: p.grad.double() for n, p in model.named_parameters()}, 2.0)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            result = clipper.clip_()
        assert_close_norm(result.total_norm.item(), expected, 2.0, rtol=1e-6)
    assert clipper.backward_partials.steps_fallen_back == 1
    assert [str(w.message) for w in caught if "overlap" in str(w.message)], "no warning for the fallback"


def test_a_frozen_layer_is_watched_from_the_step_after_it_is_unfrozen():
    model = build()
    model.layers[0].weight.requires_grad_(False)  # a frozen base layer: torch takes no hook on it
    clipper = distclip.GradClipper(model, max_norm=1e9, overlap=True)
    for step in range(4):
        if step == 1:
            model.layers[0].weight.requires_grad_(True)
        model.zero_grad(set_to_none=True)
        backward(model, batch(0, seed=step))
        expected = reference_norm({n: p.grad.double() for n, p in model.named_parameters() if p.grad is not None}, 2.0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the step the unfrozen layer's gradient has no partial
            result = clipper.clip_()
        assert_close_norm(result.total_norm.item(), expected, 2.0, rtol=1e-6)
    # Step 0 had no plan; step 1 normed the newly unfrozen gradient by the normal pass.
    assert clipper.backward_partials.steps_used == 2


def test_accumulated_micro_batches_use_the_partial_of_the_final_gradient():
    model = build()
    clipper = distclip.GradClipper(model, max_norm=1e9, overlap=True)
    for step in range(3):
        model.zero_grad(set_to_none=True)
        for micro in range(3):  # the hook runs after each accumulation; the last one is final
            backward(model, batch(0, seed=10 * step + micro))
        expected = reference_norm({n: p.grad.double() for n, p in model.named_parameters()}, 2.0)
        assert_close_norm(clipper.clip_().total_norm.item(), expected, 2.0, rtol=1e-6)
    assert clipper.backward_partials.steps_used == 2


def _fsdp2_overlap(mesh_shape, norm_type, micro_batches):
    model = build()
    names = ("shard",) if len(mesh_shape) == 1 else ("replicate", "shard")  # 2-D: HSDP
    shard_layers(model, init_device_mesh("cpu", mesh_shape, mesh_dim_names=names))
    clipper = distclip.GradClipper(model, max_norm=0.05, norm_type=norm_type, overlap=True)
    sync = (lambda m, flag: m.set_requires_gradient_sync(flag)) if micro_batches > 1 else None
    norms = _steps(model, clipper, norm_type, micro_batches=micro_batches, sync=sync)
    assert clipper.backward_partials.steps_used == 2, "FSDP2's gradients were not taken during backward"
    assert clipper.backward_partials.steps_fallen_back == 0
    return norms


@pytest.mark.parametrize("norm_type", [2.0, math.inf, -math.inf, 0.0])
@pytest.mark.parametrize("mesh_shape,world_size", [((2,), 2), ((2, 2), 4)], ids=["fsdp2", "hsdp"])
def test_fsdp2_gradients_are_taken_during_backward_exactly(ranks, mesh_shape, world_size, norm_type):
    per_rank = ranks(world_size).run(_fsdp2_overlap, mesh_shape, norm_type, 1)
    assert all(norms == per_rank[0] for norms in per_rank)


def test_fsdp2_gradient_accumulation_counts_only_the_synchronised_micro_batch(ranks):
    per_rank = ranks(2).run(_fsdp2_overlap, (2,), 2.0, 3)
    assert per_rank[0] == per_rank[1]


def _tensor_parallel_overlap(dp, tp, layer_norm):
    """Tensor parallel (ColwiseParallel / RowwiseParallel DTensors, whose gradients autograd
    writes), under FSDP2 on dp when dp > 1.  The LayerNorm is copied over tp: as a ``Replicate``
    DTensor (copies its placements promise) or as plain tensors (copies by ``replica_group``:
    Megatron's sequence parallelism all-reduces those after backward, so no hook proves them)."""
    mesh = init_device_mesh("cpu", (dp, tp), mesh_dim_names=("dp", "tp"))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 8), nn.LayerNorm(8))
    replicated = layer_norm == "replicated DTensor"
    parallelize_module(model, mesh["tp"], {"0": ColwiseParallel(), "2": RowwiseParallel(use_local_output=not replicated)})
    if replicated:
        distribute_module(model[3], mesh["tp"], output_fn=lambda module, output, mesh: output.to_local())
    if dp > 1:
        fully_shard(model, mesh=mesh["dp"])
    clipper = distclip.GradClipper(model, max_norm=0.05, overlap=True)
    norms = []
    for step in range(3):
        model.zero_grad(set_to_none=True)
        x = torch.randn(2, 2 * tp, 8, generator=torch.Generator().manual_seed(10 * step + mesh["dp"].get_local_rank()))
        (model(x) ** 2).mean().backward()
        expected = _reference(model, 2.0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # plain: the warning for an unproven plan
            result = clipper.clip_()
        assert_close_norm(result.total_norm.item(), expected, 2.0, rtol=1e-6)
        norms.append(result.total_norm.item().hex())
    return norms, (clipper.backward_partials.steps_used, clipper.backward_partials.steps_unproven)


@pytest.mark.parametrize("layer_norm,paths", [("replicated DTensor", (2, 0)), ("plain", (0, 3))])
@pytest.mark.parametrize("dp,tp", [(1, 2), (2, 2)], ids=["tp2", "fsdp2xtp2"])
def test_tensor_parallel_gradients_are_taken_during_backward_where_their_copies_are_dtensors(
    ranks, dp, tp, layer_norm, paths
):
    per_rank = ranks(dp * tp).run(_tensor_parallel_overlap, dp, tp, layer_norm)
    assert all(norms == per_rank[0][0] for norms, _ in per_rank)
    assert all(taken == paths for _, taken in per_rank), per_rank


def _ddp_overlap(bucket_view):
    model = DDP(build(), gradient_as_bucket_view=bucket_view)
    clipper = distclip.GradClipper(model, max_norm=0.05, overlap=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        norms = _steps(model, clipper, 2.0)
    used, fallen_back = clipper.backward_partials.steps_used, clipper.backward_partials.steps_fallen_back
    warned = len([w for w in caught if "overlap=True" in str(w.message)])
    return norms, (used, fallen_back, warned)


def test_ddp_bucket_views_are_taken_after_their_all_reduce(ranks):
    per_rank = ranks(2).run(_ddp_overlap, True)
    assert per_rank[0][0] == per_rank[1][0]
    assert all(paths == (2, 0, 0) for _, paths in per_rank), per_rank


def test_ddp_without_bucket_views_takes_the_normal_pass_exactly_with_one_warning(ranks):
    # DDP copies each all-reduced bucket into the gradients after the hook: a version bump.
    per_rank = ranks(2).run(_ddp_overlap, False)
    assert per_rank[0][0] == per_rank[1][0]
    assert all(paths == (0, 2, 1) for _, paths in per_rank), per_rank


def _ddp_with_its_own_comm_hook():
    model = DDP(build())
    model.register_comm_hook(None, allreduce_hook)
    with pytest.warns(UserWarning, match="cannot hook this DDP module"):
        clipper = distclip.GradClipper(model, max_norm=0.05, overlap=True)
    return _steps(model, clipper, 2.0)


def test_a_ddp_module_with_a_comm_hook_of_its_own_keeps_it_and_is_exact(ranks):
    per_rank = ranks(2).run(_ddp_with_its_own_comm_hook)
    assert per_rank[0] == per_rank[1]


def _fsdp2_overlap_without_host_sync():
    model = wrap(build(), "fsdp2")
    clipper = distclip.GradClipper(model, max_norm=0.05, overlap=True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for step in range(3):
        model.zero_grad(set_to_none=True)
        backward(model, batch(dist.get_rank()))
        with NoHostSync(host_data=step > 0):
            clipper.clip_()
    with NoHostSync(host_data=True):  # backward too: the hooks run inside it
        model.zero_grad(set_to_none=True)
        backward(model, batch(dist.get_rank()))
        result = clipper.clip_()
    optimizer.step()
    assert clipper.backward_partials.steps_used == 3
    return result.total_norm.item().hex()


def test_overlap_never_waits_for_the_device(ranks):
    per_rank = ranks(2).run(_fsdp2_overlap_without_host_sync)
    assert per_rank[0] == per_rank[1]


def test_fsdp1_models_get_a_warning_and_the_normal_pass(ranks):
    ranks(2).run(_fsdp1_overlap_warns)


def _fsdp1_overlap_warns():
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    model = FSDP(build(), device_id=torch.device("cpu"), use_orig_params=True)
    with pytest.warns(UserWarning, match="no effect on FSDP1"):
        clipper = distclip.GradClipper(model, max_norm=1e9, overlap=True)
    backward(model, batch(dist.get_rank()))
    with FSDP.summon_full_params(model, with_grads=True):
        expected = reference_norm({n: p.grad.double().clone() for n, p in model.named_parameters()}, 2.0)
    assert_close_norm(clipper.clip_().total_norm.item(), expected, 2.0, rtol=1e-6)
    assert clipper.backward_partials is None


# -- gradients that a collective of the user's may still change after backward ---------------
# c10d collectives and writes through ``.data`` do not bump a tensor's version counter, so no
# check at the step can see them: a partial taken in a hook counts only where distclip proves
# its gradient final (distclip.overlap's rule).


def _average_gradients(model, form):
    """Manual data parallel, as users write it after backward."""
    world = dist.get_world_size()
    for param in model.parameters():
        if form == "all_reduce(p.grad), loss / world":
            dist.all_reduce(param.grad)
        elif form == "all_reduce(p.grad), p.grad /= world":
            dist.all_reduce(param.grad)
            param.grad /= world
        else:  # the tutorial's form ("Writing Distributed Applications with PyTorch")
            dist.all_reduce(param.grad.data)
            param.grad.data /= world


def _clip_both_ways(models, named, backward_step, options=lambda model: {}, overlap=True, steps=3):
    """Two identical models, their gradients made alike by ``backward_step(model, step)``; one
    clipped with ``overlap``, the other without.  Every step the overlapped clip is checked
    against the float64 reference (``named(model)``: name -> gradient, copies named alike) and
    against the clip without overlap, norm and gradients; ``options(model)``: more arguments of
    the clippers.  Returns the norms and ``(steps_used, steps_unproven, warnings that name the
    opt-in)``."""
    ours, theirs = models
    overlapped = distclip.GradClipper(ours, max_norm=0.05, overlap=overlap, **options(ours))
    normal = distclip.GradClipper(theirs, max_norm=0.05, **options(theirs))
    norms, warned = [], 0
    for step in range(steps):
        for model in (ours, theirs):
            model.zero_grad(set_to_none=True)
            backward_step(model, step)
        expected = reference_norm(full_grads(named(ours)), 2.0)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            mine = overlapped.clip_()
        warned += len([w for w in caught if "pass overlap='assume_final'" in str(w.message)])
        assert_close_norm(mine.total_norm.item(), expected, 2.0, rtol=1e-6)
        torch.testing.assert_close(mine.total_norm, normal.clip_().total_norm, rtol=1e-6, atol=0)
        for a, b in zip(ours.parameters(), theirs.parameters()):
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-6, atol=0)
        norms.append(mine.total_norm.item().hex())
    partials = overlapped.backward_partials
    return norms, (partials.steps_used, partials.steps_unproven, warned)


def _manual_data_parallel(form):
    rank, world = dist.get_rank(), dist.get_world_size()

    def backward_step(model, step):
        loss = (model(batch(rank, seed=step)) ** 2).mean()
        (loss / world if form.endswith("loss / world") else loss).backward()
        _average_gradients(model, form)

    return _clip_both_ways((build(), build()), lambda m: named_param_grads(m.named_parameters()), backward_step)


@pytest.mark.parametrize(
    "form", ["all_reduce(p.grad), loss / world", "all_reduce(p.grad), p.grad /= world", "p.grad.data"]
)
def test_gradients_averaged_by_the_user_after_backward_take_the_normal_pass(ranks, form):
    per_rank = ranks(2).run(_manual_data_parallel, form)
    assert per_rank[0][0] == per_rank[1][0]
    # Plain gradients copied on the other rank: no hook of distclip's sees them final.  Every
    # step takes the normal pass, and the first one says why.
    assert all(paths == (0, 3, 1) for _, paths in per_rank), per_rank


class _Stage(nn.Module):
    """A pipeline stage of a model whose first and last stage share a tied embedding
    (Megatron's): stage 0 looks tokens up in ``tied``, stage 1 projects onto it."""

    def __init__(self, stage: int) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.tied = nn.Parameter(torch.randn(10, 8))
        torch.manual_seed(1 + stage)
        self.own = nn.Linear(8, 8)
        self.stage = stage

    def forward(self, step: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(step)
        if self.stage == 0:
            return self.own(nn.functional.embedding(torch.randint(10, (6,), generator=generator), self.tied))
        return nn.functional.linear(torch.tanh(self.own(torch.randn(6, 8, generator=generator))), self.tied)


def _tied_embedding():
    stage = dist.get_rank()
    embedding_group = dist.new_group([0, 1])  # Megatron's embedding group: the first and last stage

    def backward_step(model, step):
        (model(step) ** 2).mean().backward()
        dist.all_reduce(model.tied.grad, group=embedding_group)  # the tied gradients summed

    def named(model):  # the stages' own parameters are different tensors: different names
        return [(name if name == "tied" else f"stage{stage}.{name}", p.grad) for name, p in model.named_parameters()]

    def copy_groups(model):
        return {"replica_group": lambda p: embedding_group if p is model.tied else None}

    return _clip_both_ways((_Stage(stage), _Stage(stage)), named, backward_step, copy_groups)


def test_a_tied_embedding_summed_by_the_user_after_backward_takes_the_normal_pass(ranks):
    per_rank = ranks(2).run(_tied_embedding)
    assert per_rank[0][0] == per_rank[1][0]
    assert all(paths == (0, 3, 1) for _, paths in per_rank), per_rank


def _replicas_final_at_backward(overlap):
    """Plain gradients copied on both ranks and final when backward writes them: every rank
    computes the same batch (as a tensor-parallel LayerNorm sees the same input on every tp
    rank) and no collective follows."""

    def backward_step(model, step):
        backward(model, batch(0, seed=step))

    models = (build(), build())
    return _clip_both_ways(models, lambda m: named_param_grads(m.named_parameters()), backward_step, overlap=overlap)


@pytest.mark.parametrize("overlap,paths", [(True, (0, 3, 1)), ("assume_final", (2, 0, 0))])
def test_assume_final_takes_copied_gradients_during_backward_on_the_users_word(ranks, overlap, paths):
    per_rank = ranks(2).run(_replicas_final_at_backward, overlap)
    assert per_rank[0][0] == per_rank[1][0]
    assert all(taken == paths for _, taken in per_rank), per_rank


@pytest.mark.parametrize("overlap", ["yes", "trust", 1.0, None])
def test_an_unknown_overlap_setting_is_refused_naming_the_allowed_ones(overlap):
    with pytest.raises(ValueError, match=r"overlap must be False, True or 'assume_final', got"):
        distclip.GradClipper(build(), overlap=overlap)


def _pipeline_stages_without_copies():
    stage = dist.get_rank()

    def backward_step(model, step):
        (model(step) ** 2).mean().backward()

    def named(model):  # untied: every parameter is its stage's own
        return [(f"stage{stage}.{name}", p.grad) for name, p in model.named_parameters()]

    return _clip_both_ways((_Stage(stage), _Stage(stage)), named, backward_step, lambda m: {"replica_group": lambda p: None})


def test_pipeline_stages_whose_gradients_have_no_copies_take_their_partials_during_backward(ranks):
    # Each rank alone in every copy group: no collective over copies can come after backward.
    per_rank = ranks(2).run(_pipeline_stages_without_copies)
    assert all(paths == (2, 0, 0) for _, paths in per_rank), per_rank
