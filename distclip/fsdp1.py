"""FSDP1 (``FullyShardedDataParallel``): which elements of its flat gradients are the model's.

FSDP1 keeps one FlatParameter per unit; its gradient is a 1-D local shard that also holds
padding (between original parameters for alignment, and at the end of the last shard).  Padding
is not part of the model, so only the ranges ``_shard_param_infos`` names are counted.  The
shard is distinct across the unit's process group (FULL_SHARD, SHARD_GRAD_OP), a copy on every
rank of it (NO_SHARD), or distinct within the intra-node group and a copy across the inter-node
group (HYBRID_SHARD, _HYBRID_SHARD_ZERO2).

Given the root module, each unit's process groups are read directly.  Given bare FlatParameters
(``fsdp_model.parameters()`` with ``use_orig_params=False``), the shard count is read off the
FlatParameter's sizes and the shard groups are taken to be consecutive ranks of ``group``, the
layout FSDP1 builds for hybrid sharding (intra-node groups, or a ``(replicate, shard)`` mesh).
"""

from __future__ import annotations

import weakref
from typing import Callable, Iterator

from torch import Tensor, nn
import torch.distributed as dist

from distclip.copygroups import tensor_topology
from distclip.ownership import Attribution, OwnershipError, Problem, check_within_group, shard_copy_set
from distclip.topology import Topology

try:
    from torch.distributed.fsdp import FullyShardedDataParallel, ShardingStrategy

    _HYBRID = {ShardingStrategy.HYBRID_SHARD, ShardingStrategy._HYBRID_SHARD_ZERO2}
except ImportError:  # a torch build without FSDP1
    FullyShardedDataParallel, ShardingStrategy, _HYBRID = None, None, set()

# Where FSDP1 registers a unit's FlatParameter, below the unit: ``named_parameters()`` of a model
# with ``use_orig_params=False`` names it ``<unit>._fsdp_wrapped_module._flat_param``.
FLAT_PARAM_NAME = "_fsdp_wrapped_module._flat_param"


def is_flat_param(param: Tensor) -> bool:
    return bool(getattr(param, "_is_flat_param", False))


def param_ranges(flat_param: Tensor) -> list[tuple[str, int, int]]:
    """``(name within the unit, start, stop)`` of each original parameter that has elements in
    the local flat shard; everything else in the shard is padding."""
    return [
        (fqn, info.offset_in_shard, info.offset_in_shard + info.numel_in_shard)
        for fqn, info in zip(flat_param._fqns, flat_param._shard_param_infos)
        if info.in_shard
    ]


def _model_ranges(flat_param: Tensor) -> tuple[tuple[int, int], ...]:
    """The ranges of the local flat shard that hold original-parameter elements."""
    return tuple((start, stop) for _, start, stop in param_ranges(flat_param))


def managed_ids(flat_param: Tensor) -> set[int]:
    """Ids of the FlatParameter and of the original parameters it manages (their views with
    ``use_orig_params=True``): gradients that the flat gradient already covers."""
    return {id(flat_param), *(id(p) for p in (flat_param._params or ()))}


def units(module: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """``(qualified name, unit)`` of every FSDP1 unit of ``module`` that holds a FlatParameter."""
    for name, unit in module.named_modules():
        if isinstance(unit, FullyShardedDataParallel) and unit._handle is not None:
            yield name, unit


# A unit's Attribution is a function of how FSDP1 wrapped it (strategy, process groups, shard
# layout: fixed when the unit is built) and of the topology, so it is kept per unit and not
# redone on every step; a ``replica_group`` callable may answer differently, so not with one.
_attributions: "weakref.WeakKeyDictionary[nn.Module, dict[Topology, Attribution]]" = weakref.WeakKeyDictionary()


def _unit_attribution(unit: nn.Module, topology: Topology) -> Attribution:
    if topology.replica_of is not None:
        return _attribute_unit(unit, topology)
    known = _attributions.setdefault(unit, {})
    if topology not in known:
        known[topology] = _attribute_unit(unit, topology)  # an OwnershipError is not kept
    return known[topology]


def _attribute_unit(unit: nn.Module, topology: Topology) -> Attribution:
    flat_param = unit._handle.flat_param
    topology = tensor_topology(flat_param, topology)
    shard_group = dist.get_process_group_ranks(unit.process_group)
    if unit.sharding_strategy == ShardingStrategy.NO_SHARD:
        same_shard = list(range(len(shard_group)))
    else:
        same_shard = [shard_group.index(topology.rank)]
    if unit.sharding_strategy in _HYBRID:
        # The inter-node group is exactly the set of ranks holding this rank's shard.
        replicas = dist.get_process_group_ranks(unit._inter_node_pg)
        check_within_group(shard_group, topology)
        check_within_group(replicas, topology)
        return Attribution(tuple(sorted(replicas)), _model_ranges(flat_param))
    copies = shard_copy_set(shard_group, same_shard, list(topology.group_ranks), topology)
    return Attribution(copies, _model_ranges(flat_param))


def flat_param_attribution(flat_param: Tensor, topology: Topology) -> Attribution:
    """Attribution of a FlatParameter given without its FSDP unit (see the module docstring)."""
    topology = tensor_topology(flat_param, topology)
    padded = getattr(flat_param, "_padded_unsharded_size", None)
    shards = padded.numel() // flat_param._sharded_size.numel() if padded is not None else 1
    group = list(topology.group_ranks)
    if shards <= 1:  # NO_SHARD: the whole flat parameter on every rank
        return Attribution(topology.replica_ranks, _model_ranges(flat_param))
    if len(group) % shards:
        raise OwnershipError(
            Problem.UNKNOWN_CORRESPONDENCE,
            f"a FlatParameter sharded {shards} ways does not tile `group` of {len(group)} ranks; "
            "pass the root FSDP module instead of its parameters",
        )
    first = group.index(topology.rank) // shards * shards
    shard_group = group[first : first + shards]
    copies = shard_copy_set(shard_group, [shard_group.index(topology.rank)], group, topology)
    return Attribution(copies, _model_ranges(flat_param))


def has_units(module: nn.Module) -> bool:
    return FullyShardedDataParallel is not None and any(
        isinstance(m, FullyShardedDataParallel) for m in module.modules()
    )


class ModuleGradients:
    """The gradients of an FSDP1 model, found every step from what is found once.

    FSDP1 fixes a model's units (and so which parameters it does not manage: ignored modules)
    when it wraps it, so the units and the unmanaged parameters are listed at construction;
    calling the object reads their current gradients (a unit without one is left out)."""

    def __init__(self, module: nn.Module) -> None:
        named_units = list(units(module))
        self.unit_names = [name for name, _ in named_units]
        self.units = [unit for _, unit in named_units]
        self.flat_params = [unit._handle.flat_param for unit in self.units]
        managed: set[int] = set()
        for flat_param in self.flat_params:
            managed |= managed_ids(flat_param)
        self.unmanaged = [p for p in module.parameters() if id(p) not in managed]
        self.unmanaged_ids = {id(p) for p in self.unmanaged}
        # What the gradients come from, in the order they are collected: the units' flat
        # parameters, then the parameters FSDP1 does not manage.
        self.holders = self.flat_params + self.unmanaged

    def __call__(
        self, topology: Topology
    ) -> tuple[list[Tensor], dict[int, Attribution | OwnershipError], list[Tensor]]:
        """Each unit's flat gradient (scaling it scales the ``use_orig_params=True`` views too),
        then the unmanaged parameters' plain gradients.  Returns the gradients, the units'
        Attributions by index (an OwnershipError stands in for a unit that cannot be
        attributed) and the parameters the gradients belong to (FlatParameters for the units)."""
        grads: list[Tensor] = []
        known: dict[int, Attribution | OwnershipError] = {}
        params: list[Tensor] = []
        for unit, flat_param in zip(self.units, self.flat_params):
            if flat_param.grad is None:
                continue
            try:
                known[len(grads)] = _unit_attribution(unit, topology)
            except OwnershipError as error:
                known[len(grads)] = error
            grads.append(flat_param.grad)
            params.append(flat_param)
        params.extend(p for p in self.unmanaged if p.grad is not None)
        grads.extend(p.grad for p in params[len(grads) :])
        return grads, known, params

    def named(self, clean: Callable[[str], str]) -> list[tuple[str, Tensor]]:
        """``(name, flat parameter)`` of every unit, named as ``named_parameters()`` names it
        (cleaned by ``clean``): ``<unit>._flat_param``."""
        return [
            (clean(f"{name}.{FLAT_PARAM_NAME}" if name else FLAT_PARAM_NAME), flat_param)
            for name, flat_param in zip(self.unit_names, self.flat_params)
        ]

    def original_ranges(self, clean: Callable[[str], str]) -> list[list[tuple[str, Tensor | None, int, int]]]:
        """Per unit, ``(name, original parameter, start, stop)`` of every original parameter with
        elements in this rank's flat shard, names cleaned by ``clean``; the parameter is None
        without ``use_orig_params=True`` (FSDP1 keeps no such variable then)."""
        per_unit = []
        for prefix, flat_param in zip(self.unit_names, self.flat_params):
            originals = flat_param._params if flat_param._params is not None else [None] * len(flat_param._fqns)
            per_unit.append([
                (clean(f"{prefix}.{fqn}" if prefix else fqn), original, info.offset_in_shard,
                 info.offset_in_shard + info.numel_in_shard)
                for fqn, original, info in zip(flat_param._fqns, originals, flat_param._shard_param_infos)
                if info.in_shard
            ])
        return per_unit

    def named_pieces(self, clean: Callable[[str], str]) -> list[tuple[str, Tensor]]:
        """``(original parameter name, its range of the unit's local flat gradient)`` for every
        unit with a gradient, names cleaned by ``clean``."""
        pieces = []
        for prefix, flat_param in zip(self.unit_names, self.flat_params):
            if flat_param.grad is None:
                continue
            for fqn, start, stop in param_ranges(flat_param):
                pieces.append((clean(f"{prefix}.{fqn}" if prefix else fqn), flat_param.grad[start:stop]))
        return pieces
