"""The library's command line: explicit arguments, no params.yaml, no MLflow."""

from __future__ import annotations

import pytest
import yaml
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
