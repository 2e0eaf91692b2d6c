"""The graph record format: the edges of one frame, as a graph store holds them.

For every frame shard ``<lmdb_root>/<split>/<k>.lmdb`` a graph shard
``<out_root>/<split>/<k>.lmdb`` (built by :func:`forcenet.data.graph_build.build_graphs`)
holds, under the same integer keys, the edges of
:func:`forcenet.data.neighbors.neighbor_list` on the stored (float32) positions in the
compact layout of graph schema :data:`~forcenet.data.keys.GRAPH_SCHEMA_VERSION`
(:func:`encode_graph`, about 2 bytes per edge; the table is in :mod:`forcenet.data.keys`).
The dataset expands a record back to ``edge_index`` [2, E] and ``cell_offsets`` [E, 3]
(:func:`decode_graph`). Each shard's meta records ``cutoff``, ``max_neighbors``, the
graph schema, the frame count and the digest of the frame shard's meta, so a graph store
paired with other frames, or written by an older version, is caught by the dataset.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from forcenet.data import keys as K
from forcenet.data import neighbors, store
from forcenet.data.manifest import read_manifest
from forcenet.data.offsets import OFFSET_RANGE, OFFSET_TABLE, offset_codes


def _index_dtype(largest: int) -> np.dtype:
    """The smallest unsigned integer type that holds ``largest``."""
    for dtype in (np.uint8, np.uint16, np.uint32):
        if largest <= np.iinfo(dtype).max:
            return np.dtype(dtype)
    raise ValueError(f"{largest} does not fit a uint32 graph index")


def encode_graph(
    edge_index: np.ndarray, cell_offsets: np.ndarray, natoms: int
) -> dict[str, np.ndarray]:
    """The compact graph record (graph schema 2, table in :mod:`forcenet.data.keys`).

    ``edge_index`` [2, E] must be sorted by centre (row 1), as
    :func:`~forcenet.data.neighbors.neighbor_list` returns it: the centres are then
    implied by the per-atom counts, and :func:`decode_graph` returns exactly these arrays.
    """
    edge_index = np.asarray(edge_index)
    centres, nbrs = edge_index[1], edge_index[0]
    if len(centres) and (np.any(np.diff(centres) < 0) or centres[-1] >= natoms):
        raise ValueError("edges must be sorted by centre, with centres below natoms")
    counts = np.bincount(centres, minlength=natoms)
    record = {
        K.NEIGHBOR_COUNTS: counts.astype(_index_dtype(int(counts.max(initial=0)))),
        K.NEIGHBORS: nbrs.astype(_index_dtype(max(natoms - 1, 0))),
    }
    offsets = np.asarray(cell_offsets, dtype=np.int64).reshape(-1, 3)
    largest = int(np.abs(offsets).max(initial=0))
    if largest <= OFFSET_RANGE:
        record[K.OFFSET_CODES] = offset_codes(offsets)
    elif largest <= np.iinfo(np.int8).max:
        record[K.CELL_OFFSETS] = offsets.astype(np.int8)
    else:
        raise ValueError(f"cell offset {largest} exceeds the int8 range of the graph store")
    return record


def _require_compact(record: dict[str, np.ndarray], where: str) -> None:
    """Refuse anything but a compact (graph schema 2) graph record, naming ``where``."""
    if K.NEIGHBOR_COUNTS in record and K.NEIGHBORS in record:
        return
    if K.EDGE_INDEX in record:
        raise store.GraphSchemaError(
            f"{where}: graph schema 1 (int64 edge_index); this code reads graph schema "
            f"{K.GRAPH_SCHEMA_VERSION}: {store.REBUILD_GRAPHS}"
        )
    raise store.StoreError(f"{where}: not a graph record (fields {sorted(record)})")


def check_compact(
    record: dict[str, np.ndarray], *, natoms: int, where: str = "graph record"
) -> dict[str, np.ndarray]:
    """``record`` after checking it is a compact graph record of a structure of ``natoms``
    atoms (a :class:`~forcenet.data.store.StoreError` naming ``where`` otherwise)."""
    _require_compact(record, where)
    counts, nbrs = record[K.NEIGHBOR_COUNTS], record[K.NEIGHBORS]
    offsets = record.get(K.OFFSET_CODES, record.get(K.CELL_OFFSETS))
    edges = int(counts.sum(dtype=np.int64))
    if len(counts) != natoms:
        raise store.StoreError(
            f"{where}: neighbor counts of {len(counts)} atoms, frame has {natoms}"
        )
    if edges != len(nbrs) or offsets is None or len(offsets) != edges:
        raise store.StoreError(
            f"{where}: the counts sum to {edges} edges, but there are {len(nbrs)} neighbors "
            f"and {None if offsets is None else len(offsets)} offsets"
        )
    if edges and int(nbrs.max()) >= natoms:
        raise store.StoreError(f"{where}: neighbor index {int(nbrs.max())} >= {natoms} atoms")
    if K.OFFSET_CODES in record and edges and int(offsets.max()) >= len(OFFSET_TABLE):
        raise store.StoreError(f"{where}: offset code {int(offsets.max())} out of range")
    return record


def decode_graph(record: dict[str, np.ndarray], *, where: str = "graph record") -> dict:
    """``edge_index`` [2, E] and ``cell_offsets`` [E, 3] (int64) of a compact graph record."""
    _require_compact(record, where)
    counts, nbrs = record[K.NEIGHBOR_COUNTS], record[K.NEIGHBORS]
    centres = np.repeat(np.arange(len(counts), dtype=np.int64), counts)
    if len(centres) != len(nbrs):
        raise store.StoreError(
            f"{where}: {len(nbrs)} neighbors but the counts sum to {len(centres)}"
        )
    if K.OFFSET_CODES in record:
        if len(nbrs) and int(record[K.OFFSET_CODES].max()) >= len(OFFSET_TABLE):
            raise store.StoreError(f"{where}: offset code out of range")
        offsets = OFFSET_TABLE.take(record[K.OFFSET_CODES].astype(np.intp), axis=0, mode="clip")
    else:
        offsets = record[K.CELL_OFFSETS].astype(np.int64)
    if len(offsets) != len(nbrs):
        raise store.StoreError(f"{where}: {len(nbrs)} neighbors but {len(offsets)} offsets")
    edge_index = np.empty((2, len(nbrs)), dtype=np.int64)
    edge_index[0] = nbrs
    edge_index[1] = centres
    return {K.EDGE_INDEX: edge_index, K.CELL_OFFSETS: offsets}


def graph_record(
    record: dict[str, np.ndarray], *, cutoff: float, max_neighbors: int
) -> dict[str, np.ndarray]:
    """The graph (``edge_index`` [2, E], ``cell_offsets`` [E, 3]) of one frame record."""
    edge_index, cell_offsets = neighbors.neighbor_list(
        record[K.POS], record[K.CELL], record[K.PBC], cutoff, max_neighbors
    )
    return {K.EDGE_INDEX: edge_index, K.CELL_OFFSETS: cell_offsets}


@dataclass(frozen=True)
class GraphSettings:
    """How a graph store was built: ``cutoff`` [Å] and the nearest ``max_neighbors`` per atom.

    Recorded in every graph shard's meta and in the split's manifest, stored in every
    checkpoint, and compared wherever graphs meet a model (training, evaluation).
    """

    cutoff: float
    max_neighbors: int

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any]) -> GraphSettings:
        return cls(cutoff=float(data["cutoff"]), max_neighbors=int(data["max_neighbors"]))

    def as_dict(self) -> dict[str, float | int]:
        return {"cutoff": self.cutoff, "max_neighbors": self.max_neighbors}

    def check_same(self, other: GraphSettings, *, where: str, other_name: str) -> None:
        """Raise ``ValueError`` naming ``where`` unless ``other`` has the same settings."""
        for key in ("cutoff", "max_neighbors"):
            mine, theirs = getattr(self, key), getattr(other, key)
            if float(mine) != float(theirs):
                raise ValueError(
                    f"{where}: graphs built with {key}={mine}, but {other_name} has "
                    f"{key}={theirs}; rebuild the graphs or use matching settings"
                )


def read_graph_settings(graphs_dir: Path) -> GraphSettings:
    """The settings of the graph store ``graphs_dir`` (a split folder), from its manifest,
    else from its shards (which must agree)."""
    manifest = read_manifest(graphs_dir)
    if manifest is not None and "cutoff" in manifest:
        return GraphSettings.from_mapping(manifest)
    shards = store.list_lmdb(graphs_dir)
    if not shards:
        raise store.StoreError(f"{graphs_dir}: no graph shards (*.lmdb); build the graphs first")
    found = {GraphSettings.from_mapping(store.read_meta(p)) for p in shards}
    if len(found) != 1:
        raise store.StoreError(f"{graphs_dir}: shards built with different settings {found}")
    return found.pop()
