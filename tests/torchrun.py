"""Run a script under ``torchrun --standalone`` for the end-to-end tests.

One known torch teardown crash is retried once: after a script has finished and destroyed its
process groups, a gloo worker thread that drops a tensor during interpreter finalization aborts
the process ("terminate called without an active exception", SIGABRT; see the discussion in
pytorch/pytorch#179291).  It happens in a few percent of runs on the loaded 2-core CI machine,
with or without distclip in the script.  Any other failure, or this one twice, fails the test.
"""

from __future__ import annotations

import os
import subprocess
import sys
import warnings

TEARDOWN_ABORT = "terminate called without an active exception"


def run_torchrun(nproc: int, script: str, *args: str, cwd, timeout: float = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", script, *args]
    for attempt in (1, 2):
        result = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env, cwd=cwd)
        if result.returncode == 0 or TEARDOWN_ABORT not in result.stderr:
            return result
        if attempt == 1:
            warnings.warn(f"torchrun {os.path.basename(script)}: a worker aborted at interpreter teardown; retrying once")
    return result
