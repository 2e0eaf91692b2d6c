"""Stock ASE entry points (BFGS, FIRE, LBFGS, VelocityVerlet + MDLogger) with every model.

Tiny random checkpoints of each kind: force-only models (ForceNet, GNS) opt in to the 0.0
stand-in energy (``energy="zero"``); energy models (SchNet, DimeNet++, ForceNet with its
energy head) report the energy they predict. Random models have no minimum to find, so the
runs are checked for what ASE promises: every step taken, one log line per step, the
logged energy the calculator's, fixed atoms bit-exact, free atoms moved.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from ase import Atoms, units
from ase.md import MDLogger
from ase.md.verlet import VelocityVerlet
from ase.optimize import BFGS, FIRE, LBFGS
from test_calculator import CUTOFF, MAX_NEIGHBORS, slab, write_tiny_checkpoint

from forcenet.calculator import EnergyMode, ForceNetCalculator, ForcesOnlyError
from forcenet.checkpoint import load_model
from forcenet.data import keys as K
from forcenet.data.batch import collate
from forcenet.data.dataset import sample_from_atoms
from forcenet.data.frame import fixed_mask
from forcenet.inference import predict

#: kind -> (model name, constructor overrides, the energy mode it runs ASE with)
KINDS: dict[str, tuple[str, dict, EnergyMode]] = {
    "forcenet": ("forcenet", {}, "zero"),
    "forcenet-energy-head": ("forcenet", {"energy_head": True}, "model"),
    "gns": ("gns", {}, "zero"),
    "schnet": ("schnet", {}, "model"),
    "dimenetpp": ("dimenetpp", {}, "model"),
}
FORCE_ONLY = [k for k, (_, _, mode) in KINDS.items() if mode == "zero"]
WITH_ENERGY = [k for k, (_, _, mode) in KINDS.items() if mode == "model"]
STEPS = 3


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("ckpt")
    paths = {}
    for kind, (name, overrides, _) in KINDS.items():
        paths[kind] = folder / f"{kind}.pt"
        write_tiny_checkpoint(paths[kind], name, force_scale=0.3, **overrides)
    return paths


def calculator(checkpoints: dict[str, Path], kind: str) -> ForceNetCalculator:
    return ForceNetCalculator.from_checkpoint(
        checkpoints[kind], device="cpu", energy=KINDS[kind][2]
    )


def model_energy(checkpoint: Path, atoms: Atoms) -> float:
    """The energy (eV) the checkpoint's model predicts for ``atoms``, straight from forward."""
    model, ckpt = load_model(checkpoint)
    assert ckpt["graph"] == {"cutoff": CUTOFF, "max_neighbors": MAX_NEIGHBORS}
    batch = collate([sample_from_atoms(atoms, cutoff=CUTOFF, max_neighbors=MAX_NEIGHBORS)])
    return float(predict(model, batch)[K.OUT_ENERGY][0])


def expected_energy(checkpoints: dict[str, Path], kind: str, atoms: Atoms) -> float:
    return 0.0 if KINDS[kind][2] == "zero" else model_energy(checkpoints[kind], atoms)


def assert_fixed_kept_free_moved(start: Atoms, atoms: Atoms) -> None:
    free = ~fixed_mask(start)
    np.testing.assert_array_equal(atoms.positions[~free], start.positions[~free])  # bit-exact
    assert np.abs(atoms.positions[free] - start.positions[free]).max() > 1e-5


@pytest.mark.parametrize("optimizer", [BFGS, FIRE, LBFGS], ids=lambda o: o.__name__)
@pytest.mark.parametrize("kind", list(KINDS))
def test_optimizer_runs_its_steps_logs_and_keeps_fixed_atoms(
    checkpoints, kind, optimizer, tmp_path
):
    start = slab()
    atoms = start.copy()
    atoms.calc = calculator(checkpoints, kind)
    log = tmp_path / "opt.log"
    opt = optimizer(atoms, logfile=str(log))
    converged = opt.run(fmax=1e-6, steps=STEPS)  # fmax never reached: every step is taken
    opt.close()
    assert not converged and opt.nsteps == STEPS
    header, *lines = log.read_text().splitlines()
    assert "Energy" in header and len(lines) == STEPS + 1  # steps 0..STEPS
    assert [int(line.split()[1]) for line in lines] == list(range(STEPS + 1))
    logged = float(lines[-1].split()[-2])  # the energy of the final positions
    assert logged == pytest.approx(expected_energy(checkpoints, kind, atoms), abs=1e-5)
    assert_fixed_kept_free_moved(start, atoms)


@pytest.mark.parametrize("kind", list(KINDS))
def test_velocity_verlet_with_md_logger_writes_a_log(checkpoints, kind, tmp_path):
    start = slab()
    atoms = start.copy()
    atoms.calc = calculator(checkpoints, kind)
    rng = np.random.default_rng(0)
    atoms.set_momenta(rng.normal(0.0, 1.3, (len(atoms), 3)))  # ~300 K for Cu (amu Å / t_ASE)
    log = tmp_path / "md.log"
    md = VelocityVerlet(atoms, timestep=1.0 * units.fs)
    logger = MDLogger(md, atoms, str(log), header=True)
    md.attach(logger, interval=1)
    md.run(STEPS)
    logger.close()
    header, *lines = log.read_text().splitlines()
    assert "Epot[eV]" in header and len(lines) == STEPS + 1  # the start and every step
    epot = float(lines[-1].split()[2])  # columns: Time[ps] Etot Epot Ekin T
    assert epot == pytest.approx(expected_energy(checkpoints, kind, atoms), abs=1e-3)
    assert_fixed_kept_free_moved(start, atoms)


@pytest.mark.parametrize("kind", FORCE_ONLY)
def test_force_only_model_without_opt_in_is_the_clear_error(checkpoints, kind, tmp_path):
    atoms = slab()
    atoms.calc = ForceNetCalculator.from_checkpoint(checkpoints[kind], device="cpu")
    with pytest.raises(ForcesOnlyError, match="predicts forces only") as err:
        atoms.get_potential_energy()
    assert str(checkpoints[kind]) in str(err.value) and "energy='zero'" in str(err.value)
    for optimizer in (BFGS, FIRE, LBFGS):  # the user's first try: the log asks for an energy
        with pytest.raises(ForcesOnlyError, match="predicts forces only"):
            optimizer(atoms, logfile=None).run(fmax=0.05, steps=2)
    md = VelocityVerlet(atoms, timestep=1.0 * units.fs)
    md.attach(MDLogger(md, atoms, str(tmp_path / "md.log")), interval=1)
    with pytest.raises(ForcesOnlyError, match="predicts forces only"):
        md.run(2)


@pytest.mark.parametrize("kind", WITH_ENERGY)
def test_energy_model_reports_the_energy_it_predicts(checkpoints, kind):
    atoms = slab()
    atoms.calc = ForceNetCalculator.from_checkpoint(checkpoints[kind], device="cpu")
    assert atoms.calc.has_energy and atoms.calc.energy_mode == "model"
    energy = atoms.get_potential_energy()
    assert energy == pytest.approx(model_energy(checkpoints[kind], atoms), abs=1e-6)
    assert energy != 0.0
    with pytest.raises(ValueError, match="predicts an energy"):  # its energy is real
        ForceNetCalculator.from_checkpoint(checkpoints[kind], device="cpu", energy="zero")
