"""Every README snippet marked with a ``# torchrun --nproc-per-node=N file.py`` line runs."""

import re
from pathlib import Path

import pytest

from torchrun import run_torchrun

README = Path(__file__).resolve().parent.parent / "README.md"
SNIPPET = re.compile(r"```python\n# torchrun --nproc-per-node=(\d+) (\S+)\n(.*?)```", re.S)
INTEGRATIONS = {"lightning_clip.py": "lightning", "accelerate_clip.py": "accelerate", "torchtitan_clip.py": "torchtitan"}
SNIPPETS = {name: (int(n), code) for n, name, code in SNIPPET.findall(README.read_text())}


def test_readme_has_a_snippet_per_parallelism():
    assert {"ddp.py", "fsdp2.py", "hsdp.py", "fsdp_tp.py", "pipeline.py", "experts.py", "fsdp1.py", "offload.py", "copies.py", "megatron.py",
            "zclip.py", "autoclip.py", "spikes.py"} <= set(SNIPPETS)


def test_readme_has_a_snippet_per_integration():
    assert {"lightning_clip.py", "accelerate_clip.py", "torchtitan_clip.py"} <= set(SNIPPETS)


@pytest.mark.parametrize("name", sorted(SNIPPETS))
def test_readme_snippet_runs_under_torchrun(name, tmp_path):
    nproc, code = SNIPPETS[name]
    framework = INTEGRATIONS.get(name)
    if framework is not None:
        pytest.importorskip(framework)
    script = tmp_path / name
    script.write_text(code)
    result = run_torchrun(nproc, str(script), cwd=tmp_path, timeout=240)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
