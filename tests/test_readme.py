"""Every README snippet marked with a ``# torchrun --nproc-per-node=N file.py`` line runs.

The snippets of one world size run one after another in one ``torchrun`` launch
(``scripts_runner.py``), each from a fresh namespace with its own process group, and the launch
runs once however many xdist workers run its tests; the Lightning and Accelerate snippets, whose
frameworks keep process-wide state, get a launch each."""

import importlib.util
import json
import re
from pathlib import Path

import pytest

from torchrun import run_torchrun

README = Path(__file__).resolve().parent.parent / "README.md"
RUNNER = Path(__file__).resolve().parent / "scripts_runner.py"
SNIPPET = re.compile(r"```python\n# torchrun --nproc-per-node=(\d+) (\S+)\n(.*?)```", re.S)
INTEGRATIONS = {"lightning_clip.py": "lightning", "accelerate_clip.py": "accelerate", "torchtitan_clip.py": "torchtitan"}
OWN_LAUNCH = {"lightning_clip.py", "accelerate_clip.py"}
SNIPPETS = {name: (int(n), code) for n, name, code in SNIPPET.findall(README.read_text())}


def test_readme_has_a_snippet_per_parallelism():
    assert {"ddp.py", "fsdp2.py", "hsdp.py", "fsdp_tp.py", "pipeline.py", "experts.py", "fsdp1.py", "offload.py", "copies.py", "megatron.py",
            "zclip.py", "autoclip.py", "spikes.py", "overlap.py"} <= set(SNIPPETS)


def test_readme_has_a_snippet_per_integration():
    assert {"lightning_clip.py", "accelerate_clip.py", "torchtitan_clip.py"} <= set(SNIPPETS)


def _launch_key(name: str) -> tuple[int, str]:
    nproc = SNIPPETS[name][0]
    return (nproc, name if name in OWN_LAUNCH else "")


def _launch(key: tuple[int, str], directory: Path) -> dict[str, str | None]:
    """Run the snippets of ``key`` in one launch: name -> None (ran on every rank) or what failed."""
    nproc = key[0]
    names = [n for n in sorted(SNIPPETS) if _launch_key(n) == key and _available(n)]
    for name in names:
        (directory / name).mkdir()
        (directory / name / name).write_text(SNIPPETS[name][1])
    result = run_torchrun(nproc, str(RUNNER), str(directory), *(str(directory / n / n) for n in names),
                          cwd=directory, timeout=300)
    ranks = [directory / f"rank{r}.json" for r in range(nproc)]
    if result.returncode != 0 or not all(r.exists() for r in ranks):
        failure = f"the launch failed ({result.returncode}):\n{result.stdout[-3000:]}{result.stderr[-3000:]}"
        return {name: failure for name in names}
    per_rank = [json.loads(r.read_text()) for r in ranks]
    return {
        name: "\n".join(f"rank {r}: {done[name]}" for r, done in enumerate(per_rank) if done[name] is not None) or None
        for name in names
    }


def _available(name: str) -> bool:
    # Found, not imported: the launch imports the framework, this process need not.
    framework = INTEGRATIONS.get(name)
    return framework is None or importlib.util.find_spec(framework) is not None


@pytest.mark.parametrize("name", sorted(SNIPPETS))
def test_readme_snippet_runs_under_torchrun(name, once):
    if not _available(name):
        pytest.skip(f"{INTEGRATIONS[name]} is not installed")
    key = _launch_key(name)
    failure = once(f"readme-{key[0]}-{key[1] or 'snippets'}", lambda directory: _launch(key, directory))[name]
    assert failure is None, failure
