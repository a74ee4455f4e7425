"""distclip.integrations.accelerate under a real ``accelerate launch`` of two CPU processes.

Accelerate 1.15 on a machine without accelerators: ``accelerate launch --cpu --num_processes 2``
starts one process (its multi-CPU mode expects an MPI launcher), so the test launches with
``--multi_gpu --num_processes 2`` (torchrun underneath) and the script asks for
``Accelerator(cpu=True)``: DDP over gloo.  Accelerate's FSDP configurations do not run on CPU:
it sets ``DistributedType.FSDP`` only over accelerators, so with ``cpu=True`` the FSDP plugin is
ignored (the model is wrapped in DDP), and without it FSDP1 fails with "There are currently no
available devices found" and FSDP2 runs each process alone.
"""

from __future__ import annotations

import json
import math
import os
import socket
import sys

import pytest

from torchrun import run_launched

pytest.importorskip("accelerate")


JOB = os.path.join(os.path.dirname(os.path.abspath(__file__)), "accelerate_job.py")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(*flags: str, tmp_path) -> list[dict]:
    # A port of its own: Accelerate's default (29500) would collide with another launch.
    command = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", "--num_machines", "1",
               "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(_free_port()),
               *flags, JOB, "--cpu"]
    result = run_launched(command, JOB, cwd=tmp_path, timeout=240)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]


@pytest.fixture(scope="module")
def ddp_results(once):
    # Once per test session, whichever xdist worker asks first.
    return once("accelerate-ddp", lambda out: _launch("--multi_gpu", tmp_path=out))


def test_the_launch_is_two_ddp_processes(ddp_results):
    assert [r["rank"] for r in ddp_results] == [0, 1]
    assert {r["kind"] for r in ddp_results} == {"DistributedDataParallel"}


def test_norm_is_the_float64_reference_every_step(ddp_results):
    for result in ddp_results:
        for step, row in enumerate(result["rows"]):
            assert math.isclose(row["ours"], row["expected"], rel_tol=1e-6), (step, row)
            assert row["plain"], "the norm is a plain tensor"


def test_norm_is_bitwise_identical_on_both_ranks(ddp_results):
    per_step = zip(*(r["rows"] for r in ddp_results))
    for step, rows in enumerate(per_step):
        assert len({row["ours_hex"] for row in rows}) == 1, (step, rows)


def test_gradients_are_scaled_by_the_coefficient_of_the_global_norm(ddp_results):
    assert all(row["scaled_exactly"] for r in ddp_results for row in r["rows"])


def test_one_collective_per_clip(ddp_results):
    assert all(row["collectives"] == ["gloo:all_reduce"] for r in ddp_results for row in r["rows"])


def test_agrees_with_accelerates_own_method_under_ddp(ddp_results):
    for result in ddp_results:
        for row in result["rows"]:
            assert math.isclose(row["theirs"], row["ours"], rel_tol=1e-6), row
