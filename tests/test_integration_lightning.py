"""distclip.integrations.lightning in real two-process CPU runs of Lightning 2.6.

``Trainer(accelerator="cpu", devices=2)`` fits the same model on the same data under DDP,
FSDP and ModelParallelStrategy (FSDP2) with :class:`GlobalNormClipping`; Fabric (DDP) clips with
:func:`clip_gradients`.  Each step: the norm equals the float64 reference of the full
gradients, is what the callback logged, is identical on both ranks, took one collective, and
the three Trainer strategies give the same norm history; with ``groups="modules"`` (DDP,
FSDP1, FSDP2) the groups are the LightningModule's children, at their reference norms.  The same
processes then try a fit the callback must refuse on every rank before any step:
``Trainer(gradient_clip_val=...)`` beside it (Lightning would clip again after it).

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
from pathlib import Path

import pytest

pytest.importorskip("lightning")

from reference import clipper_step  # noqa: E402


JOB = os.path.join(os.path.dirname(os.path.abspath(__file__)), "lightning_job.py")
STRATEGIES = {"ddp": "Linear", "fsdp": "FullyShardedDataParallel", "model_parallel": "FSDPLinear", "fabric": "fabric"}


def _run(strategy: str):
    """``make`` for ``once``: both ranks' records of one run of ``strategy``."""

    def make(out: Path) -> list:
        env = dict(os.environ, OMP_NUM_THREADS="1")
        result = subprocess.run([sys.executable, JOB, strategy, str(out)], capture_output=True, text=True,
                                timeout=240, env=env, cwd=out)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
        return [json.loads((out / f"rank{rank}.json").read_text()) for rank in (0, 1)]

    return make


@pytest.fixture
def run(once):
    """``run(strategy)``: both ranks' records of the run of ``strategy`` (once per test session)."""
    return lambda strategy: once(f"lightning-{strategy}", _run(strategy))


@pytest.fixture
def rows(run):
    """``rows(strategy)``: both ranks' rows, one per step, of the run of ``strategy``."""
    return lambda strategy: [record["rows"] for record in run(strategy)]


@pytest.mark.parametrize("strategy", list(STRATEGIES))
def test_every_step_clips_by_the_reference_norm_logged_identical_on_both_ranks_from_one_collective(strategy, rows):
    rank0, rank1 = rows(strategy)
    assert len(rank0) == len(rank1) == 4
    assert {row["kind"] for row in rank0 + rank1} == {STRATEGIES[strategy]}, "not wrapped as the strategy says"
    for step, row in [(step, row) for rows_of_rank in (rank0, rank1) for step, row in enumerate(rows_of_rank)]:
        assert math.isclose(row["ours"], row["expected"], rel_tol=1e-6), ("not the reference", step, row)
        assert row["logged"] == row["ours"], ("logged another value", step, row)
        # Fabric's helper is the functional clip; the callback's GradClipper agrees on names first.
        one_step = ["gloo:all_reduce"] if row["kind"] == "fabric" else clipper_step(first=step == 0)
        assert row["collectives"] == one_step, ("not one collective", step, row)
    assert [r["ours"] for r in rank0] == [r["ours"] for r in rank1], "ranks disagree"


@pytest.mark.parametrize("strategy", ["fsdp", "model_parallel"])
def test_sharded_strategies_give_the_ddp_norm_history(strategy, rows):
    ddp = [row["ours"] for row in rows("ddp")[0]]
    sharded = [row["ours"] for row in rows(strategy)[0]]
    assert all(math.isclose(a, b, rel_tol=1e-5) for a, b in zip(ddp, sharded)), (ddp, sharded)


@pytest.mark.parametrize("strategy", ["ddp", "fsdp", "model_parallel"])
def test_group_norms_are_named_after_the_lightning_modules_children(strategy, rows):
    # Under DDP the strategy's wrapper has one child, `module`: its name is not the user's.
    rank0, rank1 = rows(strategy)
    for step, row in enumerate(rank0 + rank1):
        assert sorted(row["logged_groups"]) == ["encoder", "head"], (step, row["logged_groups"])
        for name, norm in row["logged_groups"].items():
            assert math.isclose(norm, row["expected_groups"][name], rel_tol=1e-6), (step, name, row)
    assert [r["logged_groups"] for r in rank0] == [r["logged_groups"] for r in rank1], "ranks disagree"


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_gradient_clip_val_beside_the_callback_is_refused_on_every_rank_before_any_step(run, strategy):
    # Lightning clips after on_before_optimizer_step: both would clip, its threshold last.
    for record in run(strategy):
        assert record["refused"]["steps"] == 0, record["refused"]
        assert "Trainer(gradient_clip_val=0.1) would clip them again" in (record["refused"]["error"] or ""), record
        assert "max_norm=0.05" in record["refused"]["error"]


def _fit(callback, steps: int):
    import lightning.pytorch as pl
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    sys.path.insert(0, os.path.dirname(JOB))
    from lightning_job import Model

    data = TensorDataset(torch.randn(64, 16, generator=torch.Generator().manual_seed(5)) * 3)
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=steps, callbacks=[callback], logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(Model(), DataLoader(data, batch_size=8))


def test_callback_state_survives_a_checkpoint_before_its_first_step():
    import distclip
    from distclip.integrations.lightning import GlobalNormClipping

    first = GlobalNormClipping(distclip.ZClip(warmup_steps=2), skip_spikes=distclip.SpikeSkip(min_history=2))
    _fit(first, steps=5)
    saved = first.state_dict()
    resumed = GlobalNormClipping(distclip.ZClip(warmup_steps=2), skip_spikes=distclip.SpikeSkip(min_history=2))
    resumed.load_state_dict(saved)
    assert resumed.state_dict() == saved  # a checkpoint taken before the first step keeps it
    _fit(resumed, steps=1)
    assert resumed.clipper.steps == first.clipper.steps + 1


def test_a_skipped_step_leaves_the_parameters_as_they_were():
    import lightning.pytorch as pl
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    from distclip.integrations.lightning import GlobalNormClipping

    sys.path.insert(0, os.path.dirname(JOB))
    from lightning_job import Model

    class NaNAtStep2(Model):
        def training_step(self, batch, index):
            loss = super().training_step(batch, index)
            return loss * float("nan") if self.global_step == 2 else loss

    class Changes(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, *_):
            self.before = [p.detach().clone() for p in pl_module.parameters()]

        def on_train_batch_end(self, trainer, pl_module, *_):
            changed.append(any(not torch.equal(a, p) for a, p in zip(self.before, pl_module.parameters())))

    changed: list[bool] = []
    data = TensorDataset(torch.randn(64, 16, generator=torch.Generator().manual_seed(5)) * 3)
    clipping = GlobalNormClipping(1.0, nonfinite="skip")
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=4, callbacks=[clipping, Changes()], logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(NaNAtStep2(), DataLoader(data, batch_size=8))
    assert changed == [True, True, False, True], changed
    assert int(clipping.clipper.state_dict()["skipped_steps"]) == 1
