"""nonfinite="error" names the parameters and ranks whose gradients hold NaN/inf, in identical
text on every rank; GradClipper.nonfinite_report() gives the same as data (DDP, FSDP2, FSDP1)."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
from torch.nn.parallel import DistributedDataParallel as DDP

import distclip
from models import backward, batch, build, local, wrap


def _ddp():
    model = wrap(build(), "ddp")
    backward(model, batch(dist.get_rank()))
    return model


def _ddp_checkpointed():
    """Activation checkpointing renames layers.1.* to layers.1._checkpoint_wrapped_module.*."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    model = build()
    model.layers[1] = checkpoint_wrapper(model.layers[1])
    model = DDP(model)
    backward(model, batch(dist.get_rank()))
    return model


def _fsdp2():
    model = wrap(build(), "fsdp2")
    backward(model, batch(dist.get_rank()))
    return model


def _fsdp1():
    torch.manual_seed(0)
    model = build()
    for i, layer in enumerate(model.layers):
        model.layers[i] = FSDP(layer, device_id=torch.device("cpu"))
    model = FSDP(model, device_id=torch.device("cpu"))
    backward(model, batch(dist.get_rank()))
    return model


def _poison(model, kind, name, rank):
    """Put a NaN into this rank's piece of the gradient of parameter ``name`` if on ``rank``."""
    if dist.get_rank() != rank:
        return
    if kind == "fsdp1":  # the flat gradient of the unit holding it, at that parameter's range
        for unit in FSDP.fsdp_modules(model):
            flat = unit._handle.flat_param if unit._handle is not None else None
            prefix = next((p for p, m in model.named_modules() if m is unit), "")
            for fqn, info in zip(flat._fqns if flat is not None else (), flat._shard_param_infos if flat is not None else ()):
                full = distclip.gradients.clean_name(f"{prefix}.{fqn}" if prefix else fqn)
                if full == name and info.in_shard:
                    flat.grad[info.offset_in_shard] = float("nan")
                    return
        raise AssertionError(f"{name} has no element on rank {rank}")
    named = model.module.named_parameters() if kind.startswith("ddp") else model.named_parameters()
    params = {distclip.gradients.clean_name(n): p for n, p in named}
    grad = params[name].grad
    piece = local(grad)
    assert piece.numel(), f"{name} has no element on rank {rank}"
    piece.view(-1)[0] = float("nan")


BUILD = {"ddp": _ddp, "ddp-checkpointed": _ddp_checkpointed, "fsdp2": _fsdp2, "fsdp1": _fsdp1}


def _error_names_parameters_and_ranks(kind, poisoned):
    model = BUILD[kind]()
    for name, rank in poisoned:
        _poison(model, kind, name, rank)
    clipper = distclip.GradClipper(model, max_norm=1.0, nonfinite="error")
    with pytest.raises(RuntimeError, match="non-finite") as raised:
        clipper.clip_()
    return str(raised.value)


@pytest.mark.parametrize(
    "kind,poisoned,expected",
    [
        # DDP replicas after the all-reduce: a NaN on one alone would be copies that differ.
        ("ddp", [("layers.1.weight", 0), ("layers.1.weight", 1)], "NaN/inf gradients in layers.1.weight (ranks 0, 1)"),
        ("ddp-checkpointed", [("layers.1.bias", 0), ("layers.1.bias", 1)], "in layers.1.bias (ranks 0, 1)"),
        ("fsdp2", [("layers.0.weight", 0), ("layers.2.bias", 1)], "layers.0.weight (rank 0); layers.2.bias (rank 1)"),
        ("fsdp2", [("norm.weight", 0), ("norm.weight", 1)], "norm.weight (ranks 0, 1)"),
        ("fsdp1", [("layers.2.bias", 1)], "NaN/inf gradients in layers.2.bias (rank 1)"),
    ],
)
def test_nonfinite_error_names_the_parameters_and_ranks_on_every_rank(ranks, kind, poisoned, expected):
    messages = ranks(2).run(_error_names_parameters_and_ranks, kind, poisoned)
    assert messages[0] == messages[1], messages
    assert expected in messages[0], messages[0]


def _report(kind, poisoned, as_params):
    model = BUILD[kind]()
    for name, rank in poisoned:
        _poison(model, kind, name, rank)
    clipper = distclip.GradClipper(list(model.parameters()) if as_params else model, max_norm=1.0)
    return clipper.nonfinite_report()


def test_nonfinite_report_is_the_same_data_on_every_rank(ranks):
    reports = ranks(2).run(_report, "fsdp2", [("layers.2.weight", 1), ("layers.0.bias", 0)], False)
    assert reports == [{"layers.0.bias": [0], "layers.2.weight": [1]}] * 2


def test_nonfinite_report_is_empty_when_every_gradient_is_finite(ranks):
    assert ranks(2).run(_report, "ddp", [], False) == [{}, {}]


def test_nonfinite_report_without_a_module_names_parameters_by_index(ranks):
    # build(): layers.0.weight, layers.0.bias, layers.1.weight, ... so layers.1.bias is index 3
    assert ranks(2).run(_report, "ddp", [("layers.1.bias", 0)], True) == [{"parameters[3]": [0]}] * 2
