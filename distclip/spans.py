"""Contiguous spans: pieces of gradients lying end to end in one buffer are handled as one tensor.

The rule.  Gradients are often views into one buffer: DDP's ``gradient_as_bucket_view=True``
buckets, FSDP1's flat gradients (a unit's parameters between their padding), a user's flat
gradient buffer.  Pieces of one (device, dtype) whose elements are adjacent in memory form a
*run*, normed or scaled as one flat view: one kernel instead of one per piece, and one list entry
instead of one per gradient.  Adjacency is read from the tensors themselves (data pointers,
contiguity), never assumed, when the plan is made; and, because a step's gradients may be new
tensors (FSDP2 writes each step's gradients into a new reduce-scatter output), checked again on
the gradients of every call: each member must be contiguous and start where the plan found it
relative to its run's first gradient, inside that gradient's storage.  When that fails the
caller falls back to the pieces one by one, so a run can only ever stand for exactly the
elements of its pieces.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from torch import Tensor

Piece = tuple[int, int, int]  # (gradient index, start, stop) in the flattened local tensor


@dataclass(frozen=True)
class Runs:
    """Pieces grouped into runs of adjacent memory, with what locates each run again.

    ``runs[r] = (anchor, start, length)``: run r is ``length`` elements from element ``start`` of
    gradient ``anchor``'s storage offset on (its first piece's gradient); ``members`` are every
    piece's gradient, ``member_offsets`` where each one's first element sat relative to its
    run's anchor (in elements), ``member_runs`` its run.
    """

    runs: tuple[tuple[int, int, int], ...]
    members: tuple[int, ...]
    member_offsets: tuple[int, ...]
    member_runs: tuple[int, ...]
    itemsize: int

    def views(self, local: Sequence[Tensor]) -> list[Tensor] | None:
        """One flat view per run over the current gradients ``local``; None where adjacency no
        longer holds (then use the pieces)."""
        tensors = [local[m] for m in self.members]
        if not all(map(Tensor.is_contiguous, tensors)):
            return None
        anchors = [local[anchor] for anchor, _, _ in self.runs]
        bases = [t.data_ptr() for t in anchors]
        size = self.itemsize
        pointers = list(map(Tensor.data_ptr, tensors))
        expected = [bases[r] + offset * size for r, offset in zip(self.member_runs, self.member_offsets)]
        if pointers != expected:
            return None
        views = []
        for tensor, (_, start, length) in zip(anchors, self.runs):
            first = tensor.storage_offset() + start
            if (first + length) * size > tensor.untyped_storage().nbytes():
                return None
            views.append(tensor.as_strided((length,), (1,), first))
        return views


def find_runs(pieces: Sequence[Piece], local: Sequence[Tensor], keys: Sequence[object] | None = None) -> Runs | None:
    """Group ``pieces`` (all of one device and dtype) into runs of adjacent memory.

    Pieces must be non-empty; they join a run only with pieces of the same ``keys`` entry (e.g.
    the group a per-group norm counts them towards).  Returns None when no run would hold two
    pieces (nothing to gain), or when a piece's gradient is not a contiguous plain tensor.
    """
    if len(pieces) < 2 or not all(type(local[i]) is Tensor and local[i].is_contiguous() for i, _, _ in pieces):
        return None
    size = local[pieces[0][0]].element_size()
    located = sorted(
        (
            local[i].untyped_storage().data_ptr(),
            keys[n] if keys is not None else None,
            local[i].data_ptr() // size + start,
            n,
        )
        for n, (i, start, _) in enumerate(pieces)
    )
    runs: list[list[int]] = []  # piece numbers, in memory order
    end = None
    for storage, key, first, n in located:
        index, start, stop = pieces[n]
        if runs and end == (storage, key, first):
            runs[-1].append(n)
        else:
            runs.append([n])
        end = (storage, key, first + stop - start)
    if all(len(run) == 1 for run in runs):
        return None
    # In the pieces' order, not memory order: where separate storages lie is up to the
    # allocator, and the norm of packed runs (distclip.pieces) depends on their order by a
    # rounding, so that the same model gets the same bits in every process.
    runs.sort(key=min)
    spans, members, offsets, member_runs = [], [], [], []
    for r, run in enumerate(runs):
        anchor, anchor_start, _ = pieces[run[0]]
        anchor_pointer = local[anchor].data_ptr()
        spans.append((anchor, anchor_start, sum(pieces[n][2] - pieces[n][1] for n in run)))
        for n in run:
            members.append(pieces[n][0])
            offsets.append((local[pieces[n][0]].data_ptr() - anchor_pointer) // size)
            member_runs.append(r)
    return Runs(tuple(spans), tuple(members), tuple(offsets), tuple(member_runs), size)
