"""On-the-fly graphs: neighbor lists built per batch on the model's device.

For the largest splits the stored graphs (:mod:`forcenet.data.graphs`) are replaced by
:class:`OnTheFlyGraphs`, which adds ``edge_index`` and ``cell_offsets`` to a collated
batch of frames where it lies (CPU or CUDA), with vesin-torch for the pair search and
the rules of :mod:`forcenet.data.neighbors` for the rest: the same cutoff, minimum
distance, truncation to the nearest ``max_neighbors`` and tie rule, so the edges are
exactly those of the stored graphs (``tests/data/test_online.py``). Positions are
float32 in a batch, as in the frame store, and the search runs on them in float64, as
the neighbors stage does.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from forcenet.data import keys as K
from forcenet.data.batch import Batch
from forcenet.data.frame import MIN_DISTANCE
from forcenet.data.graphs import GraphSettings
from forcenet.data.neighbors import DISTANCE_QUANTUM, NeighborListError, check_params


def _bits(n: int) -> int:
    return max(int(n - 1).bit_length(), 1)


class OnTheFlyGraphs:
    """Adds the graph of every structure of a batch (``settings``: cutoff, max_neighbors).

    Call it on a batch without edges after moving it to the model's device; it returns a
    new batch dict with ``edge_index`` [2, E] (shifted by each structure's first atom)
    and ``cell_offsets`` [E, 3] float32, as :func:`forcenet.data.batch.collate` gives them.
    """

    def __init__(self, settings: GraphSettings) -> None:
        check_params(settings.cutoff, settings.max_neighbors)
        self.settings = settings
        self._search = None

    def _calculator(self):
        if self._search is None:
            from vesin_torch import NeighborList

            self._search = NeighborList(cutoff=float(self.settings.cutoff), full_list=True)
        return self._search

    def __call__(self, batch: Batch) -> Batch:
        pos, cell, pbc, natoms = batch[K.POS], batch[K.CELL], batch[K.PBC], batch[K.NATOMS]
        device = pos.device
        starts = (torch.cumsum(natoms, 0) - natoms).tolist()
        counts = natoms.tolist()
        search = self._calculator()
        centres, nbrs, shifts, dists = [], [], [], []
        with torch.no_grad():
            pos64 = pos.detach().to(torch.float64)
            cell64 = cell.detach().to(torch.float64)
            for g, (start, n) in enumerate(zip(starts, counts, strict=True)):
                if n == 0:
                    continue
                periodic = pbc[g].to(torch.bool)
                box = cell64[g] if bool(periodic.any()) else torch.zeros_like(cell64[g])
                i, j, s, d = search.compute(
                    points=pos64[start : start + n], box=box, periodic=periodic, quantities="ijSd"
                )
                s = s.to(torch.int64)
                keep = self._not_self(batch, g, i, j, s, d)
                if keep is not None:
                    i, j, s, d = i[keep], j[keep], s[keep], d[keep]
                if not bool(periodic.all()):
                    s[:, ~periodic] = 0
                centres.append(i.to(torch.int64) + start)
                nbrs.append(j.to(torch.int64) + start)
                shifts.append(s)
                dists.append(d)
        out = dict(batch)
        if not centres:
            out[K.EDGE_INDEX] = torch.zeros((2, 0), dtype=torch.int64, device=device)
            out[K.CELL_OFFSETS] = torch.zeros((0, 3), dtype=torch.float32, device=device)
            return out
        i, j = torch.cat(centres), torch.cat(nbrs)
        s, d = torch.cat(shifts), torch.cat(dists)
        order = self._order(i, j, s, d, int(pos.shape[0]))
        i, j, s = i[order], j[order], s[order]
        per_centre = torch.bincount(i, minlength=int(pos.shape[0]))
        if int(per_centre.max()) > self.settings.max_neighbors:
            first = torch.cumsum(per_centre, 0) - per_centre
            rank = torch.arange(len(i), device=device) - torch.repeat_interleave(first, per_centre)
            keep = rank < self.settings.max_neighbors
            i, j, s = i[keep], j[keep], s[keep]
        out[K.EDGE_INDEX] = torch.stack([j, i])
        out[K.CELL_OFFSETS] = s.to(torch.float32)
        return out

    @staticmethod
    def _not_self(
        batch: Batch, g: int, i: Tensor, j: Tensor, s: Tensor, d: Tensor
    ) -> Tensor | None:
        """The mask of pairs that are not an atom with itself (None: all are), after
        refusing two atoms closer than the minimum distance, naming the structure."""
        if len(d) == 0 or float(d.min()) >= MIN_DISTANCE:
            return None
        self_pair = (i == j) & ~s.any(dim=1)
        close = (d < MIN_DISTANCE) & ~self_pair
        if bool(close.any()):
            k = int(torch.nonzero(close)[0])
            a, b = sorted((int(i[k]), int(j[k])))
            name = f"structure {g} of the batch"
            if K.SID in batch:
                name += f" (sid {int(batch[K.SID][g])}, fid {int(batch[K.FID][g])})"
            raise NeighborListError(
                f"{name}: atoms {a} and {b} are {float(d[k]):.3g} Å apart, closer than the "
                f"minimum distance {MIN_DISTANCE} Å (duplicate positions?)"
            )
        return ~self_pair

    def _order(self, i: Tensor, j: Tensor, s: Tensor, d: Tensor, n: int) -> Tensor:
        """The permutation that sorts edges by centre, then distance (quantised), then
        neighbor, then image offset: the order of :func:`forcenet.data.neighbors.neighbor_list`."""
        span = int(s.abs().max()) * 2 + 1 if len(s) else 1
        half = span // 2
        weights = torch.tensor([span * span, span, 1], dtype=torch.int64, device=s.device)
        code = (s * weights).sum(dim=1) + half * (span * span + span + 1)
        levels = math.ceil(self.settings.cutoff / DISTANCE_QUANTUM) + 1
        quantised = torch.round(d * (1.0 / DISTANCE_QUANTUM)).to(torch.int64)
        if 2 * _bits(n) + _bits(levels) + _bits(span**3) <= 63:
            key = ((i * levels + quantised) * n + j) * span**3 + code
            return torch.argsort(key)
        # keys too wide for one int64: stable sorts from the last key to the first
        order = torch.argsort(j * span**3 + code, stable=True)
        for key in (quantised, i):
            order = order[torch.argsort(key[order], stable=True)]
        return order
