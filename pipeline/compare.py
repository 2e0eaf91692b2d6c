"""Compare experiments: every tracked run, model × experiment × split, in one table.

Reads the MLflow store of the pipeline (:mod:`pipeline.tracking`): each model's run of
each ``dvc repro`` / ``dvc exp run`` holds its params and its final metrics per split.
One row per (model, experiment, split) with force MAE overall and on adsorbate atoms and
the force cosine; the experiment is the DVC experiment name (or the git commit of a plain
``dvc repro``), and ``changed`` lists the params in which the model's runs differ.

    python -m pipeline.compare                     # Markdown table of every run
    python -m pipeline.compare --split val_id --out reports/compare   # + .md/.csv/.parquet
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from forcenet.atomic import atomic_write, write_text
from forcenet.data.keys import split_order
from pipeline import tracking
from pipeline.summary import markdown_table

#: The compared metrics and their column headers.
COMPARED = {
    "forces_mae": "force MAE [eV/Å]",
    "forces_mae_adsorbate": "adsorbate force MAE [eV/Å]",
    "forces_cos": "force cos",
}
#: Params that describe the run, not the experiment (never listed as changed).
_IGNORED_PARAMS = ("data.source",)


def load_runs(tracking_uri: str | None = None, experiment: str = tracking.DEFAULT_EXPERIMENT):
    """The finished runs of the pipeline's experiment (newest first)."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri or tracking.default_tracking_uri())
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return []
    runs = client.search_runs(
        [exp.experiment_id], filter_string="attributes.status = 'FINISHED'", max_results=5000
    )
    return list(runs)


def _label(run) -> str:
    tags = run.data.tags
    if tags.get("dvc.exp_name"):
        return tags["dvc.exp_name"]
    commit = tags.get("mlflow.source.git.commit", "")
    return f"repro@{commit[:7]}" if commit else run.info.run_name or run.info.run_id[:8]


def _short(key: str, model: str) -> str:
    for prefix in (f"model.{model}.", f"train.{model}."):
        if key.startswith(prefix):
            return key.removeprefix(prefix)
    return key


def _changed(runs: list, model: str) -> dict[str, str]:
    """run id -> ``"key=value, ..."`` of the params in which this model's runs differ."""
    keys = sorted({k for r in runs for k in r.data.params} - set(_IGNORED_PARAMS))
    differ = [k for k in keys if len({r.data.params.get(k) for r in runs}) > 1]
    return {
        r.info.run_id: ", ".join(f"{_short(k, model)}={r.data.params.get(k, '–')}" for k in differ)
        for r in runs
    }


def comparison(runs: Sequence, splits: Sequence[str] = ()) -> pd.DataFrame:
    """model, experiment, changed, split and the :data:`COMPARED` metrics, one row per
    (run, split) that has them; ``splits`` keeps only those splits."""
    by_model: dict[str, list] = {}
    for run in runs:
        by_model.setdefault(run.data.tags.get("model", "?"), []).append(run)
    rows: list[dict[str, Any]] = []
    for model, model_runs in sorted(by_model.items()):
        changed = _changed(model_runs, model)
        for run in model_runs:
            metrics = run.data.metrics
            found = sorted({k.split("/")[0] for k in metrics if "/" in k} - {"training"})
            for split in found:
                if splits and split not in splits:
                    continue
                values = {m: metrics.get(f"{split}/{m}") for m in COMPARED}
                if values["forces_mae"] is None:
                    continue
                rows.append(
                    {
                        "model": model,
                        "experiment": _label(run),
                        "changed": changed[run.info.run_id] or "(baseline params)",
                        "split": split,
                        **values,
                        "steps": metrics.get("training/train_steps"),
                        "run_id": run.info.run_id,
                        "start_time": run.info.start_time,
                    }
                )
    columns = ["model", "experiment", "changed", "split", *COMPARED, "steps", "run_id"]
    if not rows:
        return pd.DataFrame(columns=columns)
    order = {split: k for k, split in enumerate(split_order({r["split"] for r in rows}))}
    table = pd.DataFrame(rows)
    table["_order"] = table.split.map(order)
    table = table.sort_values(["model", "_order", "start_time"])
    return table[columns].reset_index(drop=True)


def markdown(table: pd.DataFrame) -> str:
    """The comparison as a Markdown table (numbers to 4 decimals)."""
    return markdown_table(table.drop(columns=["run_id"]), COMPARED)


def write(table: pd.DataFrame, out: Path) -> list[Path]:
    """``out.md``, ``out.csv`` and ``out.parquet``."""
    out = Path(out)
    md = write_text(out.with_suffix(".md"), markdown(table) + "\n")
    csv, parquet = out.with_suffix(".csv"), out.with_suffix(".parquet")
    with atomic_write(csv) as tmp:
        table.to_csv(tmp, index=False)
    with atomic_write(parquet) as tmp:
        table.to_parquet(tmp, index=False)
    return [md, csv, parquet]


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--split", action="append", default=[], help="only this split (repeatable)")
    p.add_argument("--model", action="append", default=[], help="only this model (repeatable)")
    p.add_argument("--out", type=Path, help="also write OUT.md, OUT.csv and OUT.parquet")
    p.add_argument("--tracking-uri", help="MLflow store (default: the project's mlflow.db)")
    args = p.parse_args(argv)
    runs = load_runs(args.tracking_uri)
    if args.model:
        runs = [r for r in runs if r.data.tags.get("model") in args.model]
    table = comparison(runs, args.split)
    if table.empty:
        print("no finished runs with evaluation metrics yet: run `make repro` (or dvc repro)")
        return
    print(markdown(table))
    if args.out is not None:
        for path in write(table, args.out):
            print(f"wrote {path}")


if __name__ == "__main__":
    from pipeline import stage

    stage.run(main)
