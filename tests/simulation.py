"""Ownership of a large training run, simulated one rank at a time on torch's fake process group.

A simulated rank is this process with the "fake" backend initialized as that rank of a world of any
size (``FakeStore``: no other process; collectives would be hallucinated, and ``explain`` makes
none).  Its meshes are real DeviceMesh slices of the run's root mesh, its gradients real
meta-device DTensors laid out as FSDP2 and tensor/expert parallelism lay them out, and what it
counts is what :func:`distclip.explain` reports.  Mapping every counted local range back to global
element indices (torch's own DTensor sharding of an index tensor) and adding up over every rank
proves the partition: each element of the model counted exactly once.

The run: a root mesh ``pp x dp_replicate x efsdp x cp x ep x tp``; dense parameters are FSDP2-sharded
over ``dp_shard_cp = efsdp x cp x ep`` (HSDP: replicated over ``dp_replicate``), expert parameters
over ``efsdp_cp = efsdp x cp`` and split into experts over ``ep``; ``pp`` stages hold contiguous
layers (uneven when the stages do not divide them), and each stage holds one plain tensor copied
over all its ranks.

Two builders of one rank's stage:

- :func:`real_stage`: the stage built on the meta device, TP/EP applied as DTensors, then
  ``fully_shard``: FSDP2 decides every layout.  Its meshes come from ``init_device_mesh``, which
  creates every slice's process group on every rank (0.7 s a rank at 16,384 ranks).
- :func:`layout_stage`: the same layouts from FSDP2's rule (``Shard(0)`` over the dp shard mesh,
  ``_StridedShard(0, split_factor)`` when TP/EP also shard dim 0, ``Replicate`` over
  ``dp_replicate``) applied with ``distribute_tensor``, on meshes whose own dims carry no
  process groups: fast enough for every rank of 16,384.  The tests hold it to ``real_stage`` on
  every rank of small worlds.
"""

from __future__ import annotations

import gc
import math
import time
import warnings
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor
from torch.distributed.tensor.debug import _clear_sharding_prop_cache
from torch.distributed.tensor.placement_types import Placement, _StridedShard
from torch.testing._internal.distributed.fake_pg import FakeStore

import distclip

MESH_DIMS = ("pp", "dp_replicate", "efsdp", "cp", "ep", "tp")


@dataclass(frozen=True)
class Run:
    """Parallel sizes; ``ep`` borrows from ``dp_shard`` (experts over ``ep``, their FSDP over the rest)."""

    pp: int = 1
    dp_replicate: int = 1
    dp_shard: int = 1
    cp: int = 1
    tp: int = 1
    ep: int = 1

    @property
    def world_size(self) -> int:
        return self.pp * self.dp_replicate * self.dp_shard * self.cp * self.tp

    @property
    def mesh_shape(self) -> tuple[int, ...]:
        assert self.dp_shard % self.ep == 0, "ep must divide dp_shard"
        return (self.pp, self.dp_replicate, self.dp_shard // self.ep, self.cp, self.ep, self.tp)


@dataclass(frozen=True)
class Model:
    """A GPT (``experts == 0``) or an MoE GPT; small widths, so that shards run uneven and empty."""

    layers: int = 100
    hidden: int = 64
    ffn: int = 176
    vocab: int = 500
    experts: int = 0


@dataclass(frozen=True)
class ParamSpec:
    """One parameter: ``tp`` is its tensor-parallel placement, ``expert`` whether it is split over
    ``ep`` (dim 0), ``plain`` whether it stays outside FSDP, TP and EP (copied over the stage)."""

    name: str
    shape: tuple[int, ...]
    tp: Placement | None = None
    expert: bool = False
    plain: bool = False


def stage_layers(model: Model, run: Run, stage: int) -> range:
    return range(stage * model.layers // run.pp, (stage + 1) * model.layers // run.pp)


def stage_params(model: Model, run: Run, stage: int) -> list[ParamSpec]:
    """The parameters of pipeline stage ``stage``, in module registration order."""
    h, f, e = model.hidden, model.ffn, model.experts
    colwise, rowwise, replicated = Shard(0), Shard(1), Replicate()
    specs = []
    if stage == 0:
        specs.append(ParamSpec("tok_embeddings.weight", (model.vocab, h), colwise))
    for i in stage_layers(model, run, stage):
        layer = f"layers.{i}."
        specs.append(ParamSpec(layer + "attention_norm.weight", (h,), replicated))
        specs += [ParamSpec(layer + f"attention.{w}.weight", (h, h), colwise) for w in ("wq", "wk", "wv")]
        specs.append(ParamSpec(layer + "attention.wo.weight", (h, h), rowwise))
        specs.append(ParamSpec(layer + "ffn_norm.weight", (h,), replicated))
        if e:
            specs.append(ParamSpec(layer + "moe.router.weight", (e, h), replicated))
            specs.append(ParamSpec(layer + "moe.experts.w1", (e, f, h), Shard(1), expert=True))
            specs.append(ParamSpec(layer + "moe.experts.w2", (e, h, f), Shard(2), expert=True))
            specs.append(ParamSpec(layer + "moe.experts.w3", (e, f, h), Shard(1), expert=True))
        else:
            specs += [ParamSpec(layer + f"feed_forward.{w}.weight", (f, h), colwise) for w in ("w1", "w3")]
            specs.append(ParamSpec(layer + "feed_forward.w2.weight", (h, f), rowwise))
    if stage == run.pp - 1:
        specs.append(ParamSpec("norm.weight", (h,), replicated))
        specs.append(ParamSpec("output.weight", (model.vocab, h), colwise))
    specs.append(ParamSpec("stage_scale", (h,), plain=True))
    return specs


def model_offsets(model: Model, run: Run) -> tuple[dict[str, int], int]:
    """Each parameter's first index in one global numbering of all the model's elements."""
    offsets, total = {}, 0
    for stage in range(run.pp):
        for spec in stage_params(model, run, stage):
            offsets[f"{stage}:{spec.name}"] = total
            total += math.prod(spec.shape)
    return offsets, total


@dataclass
class Meshes:
    root: DeviceMesh
    dense_dp: DeviceMesh  # (dp_replicate, dp_shard_cp): what fully_shard gets for dense modules
    expert_dp: DeviceMesh  # (dp_replicate, efsdp_cp): what fully_shard gets for the experts
    tp: DeviceMesh
    ep_tp: DeviceMesh
    stage: DeviceMesh  # every rank of this rank's pp stage: where plain tensors are copied

    @property
    def stage_index(self) -> int:
        return self.root.get_coordinate()[0]


def _slice_meshes(root: DeviceMesh) -> Meshes:
    root["efsdp", "cp", "ep"]._flatten("dp_shard_cp")
    root["efsdp", "cp"]._flatten("efsdp_cp")
    stage = root["dp_replicate", "efsdp", "cp", "ep", "tp"]._flatten("stage")
    with warnings.catch_warnings():  # slicing flattened dims from the root: what FSDP2 users do today
        warnings.simplefilter("ignore", UserWarning)
        dense_dp, expert_dp = root["dp_replicate", "dp_shard_cp"], root["dp_replicate", "efsdp_cp"]
    return Meshes(
        root=root,
        dense_dp=dense_dp,
        expert_dp=expert_dp,
        tp=root["tp"],
        ep_tp=root["ep", "tp"],
        stage=stage,
    )


def real_meshes(run: Run) -> Meshes:
    """The run's meshes as ``init_device_mesh`` builds them (a process group per slice)."""
    return _slice_meshes(init_device_mesh("cpu", run.mesh_shape, mesh_dim_names=MESH_DIMS))


def light_meshes(run: Run) -> Meshes:
    """The same meshes, the root's own dims without process groups (as torch builds sub-meshes:
    ``_init_backend=False``); only the flattened ones used as groups get theirs."""
    ranks = torch.arange(run.world_size).view(run.mesh_shape)
    root = DeviceMesh("cpu", ranks, mesh_dim_names=MESH_DIMS, _init_backend=False)
    root._dim_group_names = []  # what slicing reads as "no process groups on these dims"
    return _slice_meshes(root)


def _set_param(module: nn.Module, name: str, param: nn.Parameter) -> None:
    *path, leaf = name.split(".")
    for part in path:
        if not hasattr(module, part):
            module.add_module(part, nn.Module())
        module = getattr(module, part)
    module.register_parameter(leaf, param)


def _model_parallel(spec: ParamSpec, run: Run, meshes: Meshes) -> tuple[DeviceMesh, tuple[Placement, ...]] | None:
    """The TP/EP mesh and placements of ``spec`` before FSDP, or None when it has none."""
    if spec.expert and run.ep > 1 and run.tp > 1:
        return meshes.ep_tp, (Shard(0), spec.tp)
    if spec.expert and run.ep > 1:
        return meshes.root["ep"], (Shard(0),)
    if run.tp > 1:
        return meshes.tp, (spec.tp,)
    return None


def real_stage(model: Model, run: Run, meshes: Meshes) -> list[tuple[str, torch.Tensor]]:
    """This rank's stage on the meta device, TP/EP then ``fully_shard``, every gradient set, as
    ``(name, parameter)`` pairs."""
    stage = nn.Module()
    specs = stage_params(model, run, meshes.stage_index)
    for spec in specs:
        tensor = torch.empty(spec.shape, device="meta")
        parallel = None if spec.plain else _model_parallel(spec, run, meshes)
        if parallel is not None:
            tensor = distribute_tensor(tensor, *parallel)
        _set_param(stage, spec.name, nn.Parameter(tensor))
    from torch.distributed.fsdp import fully_shard

    for name, layer in getattr(stage, "layers", nn.Module()).named_children():
        if hasattr(layer, "moe"):
            fully_shard(layer.moe.experts, mesh=meshes.expert_dp)
        fully_shard(layer, mesh=meshes.dense_dp)
    fully_shard(stage, mesh=meshes.dense_dp, ignored_params={stage.stage_scale})
    for param in stage.parameters():
        param.grad = torch.empty_like(param)
    return list(stage.named_parameters())


def fsdp_layout(spec: ParamSpec, run: Run, meshes: Meshes) -> tuple[DeviceMesh, tuple[Placement, ...]]:
    """FSDP2's layout of ``spec``: HSDP's Replicate, then Shard(0) over the dp shard mesh, strided
    by the shards TP/EP already cut dim 0 into; then the TP/EP placements."""
    dp = meshes.expert_dp if spec.expert else meshes.dense_dp
    parallel = _model_parallel(spec, run, meshes)
    if parallel is None:
        return dp, (Replicate(), Shard(0))
    mesh, placements = parallel
    split_factor = math.prod(mesh.size(i) for i, p in enumerate(placements) if isinstance(p, Shard) and p.dim == 0)
    fsdp = _StridedShard(0, split_factor=split_factor) if split_factor > 1 else Shard(0)
    return DeviceMesh._concatenate([dp, mesh]), (Replicate(), fsdp, *placements)


def local_indices(shape: tuple[int, ...], mesh: DeviceMesh, placements: tuple[Placement, ...]) -> torch.Tensor:
    """The index (within its parameter) of each element of this rank's local piece, flattened:
    torch's own DTensor sharding of an index tensor."""
    # The piece depends on the mesh's shape and this rank's place in it, not on the mesh's ranks,
    # so simulated ranks share it (a strided split of a large mesh costs milliseconds).
    key = (shape, placements, tuple(mesh.shape), mesh.get_coordinate())
    if key not in _LOCAL_INDICES:
        ids = torch.arange(math.prod(shape)).view(shape)
        _LOCAL_INDICES[key] = distribute_tensor(ids, mesh, placements, src_data_rank=None).to_local()
    return _LOCAL_INDICES[key]


_LOCAL_INDICES: dict = {}


def layout_stage(model: Model, run: Run, meshes: Meshes) -> list[tuple[str, torch.Tensor]]:
    """This rank's stage with FSDP2's layouts applied directly (no ``fully_shard``), as
    ``(name, parameter)`` pairs; each gradient element holds its index within its parameter."""
    layouts: dict = {}  # one mesh per (dp, TP/EP) pair, where FSDP2 makes one per parameter
    named = []
    for spec in stage_params(model, run, meshes.stage_index):
        if spec.plain:
            local, mesh, placements = torch.arange(math.prod(spec.shape)).view(spec.shape), None, None
        else:
            key = (spec.expert, type(spec.tp), getattr(spec.tp, "dim", None))
            if key not in layouts:
                layouts[key] = fsdp_layout(spec, run, meshes)
            mesh, placements = layouts[key]
            local = local_indices(spec.shape, mesh, placements)
        param, param.grad = (_tensor(local, spec.shape, mesh, placements) for _ in range(2))
        named.append((spec.name, param))
    return named


def _tensor(local: torch.Tensor, shape: tuple[int, ...], mesh: DeviceMesh | None, placements) -> torch.Tensor:
    """A tensor object over ``local``: itself viewed anew when plain, else a DTensor of ``shape``."""
    if mesh is None:
        return local.view(shape)
    stride = tuple(math.prod(shape[i + 1:]) for i in range(len(shape)))
    return DTensor.from_local(local, mesh, placements, run_check=False, shape=torch.Size(shape), stride=stride)


def as_rank(rank: int, world_size: int) -> None:
    """Make this process simulated rank ``rank`` (any previous one released)."""
    if dist.is_initialized():
        dist.destroy_process_group()
    # DTensor's sharding caches take meshes as equal when their ranks are, so they would hand
    # this rank a mesh object of the previous simulated rank, and with it that rank's coordinate.
    _clear_sharding_prop_cache()
    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world_size)


class ElementCounts:
    """How many times each model element was counted, over the simulated ranks added to it."""

    def __init__(self, model: Model, run: Run) -> None:
        self.offsets, total = model_offsets(model, run)
        self.counts = torch.zeros(total, dtype=torch.int32)

    def _global_ids(self, shape: tuple[int, ...], grad: torch.Tensor) -> torch.Tensor:
        """The global index (within its parameter) of each element of this rank's local tensor."""
        if not isinstance(grad, DTensor):
            return torch.arange(math.prod(shape))
        return local_indices(shape, grad.device_mesh, tuple(grad.placements)).flatten()

    def add(self, stage_index: int, stage: list[tuple[str, torch.Tensor]], explanation: distclip.Explanation) -> None:
        """Count what ``explanation`` (of ``stage``'s parameters, all with gradients) counts."""
        assert len(explanation) == len(stage)
        for (name, param), row in zip(stage, explanation):
            assert row.problem is None, f"{name}: {row.problem}"
            ids = self._global_ids(tuple(param.shape), param.grad)
            offset = self.offsets[f"{stage_index}:{name}"]
            for start, stop in row.counted_ranges:
                self.counts[offset + ids[start:stop]] += 1

    def merge(self, other: "ElementCounts") -> None:
        self.counts += other.counts

    def problems(self) -> list[str]:
        """Each parameter with an element counted never or more than once (empty: a partition)."""
        found = []
        names = sorted(self.offsets.items(), key=lambda item: item[1]) + [("end", len(self.counts))]
        for (name, start), (_, stop) in zip(names, names[1:]):
            counts = self.counts[start:stop]
            missing, twice = int((counts == 0).sum()), int((counts > 1).sum())
            if missing or twice:
                found.append(f"{name}: {missing} elements never counted, {twice} counted more than once")
        return found


Builder = Callable[[Model, Run, Meshes], list[tuple[str, torch.Tensor]]]


def simulate(
    model: Model,
    run: Run,
    ranks: Iterator[int] | range,
    build: Builder = layout_stage,
    meshes: Callable[[Run], Meshes] = light_meshes,
) -> tuple[ElementCounts, list[float]]:
    """Simulate ``ranks`` one after the other: count what ``explain`` says each one counts.

    Returns the element counts and the seconds ``explain`` took on each rank (its planning:
    copy sets, the split of copied work; the model's meshes are new on every rank, so nothing is
    cached from the previous one).
    """
    counts = ElementCounts(model, run)
    seconds = []
    gc.disable()  # a collection of earlier ranks' meshes is not the planner's time; collect between
    try:
        for done, rank in enumerate(ranks):
            if done % 64 == 63:
                gc.collect()
            as_rank(rank, run.world_size)
            rank_meshes = meshes(run)
            stage = build(model, run, rank_meshes)
            start = time.perf_counter()
            explanation = distclip.explain([p for _, p in stage], replica_group=rank_meshes.stage.get_group())
            seconds.append(time.perf_counter() - start)
            counts.add(rank_meshes.stage_index, stage, explanation)
    finally:
        gc.enable()
        if dist.is_initialized():
            dist.destroy_process_group()
    return counts, seconds
