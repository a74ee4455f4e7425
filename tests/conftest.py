import fcntl
import json
from pathlib import Path
from typing import Any, Callable

import pytest

from rankpool import RankPool


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
