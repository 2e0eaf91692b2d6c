"""A step budget makes training reproducible: the same params, seed and thread count give
bit-identical weights, whatever the machine's load (the wall clock plays no part)."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml
from test_train import GRAPH, make_frames, make_samples, tiny_config
from tiny import fit_split, tiny_kwargs, write_stores

from forcenet import checkpoint as C
from forcenet import train as T
from forcenet.schedule import lr_factor

TINY_FORCENET = tiny_kwargs(
    "forcenet", cutoff=GRAPH.cutoff, zero_init_decoder=True, basis_init_gain=30.0
)
GNS_ONE_LAYER = tiny_kwargs(
    "gns", hidden_channels=8, num_interactions=1, mlp_layers=1, cutoff=GRAPH.cutoff
)


@pytest.fixture(scope="module")
def samples() -> list[dict]:
    return make_samples()


def _state_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_step_budget_runs_are_bit_identical(samples, tmp_path, monkeypatch):
    cfg = tiny_config(max_epochs=50, max_steps=7, eval_every=3, rotation_augment=True)
    runs = []
    for k, name in enumerate(("a", "b")):
        # a slow and a fast "machine": the clock must not change anything
        ticks = iter(range(0, 10**7, 1 + 50 * k))
        monkeypatch.setattr(T.loop, "_now", lambda ticks=ticks: float(next(ticks)))
        seen = []
        fit_split(
            cfg,
            "forcenet",
            TINY_FORCENET,
            samples,
            tmp_path / name,
            graph=GRAPH,
            train=20,
            on_epoch_end=lambda s, m, seen=seen: seen.append((s, m)),
        )
        runs.append((seen, C.load_checkpoint(tmp_path / name / "last.pt")))
    (seen_a, a), (seen_b, b) = runs
    # 5 steps per epoch: dev evaluations every 3 steps, at the epoch end and at the budget
    assert [s for s, _ in seen_a] == [3, 5, 6, 7]
    assert a["step"] == b["step"] == 7
    assert _state_equal(a["model_state"], b["model_state"])
    assert [m["forces_mae"] for _, m in seen_a] == [m["forces_mae"] for _, m in seen_b]
    assert a["best_metric"] == b["best_metric"]
    # the time differed and the callback saw it, but it entered no result: the checkpoints
    # of the two runs are the same bytes
    assert [m["elapsed_s"] for _, m in seen_a] != [m["elapsed_s"] for _, m in seen_b]
    for file in ("last.pt", "best.pt"):
        assert (tmp_path / "a" / file).read_bytes() == (tmp_path / "b" / file).read_bytes()
    assert a["run"]["data"]["frames"] == 20 and a["run"]["train"]["max_steps"] == 7
    assert "elapsed_s" not in a["train_info"]["progress"]
    assert not {"elapsed_s", "graphs_per_s"} & set(a["train_info"]["metrics"])
    # the learning rate anneals over the step budget, not the epoch cap
    last = lr_factor(
        6,
        6 / 7,
        warmup_steps=cfg.warmup_steps,
        warmup_start=cfg.warmup_start,
        decay=cfg.lr_decay,
        milestones=cfg.milestones,
        gamma=cfg.gamma,
        min_factor=cfg.min_lr_factor,
    )
    assert seen_a[-1][1]["lr"] == pytest.approx(cfg.lr * last, rel=1e-9)


def test_wall_clock_cap_is_opt_in(samples, tmp_path, monkeypatch):
    """With no time budget a slow clock changes nothing; with one, training stops early."""
    ticks = iter(range(0, 10**8, 1000))  # 1000 "seconds" per clock read
    monkeypatch.setattr(T.loop, "_now", lambda: float(next(ticks)))
    steps = tiny_config(max_steps=6)
    fit_split(steps, "gns", GNS_ONE_LAYER, samples, tmp_path / "steps", graph=GRAPH, train=20)
    assert C.load_checkpoint(tmp_path / "steps" / "last.pt")["step"] == 6
    capped = tiny_config(max_steps=6, time_budget_s=2500.0)
    fit_split(capped, "gns", GNS_ONE_LAYER, samples, tmp_path / "capped", graph=GRAPH, train=20)
    assert C.load_checkpoint(tmp_path / "capped" / "last.pt")["step"] < 6


def test_invalid_step_budget_is_refused():
    with pytest.raises(ValueError, match="max_steps >= 0"):
        T.TrainConfig(max_steps=-1)
    with pytest.raises(ValueError, match="eval_every >= 0"):
        T.TrainConfig(eval_every=-5)


# ------------------------------------------------------------------- the train stage


def test_train_stage_twice_gives_identical_checkpoints(tmp_path, monkeypatch):
    """The DVC train stage twice from the same params.yaml: the output folders are the
    same file for file, byte for byte (weights, dev metrics, the learning curve in
    history.csv; nothing of the wall clock or the MLflow run), with the step count from
    params; the seconds went to the timing files."""
    from pipeline.train import main as train_stage

    root = tmp_path / "data"
    write_stores(
        root, make_frames(6, 4, seed=3), cutoff=GRAPH.cutoff, max_neighbors=GRAPH.max_neighbors
    )
    params = yaml.safe_load(open("params.yaml"))
    params = copy.deepcopy(params)
    params["graph"] = {**params["graph"], **GRAPH.as_dict()}
    params["model"]["hidden"] = 16  # ForceNet's width
    params["model"]["forcenet"].update(num_interactions=2, decoder_hidden_channels=16, num_freqs=8)
    params["train"]["forcenet"].update(max_steps=9, eval_every=4, batch_size=4)
    params["train"]["time_budget_s"] = 0
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    ckpts, curves = [], []
    for name in ("a", "b"):
        out = tmp_path / name
        train_stage(
            [
                "forcenet",
                "--out",
                str(out),
                "--frames",
                str(root / "lmdb"),
                "--graphs",
                str(root / "graphs"),
                "--params",
                str(path),
                "--timing",
                str(tmp_path / f"timing_{name}.json"),
            ]
        )
        ckpts.append({f: C.load_checkpoint(out / f) for f in ("best.pt", "last.pt")})
        curves.append((out / "history.csv").read_text())
    a, b = ckpts
    assert a["last.pt"]["step"] == 9
    history = pd.read_csv(tmp_path / "a" / "history.csv")
    assert history.step.tolist() == [4, 5, 8, 9] and curves[0].count("\n") == 5  # + epoch end
    assert not {"elapsed_s", "graphs_per_s"} & set(history.columns)
    files = {name: _folder_bytes(tmp_path / name) for name in ("a", "b")}
    assert {"best.pt", "last.pt", "history.csv"} <= set(files["a"])
    assert files["a"] == files["b"]
    timing = json.loads((tmp_path / "timing_a.json").read_text())
    assert timing["step"] == 9 and timing["train_seconds"] > 0
    assert [p["step"] for p in timing["curve"]] == [4, 5, 8, 9]
    for f in ("best.pt", "last.pt"):
        assert _state_equal(a[f]["model_state"], b[f]["model_state"]), f
        assert (
            a[f]["train_info"]["metrics"]["forces_mae"]
            == b[f]["train_info"]["metrics"]["forces_mae"]
        )


def _folder_bytes(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def test_the_same_state_saves_to_the_same_bytes(tmp_path):
    """A checkpoint is a function of its contents: saving one state twice (under other
    names; torch's zip writer stamps every entry with one fixed date) gives identical
    files, so DVC's hash follows the results."""
    model = torch.nn.Linear(3, 2)
    state = {
        "format_version": 1,
        "model_name": "forcenet",
        "model_kwargs": {"hidden_channels": 4},
        "model_state": model.state_dict(),
        "step": 3,
        "epoch": 0,
        "graph": {"cutoff": 4.5, "max_neighbors": 12},
        "train_info": {"progress": {"step": 3}, "metrics": {"forces_mae": 0.25}},
    }
    C.save_checkpoint(tmp_path / "one.pt", state)
    C.save_checkpoint(tmp_path / "two" / "best.pt", state)
    assert (tmp_path / "one.pt").read_bytes() == (tmp_path / "two" / "best.pt").read_bytes()


def test_gathers_backpropagate_deterministically_at_pipeline_sizes():
    """Backward through the edge gathers is bit-identical from call to call at the sizes
    of a training batch (advanced indexing would accumulate with atomic adds on CPU)."""
    from forcenet.geometry import edge_vectors
    from forcenet.models.gns import InteractionNetwork

    torch.manual_seed(0)
    n, e, g = 480, 24_000, 16
    pos = torch.randn(n, 3, dtype=torch.float64)
    batch = torch.arange(n) * g // n
    cell = torch.randn(g, 3, 3, dtype=torch.float64)
    edge_index = torch.randint(0, n, (2, e))
    offsets = torch.randint(-1, 2, (e, 3)).float()
    grads = []
    for _ in range(5):
        p = pos.clone().requires_grad_(True)
        vec = edge_vectors(p, cell, batch, edge_index, offsets)
        (vec.norm(dim=1).sin()).sum().backward()
        grads.append(p.grad)
    assert all(torch.equal(grads[0], x) for x in grads[1:])

    block = InteractionNetwork(
        hidden_channels=64, mlp_layers=2, activation="swish", batch_norm=True
    )
    h, edges = torch.randn(n, 64), torch.randn(e, 64)
    weight_grads = []
    for _ in range(5):
        block.zero_grad()
        out_h, out_e = block(h, edges, edge_index)
        (out_h.square().sum() + out_e.sum()).backward()
        weight_grads.append(block.lin_src.weight.grad.clone())
    assert all(torch.equal(weight_grads[0], x) for x in weight_grads[1:])
