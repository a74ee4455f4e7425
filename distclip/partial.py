"""Partial gradients, reduced in place before the norm: one coalesced collective per mesh group.

A DTensor gradient with a ``Partial`` placement holds partial sums that other ranks complete:
tensor parallel with ``SequenceParallel`` and no FSDP leaves the LayerNorm weights' gradients
``Partial(sum)`` over the tp ranks.  Its norm is not defined until it is reduced, and it must be
reduced before any optimizer step anyway, so distclip reduces it first.

The rule.  Every Partial gradient whose parameter is known (``clip_grad_norm_``,
``GradClipper``, ``get_total_norm`` of a module) is reduced in place to its parameter's
placements: the local tensors of all Partial gradients that share a mesh and the same Partial
mesh dims are flattened into one buffer, all-reduced (SUM) over each of those dims' process
group once, divided by the group's size for ``Partial("avg")``, copied back, and the parameter's
``.grad`` becomes a DTensor with the parameter's placements.  The norm's one all-reduce follows.
So a step with Partial gradients costs one more collective per distinct (mesh, Partial dims): in
practice one (the tp group); a step without them costs nothing more.  Every rank of a Partial
gradient's mesh holds it (the model is the same on the tp ranks), so they all take part.

Gradients given without their parameters (``get_total_norm`` of tensors) cannot be replaced, so a
Partial one stays a problem (``Problem.PARTIAL_PLACEMENT``), raised on every rank; so does a
Partial gradient whose parameter is not Replicate along the Partial dim (a reduce-scatter would
be needed; redistribute it yourself).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed.tensor import DTensor, Replicate

from distclip.torch_internals import LOCAL_TENSOR, flatten_dense_tensors, unflatten_dense_tensors


def _partial_dims(grad: Tensor) -> tuple[int, ...]:
    if not isinstance(grad, DTensor):
        return ()
    return tuple(dim for dim, placement in enumerate(grad.placements) if placement.is_partial())


def reducible(grad: Tensor, param: Tensor) -> bool:
    """Whether ``grad`` is Partial and can be reduced to ``param``'s placements here: Replicate
    along every Partial dim, one reduce op for all of them."""
    dims = _partial_dims(grad)
    if not dims or not isinstance(param, DTensor) or param.device_mesh is not grad.device_mesh:
        return False
    ops = {grad.placements[d].reduce_op for d in dims}
    return len(ops) == 1 and ops <= {"sum", "avg"} and all(isinstance(param.placements[d], Replicate) for d in dims)


def reduce_partial_gradients_(grads: list[Tensor], params: Sequence[Tensor]) -> None:
    """Reduce every reducible Partial gradient in place (see the module docstring); ``grads[i]``
    (the gradient of ``params[i]``) is replaced by the reduced DTensor, as ``params[i].grad``."""
    # Only a DTensor can be Partial: one pass over the types, not a check per gradient.
    if not any(issubclass(kind, DTensor) for kind in set(map(type, grads))):
        return
    batches: dict[tuple, list[int]] = {}
    for index, (grad, param) in enumerate(zip(grads, params)):
        if reducible(grad, param):
            key = (id(grad.device_mesh), _partial_dims(grad), grad.placements[_partial_dims(grad)[0]].reduce_op,
                   LOCAL_TENSOR(grad).dtype, LOCAL_TENSOR(grad).device)
            batches.setdefault(key, []).append(index)
    for (_, dims, op, _, _), indices in batches.items():
        mesh = grads[indices[0]].device_mesh
        locals_ = [LOCAL_TENSOR(grads[i]) for i in indices]
        flat = flatten_dense_tensors(locals_)
        for dim in dims:
            dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=mesh.get_group(dim))
            if op == "avg":
                flat.div_(mesh.size(dim))
        for i, local, reduced in zip(indices, locals_, unflatten_dense_tensors(flat, locals_)):
            with torch.no_grad():
                local.copy_(reduced)
            param = params[i]
            grad = DTensor.from_local(local, mesh, param.placements, run_check=False, shape=param.shape, stride=param.stride())
            param.grad = grad
            grads[i] = grad
