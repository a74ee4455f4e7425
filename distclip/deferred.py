"""Flags of one reduction, read on the host at the next call: no step waits for the device.

Some outcomes of the all-reduce must reach the host: a problem another rank reported (so that
every rank raises it), a request to agree on new names (:mod:`distclip.layout`).  On the CPU the
reduced vector is on the host already, so they are read at once.  On an accelerator reading them
would make the host wait for the device on every step, so instead the flags are copied to pinned
host memory without blocking, queued behind the work that makes them, and read at the next call:
by then the copy finished long ago (the step's optimizer update, forward and backward ran on the
device since), so the read costs no wait.

The rule this gives on an accelerator: a problem found by the reduction is raised on every rank
at the next distclip call over the same group (the rank that found it raises at once), and in
the meantime the gradients are left as they are (the coefficient is 1 for an invalid step), so a
problem can neither scale gradients by NaN nor pass unnoticed.  ``deferred()`` makes the CPU
take the accelerator's rule, for tests.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import Tensor

_DEFER_ON_CPU = False


@contextlib.contextmanager
def deferred() -> Iterator[None]:
    """Within the block, CPU reductions leave their flags for the next call, as accelerators do."""
    global _DEFER_ON_CPU
    previous, _DEFER_ON_CPU = _DEFER_ON_CPU, True
    try:
        yield
    finally:
        _DEFER_ON_CPU = previous


def read_now(device: torch.device) -> bool:
    """Whether flags reduced on ``device`` are read at once (the CPU) or at the next call."""
    return device.type == "cpu" and not _DEFER_ON_CPU


class NextCall:
    """Holds a small tensor of flags until the next call reads it on the host."""

    def __init__(self) -> None:
        self._host: Tensor | None = None
        self._event = None

    def put(self, flags: Tensor) -> None:
        """Keep ``flags`` (a copy, started without waiting) for :meth:`take`."""
        if flags.device.type == "cpu":
            # Already on the host, and made for this call only (nothing writes it later).
            self._host, self._event = flags, None
            return
        host = torch.empty(flags.shape, dtype=flags.dtype, pin_memory=True)
        host.copy_(flags, non_blocking=True)
        self._event = torch.Event(device=flags.device)
        self._event.record()
        self._host = host

    def take(self) -> list[float] | None:
        """The flags put last, as host values (None if none were put); forgets them."""
        host, event = self._host, self._event
        self._host = self._event = None
        if host is None:
            return None
        if event is not None:
            event.synchronize()  # finished long ago: a step has run since
        return read_flags_on_host(host)


def read_flags_on_host(host: Tensor) -> list[float]:
    """A host tensor's values (named, so that tests' host-sync checks can tell this read, of a
    host copy made a step earlier, from a read of a device value)."""
    return host.tolist()
