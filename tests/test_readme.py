"""Every snippet of the README and of docs/ marked with a ``# torchrun --nproc-per-node=N file.py``
line runs, and every relative link in them leads to a file (and heading) that exists.

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

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
RUNNER = Path(__file__).resolve().parent / "scripts_runner.py"
SNIPPET = re.compile(r"```python\n# torchrun --nproc-per-node=(\d+) (\S+)\n(.*?)```", re.S)
LINK = re.compile(r"\]\(([^)\s]+)\)")
INTEGRATIONS = {"lightning_clip.py": "lightning", "accelerate_clip.py": "accelerate", "torchtitan_clip.py": "torchtitan"}
OWN_LAUNCH = {"lightning_clip.py", "accelerate_clip.py"}
FOUND = [(name, int(n), code, page) for page in PAGES for n, name, code in SNIPPET.findall(page.read_text())]
SNIPPETS = {name: (n, code) for name, n, code, _ in FOUND}


def test_snippet_file_names_are_unique():
    assert len(SNIPPETS) == len(FOUND), sorted(name for name, *_ in FOUND)


def _anchors(page: Path) -> set[str]:
    """GitHub's anchors of a page's headings: lower case, punctuation but - and _ dropped,
    spaces to -."""
    headings = re.findall(r"^#+ (.+)$", page.read_text(), re.M)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in headings}


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_leads_somewhere(page):
    broken = []
    for target in LINK.findall(page.read_text()):
        if "://" in target or target.startswith("mailto:"):
            continue
        path, _, anchor = target.partition("#")
        linked = page if not path else (page.parent / path).resolve()
        if not linked.exists():
            broken.append(target)
        elif anchor and linked.suffix == ".md" and anchor not in _anchors(linked):
            broken.append(target)
    assert not broken, f"{page.name}: {broken}"


def test_the_docs_have_a_snippet_per_parallelism_and_capability():
    assert {"ddp.py", "fsdp2.py", "hsdp.py", "fsdp_tp.py", "pipeline.py", "experts.py", "fsdp1.py", "offload.py", "copies.py", "megatron.py",
            "zclip.py", "autoclip.py", "spikes.py", "overlap.py", "quickstart.py", "loop_quickstart.py", "loop.py",
            "layer_norms.py", "token_weighted.py"} <= set(SNIPPETS)


def test_the_readme_is_a_front_door():
    assert len((ROOT / "README.md").read_text().splitlines()) <= 300


def test_the_docs_have_a_snippet_per_integration():
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
