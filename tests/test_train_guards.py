"""Training on hostile data: a NaN loss or dev metric stops with the step named and
last.pt kept at the last good state; a single-system training set still gets a dev
slice (by frame); raw total energies of mixed compositions get per-element references."""

from __future__ import annotations

import hashlib
import math

import numpy as np
import pytest
import torch
from ase.build import molecule
from ase.calculators.emt import EMT
from ase.data import chemical_symbols
from test_train import GRAPH, TINY_GNS, make_frames, make_samples, tiny_config
from tiny import fit_split, write_stores
from torch.utils.data import DataLoader

from forcenet import checkpoint as C
from forcenet import train as T
from forcenet.data import keys as K
from forcenet.data.batch import collate
from forcenet.data.dataset import sample_from_atoms
from forcenet.data.frame import MAX_Z, Frame
from forcenet.evaluate import evaluate_model
from forcenet.scaling import ScaledModel, label_stats, set_scales
from forcenet.train.data import MIN_DEV_SYSTEMS, dev_split
from forcenet.train.log import start_line


@pytest.fixture(scope="module")
def samples() -> list[dict]:
    return make_samples()


# ------------------------------------------------------------ non-finite loss or metric


def test_nan_dev_metric_stops_naming_step_and_metric(samples, tmp_path, monkeypatch):
    """A NaN dev energy MAE stops training at that evaluation with a FloatingPointError
    naming step and metric; last.pt and best.pt keep the last good step."""
    real, calls = T.evaluate, []

    def evaluate(*args, **kwargs):
        metrics = real(*args, **kwargs)
        calls.append(1)
        if len(calls) == 2:
            metrics["energy_mae"] = float("nan")
        return metrics

    monkeypatch.setattr(T.data, "evaluate", evaluate)  # the dev slice's
    cfg = tiny_config(max_epochs=5, eval_every=3)
    with pytest.raises(RuntimeError, match=r"train gns: dev energy_mae is nan at step 5") as err:
        fit_split(cfg, "gns", TINY_GNS, samples, tmp_path, graph=GRAPH, train=20)
    assert isinstance(err.value, FloatingPointError)
    assert f"{tmp_path / 'last.pt'} keeps the last good state (step 3)" in str(err.value)
    assert C.load_checkpoint(tmp_path / "last.pt")["step"] == 3
    best = C.load_checkpoint(tmp_path / "best.pt")
    assert best["step"] == 3 and math.isfinite(best["best_metric"])


def test_nan_training_loss_stops_naming_step(samples, tmp_path, monkeypatch):
    real, calls = T.train_step, []

    def train_step(model, batch, optimizer, **kwargs):
        calls.append(1)
        if len(calls) == 5:
            batch = dict(batch, **{K.FORCES: torch.full_like(batch[K.FORCES], float("nan"))})
        return real(model, batch, optimizer, **kwargs)

    monkeypatch.setattr(T.loop, "train_step", train_step)
    cfg = tiny_config(max_epochs=5, eval_every=3)
    with pytest.raises(RuntimeError, match=r"non-finite training loss nan at step 5;") as err:
        fit_split(cfg, "gns", TINY_GNS, samples, tmp_path, graph=GRAPH, train=20)
    assert "keeps the last good state (step 3)" in str(err.value)
    last = C.load_checkpoint(tmp_path / "last.pt")
    assert last["step"] == 3
    assert all(torch.isfinite(v).all() for v in last["model_state"].values())


def test_cli_prints_nan_stop_as_one_error_line(monkeypatch, capsys):
    from forcenet import cli

    def app():
        raise T.NonFiniteError("train gns: dev forces_mae is nan at step 6")

    monkeypatch.setattr(cli, "app", app)
    monkeypatch.delenv("FORCENET_DEBUG", raising=False)
    with pytest.raises(SystemExit) as exit_info:
        cli.main()
    assert exit_info.value.code == 1
    assert capsys.readouterr().err.strip() == "error: train gns: dev forces_mae is nan at step 6"


def test_no_dev_slice_says_last_pt_is_the_checkpoint(samples, tmp_path, capsys):
    cfg = tiny_config(max_epochs=1)
    path = fit_split(cfg, "gns", TINY_GNS, samples, tmp_path, graph=GRAPH, train=20, dev=[])
    assert path == tmp_path / "last.pt"
    assert "no dev slice, so no best.pt" in capsys.readouterr().out


# ----------------------------------------------------------------------------- dev split


def _system_rule_split(sids, fraction, seed):
    """The per-system rule, written out: a system (all its frames) goes to dev when the
    hash of (seed, sid) falls under ``fraction``; with several systems, at least one."""

    def unit(sid):
        digest = hashlib.blake2b(f"{seed}:{int(sid)}".encode(), digest_size=8).digest()
        return int.from_bytes(digest, "little") / 2.0**64

    systems = sorted({int(s) for s in sids})
    dev = {s for s in systems if unit(s) < fraction}
    if fraction > 0 and not dev and len(systems) > 1:
        dev = {min(systems, key=unit)}
    return (
        [i for i, s in enumerate(sids) if int(s) not in dev],
        [i for i, s in enumerate(sids) if int(s) in dev],
    )


def test_one_system_gets_a_dev_slice_by_frame():
    sids = [7] * 1000  # one MD trajectory of one molecule
    train, dev = dev_split(sids, 0.1, seed=0)
    assert sorted(train + dev) == list(range(1000)) and not set(train) & set(dev)
    assert 70 <= len(dev) <= 130
    assert dev_split(sids, 0.1, seed=0) == (train, dev)
    assert dev_split(sids, 0.1, seed=1)[1] != dev
    assert dev_split([3, 3], 0.01, 0)[1] and dev_split([3, 3], 0.99, 0)[0]  # >= 1 each side
    assert dev_split(sids, 0.0, 0) == (list(range(1000)), [])
    few = [s for s in range(MIN_DEV_SYSTEMS - 1) for _ in range(20)]
    assert len({few[i] for i in dev_split(few, 0.1, 0)[1]}) > 1  # frames of several systems


def test_many_systems_split_by_the_per_system_rule():
    for n_systems in (MIN_DEV_SYSTEMS, 200, 731):
        sids = [1000 + 3 * s for s in range(n_systems) for _ in range(4)]
        for seed in (0, 1):
            assert dev_split(sids, 0.1, seed) == _system_rule_split(sids, 0.1, seed)


def test_fit_on_one_system_selects_on_a_frame_dev_slice(tmp_path, capsys):

    root = tmp_path / "data"
    write_stores(root, make_frames(1, 24, seed=5), cutoff=GRAPH.cutoff, max_neighbors=16)  # one sid
    path = T.fit(
        tiny_config(max_epochs=1, dev_fraction=0.25),
        "gns",
        TINY_GNS,
        train_dir=root / "lmdb" / "train",
        graphs_dir=root / "graphs" / "train",
        out_dir=tmp_path / "out",
    )
    assert path == tmp_path / "out" / "best.pt"
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if "drawn by frame" in line]
    assert len(lines) == 1 and "1 system(s) < 10" in lines[0]


# ------------------------------------------------------- per-element reference energies

OFFSET = {z: -100.0 * z for z in (1, 6, 7, 8)}  # eV per atom: raw totals far from 0
MOLECULES = ("H2O", "CH4", "NH3", "CO2", "C2H6", "N2", "CO", "H2", "O2", "C2H4", "HCN", "CH3OH")


def _molecule_samples(
    seed: int = 0, per_molecule: int = 4, molecules: tuple[str, ...] = MOLECULES
) -> list[dict]:
    """EMT-labelled rattled molecules (no pbc) with totals shifted by sum_Z n_Z * OFFSET[Z]:
    energies of -100 eV (H2) to -2,200 eV (CO2), like raw DFT totals of mixed compositions."""
    rng = np.random.default_rng(seed)
    samples = []
    for sid, name in enumerate(molecules):
        for fid in range(per_molecule):
            atoms = molecule(name)
            atoms.positions += rng.normal(0.0, 0.05, atoms.positions.shape)
            atoms.calc = EMT()
            n = len(atoms)
            frame = Frame(
                atomic_numbers=atoms.numbers.astype(np.int64),
                pos=atoms.positions.copy(),
                cell=np.zeros((3, 3)),
                pbc=np.zeros(3, dtype=bool),
                tags=np.ones(n, dtype=np.int64),
                fixed=np.zeros(n, dtype=bool),
                forces=atoms.get_forces(),
                total_energy=float(atoms.get_potential_energy())
                + sum(OFFSET[int(z)] for z in atoms.numbers),
                reference_energy=0.0,
                sid=sid,
                fid=fid,
            )
            samples.append(sample_from_atoms(frame, cutoff=GRAPH.cutoff, max_neighbors=16))
    return samples


SCHNET = {
    "hidden_channels": 16,
    "num_filters": 16,
    "num_interactions": 2,
    "num_gaussians": 16,
    "cutoff": GRAPH.cutoff,
}


def test_fitted_element_energies_recover_the_offsets():
    stats = label_stats(_molecule_samples(), reference="per_element")
    fitted = stats["element_energies"]
    assert sorted(fitted) == sorted(OFFSET)
    for z, e in fitted.items():
        assert abs(e - OFFSET[z]) < 5.0, (chemical_symbols[z], e)  # EMT: a few eV per atom
    assert abs(stats["energy_mean"]) < 0.1 and stats["energy_std"] < 10.0  # residual
    mean = label_stats(_molecule_samples(), reference="mean")
    assert "element_energies" not in mean and mean["energy_std"] > 300.0


def test_per_element_references_make_schnet_energies_learnable(tmp_path):
    """One mean shift leaves a residual of hundreds of eV that swamps SchNet's loss; the
    per-element fit leaves a few eV. The references travel in the checkpoint, so the
    rebuilt model predicts totals."""
    data = _molecule_samples()
    train = [s for i, s in enumerate(data) if i % 4 != 3]
    dev = [s for i, s in enumerate(data) if i % 4 == 3]
    results, lines = {}, {}
    for ref in ("mean", "per_element"):
        cfg = tiny_config(
            max_epochs=100,
            max_steps=60,
            batch_size=6,
            lr=5e-3,
            energy_coef=1.0,
            force_coef=30.0,
            loss_atoms="free",
            rotation_augment=False,
            energy_reference=ref,
        )
        seen = []
        fit_split(
            cfg,
            "schnet",
            SCHNET,
            train,
            tmp_path / ref,
            graph=GRAPH,
            train=len(train),
            dev=dev,
            on_epoch_end=lambda s, m, seen=seen: seen.append(m),
        )
        results[ref] = seen[-1]["energy_mae"]
        lines[ref] = start_line(
            "schnet", cfg, C.load_model(tmp_path / ref / "last.pt")[0], 1, 1, resumed=False
        )
    assert results["per_element"] < 0.1 * results["mean"], results
    assert results["mean"] > 50.0
    assert "e_Z (fitted) H -99" in lines["per_element"] and "e_Z" not in lines["mean"]
    model, ckpt = C.load_model(tmp_path / "per_element" / "last.pt")
    table = model.element_energies
    assert table.dtype == torch.float64 and table.shape == (MAX_Z + 1,)
    assert abs(float(table[8]) - OFFSET[8]) < 5.0
    assert set(ckpt["train_info"]["normalizer"]["element_energies"]) == {"H", "C", "N", "O"}
    dev_metrics = T.evaluate(model, DataLoader(dev, batch_size=4, collate_fn=collate), device="cpu")
    assert dev_metrics["energy_mae"] == pytest.approx(results["per_element"], rel=1e-5)


def test_given_element_energies_are_used_and_checked():
    data = _molecule_samples(per_molecule=1)
    given = {"H": -100.0, "C": -600.0, "N": -700.0, "O": -800.0}
    stats = label_stats(data, reference="per_element", element_energies=given)
    assert stats["element_energies"] == {1: -100.0, 6: -600.0, 7: -700.0, 8: -800.0}
    with pytest.raises(ValueError, match=r"no value for training elements \['N'\]"):
        label_stats(data, reference="per_element", element_energies={"H": 0, "C": 0, "O": 0})
    with pytest.raises(ValueError, match="need 'per_element'"):
        tiny_config(energy_reference="mean", element_energies=given)
    with pytest.raises(ValueError, match=r"unknown elements \['Xx'\]"):
        tiny_config(element_energies={"Xx": 1.0})
    assert T.TrainConfig().energy_reference == "per_element"


def test_checkpoint_without_element_energies_still_loads(samples, tmp_path):
    cfg = tiny_config(max_epochs=1, energy_reference="mean")
    fit_split(cfg, "gns", TINY_GNS, samples, tmp_path, graph=GRAPH, train=20)
    ckpt = C.load_checkpoint(tmp_path / "last.pt")
    del ckpt["model_state"]["element_energies"]  # a checkpoint without the e_Z table
    C.save_checkpoint(tmp_path / "old.pt", ckpt)
    model, _ = C.load_model(tmp_path / "old.pt")
    assert not model.element_energies.any()
    batch = collate(samples[20:])
    new, _ = C.load_model(tmp_path / "last.pt")
    torch.testing.assert_close(model(batch)[K.OUT_FORCES], new(batch)[K.OUT_FORCES])


# ------------------------------------------------------------------ readable progress


def test_under_trained_model_gets_a_loud_warning(samples, tmp_path, capsys):
    """3 steps of 4 structures over 20 training frames: 0.6 of one pass."""
    cfg = tiny_config(max_steps=3, batch_size=4)
    fit_split(cfg, "gns", TINY_GNS, samples, tmp_path, graph=GRAPH, train=20)
    out = capsys.readouterr().out
    assert "WARNING: train gns: 3 steps saw 12 structures, 0.60 of one pass" in out
    assert "under-trained" in out


def test_a_log_file_gets_plain_progress_lines_not_a_redrawn_bar(samples, tmp_path, capsys):
    """Without a terminal (as in a log file) the loop prints one line every budget/20
    steps and one per evaluation, and no carriage-return bar."""
    cfg = tiny_config(max_steps=40, max_epochs=8, batch_size=4)
    fit_split(cfg, "gns", TINY_GNS, samples, tmp_path, graph=GRAPH, train=20)
    captured = capsys.readouterr()
    lines = [line for line in captured.out.splitlines() if line.startswith("train gns: step ")]
    assert [line.split(",")[0] for line in lines if "graphs/s" in line] == [
        f"train gns: step {k}/40" for k in range(2, 41, 2)
    ]
    assert sum("dev force MAE" in line for line in lines) == 8  # every epoch end (5 steps)
    assert "\r" not in captured.err and "\r" not in captured.out


def test_a_fit_reports_its_rank_and_warns_when_below_the_elements(tmp_path, capsys):
    """One molecule's MD (one composition, 3 elements) determines one combination of the
    three e_Z, not each: the fit says so at the start of training."""
    from forcenet.scaling import element_fit_warning

    one = _molecule_samples(per_molecule=10, molecules=("CH3OH",))
    stats = label_stats(one, reference="per_element")
    assert stats["element_fit"] == {"elements": [1, 6, 8], "rank": 1, "structures": 10}
    warning = element_fit_warning("schnet", stats)
    assert "rank 1 of 3 elements" in warning
    assert "WARNING: train schnet: the training compositions determine only 1 of the 3" in warning
    full = element_fit_warning("schnet", label_stats(_molecule_samples(), reference="per_element"))
    assert "rank 4 of 4 elements" in full and "WARNING" not in full
    cfg = tiny_config(max_epochs=1, batch_size=4, energy_reference="per_element")
    fit_split(cfg, "schnet", SCHNET, one, tmp_path, graph=GRAPH, train=8)
    lines = [line for line in capsys.readouterr().out.splitlines() if "WARNING" in line]
    assert len(lines) == 1 and "determine only 1 of the 3 reference energies (H, C, O)" in lines[0]


def _write_atoms(path, energies: dict[str, float], extra: list | None = None) -> None:
    from ase import Atoms
    from ase.calculators.singlepoint import SinglePointCalculator
    from ase.io import write

    frames = []
    for symbol, energy in energies.items():
        atoms = Atoms(symbol, positions=[[0.0, 0.0, 0.0]])
        atoms.calc = SinglePointCalculator(atoms, energy=energy)
        frames.append(atoms)
    write(path, frames + (extra or []), format="extxyz")


def test_isolated_atom_energies_from_a_file_or_a_mapping(tmp_path, capsys):
    """``energy_reference: isolated`` takes e_Z from single-atom frames (or a mapping),
    keeps those of elements the training split lacks, and fits only the training
    elements without one, naming them."""
    from forcenet.scaling import IsolatedAtomsError, element_fit_warning, read_isolated_energies

    data = _molecule_samples(per_molecule=2)
    isolated = {"H": -100.0, "C": -600.0, "N": -700.0, "O": -800.0, "Cu": -3.5}
    path = tmp_path / "isolated.extxyz"
    _write_atoms(path, isolated)
    assert read_isolated_energies(path) == isolated
    stats = label_stats(data, reference="isolated", element_energies=isolated)
    assert stats["element_energies"] == {1: -100.0, 6: -600.0, 7: -700.0, 8: -800.0, 29: -3.5}
    assert "element_fit" not in stats
    partial = {k: v for k, v in isolated.items() if k != "N"}
    stats = label_stats(data, reference="isolated", element_energies=partial)
    assert stats["element_fit"]["elements"] == [7] and stats["element_fit"]["fallback"]
    assert abs(stats["element_energies"][7] - OFFSET[7]) < 10.0  # fitted on what is left
    assert "no isolated-atom energy for N: fitted by least squares" in element_fit_warning(
        "gns", stats
    )
    cfg = tiny_config(max_epochs=1, energy_reference="isolated", isolated_atoms=str(path))
    fit_split(cfg, "schnet", SCHNET, data, tmp_path / "run", graph=GRAPH, train=16)
    assert (
        "e_Z (isolated atoms) H -100, C -600, N -700, O -800, Cu -3.5 eV" in capsys.readouterr().out
    )
    ckpt = C.load_checkpoint(tmp_path / "run" / "last.pt")
    assert ckpt["train_info"]["normalizer"]["element_energies"] == isolated
    with pytest.raises(ValueError, match="needs the isolated-atom energies"):
        tiny_config(energy_reference="isolated")
    from ase.build import molecule as build

    water = build("H2O")
    _write_atoms(tmp_path / "bad.extxyz", {"H": -1.0}, [water])
    with pytest.raises(IsolatedAtomsError, match=r"bad\.extxyz: structure 1: 3 atoms"):
        read_isolated_energies(tmp_path / "bad.extxyz")


def _referenced_schnet() -> ScaledModel:
    """A SchNet whose references were fitted on molecules without nitrogen (H, C, O)."""
    no_n = tuple(m for m in MOLECULES if "N" not in m)
    torch.manual_seed(0)
    model = C.build_scaled_model("schnet", SCHNET)
    set_scales(model, label_stats(_molecule_samples(molecules=no_n), reference="per_element"))
    return model.eval()


def test_evaluation_names_elements_without_a_reference(capsys):
    model = _referenced_schnet()
    with_n = _molecule_samples(per_molecule=1, molecules=("NH3", "H2O", "HCN"))
    inputs = [("test", [collate(with_n)]), ("plain", [collate(with_n[1:2])])]
    evaluate_model(model, inputs, model_name="schnet", device="cpu")
    lines = [line for line in capsys.readouterr().out.splitlines() if "WARNING" in line]
    assert lines == [
        "WARNING: evaluate schnet: test: 2 of 3 structures hold elements without a reference "
        "energy (N): the training split held none of them, so the predicted energies lack "
        "their atoms' reference (errors of up to hundreds of eV); train on data holding them, "
        "or give isolated-atom energies (energy_reference: isolated)"
    ]


def test_calculator_names_elements_without_a_reference_once():
    import warnings

    from forcenet.calculator import ForceNetCalculator, UnreferencedElementsWarning

    calc = ForceNetCalculator(model=_referenced_schnet(), cutoff=GRAPH.cutoff, max_neighbors=16)
    water = molecule("H2O")
    water.calc = calc
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        water.get_potential_energy()  # H and O have references: no warning
    ammonia = molecule("NH3")
    ammonia.calc = calc
    with pytest.warns(UnreferencedElementsWarning, match=r"without a reference energy \(N\)"):
        ammonia.get_potential_energy()
    hcn = molecule("HCN")
    hcn.calc = calc.clone()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        hcn.get_potential_energy()  # N was named already
