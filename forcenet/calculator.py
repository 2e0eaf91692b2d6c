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
``atoms.get_forces()``) and, only for models that predict one, ``energy`` (eV, *referenced*:
the adsorption-energy scale the model was trained on, not a DFT/EMT total energy). A
force-only model (ForceNet, GNS) raises ``PropertyNotImplementedError`` for the energy
rather than returning a made-up number. Which properties exist is read from one probe
forward pass at construction, so it is whatever the rebuilt model actually returns.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from ase import Atoms
from ase.calculators.calculator import Calculator, PropertyNotImplementedError, all_changes
from torch import nn

from forcenet.checkpoint import load_model
from forcenet.data import keys as K
from forcenet.data.batch import Batch, batch_to, collate
from forcenet.data.dataset import sample_from_atoms
from forcenet.distributed import pick_device
from forcenet.inference import predict

#: Structures per forward pass in :meth:`ForceNetCalculator.predict_many`.
DEFAULT_BATCH_SIZE = 32


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
    """

    def __init__(
        self,
        *,
        model: nn.Module,
        cutoff: float,
        max_neighbors: int,
        device: str | torch.device | None = None,
    ) -> None:
        super().__init__()
        self.device = pick_device(str(device) if device is not None else None)
        self.model = model.to(self.device).eval()
        self.cutoff = float(cutoff)
        self.max_neighbors = int(max_neighbors)
        self.model_name = type(model).__name__  # the checkpoint's model name when loaded from one
        self.checkpoint_path: Path | None = None
        probe = self._forward([_probe_structure()])
        has_energy = K.OUT_ENERGY in probe
        # Instance attribute: the class-level list would be shared by all calculators.
        self.implemented_properties = ["energy", "forces"] if has_energy else ["forces"]

    @classmethod
    def from_checkpoint(
        cls, path: Path, device: str | torch.device | None = None
    ) -> ForceNetCalculator:
        """Rebuild model and graph settings from checkpoint ``path`` (nothing else needed)."""
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
        return calc

    @property
    def has_energy(self) -> bool:
        """True when the model predicts a (referenced) energy."""
        return "energy" in self.implemented_properties

    def sample(self, atoms: Atoms) -> dict[str, np.ndarray]:
        """The model input for ``atoms``: frame fields + graph, as in training."""
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

    def calculate(
        self,
        atoms: Atoms | None = None,
        properties: Sequence[str] = ("forces",),
        system_changes: Sequence[str] = tuple(all_changes),
    ) -> None:
        """ASE hook: fill ``self.results`` for ``atoms`` (forces, and energy if available)."""
        missing = [p for p in properties if p not in self.implemented_properties]
        if missing:
            raise PropertyNotImplementedError(
                f"{missing} not available: this model predicts {self.implemented_properties}"
            )
        super().calculate(atoms, properties, system_changes)  # sets self.atoms
        if self.atoms is None:
            raise ValueError("calculate() needs an Atoms object: none given and none attached")
        (result,) = self.predict_many([self.atoms], batch_size=1)
        self.results = result

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
        self.results = dict(results)
