"""Python objects gathered over a group: only where a value cannot ride the one all-reduce.

Used on error paths (which parameters hold NaN/inf, the exception another rank raised) and when
the names of per-group norms and metrics are agreed (the first step, and after they change):
never on the default path of a step.
"""

from __future__ import annotations

import pickle

import torch
import torch.distributed as dist

from distclip.topology import Topology, reduction_device


def all_gather_objects(obj: object, topology: Topology) -> list:
    """Every rank's ``obj`` over ``topology``'s group, in group order (``[obj]`` alone).  Two
    all-gathers (sizes, then the pickled bytes) on the reduction's device, since
    ``all_gather_object`` needs numpy."""
    if not topology.communicates:
        return [obj]
    device = reduction_device(topology, fallback=torch.device("cpu"))
    payload = torch.frombuffer(bytearray(pickle.dumps(obj)), dtype=torch.uint8).to(device)
    ranks = len(topology.group_ranks)
    sizes = [torch.zeros((), dtype=torch.int64, device=device) for _ in range(ranks)]
    dist.all_gather(sizes, torch.tensor(payload.numel(), device=device), group=topology.process_group)
    longest = max(int(s) for s in sizes)
    buffers = [torch.empty(longest, dtype=torch.uint8, device=device) for _ in range(ranks)]
    padded = torch.cat([payload, payload.new_zeros(longest - payload.numel())])
    dist.all_gather(buffers, padded, group=topology.process_group)
    return [pickle.loads(bytes(b[: int(s)].cpu().tolist())) for b, s in zip(buffers, sizes)]
