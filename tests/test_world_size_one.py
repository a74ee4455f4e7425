"""A one-rank process group: the same results, and no communication at all."""

import torch
from torch import nn

import distclip
from reference import collectives


def _one_rank():
    param = nn.Parameter(torch.randn(5, 5))
    param.grad = torch.randn(5, 5)
    reference = torch.linalg.vector_norm(param.grad.double()).item()
    with collectives() as issued:
        total = distclip.clip_grad_norm_([param], 0.5)
    assert issued == [], issued
    assert abs(total.item() - reference) <= 1e-6 * reference
    assert abs(torch.linalg.vector_norm(param.grad).item() - 0.5) <= 1e-5


def test_one_rank_group_communicates_nothing(ranks):
    ranks(1).run(_one_rank)
