"""Per-parameter copy groups: Megatron-/DeepSpeed-style models of plain tensors, with the process
groups built by ``new_group`` as Megatron builds them.

Every rank computes the full model's gradient for its data-parallel batch and sums it over its
data-parallel group (what DDP/Megatron's gradient all-reduce does), then keeps the pieces its
position holds: vocabulary- and column/row-split slices of the tensor-parallel weights, whole
TP-duplicated LayerNorms, biases and routers, its experts, and the tied embedding on the first
and last pipeline stage.  Pieces are named so that copies share a name and distinct tensors do
not; the float64 reference is the norm of the distinct pieces, which is the full model's norm
(checked against the unsplit model).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import distclip
from models import build
from reference import (
    assert_close_norm,
    assert_same_on_all_ranks,
    clip_and_check,
    full_grads,
    named_param_grads,
    reference_norm,
)

NORM_TYPES = [2.0, 1.0, math.inf, -math.inf, 0.0]
VOCAB, WIDTH, HIDDEN, EXPERTS = 12, 8, 12, 4


class Block(nn.Module):
    """Pre-norm MLP (fc1 column-parallel, fc2 row-parallel in TP) and a dense-gated MoE."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(WIDTH)
        self.fc1 = nn.Linear(WIDTH, HIDDEN)
        self.fc2 = nn.Linear(HIDDEN, WIDTH)
        self.router = nn.Linear(WIDTH, EXPERTS, bias=False)
        self.experts = nn.ModuleList(nn.Linear(WIDTH, WIDTH) for _ in range(EXPERTS))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)
        x = x + self.fc2(F.gelu(self.fc1(h)))
        gate = torch.softmax(self.router(h), dim=-1)
        return x + sum(gate[..., e : e + 1] * expert(h) for e, expert in enumerate(self.experts))


class TiedGPT(nn.Module):
    """Two blocks between an embedding and an output layer that start equal: the tied word
    embedding as pipeline stages hold it (the first stage's input, the last stage's output)."""

    def __init__(self) -> None:
        super().__init__()
        self.embedding = nn.Parameter(torch.randn(VOCAB, WIDTH))
        self.blocks = nn.ModuleList(Block() for _ in range(2))
        self.final_norm = nn.LayerNorm(WIDTH)
        self.output = nn.Parameter(self.embedding.detach().clone())

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embedding[tokens]
        for block in self.blocks:
            x = block(x)
        return self.final_norm(x) @ self.output.t()


@dataclass(frozen=True)
class Position:
    """A rank's place in a Megatron grid (order tp-dp-pp: tp fastest) and its groups.

    ``dp`` are the data-parallel groups of dense weights; experts are spread over ``ep`` ranks of
    a stage's dp x tp ranks (rank-contiguous), copied over the ``dp * tp / ep`` others.
    """

    tp: int
    dp: int
    pp: int
    ep: int

    @property
    def world(self) -> int:
        return self.tp * self.dp * self.pp

    def coords(self, rank: int) -> tuple[int, int, int]:
        """(tp_rank, dp_rank, stage)."""
        return rank % self.tp, rank // self.tp % self.dp, rank // (self.tp * self.dp)

    def rank(self, tp_rank: int, dp_rank: int, stage: int) -> int:
        return tp_rank + self.tp * (dp_rank + self.dp * stage)


def _megatron_groups(grid: Position) -> dict[str, object]:
    """This rank's groups, every group created on every rank in one order (``new_group`` is
    collective), as Megatron's ``initialize_model_parallel`` does."""
    rank = dist.get_rank()
    tp_rank, dp_rank, stage = grid.coords(rank)
    candidates: dict[str, list[list[int]]] = {"dp": [], "dp_tp": [], "embedding": [], "tied": [], "edp": []}
    for s in range(grid.pp):
        for t in range(grid.tp):
            candidates["dp"].append([grid.rank(t, d, s) for d in range(grid.dp)])
        stage_ranks = [grid.rank(t, d, s) for d in range(grid.dp) for t in range(grid.tp)]
        candidates["dp_tp"].append(sorted(stage_ranks))
        per_ep = grid.ep
        for e in range(per_ep):
            candidates["edp"].append(sorted(stage_ranks)[e::per_ep])
    for t in range(grid.tp):
        for d in range(grid.dp):
            candidates["embedding"].append(sorted({grid.rank(t, d, 0), grid.rank(t, d, grid.pp - 1)}))
        candidates["tied"].append(
            sorted({grid.rank(t, d, s) for d in range(grid.dp) for s in (0, grid.pp - 1)})
        )
    mine = {}
    for kind, lists in candidates.items():
        for ranks in lists:
            group = dist.new_group(ranks)
            if rank in ranks:
                mine[kind] = group
    return mine


def _tokens(dp_rank: int) -> torch.Tensor:
    return torch.randint(0, VOCAB, (4, 6), generator=torch.Generator().manual_seed(100 + dp_rank))


def _data_parallel_gradients(grid: Position, groups) -> dict[str, torch.Tensor]:
    """The full model's gradients summed over this rank's data-parallel group; the tied
    embedding's two halves kept apart as ``embedding`` and ``output``."""
    _, dp_rank, _ = grid.coords(dist.get_rank())
    model = build(TiedGPT)
    (model(_tokens(dp_rank)).float() ** 2).mean().backward()
    grads = {name: p.grad for name, p in model.named_parameters()}
    for grad in grads.values():
        dist.all_reduce(grad, group=groups["dp"])
    return grads


def _megatron_pieces(grid: Position) -> tuple[list[tuple[str, nn.Parameter]], dict[int, object], float]:
    """This rank's named parameters as the grid holds them, the copy group of each (by id of the
    parameter and of its gradient) and the full model's float64 2-norm, to check the pieces."""
    rank = dist.get_rank()
    tp_rank, _, stage = grid.coords(rank)
    groups = _megatron_groups(grid)
    grads = _data_parallel_gradients(grid, groups)
    tied = grads["embedding"] + grads["output"]
    full = {name: g for name, g in grads.items() if name not in ("embedding", "output")} | {"embedding": tied}
    full_norm = reference_norm({n: g.double() for n, g in full.items()}, 2.0)

    if grid.pp > 1:
        # Each end stage holds its own half; the embedding group's all-reduce makes them one.
        embedding = (grads["embedding"] if stage == 0 else grads["output"]).clone()
        dist.all_reduce(embedding, group=groups["embedding"])
    else:
        embedding = tied
    stage_ranks = grid.dp * grid.tp
    local_index = rank % stage_ranks
    my_experts = range(local_index % grid.ep * EXPERTS // grid.ep, (local_index % grid.ep + 1) * EXPERTS // grid.ep)

    pieces: list[tuple[str, torch.Tensor, object]] = []

    def split(name: str, dim: int) -> None:
        piece = grads[name].chunk(grid.tp, dim=dim)[tp_rank].contiguous()
        pieces.append((f"{name}[tp{tp_rank}]", piece, groups["dp"]))

    def duplicated(name: str) -> None:
        pieces.append((name, grads[name], groups["dp_tp"]))

    blocks_per_stage = 2 // grid.pp
    if stage == 0:
        vocab_piece = embedding.chunk(grid.tp, dim=0)[tp_rank].contiguous()
        pieces.append((f"embedding[tp{tp_rank}]", vocab_piece, groups["tied"] if grid.pp > 1 else groups["dp"]))
    for b in range(stage * blocks_per_stage, (stage + 1) * blocks_per_stage):
        for name in (f"blocks.{b}.norm.weight", f"blocks.{b}.norm.bias", f"blocks.{b}.fc2.bias", f"blocks.{b}.router.weight"):
            duplicated(name)
        split(f"blocks.{b}.fc1.weight", 0)
        split(f"blocks.{b}.fc1.bias", 0)
        split(f"blocks.{b}.fc2.weight", 1)
        for e in my_experts:
            for kind in ("weight", "bias"):
                name = f"blocks.{b}.experts.{e}.{kind}"
                pieces.append((name, grads[name], groups["edp"] if grid.ep < stage_ranks else None))
    if stage == grid.pp - 1:
        duplicated("final_norm.weight")
        duplicated("final_norm.bias")
        if grid.pp > 1:
            vocab_piece = embedding.chunk(grid.tp, dim=0)[tp_rank].contiguous()
            pieces.append((f"embedding[tp{tp_rank}]", vocab_piece, groups["tied"]))

    named, copy_group = [], {}
    for name, grad, group in pieces:
        param = nn.Parameter(torch.empty_like(grad))
        param.grad = grad.clone()
        named.append((name, param))
        copy_group[id(param)] = copy_group[id(param.grad)] = group
    return named, copy_group, full_norm


def _clip_megatron(grid: Position, norm_types) -> list[dict]:
    named, copy_group, full_norm = _megatron_pieces(grid)
    distinct = full_grads(named_param_grads(named))
    assert_close_norm(reference_norm(distinct, 2.0), full_norm, 2.0, rtol=1e-6)  # the pieces are the model
    original = [p.grad.clone() for _, p in named]
    results = []
    for norm_type in norm_types:
        for (_, param), grad in zip(named, original):
            param.grad.copy_(grad)  # in place: the copy groups are keyed by the gradient too
        results.append(clip_and_check(named, norm_type, replica_group=lambda t: copy_group[id(t)]))
    return results


GRIDS = {
    "tp2xdp2": Position(tp=2, dp=2, pp=1, ep=1),
    "ep2xedp2+dp4": Position(tp=1, dp=4, pp=1, ep=2),
    "pp2xdp2-tied": Position(tp=1, dp=2, pp=2, ep=1),
}


@pytest.mark.parametrize("grid", GRIDS.values(), ids=GRIDS.keys())
def test_each_copy_group_is_counted_once_and_distinct_pieces_all(ranks, grid):
    per_rank = ranks(grid.world).run(_clip_megatron, grid, NORM_TYPES)
    for index in range(len(NORM_TYPES)):
        assert_same_on_all_ranks([results[index] for results in per_rank])


def test_tensor_pipeline_and_expert_parallel_at_once_at_world_8(ranks):
    """TP 2 x PP 2 x DP 2, the tied embedding vocabulary-split on both end stages, each stage's
    four experts one per dp x tp rank (no copies)."""
    grid = Position(tp=2, dp=2, pp=2, ep=4)
    per_rank = ranks(grid.world).run(_clip_megatron, grid, NORM_TYPES)
    for index in range(len(NORM_TYPES)):
        assert_same_on_all_ranks([results[index] for results in per_rank])


def _clipper_with_copy_groups(grid: Position) -> list[str]:
    named, copy_group, _ = _megatron_pieces(grid)
    clipper = distclip.GradClipper([p for _, p in named], max_norm=0.01, replica_group=lambda p: copy_group[id(p)])
    norms = []
    for step in range(2):  # the second step runs on the plan made by the first
        distinct = full_grads(named_param_grads(named))
        result = clipper.clip_()
        assert_close_norm(result.total_norm.item(), reference_norm(distinct, 2.0), 2.0)
        norms.append(result.total_norm.item().hex())
    return norms


@pytest.mark.parametrize("grid", [GRIDS["tp2xdp2"], GRIDS["pp2xdp2-tied"]], ids=["tp2xdp2", "pp2xdp2-tied"])
def test_grad_clipper_takes_the_copy_group_callable(ranks, grid):
    per_rank = ranks(grid.world).run(_clipper_with_copy_groups, grid)
    assert all(norms == per_rank[0] for norms in per_rank)


def _explain_megatron(grid: Position) -> tuple[str, list[tuple[int, ...]], list[str]]:
    named, copy_group, _ = _megatron_pieces(grid)
    model = nn.Module()
    for name, param in named:
        model.register_parameter(name.replace(".", "_"), param)
    explanation = distclip.explain(model, replica_group=lambda p: copy_group[id(p)])
    return str(explanation), [row.copies for row in explanation], [name for name, _ in named]


def test_explain_shows_each_parameters_copy_group(ranks):
    """At TP 2 x DP 2 on rank 0: split weights are copied over dp (ranks 0, 2), TP-duplicated
    ones over dp x tp (all four); each row names the parameter."""
    rank0 = ranks(4).run(_explain_megatron, GRIDS["tp2xdp2"])[0]
    table, copies, names = rank0
    by_name = dict(zip(names, copies))
    assert by_name["blocks.0.fc1.weight[tp0]"] == (0, 2)
    assert by_name["blocks.0.fc2.weight[tp0]"] == (0, 2)
    assert by_name["blocks.0.norm.weight"] == (0, 1, 2, 3)
    assert by_name["blocks.0.experts.3.weight"] == (0, 1, 2, 3)
    assert "blocks_0_fc1_weight[tp0]" in table and "plain" in table
