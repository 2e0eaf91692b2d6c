"""Every field name, shape, dtype and unit used between disk, batch and model.

Conventions (pinned by ``tests/data/test_keys.py``):

* Lengths in Å, energies in eV, forces in eV/Å.
* ``cell`` rows are the lattice vectors a, b, c (ASE convention): a Cartesian shift
  for integer image ``n`` is ``n @ cell``.
* **Edges**: ``edge_index[0]`` is the neighbor ``j`` (source), ``edge_index[1]`` is the
  centre ``i`` (target); messages flow j -> i and are summed at i. The edge vector is
  ``pos[j] + cell_offsets @ cell - pos[i]`` (points from the centre to the neighbor's
  periodic image). Both directions of a pair are stored, so the graph is symmetric.
* ``tags``: 0 sub-surface slab atom, 1 surface slab atom, 2 adsorbate atom (OC20).
  ``fixed``: True for atoms held by a constraint; "free atoms" are ``~fixed``.
* ``energy`` is the *referenced* energy (total minus the per-system reference energy,
  i.e. the adsorption energy in OC20); ``total_energy`` is the raw calculator energy.

Per-frame record (LMDB frame store, numpy arrays; N atoms):

=================  ==========  =========  =====
key                shape       dtype      unit
=================  ==========  =========  =====
pos                [N, 3]      float32    Å
cell               [3, 3]      float32    Å
pbc                [3]         bool
atomic_numbers     [N]         int64
tags               [N]         int64
fixed              [N]         bool
forces             [N, 3]      float32    eV/Å
energy             []          float64    eV (referenced)
total_energy       []          float64    eV
sid                []          int64      system id
fid                []          int64      frame number within the system
=================  ==========  =========  =====

Per-frame graph (what the dataset gives with the frame; E edges):

=================  ==========  =========
edge_index         [2, E]      int64
cell_offsets       [E, 3]      int64
=================  ==========  =========

On disk (LMDB graph store, same integer key as the frame, graph schema
:data:`GRAPH_SCHEMA_VERSION`) the graph is compact, about 2 bytes per edge
(:func:`forcenet.data.graphs.encode_graph`): edges are sorted by centre, so the centre of
each edge is implied by the per-atom counts, and every image offset within ±2 cells is
one byte:

=================  ==========  =====================================================
neighbor_counts    [N]         uint8 (uint16, uint32): edges of each centre i
neighbors          [E]         uint8 (uint16, uint32): neighbor j, the smallest type
                               that holds N - 1
offset_codes       [E]         uint8: ``((a + 2) * 5 + b + 2) * 5 + c + 2`` for the
                               image offset (a, b, c), each in -2..2
cell_offsets       [E, 3]      int8: instead of ``offset_codes`` when an offset is
                               outside -2..2 (tiny cells)
=================  ==========  =====================================================

Batch (``forcenet.data.batch.collate``; torch tensors; G graphs, N atoms, E edges):
the per-atom and per-edge fields concatenated, ``edge_index`` shifted by each graph's
first atom, per-graph fields stacked, plus ``batch`` [N] int64 (graph of each atom) and
``natoms`` [G] int64. In a batch ``cell`` is [G, 3, 3] float32, ``pbc`` [G, 3] bool,
``cell_offsets`` [E, 3] float32, ``energy``/``total_energy`` [G] float32,
``sid``/``fid`` [G] int64.
"""

from __future__ import annotations

POS = "pos"
CELL = "cell"
PBC = "pbc"
ATOMIC_NUMBERS = "atomic_numbers"
TAGS = "tags"
FIXED = "fixed"
FORCES = "forces"
ENERGY = "energy"
TOTAL_ENERGY = "total_energy"
SID = "sid"
FID = "fid"

EDGE_INDEX = "edge_index"
CELL_OFFSETS = "cell_offsets"

BATCH = "batch"
NATOMS = "natoms"

#: Fields of a frame record, in storage order.
FRAME_FIELDS = (POS, CELL, PBC, ATOMIC_NUMBERS, TAGS, FIXED, FORCES, ENERGY, TOTAL_ENERGY, SID, FID)
#: Fields of a graph as the dataset gives it.
GRAPH_FIELDS = (EDGE_INDEX, CELL_OFFSETS)
#: Fields of a compact graph record on disk (graph schema 2).
NEIGHBOR_COUNTS = "neighbor_counts"
NEIGHBORS = "neighbors"
OFFSET_CODES = "offset_codes"
#: Per-atom fields (concatenated along dim 0 when batching).
ATOM_FIELDS = (POS, ATOMIC_NUMBERS, TAGS, FIXED, FORCES)
#: Per-graph fields (stacked when batching).
GRAPH_LEVEL_FIELDS = (CELL, PBC, ENERGY, TOTAL_ENERGY, SID, FID)
#: Per-edge fields (concatenated along the edge dimension).
EDGE_FIELDS = (EDGE_INDEX, CELL_OFFSETS)

#: Model output keys.
OUT_FORCES = FORCES  # [N, 3] eV/Å
OUT_ENERGY = ENERGY  # [G] eV (referenced), only for models with an energy

#: OC20 tag values.
TAG_SUBSURFACE, TAG_SURFACE, TAG_ADSORBATE = 0, 1, 2

#: Split names, mirroring OC20 S2EF.
TRAIN = "train"
VAL_SPLITS = ("val_id", "val_ood_ads", "val_ood_cat", "val_ood_both")
SPLITS = (TRAIN, *VAL_SPLITS)

#: Version of the on-disk record schema; bump when a field or the record layout changes
#: (2: a CRC-32 per record, see :mod:`forcenet.data.codec`).
SCHEMA_VERSION = 2
#: Version of the graph record layout (1: int64 ``edge_index`` and ``cell_offsets``, 43
#: bytes per edge; 2: the compact layout above). A graph store of another version is
#: refused with the command that rebuilds it; nothing is converted silently.
GRAPH_SCHEMA_VERSION = 2


def split_order(splits) -> list[str]:
    """The validation splits in OC20 order, then the training split, then the rest."""
    known = [s for s in (*VAL_SPLITS, TRAIN) if s in set(splits)]
    return known + sorted(set(splits) - set(known))
