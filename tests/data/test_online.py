"""On-the-fly graphs give exactly the stored graphs' edges, batch by batch."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from ase.build import fcc111, molecule

from forcenet.data import keys as K
from forcenet.data.batch import collate
from forcenet.data.dataset import sample_from_atoms
from forcenet.data.graphs import GraphSettings
from forcenet.data.neighbors import NeighborListError
from forcenet.data.online import OnTheFlyGraphs


def _structures():
    rng = np.random.default_rng(3)
    out = []
    for size in ((2, 2, 3), (3, 3, 4), (2, 3, 2)):
        slab = fcc111("Pt", size=size, vacuum=5.0)
        slab.pbc = (True, True, False)
        slab.positions += rng.normal(0, 0.05, slab.positions.shape)
        out.append(slab)
    cubic = fcc111("Cu", size=(1, 1, 3), a=3.6, periodic=True)  # tiny cell: many images
    out.append(cubic)
    out.append(molecule("CH3CH2OH"))  # free space: no images
    lattice = fcc111("Cu", size=(2, 2, 3), vacuum=5.0, periodic=True)  # exact ties
    out.append(lattice)
    return out


@pytest.mark.parametrize("settings", [GraphSettings(6.0, 50), GraphSettings(4.0, 8)])
def test_on_the_fly_edges_equal_the_stored_graphs(settings):
    samples = [
        sample_from_atoms(a, cutoff=settings.cutoff, max_neighbors=settings.max_neighbors)
        for a in _structures()
    ]
    stored = collate(samples)
    frames = collate([{k: v for k, v in s.items() if k not in K.GRAPH_FIELDS} for s in samples])
    assert K.EDGE_INDEX not in frames
    built = OnTheFlyGraphs(settings)(frames)
    assert built[K.EDGE_INDEX].shape[1] > 0
    torch.testing.assert_close(built[K.EDGE_INDEX], stored[K.EDGE_INDEX], rtol=0, atol=0)
    torch.testing.assert_close(built[K.CELL_OFFSETS], stored[K.CELL_OFFSETS], rtol=0, atol=0)
    assert built[K.CELL_OFFSETS].dtype == torch.float32
    assert frames is not built and K.EDGE_INDEX not in frames  # a new dict


def test_on_the_fly_refuses_atoms_on_top_of_each_other_naming_the_structure():
    atoms = [a for a in _structures()[:2]]
    atoms[1].positions[1] = atoms[1].positions[0] + 0.01
    samples = [
        {k: v for k, v in sample_from_atoms(a, cutoff=3.0, max_neighbors=5).items()}
        for a in atoms[:1]
    ]
    frames = collate(
        [{k: v for k, v in s.items() if k not in K.GRAPH_FIELDS} for s in samples]
        + [
            {
                K.POS: atoms[1].positions.astype(np.float32),
                K.CELL: atoms[1].cell.array.astype(np.float32),
                K.PBC: atoms[1].pbc,
                K.ATOMIC_NUMBERS: atoms[1].numbers,
                K.TAGS: atoms[1].get_tags(),
                K.FIXED: np.zeros(len(atoms[1]), bool),
            }
        ]
    )
    with pytest.raises(NeighborListError, match=r"structure 1 of the batch: atoms 0 and 1 are"):
        OnTheFlyGraphs(GraphSettings(3.0, 5))(frames)
