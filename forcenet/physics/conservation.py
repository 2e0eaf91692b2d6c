"""How far a model's forces are from conservative: Jacobian asymmetry and loop work.

A force field is conservative (F = -dE/dx for some energy E) exactly when its Jacobian
J = dF/dx is symmetric (J = -Hessian of E), and then the work around every closed loop
in configuration space is zero. Two measures of the departure, both over the free atoms
only (the ``fixed`` mask of the sample, from ``FixAtoms``), so over the 3 n_free
coordinates a relaxation moves:

* **Jacobian asymmetry** ``lambda = ||J - J^T||_F / (2 ||J||_F)`` of the
  3 n_free x 3 n_free free block: 0 for a conservative field, about 1/sqrt(2) for a
  random matrix, 1 for an antisymmetric one (see :func:`asymmetry`). J comes from
  autograd where the model is differentiable in the positions (direct-force models: one
  backward pass per row; gradient-force models: J = -Hessian by double backward), else
  from central finite differences (:func:`force_jacobian` records which).
* **Loop work** ``W = closed integral of F . dx`` around a small circle of radius r in a
  random 2-D plane of the free coordinates (periodic trapezoid rule, K points), in eV,
  and its normalised form, the in-plane asymmetry (see :func:`loop_work`). Zero for a
  conservative field up to a discretisation error that is spectrally small in K.

Both hold the graph (edges and their periodic images) fixed at the unperturbed
structure: only positions move, so the measured field is the model's own function of
positions, not a mix with neighbor-list switching. The model is evaluated in a copy cast
to the caller's dtype (float64 separates model asymmetry from rounding; float32 is what
the model runs in).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import pandas as pd
import torch
from ase import Atoms
from torch import Tensor, nn

from forcenet.data import keys as K
from forcenet.data.batch import Batch, batch_to, collate
from forcenet.data.dataset import sample_from_atoms
from forcenet.data.frame import check_atoms_geometry, fixed_mask
from forcenet.data.graphs import GraphSettings

JacobianMethod = Literal["autograd", "finite_difference"]
ForceFunction = Callable[[Tensor], Tensor]

#: Columns of :func:`conservation_table`, in order.
TABLE_COLUMNS = [
    "structure",
    "index",
    "n_atoms",
    "n_free",
    "lambda",
    "method",
    "jacobian_norm",
    "loop_work",
    "loop_work_normalised",
    "note",
]


class AutogradUnavailable(RuntimeError):
    """The model's forces cannot be differentiated in the positions by autograd."""


# ----------------------------------------------------------------------------- the field


def measurement_copy(model: nn.Module, dtype: torch.dtype, device: torch.device) -> nn.Module:
    """A copy of ``model`` in eval mode, cast to ``dtype`` on ``device``, with frozen
    parameters (autograd then tracks the positions only); the caller's model is untouched."""
    twin = copy.deepcopy(model).to(device=device, dtype=dtype).eval()
    twin.requires_grad_(False)
    return twin


def structure_batch(
    atoms: Atoms, graph: GraphSettings, dtype: torch.dtype, device: torch.device
) -> Batch:
    """A one-structure batch through the real path (``sample_from_atoms`` -> ``collate``),
    positions and cell cast to ``dtype``; the graph is built here, once."""
    sample = sample_from_atoms(atoms, cutoff=graph.cutoff, max_neighbors=graph.max_neighbors)
    batch = batch_to(collate([sample]), device)
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in batch.items()}


class FreeForces:
    """The model's forces on the free atoms as a function of their coordinates:
    ``x`` [3 n_free] (Å, atom-major) -> ``F`` [3 n_free] (eV/Å).

    Every other field of ``batch`` (fixed atoms' positions, cell, edges) stays as given,
    so the graph is the one built at the unperturbed structure.
    """

    def __init__(self, model: nn.Module, batch: Batch) -> None:
        self.model, self.batch = model, batch
        self.free = torch.nonzero(~batch[K.FIXED]).squeeze(-1)  # [n_free]
        self.x0 = batch[K.POS][self.free].reshape(-1)  # [3 n_free]

    def __call__(self, x: Tensor) -> Tensor:
        pos = self.batch[K.POS].index_put((self.free,), x.reshape(-1, 3))  # [N, 3], out of place
        forces = self.model({**self.batch, K.POS: pos})[K.OUT_FORCES]  # [N, 3]
        return forces[self.free].reshape(-1)


# ----------------------------------------------------------------------------- Jacobian


def jacobian_autograd(fn: ForceFunction, x0: Tensor) -> Tensor:
    """``J[k, l] = dF_k / dx_l`` [n, n] by autograd, one backward pass per row.

    For a gradient-force model the forces must themselves be differentiable (the
    forcenet models keep their force graph when the input positions require grad), so
    this is a double backward and J = -Hessian. Raises :class:`AutogradUnavailable` when
    the forces are not connected to ``x`` or a backward is impossible.
    """
    x = x0.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        f = fn(x)  # [n]
        if not f.requires_grad:
            raise AutogradUnavailable("the forces do not depend on the positions in autograd")
        eye = torch.eye(f.numel(), dtype=f.dtype, device=f.device)
        rows = []
        for k in range(f.numel()):
            try:
                (row,) = torch.autograd.grad(f, x, eye[k], retain_graph=True, allow_unused=True)
            except RuntimeError as exc:  # e.g. a once_differentiable backward
                raise AutogradUnavailable(f"backward through the forces failed: {exc}") from exc
            if row is None:
                raise AutogradUnavailable("the forces do not depend on the positions in autograd")
            rows.append(row)
    return torch.stack(rows).detach()


def jacobian_finite_difference(fn: ForceFunction, x0: Tensor, *, step: float) -> Tensor:
    """``J[k, l] = (F_k(x + h e_l) - F_k(x - h e_l)) / (2 h)`` [n, n], central differences
    with ``step`` h (Å); error O(h^2) plus rounding O(eps |F| / h)."""
    if not step > 0:
        raise ValueError(f"the finite-difference step must be > 0 Å, got {step}")
    x0 = x0.detach()
    cols = []
    with torch.no_grad():
        for k in range(x0.numel()):
            e = torch.zeros_like(x0)
            e[k] = step
            cols.append((fn(x0 + e) - fn(x0 - e)) / (2.0 * step))
    return torch.stack(cols, dim=1)


def force_jacobian(
    fn: ForceFunction, x0: Tensor, *, step: float
) -> tuple[Tensor, JacobianMethod, str]:
    """J [n, n] by autograd, falling back to finite differences (``step`` Å) when
    autograd is impossible; returns (J, method, why autograd was not used or "")."""
    try:
        return jacobian_autograd(fn, x0), "autograd", ""
    except AutogradUnavailable as exc:
        return jacobian_finite_difference(fn, x0, step=step), "finite_difference", str(exc)


def asymmetry(jac: Tensor) -> float:
    """``||J - J^T||_F / (2 ||J||_F)`` in [0, 1]; NaN when J = 0 (forces that do not
    depend on the positions have no asymmetry to measure)."""
    norm = float(torch.linalg.matrix_norm(jac))
    if not norm > 0:
        return math.nan
    return float(torch.linalg.matrix_norm(jac - jac.T)) / (2.0 * norm)


# ----------------------------------------------------------------------------- loop work


@dataclass(frozen=True)
class LoopWork:
    """One loop: ``work`` W (eV) and ``normalised`` = |W| / (sqrt(2) pi r^2 ||B||_F)."""

    work: float
    normalised: float


def random_plane(n: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """Two orthonormal directions u, v [n] (float64, CPU) spanning a uniformly random plane."""
    if n < 2:
        raise ValueError(f"a loop needs at least 2 free coordinates, got {n}")
    q, _ = torch.linalg.qr(torch.randn(n, 2, generator=generator, dtype=torch.float64))
    return q[:, 0], q[:, 1]


def loop_work(
    fn: ForceFunction, x0: Tensor, u: Tensor, v: Tensor, *, radius: float, points: int
) -> LoopWork:
    """Work of the force around the circle x(t) = x0 + r (cos t u + sin t v).

    ``W = (2 pi / K) sum_k F(x(t_k)) . x'(t_k)``, t_k = 2 pi k / K (periodic trapezoid
    rule; spectrally accurate for a smooth field). For a field linear over the loop,
    W = pi r^2 (B_vu - B_uv) exactly, where B = [[u.J u, u.J v], [v.J u, v.J v]] is the
    in-plane block of J; B is read off the same samples (first Fourier modes of u.F and
    v.F), and ``normalised`` = |W| / (sqrt(2) pi r^2 ||B||_F) = ||B - B^T||_F / (2 ||B||_F)
    is the loop's own asymmetry, in [0, 1] like lambda and comparable between models and
    structures (NaN when B = 0). ``u``, ``v``: orthonormal [n]; ``radius`` r in Å.

    The trapezoid error is spectral only where the field is smooth on the loop: where an
    edge crosses a cutoff that is only C^1 (SchNet's cosine cutoff) it falls as K^-2, so a
    conservative model then shows |W| ~ 1e-9 eV (normalised ~ 1e-7) at K = 16, r = 0.02 Å.
    """
    if points < 4:
        raise ValueError(f"a loop needs at least 4 points, got {points}")
    if not radius > 0:
        raise ValueError(f"the loop radius must be > 0 Å, got {radius}")
    x0 = x0.detach()
    theta = torch.arange(points, dtype=torch.float64) * (2.0 * math.pi / points)  # [K]
    c, s = torch.cos(theta), torch.sin(theta)  # [K]
    path = radius * (c[:, None] * u + s[:, None] * v)  # [K, n] float64 displacements
    with torch.no_grad():
        forces = torch.stack([fn(x0 + d.to(x0)) for d in path.to(x0.device)])  # [K, n]
    forces = forces.to(device="cpu", dtype=torch.float64)
    a, b = forces @ u, forces @ v  # [K] in-plane components
    work = (2.0 * math.pi / points) * radius * float((c * b - s * a).sum())
    scale = 2.0 / (points * radius)
    block = scale * torch.stack([(a * c).sum(), (a * s).sum(), (b * c).sum(), (b * s).sum()])
    norm = float(block.norm())  # ||B||_F, eV/Å^2
    normalised = abs(work) / (math.sqrt(2.0) * math.pi * radius**2 * norm) if norm > 0 else math.nan
    return LoopWork(work=work, normalised=normalised)


# ----------------------------------------------------------------------------- per structure


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else math.nan


def structure_row(
    fn: FreeForces,
    *,
    step: float,
    radius: float,
    points: int,
    loops: int,
    generator: torch.Generator,
) -> dict[str, object]:
    """lambda, method, ||J||_F (eV/Å^2) and the loop work of one structure (row fields)."""
    jac, method, why = force_jacobian(fn, fn.x0, step=step)
    lam = asymmetry(jac)
    planes = [random_plane(fn.x0.numel(), generator) for _ in range(loops)]
    works = [loop_work(fn, fn.x0, u, v, radius=radius, points=points) for u, v in planes]
    notes = [why] if why else []
    if math.isnan(lam):
        notes.append("J = 0: the forces do not depend on the positions")
    return {
        "n_free": int(fn.free.numel()),
        "lambda": lam,
        "method": method,
        "jacobian_norm": float(torch.linalg.matrix_norm(jac)),
        "loop_work": _mean([abs(w.work) for w in works]),
        "loop_work_normalised": _mean([w.normalised for w in works]),
        "note": "; ".join(notes),
    }


def conservation_table(
    model: nn.Module,
    structures: Sequence[Atoms],
    *,
    graph: GraphSettings,
    names: Sequence[str] | None = None,
    dtype: torch.dtype = torch.float64,
    device: str | torch.device = "cpu",
    step: float = 1e-3,
    radius: float = 0.02,
    points: int = 16,
    loops: int = 4,
    seed: int = 0,
) -> pd.DataFrame:
    """One row per structure (columns :data:`TABLE_COLUMNS`): lambda, the Jacobian method,
    ||J||_F (eV/Å^2), the mean |W| (eV) and mean normalised work over ``loops`` random
    planes, and a note (why autograd was not used, or J = 0).

    ``model``: a forcenet model (e.g. from :func:`forcenet.checkpoint.load_model`),
    evaluated in a copy cast to ``dtype`` on ``device``. ``structures``: ``ase.Atoms`` with
    ``FixAtoms`` constraints and tags; ``graph``: the cutoff and neighbor count the model
    was trained with (the checkpoint's ``graph``). ``step``: finite-difference step (Å),
    used only without autograd; ``radius`` (Å) and ``points``: the loop; ``seed``: the
    random planes. A structure without free atoms is a ValueError naming it.
    """
    names = list(names) if names is not None else [f"structure {k}" for k in range(len(structures))]
    if len(names) != len(structures):
        raise ValueError(f"{len(names)} names for {len(structures)} structures")
    for name, atoms in zip(names, structures, strict=True):  # refuse before any work
        check_atoms_geometry(atoms, name)
        if fixed_mask(atoms).all():
            raise ValueError(f"{name}: no free atoms (all {len(atoms)} fixed by FixAtoms)")
    target = torch.device(device)
    twin = measurement_copy(model, dtype, target)
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for index, (name, atoms) in enumerate(zip(names, structures, strict=True)):
        fn = FreeForces(twin, structure_batch(atoms, graph, dtype, target))
        row = structure_row(
            fn, step=step, radius=radius, points=points, loops=loops, generator=generator
        )
        rows.append({"structure": name, "index": index, "n_atoms": len(atoms), **row})
    return pd.DataFrame(rows, columns=TABLE_COLUMNS)


def conservation_summary(table: pd.DataFrame) -> dict[str, float]:
    """Mean and median of lambda and of the (normalised) loop work over the structures
    (NaN rows, J = 0, are left out), and the structure count."""
    return {
        "structures": float(len(table)),
        "lambda_mean": float(table["lambda"].mean()),
        "lambda_median": float(table["lambda"].median()),
        "loop_work_mean": float(table["loop_work"].mean()),
        "loop_work_normalised_mean": float(table["loop_work_normalised"].mean()),
        "loop_work_normalised_median": float(table["loop_work_normalised"].median()),
    }
