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
groups), so a new adapter lands in its group.  An FSDP1 flat gradient holds many parameters: each
original parameter's range of it counts towards that parameter's group (a callable is passed the
original parameter with ``use_orig_params=True``, the unit's FlatParameter without).
"""

from __future__ import annotations

from typing import Callable, Iterable, Mapping, Union

import torch
from torch import Tensor

from distclip.gradients import Parameters

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


Assignment = Union[str, None, tuple[tuple[int, int, Union[str, None]], ...]]


def group_of_holders(
    groups: GroupsSpec, source: Parameters, optimizer: torch.optim.Optimizer | None
) -> list[Assignment]:
    """Per holder of ``source`` (:attr:`Parameters.holders`), the name of its group (None: the
    total only) or, for an FSDP1 flat parameter, ``(start, stop, name)`` per original
    parameter's range of the local shard."""
    group = _chooser(groups, source, optimizer)
    assigned: list[Assignment] = []
    for items in source.group_items():
        if len(items) == 1 and items[0][2] is None:
            name, param, _, _ = items[0]
            assigned.append(group(name, param))
        else:
            assigned.append(tuple((start, stop, group(name, param)) for name, param, start, stop in items))
    return assigned


def _chooser(
    groups: GroupsSpec, source: Parameters, optimizer: torch.optim.Optimizer | None
) -> Callable[[str, Tensor], str | None]:
    """``(name, parameter) -> group`` for ``groups``."""
    if groups == "parameters":
        return lambda name, _: name
    if groups == "modules":  # a top-level submodule's parameters are named after it
        return lambda name, _: name.split(".")[0] if "." in name else "(root)"
    if callable(groups) and not isinstance(groups, Mapping):
        return _checked(groups)
    if groups == "param_groups":
        if optimizer is None:
            raise ValueError('distclip: groups="param_groups" needs attach(optimizer) first')
        named = {g.get("name", f"param_group_{i}"): list(g["params"]) for i, g in enumerate(optimizer.param_groups)}
        return _by_membership(named, clipped=None)
    return _by_membership({name: list(params) for name, params in groups.items()}, clipped={id(p) for p in source.params})


def _checked(choose: Callable[[str, Tensor], str | None]) -> Callable[[str, Tensor], str | None]:
    def group(name: str, param: Tensor) -> str | None:
        chosen = choose(name, param)
        if chosen is not None and not isinstance(chosen, str):
            raise ValueError(f"distclip: a groups callable must return a str or None, got {chosen!r} for {name!r}")
        return chosen

    return group


def _by_membership(named: Mapping[str, Iterable[Tensor]], clipped: set[int] | None) -> Callable[[str, Tensor], str | None]:
    """Groups given by their parameters; with ``clipped``, a parameter outside it is an error
    (the optimizer's groups may hold parameters the clipper was not given)."""
    group_of: dict[int, str] = {}
    for name, members in named.items():
        for p in members:
            if clipped is not None and id(p) not in clipped:
                raise ValueError(f"distclip: group {name!r} holds a parameter the clipper does not clip")
            if group_of.setdefault(id(p), name) != name:
                raise ValueError(f"distclip: a parameter is in group {name!r} and group {group_of[id(p)]!r}")
    return lambda _, param: group_of.get(id(param))
