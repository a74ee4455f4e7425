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
