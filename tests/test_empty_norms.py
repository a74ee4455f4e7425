"""The norm of no element at all is 0, for every p (torch's value for no gradients): a model
with no gradient, an empty tensor, a group with no gradient on any rank, at world 1 and 2."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch import nn

import distclip
from models import NORM_TYPES

EVERY_P = NORM_TYPES + [-1.0, -2.0]


@pytest.mark.parametrize("norm_type", EVERY_P)
def test_no_gradient_at_all_has_norm_zero(norm_type):
    assert distclip.get_total_norm([], norm_type).item() == 0.0
    assert distclip.get_total_norm([torch.zeros(0)], norm_type).item() == 0.0


@pytest.mark.parametrize("norm_type", EVERY_P)
def test_a_group_with_no_gradient_has_norm_zero(norm_type):
    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
    for p in model[0].parameters():
        p.grad = torch.ones_like(p)
    result = distclip.GradClipper(model, norm_type=norm_type, groups="modules").clip_()
    assert result.all_group_norms["1"].item() == 0.0


def _frozen_everywhere(norm_type):
    model = nn.Linear(3, 3)  # no gradient on any rank
    total = distclip.clip_grad_norm_(model, 1.0, norm_type, error_if_nonfinite=True)
    result = distclip.GradClipper(model, norm_type=norm_type, nonfinite="error").clip_()
    return total.item(), result.total_norm.item()


@pytest.mark.parametrize("norm_type", [-1.0, -2.0, float("-inf"), 2.0])
def test_a_model_without_gradients_on_any_rank_has_norm_zero(ranks, norm_type):
    assert ranks(2).run(_frozen_everywhere, norm_type) == [(0.0, 0.0)] * 2
