"""Run several scripts one after another in each worker of one ``torchrun`` launch.

    torchrun --nproc-per-node=N scripts_runner.py RESULTS_DIR SCRIPT [SCRIPT ...]

Each script runs as ``__main__`` (``runpy``) from its own directory, as ``torchrun script.py``
would run it, and meets the other ranks through a store of its own; a script that leaves its
process group up (it failed before destroying it) has it destroyed before the next starts.  Every rank writes ``RESULTS_DIR/rank{RANK}.json``: script
name -> None when it finished, else its traceback.  One launch instead of one per script: the
launch (three interpreters importing torch) costs more than most README snippets' work.
"""

from __future__ import annotations

import json
import os
import runpy
import socket
import sys
import traceback
from datetime import timedelta
from pathlib import Path

import torch.distributed as dist


def give_own_store(script_index: int, launch_store: dist.Store) -> None:
    """Point the next ``init_process_group`` at a store that rank 0 will host on a fresh port.

    torch names the default group "0" again after ``destroy_process_group``, so a second group
    initialised through torchrun's store would find the first one's rendezvous keys there (and
    ranks would meet the wrong peers, or wait forever).  The port travels through that store."""
    key = f"scripts_runner/{script_index}/port"
    if os.environ["RANK"] == "0":
        with socket.socket() as s:
            s.bind((os.environ["MASTER_ADDR"], 0))
            launch_store.set(key, str(s.getsockname()[1]))
    os.environ["MASTER_PORT"] = launch_store.get(key).decode()
    os.environ["TORCHELASTIC_USE_AGENT_STORE"] = "False"


def run_one(script: Path) -> str | None:
    cwd, argv = os.getcwd(), sys.argv
    os.chdir(script.parent)
    sys.argv = [str(script)]
    try:
        runpy.run_path(str(script), run_name="__main__")
        return None
    except SystemExit as exit_:
        return None if exit_.code in (None, 0) else traceback.format_exc()
    except BaseException:
        return traceback.format_exc()
    finally:
        os.chdir(cwd)
        sys.argv = argv
        if dist.is_initialized():
            dist.destroy_process_group()


def main() -> None:
    results_dir, scripts = Path(sys.argv[1]), [Path(s).resolve() for s in sys.argv[2:]]
    launch_store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                                 timeout=timedelta(seconds=120))
    results = {}
    for index, script in enumerate(scripts):
        give_own_store(index, launch_store)
        results[script.name] = run_one(script)
        print(f"rank {os.environ['RANK']}: {script.name} {'ok' if results[script.name] is None else 'FAILED'}", flush=True)
    (results_dir / f"rank{os.environ['RANK']}.json").write_text(json.dumps(results))


if __name__ == "__main__":
    main()
