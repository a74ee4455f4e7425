"""Run under ``accelerate launch --cpu --num_processes 2`` by test_integration_accelerate.py.

A few training steps of a small model prepared by Accelerate in whatever configuration the
launch flags give (DDP, FSDP1, FSDP2).  Every step, on the same gradients: the float64
reference from the full gradients, Accelerate's own ``clip_grad_norm_`` (on a copy, when its
configuration can compute one) and distclip's through ``install``, counting collectives.  Each
rank writes its rows to ``rank{r}.json`` in the working directory (two ranks' prints would
interleave on the launcher's stdout).
"""

from __future__ import annotations

import json
import os
import sys

import torch
from accelerate import Accelerator

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from models import batch, build  # noqa: E402
from reference import collectives, full_grads, reference_norm  # noqa: E402

from distclip.integrations.accelerate import install  # noqa: E402

STEPS = 3
MAX_NORM = 0.05


def _named_grads(model):
    # Names without the wrappers' prefixes, so that every configuration's names agree.
    prefixes = ("module.", "_fsdp_wrapped_module.", "_checkpoint_wrapped_module.")
    named = []
    for name, p in model.named_parameters():
        for prefix in prefixes:
            name = name.replace(prefix, "")
        named.append((name, p.grad))
    return named


def main() -> None:
    accelerator = Accelerator(cpu="--cpu" in sys.argv)
    model = build(depth=3)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model, optimizer = accelerator.prepare(model, optimizer)
    rows = []
    for step in range(STEPS):
        optimizer.zero_grad()
        out = model(batch(accelerator.process_index, seed=step))
        accelerator.backward((out.float() ** 2).mean())
        before = full_grads(_named_grads(model))
        expected = reference_norm(before, 2.0)
        saved = [p.grad.clone() if p.grad is not None else None for p in model.parameters()]
        try:
            theirs = accelerator.clip_grad_norm_(model.parameters(), MAX_NORM).item()
        except Exception as error:  # recorded: what Accelerate's own method does here
            theirs = f"{type(error).__name__}: {error}"
        for p, grad in zip(model.parameters(), saved):
            p.grad = grad
        install(accelerator)
        with collectives() as issued:
            ours = accelerator.clip_grad_norm_(model.parameters(), MAX_NORM)
        del accelerator.clip_grad_norm_  # back to Accelerate's method for the next step
        after = full_grads(_named_grads(model))
        coefficient = min(MAX_NORM / (ours.double().item() + 1e-6), 1.0)
        scaled_exactly = all(
            torch.allclose(after[name], grad * coefficient, rtol=1e-5, atol=1e-9) for name, grad in before.items()
        )
        rows.append(
            dict(expected=expected, ours=ours.item(), ours_hex=ours.item().hex(), plain=type(ours) is torch.Tensor,
                 theirs=theirs, collectives=issued, scaled_exactly=scaled_exactly)
        )
        optimizer.step()
    with open(f"rank{accelerator.process_index}.json", "w") as f:
        json.dump(dict(rank=accelerator.process_index, kind=type(model).__name__, rows=rows), f)
    accelerator.end_training()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
