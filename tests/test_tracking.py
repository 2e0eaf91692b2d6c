"""MLflow tracking into a temporary SQLite store shared by the tests of this module."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from pipeline import tracking


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    """One migrated SQLite store per module (migrations take a couple of seconds)."""
    root = tmp_path_factory.mktemp("store")
    return f"sqlite:///{(root / 'mlflow.db').as_posix()}"


@pytest.fixture
def in_repo(tmp_path, monkeypatch) -> Path:
    """A fake repo root: DVC_ROOT points at tmp_path; artifacts go under it."""
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("RANK", raising=False)
    return tmp_path


def test_default_uri_follows_dvc_root_and_env(in_repo, monkeypatch):
    assert tracking.repo_root() == in_repo.resolve()
    assert (
        tracking.default_tracking_uri()
        == f"sqlite:///{(in_repo.resolve() / 'mlflow.db').as_posix()}"
    )
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:////elsewhere/x.db")
    assert tracking.default_tracking_uri() == "sqlite:////elsewhere/x.db"


def test_git_commit_is_a_sha_inside_git_and_none_outside(tmp_path):
    import shutil
    import subprocess

    here = Path(__file__).resolve().parent
    if (
        shutil.which("git") is None
        or subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True).returncode
    ):
        pytest.skip("tests are not inside a git checkout with a commit")
    head = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, check=True
    ).stdout.strip()
    assert tracking.git_commit(here) == head
    assert tracking.git_commit(tmp_path) is None


def test_flatten_params_nested():
    flat = tracking.flatten_params({"model": {"forcenet": {"hidden_channels": 512}}, "seed": 0})
    assert flat == {"model.forcenet.hidden_channels": "512", "seed": "0"}


def test_train_then_evaluate_share_one_run(store, in_repo, monkeypatch):
    import mlflow

    monkeypatch.setenv("DVC_EXP_NAME", "exp-abc")
    monkeypatch.setattr(tracking, "git_commit", lambda root=None: "a" * 40)
    out_dir = in_repo / "checkpoints" / "schnet"
    params = {"model": {"schnet": {"hidden_channels": 8}}, "train": {"lr": 5e-4}}
    run = tracking.start_training_run(
        model="schnet", params=params, out_dir=out_dir, experiment="t1", tracking_uri=store
    )
    assert run is not None
    found = tracking.training_run_id(out_dir, experiment="t1", tracking_uri=store)
    assert found == run.run_id
    assert not (out_dir / tracking.RUN_ID_FILE).exists()  # nothing in the DVC output
    for epoch, loss in enumerate([1.0, 0.5, 0.25]):
        tracking.log_epoch(run, epoch, {"train/loss": loss, "val/forces_mae": loss / 2})
    ckpt = out_dir / "last.pt"
    out_dir.mkdir(parents=True)
    ckpt.write_bytes(b"weights")
    tracking.log_artifacts(run, [ckpt], artifact_path="checkpoint")
    tracking.finish_run(run)

    # the evaluate stage (another process in practice) finds the run by its output folder
    run_id = tracking.training_run_id(out_dir, experiment="t1", tracking_uri=store)
    ev = tracking.attach_run(model="schnet", run_id=run_id, experiment="t1", tracking_uri=store)
    assert ev.run_id == run.run_id
    table = pd.DataFrame(
        {"split": ["val_id", "val_id"], "metric": ["forces_mae", "forces_cos"], "value": [0.1, 0.9]}
    )
    tracking.log_split_metrics(ev, table)
    tracking.finish_run(ev)

    mlflow.set_tracking_uri(store)
    try:
        runs = mlflow.search_runs(experiment_names=["t1"])
    finally:
        mlflow.set_tracking_uri(None)
    assert len(runs) == 1
    row = runs.iloc[0]
    assert row["params.model.schnet.hidden_channels"] == "8"
    assert row["metrics.val_id/forces_mae"] == pytest.approx(0.1)
    assert row["metrics.train/loss"] == pytest.approx(0.25)  # latest epoch
    assert row["tags.dvc.exp_name"] == "exp-abc"
    assert row["tags.model"] == "schnet"
    assert row["tags.mlflow.source.git.commit"] == "a" * 40
    client = mlflow.MlflowClient(tracking_uri=store)
    loss = sorted((m.step, m.value) for m in client.get_metric_history(run.run_id, "train/loss"))
    assert loss == [(0, 1.0), (1, 0.5), (2, 0.25)]
    # artifacts land under <repo root>/mlartifacts
    assert list((in_repo / "mlartifacts").rglob("last.pt"))


def test_resumed_training_reopens_the_same_run_and_a_fresh_one_does_not(store, in_repo):
    out_dir = in_repo / "ckpt"
    first = tracking.start_training_run(
        model="gns", params={"a": 1}, out_dir=out_dir, experiment="t2", tracking_uri=store
    )
    tracking.finish_run(first, status="KILLED")
    again = tracking.start_training_run(
        model="gns",
        params={"a": 1},
        out_dir=out_dir,
        resume=True,
        experiment="t2",
        tracking_uri=store,
    )
    assert again.run_id == first.run_id
    fresh = tracking.start_training_run(
        model="gns", params={"a": 2}, out_dir=out_dir, experiment="t2", tracking_uri=store
    )
    assert fresh.run_id != first.run_id  # a fresh run never reopens (or changes) the old one
    assert tracking.training_run_id(out_dir, experiment="t2", tracking_uri=store) == fresh.run_id
    again = tracking.start_training_run(
        model="gns",
        params={"a": 2},
        out_dir=out_dir,
        resume=True,
        experiment="t2",
        tracking_uri=store,
    )
    assert again.run_id == fresh.run_id  # resuming continues the newest run of the folder


def test_a_folder_that_names_its_run_in_run_id_txt_keeps_its_link(store, in_repo):
    """An output folder that names its run only in ``run_id.txt`` (no run tagged with the
    folder) keeps its link: the run id is found, and a resumed training reopens that run."""
    client = tracking._client(store)
    exp = tracking._experiment_id(client, "t4", in_repo)
    old = client.create_run(exp, run_name="gns").info.run_id
    out_dir = in_repo / "old"
    out_dir.mkdir()
    (out_dir / tracking.RUN_ID_FILE).write_text(old + "\n")
    assert tracking.training_run_id(out_dir, experiment="t4", tracking_uri=store) == old
    run = tracking.start_training_run(
        model="gns", params={}, out_dir=out_dir, resume=True, experiment="t4", tracking_uri=store
    )
    assert run.run_id == old


def test_non_zero_rank_logs_nothing(store, in_repo, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    run = tracking.start_training_run(
        model="gns", params={}, out_dir=in_repo / "r1", experiment="t3", tracking_uri=store
    )
    assert run is None and not (in_repo / "r1").exists()
    tracking.log_epoch(run, 0, {"train/loss": 1.0})  # no-op, no error


def test_evaluate_without_training_run_creates_one(store, in_repo):
    run = tracking.attach_run(model="forcenet", run_id=None, experiment="t4", tracking_uri=store)
    assert run is not None
    got = run.client.get_run(run.run_id)
    assert got.data.tags["stage"] == "evaluate"


def test_bad_run_id_file_is_rejected(tmp_path):
    (tmp_path / tracking.RUN_ID_FILE).write_text("../../etc\n")
    with pytest.raises(ValueError, match="run_id.txt"):
        tracking.read_run_id(tmp_path)


def test_a_benchmark_point_logged_twice_is_one_run(store, in_repo):
    import mlflow

    def log(model: str, steps: int, mae: float):
        return tracking.log_benchmark_point(
            f"accuracy {model}@4x",
            model=model,
            params={"budget": 4.0, "steps": steps},
            metrics={"val_id/forces_mae": mae},
            experiment="bench",
            tracking_uri=store,
        )

    first = log("forcenet", 14880, 0.03)
    again = log("forcenet", 14880, 0.029)
    other = log("schnet", 2440, 0.02)
    assert again.run_id == first.run_id != other.run_id
    run = mlflow.MlflowClient(tracking_uri=store).get_run(first.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["point"] == "accuracy forcenet@4x" and run.data.tags["model"] == "forcenet"
    assert run.data.params == {"budget": "4.0", "steps": "14880"}
    assert run.data.metrics["val_id/forces_mae"] == pytest.approx(0.029)  # the latest value
