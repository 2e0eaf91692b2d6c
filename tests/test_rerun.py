"""Identical results, identical files: a stage forced to run again with unchanged inputs
rewrites its outputs byte for byte, so DVC finds nothing downstream to redo.

Runs the real pipeline (`dvc repro`) in a copy of the project, at the tiniest sizes and
with one model, then forces one stage at a time (`dvc repro -f -s STAGE`).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline.params import MODEL_NAMES

ROOT = Path(__file__).resolve().parents[1]
MODEL = "gns"
#: The stages forced one by one, in pipeline order (physics: downstream of training).
FORCED = (f"train@{MODEL}", f"evaluate@{MODEL}", f"relax@{MODEL}", f"physics@{MODEL}")


def _tiny_project(dst: Path) -> None:
    """The code, the pipeline of one model (no report: it compares all models) and
    params small enough for seconds per stage."""
    for folder in ("forcenet", "pipeline"):
        shutil.copytree(ROOT / folder, dst / folder, ignore=shutil.ignore_patterns("__pycache__"))
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    splits = {"train": 3, "val_id": 1, "val_ood_ads": 1, "val_ood_cat": 1, "val_ood_both": 1}
    params["data"]["emt"].update(
        n_systems=splits,
        frames_per_system=3,
        md_frames_per_system=1,
        relax_steps=5,
        workers=1,
        is2rs_systems=1,
    )
    params["preprocess"]["workers"] = 1
    params["graph"].update(cutoff=4.0, max_neighbors=12)
    params["model"][MODEL].update(hidden_channels=8, num_interactions=1, num_radial=4)
    params["train"][MODEL].update(max_steps=2, eval_every=0, batch_size=4)
    for section in ("model", "train"):  # the pipeline's models are dvc.yaml's: this one
        others = [m for m in MODEL_NAMES if m != MODEL]
        params[section] = {k: v for k, v in params[section].items() if k not in others}
    params["evaluate"]["batch_size"] = 8
    # val_ood_ads: the split whose one system relaxes to an IS2RS pair at seed 0
    params["relax"].update(steps=3, splits=["val_ood_ads"], oracle_steps=5, batch_size=2)
    params["physics"]["splits"] = ["val_ood_ads"]
    params["physics"]["conservation"]["structures"] = 1
    params["physics"]["md"].update(structures=1, steps=4, interval=2)
    (dst / "params.yaml").write_text(yaml.safe_dump(params))
    dvc = yaml.safe_load((ROOT / "dvc.yaml").read_text())
    dvc["vars"] = [{"models": {MODEL: dvc["vars"][0]["models"][MODEL]}}]
    del dvc["stages"]["report"]
    dvc.pop("plots", None)
    (dst / "dvc.yaml").write_text(yaml.safe_dump(dvc, sort_keys=False))


def _dvc(cwd: Path, *args: str) -> str:
    bin_dir = str(Path(sys.executable).parent)  # the stages' `python` is this one
    env = {
        **os.environ,
        "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
        "PYTHONPATH": str(cwd),
        "MLFLOW_TRACKING_URI": f"sqlite:///{cwd / 'mlflow.db'}",
        "DVC_NO_ANALYTICS": "1",
        "OMP_NUM_THREADS": "1",
    }
    done = subprocess.run(
        [sys.executable, "-m", "dvc", *args], cwd=cwd, env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, f"dvc {' '.join(args)}:\n{done.stdout}\n{done.stderr}"
    return done.stdout


def _outputs(lock: dict, stage: str) -> dict[str, str]:
    """The hashes dvc.lock records for ``stage``'s outputs, the timing files apart."""
    entry = lock["stages"][stage]
    return {
        o["path"]: o["md5"] for o in entry["outs"] if not o["path"].startswith("reports/timing")
    }


def _timing_file(stage: str) -> str:
    name, model = stage.split("@")
    return f"reports/timing/{name}_{model}.json"


@pytest.mark.slow
def test_a_forced_stage_leaves_nothing_stale_downstream(tmp_path):
    """After the tiny pipeline, each of train, evaluate, relax and physics forced alone
    runs (its timing file is rewritten) but writes the same outputs, byte for byte, and
    `dvc status` reports nothing to redo."""
    _tiny_project(tmp_path)
    _dvc(tmp_path, "init", "--no-scm", "-q")
    _dvc(tmp_path, "repro", "-q")
    assert "up to date" in _dvc(tmp_path, "status")
    for stage in FORCED:
        before = yaml.safe_load((tmp_path / "dvc.lock").read_text())
        timing = (tmp_path / _timing_file(stage)).stat()
        _dvc(tmp_path, "repro", "-q", "-f", "-s", stage)
        after = yaml.safe_load((tmp_path / "dvc.lock").read_text())
        rerun = (tmp_path / _timing_file(stage)).stat()
        assert (rerun.st_ino, rerun.st_mtime_ns) != (timing.st_ino, timing.st_mtime_ns), stage
        assert _outputs(after, stage) == _outputs(before, stage), stage
        assert "Data and pipelines are up to date." in _dvc(tmp_path, "status"), stage
