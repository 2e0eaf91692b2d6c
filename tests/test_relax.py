"""ML relaxations: fixed atoms, convergence, batching, the CLI function, a trained model."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from ase.calculators.emt import EMT
from ase.io import Trajectory, read, write
from test_calculator import OC20_JSON, slab, write_tiny_checkpoint
from torch import Tensor, nn

from forcenet import relax
from forcenet.calculator import ForceNetCalculator
from forcenet.data import keys as K
from forcenet.data.frame import fixed_mask
from forcenet.data.graphs import GraphSettings
from forcenet.geometry import edge_vectors, gradient_forces, smooth_cosine_cutoff

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
    free = ~fixed_mask(start)
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
    free = ~fixed_mask(start)
    np.testing.assert_array_equal(final.positions[~free], start.positions[~free])
    assert np.abs(final.positions[free] - start.positions[free]).max() > 1e-3
    written = read(out / "relaxed.extxyz", index=":")
    assert len(written) == 3
    np.testing.assert_allclose(written[0].positions, final.positions, atol=1e-7)
    np.testing.assert_array_equal(~fixed_mask(written[0]), free)
    with pytest.raises(ValueError, match="cannot read"):
        relax.relax_command(ckpt, [tmp_path / "missing.xyz"], out)


def test_trained_tiny_model_relaxes_a_slab_and_keeps_fixed_atoms(tmp_path):
    """The whole path a user takes: train a tiny model with ``fit`` on EMT-labelled slabs,
    rebuild it from its checkpoint as an ASE calculator, relax a new slab with it."""
    from test_calculator import TINY
    from tiny import fit_split

    from forcenet.data.dataset import sample_from_atoms
    from forcenet.data.frame import Frame
    from forcenet.train import TrainConfig

    def labelled(seed: int) -> dict:
        atoms = slab()
        atoms.rattle(0.08, seed=seed)
        atoms.calc = EMT()
        frame = Frame(
            atomic_numbers=atoms.numbers.astype(np.int64),
            pos=atoms.positions,
            cell=atoms.cell.array,
            pbc=atoms.pbc,
            tags=atoms.get_tags().astype(np.int64),
            fixed=np.isin(np.arange(len(atoms)), atoms.constraints[0].index),
            forces=atoms.get_forces(apply_constraint=False),
            total_energy=atoms.get_potential_energy(),
            reference_energy=0.0,
            sid=seed,
            fid=0,
        )
        return sample_from_atoms(frame, cutoff=TINY["schnet"]["cutoff"], max_neighbors=24)

    data = [labelled(seed) for seed in range(12)]
    cfg = TrainConfig(
        lr=3e-3,
        warmup_steps=2,
        batch_size=4,
        max_epochs=3,
        dev_fraction=0.0,
        loss_atoms="free",
        energy_coef=1.0,
        rotation_augment=False,
        amp=False,
    )
    ckpt = fit_split(
        cfg,
        "schnet",
        TINY["schnet"],
        data,
        tmp_path / "model",
        graph=GraphSettings(cutoff=TINY["schnet"]["cutoff"], max_neighbors=24),
        train=len(data),
        dev=[],
    )
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


def test_a_nan_cell_is_refused_before_any_trajectory_is_written(tmp_path):
    """A NaN cell in the third structure is refused, naming file and structure, before
    anything is written (not even the output folder), by the command and by
    ``relax_structures`` alike."""
    ckpt = tmp_path / "gns.pt"
    write_tiny_checkpoint(ckpt, "gns", force_scale=0.5)
    images = [slab(), slab(2), slab()]
    images[2].cell[0, 0] = np.nan
    path = tmp_path / "slabs.extxyz"
    write(path, images)
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=r"slabs.extxyz: structure 2: cell contains NaN"):
        relax.relax_command(ckpt, [path], out, "lbfgs", 0.0, 2)
    assert not out.exists()
    calc = ForceNetCalculator.from_checkpoint(ckpt, device="cpu")
    with pytest.raises(ValueError, match=r"structure c: cell contains NaN"):
        relax.relax_structures(
            calc, images, optimizer="lbfgs", fmax=0.0, steps=2, traj_dir=out, names="abc"
        )
    assert not out.exists()
