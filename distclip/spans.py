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
elements of its pieces.  Pieces of a gradient that is not contiguous (a strided view) never join
a run: they stay pieces of their gradient, whatever its layout (:func:`distclip.pieces.piece_tensors`
reads any layout), next to the runs of the others.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from torch import Tensor

Piece = tuple[int, int, int]  # (gradient index, start, stop) in the flattened local tensor


@dataclass(frozen=True)
class Runs:
    """Pieces grouped into runs of adjacent memory, with what locates each run again.

    The *units* of a step are :meth:`views`: one flat view per run, then the gradients ``alone``
    (those with a piece in no run) as they are; ``ranges`` are ``(unit, start, stop, unit
    numel)``, every piece covered once, in the pieces' order (a run where its first piece is),
    and ``range_pieces`` the piece each range stands for (a run's first).  ``runs[r] = (anchor,
    start, length)``: run r is ``length`` elements from element ``start`` of gradient ``anchor``'s
    storage offset on; ``members`` are every run piece's gradient, ``member_offsets`` where each
    one's first element sat relative to its run's anchor (in elements), ``member_runs`` its run.
    """

    runs: tuple[tuple[int, int, int], ...]
    members: tuple[int, ...]
    member_offsets: tuple[int, ...]
    member_runs: tuple[int, ...]
    itemsize: int
    alone: tuple[int, ...]
    ranges: tuple[tuple[int, int, int, int], ...]
    range_pieces: tuple[int, ...]

    def views(self, local: Sequence[Tensor]) -> list[Tensor] | None:
        """The units over the current gradients ``local``: one flat view per run, then the
        gradients alone; None where adjacency no longer holds (then use the pieces)."""
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
        views += [local[i] for i in self.alone]
        return views


def find_runs(pieces: Sequence[Piece], local: Sequence[Tensor], keys: Sequence[object] | None = None) -> Runs | None:
    """Group ``pieces`` (all of one device and dtype) into runs of adjacent memory.

    Pieces must be non-empty; they join a run only with pieces of the same ``keys`` entry (e.g.
    the group a per-group norm counts them towards), and only when their gradient is a
    contiguous plain tensor.  Returns None when no run would hold two pieces (nothing to gain).
    """
    if len(pieces) < 2:
        return None
    joinable = [n for n, (i, _, _) in enumerate(pieces) if type(local[i]) is Tensor and local[i].is_contiguous()]
    if len(joinable) < 2:
        return None
    size = local[pieces[0][0]].element_size()
    located = sorted(
        (
            local[pieces[n][0]].untyped_storage().data_ptr(),
            keys[n] if keys is not None else None,
            local[pieces[n][0]].data_ptr() // size + pieces[n][1],
            n,
        )
        for n in joinable
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
    runs = [run for run in runs if len(run) > 1]  # a piece alone stays a piece of its gradient
    if not runs:
        return None
    # In the pieces' order, not memory order: where separate storages lie is up to the
    # allocator, and the norm of packed runs (distclip.pieces) depends on their order by a
    # rounding, so that the same model gets the same bits in every process.
    runs.sort(key=min)
    spans, members, offsets, member_runs = [], [], [], []
    run_of_piece: dict[int, int] = {}
    for r, run in enumerate(runs):
        anchor, anchor_start, _ = pieces[run[0]]
        anchor_pointer = local[anchor].data_ptr()
        spans.append((anchor, anchor_start, sum(pieces[n][2] - pieces[n][1] for n in run)))
        for n in run:
            members.append(pieces[n][0])
            offsets.append((local[pieces[n][0]].data_ptr() - anchor_pointer) // size)
            member_runs.append(r)
            run_of_piece[n] = r
    alone: dict[int, int] = {}  # gradient -> its unit
    ranges, range_pieces = [], []
    for n, (index, start, stop) in enumerate(pieces):
        if n not in run_of_piece:
            unit = alone.setdefault(index, len(runs) + len(alone))
            ranges.append((unit, start, stop, local[index].numel()))
            range_pieces.append(n)
        elif min(runs[run_of_piece[n]]) == n:
            length = spans[run_of_piece[n]][2]
            ranges.append((run_of_piece[n], 0, length, length))
            range_pieces.append(n)
    return Runs(
        tuple(spans),
        tuple(members),
        tuple(offsets),
        tuple(member_runs),
        size,
        tuple(alone),
        tuple(ranges),
        tuple(range_pieces),
    )
