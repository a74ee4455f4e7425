"""``import distclip`` and the framework-free integration modules import no framework."""

import subprocess
import sys

FRAMEWORKS = ("lightning", "accelerate", "torchtitan")


def test_importing_distclip_and_its_integrations_imports_no_framework():
    code = (
        "import sys, distclip, distclip.integrations, distclip.integrations.accelerate, "
        "distclip.integrations.torchtitan; "
        f"print(sorted(m for m in {FRAMEWORKS!r} if m in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]", result.stdout
