"""launch/train.py end to end: every parallelism gives the same grad-norm history (the proof
that every element is counted once), resume continues it, bad input fails in one line."""

import importlib.util
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from torchrun import free_port, run_preloaded, run_torchrun

TRAIN = Path(__file__).resolve().parent.parent / "launch" / "train.py"
TINY = ["--steps", "3", "--dim", "32", "--layers", "2", "--seq-len", "32", "--global-batch", "8", "--no-progress"]
LAYER_NORMS = ["--layer-norms"]  # the agreement runs log per-layer norms too


def _torchrun(nproc, *args, cwd):
    """train.py under torchrun, as users launch it."""
    return run_torchrun(nproc, str(TRAIN), *args, cwd=cwd)


def _launch(nproc, *args, cwd):
    """train.py on ranks forked from the preloaded forkserver, with torchrun's environment: the
    runs whose subject is train.py's training, not its launch (a torchrun launch costs ~12 s of
    CPU in torch imports before any work)."""
    return run_preloaded(nproc, str(TRAIN), *args, cwd=cwd)


def _history(out: Path, key="grad_norm"):
    return [json.loads(line)[key] for line in (out / "metrics.jsonl").read_text().splitlines()]


def _train(nproc, *args, output=False, launch=_launch):
    """``make`` for ``once``: a run of train.py with ``args`` in the given directory; with
    ``output``, (directory, stdout, stderr)."""

    def make(out: Path):
        result = launch(nproc, *args, "--out", str(out), cwd=out)
        assert result.returncode == 0, result.stderr[-3000:]
        return (str(out), result.stdout, result.stderr) if output else str(out)

    return make


# The runs that several tests check run once per test session, whichever xdist worker asks first.


@pytest.fixture(scope="module")
def ddp_run(once):
    """The reference run, under torchrun: the README's main command (DDP, --layer-norms)."""
    return Path(once("train-ddp", _train(2, *TINY, *LAYER_NORMS, launch=_torchrun)))


@pytest.fixture(scope="module")
def ddp_history(ddp_run):
    return _history(ddp_run)


FSDP2 = [*TINY, *LAYER_NORMS, "--parallel", "fsdp2"]


@pytest.fixture(scope="module")
def fsdp2_run(once):
    """An FSDP2 run that also checkpoints at step 2: the agreement and the resume tests share it."""
    return Path(once("train-fsdp2", _train(2, *FSDP2, "--save-every", "2")))


# HSDP and fsdp2+tp run with --overlap (partials taken during backward): the history must not
# change.  HSDP takes its partials from backward on every step after the first; fsdp2+tp on none,
# and its line says why: its LayerNorms are copied over tp, outside their FSDP mesh, where no
# hook sees the copies agree.  (Without overlap HSDP runs in the two-node test below.)
OVERLAP_LINES = {
    "hsdp": "overlap: partials from backward on 2 of 3 steps (0 fell back to the normal pass, a gradient having "
            "changed after its hook; 0 took it unproven",
    "fsdp2+tp": "overlap: partials from backward on 0 of 3 steps (0 fell back to the normal pass, a gradient having "
                "changed after its hook; 3 took it unproven, a gradient having copies no hook sees agree",
}


@pytest.fixture(scope="module")
def parallel_run(once, request):
    """``parallel_run(name)``: (directory, stdout) of the 3-step run under that parallelism,
    launched once for the tests that check it."""

    def get(parallel: str) -> tuple[Path, str]:
        if parallel == "fsdp2":
            return request.getfixturevalue("fsdp2_run"), ""
        flags = LAYER_NORMS + (["--overlap"] if parallel in OVERLAP_LINES else [])
        out, stdout, _ = once(f"train-{parallel}", _train(2, *TINY, *flags, "--parallel", parallel, output=True))
        return Path(out), stdout

    return get


@pytest.mark.parametrize("parallel", ["fsdp2", "hsdp", "fsdp2+tp", "pp", "fsdp1"])
def test_every_parallelism_agrees_with_ddp_on_the_grad_norm_history(parallel, ddp_history, parallel_run):
    history = _history(parallel_run(parallel)[0])
    assert len(history) == len(ddp_history) == 3
    for ours, reference in zip(history, ddp_history):
        assert abs(ours - reference) <= 1e-4 * reference, (parallel, history, ddp_history)


@pytest.mark.parametrize("parallel", ["fsdp2", "hsdp", "fsdp2+tp", "pp", "fsdp1"])
def test_every_parallelism_agrees_with_ddp_on_every_layers_norm(parallel, ddp_run, parallel_run):
    # The same rows under every parallelism (names without wrapper prefixes; under pp each stage
    # holds half of them), with the same values: shards summed, copies counted once.
    ours, reference = _history(parallel_run(parallel)[0], "layer_norms"), _history(ddp_run, "layer_norms")
    assert list(reference[0]) == ["embed", "blocks.0", "blocks.1", "norm", "head"]
    for step, (mine, theirs) in enumerate(zip(ours, reference, strict=True), 1):
        assert list(mine) == list(theirs), (parallel, step, mine)
        assert mine == pytest.approx(theirs, rel=1e-4), (parallel, step, mine, theirs)


@pytest.mark.parametrize("parallel", sorted(OVERLAP_LINES))
def test_overlap_says_on_how_many_steps_partials_came_from_backward_and_why_not(parallel, parallel_run):
    stdout = parallel_run(parallel)[1]
    assert OVERLAP_LINES[parallel] in stdout, stdout[-2000:]


def test_the_first_steps_loss_and_norms_are_those_of_the_global_batchs_token_mean(train_script, ddp_run):
    """Each rank backpropagates its summed token loss and the clipper divides by the global token
    count: with every rank holding as many tokens, the gradients of a plain mean over the whole
    global batch (float64, one process, the same initial weights)."""
    torch.manual_seed(0)  # train.py's --seed, before the model is built
    model = train_script.GPT(256, dim=32, layers=2, heads=4, seq_len=32).double()
    inputs, targets = train_script.TokenStream(train_script.DEFAULT_DATA, seq_len=32, seed=0).global_batch(0, 8)
    loss = F.cross_entropy(model(inputs).flatten(0, 1), targets.flatten())
    loss.backward()
    squares: dict[str, float] = {}
    for name, p in model.named_parameters():
        layer = train_script.layer_of(name, p)
        squares[layer] = squares.get(layer, 0.0) + p.grad.square().sum().item()
    logged = json.loads((ddp_run / "metrics.jsonl").read_text().splitlines()[0])
    assert logged["loss"] == pytest.approx(loss.item(), rel=1e-6)
    assert logged["grad_norm"] == pytest.approx(math.sqrt(sum(squares.values())), rel=1e-5)
    assert logged["layer_norms"] == pytest.approx({layer: math.sqrt(v) for layer, v in squares.items()}, rel=1e-5)


# pp: the pipeline schedule runs backward itself, so its accumulation is train.py's own code.
@pytest.mark.parametrize("parallel", ["ddp", "pp"])
def test_gradient_accumulation_clips_once_per_step_with_the_same_norms(parallel, ddp_history, tmp_path):
    result = _launch(2, *TINY, "--parallel", parallel, "--grad-accum", "2", "--out", str(tmp_path), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert _history(tmp_path) == pytest.approx(ddp_history, rel=1e-4)


@pytest.fixture(scope="module")
def fsdp2_resumed(once, fsdp2_run):
    """The FSDP2 run resumed from its step-2 checkpoint into the out of a run that crashed after
    logging steps 1-3 and part of step 4, with a new --lr and --max-norm: (out, stderr)."""

    def make(out: Path):
        logged = (fsdp2_run / "metrics.jsonl").read_text()
        (out / "metrics.jsonl").write_text(logged + '{"step": 4, "lo')
        return _train(2, *FSDP2, "--resume", str(fsdp2_run / "step_2"), "--lr", "0.001", "--max-norm", "0.05",
                      output=True)(out)

    out, _, stderr = once("train-fsdp2-resumed", make)
    return Path(out), stderr


def test_resume_into_the_crashed_runs_out_logs_each_step_once(fsdp2_run, fsdp2_resumed):
    out, _ = fsdp2_resumed
    assert _history(out, "step") == [1, 2, 3]
    # Step 3 recomputed: the same pre-clip norms (its new --lr and --max-norm act after them).
    assert _history(out) == _history(fsdp2_run)
    assert _history(out, "layer_norms") == _history(fsdp2_run, "layer_norms")
    assert (out / "metrics.png").stat().st_size > 0


def test_resume_applies_this_runs_lr_to_the_checkpoints_optimizer_state(fsdp2_resumed):
    # DCP's set_state_dict restores the checkpoint's param groups, lr included; --lr wins.
    assert _history(fsdp2_resumed[0], "lr") == [3e-3, 3e-3, 1e-3]


def test_resume_clips_with_this_runs_max_norm_and_warns_naming_both(fsdp2_resumed):
    out, stderr = fsdp2_resumed
    assert _history(out, "max_norm") == pytest.approx([1.0, 1.0, 0.05])  # float32
    assert _history(out, "clipped_norm")[2] == pytest.approx(0.05, rel=1e-4)
    assert "keeping this clipper's max_norm=0.05 (the checkpoint has 1.0)" in stderr, stderr[-3000:]


SPIKY = [*TINY[:-1], "--steps", "32", "--clip", "autoclip", "--skip-spikes", "--inject-spike", "30:1", "--layer-norms"]


@pytest.fixture(scope="module")
def spiky_run(once):
    """AutoClip (warm-up 25) with spike skipping (min_history 20) and a spike in block 1's
    gradients at step 30, checkpointed at 28."""
    return Path(once("train-spiky", _train(2, *SPIKY, "--save-every", "28")))


def test_injected_spike_is_skipped_and_the_threshold_adapts(spiky_run):
    assert [i + 1 for i, s in enumerate(_history(spiky_run, "skipped")) if s] == [30]
    thresholds = _history(spiky_run, "max_norm")
    assert all(t is None for t in thresholds[:24]), thresholds[:24]  # warm-up: no threshold
    norms = _history(spiky_run, "grad_norm")
    assert all(0 < t < max(norms[:29]) * 1.5 for t in thresholds[24:]), thresholds[24:]
    assert (spiky_run / "metrics.png").stat().st_size > 0


def test_the_layer_norms_show_which_layer_spiked(spiky_run):
    layers = _history(spiky_run, "layer_norms")
    before, spike = layers[24:29], layers[29]  # steps 25-29, step 30
    for name in spike:
        usual = max(step[name] for step in before)
        if name == "blocks.1":
            assert spike[name] > 20 * usual, (name, spike[name], usual)
        else:
            assert spike[name] < 3 * usual, (name, spike[name], usual)


def test_resume_restores_the_threshold_and_spike_windows(spiky_run, tmp_path):
    resumed = _launch(2, *SPIKY, "--resume", str(spiky_run / "step_28"), "--out", str(tmp_path), cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    for key in ("max_norm", "skipped", "grad_norm", "loss"):
        assert _history(tmp_path, key) == _history(spiky_run, key)[28:], key


def _reject(constant: str):
    raise ValueError(f"{constant} is not JSON")


def test_metrics_are_strict_json_with_null_for_the_warm_up_threshold(spiky_run):
    rows = [json.loads(line, parse_constant=_reject) for line in (spiky_run / "metrics.jsonl").read_text().splitlines()]
    assert [row["max_norm"] for row in rows[:24]] == [None] * 24  # AutoClip's warm-up: no threshold


def _one_error_line(stderr: str, message: str) -> None:
    ours = [line for line in stderr.splitlines() if line.startswith("train.py: error:")]
    assert len(ours) == 1 and message in ours[0], stderr[-2000:]


def _no_traceback_from_train_py(stderr: str) -> None:
    # torchrun's agent reports a failed worker with a traceback of its own (ChildFailedError,
    # which names the worker's exit code); none may come from the worker.
    assert f'File "{TRAIN}"' not in stderr, stderr[-3000:]


def _exit_code_2_from_rank_0(result) -> None:
    assert result.returncode != 0  # torchrun's own status is 1 for any failed worker
    assert "rank      : 0 (local_rank: 0)\n  exitcode  : 2 " in result.stderr, result.stderr[-3000:]


@pytest.fixture(scope="module")
def train_script():
    """launch/train.py as a module, to check its arguments in this process."""
    spec = importlib.util.spec_from_file_location("launch_train", TRAIN)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def world_of_2(monkeypatch):
    """The environment torchrun gives rank 0 of two: the checks read the world size from it."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")


def _checked(train_script, args, capsys):
    """What parse_args says of ``args``: (exit status, stderr lines)."""
    with pytest.raises(SystemExit) as raised:
        train_script.parse_args([*args, "--out", "unused"])
    captured = capsys.readouterr()
    assert captured.out == ""
    return raised.value.code, captured.err.splitlines()


# Each bad value, and what its line must say: the argument and its allowed range.
BAD_ARGUMENTS = [
    (["--steps", "0"], "--steps must be an integer >= 1, got 0"),
    (["--steps", "three"], "argument --steps: invalid int value: 'three'"),
    (["--global-batch", "0"], "--global-batch must be an integer >= 1"),
    (["--grad-accum", "0"], "--grad-accum must be an integer >= 1"),
    (["--seq-len", "0"], "--seq-len must be an integer >= 1"),
    (["--seq-len", "100000000"], "--seq-len must be at most"),
    (["--dim", "0"], "--dim must be an integer >= 1"),
    (["--layers", "0"], "--layers must be an integer >= 1"),
    (["--heads", "0"], "--heads must be an integer >= 1"),
    (["--heads", "5", "--dim", "64"], "--dim 64 must be a multiple of --heads 5"),
    (["--tp", "0"], "--tp must be an integer >= 1"),
    (["--replicas", "0"], "--replicas must be an integer >= 1"),
    (["--microbatches", "0"], "--microbatches must be an integer >= 1"),
    (["--save-every", "-1"], "--save-every must be an integer >= 0"),
    (["--seed", "-1"], "--seed must be an integer in 0..2**32-1"),
    (["--lr", "-0.1"], "--lr must be a finite number >= 0"),
    (["--lr", "nan"], "--lr must be a finite number >= 0"),
    (["--pg-timeout", "0"], "--pg-timeout must be a finite number of seconds > 0"),
    (["--max-norm", "-1"], "--max-norm -1.0: distclip: max_norm must be a non-negative number"),
    (["--norm-type", "nan"], "--norm-type nan: distclip: unknown norm_type"),
    (["--global-batch", "6", "--grad-accum", "2"], "--global-batch 6 must be a multiple of 4: the data-parallel size (2) x --grad-accum (2)"),
    (["--parallel", "pp", "--global-batch", "6", "--grad-accum", "2"], "--global-batch 6 must be a multiple of 4: the data-parallel size (1) x --grad-accum (2) x --microbatches (2)"),
    (["--parallel", "pp", "--layers", "3"], "--layers (3) must be even"),
    (["--parallel", "fsdp2+tp", "--tp", "3"], "divisible by --tp 3"),
    (["--parallel", "hsdp", "--replicas", "4"], "divisible by --replicas 4"),
    (["--parallel", "zero3"], "unknown --parallel"),
    (["--clip", "sometimes"], "unknown --clip"),
    (["--data", "missing.txt"], "data file missing.txt does not exist"),
    (["--inject-spike", "0"], "--inject-spike 0 is not a step of this run (1..300)"),
    (["--steps", "3", "--inject-spike", "4"], "--inject-spike 4 is not a step of this run (1..3)"),
    (["--inject-spike", "3:x"], "--inject-spike wants STEP or STEP:BLOCK, got '3:x'"),
    (["--inject-spike", "3:1:0"], "--inject-spike wants STEP or STEP:BLOCK, got '3:1:0'"),
    (["--layers", "2", "--inject-spike", "3:2"], "--inject-spike 3:2: block 2 is not a block of this model (0..1)"),
    (["--inject-failure", "2"], "--inject-failure wants STEP:RANK"),
    (["--steps", "3", "--inject-failure", "4:0"], "needs STEP in 1..3 and RANK in 0..1"),
    (["--inject-failure", "1:2"], "needs STEP in 1..300 and RANK in 0..1"),
    (["--resume", "missing"], "checkpoint missing does not exist"),
]


@pytest.mark.parametrize("args,message", BAD_ARGUMENTS, ids=[" ".join(args) for args, _ in BAD_ARGUMENTS])
def test_a_bad_argument_is_one_line_naming_it_and_exit_status_2(train_script, world_of_2, args, message, capsys):
    status, lines = _checked(train_script, args, capsys)
    assert status == 2 and len(lines) == 1, lines
    assert lines[0].startswith("train.py: error: ") and message in lines[0], lines


def test_good_arguments_pass_the_checks(train_script, world_of_2):
    assert train_script.parse_args([*TINY, "--parallel", "pp", "--grad-accum", "2"]).grad_accum == 2
    args = train_script.parse_args([*TINY, "--inject-spike", "3:1"])
    assert (args.inject_spike, args.spike_block) == (3, 1)
    args = train_script.parse_args([*TINY, "--inject-spike", "3"])
    assert (args.inject_spike, args.spike_block) == (3, None)


def test_a_checkpoint_without_its_state_file_is_one_line(train_script, world_of_2, tmp_path, capsys):
    status, lines = _checked(train_script, ["--resume", str(tmp_path)], capsys)
    assert status == 2 and lines == [f"train.py: error: checkpoint {tmp_path} has no train_state.json: "
                                     "its save did not finish (or an older train.py wrote it)"]


@pytest.mark.parametrize(
    "args,message",
    [(["--dim", "64"], "holds a model of --dim 32; this run has --dim 64"),
     (["--steps", "1"], "is at step 2, past --steps 1")],
)
def test_resuming_a_checkpoint_that_cannot_fit_is_one_line(train_script, world_of_2, fsdp2_run, args, message, capsys):
    status, lines = _checked(train_script, [*TINY, *args, "--resume", str(fsdp2_run / "step_2")], capsys)
    assert status == 2 and len(lines) == 1 and message in lines[0], lines


def test_a_bad_argument_under_torchrun_is_one_line_and_status_2_from_rank_0(tmp_path):
    result = _torchrun(2, "--grad-accum", "0", "--out", str(tmp_path), cwd=tmp_path)
    _one_error_line(result.stderr, "--grad-accum must be an integer >= 1, got 0")
    _exit_code_2_from_rank_0(result)
    _no_traceback_from_train_py(result.stderr)


def test_resume_with_a_clipper_the_checkpoint_has_no_state_for_is_one_line(spiky_run, tmp_path):
    # The checkpoint holds AutoClip's and SpikeSkip's windows; --clip fixed without --skip-spikes
    # has neither to take them.
    result = _launch(2, *TINY, "--resume", str(spiky_run / "step_28"), "--steps", "30",
                     "--out", str(tmp_path), cwd=tmp_path)
    _one_error_line(result.stderr, f"cannot resume from {spiky_run / 'step_28'}: ")
    _one_error_line(result.stderr, "(it was written with --clip autoclip --norm-type 2 --skip-spikes; "
                                   "this run has --clip fixed --max-norm 1 --norm-type 2)")
    assert result.exitcodes == [2, 0], result.stderr[-3000:]  # fail(): rank 0 says why, the others leave quietly
    _no_traceback_from_train_py(result.stderr)


def _two_nodes(*args, cwd, timeout=240):
    """Two torchrun agents on this machine as two nodes of one worker each, meeting through a
    c10d rendezvous on 127.0.0.1.  Returns both agents' CompletedProcess-like results."""
    endpoint = f"127.0.0.1:{free_port()}"
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
