"""Gradients on several DeviceMeshes mixed with plain tensors in one call (FSDP2 + EP style)."""

import pytest
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Replicate, Shard

from models import NORM_TYPES, parameter
from reference import assert_same_on_all_ranks_in_every_case, clip_and_check_each


def _mixed_meshes_clip(dp, ep):
    world = init_device_mesh("cpu", (dp * ep,), mesh_dim_names=("world",))
    root = init_device_mesh("cpu", (dp, ep), mesh_dim_names=("dp", "ep"))
    named = [
        ("dense", parameter((12, 5), world, [Shard(0)], seed=1)),
        ("experts", parameter((4, 6, 3), root, [Replicate(), Shard(0)], seed=2)),
        ("expert_bias", parameter((4, 3), root, [Shard(1), Shard(0)], seed=3)),
        ("router", parameter((6,), root["ep"], [Replicate()], seed=4)),
        ("shared", parameter((5, 3), root["dp"], [Shard(0)], seed=5)),
        ("plain", parameter((7,), seed=6)),
    ]
    return clip_and_check_each(named, NORM_TYPES)


@pytest.mark.parametrize("shape", [(1, 2), (2, 1), (2, 2)], ids=str)
def test_several_meshes_and_plain_tensors_in_one_call(ranks, shape):
    assert_same_on_all_ranks_in_every_case(ranks(shape[0] * shape[1]).run(_mixed_meshes_clip, *shape))


def _uneven_shards_clip():
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    named = [(f"p{n}", parameter((n, 3), mesh, [Shard(0)], seed=n)) for n in (1, 2, 3, 5)]
    named.append(("empty", parameter((0, 4), mesh, [Shard(0)], seed=9)))
    return clip_and_check_each(named, NORM_TYPES)


def test_uneven_and_empty_shards(ranks):
    assert_same_on_all_ranks_in_every_case(ranks(4).run(_uneven_shards_clip))
