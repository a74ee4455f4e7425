"""The default path never makes the host wait for the device: no ``aten._local_scalar_dense``
(``.item()``, ``bool()``, ``tolist()`` on a tensor) in clip_grad_norm_, get_total_norm,
clip_grads_with_norm_ or GradClipper, under DDP, FSDP2 and FSDP2 + a plain tensor, for every
norm type.  (The policies' audit is in test_policies.py.)  Run on CPU, where a sync is free but
the dispatch is the same as on an accelerator."""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist

import distclip
from models import backward, batch, build, wrap
from reference import NoHostSync, by_case, every_case


def _default_paths_never_sync(norm_type, kind):
    model = wrap(build(), "ddp" if kind == "ddp" else "fsdp2")
    params = list(model.parameters())
    if kind == "fsdp2+plain":  # a plain replicated tensor beside the DTensors
        extra = torch.nn.Parameter(torch.ones(3))
        extra.grad = torch.full((3,), 0.5)
        params.append(extra)
    clipper = distclip.GradClipper(params, max_norm=0.1, norm_type=norm_type, groups={"first": params[:2]})
    for step in range(2):  # the first call plans, the second reuses the plan
        backward(model, batch(dist.get_rank()))
        with NoHostSync(host_data=step > 0):
            norm = distclip.clip_grad_norm_(params, 0.1, norm_type)
            total = distclip.get_total_norm([p.grad for p in params], norm_type)
            distclip.clip_grads_with_norm_(params, 0.1, total)
            result = clipper.clip_()
        model.zero_grad()
    return [norm.item().hex(), result.total_norm.item().hex()]


@pytest.mark.parametrize("kind", ["ddp", "fsdp2", "fsdp2+plain"])
def test_default_paths_never_wait_for_the_device(ranks, kind):
    norm_types = [2.0, 1.0, math.inf, -math.inf, 0.0]
    for norm_type, per_rank in by_case(ranks(2).run(every_case, _default_paths_never_sync, norm_types, kind)).items():
        assert per_rank[0] == per_rank[1], norm_type


@pytest.mark.parametrize("norm_type", [2.0, math.inf, -math.inf])
def test_default_paths_without_a_process_group_never_wait_for_the_device(norm_type):
    model = build()
    params = list(model.parameters())
    clipper = distclip.GradClipper(params, max_norm=0.1, norm_type=norm_type, groups={"first": params[:2], "last": params[-1:]})
    for step in range(2):  # the first call plans, the second reuses the plan
        backward(model, batch(0))
        params[-1].grad = None  # a parameter without a gradient: a group with nothing present
        with NoHostSync(host_data=step > 0):
            distclip.clip_grad_norm_(params, 0.1, norm_type)
            distclip.clip_grads_with_norm_(params, 0.1, distclip.get_total_norm([p.grad for p in params[:-1]], norm_type))
            clipper.clip_()
        model.zero_grad()
