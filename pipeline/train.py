"""Stage ``train``: one model, ``model.<name>`` and ``train.<name>`` from params.yaml.

Checks that the graph store was built with ``params.graph`` before any work (with
``graph.on_the_fly`` the store is not read: every batch's graph is built on the training
device with ``params.graph``), trains with :func:`forcenet.train.fit`, records the run in
MLflow (params, the learning curve with its seconds; the run tagged with ``OUT``) and
writes the learning curve to ``OUT/history.csv`` (one row per dev evaluation, results
only), so the report reads it from DVC-tracked outputs. With ``--timing``, the seconds
and training throughput go to that file (:mod:`pipeline.timing`), so that ``OUT`` is the
same, byte for byte, whenever the results are.

    python -m pipeline.train forcenet --frames data/lmdb --graphs data/graphs \
        --out data/models/forcenet --timing reports/timing/train_forcenet.json

Under torchrun every rank runs this; only rank 0 tracks and writes the history.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from forcenet.atomic import atomic_write
from forcenet.config import ConfigError, FieldError, parse, unknown_keys_message
from forcenet.data.graphs import GraphSettings, read_graph_settings
from forcenet.models import hyperparameters
from forcenet.outdir import exclusive_folder, prepare_run_folder
from forcenet.train import TrainConfig
from pipeline import stage, tracking
from pipeline.params import MODEL_NAMES, SHARED_TRAIN_KEYS, Params, load_params
from pipeline.stage import HISTORY_FILE
from pipeline.timing import CLOCK_METRICS, read_timing, write_timing


def model_kwargs(params: Params, name: str) -> dict[str, Any]:
    """Constructor kwargs of model ``name``: ``model.<name>`` (for ForceNet with its width
    ``model.hidden`` as ``hidden_channels``) plus ``graph.cutoff``; unknown arguments
    refused."""
    kwargs = params.model.of(name)
    allowed = hyperparameters(name) - {"cutoff"}
    if name == "forcenet":
        allowed -= {"hidden_channels"}
        if "hidden_channels" in kwargs:
            raise ConfigError(
                "model.forcenet.hidden_channels: ForceNet's width is model.hidden "
                "(e.g. dvc exp run -S model.hidden=512)"
            )
    unknown = sorted(set(kwargs) - allowed)
    if unknown:
        raise ConfigError(unknown_keys_message(f"model.{name}", unknown, allowed))
    if name == "forcenet":
        kwargs = {"hidden_channels": int(params.model.hidden), **kwargs}
    kwargs["cutoff"] = float(params.graph.cutoff)
    return kwargs


#: Data sources whose energies are already referenced (adsorption energies): the embedded
#: EMT data (clean slab + gas-phase references) and OC20 S2EF (its reference energies).
REFERENCED_SOURCES = ("emt", "oc20")


def train_config(params: Params, name: str) -> TrainConfig:
    """``train.<name>`` plus the shared keys, as a checked :class:`TrainConfig`.

    ``energy_reference: auto`` (the default when absent) picks ``mean`` for data whose
    energies are already referenced (:data:`REFERENCED_SOURCES`) and ``per_element``
    (least-squares e_Z on the training split) for your own files, whose raw total
    energies differ by hundreds of eV between compositions.
    """
    own = params.train.of(name)
    clash = sorted(set(own) & set(SHARED_TRAIN_KEYS))
    if clash:
        raise ConfigError(f"train.{name}: {clash} are shared keys; set them under train")
    if own.get("energy_reference", "auto") == "auto":
        referenced = params.data.source in REFERENCED_SOURCES
        own["energy_reference"] = "mean" if referenced else "per_element"
    shared = {k: getattr(params.train, k) for k in SHARED_TRAIN_KEYS}
    try:
        return parse(TrainConfig, {**shared, **own}, f"train.{name}")
    except FieldError as exc:  # a shared key's path is train.<key>
        field = exc.key.removeprefix(f"train.{name}.")
        if field in SHARED_TRAIN_KEYS:
            raise FieldError(f"train.{field}", exc.problem) from None
        raise


def snapshot(params: Params, name: str) -> dict[str, Any]:
    """The params model ``name``'s run depends on (logged to MLflow, kept in checkpoints)."""
    return {
        "model": {name: model_kwargs(params, name)},
        "train": {
            **{k: getattr(params.train, k) for k in SHARED_TRAIN_KEYS},
            name: params.train.of(name),
        },
        "graph": dataclasses.asdict(params.graph),
        "data": {"source": params.data.source},
    }


class History:
    """The learning curve in ``out/history.csv``: one row per dev evaluation (``step`` and
    the metrics of :func:`forcenet.train.fit`'s callback but the wall-clock ones,
    :data:`pipeline.timing.CLOCK_METRICS`). A resumed run keeps the rows before its first
    new evaluation."""

    def __init__(self, out: Path, *, resume: bool) -> None:
        self.path = Path(out) / HISTORY_FILE
        self.rows: list[dict[str, Any]] = []
        if resume and self.path.is_file():
            old = pd.read_csv(self.path)  # one an older version wrote may hold seconds
            self.rows = old.drop(columns=[c for c in CLOCK_METRICS if c in old]).to_dict("records")

    def add(self, step: int, metrics: dict[str, float]) -> None:
        self.rows = [r for r in self.rows if int(r["step"]) < step]
        kept = {k: v for k, v in metrics.items() if k != "step" and k not in CLOCK_METRICS}
        self.rows.append({"step": int(step), **kept})
        with atomic_write(self.path) as tmp:
            pd.DataFrame(self.rows).to_csv(tmp, index=False)


class Timing:
    """The seconds of a training run in the timing file ``path`` (:mod:`pipeline.timing`),
    rewritten after each dev evaluation. A resumed run keeps the curve rows before its
    first new evaluation; its seconds add to those of the earlier runs when the
    checkpoint does not carry them (it does only under a wall-clock cap)."""

    def __init__(self, path: Path, *, resume: bool, last: Path) -> None:
        self.path = Path(path)
        self.curve: list[dict[str, float]] = []
        self.offset = 0.0
        self.run_id: str | None = None  # the MLflow run, named in the file
        old = read_timing(self.path) if resume else None
        if old is not None and last.is_file():
            self.curve = [dict(r) for r in old.get("curve", []) if isinstance(r, dict)]
            if not _checkpoint_has_clock(last):
                self.offset = float(old.get("train_seconds") or 0.0)

    def add(self, step: int, metrics: dict[str, float]) -> None:
        seconds = self.offset + float(metrics.get("elapsed_s", float("nan")))
        rate = float(metrics.get("graphs_per_s", float("nan")))
        self.curve = [r for r in self.curve if int(r.get("step", 0)) < step]
        self.curve.append({"step": int(step), "elapsed_s": seconds, "graphs_per_s": rate})
        data = {"step": int(step), "train_seconds": seconds, "graphs_per_s": rate}
        write_timing(self.path, {**data, "curve": self.curve, "mlflow_run_id": self.run_id})


def _checkpoint_has_clock(last: Path) -> bool:
    """Whether ``last`` stores the seconds trained (so training's clock continues them)."""
    from forcenet.checkpoint import load_checkpoint

    progress = load_checkpoint(last).get("train_info", {}).get("progress", {})
    return "elapsed_s" in progress


def graph_settings(params: Params) -> GraphSettings:
    """``params.graph`` as the library's :class:`GraphSettings`."""
    return GraphSettings(params.graph.cutoff, params.graph.max_neighbors)


def check_graphs(params: Params, graphs_dir: Path) -> GraphSettings:
    """The graph store's settings, refused unless they are ``params.graph``."""
    stored = read_graph_settings(graphs_dir)
    stored.check_same(graph_settings(params), where=str(graphs_dir), other_name="params.yaml graph")
    return stored


def train_model(
    name: str,
    params: Params,
    *,
    frames: Path,
    graphs: Path,
    out: Path,
    resume: bool,
    overwrite: bool = False,
    allow_changed: bool = False,
    timing: Path | None = None,
) -> Path:
    """Train model ``name`` on ``frames/train`` + ``graphs/train``; checkpoints in ``out``,
    which one run at a time may use (rank 0 holds its lock). Returns the checkpoint to
    evaluate (``best.pt``). A fresh run (not ``resume``) starts a fresh MLflow run and
    refuses a folder holding an earlier run unless ``overwrite``. A resume with other
    settings or training data than the run's is refused unless ``allow_changed``.
    ``timing``: the file for the run's seconds (:class:`Timing`)."""
    cfg = train_config(params, name)
    kwargs = model_kwargs(params, name)
    if not params.graph.on_the_fly:  # before any work: graphs built with params.graph
        check_graphs(params, graphs / "train")
    if not tracking.is_rank_zero():
        return _train(name, params, cfg, kwargs, frames, graphs, out, resume, allow_changed, None)
    with exclusive_folder(out):
        prepare_run_folder(out, resume=resume, overwrite=overwrite)
        return _train(name, params, cfg, kwargs, frames, graphs, out, resume, allow_changed, timing)


def _train(
    name: str,
    params: Params,
    cfg: TrainConfig,
    kwargs: dict[str, Any],
    frames: Path,
    graphs: Path,
    out: Path,
    resume: bool,
    allow_changed: bool,
    timing: Path | None,
) -> Path:
    from forcenet.train import fit

    snap = snapshot(params, name)
    on_the_fly = params.graph.on_the_fly
    run = tracking.start_training_run(model=name, params=snap, out_dir=out, resume=resume)
    history = History(out, resume=resume) if tracking.is_rank_zero() else None
    clock = Timing(timing, resume=resume, last=out / "last.pt") if timing is not None else None
    if clock is not None:
        clock.run_id = run.run_id if run is not None else None

    def on_eval(step: int, metrics: dict[str, float]) -> None:
        tracking.log_epoch(run, step, metrics)
        if history is not None:
            history.add(step, metrics)
        if clock is not None:
            clock.add(step, metrics)

    try:
        best = fit(
            cfg,
            name,
            kwargs,
            train_dir=frames / "train",
            graphs_dir=None if on_the_fly else graphs / "train",
            graph=graph_settings(params) if on_the_fly else None,
            out_dir=out,
            resume=resume,
            allow_changed=allow_changed,
            params_snapshot=snap,
            on_epoch_end=on_eval,
        )
    except BaseException:
        tracking.finish_run(run, status="FAILED")
        forget_unstarted_run(out)
        raise
    tracking.finish_run(run)
    return best


def forget_unstarted_run(out: Path) -> None:
    """After a failed run that wrote no checkpoint: remove its ``run_id.txt``, so the next
    fresh run starts without ``--overwrite`` (the MLflow run stays, marked FAILED)."""
    if tracking.is_rank_zero() and not (Path(out) / "last.pt").is_file():
        (Path(out) / tracking.RUN_ID_FILE).unlink(missing_ok=True)


def main(argv: Sequence[str] | None = None) -> None:
    p = stage.parser(__doc__)
    p.add_argument("model", choices=MODEL_NAMES)
    p.add_argument("--frames", type=Path, required=True, help="LMDB frame root holding train/")
    p.add_argument(
        "--graphs", type=Path, required=True, help="graph root holding train/ (unread on the fly)"
    )
    p.add_argument("--out", type=Path, required=True, help="checkpoint folder")
    p.add_argument("--timing", type=Path, help="timing file (seconds, graphs/s) of the run")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--resume", action="store_true", help="continue from OUT/last.pt")
    mode.add_argument(
        "--overwrite", action="store_true", help="replace an earlier run in OUT (fresh run)"
    )
    p.add_argument(
        "--allow-changed",
        action="store_true",
        help="with --resume: continue although the settings or data differ from the run's",
    )
    args = p.parse_args(argv)
    if args.allow_changed and not args.resume:
        p.error("--allow-changed is for --resume")
    params = load_params(args.params)
    best = train_model(
        args.model,
        params,
        frames=args.frames,
        graphs=args.graphs,
        out=args.out,
        resume=args.resume,
        overwrite=args.overwrite,
        allow_changed=args.allow_changed,
        timing=args.timing,
    )
    print(f"train {args.model}: done; checkpoint to evaluate: {best}")


if __name__ == "__main__":
    stage.run(main)
