"""Ingestion of users' ASE-readable files into the raw OC20 layout, read back with iter_shard."""

from __future__ import annotations

from pathlib import Path

import ase.io
import numpy as np
import pytest
from ase import Atoms
from ase.calculators.singlepoint import SinglePointCalculator
from ase.constraints import FixAtoms, FixCartesian

from forcenet.data.ingest import IngestError, ingest_files
from forcenet.data.raw import count_frames, iter_split, list_shards

OC20_JSON = Path(__file__).resolve().parents[1] / "fixtures" / "oc20-slab-co-alcuse.json"


def water(rng: np.random.Generator, energy: float | None, forces: bool = True) -> Atoms:
    """A labelled H2O molecule: no cell, no pbc, no tags, no constraints."""
    atoms = Atoms("OH2", positions=[[0, 0, 0], [0.96, 0, 0], [-0.24, 0.93, 0]])
    atoms.positions += rng.normal(0, 0.05, (3, 3))
    results = {"energy": energy} if energy is not None else {}
    if forces:
        results["forces"] = rng.normal(0, 0.5, (3, 3))
    atoms.calc = SinglePointCalculator(atoms, **results)
    return atoms


def test_real_oc20_structure(tmp_path: Path) -> None:
    ref = ase.io.read(OC20_JSON)
    counts = ingest_files({"train": [OC20_JSON]}, tmp_path, reference_energy=-130.5)
    assert counts == {"train": 1}
    (frame,) = iter_split(tmp_path / "train")
    assert frame.natoms == 34
    assert frame.total_energy == -135.66393572
    assert frame.energy == pytest.approx(-135.66393572 + 130.5, abs=1e-9)
    assert frame.fixed.sum() == 24
    np.testing.assert_array_equal(np.flatnonzero(frame.fixed), ref.constraints[0].index)
    np.testing.assert_array_equal(frame.tags, ref.get_tags())  # given tags kept (incl. zeros)
    np.testing.assert_array_equal(frame.atomic_numbers, ref.numbers)
    np.testing.assert_allclose(frame.pos, ref.positions, atol=1e-9)
    np.testing.assert_allclose(frame.cell, ref.cell.array, atol=1e-12)
    np.testing.assert_allclose(frame.forces, ref.calc.results["forces"], atol=1e-9)
    assert frame.pbc.all() and (frame.sid, frame.fid) == (0, 0)


def test_molecules_and_trajectories_in_shards(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    mols = [water(rng, -14.0 - 0.1 * i) for i in range(5)]
    xyz = tmp_path / "water.extxyz"
    ase.io.write(xyz, mols, format="extxyz")
    slab = Atoms("Cu4", positions=rng.uniform(0, 3, (4, 3)), cell=np.diag([4.0, 4, 12]), pbc=True)
    slab.set_constraint(FixAtoms(indices=[0, 1]))
    slab.set_tags([0, 0, 1, 2])
    traj_frames = []
    for i in range(3):
        step = slab.copy()
        step.calc = SinglePointCalculator(step, energy=-20.0 - i, forces=rng.normal(size=(4, 3)))
        traj_frames.append(step)
    traj = tmp_path / "relax.traj"
    ase.io.write(traj, traj_frames)
    out = tmp_path / "raw"
    counts = ingest_files({"train": [xyz, traj], "val_id": [traj]}, out, shard_size=2)
    assert counts == {"train": 8, "val_id": 3}
    assert len(list_shards(out / "train")) == 4 and count_frames(out / "train") == 8

    frames = list(iter_split(out / "train"))
    assert [(f.sid, f.fid) for f in frames] == [(0, i) for i in range(5)] + [
        (1, i) for i in range(3)
    ]
    for frame, mol in zip(frames[:5], mols, strict=True):
        assert not frame.pbc.any() and not frame.cell.any()
        np.testing.assert_array_equal(frame.tags, [1, 1, 1])  # tags missing -> 1
        np.testing.assert_array_equal(frame.fixed, [False] * 3)  # no constraint -> free
        np.testing.assert_allclose(frame.pos, mol.positions, atol=1e-7)
        np.testing.assert_allclose(frame.forces, mol.calc.results["forces"], atol=1e-7)
        assert frame.total_energy == pytest.approx(mol.calc.results["energy"], abs=1e-9)
    for frame, step in zip(frames[5:], traj_frames, strict=True):
        np.testing.assert_array_equal(frame.fixed, [True, True, False, False])
        np.testing.assert_array_equal(frame.tags, [0, 0, 1, 2])
        # forces of fixed atoms are kept as computed (OC20: apply_constraint=False)
        np.testing.assert_allclose(frame.forces, step.calc.results["forces"], atol=1e-9)
    assert [f.sid for f in iter_split(out / "val_id")] == [2, 2, 2]


def test_info_sid_fid_and_fixcartesian(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    mol = water(rng, -3.0)
    mol.info.update(sid="random1331004", fid=144)
    mol.set_constraint(FixCartesian([0], mask=[True, True, True]))
    path = tmp_path / "one.traj"
    ase.io.write(path, mol)
    ingest_files({"train": [path]}, tmp_path / "raw")
    (frame,) = iter_split(tmp_path / "raw" / "train")
    assert (frame.sid, frame.fid) == (1331004, 144)
    np.testing.assert_array_equal(frame.fixed, [True, False, False])


@pytest.mark.parametrize(
    ("energy", "forces", "missing"),
    [(None, True, "energy"), (-1.0, False, "forces"), (None, False, "energy and forces")],
)
def test_missing_labels_name_file_and_index(
    tmp_path: Path, energy: float | None, forces: bool, missing: str
) -> None:
    rng = np.random.default_rng(2)
    path = tmp_path / "bad.extxyz"
    ase.io.write(path, [water(rng, -1.0), water(rng, -2.0), water(rng, energy, forces)])
    with pytest.raises(IngestError, match=rf"bad\.extxyz: structure 2: no {missing}"):
        ingest_files({"train": [path]}, tmp_path / "raw")


def test_failure_keeps_previous_output(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    good, bad = tmp_path / "good.extxyz", tmp_path / "bad.extxyz"
    ase.io.write(good, [water(rng, -1.0) for _ in range(3)])
    nan_mol = water(rng, -1.0)
    nan_mol.positions[1, 2] = np.nan
    ase.io.write(bad, [water(rng, -1.0), nan_mol])
    out = tmp_path / "raw"
    ingest_files({"train": [good]}, out, shard_size=1)
    with pytest.raises(IngestError, match=r"bad\.extxyz: structure 1: pos contains NaN"):
        ingest_files({"train": [good, bad]}, out, shard_size=1)
    assert sorted(p.name for p in out.iterdir()) == ["train"]  # no partial folder left
    assert count_frames(out / "train") == 3
    with pytest.raises(IngestError, match=r"missing\.xyz: ASE cannot read"):
        ingest_files({"train": [tmp_path / "missing.xyz"]}, out)


def test_atomic_number_above_100_names_file_and_structure(tmp_path: Path) -> None:
    """Z > 100 is refused at ingest, naming file, structure and atomic number; nothing is
    written."""
    rng = np.random.default_rng(3)
    heavy = water(rng, -3.0)
    heavy.numbers[0] = 101  # mendelevium: beyond the models' element tables
    path = tmp_path / "heavy.extxyz"
    ase.io.write(path, [water(rng, -1.0), heavy])
    with pytest.raises(IngestError, match=r"heavy\.extxyz: structure 1: atomic number .*\[101\]"):
        ingest_files({"train": [path]}, tmp_path / "raw")
    assert not (tmp_path / "raw" / "train").exists()


def test_atoms_at_one_position_name_file_structure_and_atoms(tmp_path: Path) -> None:
    """Two atoms at one position are refused at ingest, naming file, structure and both
    atoms."""
    rng = np.random.default_rng(4)
    dup = water(rng, -3.0)
    dup.positions[2] = dup.positions[0]
    path = tmp_path / "dup.extxyz"
    ase.io.write(path, [water(rng, -1.0), water(rng, -2.0), dup])
    with pytest.raises(
        IngestError, match=r"dup\.extxyz: structure 2: atoms 0 and 2 are 0 Å apart.*0\.1 Å"
    ):
        ingest_files({"train": [path]}, tmp_path / "raw")


def test_a_fifo_input_is_refused_not_read(tmp_path: Path) -> None:
    from tiny import fifo_fed_once

    with fifo_fed_once(tmp_path / "in.extxyz") as fifo:
        with pytest.raises(ValueError, match=rf"{fifo}: not a regular file"):
            ingest_files({"train": [fifo]}, tmp_path / "raw")
    assert not (tmp_path / "raw").exists() or not list((tmp_path / "raw").iterdir())
