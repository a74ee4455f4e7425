import fcntl
import json
import subprocess
from pathlib import Path
from typing import Any, Callable

import pytest

import torchrun
from rankpool import RankPool


def _starts_jobs(item: pytest.Item) -> bool:
    """A test of a module that starts processes of its own: a torchrun or ``accelerate launch``
    job, a job of preloaded ranks (tests/torchrun.py), a training script, a fresh interpreter;
    10-80 s each."""
    module = getattr(item, "module", None)
    names = vars(module).values() if module is not None else ()
    launchers = (torchrun.run_torchrun, torchrun.run_launched, torchrun.run_preloaded)
    return any(value is subprocess or value in launchers for value in names)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The tests that start jobs first, then the rest, each in collection order.  pytest-xdist
    hands out the first quarter of the tests alternately and the rest as workers free up, so
    the long launches start early and spread over the workers, and the many short tests fill
    the end: no worker is left running a launch alone while the others are done (the same
    order on every worker, as xdist requires)."""
    items.sort(key=lambda item: not _starts_jobs(item))


@pytest.fixture(scope="session")
def ranks():
    """``ranks(world_size)``: a pool of that many real gloo ranks, shared by the session."""
    pools: dict[int, RankPool] = {}

    def get(world_size: int) -> RankPool:
        if world_size not in pools:
            pools[world_size] = RankPool(world_size)
        return pools[world_size]

    yield get
    for pool in pools.values():
        pool.shutdown()


@pytest.fixture(scope="session")
def once(tmp_path_factory, worker_id) -> Callable[[str, Callable[[Path], Any]], Any]:
    """``once(name, make)``: ``make(directory)``'s JSON result, computed by one process of the
    whole run however many xdist workers ask (the others wait for it and read it): a torchrun
    launch that several tests check runs once, not once per worker.  A ``make`` that raises
    leaves nothing behind, so the next test that asks runs it again and sees the error."""
    base = tmp_path_factory.getbasetemp()
    shared = base.parent if worker_id != "master" else base  # pytest-N/, above popen-gwK/

    def get(name: str, make: Callable[[Path], Any]) -> Any:
        result = shared / f"once-{name}.json"
        with open(shared / f"once-{name}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
            if not result.exists():
                directory = shared / f"once-{name}"
                directory.mkdir(exist_ok=True)
                value = make(directory)
                result.write_text(json.dumps(value))
        return json.loads(result.read_text())

    return get
