"""Per-group and per-parameter norms combine by name, never by position: exact under DDP, FSDP2,
tensor parallel and pipeline stages that hold different groups (each stage reports its own,
every rank can read all), names cleaned of wrapper prefixes, from one all-reduce per step after
the first step's agreement; a group new on one rank is reported from the next step on."""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

import distclip
from models import NORM_TYPES, MLP, backward, batch, build, shard_layers
from reference import assert_close_norm, by_case, clipper_step, collectives, every_case, full_grads, reference_norm

MLP_PARAMETERS = [f"layers.{i}.{kind}" for i in range(3) for kind in ("weight", "bias")] + [
    "norm.weight", "norm.bias", "head.weight", "head.bias"]


def _per_parameter(norm_type, kind):
    """Every parameter's global norm by its qualified name, against the float64 norm of its full
    gradient, under DDP or FSDP2 (shards summed, copies once)."""
    model = build()
    wrapped = DDP(model) if kind == "ddp" else shard_layers(model)
    clipper = distclip.GradClipper(wrapped, max_norm=1e9, norm_type=norm_type, groups="parameters")
    results = []
    for step in range(2):
        model.zero_grad(set_to_none=True)
        backward(wrapped, batch(dist.get_rank(), seed=step))
        full = full_grads([(n, p.grad) for n, p in model.named_parameters()])
        with collectives() as issued:
            result = clipper.clip_()
        assert issued == (clipper_step(first=step == 0) if norm_type not in (math.inf, -math.inf)
                          else clipper_step(first=step == 0) + [f"gloo:all_reduce"]), issued
        assert list(result.group_norms) == MLP_PARAMETERS
        for name, norm in result.group_norms.items():
            assert_close_norm(norm.item(), reference_norm({name: full[name]}, norm_type), norm_type)
        assert_close_norm(result.total_norm.item(), reference_norm(full, norm_type), norm_type)
        results.append([norm.item().hex() for norm in result.group_norms.values()])
    return results


@pytest.mark.parametrize("kind", ["ddp", "fsdp2"])
def test_every_parameters_norm_by_its_clean_name(ranks, kind):
    for norm_type, per_rank in by_case(ranks(2).run(every_case, _per_parameter, NORM_TYPES, kind)).items():
        assert per_rank[0] == per_rank[1], norm_type


class Stage(nn.Module):
    """A pipeline stage: its own blocks, other names (and another count) on each stage."""

    def __init__(self, names: list[str]) -> None:
        super().__init__()
        for name in names:
            self.add_module(name, nn.Linear(6, 6))

    def forward(self, x):
        for module in self.children():
            x = torch.tanh(module(x))
        return x


STAGES = [["embed", "block0"], ["block1", "block2", "head"]]


def _stage_groups(groups):
    """World 2, rank r is stage r (no copies): every rank's groups are its own stage's modules
    (or parameters); every rank reads all of them, exact, from one all-reduce per step."""
    alone = dist.new_subgroups(group_size=1)[0]
    torch.manual_seed(dist.get_rank())
    stage = Stage(STAGES[dist.get_rank()])
    clipper = distclip.GradClipper(stage, max_norm=1e9, replica_group=alone, groups=groups)
    outcome = []
    for step in range(2):
        stage.zero_grad(set_to_none=True)
        stage(torch.randn(4, 6, generator=torch.Generator().manual_seed(step))).square().mean().backward()
        mine = {name: p.grad.double() for name, p in stage.named_parameters()}
        everyone = full_grads(mine.items())  # the stages' names differ: the union of both
        with collectives() as issued:
            result = clipper.clip_()
        assert issued == clipper_step(first=step == 0), issued
        prefix = (lambda name: name.split(".")[0]) if groups == "modules" else (lambda name: name)
        expected = {}
        for name, grad in everyone.items():
            expected.setdefault(prefix(name), {})[name] = grad
        assert set(result.all_group_norms) == set(expected)
        assert set(result.group_norms) == {prefix(name) for name in mine}
        for name, members in expected.items():
            assert_close_norm(result.all_group_norms[name].item(), reference_norm(members, 2.0), 2.0)
        outcome.append({name: norm.item().hex() for name, norm in result.all_group_norms.items()})
    return outcome


@pytest.mark.parametrize("groups", ["modules", "parameters"])
def test_pipeline_stages_report_their_own_groups_and_every_rank_reads_all(ranks, groups):
    per_rank = ranks(2).run(_stage_groups, groups)
    assert per_rank[0] == per_rank[1]


def _new_group_on_one_rank():
    """Stage 0 gets an adapter at step 1: its group is NaN that step (the layout lacks it; the
    total stays exact), and exact from step 2 on, on every rank."""
    alone = dist.new_subgroups(group_size=1)[0]
    torch.manual_seed(dist.get_rank())
    stage = Stage(STAGES[dist.get_rank()])
    clipper = distclip.GradClipper(stage, max_norm=1e9, replica_group=alone, groups="modules")
    seen = []
    for step in range(3):
        if step == 1 and dist.get_rank() == 0:
            stage.add_module("adapter", nn.Linear(6, 6))
        stage.zero_grad(set_to_none=True)
        stage(torch.randn(4, 6, generator=torch.Generator().manual_seed(step))).square().mean().backward()
        everyone = full_grads([(n, p.grad) for n, p in stage.named_parameters()])
        result = clipper.clip_()
        assert_close_norm(result.total_norm.item(), reference_norm(everyone, 2.0), 2.0)
        adapter = result.all_group_norms.get("adapter")
        expected = reference_norm({n: g for n, g in everyone.items() if n.startswith("adapter.")}, 2.0)
        seen.append(None if adapter is None else ("nan" if math.isnan(adapter.item()) else adapter.item() == pytest.approx(expected)))
    return seen


def test_a_group_new_on_one_rank_is_reported_from_the_next_step(ranks):
    for seen in ranks(2).run(_new_group_on_one_rank):
        assert seen == [None, None, True], seen


def test_a_groups_callable_groups_by_transformer_block():
    model = _with_grads(MLP(depth=4))
    expected = [torch.linalg.vector_norm(torch.cat([p.grad.double().flatten() for p in layer.parameters()])) for layer in model.layers]
    result = distclip.GradClipper(model, groups=lambda name, _: name.split(".")[1] if name.startswith("layers") else None).clip_()
    assert list(result.group_norms) == ["0", "1", "2", "3"]
    for i in range(4):
        assert result.group_norms[str(i)].item() == pytest.approx(expected[i].item(), rel=1e-6)


def _with_grads(model):
    torch.manual_seed(0)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    return model
