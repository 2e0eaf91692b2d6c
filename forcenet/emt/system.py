"""One system of the EMT dataset: an adsorbate on a slab, relaxed then run as MD, labelled.

The adsorbate (:mod:`forcenet.emt.adsorbates`) is placed binding-atom-down at a
top/bridge/hollow site of a small metal or alloy slab (:mod:`forcenet.emt.slabs`),
rattled (free atoms, :data:`RATTLE_STD` Å), then

1. relaxed with ASE's BFGS under EMT until max |F| on free atoms < :data:`RELAX_FMAX`
   eV/Å or ``relax_steps`` steps; ``frames_per_system`` frames are taken evenly along that
   trajectory (so the first, high-force frame is always included);
2. run as Langevin MD at ``md_temperature_K`` from the last relaxation frame;
   ``md_frames_per_system`` frames, one every :data:`MD_STRIDE` steps of 1 fs.

Labels are the EMT total energy and the raw forces on every atom (fixed ones included,
``apply_constraint=False``, as in OC20). The per-system reference energy is the EMT
energy of the relaxed clean slab plus the gas-phase references of the adsorbate atoms,
so ``energy = total - reference`` is an adsorption energy of order eV.

Rejected frames are dropped and counted by reason:

* ``max_force``: some atom's |F| exceeds ``max_force`` eV/Å (the frame alone is dropped);
* ``desorbed``: the lowest adsorbate atom is more than ``DESORB_HEIGHT`` (3 Å) above the
  initial top slab layer, or any adsorbate atom leaves the adsorbate zone
  (:data:`forcenet.emt.slabs.ADSORBATE_ZONE` Å), which would eat into the vacuum;
* ``dissociated``: a bond of the placed adsorbate stretched beyond
  ``DISSOCIATION_FACTOR`` (1.6) times its covalent length;
* ``slab_displaced``: a slab atom moved more than ``SLAB_DISPLACEMENT`` (1 Å).

(thresholds in :mod:`forcenet.emt.adsorbates`, :class:`StructureCheck`). The last three
end the trajectory they occur in (what follows is the same broken structure); the
breaking frame is the one counted. EMT is a metal potential: adsorbates with two or
more H atoms (``*OH2``, ``*NH3``, ``*CH2OH``...) often lose an H to the metal, so
roughly a third of the systems end in ``dissociated``; their earlier frames are kept.

An IS2RS candidate's relaxation is continued to ``is2rs_fmax``; when it converges
without a structural problem its starting placement (the rattled structure of frame
``fid`` 0) and its relaxed structure are kept. All random choices of system ``i`` of
split ``s`` come from ``numpy.random.default_rng([seed, s, i, 1])``.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
from ase import Atoms, units
from ase.calculators.emt import EMT
from ase.calculators.singlepoint import SinglePointCalculator
from ase.md.langevin import Langevin
from ase.optimize import BFGS

from forcenet.data import keys as K
from forcenet.data.frame import Frame, fixed_mask
from forcenet.emt.adsorbates import StructureCheck, adsorbate_reference, place_adsorbate
from forcenet.emt.slabs import ADSORBATE_ZONE, catalyst_slab

RATTLE_STD = 0.05  # Å, Gaussian displacement of free atoms of the starting placement
RELAX_FMAX = 0.05  # eV/Å, convergence of the sampled relaxation
IS2RS_MAX_STEPS = 500
MD_STRIDE = 5  # MD steps (1 fs each) between sampled frames
MD_FRICTION = 0.01 / units.fs


@dataclass(frozen=True)
class SystemSpec:
    """What one system is: the discrete choices, drawn in :func:`plan_systems`."""

    split: str
    index: int
    sid: int
    adsorbate: str
    catalyst: str
    facet: str
    site: str
    is2rs: bool


@dataclass(frozen=True)
class SystemSettings:
    """Sampling settings shared by all systems (from
    :func:`~forcenet.emt.generate.generate_emt`)."""

    seed: int
    frames_per_system: int
    md_frames_per_system: int
    relax_steps: int
    md_temperature_K: float
    max_force: float
    is2rs_fmax: float


@dataclass
class SystemResult:
    """Frames and bookkeeping of one system (sent back from a worker)."""

    spec: SystemSpec
    reference_energy: float
    frames: list[Frame]
    rejected: Counter = field(default_factory=Counter)
    relax_length: int = 0
    initial: Atoms | None = None  # IS2RS starting placement
    relaxed: Atoms | None = None  # IS2RS EMT-relaxed structure (None if it failed)
    is2rs_problem: str | None = None  # why an IS2RS candidate was dropped


def _label(atoms: Atoms) -> tuple[np.ndarray, float, np.ndarray]:
    """Positions [N, 3], EMT energy and raw forces [N, 3] (fixed atoms included)."""
    forces = atoms.get_forces(apply_constraint=False)
    return atoms.positions.copy(), float(atoms.get_potential_energy()), forces.copy()


def _optimize(
    atoms: Atoms, opt: BFGS, check: StructureCheck, fmax: float, max_steps: int
) -> tuple[list[tuple], str | None, bool]:
    """Labels of the current state and after each optimizer step.

    Stops when the free-atom max |F| < ``fmax`` (converged), after ``max_steps`` steps, or
    at a structural problem (that state is not returned; its reason is). Returns
    ``(labels, problem, converged)``.
    """
    labels: list[tuple] = []
    for step in range(max_steps + 1):
        if step:
            opt.step()
        problem = check(atoms.positions)
        if problem:
            return labels, problem, False
        labels.append(_label(atoms))
        if np.linalg.norm(atoms.get_forces(), axis=1).max() < fmax:
            return labels, None, True
    return labels, None, False


def _md(
    start: Atoms, settings: SystemSettings, rng: np.random.Generator, check: StructureCheck
) -> tuple[list[tuple], str | None]:
    """Langevin MD from ``start``: labels every :data:`MD_STRIDE` steps, or a problem."""
    atoms = start.copy()
    atoms.calc = EMT()
    # Maxwell-Boltzmann momenta; set_momenta zeroes those of fixed atoms.
    kT = units.kB * settings.md_temperature_K  # eV
    sigma = np.sqrt(atoms.get_masses() * kT)[:, None]  # [N, 1]
    atoms.set_momenta(sigma * rng.standard_normal((len(atoms), 3)))
    dyn = Langevin(
        atoms,
        timestep=1.0 * units.fs,
        temperature_K=settings.md_temperature_K,
        friction=MD_FRICTION,
        fixcm=False,  # the fixed sub-surface atoms already pin the slab
        rng=rng,
        logfile=None,
    )
    labels: list[tuple] = []
    for _ in range(settings.md_frames_per_system):
        dyn.run(MD_STRIDE)
        problem = check(atoms.positions)
        if problem:
            return labels, problem
        labels.append(_label(atoms))
    return labels, None


def _frames(
    atoms: Atoms,
    labels: list[tuple],
    fids: Iterable[int],
    ref: float,
    sid: int,
    max_force: float,
    rejected: Counter,
) -> list[Frame]:
    """Frames of ``labels`` (with frame ids ``fids``) except those over the force cap."""
    fixed = fixed_mask(atoms)
    out = []
    for (pos, energy, forces), fid in zip(labels, fids, strict=True):
        if np.linalg.norm(forces, axis=1).max() > max_force:
            rejected["max_force"] += 1
            continue
        out.append(
            Frame(
                atomic_numbers=atoms.numbers.astype(np.int64),
                pos=pos,
                cell=np.array(atoms.cell, dtype=np.float64),
                pbc=np.array(atoms.pbc, dtype=bool),
                tags=atoms.get_tags().astype(np.int64),
                fixed=fixed.copy(),
                forces=forces,
                total_energy=energy,
                reference_energy=ref,
                sid=sid,
                fid=int(fid),
            )
        )
    return out


def run_system(
    spec: SystemSpec, slab_pos: np.ndarray, slab_energy: float, settings: SystemSettings
) -> SystemResult:
    """Place, relax and run MD for one system; returns its frames and rejection counts."""
    rng = np.random.default_rng([settings.seed, K.SPLITS.index(spec.split), spec.index, 1])
    slab = catalyst_slab(settings.seed, spec.catalyst, spec.facet)
    slab.positions = slab_pos
    atoms = place_adsorbate(slab, spec.adsorbate, spec.site, rng)
    check = StructureCheck(atoms, ADSORBATE_ZONE)
    free = np.flatnonzero(atoms.get_tags() != K.TAG_SUBSURFACE)
    atoms.positions[free] += rng.normal(0.0, RATTLE_STD, size=(len(free), 3))
    ads_symbols = [
        s
        for s, t in zip(atoms.get_chemical_symbols(), atoms.get_tags(), strict=True)
        if t == K.TAG_ADSORBATE
    ]
    ref = slab_energy + adsorbate_reference(ads_symbols)
    result = SystemResult(spec=spec, reference_energy=ref, frames=[])
    initial = atoms.copy()
    initial.info = {}  # drop ASE's slab-builder metadata
    atoms.calc = EMT()
    opt = BFGS(atoms, logfile=None)
    labels, problem, _ = _optimize(atoms, opt, check, RELAX_FMAX, settings.relax_steps)
    result.relax_length = len(labels)
    if problem:
        result.rejected[problem] += 1
    if not labels:
        return result
    # Evenly along the trajectory, first (rattled, high-force) and last frame included.
    picks = np.unique(np.linspace(0, len(labels) - 1, settings.frames_per_system).round())
    picks = picks.astype(int)
    result.frames = _frames(
        atoms, [labels[p] for p in picks], picks, ref, spec.sid, settings.max_force, result.rejected
    )
    if problem:
        return result
    end = atoms.copy()
    end.positions = labels[-1][0]
    md_labels, md_problem = _md(end, settings, rng, check)
    if md_problem:
        result.rejected[md_problem] += 1
    # MD frame k (0-based) is MD step (k + 1) * MD_STRIDE after the last relaxation frame.
    fids = [len(labels) - 1 + MD_STRIDE * (k + 1) for k in range(len(md_labels))]
    result.frames += _frames(
        atoms, md_labels, fids, ref, spec.sid, settings.max_force, result.rejected
    )
    if spec.is2rs:
        _is2rs(result, initial, atoms, opt, check, settings.is2rs_fmax)
    return result


def _is2rs(
    result: SystemResult,
    initial: Atoms,
    atoms: Atoms,
    opt: BFGS,
    check: StructureCheck,
    fmax: float,
) -> None:
    """Continue the relaxation to ``fmax``; store initial and relaxed structures if it works."""
    labels, problem, converged = _optimize(atoms, opt, check, fmax, IS2RS_MAX_STEPS)
    info = {
        "sid": result.spec.sid,
        "reference_energy": result.reference_energy,
        "adsorbate": result.spec.adsorbate,
        "catalyst": result.spec.catalyst,
        "facet": result.spec.facet,
        "site": result.spec.site,
    }
    if problem or not converged:
        result.is2rs_problem = problem or "not_converged"
        return
    result.initial = initial
    initial.info.update(info)
    pos, energy, forces = labels[-1]
    relaxed = initial.copy()
    relaxed.positions = pos
    relaxed.info.update(info)
    relaxed.calc = SinglePointCalculator(relaxed, energy=energy, forces=forces)
    result.relaxed = relaxed
