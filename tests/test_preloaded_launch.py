"""torchrun.run_preloaded, which the launch tests use for train.py's runs: each rank forked
from the preloaded forkserver runs the script as ``torchrun --standalone`` would (its
environment, directory, argv and outputs), a failed rank ends the job, a timeout kills it."""

import subprocess
import time

import pytest

from torchrun import run_preloaded

# What a rank sees: torchrun's environment, the launch's directory and argv, __main__; and a
# gloo group that meets through MASTER_ADDR/MASTER_PORT.
SEES = """
import os, sys
import torch, torch.distributed as dist
dist.init_process_group("gloo")
total = torch.tensor([dist.get_rank() + 1.0])
dist.all_reduce(total)
dist.destroy_process_group()
env = [os.environ[k] for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "OMP_NUM_THREADS")]
print(*env, os.getcwd(), sys.argv[1:], __name__, sys.path[0] == os.path.dirname(__file__), int(total))
print(f"rank {env[0]} to stderr", file=sys.stderr)
"""

FAILS_ON_RANK_1 = """
import os, sys, time
if os.environ["RANK"] == "1":
    raise RuntimeError("rank 1 failed")
time.sleep(600)  # rank 0 would wait for ever on the failed rank
"""


def _script(tmp_path, text):
    script = tmp_path / "scripts" / "job.py"
    script.parent.mkdir()
    script.write_text(text)
    return str(script)


def test_each_rank_runs_the_script_as_torchrun_would(tmp_path):
    result = run_preloaded(2, _script(tmp_path, SEES), "--flag", "1", cwd=tmp_path, timeout=120)
    assert result.exitcodes == [0, 0] and result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [f"{rank} {rank} 2 2 1 {tmp_path} ['--flag', '1'] __main__ True 3"
                                          for rank in (0, 1)]
    assert result.stderr.splitlines() == ["rank 0 to stderr", "rank 1 to stderr"]


def test_a_failed_rank_stops_the_others_after_the_grace_period_and_its_status_is_the_jobs(tmp_path):
    started = time.monotonic()
    result = run_preloaded(2, _script(tmp_path, FAILS_ON_RANK_1), cwd=tmp_path, timeout=120, grace=1)
    assert time.monotonic() - started < 60
    assert result.returncode == 1 and result.exitcodes == [-9, 1], result.exitcodes
    assert "RuntimeError: rank 1 failed" in result.stderr and 'job.py", line 4' in result.stderr, result.stderr


def test_a_job_past_its_timeout_is_killed_and_raises_with_its_output(tmp_path):
    script = _script(tmp_path, "import time\nprint('started', flush=True)\ntime.sleep(600)\n")
    started = time.monotonic()
    with pytest.raises(subprocess.TimeoutExpired) as raised:
        run_preloaded(2, script, cwd=tmp_path, timeout=3)
    assert time.monotonic() - started < 60
    assert raised.value.output == "started\nstarted\n"
