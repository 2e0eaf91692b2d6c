"""Hybrid relaxations: an ML pre-relaxation finished by the oracle (EMT), against oracle-only."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from ase import Atoms
from ase.calculators.emt import EMT
from ase.calculators.singlepoint import SinglePointCalculator
from ase.io import Trajectory, write
from ase.optimize import BFGS
from test_calculator import slab, write_tiny_checkpoint
from test_relax import MorsePair, ZeroForces
from torch import Tensor, nn
from typer.testing import CliRunner

from forcenet import oracle, relax
from forcenet.calculator import ForceNetCalculator
from forcenet.cli import app
from forcenet.data import keys as K
from forcenet.data.frame import fixed_mask


class OracleAsModel(nn.Module):
    """A perfect stand-in model: EMT itself behind the forward contract."""

    def forward(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        forces, energies = [], []
        for g, (pos, numbers) in enumerate(
            zip(
                batch[K.POS].split(batch[K.NATOMS].tolist()),
                batch[K.ATOMIC_NUMBERS].split(batch[K.NATOMS].tolist()),
                strict=True,
            )
        ):
            atoms = Atoms(
                numbers=numbers.numpy(),
                positions=pos.double().numpy(),
                cell=batch[K.CELL][g].double().numpy(),
                pbc=batch[K.PBC][g].numpy(),
            )
            atoms.calc = EMT()
            forces.append(torch.from_numpy(atoms.get_forces()))
            energies.append(atoms.get_potential_energy())
        return {
            K.OUT_FORCES: torch.cat(forces).float(),
            K.OUT_ENERGY: torch.tensor(energies, dtype=torch.float32),
        }


def _calc(model: nn.Module) -> ForceNetCalculator:
    return ForceNetCalculator(model=model, cutoff=4.5, max_neighbors=50, device="cpu")


def _start(adsorbate: str = "O", seed: int = 3) -> Atoms:
    """Cu(111) 2x2, two layers (the bottom one fixed) + adsorbate, rattled off its minimum."""
    atoms = slab(2, adsorbate)
    free = ~fixed_mask(atoms)
    atoms.positions[free] += np.random.default_rng(seed).normal(0, 0.1, (free.sum(), 3))
    return atoms


def _hybrid(tmp_path: Path, model: nn.Module, start: Atoms, ml_steps: int = 200) -> pd.Series:
    table = relax.relax_structures(
        _calc(model), [start], optimizer="lbfgs", fmax=0.05, steps=ml_steps, traj_dir=tmp_path
    )
    rows = oracle.hybrid_systems(table, [start], fmax=0.05, steps=300, traj_dir=tmp_path)
    return pd.concat([table.iloc[0], rows.iloc[0]])


def _frames(path: str) -> list[Atoms]:
    with Trajectory(path) as traj:
        return list(traj)


def test_hybrid_finishes_at_the_oracle_minimum(tmp_path):
    """A Morse stand-in pre-relaxes to its own (wrong) minimum; the oracle finish lands on
    EMT's minimum, found independently with BFGS to 0.01 eV/Å."""
    start = _start()
    row = _hybrid(tmp_path, MorsePair(), start, ml_steps=40)
    reference = start.copy()
    reference.calc = EMT()
    BFGS(reference, logfile=None).run(fmax=0.01, steps=500)

    assert row["oracle_only_converged"] and row["hybrid_converged"]
    assert row["hybrid_fmax"] < 0.05 and row["oracle_only_fmax"] < 0.05
    hybrid, alone = _frames(row["hybrid_trajectory"]), _frames(row["oracle_only_trajectory"])
    assert len(hybrid) == row["hybrid_oracle_steps"] + 1  # every evaluated state
    assert len(alone) == row["oracle_only_steps"] + 1
    ml_final = relax.final_structure(row["trajectory"])
    np.testing.assert_array_equal(hybrid[0].positions, ml_final.positions)  # starts at ML result
    np.testing.assert_array_equal(alone[0].positions, start.positions)  # starts at the initial
    assert np.abs(ml_final.positions - start.positions).max() > 0.05  # the model did move it
    free = ~fixed_mask(start)
    np.testing.assert_array_equal(hybrid[-1].positions[~free], start.positions[~free])  # bit-exact

    e_min = reference.get_potential_energy()
    assert abs(row["hybrid_energy"] - e_min) < 0.02
    assert abs(row["oracle_only_energy"] - e_min) < 0.02
    assert row["hybrid_energy"] == pytest.approx(hybrid[-1].get_potential_energy())
    distance = np.linalg.norm(hybrid[-1].positions - reference.positions, axis=1)[free]
    assert distance.max() < 0.1
    assert row["hybrid_same_minimum"] and abs(row["hybrid_delta_e"]) < 0.02
    assert row["hybrid_distance"] < 0.05 and row["hybrid_adwt"] > 0.9
    expected = 100 * (1 - row["hybrid_oracle_steps"] / row["oracle_only_steps"])
    assert row["hybrid_steps_saved_pct"] == pytest.approx(expected)


def test_steps_saved_by_a_perfect_and_by_a_useless_model(tmp_path):
    """The oracle as the model leaves the oracle nothing to do (~100 % saved); a model of
    zero forces does not move the structure, so the finish is the oracle-only run (0 %)."""
    start = _start("CO", seed=5)
    perfect = _hybrid(tmp_path / "perfect", OracleAsModel(), start)
    useless = _hybrid(tmp_path / "useless", ZeroForces(), start)

    assert perfect["converged"] and perfect["steps"] > 10  # the model itself did the work
    assert perfect["oracle_only_steps"] == useless["oracle_only_steps"] > 10  # same start
    assert perfect["hybrid_oracle_steps"] <= 1 and perfect["hybrid_steps_saved_pct"] > 95
    assert perfect["hybrid_same_minimum"] and perfect["hybrid_adwt"] > 0.9

    assert useless["steps"] == 0  # zero forces: converged at once
    assert useless["hybrid_oracle_steps"] == useless["oracle_only_steps"]
    assert useless["hybrid_steps_saved_pct"] == 0.0
    assert useless["hybrid_distance"] == 0.0 and useless["hybrid_delta_e"] == 0.0


def test_a_different_minimum_is_flagged_even_when_steps_are_saved(tmp_path):
    """Morse pushes CO away from EMT's minimum basin: the oracle finish converges in fewer
    steps than oracle-only, but to a higher minimum, which the scores must not hide."""
    row = _hybrid(tmp_path, MorsePair(), _start("CO", seed=5), ml_steps=40)
    assert row["hybrid_converged"] and row["oracle_only_converged"]
    assert row["hybrid_steps_saved_pct"] > 20
    assert row["hybrid_delta_e"] > 0.05 and not row["hybrid_same_minimum"]
    assert row["hybrid_distance"] > 0.1 and row["hybrid_adwt"] < 0.8


def test_hybrid_scores_without_oracle_steps_are_nan():
    atoms = _start()
    run = oracle.OracleRelaxation(
        atoms=atoms, steps=0, converged=True, fmax=0.01, energy=1.0, trajectory=Path("x")
    )
    scores = oracle.hybrid_scores(atoms, run, run)
    assert np.isnan(scores["hybrid_steps_saved_pct"]) and scores["hybrid_same_minimum"]
    with pytest.raises(ValueError, match="fmax > 0"):
        oracle.hybrid_systems(pd.DataFrame(), [], fmax=0.0, traj_dir=Path("x"))


def test_aggregate_has_hybrid_metrics_per_split_and_overall():
    base = {
        "model": "gns",
        "adwt": 0.5,
        "distance": 0.1,
        "fbt": True,
        "oracle_delta_e": 0.0,
        "converged": True,
        "steps": 3,
        "ml_steps_limit": 200,
        "hybrid_same_minimum": True,
        "hybrid_adwt": 1.0,
        "hybrid_distance": 0.0,
        "hybrid_delta_e": 0.0,
        "hybrid_converged": True,
        "oracle_only_converged": True,
        "oracle_steps_limit": 300,
    }
    cases = [
        ("val_id", 1, 10, 2),
        ("val_id", 2, 30, 30),
        ("val_id", 3, 0, 0),
        ("val_ood_ads", 4, 20, 5),
    ]
    systems = pd.DataFrame(
        [
            {
                **base,
                "split": split,
                "sid": sid,
                "oracle_only_steps": alone,
                "hybrid_oracle_steps": finish,
                "hybrid_steps_saved_pct": 100 * (1 - finish / alone) if alone else np.nan,
            }
            for split, sid, alone, finish in cases
        ]
    )
    systems.loc[1, ["hybrid_same_minimum", "hybrid_adwt"]] = [False, 0.0]
    agg = oracle.aggregate_relaxations(systems).set_index("split")
    assert list(agg.index) == ["val_id", "val_ood_ads", oracle.OVERALL_SPLIT]
    val = agg.loc["val_id"]
    assert val["relax_systems"] == 3 and val["hybrid_steps_saved_pct"] == pytest.approx(40.0)
    assert val["hybrid_steps_saved_total_pct"] == pytest.approx(100 * (1 - 32 / 40))
    assert val["hybrid_same_minimum"] == pytest.approx(2 / 3)
    overall = agg.loc[oracle.OVERALL_SPLIT]
    assert overall["relax_systems"] == 4 and overall["hybrid_steps_saved_pct_median"] == 75.0
    assert overall["hybrid_steps_saved_pct"] == pytest.approx((80 + 0 + 75) / 3)
    assert overall["hybrid_adwt"] == pytest.approx(3 / 4)
    assert (overall["ml_steps_limit"], overall["oracle_steps_limit"]) == (200, 300)
    long = oracle.metrics_long_table(agg.reset_index())
    names = set(long.metric)
    assert {
        "hybrid_steps_saved_pct",
        "hybrid_same_minimum",
        "hybrid_adwt",
        "ml_steps_limit",
    } <= names
    # without the hybrid columns: the aggregate of before, plus the ML step limit
    plain_columns = [*list(base)[:8], "split", "sid"]  # up to ml_steps_limit
    plain = oracle.aggregate_relaxations(systems[plain_columns])
    assert list(plain.split) == ["val_id", "val_ood_ads"]
    assert not any(c.startswith(("hybrid", "oracle_only")) for c in plain.columns)


def _is2rs(root: Path) -> Path:
    """Two val_id systems and one val_ood_ads system with their EMT minima."""
    root.mkdir()
    for split, sids in (("val_id", [1, 2]), ("val_ood_ads", [3])):
        initial, relaxed = [], []
        for sid in sids:
            start = _start(seed=sid)
            start.info = {"sid": sid}  # extxyz cannot store ASE's adsorbate_info
            done = start.copy()
            done.calc = EMT()
            BFGS(done, logfile=None).run(fmax=0.02, steps=300)
            minimum = done.copy()
            minimum.calc = SinglePointCalculator(
                minimum, energy=done.get_potential_energy(), forces=done.get_forces()
            )
            initial.append(start)
            relaxed.append(minimum)
        write(root / f"{split}_initial.extxyz", initial)
        write(root / f"{split}_relaxed.extxyz", relaxed)
    return root


def test_relax_oracle_hybrid_from_the_cli_leaves_the_plain_scores_unchanged(tmp_path):
    is2rs = _is2rs(tmp_path / "is2rs")
    ckpt = tmp_path / "gns.pt"
    write_tiny_checkpoint(ckpt, "gns", force_scale=0.2)
    splits = ["val_id", "val_ood_ads"]
    plain = oracle.evaluate_relaxations(
        ckpt, is2rs, splits, out_dir=tmp_path / "plain", steps=5, fmax=0.0
    )
    assert list(plain.split) == splits and (plain.ml_steps_limit == 5).all()
    assert (plain.relax_mean_steps == 5).all()  # fmax 0: every step, as OC20's 200
    assert not (tmp_path / "plain" / "oracle").exists()

    out = tmp_path / "hybrid"
    args = ["relax-oracle", str(ckpt), str(is2rs), "--out", str(out), "--steps", "5", "--fmax", "0"]
    args += ["--hybrid", "--oracle-steps", "300", "--table", str(tmp_path / "long.parquet")]
    for split in splits:
        args += ["--splits", split]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    long = pd.read_parquet(tmp_path / "long.parquet")
    wide = long.pivot_table(index="split", columns="metric", values="value")
    assert list(wide.sort_index().index) == sorted([*splits, "overall"])
    assert (wide["ml_steps_limit"] == 5).all() and (wide["oracle_steps_limit"] == 300).all()
    assert wide.loc["overall", "relax_systems"] == 3
    assert (wide["hybrid_same_minimum"] == 1.0).all()  # EMT finishes every run at its minimum
    assert (wide["oracle_only_converged_fraction"] == 1.0).all()
    for name, value in plain.set_index("split").loc["val_id"].items():
        if name != "model":
            assert wide.loc["val_id", name] == pytest.approx(value), name  # unchanged

    systems = pd.read_parquet(out / "relax_systems.parquet")
    before = pd.read_parquet(tmp_path / "plain" / "relax_systems.parquet")
    same = [c for c in before.columns if c not in ("wall_s", "trajectory")]
    pd.testing.assert_frame_equal(systems[same], before[same])
    overall = systems.hybrid_steps_saved_pct.mean()  # a random model may cost steps
    assert wide.loc["overall", "hybrid_steps_saved_pct"] == pytest.approx(overall)
    assert sorted(p.name for p in (out / "oracle" / "val_id").iterdir()) == [
        "hybrid",
        "oracle_only",
    ]
    # the oracle-only run started where the data generator's BFGS did and found its minimum
    e_min = [oracle.oracle_check(a)[1] for a in oracle.read_is2rs(is2rs, "val_id")[1]]
    np.testing.assert_allclose(systems.oracle_only_energy[:2], e_min, atol=0.02)
