"""DistributedDataParallel: replicated gradients are counted once, their norm work is split."""

import pytest
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from distclip.ownership import plan_ownership
from distclip.topology import resolve_topology
from models import NORM_TYPES, backward, batch, build
from reference import assert_same_on_all_ranks_in_every_case, clip_and_check_each


def _ddp_clip():
    model = DDP(build())
    backward(model, batch(dist.get_rank()))
    return clip_and_check_each(model.module.named_parameters(), NORM_TYPES)


@pytest.mark.parametrize("world_size", [2, 4])
def test_ddp_norm_equals_full_gradient_norm(ranks, world_size):
    assert_same_on_all_ranks_in_every_case(ranks(world_size).run(_ddp_clip))


def _owned_elements():
    model = DDP(build())
    backward(model, batch(dist.get_rank()))
    grads = [p.grad for p in model.parameters()]
    ownership = plan_ownership(grads, resolve_topology())
    return ownership.owned, [g.numel() for g in grads]


@pytest.mark.parametrize("world_size", [2, 4])
def test_ddp_replicas_split_the_norm_work_evenly(ranks, world_size):
    results = ranks(world_size).run(_owned_elements)
    numels = results[0][1]
    counted = [torch.zeros(n, dtype=torch.int64) for n in numels]
    per_rank = []
    for owned, _ in results:
        per_rank.append(sum(stop - start for _, start, stop in owned))
        for i, start, stop in owned:
            counted[i][start:stop] += 1
    assert all(bool((c == 1).all()) for c in counted), "some element counted twice or never"
    assert max(per_rank) - min(per_rank) <= 1, per_rank
