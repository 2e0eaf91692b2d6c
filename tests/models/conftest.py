"""Shared tiny fixtures for the model tests: small slabs, a 2-atom bulk cell whose atoms see
their own periodic images, a free molecule pair, tiny model sizes.

Structures are built with ASE, labelled with ASE's EMT calculator (so the overfit test has
physical targets), turned into records with ``Frame.to_record()`` + ``neighbor_list`` and
batched with ``collate`` -- the same path the real data takes.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import numpy as np
import pytest
import torch
from ase import Atoms
from ase.build import add_adsorbate, bulk, fcc111, molecule
from ase.calculators.emt import EMT
from tiny import CUTOFF, MAX_NEIGHBORS, TINY_KWARGS  # noqa: F401 (re-exported to the model tests)
from torch import Tensor, nn

from forcenet.data import keys as K
from forcenet.data.batch import Batch, collate
from forcenet.data.frame import Frame
from forcenet.data.neighbors import neighbor_list
from forcenet.models import MODELS, build_model

#: Models under test: every registered model (each must have tiny kwargs above).
MODEL_NAMES = sorted(MODELS)
ENERGY_MODELS = [n for n in MODEL_NAMES if MODELS[n].energy_from_gradient]
FORCE_MODELS = [n for n in MODEL_NAMES if not MODELS[n].energy_from_gradient]


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype) -> Iterator[None]:
    """Set torch's default float dtype inside the block and restore it afterwards."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


@pytest.fixture
def float64() -> Iterator[torch.dtype]:
    """Run a test with float64 as the default dtype (restored after the test)."""
    with default_dtype(torch.float64):
        yield torch.float64


def build_tiny(name: str, *, seed: int = 0, dtype: torch.dtype = torch.float32) -> nn.Module:
    """The tiny model ``name``, initialised in float32 from ``seed``, cast to ``dtype``, eval().

    Weight matrices that the reference initialisation sets to zero (DimeNet++'s output
    layers) are redrawn from N(0, 1/fan_in): with them the model is identically zero and
    every symmetry test would pass vacuously.
    """
    with default_dtype(torch.float32):
        torch.manual_seed(seed)
        model = build_model(name, TINY_KWARGS[name])
        with torch.no_grad():
            for param in model.parameters():
                if param.dim() == 2 and param.requires_grad and not param.any():
                    param.normal_(0.0, param.shape[1] ** -0.5)
    return model.to(dtype).eval()


def _slab_tags(n_slab: int, z: np.ndarray) -> np.ndarray:
    """OC20 tags: 1 for the top slab layer, 0 below it, 2 for the adsorbate (appended last)."""
    tags = np.full(len(z), 2, dtype=np.int64)
    top = z[:n_slab].max()
    tags[:n_slab] = np.where(z[:n_slab] > top - 0.5, 1, 0)
    return tags


def record_from_atoms(atoms: Atoms, *, tags: np.ndarray, sid: int) -> dict[str, np.ndarray]:
    """Frame record (EMT labels) merged with its graph record."""
    calc_atoms = atoms.copy()
    calc_atoms.calc = EMT()
    forces = calc_atoms.get_forces(apply_constraint=False)
    frame = Frame(
        atomic_numbers=atoms.numbers.astype(np.int64),
        pos=atoms.positions.copy(),
        cell=np.asarray(atoms.cell[:], dtype=np.float64),
        pbc=atoms.pbc.copy(),
        tags=tags,
        fixed=tags == 0,
        forces=forces,
        total_energy=float(calc_atoms.get_potential_energy()),
        reference_energy=0.0,
        sid=sid,
        fid=0,
    )
    frame.validate(f"fixture sid={sid}")
    edge_index, cell_offsets = neighbor_list(
        frame.pos, frame.cell, frame.pbc, CUTOFF, MAX_NEIGHBORS
    )
    return {**frame.to_record(), K.EDGE_INDEX: edge_index, K.CELL_OFFSETS: cell_offsets}


#: Bond lengths (Å) of the small adsorbates, binding atom first.
_BONDS = {"CO": 1.15, "OH": 0.97, "NO": 1.17}


def _upright(adsorbate: str) -> Atoms:
    """A single atom, or a diatomic standing on its first atom (binding atom down)."""
    if adsorbate not in _BONDS:
        return Atoms(adsorbate, positions=[[0.0, 0.0, 0.0]])
    return Atoms(adsorbate, positions=[[0.0, 0.0, 0.0], [0.0, 0.0, _BONDS[adsorbate]]])


def make_slab(
    metal: str, adsorbate: str, *, layers: int, seed: int, pbc_z: bool
) -> dict[str, np.ndarray]:
    """A rattled 2x2 fcc(111) slab with an adsorbate on the fcc hollow site."""
    slab = fcc111(metal, size=(2, 2, layers), vacuum=6.0)
    n_slab = len(slab)
    add_adsorbate(slab, _upright(adsorbate), 1.6, "fcc")
    slab.pbc = [True, True, pbc_z]
    slab.rattle(stdev=0.05, seed=seed)
    return record_from_atoms(slab, tags=_slab_tags(n_slab, slab.positions[:, 2]), sid=seed)


def tiny_slabs() -> list[dict[str, np.ndarray]]:
    """Five small slab records (9-13 atoms): Cu/Pt/Ni/Pd/Ag with O, CO, H, NO, N; 3 or 2
    layers; small 2x2 cells, so atoms see their own periodic images within the cutoff."""
    return [
        make_slab("Cu", "O", layers=3, seed=1, pbc_z=True),
        make_slab("Pt", "CO", layers=2, seed=2, pbc_z=False),
        make_slab("Ni", "H", layers=3, seed=3, pbc_z=True),
        make_slab("Pd", "NO", layers=2, seed=4, pbc_z=True),
        make_slab("Ag", "N", layers=2, seed=5, pbc_z=True),
    ]


@pytest.fixture(scope="session")
def slabs() -> list[dict[str, np.ndarray]]:
    return tiny_slabs()


def bulk_pair(seed: int = 6) -> dict[str, np.ndarray]:
    """A rattled 2-atom rocksalt NiO cell (skewed, periodic in x, y and z): at the tiny
    cutoff each atom sees its own periodic images and several images of the other atom."""
    atoms = bulk("NiO", "rocksalt", a=4.2)
    atoms.rattle(stdev=0.1, seed=seed)
    return record_from_atoms(atoms, tags=np.ones(len(atoms), dtype=np.int64), sid=200 + seed)


@pytest.fixture(scope="session")
def pair() -> dict[str, np.ndarray]:
    """The self-image bulk pair (:func:`bulk_pair`), for the contract tests."""
    return bulk_pair()


def molecule_pair(offset: float) -> dict[str, np.ndarray]:
    """CH3OH and H2O in a 30 Å periodic box, H2O shifted by ``offset`` Å along x.

    Periodic box so the locality test also covers periodic-image edges: it is large enough
    that no atom sees an image of anything within the cutoff.
    """
    a = molecule("CH3OH")
    b = molecule("H2O")
    b.positions += a.positions.mean(0) - b.positions.mean(0) + np.array([offset, 0.0, 0.0])
    both = a + b
    both.cell = np.eye(3) * 30.0
    both.pbc = True
    both.positions += 15.0 - both.positions.mean(0)
    return record_from_atoms(both, tags=np.full(len(both), 2, dtype=np.int64), sid=100)


def to_dtype(batch: Batch, dtype: torch.dtype) -> Batch:
    """A new batch with every floating tensor cast to ``dtype``."""
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in batch.items()}


def make_batch(samples: Sequence[dict], dtype: torch.dtype = torch.float32) -> Batch:
    return to_dtype(collate(samples), dtype)


def exact_batch(structures: Sequence, dtype: torch.dtype = torch.float64) -> Batch:
    """Batch ASE structures through the real record path, with exact float64 positions and
    cells (records store float32, which would blur symmetry comparisons at 1e-7)."""
    records = [
        record_from_atoms(a, tags=np.ones(len(a), dtype=np.int64), sid=n)
        for n, a in enumerate(structures)
    ]
    batch = make_batch(records, dtype)
    pos = np.concatenate([a.positions for a in structures])
    cell = np.stack([a.cell[:] for a in structures])
    return dict(
        batch, pos=torch.as_tensor(pos, dtype=dtype), cell=torch.as_tensor(cell, dtype=dtype)
    )


def predict(model: nn.Module, batch: Batch) -> dict[str, Tensor]:
    """Model outputs, detached (forces of energy models still use autograd inside)."""
    return {k: v.detach() for k, v in model(batch).items()}


GOLDEN_SEED = 0


def golden_outputs(name: str, samples: Sequence[dict]) -> dict:
    """Reproducible numbers of the tiny model ``name`` (seed 0) on ``samples``, in float64.

    Stored in ``tests/models/golden.json`` by ``tests/models/make_golden.py`` and compared by
    ``test_golden_outputs``: a few force components, the sum of |F| and the energies.
    """
    model = build_tiny(name, seed=GOLDEN_SEED, dtype=torch.float64)
    with default_dtype(torch.float64):
        out = predict(model, make_batch(samples, torch.float64))
    forces = out[K.OUT_FORCES]
    result = {
        "seed": GOLDEN_SEED,
        "kwargs": TINY_KWARGS[name],
        "forces_first_atoms": forces[:2].flatten().tolist(),
        "forces_last_atom": forces[-1].tolist(),
        "forces_abs_sum": float(forces.abs().sum()),
    }
    if K.OUT_ENERGY in out:
        result["energy"] = out[K.OUT_ENERGY].tolist()
    return result
