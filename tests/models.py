"""Small models and data shared by the distributed tests (imported on every rank)."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import distribute_tensor
from torch.nn.parallel import DistributedDataParallel as DDP

NORM_TYPES = [2.0, 1.0, 3.0, 0.5, 0.0, float("inf"), float("-inf")]


class MLP(nn.Module):
    """A few layers of uneven sizes, one smaller than any world size (a 1-element bias)."""

    def __init__(self, width: int = 16, depth: int = 3) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(width, width) for _ in range(depth))
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = torch.tanh(layer(x))
        return self.head(self.norm(x))


def build(model_cls=MLP, seed: int = 0, **kwargs) -> nn.Module:
    torch.manual_seed(seed)
    return model_cls(**kwargs)


def shard_layers(model: nn.Module, mesh: DeviceMesh | None = None) -> nn.Module:
    """FSDP2 on each of ``model.layers`` and on the root, over ``mesh`` (default: all of WORLD)."""
    mesh = init_device_mesh("cpu", (dist.get_world_size(),)) if mesh is None else mesh
    for layer in model.layers:
        fully_shard(layer, mesh=mesh)
    return fully_shard(model, mesh=mesh)


def wrap(model: nn.Module, kind: str) -> nn.Module:
    """``kind`` "ddp": DDP over WORLD; "fsdp2": :func:`shard_layers` over WORLD."""
    return DDP(model) if kind == "ddp" else shard_layers(model)


def local(grad: torch.Tensor) -> torch.Tensor:
    """This rank's part of a gradient: a DTensor's local shard, a plain tensor itself."""
    return grad.to_local() if hasattr(grad, "to_local") else grad


def batch(rank: int, width: int = 16, rows: int = 8, seed: int = 1234) -> torch.Tensor:
    """A batch that differs per rank, so data-parallel grads differ before their reduction."""
    generator = torch.Generator().manual_seed(seed + rank)
    return torch.randn(rows, width, generator=generator) * 3


def backward(model: nn.Module, x: torch.Tensor) -> None:
    out = model(x)
    out = out.full_tensor() if hasattr(out, "full_tensor") else out
    (out.float() ** 2).mean().backward()


def parameter(shape, mesh=None, placements=None, seed: int = 0) -> nn.Parameter:
    """A parameter whose value and gradient are ``seed``'s random values: DTensors distributed
    over ``mesh`` as ``placements`` say, or plain tensors."""
    generator = torch.Generator().manual_seed(seed)
    value, grad = torch.randn(shape, generator=generator), torch.randn(shape, generator=generator)
    if mesh is None:
        param = nn.Parameter(value)
        param.grad = grad
        return param
    param = nn.Parameter(distribute_tensor(value, mesh, placements))
    param.grad = distribute_tensor(grad, mesh, placements)
    return param
