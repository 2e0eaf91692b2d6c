"""The embedded EMT dataset generator: determinism, OC20 conventions, splits, labels."""

from __future__ import annotations

import csv
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from ase import Atoms
from ase.calculators.emt import EMT
from ase.data import covalent_radii
from ase.io import read

from forcenet.data import keys as K
from forcenet.data.raw import iter_split
from forcenet.emt.adsorbates import (
    ADSORBATES,
    ID_ADSORBATES,
    OOD_ADSORBATES,
    StructureCheck,
    adsorbate_atoms,
    adsorbate_reference,
    gas_references,
    place_adsorbate,
)
from forcenet.emt.generate import SPLIT_POOLS, generate_emt, plan_systems
from forcenet.emt.slabs import (
    ADSORBATE_ZONE,
    CATALYSTS,
    FACETS,
    ID_CATALYSTS,
    METALS,
    OOD_CATALYSTS,
    SITES,
    VACUUM,
    build_slab,
    catalyst_slab,
    emt_lattice_constant,
    lattice_constant,
    relax_clean_slab,
)
from forcenet.emt.system import SystemSettings, run_system

TINY = dict(
    seed=3,
    n_systems={"train": 2, "val_id": 1, "val_ood_ads": 1, "val_ood_cat": 1, "val_ood_both": 1},
    frames_per_system=3,
    md_frames_per_system=2,
    relax_steps=10,
    is2rs_systems=1,
    is2rs_fmax=0.1,
    shard_size=4,
)


def _run(root: Path, name: str, workers: int) -> tuple[Path, Path, dict]:
    out, is2rs = root / name, root / f"{name}_is2rs"
    report = generate_emt(out, workers=workers, is2rs_dir=is2rs, **TINY)
    return out, is2rs, report


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("emt")
    stale = root / "one" / "train"
    stale.mkdir(parents=True)
    (stale / "99.extxyz.xz").write_bytes(b"left over from an older run")
    return _run(root, "one", workers=1)


@pytest.fixture(scope="module")
def first_system():
    """The first train system of seed 3 with its relaxed clean slab (positions, energy)."""
    spec = plan_systems(3, {"train": 1})[0]
    return (spec, *relax_clean_slab(3, spec.catalyst, spec.facet))


def _systems(out: Path) -> list[dict]:
    with open(out / "systems.csv") as fh:
        return list(csv.DictReader(fh))


def _frames(out: Path) -> dict[str, list]:
    return {split: list(iter_split(out / split)) for split in K.SPLITS}


def test_same_seed_same_files_whatever_the_worker_count(dataset, tmp_path):
    out1, is2rs1, report1 = dataset
    out2, is2rs2, report2 = _run(tmp_path, "two", workers=2)
    files1 = sorted(p.relative_to(out1) for p in out1.rglob("*") if p.is_file())
    files2 = sorted(p.relative_to(out2) for p in out2.rglob("*") if p.is_file())
    assert files1 == files2 and len(files1) > 10
    for rel in files1:
        assert (out1 / rel).read_bytes() == (out2 / rel).read_bytes(), rel
    for name in sorted(p.name for p in is2rs1.iterdir()):
        assert (is2rs1 / name).read_bytes() == (is2rs2 / name).read_bytes(), name
    assert report1["splits"] == report2["splits"]
    # A different seed draws different systems.
    assert plan_systems(4, TINY["n_systems"]) != plan_systems(3, TINY["n_systems"])


def test_generator_progress_in_a_log_is_plain_lines(tmp_path, capsys):
    settings = {**TINY, "n_systems": {"train": 2}, "is2rs_systems": 0, "relax_steps": 2}
    generate_emt(tmp_path / "raw", workers=1, **settings)
    err = capsys.readouterr().err  # not a terminal, as in a log file
    assert "\r" not in err
    assert [line.split(",")[0] for line in err.splitlines() if line.startswith("emt")] == [
        "emt systems: 1/2 systems",
        "emt systems: 2/2 systems",
    ]


def test_output_replaced_atomically_and_report_consistent(dataset):
    out, _, report = dataset
    assert not (out / "train" / "99.extxyz.xz").exists()  # stale shard gone
    assert not list(out.parent.glob(".one.tmp-*"))
    frames = _frames(out)
    on_disk = json.loads((out / "report.json").read_text())
    assert on_disk["splits"] == report["splits"]
    for split, entry in report["splits"].items():
        assert entry["frames"] == len(frames[split]) > 0
        assert entry["systems"] == TINY["n_systems"][split]
    # Every shard but the last of a split is full.
    assert len(list((out / "train").glob("*.extxyz.xz"))) == -(-len(frames["train"]) // 4)
    assert report["frames_per_second"] > 0


def test_oc20_conventions(dataset):
    out, _, _ = dataset
    systems = {int(r["sid"]): r for r in _systems(out)}
    for split, frames in _frames(out).items():
        for f in frames:
            system = systems[f.sid]
            assert system["split"] == split
            assert np.array_equal(f.fixed, f.tags == K.TAG_SUBSURFACE)
            assert f.fixed.any() and (f.tags == K.TAG_SURFACE).any()
            n_ads = len(adsorbate_atoms(system["adsorbate"]))
            assert np.sum(f.tags == K.TAG_ADSORBATE) == n_ads
            assert np.array_equal(
                np.flatnonzero(f.tags == K.TAG_ADSORBATE), np.arange(f.natoms - n_ads, f.natoms)
            )
            assert f.pbc.all()
            assert np.allclose(f.cell[2, :2], 0) and np.allclose(f.cell[:2, 2], 0)
            assert f.cell[2, 2] - np.ptp(f.pos[:, 2]) >= VACUUM
            assert 20 <= f.natoms <= 40
            assert abs(f.energy) < 20.0  # adsorption-like energy, eV
            assert float(system["reference_energy"]) == f.reference_energy


def test_adsorbate_identity_and_split_partitions(dataset):
    out, _, _ = dataset
    for row in _systems(out):
        ads_pool, cat_pool = SPLIT_POOLS[row["split"]]
        assert row["adsorbate"] in ads_pool and row["catalyst"] in cat_pool
    for frames in _frames(out).values():
        for f in frames:
            row = next(r for r in _systems(out) if int(r["sid"]) == f.sid)
            ads_z = sorted(f.atomic_numbers[f.tags == K.TAG_ADSORBATE].tolist())
            assert ads_z == sorted(adsorbate_atoms(row["adsorbate"]).numbers.tolist())
            slab_metals = {int(z) for z in f.atomic_numbers[f.tags != K.TAG_ADSORBATE]}
            assert slab_metals == {Atoms(m).numbers[0] for m in CATALYSTS[row["catalyst"]]}
    # The partition itself, over many planned systems.
    plan = plan_systems(0, {s: 3000 if s == K.TRAIN else 300 for s in K.SPLITS})
    by_split = {s: {(p.adsorbate, p.catalyst) for p in plan if p.split == s} for s in K.SPLITS}
    train_ads = {a for a, _ in by_split["train"]}
    train_cat = {c for _, c in by_split["train"]}
    assert train_ads == set(ID_ADSORBATES) and train_cat == set(ID_CATALYSTS)
    assert not train_ads & set(OOD_ADSORBATES) and not train_cat & set(OOD_CATALYSTS)
    assert {a for a, _ in by_split["val_ood_ads"]} <= set(OOD_ADSORBATES)
    assert {c for _, c in by_split["val_ood_ads"]} <= train_cat
    assert {a for a, _ in by_split["val_ood_cat"]} <= train_ads
    assert {c for _, c in by_split["val_ood_cat"]} <= set(OOD_CATALYSTS)
    assert all(a in OOD_ADSORBATES and c in OOD_CATALYSTS for a, c in by_split["val_ood_both"])
    assert {a for a, _ in by_split["val_id"]} <= train_ads
    # Held-out sets are new species/compositions, yet every element is seen in training.
    in_domain_elements = {s for a in ID_ADSORBATES for s in adsorbate_atoms(a).symbols}
    assert in_domain_elements == {"H", "C", "N", "O"}
    assert {m for c in ID_CATALYSTS for m in CATALYSTS[c]} == set(METALS)
    assert len(ADSORBATES) >= 12 and len(set(p.sid for p in plan)) == len(plan)


def test_labels_are_emt_forces_and_energies(dataset):
    out, _, _ = dataset
    frames = [f for fs in _frames(out).values() for f in fs][::3]
    assert frames
    for f in frames:
        atoms = Atoms(numbers=f.atomic_numbers, positions=f.pos, cell=f.cell, pbc=f.pbc)
        atoms.calc = EMT()
        np.testing.assert_allclose(f.forces, atoms.get_forces(), atol=2e-6)
        assert f.total_energy == pytest.approx(atoms.get_potential_energy(), abs=1e-6)
        assert np.abs(f.forces[f.fixed]).max() > 0  # raw forces: fixed atoms keep theirs


def test_reference_energy_is_clean_slab_plus_gas_references(first_system):
    refs = gas_references()
    # OC20 scheme: the C and O references add up to the CO molecule, H2O = 2 H + O.
    assert refs["C"] + refs["O"] == pytest.approx(adsorbate_reference(["C", "O"]))
    settings = SystemSettings(
        seed=3,
        frames_per_system=2,
        md_frames_per_system=1,
        relax_steps=3,
        md_temperature_K=300.0,
        max_force=100.0,
        is2rs_fmax=0.05,
    )
    spec, pos, e_slab = first_system
    result = run_system(spec, pos, e_slab, settings)
    symbols = adsorbate_atoms(spec.adsorbate).get_chemical_symbols()
    assert result.reference_energy == pytest.approx(e_slab + adsorbate_reference(symbols))
    slab = catalyst_slab(3, spec.catalyst, spec.facet)
    slab.positions = pos
    slab.calc = EMT()
    assert np.abs(slab.get_forces()).max() < 0.05 + 1e-9  # relaxed (free atoms)
    assert [f.fid for f in result.frames] == sorted({f.fid for f in result.frames})


def test_rejected_frames_are_counted(first_system):
    spec, pos, e_slab = first_system
    strict = SystemSettings(
        seed=3,
        frames_per_system=4,
        md_frames_per_system=2,
        relax_steps=6,
        md_temperature_K=300.0,
        max_force=1e-3,
        is2rs_fmax=0.05,
    )
    result = run_system(spec, pos, e_slab, strict)
    assert result.frames == []
    sampled = min(4, result.relax_length) + 2
    assert result.rejected == Counter({"max_force": sampled})


def test_structure_check_reasons():
    slab = build_slab("Cu", "111", np.random.default_rng(0))
    atoms = place_adsorbate(slab, "*OH", "fcc", np.random.default_rng(0))
    check = StructureCheck(atoms, ADSORBATE_ZONE)
    pos = atoms.positions.copy()
    assert check(pos) is None
    up = pos.copy()
    up[-2:, 2] += 3.5
    assert check(up) == "desorbed"
    stretched = pos.copy()
    stretched[-1] += (stretched[-1] - stretched[-2]) * 1.0  # O-H bond doubled
    assert check(stretched) == "dissociated"
    moved = pos.copy()
    moved[0, 0] += 1.5
    assert check(moved) == "slab_displaced"


@pytest.mark.parametrize(("name", "site"), [("*O", "fcc"), ("*O", "ontop"), ("*CO", "bridge")])
def test_placement_binding_atom_touches_its_site(name, site):
    slab = build_slab("Pt", "111", np.random.default_rng(0))
    atoms = place_adsorbate(slab, name, site, np.random.default_rng(1))
    n = len(slab)
    d = atoms.get_distances(n, list(range(n)), mic=True)
    bond = covalent_radii[atoms.numbers[n]] + covalent_radii[78]
    assert d.min() == pytest.approx(bond, rel=1e-6)
    expected_neighbours = {"ontop": 1, "bridge": 2, "fcc": 3}[site]
    assert np.sum(d < bond * 1.01) == expected_neighbours
    assert np.all(atoms.positions[n:, 2] > slab.positions[:, 2].max())


def test_slabs_tags_lattice_and_alloy_composition():
    for facet, ((nx, ny, layers), n_free) in FACETS.items():
        slab = build_slab("Cu3Au", facet, np.random.default_rng(0))
        assert set(slab.info["adsorbate_info"]["sites"]) == set(SITES[facet])
        assert len(slab) == nx * ny * layers
        n_au = round(0.25 * len(slab))
        assert Counter(slab.get_chemical_symbols()) == {"Cu": len(slab) - n_au, "Au": n_au}
        z_free = slab.positions[slab.get_tags() == K.TAG_SURFACE, 2]
        assert len(np.unique(z_free.round(3))) == n_free
        assert z_free.min() > slab.positions[slab.get_tags() == K.TAG_SUBSURFACE, 2].max()
        fixed = slab.constraints[0].get_indices()
        assert np.array_equal(np.sort(fixed), np.flatnonzero(slab.get_tags() == 0))
    # EMT equilibrium: the bulk energy is minimal at the chosen lattice constant.
    a = emt_lattice_constant("Cu")
    from ase.build import bulk

    def e(x):
        b = bulk("Cu", "fcc", a=x)
        b.calc = EMT()
        return b.get_potential_energy()

    assert e(a) < e(a - 0.01) and e(a) < e(a + 0.01)
    assert lattice_constant("CuAu") == pytest.approx(
        0.5 * (emt_lattice_constant("Cu") + emt_lattice_constant("Au"))
    )


def test_is2rs_files(dataset):
    out, is2rs, report = dataset
    first = {f.sid: f for fs in _frames(out).values() for f in fs if f.fid == 0}
    assert sum(report["splits"][s]["is2rs"] for s in K.VAL_SPLITS) > 0
    for split in K.VAL_SPLITS:
        kept = report["splits"][split]["is2rs"]
        assert kept <= TINY["is2rs_systems"]
        if kept == 0:  # every candidate dissociated/desorbed: an empty file
            assert (is2rs / f"{split}_initial.extxyz").stat().st_size == 0
            continue
        initial = read(is2rs / f"{split}_initial.extxyz", index=":")
        relaxed = read(is2rs / f"{split}_relaxed.extxyz", index=":")
        assert len(initial) == len(relaxed) == kept
        for a, b in zip(initial, relaxed, strict=True):
            assert a.info["sid"] == b.info["sid"]
            assert a.get_tags().tolist() == b.get_tags().tolist()
            fixed = a.constraints[0].get_indices()
            assert np.array_equal(np.sort(fixed), np.flatnonzero(a.get_tags() == 0))
            free = b.get_tags() != 0
            assert np.linalg.norm(b.get_forces(apply_constraint=False)[free], axis=1).max() < 0.1
            if a.info["sid"] in first:  # the starting placement is the first S2EF frame
                np.testing.assert_allclose(a.positions, first[a.info["sid"]].pos, atol=1e-7)


def test_bad_arguments_are_refused(tmp_path):
    with pytest.raises(ValueError, match="unknown split"):
        generate_emt(tmp_path / "x", seed=0, n_systems={"test": 1}, workers=1)
    with pytest.raises(ValueError, match="workers"):
        generate_emt(tmp_path / "x", seed=0, n_systems={"train": 1}, workers=0)
