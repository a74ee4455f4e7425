"""Per-group norms: which group each clipped parameter also counts towards.

The rule.  Every gradient counts towards the total; with ``groups`` it also counts towards at
most one named group, whose norm rides the same all-reduce as the total.  ``groups`` is

- a mapping ``name -> parameters``: those parameters (a parameter in two groups, or one the
  clipper does not clip, is an error);
- ``"modules"``: the model's top-level submodules, named as in the model the user wrote (DDP's
  and ``torch.compile``'s wrappers are not a level, see :mod:`distclip.gradients`), and the root's
  own parameters as ``"(root)"``;
- ``"param_groups"``: the attached optimizer's parameter groups, by their ``"name"`` entry or
  ``param_group_<i>``.

The assignment is made again whenever the parameters change (a model's tree, an optimizer's
groups), so a new adapter lands in its module's group.
"""

from __future__ import annotations

from typing import Iterable, Mapping, Sequence, Union

import torch
from torch import Tensor

from distclip.gradients import Parameters, unwrap

GroupsSpec = Union[None, str, Mapping[str, Iterable[Tensor]]]


def check_groups(groups: GroupsSpec, source: Parameters) -> None:
    """ValueError for a ``groups`` argument that can never be assigned."""
    if groups is None or groups == "param_groups" or isinstance(groups, Mapping):
        pass
    elif groups == "modules":
        if source.module is None:
            raise ValueError('distclip: groups="modules" needs a model, not parameters')
    else:
        raise ValueError(f'distclip: groups must be a mapping, "modules" or "param_groups", got {groups!r}')
    if groups is not None and source.fsdp1 is not None:
        raise ValueError("distclip: per-group norms are not supported for FSDP1 flat parameters")


def named_groups(
    groups: GroupsSpec, source: Parameters, optimizer: torch.optim.Optimizer | None
) -> dict[str, list[Tensor]]:
    """``groups`` as ``name -> parameters`` for the parameters as they are now."""
    if groups == "modules":
        model = unwrap(source.module)
        named = {name: list(child.parameters()) for name, child in model.named_children()}
        own = list(model.parameters(recurse=False))
        return {**named, **({"(root)": own} if own else {})}
    if groups == "param_groups":
        if optimizer is None:
            raise ValueError('distclip: groups="param_groups" needs attach(optimizer) first')
        return {g.get("name", f"param_group_{i}"): list(g["params"]) for i, g in enumerate(optimizer.param_groups)}
    return {name: list(params) for name, params in groups.items()}


def assign(named: Mapping[str, Sequence[Tensor]], params: Sequence[Tensor]) -> list[int]:
    """Per parameter of ``params``, the index of its group in ``named`` (-1: none)."""
    index_of = {id(p): i for i, p in enumerate(params)}
    group_of = [-1] * len(params)
    for g, (name, members) in enumerate(named.items()):
        for p in members:
            if id(p) not in index_of:
                raise ValueError(f"distclip: group {name!r} holds a parameter the clipper does not clip")
            if group_of[index_of[id(p)]] != -1:
                raise ValueError(f"distclip: a parameter is in group {name!r} and another group")
            group_of[index_of[id(p)]] = g
    return group_of
