"""Rank-side helpers: float64 references from the full, unsharded gradients, and checks.

Gradients are identified by name: copies of one tensor (DDP replicas, TP-replicated params) carry
the same name on every rank, different tensors (pipeline stages, experts) different names.
"""

from __future__ import annotations

import contextlib
import copyreg
import ctypes
import io
import math
import pickle
import traceback
from typing import Any, Callable, Iterable

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor
from torch.profiler import ProfilerActivity, profile
from torch.utils._python_dispatch import TorchDispatchMode

import distclip


def _tensor_from_bytes(dtype: str, shape: tuple[int, ...], raw: bytes) -> torch.Tensor:
    if not raw:
        return torch.empty(shape, dtype=getattr(torch, dtype))
    return torch.frombuffer(bytearray(raw), dtype=getattr(torch, dtype)).reshape(shape)


def _tensor_as_bytes(tensor: torch.Tensor):
    """A tensor pickled as its dtype, shape and element bytes: torch's own pickling serializes
    each storage with ``torch.save`` (milliseconds a tensor, seconds for a model's gradients)."""
    dense = tensor.detach().resolve_conj().resolve_neg().contiguous()
    raw = ctypes.string_at(dense.data_ptr(), dense.numel() * dense.element_size())
    return _tensor_from_bytes, (str(dense.dtype).removeprefix("torch."), tuple(dense.shape), raw)


def _pickled(obj) -> bytes:
    out = io.BytesIO()
    pickler = pickle.Pickler(out)
    pickler.dispatch_table = copyreg.dispatch_table | {torch.Tensor: _tensor_as_bytes}  # exactly Tensor, CPU
    pickler.dump(obj)
    return out.getvalue()


def gather_objects(obj) -> list:
    """``dist.all_gather_object`` without its numpy dependency (CI has no numpy).  Plain CPU
    tensors travel as their bytes."""
    payload = torch.frombuffer(bytearray(_pickled(obj)), dtype=torch.uint8)
    sizes = [torch.zeros((), dtype=torch.int64) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, torch.tensor(payload.numel()))
    longest = max(int(s) for s in sizes)
    buffers = [torch.empty(longest, dtype=torch.uint8) for _ in sizes]
    dist.all_gather(buffers, torch.cat([payload, payload.new_zeros(longest - payload.numel())]))
    # The bytes copied straight out of each buffer: ``bytes(b.tolist())`` made a Python int of
    # every byte, seconds for the megabytes of a gathered gradient.
    return [pickle.loads(ctypes.string_at(b.data_ptr(), int(s))) for b, s in zip(buffers, sizes)]


def full_grads(named_grads) -> dict[str, torch.Tensor]:
    """Every rank's gradients, unsharded (DTensor.full_tensor) and gathered, by name, in float64.

    Copies must agree bitwise: that is what makes them copies.  Collective over WORLD.
    """
    mine = {}
    for name, grad in named_grads:
        if grad is None:
            continue
        full = grad.full_tensor() if isinstance(grad, DTensor) else grad
        mine[name] = full.detach().to(torch.float64).cpu()
    gathered = gather_objects(mine)
    merged: dict[str, torch.Tensor] = {}
    for per_rank in gathered:
        for name, tensor in per_rank.items():
            if name in merged:
                assert torch.equal(merged[name], tensor), f"copies of {name} differ across ranks"
            merged[name] = tensor
    return merged


def named_param_grads(named_parameters):
    return [(name, p.grad) for name, p in named_parameters]


def reference_norm(full: dict[str, torch.Tensor], norm_type: float) -> float:
    """The float64 norm of all gradient elements laid end to end (0 when there are none)."""
    if not full:
        return 0.0
    flat = torch.cat([t.flatten() for t in full.values()])
    if flat.numel() == 0:
        return 0.0
    return torch.linalg.vector_norm(flat, float(norm_type)).item()


# A GradClipper's first step also agrees with every rank on the names of its per-group norms and
# metrics (distclip.layout: two all-gathers, once); every later step is the one all-reduce.
AGREEMENT = ["gloo:all_gather", "gloo:all_gather"]


def clipper_step(first: bool) -> list[str]:
    """The collectives of one GradClipper step at world > 1."""
    return (AGREEMENT if first else []) + ["gloo:all_reduce"]


@contextlib.contextmanager
def collectives():
    """Count the gloo collectives issued inside the block: ``with collectives() as count: ...``."""
    counter = []
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        yield counter
    # The recorded events themselves, in the order they started: ``prof.events()`` builds the
    # tree of every op's FunctionEvent first, 0.1-0.4 s per block, for a few names.
    recorded = sorted(prof.profiler.kineto_results.events(), key=lambda event: event.start_ns())
    counter.extend(event.name() for event in recorded if event.name().startswith("gloo:"))


# distclip's reads allowed on the host: a CPU reduction's flags, read at once; flags an
# accelerator copied to pinned memory a step earlier (distclip.deferred); the gather of Python
# objects, which runs only when names are agreed (a clipper's first step, the step after a
# change) and on error paths (distclip.exchange).
HOST_READS = ("_problems_read_on_host", "read_flags_on_host", "all_gather_objects")


class NoHostSync(TorchDispatchMode):
    """Fails on any read of a tensor's value by the host (``.item()``, ``bool()``, ``tolist()``),
    which on an accelerator makes the host wait for the device.  The CPU-only read of the
    reduction's problem flags is the one exception: it is skipped on accelerators.

    ``host_data=True`` also fails on a tensor made from host values (``torch.tensor(...)``,
    seen as ``aten.lift_fresh``): on an accelerator that is a host-to-device copy, which
    PyTorch makes wait for the device's stream.  Planning makes such tensors once; a step with
    a plan already made must not."""

    def __init__(self, host_data: bool = False) -> None:
        super().__init__()
        self.host_data = host_data

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default and not any(
            frame.name in HOST_READS for frame in traceback.extract_stack()
        ):
            raise AssertionError("a host sync: " + "".join(traceback.format_stack(limit=12)))
        if self.host_data and func is torch.ops.aten.lift_fresh.default:
            raise AssertionError("a tensor made from host values: " + "".join(traceback.format_stack(limit=12)))
        return func(*args, **(kwargs or {}))


def assert_close_norm(actual: float, expected: float, norm_type: float, rtol: float = 1e-5) -> None:
    if math.isnan(expected):
        assert math.isnan(actual), (actual, expected)
        return
    # max/min/count are exact: no rounding may hide an element counted twice or left out.
    exact = float(norm_type) in (0.0, math.inf, -math.inf)
    tolerance = 0.0 if exact else rtol * abs(expected)
    assert abs(actual - expected) <= tolerance, (
        f"norm {actual!r} != reference {expected!r} (p={norm_type}, ratio {actual / expected if expected else 'n/a'})"
    )


def assert_explain_counts_every_element_once(parameters, model_numel: int, **kwargs) -> None:
    """``distclip.explain`` communicates nothing, and its "counted here" summed over all ranks
    is the model's element count.  Collective over WORLD (the gather, outside ``explain``)."""
    with collectives() as issued:
        explanation = distclip.explain(parameters, **kwargs)
    assert issued == [], issued
    counted = gather_objects(explanation.counted)
    assert sum(counted) == model_numel, f"explain counts {counted} (sum {sum(counted)}), model {model_numel}"


def clip_and_check(
    named_parameters, norm_type, *, max_norm=None, rtol=1e-5, clipped_rtol=1e-5, **kwargs
) -> dict:
    """Clip with distclip and check it against the float64 reference from the full gradients.

    Checks: the returned norm equals the reference; it is a plain 0-dim tensor; each tensor's
    own norm equals its reference; the gradients after clipping equal reference * coefficient;
    ``explain`` counts every element once.
    Returns what must agree across ranks.  ``clipped_rtol`` is the precision of the gradients'
    dtype (bf16 gradients are scaled in bf16).
    """
    named_parameters = list(named_parameters)
    before = full_grads(named_param_grads(named_parameters))
    expected = reference_norm(before, norm_type)
    if max_norm is None:
        max_norm = 0.5 * expected if math.isfinite(expected) and expected > 0 else 1.0
    # Per tensor too, so that a small tensor counted twice cannot hide in a large total.  Every
    # rank calls once per name of the whole model, holding the tensor or not.
    mine = {name: p.grad for name, p in named_parameters if p.grad is not None}
    for name in sorted(before):
        alone = distclip.get_total_norm([mine[name]] if name in mine else [], norm_type, **kwargs)
        assert_close_norm(alone.item(), reference_norm({name: before[name]}, norm_type), norm_type, rtol)

    assert_explain_counts_every_element_once(
        [p for _, p in named_parameters], sum(t.numel() for t in before.values()), **kwargs
    )
    with collectives() as issued:
        total = distclip.clip_grad_norm_(
            [p for _, p in named_parameters], max_norm, norm_type, **kwargs
        )
    assert type(total) is torch.Tensor and total.dim() == 0, type(total)
    assert_close_norm(total.item(), expected, norm_type, rtol)

    after = full_grads(named_param_grads(named_parameters))
    coefficient = min(max_norm / (total.double().item() + 1e-6), 1.0)
    for name, grad in before.items():
        torch.testing.assert_close(after[name], grad * coefficient, rtol=clipped_rtol, atol=1e-7)
    return {"norm": total.item().hex(), "dtype": str(total.dtype), "collectives": issued}


def clip_and_check_each(named_parameters, norm_types, **kwargs) -> dict:
    """:func:`clip_and_check` for each p of ``norm_types``, all from the same gradients (saved
    once and copied back in place before each p, as each p clips them): the model is built,
    wrapped and stepped once for them all.  ``{p: result}``, a failure naming its p."""
    named_parameters = list(named_parameters)
    grads = [p.grad for _, p in named_parameters if p.grad is not None]
    saved = [_local(grad).clone() for grad in grads]

    def from_the_same_gradients(norm_type):
        for grad, values in zip(grads, saved):
            _local(grad).copy_(values)
        return clip_and_check(named_parameters, norm_type, **kwargs)

    return every_case(from_the_same_gradients, norm_types)


def _local(grad: torch.Tensor) -> torch.Tensor:
    return grad.to_local() if isinstance(grad, DTensor) else grad


def assert_same_on_all_ranks(results: list[dict], case="") -> None:
    """Every rank returned the same norm, bit for bit, from exactly one collective."""
    norms = {r["norm"] for r in results}
    assert len(norms) == 1, f"{case}norm differs across ranks: {norms}"
    for rank, r in enumerate(results):
        assert r["collectives"] == ["gloo:all_reduce"], f"{case}rank {rank} issued {r['collectives']}"


class CaseFailed(AssertionError):
    """Which case of :func:`every_case` failed; the failure itself is its ``__cause__``."""


def every_case(check: Callable[..., Any], cases: Iterable, *args: Any, **kwargs: Any) -> dict:
    """Rank side: ``check(case, *args, **kwargs)`` for each case in turn, in ONE task: one round
    trip to the ranks (and one set-up of the task) instead of one per case.  Returns
    ``{case: result}``; the first failure stops the task (the ranks could no longer agree on
    the collectives to come) and is raised as :class:`CaseFailed` naming its case."""
    results = {}
    for case in cases:
        try:
            results[case] = check(case, *args, **kwargs)
        except BaseException as error:
            raise CaseFailed(f"{check.__name__} failed for case {case!r}") from error
    return results


def by_case(per_rank: list[dict]) -> dict[Any, list]:
    """``every_case``'s results of every rank, as ``{case: [rank 0's result, rank 1's, ...]}``."""
    return {case: [results[case] for results in per_rank] for case in per_rank[0]}


def assert_same_on_all_ranks_in_every_case(per_rank: list[dict]) -> None:
    """:func:`assert_same_on_all_ranks` for each case of :func:`every_case`'s results."""
    for case, results in by_case(per_rank).items():
        assert_same_on_all_ranks(results, case=f"case {case!r}: ")
