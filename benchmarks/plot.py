"""Plot the benchmark JSON files: time vs gradient bytes (local.json) and vs tensor count
(overhead.json, distributed.json).

    python benchmarks/plot.py   # writes benchmarks/results.png
"""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

HERE = Path(__file__).resolve().parent


def main() -> None:
    local = json.loads((HERE / "local.json").read_text())
    overhead = json.loads((HERE / "overhead.json").read_text())
    distributed = json.loads((HERE / "distributed.json").read_text())
    fig, (by_bytes, by_count) = plt.subplots(1, 2, figsize=(12, 4.5))

    sweep = local["sweep"]
    mb = [r["grad_bytes"] / 2**20 for r in sweep]
    by_bytes.plot(mb, [r["torch_ms"] for r in sweep], "o-", label="torch clip_grad_norm_ (foreach)")
    by_bytes.plot(mb, [r["distclip_ms"] for r in sweep], "s-", label="distclip GradClipper")
    by_bytes.plot(mb, [r["floor_ms"] for r in sweep], "k--", label="floor: 3 x bytes / copy bandwidth")
    by_bytes.set(xscale="log", yscale="log", xlabel="fp32 gradient MiB (150 tensors)", ylabel="ms per clip",
                 title=f"one process, {local['device']}")
    by_bytes.legend()

    for layout, line in (("separate", "-"), ("buffer", ":")):
        for variant, marker in (("torch foreach", "o"), ("distclip.clip_grad_norm_", "^"), ("distclip.GradClipper", "s")):
            rows = [r for r in overhead if r["case"] == variant and r.get("layout", "separate") == layout]
            if rows:
                by_count.plot([r["tensors"] for r in rows], [r["ms"] for r in rows], marker + line,
                              label=f"1 process, {layout}: {variant}")
    fsdp = [r for r in distributed["rows"] if r["case"].startswith("3 FSDP2")]
    for variant, marker in (("torch clip + full_tensor()", "o--"), ("distclip.GradClipper", "s--")):
        rows = [r for r in fsdp if r["variant"] == variant]
        counts = [int(r["case"].split(",")[1].split()[0]) for r in rows]
        by_count.plot(counts, [r["ms"] for r in rows], marker, label=f"FSDP2 world {distributed['world_size']}: {variant}")
    by_count.set(xscale="log", yscale="log", xlabel="gradient tensors (16x8 fp32 each)", ylabel="ms per clip",
                 title="many small tensors")
    by_count.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(HERE / "results.png", dpi=100)


if __name__ == "__main__":
    main()
