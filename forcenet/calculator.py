"""An ASE calculator around a trained checkpoint: forces (and energy where the model has one).

The calculator is built from the checkpoint file alone
(:func:`forcenet.checkpoint.load_model`): the network, its label normalisation (inside the
rebuilt module) and the neighbor-list settings it was trained with (``ckpt["graph"]``:
``cutoff`` Å, ``max_neighbors``). Each structure is turned into a sample exactly as the
training data were (:func:`forcenet.data.dataset.sample_from_atoms`: float32 positions,
periodic neighbor list truncated to the nearest ``max_neighbors``, ``tags`` from
``atoms.get_tags()``, ``fixed`` from ``FixAtoms``), batched with
:func:`forcenet.data.batch.collate` and passed through the model.

Properties: ``forces`` [N, 3] (eV/Å, every atom; ASE applies the constraints when you call
``atoms.get_forces()``) and ``energy`` (eV), chosen by the ``energy`` option
(:data:`EnergyMode`):

* ``energy="model"`` (default): the energy the model predicts, *referenced* (the
  adsorption-energy scale it was trained on, not a DFT/EMT total energy): SchNet,
  DimeNet++, and ForceNet trained with ``energy_head=True``. A force-only model (ForceNet
  without its energy head, GNS) raises :class:`ForcesOnlyError` for the energy, which
  names the checkpoint and says how to opt in.
* ``energy="zero"`` (force-only models only): the energy is reported as 0.0. **Not an
  energy**: ASE's optimizers and loggers accept it, and BFGS, LBFGS, FIRE, MDMin,
  VelocityVerlet and Langevin step on forces only, so they run unchanged; do not compare,
  plot or conserve it (``MDLogger``'s ``Etot`` is then the kinetic energy alone).
  Optimizers that *use* the energy to step do not work with it: ``BFGSLineSearch``
  (``QuasiNewton``), ``LBFGSLineSearch``, ``LBFGS(use_line_search=True)``, ``GPMin``,
  ``GoodOldQuasiNewton``, ``PreconLBFGS`` (Armijo line search), the SciPy optimizers,
  basin and minima hopping; ``FIRE(downhill_check=True)`` silently never resets. An
  energy model refuses ``"zero"`` (its energy is real: use ``"model"``).

Which properties the model has is read from one probe forward pass at construction, so it
is whatever the rebuilt model actually returns.

A model trained with per-element reference energies has none for elements its training
split lacked: the first structure holding such elements gets an
:class:`UnreferencedElementsWarning` naming them (once per element), as its energy lacks
their atoms' reference.

Usage (a force-only checkpoint relaxed and run with stock ASE)::

    from ase.md import MDLogger
    from ase.md.verlet import VelocityVerlet
    from ase.optimize import BFGS
    from ase import units
    from forcenet.calculator import ForceNetCalculator

    atoms.calc = ForceNetCalculator.from_checkpoint("data/models/forcenet/best.pt", energy="zero")
    BFGS(atoms).run(fmax=0.05, steps=200)  # the log's Energy column reads 0.0
    md = VelocityVerlet(atoms, timestep=1 * units.fs)
    md.attach(MDLogger(md, atoms, "md.log"), interval=10)
    md.run(100)
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal, get_args

import numpy as np
import torch
from ase import Atoms
from ase.calculators.calculator import Calculator, PropertyNotImplementedError, all_changes
from torch import nn

from forcenet.checkpoint import load_model
from forcenet.data import keys as K
from forcenet.data.batch import Batch, batch_to, collate
from forcenet.data.dataset import sample_from_atoms
from forcenet.data.frame import geometry_problem
from forcenet.distributed import pick_device
from forcenet.inference import predict
from forcenet.scaling import referenced_elements, unreferenced_warning

#: Structures per forward pass in :meth:`ForceNetCalculator.predict_many`.
DEFAULT_BATCH_SIZE = 32

#: What the calculator reports as ``energy`` (see the module docstring): the model's own
#: prediction (``"model"``), or 0.0 as a stand-in for a force-only model (``"zero"``).
EnergyMode = Literal["model", "zero"]

#: The energy properties ASE asks for (``force_consistent=True`` asks for ``free_energy``).
_ENERGY_PROPERTIES = ("energy", "free_energy")


class ForcesOnlyError(PropertyNotImplementedError):
    """The energy of a force-only model was asked for; the message says how to opt in.

    A subclass of ASE's ``PropertyNotImplementedError``, so ASE code that probes for a
    property (e.g. the force-consistent energy) still catches it.
    """


class UnreferencedElementsWarning(UserWarning):
    """A structure holds elements the model has no reference energy for."""


def _probe_structure() -> Atoms:
    """Three Cu atoms in free space (2.5 Å apart): every model has edges and triplets."""
    pos = np.array([[0.0, 0.0, 0.0], [2.5, 0.0, 0.0], [1.25, 2.1, 0.0]])
    return Atoms("Cu3", positions=pos, pbc=False)


class ForceNetCalculator(Calculator):
    """ASE calculator for a forcenet model; see the module docstring.

    Args (keyword-only):
        model: a module obeying the forward contract in physical units (e.g. the first
            value returned by :func:`forcenet.checkpoint.load_model`); put in eval mode.
        cutoff: neighbor-list radius (Å) the model was trained with.
        max_neighbors: neighbors kept per centre atom (nearest first), as in training.
        device: where the model runs; ``None`` picks CUDA when available, else CPU.
        energy: what ``energy`` is (:data:`EnergyMode`): ``"model"`` (default) the model's
            prediction, a :class:`ForcesOnlyError` for force-only models; ``"zero"`` a 0.0
            stand-in for force-only models (not an energy: for ASE's force-based optimizers
            and loggers only). An energy model with ``"zero"`` is a ``ValueError``.
    """

    def __init__(
        self,
        *,
        model: nn.Module,
        cutoff: float,
        max_neighbors: int,
        device: str | torch.device | None = None,
        energy: EnergyMode = "model",
    ) -> None:
        super().__init__()
        self.device = pick_device(str(device) if device is not None else None)
        self.model = model.to(self.device).eval()
        self.cutoff = float(cutoff)
        self.max_neighbors = int(max_neighbors)
        self.model_name = type(model).__name__  # the checkpoint's model name when loaded from one
        self.checkpoint_path: Path | None = None
        self.referenced = referenced_elements(self.model)  # None: no per-element references
        self._warned: set[int] = set()  # shared with clones: each element is named once
        probe = self._forward([_probe_structure()])
        self.model_has_energy = K.OUT_ENERGY in probe
        self._set_energy_mode(energy)

    def _set_energy_mode(self, energy: EnergyMode) -> None:
        if energy not in get_args(EnergyMode):
            raise ValueError(f"energy must be one of {get_args(EnergyMode)}, got {energy!r}")
        if energy == "zero" and self.model_has_energy:
            raise ValueError(
                f"{self._describe()} predicts an energy: use energy='model' "
                "(energy='zero' is a stand-in for force-only models only)"
            )
        self.energy_mode: EnergyMode = energy
        reports_energy = self.model_has_energy or energy == "zero"
        # Instance attribute: the class-level list would be shared by all calculators.
        self.implemented_properties = ["energy", "forces"] if reports_energy else ["forces"]

    def _describe(self) -> str:
        if self.checkpoint_path is None:
            return f"model {self.model_name} (not loaded from a checkpoint)"
        return f"model {self.model_name} of checkpoint {self.checkpoint_path}"

    @classmethod
    def from_checkpoint(
        cls,
        path: str | Path,
        device: str | torch.device | None = None,
        *,
        energy: EnergyMode = "model",
    ) -> ForceNetCalculator:
        """Rebuild model and graph settings from checkpoint ``path`` (nothing else needed).

        ``energy`` is the constructor's option (``"zero"``: 0.0 stand-in, force-only models).
        """
        target = pick_device(str(device) if device is not None else None)
        model, ckpt = load_model(Path(path), device=target)
        graph = ckpt["graph"]
        calc = cls(
            model=model,
            cutoff=float(graph["cutoff"]),
            max_neighbors=int(graph["max_neighbors"]),
            device=target,
        )
        calc.checkpoint_path = Path(path)
        calc.model_name = str(ckpt["model_name"])
        calc._set_energy_mode(energy)  # after the names: its error message uses them
        return calc

    @property
    def has_energy(self) -> bool:
        """True when the model predicts a (referenced) energy (never for the 0.0 stand-in)."""
        return self.model_has_energy

    def forces_only_error(self) -> ForcesOnlyError:
        """The error for asking a force-only model's energy: names the model and checkpoint."""
        return ForcesOnlyError(
            f"{self._describe()} predicts forces only, no energy. ASE's optimizers and "
            "MD loggers ask for one: build the calculator with energy='zero' "
            "(ForceNetCalculator.from_checkpoint(path, energy='zero')) to report 0.0 as a "
            "stand-in (not an energy; BFGS, LBFGS, FIRE and VelocityVerlet step on forces "
            "only), or use a model with an energy (SchNet, DimeNet++, ForceNet trained "
            "with energy_head=True)."
        )

    def get_property(
        self, name: str, atoms: Atoms | None = None, allow_calculation: bool = True
    ) -> Any:
        """ASE hook: as ASE's, but a force-only model's energy is a :class:`ForcesOnlyError`."""
        if name in _ENERGY_PROPERTIES and not self.model_has_energy and self.energy_mode == "model":
            raise self.forces_only_error()
        return super().get_property(name, atoms, allow_calculation)

    def sample(self, atoms: Atoms) -> dict[str, np.ndarray]:
        """The model input for ``atoms``: frame fields + graph, as in training; positions
        or a cell that cannot make a neighbor list (NaN, a flat periodic cell) are a
        ``ValueError`` naming the structure."""
        problem = geometry_problem(atoms.positions, atoms.cell.array, atoms.pbc)
        if problem is not None:
            raise ValueError(f"structure {atoms.get_chemical_formula()}: {problem}")
        return sample_from_atoms(atoms, cutoff=self.cutoff, max_neighbors=self.max_neighbors)

    def batch(self, structures: Sequence[Atoms]) -> Batch:
        """One collated batch (on the calculator's device) of ``structures``."""
        return batch_to(collate([self.sample(a) for a in structures]), self.device)

    def _forward(self, structures: Sequence[Atoms]) -> dict[str, torch.Tensor]:
        return predict(self.model, self.batch(structures))

    def predict_many(
        self, structures: Sequence[Atoms], *, batch_size: int = DEFAULT_BATCH_SIZE
    ) -> list[dict[str, Any]]:
        """Predictions for many structures, ``batch_size`` per collate + forward pass.

        Returns one dict per structure, in order: ``"forces"`` [N_i, 3] float64 (eV/Å,
        constraints not applied) and, for energy models, ``"energy"`` (eV, referenced).
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self._check_references(structures)
        results: list[dict[str, Any]] = []
        for start in range(0, len(structures), batch_size):
            chunk = structures[start : start + batch_size]
            out = self._forward(chunk)
            sizes = [len(a) for a in chunk]
            forces = out[K.OUT_FORCES].double().cpu().numpy()  # [sum N_i, 3]
            per_atoms = np.split(forces, np.cumsum(sizes)[:-1])
            energies = out[K.OUT_ENERGY].double().cpu().numpy() if K.OUT_ENERGY in out else None
            for g, f in enumerate(per_atoms):
                item: dict[str, Any] = {"forces": f}
                if energies is not None:
                    item["energy"] = float(energies[g])
                results.append(item)
        return results

    def _check_references(self, structures: Sequence[Atoms]) -> None:
        """Warn, once per element, of elements without a reference energy in the model."""
        if self.referenced is None or not self.model_has_energy or self.energy_mode != "model":
            return
        numbers = {int(z) for atoms in structures for z in np.unique(atoms.numbers)}
        new = numbers - self.referenced - self._warned
        if new:
            self._warned.update(new)
            warnings.warn(
                unreferenced_warning(self._describe(), new, "structures hold "),
                UnreferencedElementsWarning,
                stacklevel=3,
            )

    def calculate(
        self,
        atoms: Atoms | None = None,
        properties: Sequence[str] = ("forces",),
        system_changes: Sequence[str] = tuple(all_changes),
    ) -> None:
        """ASE hook: fill ``self.results`` for ``atoms`` (forces, and energy if available)."""
        missing = [p for p in properties if p not in self.implemented_properties]
        if self.energy_mode == "model" and not self.model_has_energy:
            if any(p in _ENERGY_PROPERTIES for p in missing):
                raise self.forces_only_error()
        if missing:
            raise PropertyNotImplementedError(
                f"{missing} not available: this calculator has {self.implemented_properties}"
            )
        super().calculate(atoms, properties, system_changes)  # sets self.atoms
        if self.atoms is None:
            raise ValueError("calculate() needs an Atoms object: none given and none attached")
        (result,) = self.predict_many([self.atoms], batch_size=1)
        self.results = self._with_energy_mode(result)

    def _with_energy_mode(self, result: dict[str, Any]) -> dict[str, Any]:
        """``result`` of :meth:`predict_many` plus the 0.0 stand-in energy in ``"zero"`` mode."""
        if self.energy_mode == "zero":
            return {**result, "energy": 0.0}
        return dict(result)

    def clone(self) -> ForceNetCalculator:
        """A calculator sharing this one's model but with its own cached state.

        ASE caches one structure per calculator, so relaxing several structures at once
        needs one calculator per structure; cloning avoids rebuilding the model.
        """
        other = copy.copy(self)
        other.atoms = None
        other.results = {}
        other.parameters = copy.deepcopy(self.parameters)
        return other

    def set_results(self, atoms: Atoms, results: dict[str, Any]) -> None:
        """Store precomputed ``results`` for ``atoms`` (from :meth:`predict_many`).

        A later ``atoms.get_forces()`` on the same positions returns them without another
        forward pass; this is how batched relaxations step many structures at once.
        """
        self.atoms = atoms.copy()
        self.results = self._with_energy_mode(results)
