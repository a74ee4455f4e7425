"""``explain``: what distclip assumes about each gradient on this rank, without communicating.

For every gradient the clipping functions would see, it reports its layout (a DTensor's mesh and
placements, or plain), the ranks assumed to hold copies of it, and how many of its local
elements this rank counts towards the norm.  The rule it lets users check: summed over all
ranks, the counted elements equal the model's element count (each element counted once).
Problems (a copy group without this rank, a Partial placement, ...) are shown on the gradient
they concern instead of being raised: ``explain`` is what to run when a clip raises.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.placement_types import Placement

from distclip.gradients import Parameters, TensorOrTensors
from distclip.ownership import OwnershipError, local_tensor, plan_ownership
from distclip.topology import GroupLike, ReplicaGroupLike, resolve_topology


OUTSIDE_MESH = "this rank is not in the gradient's mesh: it holds none of it"


@dataclass(frozen=True)
class GradientExplanation:
    """One gradient as distclip sees it on this rank.

    ``copies`` are the ranks (this one included) assumed to hold a bitwise copy of the local
    tensor, empty when ``problem`` says why it could not be attributed; ``counted`` is how many
    of its ``local_numel`` elements this rank counts (FSDP1 padding is never counted), and
    ``counted_ranges`` which: ``(start, stop)`` ranges of the flattened local tensor.  ``note``
    says why a rank counts nothing of a gradient where that is expected (a DTensor whose mesh
    leaves out this rank).
    """

    name: str
    local_shape: tuple[int, ...]
    mesh: DeviceMesh | None
    placements: tuple[Placement, ...] | None
    copies: tuple[int, ...]
    counted: int
    local_numel: int
    problem: str | None = None
    counted_ranges: tuple[tuple[int, int], ...] = ()
    note: str | None = None

    @property
    def layout(self) -> str:
        """``plain``, or the placements and the mesh's ranks and dim names."""
        if self.mesh is None:
            return "plain"
        placements = ",".join(str(p) for p in self.placements)
        names = f" {self.mesh.mesh_dim_names}" if self.mesh.mesh_dim_names else ""
        return f"{placements} on {self.mesh.mesh.tolist()}{names}"


class Explanation(list):
    """The :class:`GradientExplanation` of each gradient; ``str()`` gives a table."""

    def __init__(self, rank: int, rows: list[GradientExplanation]) -> None:
        super().__init__(rows)
        self.rank = rank

    @property
    def counted(self) -> int:
        """Elements this rank counts, over all its gradients."""
        return sum(row.counted for row in self)

    def __str__(self) -> str:
        header = ("gradient", "local shape", "layout", "copies on ranks", "counted here")
        lines = [
            (
                row.name,
                str(tuple(row.local_shape)),
                row.layout,
                ",".join(map(str, row.copies)) or "-",
                f"{row.counted} of {row.local_numel}"
                + (f"  PROBLEM: {row.problem}" if row.problem else "")
                + (f"  ({row.note})" if row.note else ""),
            )
            for row in self
        ]
        widths = [max(len(cells[i]) for cells in [header, *lines]) for i in range(len(header) - 1)]
        table = [f"rank {self.rank}: counts {self.counted} elements of {len(self)} gradients"]
        for cells in [header, *lines]:
            table.append("  ".join(c.ljust(w) for c, w in zip(cells, widths)) + "  " + cells[-1])
        return "\n".join(table)


def explain(
    parameters: TensorOrTensors,
    *,
    group: GroupLike = None,
    replica_group: ReplicaGroupLike = None,
) -> Explanation:
    """What :func:`distclip.clip_grad_norm_` would assume about each gradient of ``parameters``.

    Takes the same ``parameters``, ``group`` and ``replica_group`` (a per-parameter callable
    included) and plans exactly as the clip does, but communicates nothing, so it can run on
    any subset of ranks.  Parameters without a gradient are left out, as the clip leaves them.

    Returns:
        An :class:`Explanation` (a list of :class:`GradientExplanation`, printable as a table),
        rows named by :mod:`distclip.gradients`' one rule: qualified names without wrapper
        prefixes when given an ``nn.Module`` (an FSDP1 unit by its flat parameter,
        ``<unit>._flat_param``), else ``parameters[i]`` by position in the list given.
    """
    topology = resolve_topology(group, replica_group)
    source = Parameters(parameters)
    gradients = source.gradients(topology)
    grads, params = gradients.grads, gradients.params
    names = {id(p): name for name, p in source.named()}
    ownership = plan_ownership(grads, topology, gradients.known, params)
    counted_ranges: list[list[tuple[int, int]]] = [[] for _ in grads]
    for index, start, stop in ownership.owned:
        counted_ranges[index].append((start, stop))
    rows = []
    for index, (grad, param, attribution) in enumerate(zip(grads, params, ownership.attributions)):
        local = local_tensor(grad)
        failed = isinstance(attribution, OwnershipError)
        rows.append(
            GradientExplanation(
                name=names[id(param)],
                local_shape=tuple(local.shape),
                mesh=grad.device_mesh if isinstance(grad, DTensor) else None,
                placements=tuple(grad.placements) if isinstance(grad, DTensor) else None,
                copies=() if failed or attribution.outside_mesh else attribution.copies,
                counted=sum(stop - start for start, stop in counted_ranges[index]),
                local_numel=local.numel(),
                problem=f"{attribution.problem.value} ({attribution.detail})" if failed else None,
                counted_ranges=tuple(counted_ranges[index]),
                note=OUTSIDE_MESH if not failed and attribution.outside_mesh else None,
            )
        )
    return Explanation(topology.rank, rows)
