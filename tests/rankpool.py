"""A pool of real processes forming one gloo process group, that runs a test function on every rank.

Starting processes and importing torch costs seconds, so a pool of ``world_size`` ranks is
started once per test session (per pytest-xdist worker) and reused.  Each call sends a picklable
module-level function to every rank and waits, with a timeout, for all of them.  Any failure or
timeout tears the pool down (its process group may be mid-collective) and the next call starts a
fresh one, so a hang fails one test fast instead of wedging the session.
"""

from __future__ import annotations

import gc
import multiprocessing as mp
import os
import queue
import sys
import tempfile
import time
import traceback
from typing import Any, Callable

DEFAULT_TIMEOUT_S = float(os.environ.get("DISTCLIP_TEST_TIMEOUT", "180"))
# After one rank fails, how long the others get to report (they may be raising the same error
# or be blocked in a collective that will never complete).
GRACE_S = 10.0


def _worker(rank: int, world_size: int, init_file: str, sys_path: list[str], tasks, results) -> None:
    sys.path[:] = sys_path
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size
    )
    # What torch's imports made lives as long as the process: out of every later collection
    # (``release_task_groups`` collects after each task; a full collection of torch's objects
    # took ~0.3-0.7 s per rank per task).
    gc.freeze()
    while True:
        task = tasks.get()
        if task is None:
            break
        fn, args, kwargs = task
        try:
            outcome = (rank, True, fn(*args, **kwargs))
        except BaseException:  # report everything, pytest.fail and KeyboardInterrupt included
            outcome = (rank, False, traceback.format_exc())
        # Before reporting, so that the next task never overlaps this one's clean-up.
        release_task_groups()
        results.put(outcome)
    dist.destroy_process_group()


def release_task_groups() -> None:
    """Destroy every process group but WORLD.

    Tests create groups (``new_group``, every DeviceMesh with a dimension smaller than the
    world, FSDP1 hybrid sharding) and a reused worker would keep them all: each gloo group holds
    its own threads, and hundreds of tests made hundreds of groups per worker.  Every rank runs
    the same tasks, so every rank destroys the same groups; gloo needs no peer for it.
    """
    import torch.distributed as dist
    from torch.distributed.distributed_c10d import _world

    from distclip.plancache import clear_plans

    created = [pg for pg in list(_world.pg_map) if pg is not dist.group.WORLD]
    for pg in created:
        dist.destroy_process_group(pg)
    clear_plans()  # cached plans hold the groups and meshes of their calls
    _forget_dtensor_caches()
    gc.collect()  # DeviceMesh and DTensor objects referring to them


def _forget_dtensor_caches() -> None:
    """Clear DTensor's process-wide caches of meshes.

    They are keyed by mesh *value*: a later test's new mesh equal to an old one would be served
    the old one's plans, flattened meshes included, whose process groups are destroyed by then.
    """
    from torch.distributed.tensor import _collective_utils, _redistribute
    from torch.distributed.tensor.debug import _clear_sharding_prop_cache

    _clear_sharding_prop_cache()  # the Python and the C++ fast-path caches (torch's own test helper)
    _redistribute._gen_transform_infos.cache_clear()
    _redistribute.clear_redistribute_planner_cache()
    _collective_utils.MeshTopoInfo.build_from_mesh.cache_clear()


class RankFailure(AssertionError):
    pass


# A forkserver that has imported torch once forks each rank in milliseconds; spawning a fresh
# interpreter costs each rank ~2 s of CPU for the imports (a world-4 pool took ~8.6 s to start on
# the 2-core machine, and a pool restarts after every test whose ranks fail).  The server is
# single-threaded, so forking it is safe, unlike forking the pytest process.
# torch._inductor is what the profiler (reference.collectives) imports when it first starts:
# ~2-4 s in every rank process instead of once in the server.  The ranks of launch/train.py
# (torchrun.run_preloaded) import little beyond these (DCP, pipelining, matplotlib: < 1 s).
PRELOAD = ["torch", "torch.distributed", "torch.distributed.tensor", "torch.distributed.fsdp", "distclip",
           "torch._inductor"]


def forkserver_context() -> mp.context.BaseContext:
    """The "forkserver" context with PRELOAD.  A process has ONE forkserver, whose preload is
    the list set when it starts: every user of it in the tests (this pool, the ranks of
    torchrun.run_preloaded) takes its context from here, so whichever starts it, it preloads
    PRELOAD."""
    context = mp.get_context("forkserver")
    context.set_forkserver_preload(PRELOAD)
    return context


class RankPool:
    """``world_size`` processes in one gloo process group (WORLD), rank i running on process i."""

    def __init__(self, world_size: int) -> None:
        self.world_size = world_size
        self._processes: list[mp.Process] = []

    def _start(self) -> None:
        context = forkserver_context()
        fd, init_file = tempfile.mkstemp(prefix="distclip-pg-")
        os.close(fd)
        os.unlink(init_file)  # FileStore wants a path that does not exist yet
        self._tasks = [context.Queue() for _ in range(self.world_size)]
        self._results = context.Queue()
        self._processes = [
            context.Process(
                target=_worker,
                args=(rank, self.world_size, init_file, list(sys.path), self._tasks[rank], self._results),
                daemon=True,
            )
            for rank in range(self.world_size)
        ]
        for process in self._processes:
            process.start()

    def shutdown(self) -> None:
        for process in self._processes:
            if process.is_alive():
                process.kill()
        for process in self._processes:
            process.join(timeout=10)
        self._processes = []

    def run(self, fn: Callable[..., Any], *args: Any, timeout: float = DEFAULT_TIMEOUT_S, **kwargs: Any) -> list[Any]:
        """Run ``fn(*args, **kwargs)`` on every rank; return the results in rank order.

        Raises RankFailure with every failing rank's traceback, or on timeout.
        """
        if not self._processes or not all(p.is_alive() for p in self._processes):
            self.shutdown()
            self._start()
        for task_queue in self._tasks:
            task_queue.put((fn, args, kwargs))

        results: dict[int, Any] = {}
        failures: dict[int, str] = {}
        deadline = time.monotonic() + timeout
        while len(results) + len(failures) < self.world_size:
            pending = set(range(self.world_size)) - set(results) - set(failures)
            now = time.monotonic()
            if now >= deadline:
                failures.update({r: f"no answer within {timeout:.0f} s (hung?)" for r in pending})
                break
            try:
                rank, ok, value = self._results.get(timeout=min(0.5, deadline - now))
            except queue.Empty:
                for r in pending:
                    if not self._processes[r].is_alive():
                        failures[r] = f"process died (exit code {self._processes[r].exitcode})"
                continue
            (results if ok else failures)[rank] = value
            if failures:  # the rest may be blocked in a collective the failed rank left
                deadline = min(deadline, time.monotonic() + GRACE_S)
        if failures:
            self.shutdown()
            report = "\n".join(f"--- rank {r} ---\n{failures[r]}" for r in sorted(failures))
            raise RankFailure(f"{fn.__name__} failed on ranks {sorted(failures)}:\n{report}")
        return [results[r] for r in range(self.world_size)]
