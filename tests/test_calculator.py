"""ForceNetCalculator: built from a checkpoint alone, same numbers as the model, batched path."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from ase import Atoms
from ase.build import add_adsorbate, fcc111, molecule
from ase.calculators.calculator import PropertyNotImplementedError
from ase.constraints import FixAtoms
from ase.io import read
from tiny import save_model_checkpoint, tiny_kwargs

from forcenet.calculator import ForceNetCalculator, ForcesOnlyError
from forcenet.checkpoint import build_scaled_model, load_model
from forcenet.data import keys as K
from forcenet.data.batch import collate
from forcenet.data.dataset import sample_from_atoms

OC20_JSON = Path(__file__).resolve().parent / "fixtures" / "oc20-slab-co-alcuse.json"
CUTOFF, MAX_NEIGHBORS = 4.5, 12  # 12 < the fcc coordination + images: truncation is exercised
TINY = {
    name: tiny_kwargs(name, cutoff=CUTOFF) for name in ("forcenet", "gns", "schnet", "dimenetpp")
}


def write_tiny_checkpoint(
    path: Path, name: str, *, seed: int = 0, force_scale: float = 1.0, **overrides
):
    """A tiny randomly initialised model saved as a real forcenet checkpoint.

    ``overrides`` change its constructor kwargs (e.g. ``energy_head=True`` for ForceNet).
    Weight matrices initialised to zero (DimeNet++'s output layers) are redrawn from
    N(0, 1/fan_in), so that every model predicts non-zero forces.
    """
    torch.manual_seed(seed)
    kwargs = {**TINY[name], **overrides}
    model = build_scaled_model(name, kwargs)
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() == 2 and not param.any():
                param.normal_(0.0, param.shape[1] ** -0.5)
    model.force_scale.fill_(force_scale)
    model.energy_scale.fill_(force_scale)  # gradient models need equal scales
    model.energy_shift.fill_(-1.5)
    save_model_checkpoint(path, name, model, kwargs, cutoff=CUTOFF, max_neighbors=MAX_NEIGHBORS)
    return model.eval()


def slab(n_layers: int = 3, adsorbate: str = "O", size=(2, 2)) -> Atoms:
    """A Cu(111) slab + adsorbate with OC20 tags (0 below, 1 top layer, 2 adsorbate), the
    sub-surface layers fixed, slightly rattled."""
    atoms = fcc111("Cu", size=(*size, n_layers), vacuum=6.0)
    layer = atoms.get_tags()  # ASE: 1 = top layer, counting down
    n_slab = len(atoms)
    add_adsorbate(atoms, molecule(adsorbate) if len(adsorbate) > 1 else adsorbate, 1.8, "fcc")
    tags = np.full(len(atoms), 2)
    tags[:n_slab] = np.where(layer == 1, 1, 0)
    atoms.set_tags(tags)
    atoms.set_constraint(FixAtoms(indices=np.flatnonzero(tags == 0)))
    atoms.rattle(0.05, seed=1)
    return atoms


@pytest.fixture
def gns_ckpt(tmp_path: Path) -> Path:
    path = tmp_path / "gns.pt"
    write_tiny_checkpoint(path, "gns", force_scale=0.3)
    return path


def test_forces_equal_model_forward_on_collated_sample(gns_ckpt: Path):
    calc = ForceNetCalculator.from_checkpoint(gns_ckpt, device="cpu")
    atoms = read(OC20_JSON)
    atoms.calc = calc
    forces = atoms.get_forces(apply_constraint=False)
    model, ckpt = load_model(gns_ckpt)
    assert ckpt["graph"] == {"cutoff": CUTOFF, "max_neighbors": MAX_NEIGHBORS}
    sample = sample_from_atoms(atoms, cutoff=CUTOFF, max_neighbors=MAX_NEIGHBORS)
    with torch.no_grad():
        expected = model(collate([sample]))[K.OUT_FORCES].double().numpy()
    np.testing.assert_allclose(forces, expected, rtol=0, atol=1e-6)
    assert np.abs(forces).max() > 1e-4  # a real, non-zero prediction
    # The graph is the training one: truncated to max_neighbors nearest per centre.
    counts = np.bincount(sample[K.EDGE_INDEX][1], minlength=len(atoms))
    assert counts.max() == MAX_NEIGHBORS


def test_constraints_tags_and_fixed_come_from_atoms(gns_ckpt: Path):
    calc = ForceNetCalculator.from_checkpoint(gns_ckpt, device="cpu")
    atoms = read(OC20_JSON)
    sample = calc.sample(atoms)
    np.testing.assert_array_equal(sample[K.TAGS], atoms.get_tags())
    fixed = np.zeros(len(atoms), bool)
    fixed[atoms.constraints[0].get_indices()] = True
    np.testing.assert_array_equal(sample[K.FIXED], fixed)
    atoms.calc = calc
    constrained = atoms.get_forces()  # ASE zeroes the fixed atoms' forces
    assert np.all(constrained[fixed] == 0) and np.abs(constrained[~fixed]).max() > 0


def test_checkpoint_round_trip_reproduces_the_saved_model(tmp_path: Path):
    path = tmp_path / "schnet.pt"
    original = write_tiny_checkpoint(path, "schnet", seed=3, force_scale=2.0)
    calc = ForceNetCalculator.from_checkpoint(path, device="cpu")
    atoms = slab()
    atoms.calc = calc
    batch = collate([sample_from_atoms(atoms, cutoff=CUTOFF, max_neighbors=MAX_NEIGHBORS)])
    out = original(batch)  # gradient model: forces need autograd
    np.testing.assert_allclose(
        atoms.get_forces(apply_constraint=False),
        out[K.OUT_FORCES].detach().double().numpy(),
        atol=1e-6,
    )
    # Energy model: referenced energy in eV, including the saved scale and shift.
    assert calc.has_energy
    assert atoms.get_potential_energy() == pytest.approx(float(out[K.OUT_ENERGY]), abs=1e-5)


def test_force_only_model_has_no_energy(gns_ckpt: Path):
    calc = ForceNetCalculator.from_checkpoint(gns_ckpt, device="cpu")
    assert calc.implemented_properties == ["forces"] and not calc.has_energy
    atoms = slab()
    atoms.calc = calc
    # The project's error, not ASE's generic one: it names the checkpoint and the opt-in.
    for force_consistent in (False, True):
        with pytest.raises(ForcesOnlyError, match="predicts forces only") as err:
            atoms.get_potential_energy(force_consistent=force_consistent)
        assert str(gns_ckpt) in str(err.value) and "energy='zero'" in str(err.value)
    assert issubclass(ForcesOnlyError, PropertyNotImplementedError)  # ASE's probes catch it
    assert atoms.get_forces().shape == (len(atoms), 3)


def test_zero_energy_stand_in_is_explicit_and_only_for_force_only_models(
    gns_ckpt: Path, tmp_path: Path
):
    calc = ForceNetCalculator.from_checkpoint(gns_ckpt, device="cpu", energy="zero")
    atoms = slab()
    atoms.calc = calc
    assert atoms.get_potential_energy() == 0.0 and not calc.has_energy
    default = ForceNetCalculator.from_checkpoint(gns_ckpt, device="cpu")
    forces = atoms.get_forces(apply_constraint=False)
    np.testing.assert_array_equal(forces, default.get_forces(atoms))  # untouched by the mode
    calc.set_results(atoms, {"forces": np.zeros((len(atoms), 3))})  # relax's batched path
    assert calc.results["energy"] == 0.0
    schnet = tmp_path / "schnet.pt"
    write_tiny_checkpoint(schnet, "schnet")
    with pytest.raises(ValueError, match="predicts an energy"):
        ForceNetCalculator.from_checkpoint(schnet, device="cpu", energy="zero")
    with pytest.raises(ValueError, match="energy must be one of"):
        ForceNetCalculator.from_checkpoint(gns_ckpt, device="cpu", energy="head")  # type: ignore[arg-type]


def test_predict_many_equals_one_by_one(gns_ckpt: Path):
    calc = ForceNetCalculator.from_checkpoint(gns_ckpt, device="cpu")
    structures = [slab(), read(OC20_JSON), slab(2, "CO", size=(3, 2)), slab(4)]
    batched = calc.predict_many(structures, batch_size=3)  # chunks of 3 and 1
    assert len(batched) == len(structures)
    for atoms, got in zip(structures, batched, strict=True):
        single = atoms.copy()
        single.calc = calc.clone()
        np.testing.assert_allclose(
            got["forces"], single.get_forces(apply_constraint=False), atol=1e-5
        )
        assert got["forces"].shape == (len(atoms), 3) and "energy" not in got


def test_results_are_cached_until_the_structure_changes(gns_ckpt: Path):
    calc = ForceNetCalculator.from_checkpoint(gns_ckpt, device="cpu")
    atoms = slab()
    atoms.calc = calc
    f0 = atoms.get_forces(apply_constraint=False)
    calc.set_results(atoms, {"forces": np.full_like(f0, 7.0)})  # cached: returned as is
    assert np.all(atoms.get_forces(apply_constraint=False) == 7.0)
    atoms.positions[-1] += [0.3, 0.0, 0.0]  # new state -> recomputed
    f1 = atoms.get_forces(apply_constraint=False)
    assert not np.any(f1 == 7.0) and not np.allclose(f1, f0)


@pytest.mark.parametrize("where", ["cell", "positions"])
def test_a_nan_cell_or_position_is_a_clear_error_not_a_crash(gns_ckpt: Path, where: str):
    """A NaN reaching the neighbor search killed the process with SIGFPE."""
    calc = ForceNetCalculator.from_checkpoint(gns_ckpt, device="cpu")
    atoms = slab()
    if where == "cell":
        atoms.cell[1, 1] = np.nan
    else:
        atoms.positions[2, 0] = np.inf
    atoms.calc = calc
    message = "cell contains NaN" if where == "cell" else r"positions contain NaN or inf \(atom 2\)"
    with pytest.raises(ValueError, match=rf"structure Cu12O: {message}"):
        atoms.get_forces()
