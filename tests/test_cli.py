"""The library's command line: explicit arguments, no params.yaml, no MLflow."""

from __future__ import annotations

import re
import sys

import pytest
import yaml
from ase.calculators.emt import EMT
from tiny import write_stores
from typer.testing import CliRunner

from forcenet import checkpoint as C
from forcenet.cli import app


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    from test_train import make_frames

    root = tmp_path_factory.mktemp("data")
    write_stores(root, make_frames(4, 3, seed=2), cutoff=4.5, max_neighbors=16)
    return root


#: Settings of a training run short enough for a test.
SHORT = ["--set", "train.max_steps=1", "--set", "train.batch_size=2"]
SHORT += ["--set", "model.hidden_channels=8", "--set", "model.num_interactions=1"]


def _train(stores, out, *extra):
    args = [
        "train",
        "gns",
        "--out",
        str(out),
        "--frames",
        str(stores / "lmdb" / "train"),
        "--graphs",
        str(stores / "graphs" / "train"),
        *extra,
    ]
    return CliRunner().invoke(app, args)


def test_train_takes_a_run_config_and_overrides(stores, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # nothing may appear in the working directory
    config = tmp_path / "run.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "model": {"hidden_channels": 8, "num_interactions": 1, "mlp_layers": 1},
                "train": {"max_steps": 4, "batch_size": 2, "lr": 1e-3},
            }
        )
    )
    result = _train(stores, tmp_path / "out", "--config", str(config), "--set", "train.max_steps=3")
    assert result.exit_code == 0, result.output
    ckpt = C.load_checkpoint(tmp_path / "out" / "last.pt")
    assert ckpt["step"] == 3  # --set wins over the file
    # the cutoff and neighbor count come from the graph store, not from an argument
    assert ckpt["graph"] == {"cutoff": 4.5, "max_neighbors": 16}
    assert ckpt["model_kwargs"]["cutoff"] == 4.5 and ckpt["model_kwargs"]["hidden_channels"] == 8
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "run.yaml"]  # no MLflow store


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--set", "model.hiden_channels=8"], "did you mean 'hidden_channels'"),
        (["--set", "train.max_step=8"], "did you mean 'max_steps'"),
        (["--set", "max_steps=8"], "model.KEY=VALUE or train.KEY=VALUE"),
    ],
)
def test_train_refuses_unknown_settings_before_work(stores, tmp_path, extra, message):
    result = _train(stores, tmp_path / "out", *extra)
    assert result.exit_code != 0 and message in str(result.exception)
    assert not (tmp_path / "out").exists()


def test_help_lists_the_library_commands_only():
    result = CliRunner().invoke(app, ["--help"])
    assert result.exit_code == 0
    for command in ("preprocess", "neighbors", "train", "evaluate", "relax", "relax-oracle"):
        assert command in result.output
    assert "report" not in result.output.split("Commands")[-1]


def test_on_the_fly_training_and_evaluation_equal_the_stored_graphs(stores, tmp_path):
    """The same run with graphs built per batch (no graph store) gives the same weights,
    the same checkpointed settings and the same metrics: the edges are the same."""
    import torch

    common = ["--set", "train.max_steps=3", "--set", "train.batch_size=2"]
    common += ["--set", "model.hidden_channels=8", "--set", "model.num_interactions=1"]
    stored = _train(stores, tmp_path / "stored", *common)
    assert stored.exit_code == 0, stored.output
    args = ["train", "gns", "--out", str(tmp_path / "fly"), "--frames"]
    args += [str(stores / "lmdb" / "train"), "--cutoff", "4.5", "--max-neighbors", "16"]
    fly = CliRunner().invoke(app, [*args, *common])
    assert fly.exit_code == 0, fly.output
    a = C.load_checkpoint(tmp_path / "stored" / "last.pt")
    b = C.load_checkpoint(tmp_path / "fly" / "last.pt")
    assert a["graph"] == b["graph"] == {"cutoff": 4.5, "max_neighbors": 16}
    for name, value in a["model_state"].items():
        torch.testing.assert_close(b["model_state"][name], value, rtol=0, atol=0)
    tables = {}
    for how, extra in (("stored", ["--graphs", str(stores / "graphs")]), ("fly", ["--on-the-fly"])):
        out = tmp_path / f"{how}.parquet"
        result = CliRunner().invoke(
            app,
            ["evaluate", str(tmp_path / "stored" / "last.pt"), str(stores / "lmdb" / "train")]
            + ["--out", str(out), *extra],
        )
        assert result.exit_code == 0, result.output
        import pandas as pd

        table = pd.read_parquet(out)
        tables[how] = table[~table["metric"].str.contains("per_s|seconds")].reset_index(drop=True)
    pd.testing.assert_frame_equal(tables["stored"], tables["fly"])
    refused = CliRunner().invoke(app, [*args[:-4], *common])
    said = " ".join(refused.output.replace("│", " ").split())
    assert refused.exit_code != 0 and "pass --graphs, or --cutoff and --max-neighbors" in said


@pytest.fixture
def checkpoint_and_file(tmp_path):
    """A tiny GNS checkpoint (4.5 Å graphs) and an extxyz file of two labelled slabs."""
    import ase.io
    from test_calculator import slab, write_tiny_checkpoint

    ckpt = tmp_path / "ckpt" / "best.pt"
    ckpt.parent.mkdir()
    write_tiny_checkpoint(ckpt, "gns", force_scale=0.5)
    images = [slab(), slab(2)]
    for atoms in images:
        atoms.calc = EMT()
        atoms.get_forces()
    data = tmp_path / "val.extxyz"
    ase.io.write(data, images, format="extxyz")
    return ckpt, data


def _evaluate(ckpt, data, *extra):
    return CliRunner().invoke(app, ["evaluate", str(ckpt), str(data), "--device", "cpu", *extra])


def test_evaluate_refuses_outputs_that_alias_an_input_or_each_other(checkpoint_and_file, tmp_path):
    """--out equal to the checkpoint, or to --predictions / --metrics-json, overwrote it."""
    ckpt, data = checkpoint_and_file
    kept = {p: p.read_bytes() for p in (ckpt, data)}
    link = tmp_path / "link.pt"
    link.symlink_to(ckpt)
    table = tmp_path / "m.parquet"
    cases = [
        (["--out", str(ckpt)], "--out .* is the same file as the checkpoint"),
        (["--out", str(link)], "--out .*link.pt is the same file as the checkpoint"),
        (["--out", str(data)], "--out .* is the same file as input 0"),
        (["--out", str(table), "--predictions", str(table)], "--out .* same file as --predictions"),
        (
            ["--out", str(table), "--metrics-json", str(tmp_path / "sub" / ".." / "m.parquet")],
            "--metrics-json",
        ),
        (["--out", str(table), "--predictions", str(ckpt)], "--predictions .* the checkpoint"),
    ]
    for extra, message in cases:
        result = _evaluate(ckpt, data, *extra)
        assert isinstance(result.exception, ValueError), (extra, result.output)
        assert re.search(message, str(result.exception)), (extra, str(result.exception))
    assert {p: p.read_bytes() for p in kept} == kept
    assert not table.exists()
    ok = _evaluate(ckpt, data, "--out", str(table), "--predictions", str(tmp_path / "p.parquet"))
    assert ok.exit_code == 0, ok.output


def test_train_refuses_a_model_cutoff_other_than_the_graph_store(stores, tmp_path):
    """--set model.cutoff=6 with 4.5 Å graphs became 4.5 Å without a word."""
    result = _train(stores, tmp_path / "out", "--set", "model.cutoff=6", *SHORT)
    assert isinstance(result.exception, ValueError)
    assert "model.cutoff=6 differs from the cutoff 4.5 Å of the graph store" in str(
        result.exception
    )
    assert not (tmp_path / "out").exists()
    same = _train(stores, tmp_path / "same", "--set", "model.cutoff=4.5", *SHORT)
    assert same.exit_code == 0, same.output


def _main(monkeypatch, capsys, *args):
    """``forcenet ARGS`` through the console entry point: (exit code, stderr lines)."""
    from forcenet.cli import main

    monkeypatch.setattr(sys, "argv", ["forcenet", *args])
    monkeypatch.delenv("FORCENET_DEBUG", raising=False)
    with pytest.raises(SystemExit) as exit_info:
        main()
    return exit_info.value.code, capsys.readouterr().err.strip().splitlines()


def test_an_empty_input_file_is_one_error_line(checkpoint_and_file, tmp_path, monkeypatch, capsys):
    ckpt, _ = checkpoint_and_file
    empty = tmp_path / "empty.extxyz"
    empty.write_text("")
    args = ["evaluate", str(ckpt), str(empty), "--out", str(tmp_path / "m.parquet")]
    code, err = _main(monkeypatch, capsys, *args, "--device", "cpu")
    assert code == 1 and err == [f"error: {empty}: empty file (no structures)"]


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="this machine has CUDA")
def test_device_cuda_without_cuda_is_one_error_line(
    checkpoint_and_file, tmp_path, monkeypatch, capsys
):
    ckpt, data = checkpoint_and_file
    args = ["evaluate", str(ckpt), str(data), "--out", str(tmp_path / "m.parquet")]
    code, err = _main(monkeypatch, capsys, *args, "--device", "cuda")
    assert code == 1 and len(err) == 1
    assert err[0].startswith("error: device cuda: CUDA is not available")


def test_neighbors_refuses_a_cutoff_above_the_maximum(stores, tmp_path):
    """--cutoff 1e6 made the neighbor search run forever."""
    args = ["neighbors", str(stores / "lmdb"), str(tmp_path / "g"), "--cutoff", "1e6"]
    result = CliRunner().invoke(app, [*args, "--workers", "1"])
    assert isinstance(result.exception, ValueError)
    assert "cutoff 1000000.0 Å is above the maximum 20.0 Å" in str(result.exception)
    assert not (tmp_path / "g").exists()


def test_resume_with_other_data_or_settings_is_refused_unless_allowed(stores, tmp_path):
    """`--resume` with another `--frames` split or another lr exits non-zero naming what
    differs; `--allow-changed` continues on purpose."""
    from test_train import make_frames

    small = ["--set", "model.hidden_channels=8", "--set", "model.num_interactions=1"]
    small += ["--set", "train.batch_size=2"]
    out = tmp_path / "out"
    first = _train(stores, out, *small, "--set", "train.max_steps=2")
    assert first.exit_code == 0, first.output
    other = write_stores(
        tmp_path / "other", make_frames(3, 3, seed=5), cutoff=4.5, max_neighbors=16
    )
    refused = _train(other, out, *small, "--set", "train.max_steps=2", "--resume")
    assert refused.exit_code != 0 and "data.frames" in str(refused.exception)
    refused = _train(
        stores, out, *small, "--set", "train.max_steps=2", "--set", "train.lr=0.01", "--resume"
    )
    assert refused.exit_code != 0 and "train.lr 0.002 -> 0.01" in str(refused.exception)
    assert C.load_checkpoint(out / "last.pt")["step"] == 2
    allowed = _train(
        stores, out, *small, "--set", "train.max_steps=4", "--resume", "--allow-changed"
    )
    assert allowed.exit_code == 0, allowed.output
    assert C.load_checkpoint(out / "last.pt")["step"] == 4
    alone = _train(stores, tmp_path / "fresh", *small, "--allow-changed")
    assert alone.exit_code != 0 and not (tmp_path / "fresh").exists()


def test_every_device_option_has_one_spelling_and_help():
    """evaluate, relax, physics md and physics conservation share one --device option."""
    import re

    helps = set()
    for command in (["evaluate"], ["relax"], ["physics", "md"], ["physics", "conservation"]):
        result = CliRunner().invoke(app, [*command, "--help"], env={"COLUMNS": "200"})
        assert result.exit_code == 0, result.output
        text = " ".join(result.output.replace("│", " ").split())
        found = re.search(r"--device \S+ (Torch device.*?available\)\.)", text)
        assert found, (command, text)
        helps.add(found.group(1))
    assert len(helps) == 1


def test_relax_refuses_an_unknown_optimizer_by_its_choices(tmp_path):
    args = ["relax", str(tmp_path / "m.pt"), str(tmp_path / "s.extxyz"), "--out", str(tmp_path)]
    result = CliRunner().invoke(app, [*args, "--optimizer", "bfgs"])
    said = " ".join(result.output.replace("│", " ").split())
    assert result.exit_code == 2 and "'bfgs' is not one of 'lbfgs', 'fire'" in said
