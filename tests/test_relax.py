"""ML relaxations: ADwT, fixed atoms, convergence, batching, the CLI function, oracle evaluation."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from ase import Atoms
from ase.calculators.emt import EMT
from ase.calculators.singlepoint import SinglePointCalculator
from ase.io import Trajectory, read, write
from ase.optimize import BFGS
from test_calculator import OC20_JSON, one_thread, slab, write_tiny_checkpoint  # noqa: F401
from torch import Tensor, nn

from forcenet import relax
from forcenet.calculator import ForceNetCalculator
from forcenet.data import keys as K
from forcenet.geometry import edge_vectors, gradient_forces, smooth_cosine_cutoff

N_THRESHOLDS = 490  # 0.010, 0.011, ..., 0.499 Å

# --------------------------------------------------------------------------- ADwT


def _cell_and_positions(n: int = 6, seed: int = 0):
    cell = np.array([[5.0, 0.0, 0.0], [2.5, 4.33, 0.0], [0.0, 0.0, 20.0]])
    pos = np.random.default_rng(seed).uniform(0, 1, (n, 3)) @ cell
    free = np.array([True, True, True, False, True, False])[:n]
    return cell, pos, free


def test_adwt_identical_is_one():
    cell, pos, free = _cell_and_positions()
    assert relax.adwt(pos, pos.copy(), cell, [True, True, False], free) == 1.0


def test_adwt_lattice_vector_shift_is_minimum_image():
    cell, pos, free = _cell_and_positions()
    shifted = pos + cell[0] - 2 * cell[1]  # same periodic structure
    assert relax.mean_free_distance(shifted, pos, cell, [True, True, False], free) < 1e-9
    assert relax.adwt(shifted, pos, cell, [True, True, False], free) == 1.0
    # Along a non-periodic axis the same kind of shift is a real 20 Å displacement.
    lifted = pos + cell[2]
    assert relax.adwt(lifted, pos, cell, [True, True, False], free) == 0.0


def test_adwt_displacement_gives_fraction_of_thresholds_above_it():
    cell, pos, free = _cell_and_positions()
    step = np.array([0.6, -0.8, 0.0]) * 0.1005  # |step| = 0.1005 Å
    moved = pos + step
    moved[~free] += 3.0  # fixed atoms do not count
    assert relax.mean_free_distance(moved, pos, cell, [True, True, False], free) == (
        pytest.approx(0.1005)
    )
    # thresholds strictly above 0.1005: 0.101 .. 0.499 -> 399 of 490
    assert relax.adwt(moved, pos, cell, [True, True, False], free) == pytest.approx(399 / 490)
    # Across the cell boundary: a 0.1005 Å move that wrapped the atom to the other side.
    wrapped = moved.copy()
    wrapped[0] -= cell[0]
    assert relax.adwt(wrapped, pos, cell, [True, True, False], free) == pytest.approx(399 / 490)


def test_adwt_averages_distance_over_free_atoms_only():
    cell, pos, free = _cell_and_positions()
    moved = pos.copy()
    idx = np.flatnonzero(free)
    moved[idx[:2]] += [0.0, 0.201, 0.0]  # 2 of 4 free atoms -> mean 0.1005
    assert relax.adwt(moved, pos, cell, [True, True, False], free) == pytest.approx(399 / 490)
    with pytest.raises(ValueError, match="free atom"):
        relax.adwt(pos, pos, cell, [True] * 3, np.zeros(len(pos), bool))


# --------------------------------------------------------------------------- relaxations


class MorsePair(nn.Module):
    """Stand-in model obeying the forward contract: a smooth Morse pair potential
    (energy in eV, forces = -dE/dpos), so relaxations have a real minimum to find."""

    energy_from_gradient = True

    def __init__(
        self, depth: float = 0.35, width: float = 1.4, r0: float = 2.6, cutoff: float = 4.5
    ) -> None:
        super().__init__()
        self.depth, self.width, self.r0, self.cutoff = depth, width, r0, cutoff

    def forward(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        with torch.enable_grad():
            pos = batch[K.POS].detach().double().requires_grad_(True)  # [N, 3]
            vec = edge_vectors(
                pos,
                batch[K.CELL].double(),
                batch[K.BATCH],
                batch[K.EDGE_INDEX],
                batch[K.CELL_OFFSETS],
            )  # [E, 3]
            r = vec.norm(dim=-1)  # [E]
            morse = (1 - torch.exp(-self.width * (r - self.r0))) ** 2 - 1
            pair = 0.5 * self.depth * morse * smooth_cosine_cutoff(r, self.cutoff)  # [E]
            graph = batch[K.BATCH][batch[K.EDGE_INDEX][1]]  # [E]
            energy = torch.zeros(len(batch[K.NATOMS]), dtype=r.dtype).index_add(0, graph, pair)
            forces = gradient_forces(energy, pos, create_graph=False)
        return {K.OUT_ENERGY: energy.detach().float(), K.OUT_FORCES: forces.float()}


@pytest.fixture
def morse_calc() -> ForceNetCalculator:
    return ForceNetCalculator(model=MorsePair(), cutoff=4.5, max_neighbors=50, device="cpu")


@pytest.mark.parametrize("optimizer", ["lbfgs", "fire"])
def test_relaxation_converges_and_keeps_fixed_atoms(tmp_path, morse_calc, optimizer):
    start = slab()
    start.info["sid"] = 7
    table = relax.relax_structures(
        morse_calc, [start], optimizer=optimizer, fmax=0.05, steps=400, traj_dir=tmp_path
    )
    row = table.iloc[0]
    assert row["name"] == "7" and row["sid"] == 7 and row["converged"] and row["fmax"] < 0.05
    assert 0 < row["steps"] < 400 and row["n_free"] == 5 and row["wall_s"] > 0
    with Trajectory(row["trajectory"]) as traj:
        frames = list(traj)
    assert len(frames) == row["steps"] + 1
    first, last = frames[0], frames[-1]
    np.testing.assert_array_equal(first.positions, start.positions)
    free = relax.free_mask(start)
    np.testing.assert_array_equal(last.positions[~free], start.positions[~free])  # bit-exact
    assert np.linalg.norm(last.positions[free] - start.positions[free], axis=1).min() > 1e-3
    assert last.get_potential_energy() < first.get_potential_energy() - 0.05
    np.testing.assert_allclose(last.get_forces()[~free], 0.0)  # constraint stored with frames
    assert sorted(p.name for p in tmp_path.iterdir()) == ["7.traj"]  # no temporary left over
    if optimizer == "lbfgs":  # OCP's step cap: no atom moves more than 0.04 Å per step
        steps = np.diff(np.stack([f.positions for f in frames]), axis=0)
        assert np.linalg.norm(steps, axis=2).max() <= 0.04 + 1e-9


class ZeroForces(nn.Module):
    """Stand-in for an untrained model whose output layers start at zero (DimeNet++)."""

    def forward(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        return {K.OUT_FORCES: torch.zeros_like(batch[K.POS])}


def test_zero_forces_stop_at_once_instead_of_dividing_by_zero(tmp_path):
    calc = ForceNetCalculator(model=ZeroForces(), cutoff=4.5, max_neighbors=50, device="cpu")
    start = slab()
    table = relax.relax_structures(
        calc, [start], optimizer="lbfgs", fmax=0.0, steps=10, traj_dir=tmp_path
    )
    assert table["converged"][0] and table["steps"][0] == 0 and table["fmax"][0] == 0.0
    np.testing.assert_array_equal(
        relax.final_structure(table.trajectory[0]).positions, start.positions
    )


class ConstantForces(nn.Module):
    """Stand-in whose forces never change: LBFGS's curvature update divides by zero."""

    def forward(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        return {K.OUT_FORCES: torch.ones_like(batch[K.POS])}


def test_degenerate_optimizer_step_is_a_clear_error_not_nan(tmp_path):
    calc = ForceNetCalculator(model=ConstantForces(), cutoff=4.5, max_neighbors=50, device="cpu")
    with pytest.warns(RuntimeWarning), pytest.raises(FloatingPointError, match="structure 0"):
        relax.relax_structures(
            calc, [slab()], optimizer="lbfgs", fmax=0.05, steps=5, traj_dir=tmp_path
        )
    assert list(tmp_path.iterdir()) == []  # no half-written trajectory left behind


def test_batched_relaxation_equals_one_at_a_time(tmp_path, morse_calc):
    structures = [slab(), slab(2, "CO", size=(3, 2)), slab(4)]
    kwargs = {"optimizer": "lbfgs", "fmax": 0.05, "steps": 25}
    alone = relax.relax_structures(morse_calc, structures, traj_dir=tmp_path / "a", **kwargs)
    batched = relax.relax_structures(
        morse_calc, structures, traj_dir=tmp_path / "b", batch_size=3, **kwargs
    )
    pd.testing.assert_series_equal(alone["steps"], batched["steps"])
    assert list(alone["name"]) == ["0", "1", "2"]
    for pa, pb in zip(alone.trajectory, batched.trajectory, strict=True):
        np.testing.assert_allclose(
            relax.final_structure(pa).positions, relax.final_structure(pb).positions, atol=1e-5
        )


def test_relax_command_with_a_checkpoint(tmp_path):
    ckpt = tmp_path / "gns.pt"
    write_tiny_checkpoint(ckpt, "gns", force_scale=0.5)
    other = tmp_path / "slab.extxyz"
    write(other, [slab(), slab(2)])
    out = tmp_path / "out"
    table = relax.relax_command(ckpt, [OC20_JSON, other], out, "lbfgs", 0.0, 4)
    assert list(table["name"]) == ["oc20-slab-co-alcuse-0", "slab-0", "slab-1"]
    assert (table["steps"] == 4).all() and not table["converged"].any()  # fmax 0: all steps
    assert (table["model"] == "gns").all()
    saved = pd.read_parquet(out / "summary.parquet")
    pd.testing.assert_frame_equal(saved, table)
    start = read(OC20_JSON)
    final = relax.final_structure(table.trajectory[0])
    free = relax.free_mask(start)
    np.testing.assert_array_equal(final.positions[~free], start.positions[~free])
    assert np.abs(final.positions[free] - start.positions[free]).max() > 1e-3
    written = read(out / "relaxed.extxyz", index=":")
    assert len(written) == 3
    np.testing.assert_allclose(written[0].positions, final.positions, atol=1e-7)
    np.testing.assert_array_equal(relax.free_mask(written[0]), free)
    with pytest.raises(ValueError, match="cannot read"):
        relax.relax_command(ckpt, [tmp_path / "missing.xyz"], out)


# --------------------------------------------------------------------------- oracle evaluation


def _emt_minimum(sid: int) -> Atoms:
    atoms = slab()
    atoms.calc = EMT()
    BFGS(atoms, logfile=None).run(fmax=0.02, steps=300)
    relaxed = atoms.copy()
    relaxed.info["sid"] = sid
    relaxed.calc = SinglePointCalculator(
        relaxed,
        energy=atoms.get_potential_energy(),
        forces=atoms.get_forces(apply_constraint=False),
    )
    return relaxed


def test_evaluate_relaxations_against_the_oracle(tmp_path):
    """Zero ML steps: the scores are those of the initial structures, known independently."""
    minimum = _emt_minimum(1)
    other = minimum.copy()
    other.info["sid"] = 2
    other.calc = SinglePointCalculator(other, **minimum.calc.results)
    rattled = minimum.copy()
    rattled.info["sid"] = 2
    free = relax.free_mask(rattled)
    rattled.positions[free] += np.random.default_rng(0).normal(0, 0.08, (free.sum(), 3))
    is2rs = tmp_path / "is2rs"
    is2rs.mkdir()
    clean_initial = minimum.copy()
    clean_initial.calc = None
    write(is2rs / "val_id_initial.extxyz", [clean_initial, rattled])
    write(is2rs / "val_id_relaxed.extxyz", [minimum, other])
    ckpt = tmp_path / "gns.pt"
    write_tiny_checkpoint(ckpt, "gns")
    out = tmp_path / "relax"
    agg = relax.evaluate_relaxations(ckpt, is2rs, ["val_id"], out_dir=out, fmax=0.05, steps=0)

    systems = pd.read_parquet(out / "relax_systems.parquet").set_index("sid")
    same, moved = systems.loc[1], systems.loc[2]
    assert same["distance"] < 1e-5 and same["adwt"] == 1.0
    assert same["fbt"] and same["oracle_fmax"] < 0.02 and abs(same["oracle_delta_e"]) < 1e-4
    expected = np.linalg.norm(rattled.positions - minimum.positions, axis=1)[free].mean()
    assert moved["distance"] == pytest.approx(expected, abs=1e-5)
    check = rattled.copy()
    check.calc = EMT()
    assert moved["oracle_fmax"] == pytest.approx(
        np.linalg.norm(check.get_forces(apply_constraint=False)[free], axis=1).max(), rel=1e-4
    )
    assert moved["oracle_delta_e"] > 0.01 and not moved["fbt"]
    row = agg.iloc[0]
    assert (row["model"], row["split"], row["relax_systems"]) == ("gns", "val_id", 2)
    assert row["adwt"] == pytest.approx((1.0 + moved["adwt"]) / 2)
    assert row["fbt_oracle"] == 0.5 and row["relax_mean_steps"] == 0
    long = pd.read_parquet(out / "relax_metrics.parquet")
    assert set(long.columns) >= {"model", "split", "metric", "value"}
    assert json.loads((out / "relax_metrics.json").read_text())["val_id"]["fbt_oracle"] == 0.5
    assert (out / "relax_oracle_energy.png").stat().st_size > 1000

    write(is2rs / "val_id_relaxed.extxyz", [other, minimum])  # records out of order
    with pytest.raises(ValueError, match="val_id_initial.extxyz.*record 0.*sid"):
        relax.evaluate_relaxations(ckpt, is2rs, ["val_id"], out_dir=out, steps=0)


def test_trained_tiny_model_relaxes_a_slab_and_keeps_fixed_atoms(tmp_path, one_thread):  # noqa: F811
    """The whole path a user takes: train a tiny model with ``fit`` on EMT-labelled slabs,
    rebuild it from its checkpoint as an ASE calculator, relax a new slab with it."""
    from test_calculator import TINY

    from forcenet.data.dataset import sample_from_atoms
    from forcenet.data.frame import Frame
    from forcenet.train import TrainConfig, fit_datasets

    def labelled(seed: int) -> dict:
        atoms = slab()
        atoms.rattle(0.08, seed=seed)
        atoms.calc = EMT()
        frame = Frame(
            atomic_numbers=atoms.numbers.astype(np.int64), pos=atoms.positions,
            cell=atoms.cell.array, pbc=atoms.pbc, tags=atoms.get_tags().astype(np.int64),
            fixed=np.isin(np.arange(len(atoms)), atoms.constraints[0].index),
            forces=atoms.get_forces(apply_constraint=False),
            total_energy=atoms.get_potential_energy(), reference_energy=0.0, sid=seed, fid=0,
        )  # fmt: skip
        return sample_from_atoms(frame, cutoff=TINY["schnet"]["cutoff"], max_neighbors=24)

    data = [labelled(seed) for seed in range(12)]
    cfg = TrainConfig(lr=3e-3, warmup_steps=2, batch_size=4, max_epochs=3, dev_fraction=0.0,
                      loss_atoms="free", energy_coef=1.0, rotation_augment=False, amp=False)  # fmt: skip
    ckpt = fit_datasets(
        cfg, "schnet", TINY["schnet"], train_set=data, dev_set=[], out_dir=tmp_path / "model",
        graph={"cutoff": TINY["schnet"]["cutoff"], "max_neighbors": 24},
    )  # fmt: skip
    calc = ForceNetCalculator.from_checkpoint(ckpt, device="cpu")
    atoms = slab()
    atoms.rattle(0.1, seed=99)
    start = atoms.positions.copy()
    fixed = atoms.constraints[0].index
    table = relax.relax_structures(
        calc, [atoms], optimizer="lbfgs", fmax=0.05, steps=15, traj_dir=tmp_path / "traj"
    )
    assert table["steps"].iloc[0] > 0
    final = read(tmp_path / "traj" / f"{table['name'].iloc[0]}.traj", index=-1)
    assert np.array_equal(final.positions[fixed], start[fixed])  # not a single bit moved
    free = np.setdiff1d(np.arange(len(atoms)), fixed)
    assert np.abs(final.positions[free] - start[free]).max() > 1e-4
