"""launch/train.py end to end: every parallelism gives the same grad-norm history (the proof
that every element is counted once), resume continues it, bad input fails in one line."""

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from torchrun import run_torchrun

TRAIN = Path(__file__).resolve().parent.parent / "launch" / "train.py"
TINY = ["--steps", "3", "--dim", "32", "--layers", "2", "--seq-len", "32", "--global-batch", "8", "--no-progress"]


def _torchrun(nproc, *args, cwd):
    return run_torchrun(nproc, str(TRAIN), *args, cwd=cwd)


def _history(out: Path, key="grad_norm"):
    return [json.loads(line)[key] for line in (out / "metrics.jsonl").read_text().splitlines()]


def _train(nproc, *args):
    """``make`` for ``once``: a run of train.py with ``args`` in the given directory."""

    def make(out: Path) -> str:
        result = _torchrun(nproc, *args, "--out", str(out), cwd=out)
        assert result.returncode == 0, result.stderr[-3000:]
        return str(out)

    return make


# The runs that several tests check run once per test session, whichever xdist worker asks first.


@pytest.fixture(scope="module")
def ddp_history(once):
    return _history(Path(once("train-ddp", _train(2, *TINY))))


@pytest.fixture(scope="module")
def fsdp2_run(once):
    """An FSDP2 run that also checkpoints at step 2: the agreement and the resume test share it."""
    return Path(once("train-fsdp2", _train(2, *TINY, "--parallel", "fsdp2", "--save-every", "2")))


# HSDP runs with --overlap (partials taken during backward): the history must not change, and
# every step after the first takes its partials from backward.  (Without overlap HSDP runs in the
# two-node test below.)
@pytest.mark.parametrize("parallel", ["fsdp2", "hsdp", "fsdp2+tp", "pp", "fsdp1"])
def test_every_parallelism_agrees_with_ddp_on_the_grad_norm_history(parallel, ddp_history, tmp_path, request):
    if parallel == "fsdp2":
        out = request.getfixturevalue("fsdp2_run")
    else:
        out = tmp_path
        overlap = ["--overlap"] if parallel == "hsdp" else []
        result = _torchrun(2, *TINY, "--parallel", parallel, *overlap, "--out", str(out), cwd=out)
        assert result.returncode == 0, result.stderr[-3000:]
        if overlap:
            assert "overlap: partials from backward on 2 of 3 steps (0 fell back" in result.stdout, result.stdout[-2000:]
    history = _history(out)
    assert len(history) == len(ddp_history) == 3
    for ours, reference in zip(history, ddp_history):
        assert abs(ours - reference) <= 1e-4 * reference, (parallel, history, ddp_history)


def test_gradient_accumulation_clips_once_per_step_with_the_same_norms(ddp_history, tmp_path):
    result = _torchrun(2, *TINY, "--grad-accum", "2", "--out", str(tmp_path), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert _history(tmp_path) == pytest.approx(ddp_history, rel=1e-4)


def test_resume_from_a_checkpoint_continues_the_same_history(fsdp2_run, tmp_path):
    resumed = _torchrun(2, *TINY, "--parallel", "fsdp2", "--resume", str(fsdp2_run / "step_2"),
                        "--out", str(tmp_path), cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert _history(tmp_path) == _history(fsdp2_run)[2:]
    assert (fsdp2_run / "metrics.png").stat().st_size > 0


SPIKY = [*TINY[:-1], "--steps", "32", "--clip", "autoclip", "--skip-spikes", "--inject-spike", "30"]


@pytest.fixture(scope="module")
def spiky_run(once):
    """AutoClip (warm-up 25) with spike skipping (min_history 20) and a spike injected at 30,
    checkpointed at 28."""
    return Path(once("train-spiky", _train(2, *SPIKY, "--save-every", "28")))


def test_injected_spike_is_skipped_and_the_threshold_adapts(spiky_run):
    assert [i + 1 for i, s in enumerate(_history(spiky_run, "skipped")) if s] == [30]
    thresholds = _history(spiky_run, "max_norm")
    assert all(t is None or t == float("inf") for t in thresholds[:24]), thresholds[:24]  # warm-up
    norms = _history(spiky_run, "grad_norm")
    assert all(0 < t < max(norms[:29]) * 1.5 for t in thresholds[24:]), thresholds[24:]
    losses = _history(spiky_run, "loss")
    assert losses[29] > 20 * max(losses[25:29]), losses[25:31]  # the clipper's global mean loss
    assert (spiky_run / "metrics.png").stat().st_size > 0


def test_resume_restores_the_threshold_and_spike_windows(spiky_run, tmp_path):
    resumed = _torchrun(2, *SPIKY, "--resume", str(spiky_run / "step_28"), "--out", str(tmp_path), cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    for key in ("max_norm", "skipped", "grad_norm", "loss"):
        assert _history(tmp_path, key) == _history(spiky_run, key)[28:], key


def _one_error_line(stderr: str, message: str) -> None:
    ours = [line for line in stderr.splitlines() if line.startswith("train.py: error:")]
    assert len(ours) == 1 and message in ours[0], stderr[-2000:]


@pytest.mark.parametrize(
    "args,message",
    [
        (["--parallel", "zero3"], "unknown --parallel"),
        (["--data", "missing.txt"], "does not exist"),
        (["--clip", "sometimes"], "unknown --clip"),
        (["--inject-spike", "0"], "not a step of this run"),
    ],
)
def test_bad_arguments_fail_with_one_line(args, message, tmp_path):
    # Checked before any process group exists: one process shows it (torchrun adds nothing).
    result = subprocess.run([sys.executable, str(TRAIN), *args, "--out", str(tmp_path)],
                            capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert result.returncode == 2
    _one_error_line(result.stderr, message)
    assert "Traceback" not in result.stdout + result.stderr


def test_a_bad_world_size_fails_with_one_line_on_rank_0_under_torchrun(tmp_path):
    result = _torchrun(2, "--parallel", "fsdp2+tp", "--tp", "3", "--out", str(tmp_path), cwd=tmp_path)
    assert result.returncode != 0
    _one_error_line(result.stderr, "divisible by --tp")  # rank 1 waits, so rank 0 always gets to say it
    assert "Traceback" not in result.stdout


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _two_nodes(*args, cwd, timeout=240):
    """Two torchrun agents on this machine as two nodes of one worker each, meeting through a
    c10d rendezvous on 127.0.0.1.  Returns both agents' CompletedProcess-like results."""
    endpoint = f"127.0.0.1:{_free_port()}"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    agents = [
        subprocess.Popen(
            [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", f"--node-rank={node}",
             "--nproc-per-node=1", "--rdzv-backend=c10d", f"--rdzv-endpoint={endpoint}",
             "--rdzv-id=distclip-two-nodes", "--max-restarts=0", str(TRAIN), *args],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=cwd,
        )
        for node in (0, 1)
    ]
    try:
        outputs = [agent.communicate(timeout=timeout) for agent in agents]
    finally:
        for agent in agents:
            agent.kill()
    return [subprocess.CompletedProcess(a.args, a.returncode, out, err) for a, (out, err) in zip(agents, outputs)]


def test_two_nodes_of_hsdp_give_the_one_node_grad_norm_history(ddp_history, tmp_path):
    results = _two_nodes(*TINY, "--parallel", "hsdp", "--replicas", "2", "--out", str(tmp_path), cwd=tmp_path)
    for node, result in enumerate(results):
        assert result.returncode == 0, f"node {node}: {result.stderr[-3000:]}"
    assert _history(tmp_path) == pytest.approx(ddp_history, rel=1e-4)


def test_a_rank_that_raises_before_the_clip_makes_the_other_node_fail_not_hang(tmp_path):
    started = time.monotonic()
    results = _two_nodes(*TINY, "--parallel", "hsdp", "--replicas", "2", "--pg-timeout", "30",
                         "--inject-failure", "2:1", "--out", str(tmp_path), cwd=tmp_path, timeout=150)
    elapsed = time.monotonic() - started
    assert all(result.returncode != 0 for result in results), [r.returncode for r in results]
    assert "injected failure on rank 1 at step 2" in results[1].stderr
    assert elapsed < 120, f"took {elapsed:.0f} s: the surviving rank waited far past --pg-timeout 30"
