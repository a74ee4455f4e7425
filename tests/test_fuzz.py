"""Property-based: random gradient layouts on real gloo ranks (world 4) give the float64
reference norm, bitwise identical on every rank, from exactly one collective.

Each example draws 1-6 gradients: plain tensors (copies on every rank) or DTensors on a 1-D, 2-D
or 3-D mesh or one of its 1-D sub-meshes, with any mix of ``Shard`` (any dim), ``_StridedShard``
and ``Replicate`` placements; shapes of 0-3 dims with sizes 0-7 (empty and 1-element tensors,
uneven and empty shards); fp32/bf16/fp16/fp64; p in {2, 1, 3, 0.5, 0, inf, -inf}.  Every rank
builds the same full tensors from the example's seed, so the reference needs no communication.

CI runs a fixed, derandomized set of examples.  A longer run by hand:
``DISTCLIP_FUZZ_PROFILE=long python -m pytest tests/test_fuzz.py``.
"""

from __future__ import annotations

import math
import os

import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import distclip
from reference import assert_close_norm, collectives

WORLD = 4
MESH_SHAPES = [(4,), (2, 2), (1, 4), (4, 1), (2, 1, 2), (1, 2, 2), (2, 2, 1)]
DTYPES = ["float32", "bfloat16", "float16", "float64"]
NORM_TYPES = [2.0, 1.0, 3.0, 0.5, 0.0, math.inf, -math.inf]
UNSUPPORTED = "layout not constructible"

settings.register_profile(
    "ci", max_examples=20, derandomize=True, deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile(
    "long", max_examples=500, deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.load_profile(os.environ.get("DISTCLIP_FUZZ_PROFILE", "ci"))


@st.composite
def placements(draw, tensor_ndim: int, mesh_ndim: int) -> list[tuple]:
    """Per mesh dim: ("R",), ("S", dim) or ("SS", dim) for _StridedShard(dim, split_factor=2)."""
    options = [("R",)]
    if tensor_ndim:
        dims = st.integers(0, tensor_ndim - 1)
        options += [("S", draw(dims)), ("SS", draw(dims))]
    return [draw(st.sampled_from(options)) for _ in range(mesh_ndim)]


@st.composite
def layouts(draw) -> dict:
    mesh_shape = draw(st.sampled_from(MESH_SHAPES))
    grads = []
    for _ in range(draw(st.integers(1, 6))):
        shape = tuple(draw(st.lists(st.integers(0, 7), max_size=3)))
        where = draw(st.sampled_from(["plain", "root"] + [f"d{i}" for i in range(len(mesh_shape))]))
        mesh_ndim = len(mesh_shape) if where == "root" else 1
        grads.append({
            "shape": shape,
            "dtype": draw(st.sampled_from(DTYPES)),
            "where": where,
            "placements": [] if where == "plain" else draw(placements(len(shape), mesh_ndim)),
        })
    return {"mesh_shape": mesh_shape, "grads": grads, "seed": draw(st.integers(0, 2**16))}


def _full_tensors(layout: dict) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(layout["seed"])
    tensors = []
    for spec in layout["grads"]:
        values = torch.randn(spec["shape"], generator=generator, dtype=torch.float64) * 3
        zeros = torch.rand(spec["shape"], generator=generator, dtype=torch.float64) < 0.2  # for p=0, -inf
        tensors.append(values.masked_fill(zeros, 0).to(getattr(torch, spec["dtype"])))
    return tensors


def _build(layout: dict, full: list[torch.Tensor]):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor
    from torch.distributed.tensor.placement_types import _StridedShard

    names = tuple(f"d{i}" for i in range(len(layout["mesh_shape"])))
    root = init_device_mesh("cpu", layout["mesh_shape"], mesh_dim_names=names)
    make = {"R": lambda: Replicate(), "S": Shard, "SS": lambda d: _StridedShard(d, split_factor=2)}
    grads = []
    for spec, tensor in zip(layout["grads"], full):
        if spec["where"] == "plain":
            grads.append(tensor.clone())
            continue
        mesh = root if spec["where"] == "root" else root[spec["where"]]
        chosen = [make[p[0]](*p[1:]) for p in spec["placements"]]
        # No communication: every rank holds the full tensor and keeps its own shard.
        grads.append(distribute_tensor(tensor, mesh, chosen, src_data_rank=None))
    return grads


def _norm_of_layout(layout: dict, norm_type: float):
    full = _full_tensors(layout)
    try:
        grads = _build(layout, full)
    except (ValueError, RuntimeError, NotImplementedError, AssertionError):
        return UNSUPPORTED  # a placement DTensor itself rejects; every rank rejects it alike
    with collectives() as issued:
        norm = distclip.get_total_norm(grads, norm_type)
    flat = torch.cat([t.to(torch.float64).flatten() for t in full])
    expected = torch.linalg.vector_norm(flat, norm_type).item() if flat.numel() else 0.0
    assert_close_norm(norm.item(), expected, norm_type, rtol=1e-5)
    return norm.item().hex(), issued


@given(layout=layouts(), norm_type=st.sampled_from(NORM_TYPES))
def test_random_layouts_give_the_reference_norm_identically_from_one_collective(ranks, layout, norm_type):
    results = ranks(WORLD).run(_norm_of_layout, layout, norm_type)
    assume(results[0] != UNSUPPORTED)
    assert len({norm for norm, _ in results}) == 1, f"norm differs across ranks: {results}"
    for rank, (_, issued) in enumerate(results):
        assert issued == ["gloo:all_reduce"], f"rank {rank} issued {issued}"
