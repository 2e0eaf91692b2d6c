"""The pipeline layer: params.yaml checked key by key, and stages that refuse bad input
before they start work."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import yaml
from tiny import write_stores

from forcenet.config import ConfigError
from pipeline.params import MODEL_NAMES, load_params, params_from_mapping
from pipeline.train import model_kwargs, snapshot, train_config

ROOT = Path(__file__).resolve().parents[1]
PARAMS = yaml.safe_load((ROOT / "params.yaml").read_text())


def _with(dotted: str, value) -> dict:
    params = copy.deepcopy(PARAMS)
    node = params
    *parents, last = dotted.split(".")
    for part in parents:
        node = node[part]
    node[last] = value
    return params


def test_the_project_params_load_and_compose():
    params = load_params(ROOT / "params.yaml")
    for name in MODEL_NAMES:
        kwargs = model_kwargs(params, name)
        assert kwargs["cutoff"] == params.graph.cutoff
        assert train_config(params, name).max_steps == PARAMS["train"][name]["max_steps"]
        assert snapshot(params, name)["model"] == {name: kwargs}


def test_model_hidden_is_forcenets_width_only():
    params = params_from_mapping(_with("model.hidden", 512))
    assert model_kwargs(params, "forcenet")["hidden_channels"] == 512
    assert (
        model_kwargs(params, "gns")["hidden_channels"] == PARAMS["model"]["gns"]["hidden_channels"]
    )


def test_typo_in_a_section_is_refused_with_a_suggestion():
    params = copy.deepcopy(PARAMS)
    params["graph"]["cuttoff"] = params["graph"].pop("cutoff")
    with pytest.raises(ConfigError, match=r"unknown key 'cuttoff' \(did you mean 'cutoff'\?\)"):
        params_from_mapping(params)


def test_typo_in_the_physics_block_is_refused_with_a_suggestion():
    params = copy.deepcopy(PARAMS)
    params["physics"]["md"]["timestep"] = params["physics"]["md"].pop("timestep_fs")
    with pytest.raises(
        ConfigError, match=r"physics\.md: unknown key 'timestep' \(did you mean 'timestep_fs'\?\)"
    ):
        params_from_mapping(params)


def test_unknown_top_level_section_is_refused():
    params = copy.deepcopy(PARAMS)
    params["evalute"] = {"batch_size": 8}
    with pytest.raises(ConfigError, match=r"'evalute' \(did you mean 'evaluate'\?\)"):
        params_from_mapping(params)


@pytest.mark.parametrize(
    ("dotted", "value", "message"),
    [
        ("graph.cutoff", "six", r"graph\.cutoff: expected a number, got 'six'"),
        ("graph.max_neighbors", 24.9, r"graph\.max_neighbors: expected an integer"),
        ("graph.max_neighbors", 0, r"graph\.max_neighbors: must be >= 1"),
        ("relax.optimizer", "bfgs", r"relax\.optimizer: 'bfgs' is not one of"),
        ("relax.hybrid", "yes", r"relax\.hybrid: expected true/false"),
        ("relax.oracle_fmax", 0.0, r"relax\.oracle_fmax: must be > 0"),
        ("graph.on_the_fly", 1, r"graph\.on_the_fly: expected true/false"),
        ("physics.md.steps", 0, r"physics\.md\.steps: must be >= 1"),
        ("physics.md.timestep_fs", -0.5, r"physics\.md\.timestep_fs: must be > 0"),
        ("physics.conservation.structures", 0, r"physics\.conservation\.structures: must be >= 1"),
        ("physics.splits", [], r"physics\.splits: name at least one split"),
    ],
)
def test_wrong_values_name_their_key(dotted, value, message):
    with pytest.raises(ConfigError, match=message):
        params_from_mapping(_with(dotted, value))


def test_model_and_training_typos_are_refused_by_the_train_stage():
    params = params_from_mapping(_with("model.forcenet.num_interaction", 2))
    with pytest.raises(
        ConfigError, match=r"'num_interaction' \(did you mean 'num_interactions'\?\)"
    ):
        model_kwargs(params, "forcenet")
    params = params_from_mapping(_with("train.gns.max_step", 8))
    with pytest.raises(ConfigError, match=r"train\.gns.*'max_step' \(did you mean 'max_steps'\?\)"):
        train_config(params, "gns")


@pytest.mark.parametrize("section", ["model", "train"])
def test_model_sections_are_those_of_the_pipelines_models(section):
    """``model`` and ``train`` hold one section per model of dvc.yaml: a misspelt one is
    refused with a suggestion, a missing one or one that is not a mapping by its key."""
    params = copy.deepcopy(PARAMS)
    params[section]["schnett"] = params[section].pop("schnet")
    with pytest.raises(
        ConfigError, match=rf"{section}: unknown key 'schnett' \(did you mean 'schnet'\?\)"
    ):
        params_from_mapping(params)
    del params[section]["schnett"]
    with pytest.raises(ConfigError, match=rf"{section}\.schnet: missing"):
        params_from_mapping(params)
    with pytest.raises(ConfigError, match=rf"{section}\.gns: expected a mapping"):
        params_from_mapping(_with(f"{section}.gns", 3))


def test_every_pipeline_model_has_its_sections():
    """The models of the pipeline are dvc.yaml's list, and each reads its own sections."""
    pipeline = yaml.safe_load((ROOT / "dvc.yaml").read_text())
    assert list(MODEL_NAMES) == list(pipeline["vars"][0]["models"])
    params = load_params(ROOT / "params.yaml")
    for name in MODEL_NAMES:
        assert params.model.of(name) == PARAMS["model"][name]
        assert params.train.of(name) == PARAMS["train"][name]
    with pytest.raises(ConfigError, match="unknown model 'painn'"):
        params.model.of("painn")


def test_load_params_names_the_file(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(_with("graph.cutoff", "six")))
    with pytest.raises(ConfigError, match=str(path)):
        load_params(path)


def test_a_section_given_twice_is_refused_naming_file_and_lines(tmp_path):
    """A params file with two ``graph:`` sections (YAML would keep the last and ignore the
    first unseen) is refused, naming the file and both lines."""
    text = (ROOT / "params.yaml").read_text()
    path = tmp_path / "params.yaml"
    path.write_text(text + "graph:\n  cutoff: 5.0\n  max_neighbors: 50\n  on_the_fly: false\n")
    first = 1 + text.splitlines().index("graph:")
    last = len(text.splitlines()) + 1
    with pytest.raises(
        ConfigError,
        match=rf"{path}, line {last}: key 'graph' is given twice \(first on line {first}\)",
    ):
        load_params(path)
    path.write_text("graph: {cutoff: 6.0, cutoff: 5.0}\n")
    with pytest.raises(ConfigError, match="key 'cutoff' is given twice"):
        load_params(path)


def test_evaluate_stage_refuses_an_output_that_is_an_input(tmp_path, monkeypatch):
    """A failed run removes its outputs: one equal to the checkpoint deleted it."""
    import forcenet.evaluate
    from pipeline import evaluate as stage

    def failing(*args, **kwargs):
        raise RuntimeError("evaluation failed")

    monkeypatch.setattr(forcenet.evaluate, "evaluate_checkpoint", failing)
    monkeypatch.setattr("forcenet.checkpoint.load_checkpoint", lambda p: {"model_name": "gns"})
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    ckpt = tmp_path / "models" / "best.pt"
    ckpt.parent.mkdir()
    ckpt.write_bytes(b"checkpoint")
    args = [str(ckpt), str(tmp_path / "val_id"), "--graphs", str(tmp_path)]
    args += ["--out", str(tmp_path / "m.parquet"), "--predictions", str(tmp_path / "p.parquet")]
    args += ["--metrics-json", str(ckpt), "--params", str(ROOT / "params.yaml")]
    with pytest.raises(
        ValueError, match=r"--metrics-json .*best.pt is the same file as the checkpoint"
    ):
        stage.main(args)
    assert ckpt.read_bytes() == b"checkpoint"


def test_train_stage_refuses_graphs_built_with_other_settings(tmp_path, monkeypatch):
    """Graphs built at 4 Å, params saying 6 Å: refused before training, naming the store."""
    from test_train import make_frames

    from pipeline.train import main as train_stage

    root = tmp_path / "data"
    write_stores(root, make_frames(2, 3, seed=1), cutoff=4.0, max_neighbors=12)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(_with("graph.cutoff", 6.0)))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    args = [
        "gns",
        "--out",
        str(tmp_path / "out"),
        "--frames",
        str(root / "lmdb"),
        "--graphs",
        str(root / "graphs"),
        "--params",
        str(path),
    ]
    with pytest.raises(ValueError, match=r"graphs/train: graphs built with cutoff=4\.0"):
        train_stage(args)
    assert not (tmp_path / "out").exists()  # no run, no checkpoint folder
    assert not (tmp_path / "mlflow.db").exists()


# ------------------------------------------------------------- one run per output folder


def _tiny_stores(root: Path) -> None:
    from test_train import make_frames

    write_stores(root, make_frames(6, 4, seed=3), cutoff=4.0, max_neighbors=12)


def _tiny_params(tmp_path: Path) -> Path:
    params = copy.deepcopy(PARAMS)
    params["graph"] = {"cutoff": 4.0, "max_neighbors": 12, "on_the_fly": False}
    params["model"]["gns"].update(hidden_channels=8, num_interactions=1, num_radial=4)
    params["train"]["gns"].update(max_steps=3, eval_every=0, batch_size=4)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    return path


def test_a_fresh_run_never_reopens_or_mixes_with_an_earlier_one(tmp_path, monkeypatch):
    """A second fresh run into the same folder is refused, naming --resume and --overwrite;
    --overwrite starts a fresh MLflow run; --resume continues the same one."""
    from pipeline.tracking import training_run_id
    from pipeline.train import main as train_stage

    def read_run_id(out):
        return training_run_id(out, tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")

    root = tmp_path / "data"
    _tiny_stores(root)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    out = tmp_path / "out"
    base = [
        "gns",
        "--out",
        str(out),
        "--frames",
        str(root / "lmdb"),
        "--graphs",
        str(root / "graphs"),
        "--params",
        str(_tiny_params(tmp_path)),
    ]
    train_stage(base)
    first = read_run_id(out)
    with pytest.raises(FileExistsError, match=r"holds an earlier run .*--resume.*--overwrite"):
        train_stage(base)
    train_stage([*base, "--overwrite"])
    second = read_run_id(out)
    assert second != first
    train_stage([*base, "--resume"])
    assert read_run_id(out) == second


def test_a_bad_setting_or_a_failed_start_leaves_nothing_that_blocks_a_fresh_run(
    tmp_path, monkeypatch
):
    """An infinite lr is refused before any work, naming its key; a run that fails before
    its first checkpoint leaves nothing in its folder, so the next fresh run needs no
    --overwrite (the MLflow run is found by its tag, no run_id.txt is written)."""
    from forcenet.train import NonFiniteError, loop
    from pipeline.train import main as train_stage

    root = tmp_path / "data"
    _tiny_stores(root)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    good = _tiny_params(tmp_path)
    bad = yaml.safe_load(good.read_text())
    bad["train"]["gns"]["lr"] = float("inf")
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(bad))
    out = tmp_path / "out"
    args = ["gns", "--out", str(out), "--frames", str(root / "lmdb"), "--graphs"]
    args += [str(root / "graphs")]
    with pytest.raises(ConfigError, match=r"^train\.gns\.lr: inf is not a finite number"):
        train_stage([*args, "--params", str(tmp_path / "bad.yaml")])
    assert not out.exists()

    def diverge(*args, **kwargs):
        raise NonFiniteError("loss is nan")

    with monkeypatch.context() as m:
        m.setattr(loop, "train_step", diverge)
        with pytest.raises(NonFiniteError, match="at step 1"):
            train_stage([*args, "--params", str(good)])
    assert not (out / "run_id.txt").exists() and not (out / "last.pt").exists()
    train_stage([*args, "--params", str(good)])  # a fresh run, no --overwrite needed
    assert (out / "last.pt").is_file() and not (out / "run_id.txt").exists()


def test_evaluate_logs_non_ascii_split_names_and_leaves_nothing_on_failure(tmp_path, monkeypatch):
    """A split named after a file with non-ASCII characters reaches MLflow under a safe
    key; the tables hold results only, the throughput goes to the timing file; when
    anything fails, no output that looks complete is left."""
    import pandas as pd

    import forcenet.checkpoint
    import forcenet.evaluate
    from pipeline import evaluate as stage
    from pipeline import tracking

    table = pd.DataFrame(
        {
            "model": "gns",
            "split": ["vål_ïd"] * 3,
            "metric": ["forces_mae", "forces_cos", "inference_graphs_per_s"],
            "value": [0.1, 0.5, 1234.0],
            "run_id": "",
        }
    )

    def fake_evaluate(checkpoint, inputs, *, graphs, batch_size, predictions, on_the_fly):
        assert on_the_fly is False  # the default: graphs read from the store
        predictions.write_bytes(b"predictions")
        return table.copy()

    monkeypatch.setattr(forcenet.evaluate, "evaluate_checkpoint", fake_evaluate)
    monkeypatch.setattr(forcenet.checkpoint, "load_checkpoint", lambda p: {"model_name": "gns"})
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    ckpt = tmp_path / "models" / "best.pt"
    ckpt.parent.mkdir()
    ckpt.write_bytes(b"checkpoint")
    outs = {k: tmp_path / f"out.{k}" for k in ("parquet", "json", "pred", "timing")}
    args = [
        str(ckpt),
        str(tmp_path),
        "--graphs",
        str(tmp_path),
        "--out",
        str(outs["parquet"]),
        "--metrics-json",
        str(outs["json"]),
        "--predictions",
        str(outs["pred"]),
        "--timing",
        str(outs["timing"]),
        "--params",
        str(ROOT / "params.yaml"),
    ]
    stage.main(args)
    assert all(p.is_file() for p in outs.values())
    # the DVC metrics file holds the figures a user compares, not throughput or counts
    assert json.loads(outs["json"].read_text()) == {
        "vål_ïd": {"forces_mae": 0.1, "forces_cos": 0.5}
    }
    written = pd.read_parquet(outs["parquet"])
    assert written.metric.tolist() == ["forces_mae", "forces_cos"]
    assert set(written.run_id) == {""}  # the MLflow run is named in the timing file
    timing = json.loads(outs["timing"].read_text())
    assert timing["splits"] == {"vål_ïd": {"inference_graphs_per_s": 1234.0}}
    import mlflow

    runs = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").search_runs(["1"])
    assert runs[0].data.metrics["val_id/forces_mae"] == pytest.approx(0.1)
    assert runs[0].data.metrics["val_id/inference_graphs_per_s"] == pytest.approx(1234.0)
    assert timing["mlflow_run_id"] == runs[0].info.run_id

    for p in outs.values():
        p.unlink()

    def refuse(*args, **kwargs):
        raise RuntimeError("artifact store unavailable")

    monkeypatch.setattr(tracking, "log_artifacts", refuse)
    with pytest.raises(RuntimeError, match="artifact store"):
        stage.main(args)
    assert not any(p.exists() for p in outs.values())


def test_graph_on_the_fly_reaches_training_and_evaluation(tmp_path, monkeypatch):
    """graph.on_the_fly: training gets no graph store but params.graph's settings (no
    store is read or checked: there is none), and evaluation builds its graphs too."""
    import pandas as pd

    import forcenet.checkpoint
    import forcenet.evaluate
    import forcenet.train
    from forcenet.data.graphs import GraphSettings
    from pipeline import evaluate as evaluate_stage
    from pipeline.train import main as train_stage

    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(_with("graph.on_the_fly", True)))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    seen: dict = {}

    def fake_fit(cfg, name, kwargs, *, train_dir, graphs_dir, graph, out_dir, **rest):
        seen["fit"] = {"graphs_dir": graphs_dir, "graph": graph}
        return Path(out_dir) / "best.pt"

    monkeypatch.setattr(forcenet.train, "fit", fake_fit)
    out = tmp_path / "out"
    missing = tmp_path / "no-graphs"
    base = ["gns", "--frames", str(tmp_path), "--graphs", str(missing), "--out", str(out)]
    train_stage([*base, "--params", str(params)])
    cutoff, neighbors = PARAMS["graph"]["cutoff"], PARAMS["graph"]["max_neighbors"]
    assert seen["fit"] == {"graphs_dir": None, "graph": GraphSettings(cutoff, neighbors)}

    def fake_evaluate(checkpoint, inputs, *, graphs, batch_size, predictions, on_the_fly):
        seen["evaluate"] = on_the_fly
        predictions.write_bytes(b"predictions")
        return pd.DataFrame(
            {"model": "gns", "split": "val_id", "metric": ["forces_mae"], "value": [0.1]}
        )

    monkeypatch.setattr(forcenet.evaluate, "evaluate_checkpoint", fake_evaluate)
    monkeypatch.setattr(forcenet.checkpoint, "load_checkpoint", lambda p: {"model_name": "gns"})
    (out / "best.pt").write_bytes(b"checkpoint")
    args = [str(out / "best.pt"), str(tmp_path), "--graphs", str(missing)]
    args += ["--out", str(tmp_path / "eval.parquet"), "--params", str(params)]
    args += ["--metrics-json", str(tmp_path / "m.json"), "--predictions", str(tmp_path / "p")]
    evaluate_stage.main(args)
    assert seen["evaluate"] is True


def test_energy_reference_follows_the_data_source():
    """Referenced adsorption energies (emt, oc20) keep the mean shift; your own files,
    raw totals, get per-element reference energies; an explicit value wins."""
    assert train_config(params_from_mapping(PARAMS), "schnet").energy_reference == "mean"
    own = _with("data.source", "files")
    assert train_config(params_from_mapping(own), "schnet").energy_reference == "per_element"
    own["train"]["schnet"]["energy_reference"] = "mean"
    assert train_config(params_from_mapping(own), "schnet").energy_reference == "mean"


def test_a_resumed_run_adds_its_seconds_to_the_earlier_ones(tmp_path):
    """The train stage's timing file: checkpoints hold no clock, so a resumed run's
    seconds start from those the file holds; its curve keeps the earlier points."""
    import torch
    from tiny import save_model_checkpoint

    from pipeline.timing import read_timing
    from pipeline.train import Timing

    last, path = tmp_path / "last.pt", tmp_path / "timing.json"
    first = Timing(path, resume=False, last=last)
    first.add(4, {"elapsed_s": 10.0, "graphs_per_s": 3.0, "forces_mae": 0.2})
    first.add(8, {"elapsed_s": 20.0, "graphs_per_s": 3.0})
    save_model_checkpoint(last, "gns", torch.nn.Linear(1, 1), {}, cutoff=4.0, max_neighbors=8)
    again = Timing(path, resume=True, last=last)
    again.add(12, {"elapsed_s": 5.0, "graphs_per_s": 4.0})
    data = read_timing(path)
    assert data["step"] == 12 and data["train_seconds"] == 25.0 and data["graphs_per_s"] == 4.0
    assert [(p["step"], p["elapsed_s"]) for p in data["curve"]] == [
        (4, 10.0),
        (8, 20.0),
        (12, 25.0),
    ]
    fresh = Timing(path, resume=False, last=last)
    fresh.add(4, {"elapsed_s": 1.0, "graphs_per_s": 2.0})
    assert read_timing(path)["curve"] == [{"step": 4, "elapsed_s": 1.0, "graphs_per_s": 2.0}]
