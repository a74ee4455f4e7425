"""GradClipper's per-step time against another commit's, interleaved in one run.

    OMP_NUM_THREADS=1 python benchmarks/versus_commit.py --base <commit> [--count 150 2000 20000] [--rounds 15]

Two copies of distclip cannot share a process (the package imports itself by name), so each
version runs in a worker process of its own (``git worktree`` of ``--base`` for the other one,
made in a temporary folder), both building the same case; the driver asks them in turn, round
by round, to time ``calls`` steps, so drifting machine load falls on both alike.  Each worker
reports wall time and its own CPU time (``time.process_time``, one thread): on a shared machine
the CPU time is the steadier of the two, since it leaves out the time the worker waited for a
core.  Cases, for
each tensor count: ``list`` (a GradClipper given a list of separate 16x8 parameters, as
``overhead.py``) and ``module`` (given a module holding them in Linear(8, 8) layers: every step
also re-reads the module's tree).  Prints the medians and their ratio (this tree / base).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def worker() -> None:
    """Serve timing requests on stdin: ``case count calls`` -> ``[wall seconds, CPU seconds]``
    (after building the case once); one JSON line per request."""
    import torch

    import distclip

    built: dict = {}
    for line in sys.stdin:
        case, count, calls = line.split()
        count, calls = int(count), int(calls)
        if (case, count) not in built:
            torch.manual_seed(0)
            if case == "module":
                model = torch.nn.Sequential(*[torch.nn.Linear(8, 8) for _ in range(count // 2)])
                for p in model.parameters():
                    p.grad = torch.randn_like(p)
                clipper = distclip.GradClipper(model, max_norm=1e9)
            else:
                params = [torch.nn.Parameter(torch.empty(16, 8)) for _ in range(count)]
                for p in params:
                    p.grad = torch.randn(16, 8)
                clipper = distclip.GradClipper(params, max_norm=1e9)
            for _ in range(3):
                clipper.clip_()
            built[(case, count)] = clipper
        clipper = built[(case, count)]
        start, cpu = time.perf_counter(), time.process_time()
        for _ in range(calls):
            clipper.clip_()
        print(json.dumps([time.perf_counter() - start, time.process_time() - cpu]), flush=True)


def _start(tree: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(tree), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    return subprocess.Popen(
        [sys.executable, __file__, "--worker"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env, cwd=tree
    )


def _ask(process: subprocess.Popen, case: str, count: int, calls: int) -> list[float]:
    process.stdin.write(f"{case} {count} {calls}\n")
    process.stdin.flush()
    return json.loads(process.stdout.readline())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--base", required=True, help="the commit to compare with")
    parser.add_argument("--count", type=int, nargs="+", default=[150, 2000, 20000])
    parser.add_argument("--case", nargs="+", default=["list", "module"], choices=["list", "module"])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--out", default="versus_commit.json")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        base_tree = Path(scratch) / "base"
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", "-q", str(base_tree), args.base], check=True)
        try:
            workers = {"this tree": _start(ROOT), args.base[:10]: _start(base_tree)}
            rows = []
            for case in args.case:
                for count in args.count:
                    calls = max(1, 20000 // count)
                    times = {name: [] for name in workers}
                    cpu = {name: [] for name in workers}
                    for i in range(2 + args.rounds):
                        for name, process in workers.items():
                            wall, used = _ask(process, case, count, calls)
                            if i >= 2:
                                times[name].append(wall / calls)
                                cpu[name].append(used / calls)
                    medians = {name: statistics.median(t) for name, t in times.items()}
                    cpu_medians = {name: statistics.median(t) for name, t in cpu.items()}
                    mine, base = medians["this tree"], medians[args.base[:10]]
                    mine_cpu, base_cpu = cpu_medians["this tree"], cpu_medians[args.base[:10]]
                    rows.append(
                        {
                            "case": case, "tensors": count, "this_ms": mine * 1e3, "base_ms": base * 1e3, "ratio": mine / base,
                            "this_cpu_ms": mine_cpu * 1e3, "base_cpu_ms": base_cpu * 1e3, "cpu_ratio": mine_cpu / base_cpu,
                        }
                    )
                    print(
                        f"{case:>7} {count:>6} tensors: wall this tree {mine * 1e3:8.3f} ms, {args.base[:10]} {base * 1e3:8.3f} ms, "
                        f"ratio {mine / base:.3f}; CPU {mine_cpu * 1e3:8.3f} / {base_cpu * 1e3:8.3f} ms, ratio {mine_cpu / base_cpu:.3f}",
                        flush=True,
                    )
            for process in workers.values():
                process.stdin.close()
                process.wait()
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(base_tree)], check=False)
    with open(args.out, "w") as f:
        json.dump({"base": args.base, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    worker() if "--worker" in sys.argv else main()
