"""MLflow tracking: one run per model per experiment, shared by the train and evaluate stages.

Store: ``$MLFLOW_TRACKING_URI`` when set, else ``sqlite:///<repo root>/mlflow.db`` with
artifacts under ``<repo root>/mlartifacts``. The repo root is ``$DVC_ROOT`` (set by DVC,
also inside queued/temp experiments that run in ``.dvc/tmp/exps``), else the git
top-level, else the working directory, so every experiment logs into one store.

Train and evaluate are separate processes (separate DVC stages). The train stage calls
:func:`start_training_run`, which tags the run with its output folder (tag
:data:`OUT_DIR_TAG`, the resolved path; reopened on resume); the evaluate stage finds it
with :func:`training_run_id` and calls :func:`attach_run` with that id, logging its final
metrics as ``<split>/<metric>``. The run id is not written into the output folder: a
fresh run gets a new id, and a DVC output must not change when the results do not
(folders of older runs with a ``run_id.txt`` are still read). Only rank 0 logs: on other
ranks the functions return ``None`` and the logging functions accept ``None`` as a no-op.

The functions use :class:`mlflow.MlflowClient` with an explicit run id, never MLflow's
global "active run", so several runs can be open in one process (tests, notebooks).
"""

from __future__ import annotations

import math
import os
import re
import subprocess
import time
import unicodedata
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd

from forcenet.distributed import is_rank_zero

if TYPE_CHECKING:
    from mlflow import MlflowClient

#: Where older versions kept the training run's id, inside its output folder (still read).
RUN_ID_FILE = "run_id.txt"
#: The tag naming a training run's output folder (resolved path), to find it again.
OUT_DIR_TAG = "out_dir"
DEFAULT_EXPERIMENT = "forcenet"
_MAX_PARAM_LEN = 6000  # MLflow's limit on a param value


@dataclass(frozen=True)
class TrackedRun:
    """An open MLflow run: the client bound to its store and the run id."""

    client: MlflowClient  # imported lazily: mlflow is slow to import
    run_id: str
    experiment_id: str


def repo_root() -> Path:
    """``$DVC_ROOT``, else the git top-level of the working directory, else the cwd."""
    if os.environ.get("DVC_ROOT"):
        return Path(os.environ["DVC_ROOT"]).resolve()
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--show-toplevel"], capture_output=True, text=True, check=True
        )
        return Path(out.stdout.strip()).resolve()
    except (OSError, subprocess.CalledProcessError):
        return Path.cwd().resolve()


def default_tracking_uri(root: Path | None = None) -> str:
    """``$MLFLOW_TRACKING_URI`` if set, else ``sqlite:///<root>/mlflow.db``."""
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    root = root or repo_root()
    return f"sqlite:///{(root / 'mlflow.db').as_posix()}"


def git_commit(root: Path | None = None) -> str | None:
    """The HEAD commit of the repository at ``root`` (None outside git)."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=root or repo_root(),
            capture_output=True,
            text=True,
            check=True,
        )
        return out.stdout.strip() or None
    except (OSError, subprocess.CalledProcessError):
        return None


def flatten_params(params: Mapping, prefix: str = "") -> dict[str, str]:
    """Nested params -> ``{"a.b.c": "value"}`` strings, as MLflow params must be."""
    flat: dict[str, str] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten_params(value, prefix=f"{name}."))
        else:
            flat[name] = str(value)[:_MAX_PARAM_LEN]
    return flat


def _client(tracking_uri: str | None):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri or default_tracking_uri())


def _experiment_id(client, name: str, root: Path | None) -> str:
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    artifacts = ((root or repo_root()) / "mlartifacts").resolve()
    artifacts.mkdir(parents=True, exist_ok=True)
    return client.create_experiment(name, artifact_location=artifacts.as_uri())


def _base_tags(model: str, stage: str, root: Path | None) -> dict[str, str]:
    tags = {"model": model, "stage": stage}
    commit = git_commit(root)
    if commit:
        tags["mlflow.source.git.commit"] = commit
    if os.environ.get("DVC_EXP_NAME"):
        tags["dvc.exp_name"] = os.environ["DVC_EXP_NAME"]
    return tags


def _log_tags(run: TrackedRun, tags: Mapping[str, str]) -> None:
    for key, value in tags.items():
        run.client.set_tag(run.run_id, key, value)


def read_run_id(folder: Path) -> str | None:
    """The run id that older versions of the train stage stored in ``folder/run_id.txt``
    (None if absent)."""
    path = Path(folder) / RUN_ID_FILE
    if not path.is_file():
        return None
    run_id = path.read_text().strip()
    if not run_id or not run_id.isalnum():
        raise ValueError(f"{path}: not an MLflow run id: {run_id[:60]!r}")
    return run_id


def _folder_tag(folder: Path) -> str:
    return str(Path(folder).resolve())


def _newest_run_of(client, experiment_id: str, folder: Path):
    """The newest run of ``experiment_id`` tagged with output folder ``folder``, or None."""
    value = _folder_tag(folder).replace("\\", "\\\\").replace("'", "\\'")
    found = client.search_runs(
        [experiment_id],
        filter_string=f"tags.{OUT_DIR_TAG} = '{value}'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    return found[0] if found else None


def training_run_id(
    folder: Path, *, experiment: str = DEFAULT_EXPERIMENT, tracking_uri: str | None = None
) -> str | None:
    """The id of the newest training run whose output folder is ``folder`` (found by its
    :data:`OUT_DIR_TAG` tag), else the one an older version wrote into
    ``folder/run_id.txt``; None when there is neither (or no tracking store yet)."""
    client = _client(tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    run = _newest_run_of(client, exp.experiment_id, folder) if exp is not None else None
    return run.info.run_id if run is not None else read_run_id(folder)


def _existing_run(client, run_id: str | None):
    if run_id is None:
        return None
    from mlflow.exceptions import MlflowException

    try:
        return client.get_run(run_id)
    except MlflowException:
        return None


def start_training_run(
    *,
    model: str,
    params: Mapping,
    out_dir: Path,
    resume: bool = False,
    experiment: str = DEFAULT_EXPERIMENT,
    tracking_uri: str | None = None,
) -> TrackedRun | None:
    """Open the run of ``model`` for the train stage (rank 0 only, else None).

    ``resume``: reopen the newest run of ``out_dir`` (:func:`training_run_id`) when it
    exists in the store (a resumed training keeps its curves). Otherwise, or when there is
    no such run, create a fresh run tagged with ``out_dir``.
    Logs the flattened ``params`` and the tags model, stage, git commit, DVC experiment
    name and output folder.
    """
    if not is_rank_zero():
        return None
    client = _client(tracking_uri)
    exp_id = _experiment_id(client, experiment, None)
    found = None
    if resume:
        found = _newest_run_of(client, exp_id, out_dir) or _existing_run(
            client, read_run_id(out_dir)
        )
    if found is not None and found.info.experiment_id == exp_id:
        run = TrackedRun(client, found.info.run_id, exp_id)
        client.update_run(run.run_id, status="RUNNING")
    else:
        run_name = os.environ.get("DVC_EXP_NAME", "")
        run_name = f"{model}-{run_name}" if run_name else model
        created = client.create_run(exp_id, run_name=run_name)
        run = TrackedRun(client, created.info.run_id, exp_id)
    _log_tags(run, _base_tags(model, "train", None) | {OUT_DIR_TAG: _folder_tag(out_dir)})
    log_params(run, params)
    return run


def attach_run(
    *,
    model: str,
    run_id: str | None = None,
    experiment: str = DEFAULT_EXPERIMENT,
    tracking_uri: str | None = None,
    stage: str = "evaluate",
) -> TrackedRun | None:
    """Reopen ``run_id`` (e.g. from :func:`training_run_id`) or, if it is None or not in the
    store, create a new run for ``model``; rank 0 only, else None."""
    if not is_rank_zero():
        return None
    client = _client(tracking_uri)
    found = _existing_run(client, run_id)
    if found is not None:
        run = TrackedRun(client, found.info.run_id, found.info.experiment_id)
        client.update_run(run.run_id, status="RUNNING")
        client.set_tag(run.run_id, f"stage.{stage}", "done")
        return run
    exp_id = _experiment_id(client, experiment, None)
    created = client.create_run(exp_id, run_name=model)
    run = TrackedRun(client, created.info.run_id, exp_id)
    _log_tags(run, _base_tags(model, stage, None))
    return run


def log_params(run: TrackedRun | None, params: Mapping) -> None:
    """Log flattened params; keys already logged with the same value are skipped
    (MLflow refuses to change a logged param, so a changed value raises)."""
    if run is None:
        return
    from mlflow.entities import Param

    logged = run.client.get_run(run.run_id).data.params
    items = [Param(k, v) for k, v in flatten_params(params).items() if logged.get(k) != v]
    for start in range(0, len(items), 100):  # MLflow accepts at most 100 params per batch
        run.client.log_batch(run.run_id, params=items[start : start + 100])


def log_metrics(run: TrackedRun | None, metrics: Mapping[str, float], *, step: int = 0) -> None:
    """Log finite numeric metrics at ``step``; NaN/inf values are skipped."""
    if run is None:
        return
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    items = [
        Metric(key, float(v), now, int(step))
        for key, v in metrics.items()
        if isinstance(v, int | float) and math.isfinite(float(v))
    ]
    for start in range(0, len(items), 1000):
        run.client.log_batch(run.run_id, metrics=items[start : start + 1000])


def log_epoch(run: TrackedRun | None, step: int, metrics: Mapping[str, float]) -> None:
    """Training-loop callback: the metrics of one dev evaluation (``train_loss``,
    ``force_mae``, ``elapsed_s``, ``lr``, ...) at MLflow step = the optimizer step."""
    log_metrics(run, metrics, step=step)


def mlflow_key(name: str) -> str:
    """``name`` as MLflow accepts it in a metric or param key: ASCII letters, digits and
    ``_ - . / space``; accents are dropped (``"val_ïd (2)"`` -> ``"val_id _2_"``), anything else
    becomes ``_``."""
    ascii_name = unicodedata.normalize("NFKD", name).encode("ascii", "ignore").decode()
    return re.sub(r"[^A-Za-z0-9_\-./ ]", "_", ascii_name) or "_"


def log_split_metrics(run: TrackedRun | None, table: pd.DataFrame) -> None:
    """Final metrics of a long table (columns split, metric, value) as ``<split>/<metric>``
    (split names, which may come from file names, made safe with :func:`mlflow_key`)."""
    if run is None:
        return
    metrics = {
        f"{mlflow_key(str(r.split))}/{mlflow_key(str(r.metric))}": float(r.value)
        for r in table.itertuples(index=False)
    }
    log_metrics(run, metrics, step=0)


def log_artifacts(
    run: TrackedRun | None, paths: Iterable[Path], *, artifact_path: str | None = None
) -> None:
    """Copy files (checkpoint, Parquet tables, plots) into the run's artifact store."""
    if run is None:
        return
    for path in paths:
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"artifact to log does not exist: {path}")
        if path.is_dir():
            run.client.log_artifacts(run.run_id, str(path), artifact_path)
        else:
            run.client.log_artifact(run.run_id, str(path), artifact_path)


def finish_run(run: TrackedRun | None, status: str = "FINISHED") -> None:
    """Mark the run FINISHED (or FAILED/KILLED)."""
    if run is not None:
        run.client.set_terminated(run.run_id, status=status)


#: The MLflow experiment of the benchmarks' points (one run per point).
BENCHMARK_EXPERIMENT = "benchmarks"


def log_benchmark_point(
    point: str,
    *,
    model: str,
    params: Mapping,
    metrics: Mapping[str, float],
    artifacts: Iterable[Path] = (),
    experiment: str = BENCHMARK_EXPERIMENT,
    tracking_uri: str | None = None,
) -> TrackedRun | None:
    """Log one benchmark point (e.g. ``"forcenet@16x"``) as a finished run tagged
    ``point``. A point logged before is found by that tag and updated, not duplicated, so
    a benchmark can log all its points again after each sweep. Rank 0 only."""
    if not is_rank_zero():
        return None
    client = _client(tracking_uri)
    exp_id = _experiment_id(client, experiment, None)
    escaped = point.replace("'", "\\'")
    found = client.search_runs([exp_id], filter_string=f"tags.point = '{escaped}'", max_results=1)
    if found:
        run = TrackedRun(client, found[0].info.run_id, exp_id)
    else:
        run = TrackedRun(client, client.create_run(exp_id, run_name=point).info.run_id, exp_id)
        _log_tags(run, _base_tags(model, "benchmark", None) | {"point": point})
    log_params(run, params)
    log_metrics(run, metrics)
    log_artifacts(run, artifacts)
    finish_run(run)
    return run
