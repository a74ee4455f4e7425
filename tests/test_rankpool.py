"""No leaks: a reused test worker must not accumulate what earlier tests created, and distclip
must not keep a user's meshes (and with them their process groups) alive."""

import gc
import os
import weakref

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.distributed_c10d import _world
from torch.distributed.tensor import DTensor, Shard, distribute_tensor
from torch import nn

import distclip


def _threads() -> int:
    return len(os.listdir("/proc/self/task"))


def _groups_and_threads():
    return len(_world.pg_map), _threads()


def _create_meshes_and_groups():
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
    dist.new_subgroups(group_size=2)
    param = nn.Parameter(distribute_tensor(torch.ones(8), mesh["dp"], [Shard(0)]))
    param.grad = distribute_tensor(torch.ones(8), mesh["dp"], [Shard(0)])
    distclip.clip_grad_norm_([param], 1.0)
    return _groups_and_threads()


def test_a_task_releases_the_process_groups_it_created(ranks):
    pool = ranks(4)
    threads_after = []
    for _ in range(3):
        during = pool.run(_create_meshes_and_groups)
        after = pool.run(_groups_and_threads)
        assert all(groups > 1 for groups, _ in during), during  # the task really made groups
        assert all(groups == 1 for groups, _ in after), f"groups left behind: {after}"
        threads_after.append([threads for _, threads in after])
    # The first task may start WORLD's own gloo threads; after that nothing may accumulate.
    assert threads_after[1] == threads_after[2], threads_after


def _mesh_is_freed_after_clipping():
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("mesh_kept", "alive"))
    # A bare DTensor from from_local: no sharding propagation, whose own caches keep meshes.
    grad = DTensor.from_local(torch.ones(2), mesh, [Shard(0), Shard(0)], run_check=False)
    distclip.get_total_norm([grad])
    alive = weakref.ref(mesh)
    del mesh, grad
    gc.collect()
    return alive() is None


def test_clipping_does_not_keep_a_device_mesh_alive(ranks):
    assert ranks(4).run(_mesh_is_freed_after_clipping) == [True] * 4
