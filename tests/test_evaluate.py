"""Evaluation end to end on tiny stores and files, with stand-in models of known symmetry."""

from __future__ import annotations

import json

import ase.io
import numpy as np
import pandas as pd
import pytest
import torch
from ase.build import add_adsorbate, fcc111
from ase.calculators.singlepoint import SinglePointCalculator
from ase.constraints import FixAtoms
from tiny import write_stores
from torch import nn

from forcenet import evaluate as ev
from forcenet import tables
from forcenet.data import keys as K
from forcenet.data.frame import Frame
from forcenet.data.graphs import GraphSettings
from forcenet.geometry import edge_vectors

CUTOFF, MAX_NEIGHBORS = 4.0, 30
GRAPH = {"cutoff": CUTOFF, "max_neighbors": MAX_NEIGHBORS}
SETTINGS = GraphSettings(CUTOFF, MAX_NEIGHBORS)


class PairForces(nn.Module):
    """F_i = (sum_j exp(-d_ij) v_ij) @ A, E = sum_edges exp(-d)/2 per structure.

    With A = identity every force is a sum of edge vectors: exactly rotation covariant.
    With A = diag(1, 2, 3) the frame axes matter, so it is not.
    """

    energy_from_gradient = False

    def __init__(self, matrix: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("matrix", matrix.to(torch.float32))

    def forward(self, batch):
        v = edge_vectors(
            batch[K.POS], batch[K.CELL], batch[K.BATCH], batch[K.EDGE_INDEX], batch[K.CELL_OFFSETS]
        )  # [E, 3]
        w = torch.exp(-v.norm(dim=1))  # [E]
        centre = batch[K.EDGE_INDEX][1]
        forces = torch.zeros_like(batch[K.POS]).index_add_(0, centre, w[:, None] * v)
        energy = torch.zeros(len(batch[K.NATOMS]), dtype=w.dtype, device=w.device)
        energy = energy.index_add_(0, batch[K.BATCH][centre], 0.5 * w)
        return {K.OUT_FORCES: forces @ self.matrix, K.OUT_ENERGY: energy}


COVARIANT = PairForces(torch.eye(3))
NOT_COVARIANT = PairForces(torch.diag(torch.tensor([1.0, 2.0, 3.0])))


def _frames(n: int, seed: int) -> list[Frame]:
    rng = np.random.default_rng(seed)
    out = []
    for k in range(n):
        slab = fcc111("Cu", size=(2, 2, 2), vacuum=5.0)
        add_adsorbate(slab, "O", 1.8, "fcc")
        slab.rattle(0.05, seed=seed + k)
        tags = np.where(slab.get_tags() == 2, 0, 1)  # bottom layer sub-surface
        tags[-1] = 2  # the adsorbate
        m = len(slab)
        out.append(
            Frame(
                atomic_numbers=slab.numbers.astype(np.int64),
                pos=slab.positions,
                cell=slab.cell.array,
                pbc=np.array([True, True, True]),
                tags=tags.astype(np.int64),
                fixed=tags == 0,
                forces=rng.normal(scale=0.5, size=(m, 3)),
                total_energy=float(rng.normal(-10, 1)),
                reference_energy=-9.0,
                sid=100 + k,
                fid=k,
            )
        )
    return out


@pytest.fixture(scope="module")
def lmdb_split(tmp_path_factory):
    """data/lmdb/val_id and data/graphs/val_id built through the real data path."""

    root = tmp_path_factory.mktemp("data")
    frames = _frames(5, seed=0)
    write_stores(root, frames, cutoff=CUTOFF, max_neighbors=MAX_NEIGHBORS, split="val_id")
    return root / "lmdb" / "val_id", frames


@pytest.fixture(scope="module")
def extxyz_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("ase") / "my_relax.extxyz"
    images = []
    for frame in _frames(3, seed=7):
        atoms = ase.Atoms(frame.atomic_numbers, positions=frame.pos, cell=frame.cell, pbc=True)
        atoms.set_tags(frame.tags)
        atoms.set_constraint(FixAtoms(mask=frame.fixed))
        atoms.info["reference_energy"] = frame.reference_energy
        atoms.calc = SinglePointCalculator(atoms, energy=frame.total_energy, forces=frame.forces)
        images.append(atoms)
    ase.io.write(path, images, format="extxyz")
    return path, _frames(3, seed=7)


def _free_forces(frames):
    return np.concatenate([f.forces[~f.fixed] for f in frames])


def test_lmdb_split_long_table_predictions_and_json(lmdb_split, tmp_path):
    split_dir, frames = lmdb_split
    out, preds, js = tmp_path / "m.parquet", tmp_path / "p.parquet", tmp_path / "m.json"
    table = ev.evaluate_files(
        COVARIANT,
        [split_dir],
        model_name="pair",
        settings=SETTINGS,
        graphs=split_dir.parent.parent / "graphs",
        batch_size=2,
        device="cpu",
        predictions=preds,
    )
    tables.write_table(table, out)
    tables.write_metrics_json(table, js)
    on_disk = pd.read_parquet(out)
    assert list(on_disk.columns) == tables.TABLE_COLUMNS
    pd.testing.assert_frame_equal(on_disk, table)
    got = dict(zip(table.metric, table.value, strict=True))
    assert set(table.split) == {"val_id"} and set(table.run_id) == {""}
    # zero baseline = mean |F| component over free atoms, straight from the frames
    assert got["zero_forces_mae"] == pytest.approx(np.abs(_free_forces(frames)).mean(), rel=1e-5)
    assert got["num_structures"] == 5
    # the per-atom predictions reproduce the table's force MAE and carry the labels
    p = pd.read_parquet(preds)
    assert len(p) == sum(f.natoms for f in frames)
    free = p[~p.fixed]
    err = np.abs(
        free[["pred_fx", "pred_fy", "pred_fz"]].to_numpy() - free[["fx", "fy", "fz"]].to_numpy()
    )
    assert got["forces_mae"] == pytest.approx(err.mean(), rel=1e-5)
    row = p[(p.sid == 102) & (p.atom == 3)].iloc[0]
    np.testing.assert_allclose(
        row[["fx", "fy", "fz"]].to_numpy(float), frames[2].forces[3], rtol=1e-6
    )
    assert row.atomic_number == frames[2].atomic_numbers[3] and row.tag == frames[2].tags[3]
    # energy metrics exist for a model with an energy; referenced energy is the label
    assert 0 <= got["energy_force_within_threshold"] <= 1 and got["energy_mae"] > 0
    assert (
        got["inference_graphs_per_s"] > 0
        and got["inference_atoms_per_s"] > got["inference_graphs_per_s"]
    )
    assert got["rotation_covariance_mae"] < 1e-5  # exactly covariant up to float32 noise
    assert json.loads(js.read_text())["val_id"]["forces_mae"] == pytest.approx(got["forces_mae"])
    assert not list(tmp_path.glob(".*tmp"))  # no temporary files left behind


def test_rotation_covariance_separates_models(lmdb_split, tmp_path):
    split_dir, _ = lmdb_split
    values = {}
    for name, model in (("cov", COVARIANT), ("notcov", NOT_COVARIANT)):
        table = ev.evaluate_files(
            model,
            [split_dir],
            model_name=name,
            settings=SETTINGS,
            graphs=split_dir.parent.parent / "graphs",
            batch_size=3,
            device="cpu",
            rotation=ev.RotationCheck(samples=3),
        )
        values[name] = table.set_index("metric").value
    assert values["cov"]["rotation_covariance_mae"] < 1e-5
    assert values["notcov"]["rotation_covariance_mae"] > 1e-2
    # same magnitude scale as forces_mae: the covariance error is a meaningful eV/Å number
    assert values["notcov"]["rotation_covariance_mae"] < 10 * values["notcov"]["forces_mae"]


def test_rotate_batch_keeps_edge_lengths(lmdb_split):
    from forcenet.data.batch import collate
    from forcenet.data.dataset import FrameDataset
    from forcenet.geometry import random_rotation, rotate_batch

    split_dir, _ = lmdb_split
    ds = FrameDataset(split_dir, split_dir.parent.parent / "graphs" / "val_id")
    batch = collate([ds[0], ds[1]])
    rot = random_rotation(torch.Generator().manual_seed(3))
    r = rotate_batch(batch, rot)
    args = (K.BATCH, K.EDGE_INDEX, K.CELL_OFFSETS)
    v0 = edge_vectors(batch[K.POS], batch[K.CELL], *(batch[a] for a in args))
    v1 = edge_vectors(r[K.POS], r[K.CELL], *(r[a] for a in args))
    np.testing.assert_allclose(v1.numpy(), (v0 @ rot.float()).numpy(), atol=1e-4)
    np.testing.assert_allclose(
        r[K.FORCES].numpy(), (batch[K.FORCES] @ rot.float()).numpy(), atol=1e-6
    )
    assert not np.allclose(v1.numpy(), v0.numpy(), atol=1e-2)  # it did rotate


def test_graph_store_with_other_cutoff_is_refused(lmdb_split, tmp_path):
    split_dir, _ = lmdb_split
    with pytest.raises(ValueError, match="cutoff"):
        ev.evaluate_files(
            COVARIANT,
            [split_dir],
            model_name="pair",
            settings=GraphSettings(6.0, MAX_NEIGHBORS),
            graphs=split_dir.parent.parent / "graphs",
            device="cpu",
            predictions=tmp_path / "x.parquet",
        )
    assert not list(tmp_path.iterdir())  # refused before any output was started


def test_checkpoint_on_extxyz_file(extxyz_file, tmp_path):
    from forcenet.checkpoint import build_scaled_model, save_checkpoint

    path, frames = extxyz_file
    kwargs = {"hidden_channels": 8, "num_interactions": 1, "mlp_layers": 1, "cutoff": CUTOFF}
    torch.manual_seed(0)
    model = build_scaled_model("gns", kwargs)
    ckpt_dir = tmp_path / "ckpt"
    ckpt_dir.mkdir()
    save_checkpoint(
        ckpt_dir / "best.pt",
        {
            "format_version": 1,
            "model_name": "gns",
            "model_kwargs": kwargs,
            "model_state": model.state_dict(),
            "step": 0,
            "epoch": 0,
            "graph": GRAPH,
        },
    )
    table = ev.evaluate_checkpoint(ckpt_dir / "best.pt", [path], batch_size=2, device="cpu")
    got = table.set_index("metric").value
    assert set(table.split) == {"my_relax"} and set(table.model) == {"gns"}
    assert got["zero_forces_mae"] == pytest.approx(np.abs(_free_forces(frames)).mean(), rel=1e-5)
    assert got["num_structures"] == 3
    assert "energy_mae" not in got  # GNS predicts forces only
    assert got["rotation_covariance_mae"] > 0  # GNS is not covariant by construction


def test_ase_file_without_forces_names_file_and_frame(tmp_path):
    atoms = fcc111("Cu", size=(2, 2, 2), vacuum=5.0)
    path = tmp_path / "nolabels.extxyz"
    ase.io.write(path, [atoms], format="extxyz")
    with pytest.raises(ValueError, match=r"nolabels.extxyz: frame 0"):
        ev.evaluate_files(COVARIANT, [path], model_name="pair", settings=SETTINGS, device="cpu")


def test_metrics_do_not_depend_on_batch_size(lmdb_split, tmp_path):
    split_dir, _ = lmdb_split
    tables = [
        ev.evaluate_files(
            NOT_COVARIANT,
            [split_dir],
            model_name="m",
            settings=SETTINGS,
            graphs=split_dir.parent.parent / "graphs",
            device="cpu",
            batch_size=b,
            rotation=ev.RotationCheck(samples=1),
        )
        .set_index("metric")
        .value
        for b in (1, 5)
    ]
    for name in ("forces_mae", "forces_cos", "forces_magnitude", "energy_mae", "zero_forces_mae"):
        assert tables[0][name] == pytest.approx(tables[1][name], rel=1e-6), name


def test_truncated_ase_file_names_the_bad_frame(extxyz_file, tmp_path):
    src, _ = extxyz_file
    text = src.read_text().splitlines()
    bad = tmp_path / "broken.extxyz"
    n_atoms = int(text[0])
    bad.write_text("\n".join(text[: 2 * (n_atoms + 2) + 3]) + "\n")  # frame 2 cut short
    with pytest.raises(ValueError, match=r"broken.extxyz: frame 2"):
        ev.evaluate_files(
            COVARIANT,
            [bad],
            model_name="pair",
            settings=SETTINGS,
            device="cpu",
            batch_size=1,
            predictions=tmp_path / "x.parquet",
        )
    assert not (tmp_path / "x.parquet").exists() and not list(tmp_path.glob(".*tmp"))


def test_each_split_prints_one_progress_line(lmdb_split, capsys):
    split_dir, _ = lmdb_split
    ev.evaluate_files(
        COVARIANT,
        [split_dir],
        model_name="pair",
        settings=SETTINGS,
        graphs=split_dir.parent.parent / "graphs",
        device="cpu",
    )
    (line,) = [x for x in capsys.readouterr().out.splitlines() if x.startswith("evaluate pair")]
    assert line.startswith("evaluate pair: val_id, 5 structures, force MAE ")


def _labelled(path, frames, edit=None):
    """``frames`` as an extxyz file with labels; ``edit(k, atoms)`` may damage frame k."""
    images = []
    for k, frame in enumerate(frames):
        atoms = ase.Atoms(frame.atomic_numbers, positions=frame.pos, cell=frame.cell, pbc=True)
        atoms.set_constraint(FixAtoms(mask=frame.fixed))
        forces = frame.forces.copy()
        if edit is not None:
            edit(k, atoms, forces)
        atoms.calc = SinglePointCalculator(atoms, energy=frame.total_energy, forces=forces)
        images.append(atoms)
    ase.io.write(path, images, format="extxyz")
    return path


def _evaluate(paths, **options):
    return ev.evaluate_files(
        COVARIANT, paths, model_name="pair", settings=SETTINGS, device="cpu", **options
    )


def test_ase_file_with_a_non_finite_force_is_refused_naming_file_and_frame(tmp_path):
    """A NaN force label on a free atom made every force metric NaN (exit 0)."""
    frames = _frames(3, seed=1)
    free = int(np.flatnonzero(~frames[1].fixed)[0])

    def damage(k, atoms, forces):
        if k == 1:
            forces[free, 0] = np.nan

    path = _labelled(tmp_path / "labels.extxyz", frames, damage)
    with pytest.raises(ValueError, match=r"labels.extxyz: frame 1: forces contain NaN or inf"):
        _evaluate([path], predictions=tmp_path / "p.parquet")
    assert not (tmp_path / "p.parquet").exists()


@pytest.mark.parametrize("field", ["cell", "pos"])
def test_ase_file_with_a_nan_cell_or_position_is_refused_naming_file_and_frame(tmp_path, field):
    """A NaN cell reached the neighbor search and killed the process (SIGFPE)."""

    def damage(k, atoms, forces):
        if k == 2 and field == "cell":
            atoms.cell[0, 0] = np.nan
        elif k == 2:
            atoms.positions[3, 1] = np.nan

    path = _labelled(tmp_path / "geom.extxyz", _frames(3, seed=2), damage)
    message = "cell contains NaN" if field == "cell" else r"positions contain NaN or inf \(atom 3\)"
    with pytest.raises(ValueError, match=rf"geom.extxyz: frame 2: {message}"):
        _evaluate([path])


def test_an_ase_file_without_structures_is_a_one_line_error(tmp_path):
    empty = tmp_path / "empty.extxyz"
    empty.write_text("")
    with pytest.raises(ValueError, match=r"empty.extxyz: empty file \(no structures\)"):
        _evaluate([empty])
    blank = tmp_path / "blank.extxyz"
    blank.write_text("\n\n")
    with pytest.raises(ValueError, match=r"blank.extxyz: no structures in the file"):
        _evaluate([blank])


def test_inputs_with_the_same_split_name_are_refused(lmdb_split, tmp_path):
    """a/val.extxyz and b/val.extxyz (or one LMDB split twice) would make one split, one
    input's structures hidden by the other's: refused, naming both inputs and the split."""
    frames = _frames(3, seed=3)
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    a = _labelled(tmp_path / "a" / "val.extxyz", frames)
    b = _labelled(tmp_path / "b" / "val.extxyz", frames[:2])
    with pytest.raises(ValueError, match=r"a/val.extxyz and .*b/val.extxyz both give split 'val'"):
        _evaluate([a, b])
    split_dir, _ = lmdb_split
    with pytest.raises(ValueError, match="both give split 'val_id'"):
        _evaluate([split_dir, split_dir], graphs=split_dir.parent.parent / "graphs")


def test_an_input_named_training_is_refused(tmp_path):
    """Its rows would merge with the rows that describe the training run."""
    path = _labelled(tmp_path / "training.extxyz", _frames(2, seed=4))
    with pytest.raises(ValueError, match="split name 'training' is reserved"):
        _evaluate([path])


def test_a_fifo_input_is_refused_not_read(tmp_path):
    from tiny import fifo_fed_once

    with fifo_fed_once(tmp_path / "pipe.extxyz") as fifo:
        with pytest.raises(ValueError, match=rf"{fifo}: not a regular file"):
            _evaluate([fifo])


def test_training_rows_carry_seconds_only_where_a_checkpoint_stored_them(tmp_path):
    """A checkpoint of an older version (or of a run under a wall-clock cap) still gives
    its training seconds; one that holds results only gives no made-up 0 s."""
    from forcenet.evaluate import training_summary

    old = {"train_info": {"progress": {"step": 5, "elapsed_s": 12.5, "graphs_seen": 40}}}
    assert training_summary(tmp_path / "best.pt", old)["train_seconds"] == 12.5
    new = {"train_info": {"progress": {"step": 5, "graphs_seen": 40}}}
    summary = training_summary(tmp_path / "best.pt", new)
    assert "train_seconds" not in summary and summary["train_steps"] == 5.0
