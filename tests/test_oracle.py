"""Scoring ML relaxations against the EMT oracle: ADwT, FbT-oracle, oracle energy gap."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from ase import Atoms
from ase.calculators.emt import EMT
from ase.calculators.singlepoint import SinglePointCalculator
from ase.io import write
from ase.optimize import BFGS
from test_calculator import slab, write_tiny_checkpoint

from forcenet import oracle
from forcenet.data.frame import fixed_mask


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


def test_evaluate_relaxations_against_the_oracle(tmp_path, capsys):
    """Zero ML steps: the scores are those of the initial structures, known independently."""
    minimum = _emt_minimum(1)
    other = minimum.copy()
    other.info["sid"] = 2
    other.calc = SinglePointCalculator(other, **minimum.calc.results)
    rattled = minimum.copy()
    rattled.info["sid"] = 2
    free = ~fixed_mask(rattled)
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
    agg = oracle.evaluate_relaxations(ckpt, is2rs, ["val_id"], out_dir=out, fmax=0.05, steps=0)
    progress = [x for x in capsys.readouterr().out.splitlines() if x.startswith("relax ")]
    assert progress == [progress[0]] and ": val_id, 2 systems, 0 model steps, " in progress[0]

    systems = pd.read_parquet(out / "relax_systems.parquet").set_index("sid")
    assert "wall_s" not in systems.columns  # results only: a rerun writes the same file
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
    long = oracle.metrics_long_table(agg)
    assert set(long.columns) >= {"model", "split", "metric", "value"}
    fbt = long[(long.split == "val_id") & (long.metric == "fbt_oracle")]["value"]
    assert list(fbt) == [0.5]
    assert (out / "relax_oracle_energy.png").stat().st_size > 1000
    # the caller writes the metrics table; this folder holds trajectories and systems only
    assert sorted(p.name for p in out.iterdir()) == [
        "relax_oracle_energy.png",
        "relax_systems.parquet",
        "trajectories",
    ]

    write(is2rs / "val_id_relaxed.extxyz", [other, minimum])  # records out of order
    with pytest.raises(ValueError, match="val_id_initial.extxyz.*record 0.*sid"):
        oracle.evaluate_relaxations(ckpt, is2rs, ["val_id"], out_dir=out, steps=0)
