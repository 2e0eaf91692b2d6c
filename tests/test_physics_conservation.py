"""Non-conservativeness of forces (forcenet.physics.conservation): the Jacobian asymmetry
lambda and the work around small loops are exact on a linear field, ~0 for energy-gradient
models, clearly non-zero for direct-force models; and the CLI table."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from ase import Atoms
from ase.build import add_adsorbate, fcc111
from ase.constraints import FixAtoms
from ase.io import write
from tiny import CUTOFF, MAX_NEIGHBORS, save_model_checkpoint, tiny_kwargs
from torch import Tensor, nn
from typer.testing import CliRunner

from forcenet.checkpoint import build_scaled_model
from forcenet.cli import app
from forcenet.data import keys as K
from forcenet.data.graphs import GraphSettings
from forcenet.geometry import edge_vectors
from forcenet.nn import energy_and_forces
from forcenet.physics import conservation as C

GRAPH = GraphSettings(cutoff=CUTOFF, max_neighbors=MAX_NEIGHBORS)
CPU = torch.device("cpu")


def slab(seed: int) -> Atoms:
    """Cu(111) 2x2x2 + O (9 atoms): bottom layer fixed (tag 0), 5 free atoms, rattled."""
    atoms = fcc111("Cu", size=(2, 2, 2), vacuum=6.0)
    layer = atoms.get_tags()  # ASE: 1 = top layer
    n_slab = len(atoms)
    add_adsorbate(atoms, "O", 1.6, "fcc")
    tags = np.full(len(atoms), 2)
    tags[:n_slab] = np.where(layer == 1, 1, 0)
    atoms.set_tags(tags)
    atoms.set_constraint(FixAtoms(indices=np.flatnonzero(tags == 0)))
    atoms.pbc = True
    atoms.rattle(0.05, seed=seed)
    atoms.info.pop("adsorbate_info", None)  # not storable in extxyz
    return atoms


def tiny_model(name: str, seed: int = 0, **overrides) -> nn.Module:
    """A tiny random ScaledModel; zero-initialised weight matrices (DimeNet++'s output
    layers) redrawn so the forces depend on the positions, unless ``keep_zeros``."""
    keep_zeros = overrides.pop("keep_zeros", False)
    torch.manual_seed(seed)
    model = build_scaled_model(name, tiny_kwargs(name, **overrides))
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2 and not p.any() and not keep_zeros:
                p.normal_(0.0, p.shape[1] ** -0.5)
    return model.eval()


class MorsePairs(nn.Module):
    """E = sum over the graph's edges of D/2 (1 - exp(-a (d - d0)))^2 (each pair counted
    twice), forces -dE/dx: an analytic conservative field, smooth on a fixed graph."""

    energy_from_gradient = True

    def forward(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        return energy_and_forces(self.energy, batch, training=False)

    def energy(self, batch: dict[str, Tensor], pos: Tensor) -> Tensor:
        vec = edge_vectors(
            pos, batch[K.CELL], batch[K.BATCH], batch[K.EDGE_INDEX], batch[K.CELL_OFFSETS]
        )
        pair = 0.5 * 0.4 * (1.0 - torch.exp(-1.5 * (vec.norm(dim=-1) - 2.6))) ** 2  # [E] eV
        graph = batch[K.BATCH].index_select(0, batch[K.EDGE_INDEX][1])
        return pair.new_zeros(batch[K.NATOMS].shape[0]).index_add(0, graph, pair)


class LinearForces(nn.Module):
    """F = A (x - x_ref) + F_ref over all 3N coordinates of one structure: J = A exactly."""

    energy_from_gradient = False

    def __init__(self, a: Tensor, x_ref: Tensor) -> None:
        super().__init__()
        self.register_buffer("a", a)
        self.register_buffer("x_ref", x_ref)

    def forward(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        x = batch[K.POS].reshape(-1)
        return {K.OUT_FORCES: (self.a @ (x - self.x_ref) + 0.3).reshape(-1, 3)}


class Detached(nn.Module):
    """``inner``'s forces cut off from autograd, as a model without a backward would be."""

    energy_from_gradient = False

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        return {K.OUT_FORCES: self.inner(batch)[K.OUT_FORCES].detach()}


def free_forces(model: nn.Module, atoms: Atoms) -> C.FreeForces:
    twin = C.measurement_copy(model, torch.float64, CPU)
    return C.FreeForces(twin, C.structure_batch(atoms, GRAPH, torch.float64, CPU))


def test_linear_field_gives_the_exact_asymmetry_and_loop_work():
    atoms = slab(1)
    n = 3 * len(atoms)
    gen = torch.Generator().manual_seed(3)
    a = torch.randn(n, n, generator=gen, dtype=torch.float64)
    a = a + a.T + 0.4 * (a - a.T)  # symmetric plus a known antisymmetric part
    x_ref = torch.as_tensor(atoms.positions.astype(np.float32).reshape(-1), dtype=torch.float64)
    fn = free_forces(LinearForces(a, x_ref), atoms)
    coords = (3 * fn.free[:, None] + torch.arange(3)).reshape(-1)  # free coordinates
    block = a[coords][:, coords]  # [15, 15] free-free block of J

    jac, method, _ = C.force_jacobian(fn, fn.x0, step=1e-3)
    assert method == "autograd"
    torch.testing.assert_close(jac, block, rtol=0, atol=1e-12)
    expected = float(torch.linalg.matrix_norm(block - block.T) / (2 * block.norm()))
    assert C.asymmetry(jac) == pytest.approx(expected, rel=1e-12)
    fd = C.jacobian_finite_difference(fn, fn.x0, step=1e-2)  # exact for a linear field
    torch.testing.assert_close(fd, block, rtol=0, atol=1e-10)

    u, v = C.random_plane(len(coords), gen)
    radius = 0.02
    loop = C.loop_work(fn, fn.x0, u, v, radius=radius, points=8)
    # Stokes: W = area * v.(J - J^T) u; normalised = the in-plane asymmetry
    assert loop.work == pytest.approx(math.pi * radius**2 * float(v @ (block - block.T) @ u))
    b = torch.stack(
        [torch.stack([u @ block @ u, u @ block @ v]), torch.stack([v @ block @ u, v @ block @ v])]
    )
    in_plane = float(torch.linalg.matrix_norm(b - b.T) / (2 * b.norm()))
    assert loop.normalised == pytest.approx(in_plane, rel=1e-9)


@pytest.mark.parametrize("name", ["schnet", "dimenetpp", "morse"])
def test_energy_gradient_forces_are_conservative(name):
    model = MorsePairs() if name == "morse" else tiny_model(name)
    table = C.conservation_table(model, [slab(1), slab(2)], graph=GRAPH, dtype=torch.float64)
    assert list(table["method"]) == ["autograd"] * 2  # J = -Hessian by double backward
    assert (table["n_free"] == 5).all() and (table["jacobian_norm"] > 1.0).all()
    assert (table["lambda"] < 1e-6).all(), table["lambda"]
    # ~0 up to the trapezoid error (algebraic, ~1e-7 normalised, where an edge crosses
    # SchNet's C^1 cutoff on the loop; spectral, ~1e-12, elsewhere)
    assert (table["loop_work_normalised"] < 1e-5).all(), table["loop_work_normalised"]
    assert (table["loop_work"] < 1e-7).all()


@pytest.mark.parametrize("name", ["forcenet", "gns"])
def test_direct_forces_are_not_conservative(name):
    # an untrained direct model: its Jacobian is about as asymmetric as a random matrix
    model = tiny_model(name, zero_init_decoder=False)
    table = C.conservation_table(model, [slab(1), slab(2)], graph=GRAPH, dtype=torch.float64)
    assert list(table["method"]) == ["autograd"] * 2
    assert (table["lambda"] > 0.1).all(), table["lambda"]
    assert (table["loop_work_normalised"] > 1e-2).all(), table["loop_work_normalised"]
    assert (table["loop_work"] > 1e-7).all()  # eV; about 1e-12 for the gradient models
    summary = C.conservation_summary(table)
    assert summary["structures"] == 2 and summary["lambda_median"] > 0.1


def test_autograd_and_finite_differences_agree_for_forcenet():
    fn = free_forces(tiny_model("forcenet", zero_init_decoder=False), slab(1))
    exact = C.jacobian_autograd(fn, fn.x0)
    approx = C.jacobian_finite_difference(fn, fn.x0, step=1e-3)
    torch.testing.assert_close(approx, exact, rtol=0, atol=1e-6 * float(exact.abs().max()))
    assert C.asymmetry(approx) == pytest.approx(C.asymmetry(exact), abs=1e-6)


def test_forces_without_a_backward_fall_back_to_finite_differences():
    inner = tiny_model("forcenet", zero_init_decoder=False)
    both = [
        C.conservation_table(m, [slab(1)], graph=GRAPH, step=1e-3, loops=1)
        for m in (inner, Detached(inner))
    ]
    assert both[0]["method"][0] == "autograd"
    assert both[1]["method"][0] == "finite_difference"
    assert "autograd" in both[1]["note"][0]
    assert both[1]["lambda"][0] == pytest.approx(both[0]["lambda"][0], abs=1e-6)
    assert both[1]["loop_work"][0] == pytest.approx(both[0]["loop_work"][0], rel=1e-9)


def test_forces_that_ignore_the_positions_have_no_asymmetry():
    # zero_init_decoder: the untrained ForceNet predicts F = 0 everywhere, so J = 0
    model = tiny_model("forcenet", zero_init_decoder=True, keep_zeros=True)
    row = C.conservation_table(model, [slab(1)], graph=GRAPH, loops=1).iloc[0]
    assert row["jacobian_norm"] == 0.0
    assert math.isnan(row["lambda"]) and math.isnan(row["loop_work_normalised"])
    assert "J = 0" in row["note"]


def test_a_structure_without_free_atoms_is_refused():
    atoms = slab(1)
    atoms.set_constraint(FixAtoms(indices=range(len(atoms))))
    with pytest.raises(ValueError, match="frozen.xyz:0: no free atoms"):
        C.conservation_table(MorsePairs(), [atoms], graph=GRAPH, names=["frozen.xyz:0"])


def write_checkpoint(path: Path, name: str, **overrides) -> None:
    kwargs = tiny_kwargs(name, **overrides)
    model = tiny_model(name, **overrides)
    save_model_checkpoint(path, name, model, kwargs, cutoff=CUTOFF, max_neighbors=MAX_NEIGHBORS)


def test_cli_writes_one_row_per_structure(tmp_path):
    ckpt = tmp_path / "forcenet.pt"
    write_checkpoint(ckpt, "forcenet", zero_init_decoder=False)
    write(tmp_path / "a_initial.extxyz", [slab(1), slab(2)], format="extxyz")
    write(tmp_path / "b_initial.extxyz", [slab(3), slab(4)], format="extxyz")
    out, metrics = tmp_path / "conservation.parquet", tmp_path / "conservation.json"
    args = ["physics", "conservation", str(ckpt), str(tmp_path / "a_initial.extxyz")]
    args += [str(tmp_path / "b_initial.extxyz"), "--out", str(out), "--structures", "3"]
    args += ["--metrics-json", str(metrics), "--loops", "1", "--device", "cpu"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    table = pd.read_parquet(out)
    assert list(table["structure"]) == [
        "a_initial.extxyz:0",
        "a_initial.extxyz:1",
        "b_initial.extxyz:0",
    ]
    assert (table["model"] == "forcenet").all() and (table["n_free"] == 5).all()
    assert (table["lambda"] > 0.1).all()
    summary = json.loads(metrics.read_text())["conservation"]
    assert summary["structures"] == 3
    assert summary["lambda_median"] == pytest.approx(float(table["lambda"].median()))
    assert "lambda mean" in result.output


def test_cli_names_an_unreadable_file(tmp_path):
    ckpt = tmp_path / "schnet.pt"
    write_checkpoint(ckpt, "schnet")
    bad = tmp_path / "broken.extxyz"
    bad.write_text("this is not\nan extxyz file\n")
    args = ["physics", "conservation", str(ckpt), str(bad), "--out", str(tmp_path / "t.parquet")]
    result = CliRunner().invoke(app, args)
    assert result.exit_code != 0
    assert isinstance(result.exception, ValueError) and "broken.extxyz" in str(result.exception)
    assert not (tmp_path / "t.parquet").exists()


def test_a_nan_cell_is_refused_naming_file_and_structure(tmp_path):
    """A NaN cell reached the neighbor search (SIGFPE), in the library and the CLI."""
    atoms = slab(1)
    atoms.cell[0, 1] = np.nan
    with pytest.raises(ValueError, match=r"bad.xyz:0: cell contains NaN"):
        C.conservation_table(MorsePairs(), [atoms], graph=GRAPH, names=["bad.xyz:0"])
    ckpt = tmp_path / "schnet.pt"
    write_checkpoint(ckpt, "schnet")
    path = tmp_path / "cells.extxyz"
    write(path, [slab(2), atoms], format="extxyz")
    args = ["physics", "conservation", str(ckpt), str(path), "--out", str(tmp_path / "t.parquet")]
    result = CliRunner().invoke(app, args)
    assert isinstance(result.exception, ValueError), result.output
    assert "cells.extxyz: structure 1: cell contains NaN" in str(result.exception)
    assert not (tmp_path / "t.parquet").exists()
