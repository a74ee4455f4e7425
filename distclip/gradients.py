"""What a clipping call clips: the gradients of a model or of a list, collected one way for all.

The rule.  Given an ``nn.Module``, its parameters *as they are now*: ``module.parameters()`` at the
call, so new submodules (adapters), replaced or re-assigned parameters (``resize_token_embeddings``,
``load_state_dict(assign=True)``, ``to_empty``) and unfrozen layers are in and removed ones are
out; the parameters an FSDP1 unit manages are represented by the unit's flat gradient, attributed
from the unit's own process groups (:mod:`distclip.fsdp1`).  Given a Tensor or an iterable of
Tensors, those.  A parameter whose ``.grad`` is None is left out: it has nothing to clip.

Every caller collects here: the functional API, :class:`distclip.GradClipper`, ``explain``, the
non-finite report and the integrations; no other module walks modules or reads FSDP1 handles.
:class:`Parameters` keeps one model's parameter list across calls and re-lists it only when the
module tree changed, which it tells from a fingerprint of the tree (see :class:`_ModuleTree`).

Names.  One rule for every report (``explain``, the non-finite report, per-group norms): the
qualified name in the model as the user wrote it.  Wrapper modules are unwrapped (DDP's
``module.``, ``torch.compile``'s ``_orig_mod.``) and wrapper prefixes removed (FSDP1's
``_fsdp_wrapped_module.``, activation checkpointing's ``_checkpoint_wrapped_module.``); an FSDP1
flat parameter is named as ``named_parameters()`` names it, after its unit
(``layers.0._flat_param``); parameters given as a list are ``parameters[i]``, by position.
"""

from __future__ import annotations

import itertools
import operator
import types
import warnings
from dataclasses import dataclass, field
from typing import Iterable, Iterator, Union

from torch import Tensor, nn
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel

from distclip import fsdp1
from distclip.ownership import Attribution, OwnershipError
from distclip.topology import Topology
from distclip.torch_internals import LOCAL_TENSOR

TensorOrTensors = Union[Tensor, Iterable[Tensor], nn.Module]

# Prefixes that wrappers insert into parameter names, wherever they sit in the tree.
_WRAPPER_PREFIXES = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.")


@dataclass
class Gradients:
    """One call's gradients, ready to plan.

    ``grads[i]`` is the gradient of ``params[i]`` (the FlatParameter for an FSDP1 unit);
    ``known`` the Attribution of the gradients whose layout the tensor alone does not tell (FSDP1
    flat gradients, by index; an OwnershipError where it cannot be told); ``presence`` tells
    which of the parameters had a gradient (True when all did), so a plan made for one set of
    gradients is never used for another.
    """

    grads: list[Tensor]
    params: list[Tensor]
    known: dict[int, Attribution | OwnershipError] = field(default_factory=dict)
    presence: object = True


def unwrap(module: nn.Module) -> nn.Module:
    """The model inside DDP and ``torch.compile`` wrappers (those that add a name prefix to every
    parameter); other modules as they are."""
    while True:
        if isinstance(module, DistributedDataParallel):
            module = module.module
        elif hasattr(module, "_orig_mod") and type(module).__name__ == "OptimizedModule":
            module = module._orig_mod
        else:
            return module


def clean_name(name: str) -> str:
    """``name`` without the prefixes wrappers insert (FSDP1, activation checkpointing, a compiled
    submodule)."""
    for prefix in _WRAPPER_PREFIXES:
        name = name.replace(prefix, "")
    return name


def as_list(tensors: TensorOrTensors, what: str) -> list[Tensor]:
    """``tensors`` as a list: a module's parameters, a Tensor alone, or the iterable's items.  An
    empty generator warns, as torch's clipping does."""
    if isinstance(tensors, nn.Module):
        return list(tensors.parameters())
    if isinstance(tensors, Tensor):
        return [tensors]
    is_generator = isinstance(tensors, types.GeneratorType)
    tensors = list(tensors)
    if is_generator and not tensors:
        warnings.warn(f"`{what}` is an empty generator, no gradient clipping will occur.", stacklevel=4)
    return tensors


class _ModuleTree:
    """A module's submodules and parameters, re-listed only when the tree changed.

    The fingerprint is the identity of every ``_modules`` and ``_parameters`` dict of every
    submodule and of every value in them, read with C-level maps.  The tree is the same exactly
    when the fingerprint is: a module added, removed or replaced anywhere changes some
    ``_modules`` dict (or the dict object itself: ``ModuleList.__delitem__`` builds a new one),
    a parameter added, removed or replaced changes a ``_parameters`` dict, whether through
    ``setattr``, ``register_parameter`` or a direct dict write (``to_empty`` writes the dict).
    The submodules and parameters are held here, so no id can be reused while compared.
    """

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self.version = 0
        self._relist()

    def _relist(self) -> None:
        self.modules = list(self.module.modules())
        self.parameters = list(self.module.parameters())
        self._fingerprint = self._read()

    def _read(self) -> list[int]:
        dicts = list(map(_MODULES, self.modules)) + list(map(_PARAMETERS, self.modules))
        return list(map(id, itertools.chain(dicts, itertools.chain.from_iterable(map(dict.values, dicts)))))

    def refresh(self) -> bool:
        """Re-list the tree if it changed since the last call; whether it did."""
        if self._read() == self._fingerprint:
            return False
        self._relist()
        self.version += 1
        return True


_MODULES = operator.attrgetter("_modules")
_PARAMETERS = operator.attrgetter("_parameters")
_GRAD = operator.attrgetter("grad")
_NO_GRAD = type(None)


class Parameters:
    """What a clipper clips: a model's parameters as they are at each call, or a fixed list.

    :meth:`gradients` collects the call's gradients; :attr:`version` changes whenever the list of
    parameters does (a model's tree changed), so that what was derived from the list (groups,
    copy groups, overlap hooks, a fused optimizer's eligibility) is derived again.
    """

    def __init__(self, model_or_params: TensorOrTensors, what: str = "parameters") -> None:
        self.module = model_or_params if isinstance(model_or_params, nn.Module) else None
        self._tree = _ModuleTree(self.module) if self.module is not None else None
        self._fixed = None if self.module is not None else as_list(model_or_params, what)
        self._derive()

    @property
    def version(self) -> int:
        return 0 if self._tree is None else self._tree.version

    def _derive(self) -> None:
        params = self._fixed if self._tree is None else self._tree.parameters
        self.params: list[Tensor] = params
        self.fsdp1 = fsdp1.ModuleGradients(self.module) if self.module is not None and fsdp1.has_units(self.module) else None
        # FlatParameters are nn.Parameters by type (FlatParameter.__new__): only a flag tells, and
        # reading a missing flag costs, so it is read once per list; a DTensor is never one.
        all_dtensors = bool(params) and set(map(type, params)) == {DTensor}
        self._flat = [] if self.fsdp1 is not None or all_dtensors else [i for i, p in enumerate(params) if fsdp1.is_flat_param(p)]

    def refresh(self) -> bool:
        """Re-read the model; whether its parameters changed since the last call."""
        if self._tree is None or not self._tree.refresh():
            return False
        self._derive()
        return True

    def gradients(self, topology: Topology) -> Gradients:
        """The gradients to count and scale now (call :meth:`refresh` first to follow the model)."""
        if self.fsdp1 is not None:
            grads, known, params = self.fsdp1(topology)
            return Gradients(grads, params, known, tuple(p.grad is not None for p in self.fsdp1.holders))
        params = self.params
        all_grads = list(map(_GRAD, params))
        # Whether any is missing from the types (not `None in all_grads`: that runs Tensor.__eq__).
        if _NO_GRAD not in set(map(type, all_grads)):
            grads, kept, presence = all_grads, params, True
        else:
            present = [g is not None for g in all_grads]
            grads = [g for g in all_grads if g is not None]
            kept = [p for p, g in zip(params, all_grads) if g is not None]
            presence = tuple(present)
        known: dict[int, Attribution | OwnershipError] = {}
        if self._flat:
            position = {id(p): i for i, p in enumerate(kept)}
            for index in self._flat:
                if id(params[index]) in position:
                    try:
                        known[position[id(params[index])]] = fsdp1.flat_param_attribution(params[index], topology)
                    except OwnershipError as error:
                        known[position[id(params[index])]] = error
        return Gradients(grads, kept, known, presence)

    @property
    def holders(self) -> list[Tensor]:
        """What the gradients come from, in the order :meth:`gradients` collects them (and
        ``presence`` refers to): the parameters, or an FSDP1 model's flat parameters and then the
        parameters FSDP1 does not manage."""
        return self.params if self.fsdp1 is None else self.fsdp1.holders

    def group_items(self) -> list[list[tuple[str, Tensor, int | None, int | None]]]:
        """Per holder, what a per-group norm can be chosen for: ``(name, parameter, start,
        stop)``, start None for the whole holder; an FSDP1 flat parameter's original
        parameters by their ranges of the local shard (the parameter is the flat one when FSDP1
        keeps no original)."""
        if self.fsdp1 is None:
            return [[(name, p, None, None)] for name, p in self.named()]
        items = [
            [(name, flat if original is None else original, start, stop) for name, original, start, stop in unit]
            for flat, unit in zip(self.fsdp1.flat_params, self.fsdp1.original_ranges(clean_name))
        ]
        return items + [[(name, p, None, None)] for name, p in self._named_plain() if id(p) in self.fsdp1.unmanaged_ids]

    def named(self) -> list[tuple[str, Tensor]]:
        """``(name, parameter)`` for every parameter (see the module docstring for names); FSDP1
        units by their flat parameter."""
        if self.module is None:
            return [(f"parameters[{i}]", p) for i, p in enumerate(self.params)]
        if self.fsdp1 is not None:
            return self.fsdp1.named(clean_name) + [(name, p) for name, p in self._named_plain() if id(p) in self.fsdp1.unmanaged_ids]
        return list(self._named_plain())

    def _named_plain(self) -> Iterator[tuple[str, Tensor]]:
        for name, p in unwrap(self.module).named_parameters():
            yield clean_name(name), p

    def named_pieces(self) -> list[tuple[str, Tensor]]:
        """``(name, this rank's local gradient of it)`` for every gradient, an FSDP1 flat
        gradient split into its original parameters' ranges: what the non-finite report tests."""
        if self.fsdp1 is not None:
            pieces = self.fsdp1.named_pieces(clean_name)
            managed = self.fsdp1.unmanaged_ids
            pieces += [(name, _local(p.grad)) for name, p in self._named_plain() if id(p) in managed and p.grad is not None]
            return pieces
        return [(name, _local(p.grad)) for name, p in self.named() if p.grad is not None]


def _local(grad: Tensor) -> Tensor:
    return LOCAL_TENSOR(grad) if isinstance(grad, DTensor) else grad


def collect(tensors: TensorOrTensors, topology: Topology, what: str = "parameters") -> Gradients:
    """The gradients of ``tensors`` (a model or parameters) now, for one call."""
    return Parameters(tensors, what).gradients(topology)


def fsdp1_root_among(models: Iterable[nn.Module], parameters: list[Tensor]) -> nn.Module | None:
    """The FSDP1 model among ``models`` whose parameters are exactly ``parameters`` (in order),
    if any: clipping that model attributes its flat gradients through its units."""
    for model in models:
        if fsdp1.has_units(model):
            theirs = list(model.parameters())
            if len(theirs) == len(parameters) and all(a is b for a, b in zip(theirs, parameters)):
                return model
    return None
