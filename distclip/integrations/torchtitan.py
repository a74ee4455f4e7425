"""torchtitan's ``clip_grad_norm_``, exact and with one all-reduce.

torchtitan (0.3.0) clips in ``torchtitan.distributed.utils.clip_grad_norm_``: torch's
``get_total_norm`` over the DTensor gradients (a reduction per sharded mesh dim, then
``full_tensor()``), then one more all-reduce over ``pp_mesh`` for pipeline stages, and with
expert parallelism two such norms, one for the expert and one for the dense parameters.  The
function here has the same signature and returns the same global norm from **one** all-reduce
over all ranks: DTensor gradients are counted by their placements on whatever meshes they live
(the expert and dense meshes alike, so ``ep_enabled`` needs no separate path), pipeline stages
are other ranks' tensors.

Plain (non-DTensor) gradients: torchtitan makes them only when pipeline parallelism is the only
parallelism, where each stage's tensors are its own.  So with ``pp_mesh`` given they have no
copies; a ``pp_mesh`` over fewer ranks than the world leaves their copies unknown, and that is
an error on every rank (pass ``replica_group`` to :func:`distclip.clip_grad_norm_` instead).
Without ``pp_mesh`` they are copies on every rank, as in DDP.

The one-line patch for torchtitan's trainer (``torchtitan/trainer.py`` calls
``dist_utils.clip_grad_norm_``)::

    import torchtitan.distributed.utils as dist_utils
    from distclip.integrations import torchtitan as distclip_torchtitan

    dist_utils.clip_grad_norm_ = distclip_torchtitan.clip_grad_norm_
"""

from __future__ import annotations

from typing import Iterable

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor

import distclip


@torch.no_grad()
def clip_grad_norm_(
    parameters: Tensor | Iterable[Tensor],
    max_norm: float,
    norm_type: float = 2.0,
    error_if_nonfinite: bool = False,
    foreach: bool | None = None,
    pp_mesh: DeviceMesh | None = None,
    ep_enabled: bool = False,
) -> Tensor:
    """Clip ``parameters``' gradients by their global norm; torchtitan's signature and value.

    Args:
        parameters, max_norm, norm_type, error_if_nonfinite, foreach: as in
            :func:`distclip.clip_grad_norm_`.
        pp_mesh: the pipeline-parallel mesh when stages hold different layers.  Its ranks'
            tensors are summed like any other rank's; it tells only that plain gradients are
            each stage's own (see the module docstring).
        ep_enabled: accepted for torchtitan's call; expert parameters are read from their
            placements, so it changes nothing.

    Returns:
        The global norm before clipping, a plain 0-dim tensor identical on every rank (torchtitan
        returns the same value).  One all-reduce over the world.
    """
    del ep_enabled
    replica_group = None if pp_mesh is None else _stage_own(pp_mesh)
    return distclip.clip_grad_norm_(
        parameters, max_norm, norm_type, error_if_nonfinite, foreach, replica_group=replica_group
    )


def _stage_own(pp_mesh: DeviceMesh):
    """The copy group of a plain gradient on a pipeline stage: none, when the stages are all
    the parallelism there is; otherwise unknown: a ValueError, which distclip raises on every
    rank together (:mod:`distclip.copygroups`), whichever ranks hold plain gradients."""
    world_size = dist.get_world_size()

    def copies(parameter: Tensor) -> None:
        # A DTensor's mesh holds every non-pipeline dim torchtitan shards or replicates over:
        # no copies outside it.
        if pp_mesh.size() != world_size and not isinstance(parameter, DTensor):
            raise ValueError(
                f"a plain gradient with pp_mesh of {pp_mesh.size()} of {world_size} ranks: its copies "
                "are unknown; call distclip.clip_grad_norm_ with replica_group=<its data-parallel group>",
            )
        return None

    return copies
