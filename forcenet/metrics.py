"""OC20 S2EF metrics over free atoms, accumulated exactly as running sums and counts.

Follows the OCP evaluator (Chanussot et al. 2021): every force metric is taken over the free atoms
(``fixed == False``) only; dataset-level values are running totals divided by running
counts, so the result does not depend on how the data were split into batches. The sums
live in one float64 vector (:meth:`OC20Metrics.state`) that DDP ranks can all-reduce.

Metrics (units):

* ``forces_mae`` (eV/Å): mean |F̂ − F| over free atoms × 3 components; ``forcesx_mae`` …
  ``forcesz_mae`` per component.
* ``zero_forces_mae`` (eV/Å): the same for a model that predicts F̂ = 0, i.e. the mean
  |F| component on free atoms. Any useful model must beat it.
* ``forces_cos``: mean over free atoms of the cosine between F̂ and F.
* ``forces_magnitude`` (eV/Å): mean over free atoms of | ‖F̂‖ − ‖F‖ |.
* ``energy_mae`` (eV, referenced energy, per structure) and ``energy_force_within_threshold``
  (EFwT, fraction of structures with |ΔE| < 0.02 eV *and* max |ΔF| over free atoms and
  components < 0.03 eV/Å, both strict) — only when the model predicts an energy.
* ``num_structures``, ``num_free_atoms``: the counts behind the means.

Per OC20 tag, when the data have both free surface (tag 1) and adsorbate (tag 2) atoms:
``forces_mae``, ``zero_forces_mae``, ``forces_cos``, ``forces_magnitude`` and
``num_free_atoms`` again with the suffix ``_surface`` or ``_adsorbate``, over those free
atoms only; and for every element among the free adsorbate atoms
``forces_mae_adsorbate_<symbol>`` and ``zero_forces_mae_adsorbate_<symbol>`` (e.g.
``forces_mae_adsorbate_C``). Data without tags (molecules: every atom tag 1) report the
overall figures only.

IS2RS (relaxed structures): :func:`adwt`, OC20's average distance within threshold of one
system, from :func:`mean_free_distance` (minimum-image, free atoms only).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
from torch import Tensor

from forcenet.data import keys as K

#: EFwT thresholds (OCP evaluator): |ΔE| in eV, max |ΔF| component in eV/Å.
EFWT_ENERGY_THRESHOLD = 0.02
EFWT_FORCE_THRESHOLD = 0.03

#: ADwT distance thresholds (Å): 0.01, 0.011, ..., 0.499 (490 values), as in OC20.
ADWT_THRESHOLDS = np.arange(0.01, 0.5, 0.001)

#: Names of the entries of the running-sum vector, in order.
STATE_FIELDS = (
    "abs_err_x",  # Σ |ΔF_x| over free atoms
    "abs_err_y",
    "abs_err_z",
    "abs_true",  # Σ |F| components over free atoms (zero baseline)
    "cos",  # Σ cos(F̂, F) over free atoms
    "magnitude",  # Σ | ‖F̂‖ − ‖F‖ | over free atoms
    "n_free_atoms",
    "n_structures",
    "energy_abs_err",  # Σ |ΔE| over structures with an energy prediction
    "efwt_hits",  # number of structures within both EFwT thresholds
    "n_energy_structures",
)
_IDX = {name: i for i, name in enumerate(STATE_FIELDS)}

#: OC20 tags with their own metrics: 1 surface, 2 adsorbate (tag 0 atoms are all fixed).
TAG_GROUPS = {"surface": 1, "adsorbate": 2}
#: Running sums per tag group, in order (same meaning as the overall fields).
GROUP_FIELDS = ("abs_err", "abs_true", "cos", "magnitude", "n_free_atoms")
#: Atomic numbers with a per-element slot (adsorbate atoms): 0..MAX_Z.
MAX_Z = 100
_GROUP0 = len(STATE_FIELDS)
_ELEM0 = _GROUP0 + len(TAG_GROUPS) * len(GROUP_FIELDS)
#: Per element: Σ|ΔF|, Σ|F| (components), number of atoms.
STATE_SIZE = _ELEM0 + 3 * (MAX_Z + 1)


def _symbol(z: int) -> str:
    from ase.data import chemical_symbols

    return chemical_symbols[z]


def _free_atom_max_abs_error(abs_err: Tensor, batch: Tensor, free: Tensor, n_graphs: int) -> Tensor:
    """Per-structure max |ΔF| component over free atoms [G]; 0 for a structure without any."""
    per_atom = abs_err.max(dim=1).values.masked_fill(~free, 0.0)  # [N]
    out = torch.zeros(n_graphs, dtype=abs_err.dtype, device=abs_err.device)
    return out.scatter_reduce(0, batch, per_atom, reduce="amax", include_self=True)


class OC20Metrics:
    """Accumulates OC20 force (and optionally energy) metrics over many batches.

    Call :meth:`update` with each model output and its batch, then :meth:`compute`.
    For distributed evaluation, all-reduce :meth:`state` (sum) and :meth:`load_state`
    the result on every rank, or call :meth:`all_reduce`.
    """

    def __init__(self) -> None:
        self._state = torch.zeros(STATE_SIZE, dtype=torch.float64)

    def reset(self) -> None:
        self._state.zero_()

    def state(self) -> Tensor:
        """A copy of the running sums and counts [STATE_SIZE] float64: the overall fields
        (:data:`STATE_FIELDS`), then per tag group, then per adsorbate element."""
        return self._state.clone()

    def load_state(self, state: Tensor) -> None:
        if state.shape != self._state.shape:
            raise ValueError(
                f"metric state has shape {tuple(state.shape)}, expected {tuple(self._state.shape)}"
            )
        self._state = state.detach().to("cpu", torch.float64).clone()

    def merge(self, other: OC20Metrics) -> None:
        """Add another accumulator's sums (e.g. from another rank or split shard)."""
        self._state += other._state

    def all_reduce(self) -> None:
        """Sum the state across the default process group (no-op without one)."""
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            backend = torch.distributed.get_backend()
            device = "cuda" if backend == "nccl" else "cpu"
            t = self._state.to(device)
            torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.SUM)
            self._state = t.cpu()

    @torch.no_grad()
    def update(self, pred: Mapping[str, Tensor], batch: Mapping[str, Tensor]) -> None:
        """Add one batch. ``pred[forces]`` [N, 3] and optional ``pred[energy]`` [G] in
        physical units; ``batch`` holds the labels ``forces``, ``fixed``, ``batch``,
        ``natoms`` and (for energy metrics) ``energy``."""
        f_hat = pred[K.OUT_FORCES].detach().to(torch.float64)  # [N, 3]
        f_true = batch[K.FORCES].detach().to(f_hat.device, torch.float64)  # [N, 3]
        if f_hat.shape != f_true.shape:
            raise ValueError(
                f"predicted forces {tuple(f_hat.shape)} vs labels {tuple(f_true.shape)}"
            )
        free = ~batch[K.FIXED].to(f_hat.device, torch.bool)  # [N]
        graph = batch[K.BATCH].to(f_hat.device)  # [N]
        n_graphs = int(batch[K.NATOMS].shape[0])
        abs_err = (f_hat - f_true).abs()  # [N, 3]
        free_err = abs_err[free]  # [M, 3]
        cos = torch.nn.functional.cosine_similarity(f_hat[free], f_true[free], dim=1)  # [M]
        mag = (f_hat[free].norm(dim=1) - f_true[free].norm(dim=1)).abs()  # [M]
        s = torch.zeros_like(self._state)
        s[_IDX["abs_err_x"] : _IDX["abs_err_z"] + 1] = free_err.sum(dim=0).cpu()
        s[_IDX["abs_true"]] = f_true[free].abs().sum().item()
        s[_IDX["cos"]] = cos.sum().item()
        s[_IDX["magnitude"]] = mag.sum().item()
        s[_IDX["n_free_atoms"]] = float(free.sum().item())
        s[_IDX["n_structures"]] = float(n_graphs)
        if K.OUT_ENERGY in pred and K.ENERGY in batch:
            e_err = (
                pred[K.OUT_ENERGY].detach().to(torch.float64).reshape(-1)
                - batch[K.ENERGY].to(f_hat.device, torch.float64).reshape(-1)
            ).abs()  # [G]
            f_max = _free_atom_max_abs_error(abs_err, graph, free, n_graphs)  # [G]
            hits = (e_err < EFWT_ENERGY_THRESHOLD) & (f_max < EFWT_FORCE_THRESHOLD)
            s[_IDX["energy_abs_err"]] = e_err.sum().item()
            s[_IDX["efwt_hits"]] = float(hits.sum().item())
            s[_IDX["n_energy_structures"]] = float(n_graphs)
        if K.TAGS in batch:
            tags = batch[K.TAGS].to(f_hat.device)
            abs_true = f_true.abs()
            cos_all = torch.nn.functional.cosine_similarity(f_hat, f_true, dim=1)  # [N]
            mag_all = (f_hat.norm(dim=1) - f_true.norm(dim=1)).abs()  # [N]
            for g, tag in enumerate(TAG_GROUPS.values()):
                m = free & (tags == tag)
                base = _GROUP0 + g * len(GROUP_FIELDS)
                s[base : base + len(GROUP_FIELDS)] = torch.stack(
                    [
                        abs_err[m].sum(),
                        abs_true[m].sum(),
                        cos_all[m].sum(),
                        mag_all[m].sum(),
                        m.sum().to(torch.float64),
                    ]
                ).cpu()
            m = free & (tags == TAG_GROUPS["adsorbate"])
            z = batch[K.ATOMIC_NUMBERS].to(f_hat.device)[m].long().clamp(0, MAX_Z)
            per = torch.zeros(3, MAX_Z + 1, dtype=torch.float64, device=f_hat.device)
            per[0].index_add_(0, z, abs_err[m].sum(dim=1))
            per[1].index_add_(0, z, abs_true[m].sum(dim=1))
            per[2].index_add_(0, z, torch.ones_like(z, dtype=torch.float64))
            s[_ELEM0:] = per.reshape(-1).cpu()
        self._state += s

    def compute(self) -> dict[str, float]:
        """Dataset-level metrics (see the module docstring); NaN where a count is zero."""
        s = {name: float(self._state[i]) for i, name in enumerate(STATE_FIELDS)}
        n_atoms, n_e = s["n_free_atoms"], s["n_energy_structures"]

        def div(num: float, den: float) -> float:
            return num / den if den > 0 else float("nan")

        out = {
            "forces_mae": div(s["abs_err_x"] + s["abs_err_y"] + s["abs_err_z"], 3 * n_atoms),
            "zero_forces_mae": div(s["abs_true"], 3 * n_atoms),
            "forcesx_mae": div(s["abs_err_x"], n_atoms),
            "forcesy_mae": div(s["abs_err_y"], n_atoms),
            "forcesz_mae": div(s["abs_err_z"], n_atoms),
            "forces_cos": div(s["cos"], n_atoms),
            "forces_magnitude": div(s["magnitude"], n_atoms),
        }
        if n_e > 0:
            out["energy_mae"] = div(s["energy_abs_err"], n_e)
            out["energy_force_within_threshold"] = div(s["efwt_hits"], n_e)
        out["num_structures"] = s["n_structures"]
        out["num_free_atoms"] = n_atoms
        out.update(self._per_tag())
        return out

    def _per_tag(self) -> dict[str, float]:
        """The per-tag and per-adsorbate-element metrics (empty without both tags)."""
        groups = {}
        for g, name in enumerate(TAG_GROUPS):
            base = _GROUP0 + g * len(GROUP_FIELDS)
            groups[name] = dict(
                zip(
                    GROUP_FIELDS, self._state[base : base + len(GROUP_FIELDS)].tolist(), strict=True
                )
            )
        if not all(v["n_free_atoms"] > 0 for v in groups.values()):
            return {}
        out = {}
        for name, v in groups.items():
            n = v["n_free_atoms"]
            out[f"forces_mae_{name}"] = v["abs_err"] / (3 * n)
            out[f"zero_forces_mae_{name}"] = v["abs_true"] / (3 * n)
            out[f"forces_cos_{name}"] = v["cos"] / n
            out[f"forces_magnitude_{name}"] = v["magnitude"] / n
            out[f"num_free_atoms_{name}"] = n
        per = self._state[_ELEM0:].reshape(3, MAX_Z + 1)
        for z in torch.nonzero(per[2] > 0).flatten().tolist():
            n = float(per[2, z])
            out[f"forces_mae_adsorbate_{_symbol(z)}"] = float(per[0, z]) / (3 * n)
            out[f"zero_forces_mae_adsorbate_{_symbol(z)}"] = float(per[1, z]) / (3 * n)
        return out


# --------------------------------------------------------------------------- ADwT


def min_image_distances(
    pred_pos: np.ndarray, true_pos: np.ndarray, cell: np.ndarray, pbc: np.ndarray
) -> np.ndarray:
    """[N] distances (Å) between ``pred_pos`` and ``true_pos`` [N, 3], OC20 minimum image.

    The displacement is expressed in fractional coordinates and, along each periodic
    axis, wrapped into [-0.5, 0.5) (OC20's ``min_diff``; exact for orthogonal cells).
    """
    delta = np.asarray(pred_pos, np.float64) - np.asarray(true_pos, np.float64)  # [N, 3]
    cell = np.asarray(cell, np.float64).reshape(3, 3)
    periodic = np.asarray(pbc, dtype=bool).reshape(3)
    if not periodic.any():
        return np.linalg.norm(delta, axis=1)
    frac = np.linalg.solve(cell.T, delta.T).T  # [N, 3], delta = frac @ cell
    frac[:, periodic] -= np.floor(frac[:, periodic] + 0.5)
    return np.linalg.norm(frac @ cell, axis=1)


def mean_free_distance(
    pred_pos: np.ndarray,
    true_pos: np.ndarray,
    cell: np.ndarray,
    pbc: np.ndarray,
    free_mask: np.ndarray,
) -> float:
    """Mean minimum-image distance (Å) over free atoms: ADwT's per-system distance."""
    free = np.asarray(free_mask, dtype=bool)
    if not free.any():
        raise ValueError("ADwT needs at least one free atom")
    return float(min_image_distances(pred_pos, true_pos, cell, pbc)[free].mean())


def adwt(
    pred_pos: np.ndarray,
    true_pos: np.ndarray,
    cell: np.ndarray,
    pbc: np.ndarray,
    free_mask: np.ndarray,
) -> float:
    """ADwT of one system: fraction of :data:`ADWT_THRESHOLDS` above its mean free distance.

    Averaging this over systems gives OC20's ADwT (the success rate averaged over
    thresholds 0.01..0.499 Å; success means mean distance < threshold, strictly).
    """
    distance = mean_free_distance(pred_pos, true_pos, cell, pbc, free_mask)
    return float(np.mean(distance < ADWT_THRESHOLDS))
