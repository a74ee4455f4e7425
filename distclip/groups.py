"""Per-group norms: which named group each clipped parameter also counts towards.

The rule.  Every gradient counts towards the total; with ``groups`` it also counts towards at
most one named group, whose norm rides the same all-reduce as the total.  Groups combine *by
name* across ranks: a group's norm is over every element of every parameter of that name's
group on any rank (shards summed, copies counted once), so pipeline stages that hold different
groups each report their own and every rank can read all of them (:mod:`distclip.layout`
agrees on the names).  ``groups`` is

- ``"parameters"``: every parameter its own group, named by :mod:`distclip.gradients`' rule
  (qualified names without wrapper prefixes; ``parameters[i]`` for a list);
- ``"modules"``: the model's top-level submodules (DDP's and ``torch.compile``'s wrappers are not
  a level), and the root's own parameters as ``"(root)"``;
- ``"param_groups"``: the attached optimizer's parameter groups, by their ``"name"`` entry or
  ``param_group_<i>``;
- a callable ``(name, parameter) -> str | None``: the group of each parameter by its name (as
  ``"parameters"`` names it), None for the total only, e.g. ``lambda name, p: name.split(".")[1]``
  for transformer blocks;
- a mapping ``name -> parameters``: those parameters (a parameter in two groups, or one the
  clipper does not clip, is an error).

The assignment is made again whenever the parameters change (a model's tree, an optimizer's
groups), so a new adapter lands in its group.  FSDP1 flat parameters hold many parameters in
one gradient, so they take no groups (an error).
"""

from __future__ import annotations

from typing import Callable, Iterable, Mapping, Union

import torch
from torch import Tensor

from distclip.gradients import Parameters, unwrap

GroupsSpec = Union[None, str, Callable[[str, Tensor], Union[str, None]], Mapping[str, Iterable[Tensor]]]
NAMED_SPECS = ("parameters", "modules", "param_groups")


def check_groups(groups: GroupsSpec, source: Parameters) -> None:
    """ValueError for a ``groups`` argument that can never be assigned."""
    if isinstance(groups, str):
        if groups not in NAMED_SPECS:
            raise ValueError(f"distclip: groups must be one of {NAMED_SPECS}, a callable or a mapping, got {groups!r}")
        if groups == "modules" and source.module is None:
            raise ValueError('distclip: groups="modules" needs a model, not parameters')
    elif not (groups is None or callable(groups) or isinstance(groups, Mapping)):
        raise ValueError(f"distclip: groups must be one of {NAMED_SPECS}, a callable or a mapping, got {groups!r}")
    if groups is not None and source.fsdp1 is not None:
        raise ValueError("distclip: per-group norms are not supported for FSDP1 flat parameters")


def group_of_parameters(
    groups: GroupsSpec, source: Parameters, optimizer: torch.optim.Optimizer | None
) -> list[str | None]:
    """Per parameter of ``source.params``, the name of its group (None: the total only)."""
    if groups == "parameters":
        return _by_parameter(source, lambda name, _: name)
    if callable(groups) and not isinstance(groups, Mapping):
        return _by_parameter(source, groups)
    if groups == "modules":
        model = unwrap(source.module)
        named = {name: list(child.parameters()) for name, child in model.named_children()}
        named["(root)"] = list(model.parameters(recurse=False))
    elif groups == "param_groups":
        if optimizer is None:
            raise ValueError('distclip: groups="param_groups" needs attach(optimizer) first')
        named = {g.get("name", f"param_group_{i}"): list(g["params"]) for i, g in enumerate(optimizer.param_groups)}
    else:
        named = {name: list(params) for name, params in groups.items()}
    return _by_membership(named, source.params, strict=groups not in NAMED_SPECS)


def _by_parameter(source: Parameters, name_group: Callable[[str, Tensor], str | None]) -> list[str | None]:
    group_of = {id(p): name_group(name, p) for name, p in source.named()}
    for group in group_of.values():
        if group is not None and not isinstance(group, str):
            raise ValueError(f"distclip: a groups callable must return a str or None, got {group!r}")
    return [group_of[id(p)] for p in source.params]


def _by_membership(named: Mapping[str, Iterable[Tensor]], params: list[Tensor], strict: bool) -> list[str | None]:
    index_of = {id(p): i for i, p in enumerate(params)}
    group_of: list[str | None] = [None] * len(params)
    for name, members in named.items():
        for p in members:
            if id(p) not in index_of:
                if strict:
                    raise ValueError(f"distclip: group {name!r} holds a parameter the clipper does not clip")
                continue  # an optimizer's or a module's parameter that the clipper was not given
            if group_of[index_of[id(p)]] is not None:
                raise ValueError(f"distclip: a parameter is in group {name!r} and group {group_of[index_of[id(p)]]!r}")
            group_of[index_of[id(p)]] = name
    return group_of
