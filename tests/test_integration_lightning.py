"""distclip.integrations.lightning in real two-process CPU runs of Lightning 2.6.

``Trainer(accelerator="cpu", devices=2)`` fits the same model on the same data under DDP,
FSDP and ModelParallelStrategy (FSDP2) with :class:`GlobalNormClipping`; Fabric (DDP) clips with
:func:`clip_gradients`.  Each step: the norm equals the float64 reference of the full
gradients, is what the callback logged, is identical on both ranks, took one collective, and
the three Trainer strategies give the same norm history.

Lightning refuses ``FSDPStrategy`` with ``accelerator="cpu"`` ("requires a GPU accelerator",
checked as ``type(strategy) is FSDPStrategy``) and would pass ``device_id=None`` to FSDP on
CPU; the job runs Lightning's FSDPStrategy through an empty subclass and wraps the model with
FSDP (``device_id=cpu``) in ``configure_model``, after which the strategy leaves it as it is.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest

pytest.importorskip("lightning")

JOB = os.path.join(os.path.dirname(os.path.abspath(__file__)), "lightning_job.py")
STRATEGIES = {"ddp": "Linear", "fsdp": "FullyShardedDataParallel", "model_parallel": "FSDPLinear", "fabric": "fabric"}


def _run(strategy: str, out) -> list[dict]:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, JOB, strategy, str(out)], capture_output=True, text=True,
                            timeout=240, env=env, cwd=out)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return [json.loads((out / f"rank{rank}.json").read_text())["rows"] for rank in (0, 1)]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return {strategy: _run(strategy, tmp_path_factory.mktemp(strategy)) for strategy in STRATEGIES}


@pytest.mark.parametrize("strategy", list(STRATEGIES))
def test_each_strategy_runs_wrapped_as_named(runs, strategy):
    assert {row["kind"] for rank_rows in runs[strategy] for row in rank_rows} == {STRATEGIES[strategy]}
    assert all(len(rank_rows) == 4 for rank_rows in runs[strategy])


@pytest.mark.parametrize("strategy", list(STRATEGIES))
def test_norm_is_the_float64_reference_every_step(runs, strategy):
    for rank_rows in runs[strategy]:
        for step, row in enumerate(rank_rows):
            assert math.isclose(row["ours"], row["expected"], rel_tol=1e-6), (step, row)


@pytest.mark.parametrize("strategy", list(STRATEGIES))
def test_norm_is_identical_on_both_ranks_and_is_what_was_logged(runs, strategy):
    rank0, rank1 = runs[strategy]
    assert [r["ours"] for r in rank0] == [r["ours"] for r in rank1]
    assert all(row["logged"] == row["ours"] for rank_rows in runs[strategy] for row in rank_rows)


@pytest.mark.parametrize("strategy", list(STRATEGIES))
def test_one_collective_per_step(runs, strategy):
    assert all(row["collectives"] == ["gloo:all_reduce"] for rank_rows in runs[strategy] for row in rank_rows)


@pytest.mark.parametrize("strategy", ["fsdp", "model_parallel"])
def test_sharded_strategies_give_the_ddp_norm_history(runs, strategy):
    ddp = [row["ours"] for row in runs["ddp"][0]]
    sharded = [row["ours"] for row in runs[strategy][0]]
    assert all(math.isclose(a, b, rel_tol=1e-5) for a, b in zip(ddp, sharded)), (ddp, sharded)
