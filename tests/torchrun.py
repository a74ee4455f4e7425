"""Run a script as a job of ``nproc`` ranks for the end-to-end tests.

``run_torchrun``: under ``torchrun --standalone``, as users run it.  Each launch starts the
launcher's interpreter and one per rank, and every one of them imports torch (~4 s of CPU each
on the 2-core machine) before any work: use it where torchrun's own behaviour is the subject
(its failure report, its rendezvous) and for the runs that stand for the README's commands.

``run_preloaded``: the same script with the environment torchrun gives its workers, each rank
forked from the forkserver that has imported torch already (rankpool.PRELOAD), so that no rank
imports torch afresh.  Its exit statuses are the ranks' own (``exitcodes``).

One known torch teardown crash is retried under torchrun: after a script has printed its
results and destroyed its process groups, a worker sometimes aborts during interpreter
finalization ("terminate called without an active exception", SIGABRT; pytorch/pytorch#179291
describes gloo worker threads releasing tensors, which needs the GIL, while the interpreter is
torn down).  It happens in about 5% of the runs under pytest on the 2-core machine, at the
previous commit's code too.  Any other failure, or this one on every attempt, fails the test.
A forked rank never finalizes an interpreter (the forkserver ends each child with ``os._exit``),
so run_preloaded has nothing to retry.
"""

from __future__ import annotations

import multiprocessing.connection
import os
import runpy
import socket
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path

from rankpool import GRACE_S, forkserver_context

TEARDOWN_ABORT = "terminate called without an active exception"
ATTEMPTS = 3


def run_torchrun(nproc: int, script: str, *args: str, cwd, timeout: float = 300) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", script, *args]
    return run_launched(command, script, cwd=cwd, timeout=timeout)


def run_launched(command: list[str], script: str, *, cwd, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run a launcher's ``command`` (torchrun, ``accelerate launch``) of ``script``."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for attempt in range(1, ATTEMPTS + 1):
        result = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env, cwd=cwd)
        if result.returncode == 0 or TEARDOWN_ABORT not in result.stderr:
            return result
        if attempt < ATTEMPTS:
            warnings.warn(f"torchrun {os.path.basename(script)}: a worker aborted at interpreter teardown; retrying")
    return result


def free_port() -> int:
    """A TCP port of 127.0.0.1 that nothing listens on now (torchrun --standalone picks its own
    the same way)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PreloadedRun(subprocess.CompletedProcess):
    """What ``run_preloaded`` returns: ``stdout`` and ``stderr`` are the ranks' outputs, rank 0
    first; ``exitcodes`` each rank's status (negative: killed by that signal); ``returncode`` the
    status of the rank that failed first, 0 when every rank succeeded."""

    def __init__(self, args: list[str], returncode: int, exitcodes: list[int], stdout: str, stderr: str) -> None:
        super().__init__(args, returncode, stdout, stderr)
        self.exitcodes = exitcodes


def run_preloaded(nproc: int, script: str, *args: str, cwd, timeout: float = 300,
                  grace: float = GRACE_S) -> PreloadedRun:
    """Run ``script *args`` in ``cwd`` as ``torchrun --standalone --nproc-per-node=nproc`` would,
    each rank forked from the preloaded forkserver.

    As under torchrun, once a rank has failed the others are stopped (after ``grace`` seconds,
    to let them say why if they found the same problem); past ``timeout`` every rank is killed
    and subprocess.TimeoutExpired raised with what they had written.
    """
    command = ["run_preloaded", f"--nproc-per-node={nproc}", script, *args]
    job = dict(os.environ, OMP_NUM_THREADS="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()),
               WORLD_SIZE=str(nproc), LOCAL_WORLD_SIZE=str(nproc), ROLE_WORLD_SIZE=str(nproc),
               GROUP_RANK="0", GROUP_WORLD_SIZE="1")
    context = forkserver_context()
    with tempfile.TemporaryDirectory(prefix="distclip-ranks-") as logs:
        outputs = [(Path(logs, f"{rank}.out"), Path(logs, f"{rank}.err")) for rank in range(nproc)]
        ranks = [
            context.Process(
                target=_rank,
                args=(script, args, str(cwd), dict(job, RANK=str(rank), LOCAL_RANK=str(rank), ROLE_RANK=str(rank)),
                      *outputs[rank]),
                daemon=True,
            )
            for rank in range(nproc)
        ]
        try:
            for process in ranks:
                process.start()
            finished, first_failure = _wait(ranks, timeout, grace)
        finally:
            for process in (process for process in ranks if process.pid is not None):  # the started ones
                if process.is_alive():
                    process.kill()
                process.join()
        stdout, stderr = ("".join(path.read_text(errors="backslashreplace") for path in paths) for paths in zip(*outputs))
    if not finished:
        raise subprocess.TimeoutExpired(command, timeout, stdout, stderr)
    return PreloadedRun(command, first_failure, [process.exitcode for process in ranks], stdout, stderr)


def _wait(ranks: list, timeout: float, grace: float) -> tuple[bool, int]:
    """Wait for every rank to end, and after the first failure ``grace`` seconds more at most.
    Returns (whether the job ended before ``timeout``, the status of the rank that failed first
    or 0); the caller kills what still runs."""
    deadline = time.monotonic() + timeout
    first_failure = 0
    while running := [process for process in ranks if process.exitcode is None]:
        left = deadline - time.monotonic()
        if left <= 0:
            return bool(first_failure), first_failure  # after a failure: it failed, not timed out
        multiprocessing.connection.wait([process.sentinel for process in running], timeout=left)
        failures = [process.exitcode for process in running if process.exitcode]
        if failures and not first_failure:
            first_failure = failures[0]
            deadline = min(deadline, time.monotonic() + grace)
    return True, first_failure


def _rank(script: str, args: tuple[str, ...], cwd: str, env: dict[str, str], stdout: Path, stderr: Path) -> None:
    """One rank, in a child of the forkserver: the environment, directory, argv, sys.path[0] and
    output files ``python script *args`` would have under torchrun, then the script as __main__.
    Its SystemExit is the rank's exit status (multiprocessing turns it into the exit code)."""
    import torch

    os.environ.clear()
    os.environ.update(env)
    # The server imported torch before OMP_NUM_THREADS applied to this job.
    torch.set_num_threads(int(env["OMP_NUM_THREADS"]))
    for fd, path in ((1, stdout), (2, stderr)):  # the file descriptors too: torch's C++ writes to them
        file = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.dup2(file, fd)
        os.close(file)
    sys.stdout = open(1, "w", buffering=1, closefd=False)  # line-buffered: a killed rank keeps its lines
    sys.stderr = open(2, "w", buffering=1, errors="backslashreplace", closefd=False)
    os.chdir(cwd)
    sys.argv = [script, *args]
    sys.path.insert(0, os.path.dirname(script))
    try:
        runpy.run_path(script, run_name="__main__")
    except SystemExit:
        raise
    except BaseException:  # as the interpreter would: the traceback, status 1
        traceback.print_exc()
        sys.exit(1)
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
