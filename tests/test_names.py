"""One naming rule: ``explain``, the non-finite report and per-group norms name a parameter as
the model the user wrote names it, whatever wraps it (DDP, torch.compile, activation
checkpointing, FSDP1), and a parameter given in a list by its position."""

import math

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
from torch.nn.parallel import DistributedDataParallel as DDP

import distclip
from models import backward, batch, build

MLP_NAMES = [
    "layers.0.weight", "layers.0.bias", "layers.1.weight", "layers.1.bias", "layers.2.weight", "layers.2.bias",
    "norm.weight", "norm.bias", "head.weight", "head.bias",
]


def _with_grads(model: nn.Module) -> nn.Module:
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    return model


def _poisoned_report(model: nn.Module, poisoned: nn.Parameter) -> dict:
    poisoned.grad.view(-1)[0] = math.nan
    return distclip.GradClipper(model).nonfinite_report()


def test_a_compiled_model_is_named_as_the_model_inside():
    model = _with_grads(build())
    compiled = torch.compile(model)  # nothing is compiled before its first call
    assert [row.name for row in distclip.explain(compiled)] == MLP_NAMES
    assert _poisoned_report(compiled, model.norm.bias) == {"norm.bias": [0]}


def test_activation_checkpointing_wrappers_leave_no_prefix():
    model = build()
    model.layers[1] = checkpoint_wrapper(model.layers[1])
    _with_grads(model)
    assert [row.name for row in distclip.explain(model)] == MLP_NAMES
    assert _poisoned_report(model, model.layers[1].weight) == {"layers.1.weight": [0]}


def test_per_module_groups_of_a_compiled_model_are_its_own_modules():
    model = _with_grads(build())
    clipper = distclip.GradClipper(torch.compile(model), groups="modules")
    assert set(clipper.clip_().group_norms) == {"layers", "norm", "head"}


def test_parameters_given_as_a_list_are_named_by_position():
    params = list(_with_grads(build()).parameters())
    params[3].grad = None  # left out of explain, and still parameters[4] after it
    assert [row.name for row in distclip.explain(params)][3:5] == ["parameters[4]", "parameters[5]"]


def _ddp_names():
    model = DDP(build())
    backward(model, batch(dist.get_rank()))
    explained = [row.name for row in distclip.explain(model)]
    report = _poisoned_report(model, model.module.head.weight)
    groups = sorted(distclip.GradClipper(model, groups="modules", nonfinite="propagate").clip_().group_norms)
    return explained, report, groups


def test_ddp_names_are_the_wrapped_models(ranks):
    for explained, report, groups in ranks(2).run(_ddp_names):
        assert explained == MLP_NAMES
        assert report == {"head.weight": [0, 1]}
        assert groups == ["head", "layers", "norm"]


def _fsdp1_names():
    torch.manual_seed(0)
    model = build()
    model.layers[0] = FSDP(model.layers[0], device_id=torch.device("cpu"))
    model = FSDP(model, device_id=torch.device("cpu"))
    backward(model, batch(0))
    return [row.name for row in distclip.explain(model)]


def test_fsdp1_flat_parameters_are_named_after_their_units(ranks):
    for explained in ranks(2).run(_fsdp1_names):
        assert explained == ["_flat_param", "layers.0._flat_param"]
