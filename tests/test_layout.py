"""The architecture, checked: the library never imports the pipeline, and every DVC stage
lists exactly the code it runs.

Run as a script (``python tests/test_layout.py``) to print each stage's code deps.
"""

from __future__ import annotations

import ast
import os
import re
import sys
from functools import cache
from pathlib import Path

import pytest
import yaml

from forcenet.models import MODELS

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("forcenet", "pipeline")


def module_file(name: str) -> Path | None:
    """The source file of module ``name`` inside this repository (None if elsewhere)."""
    parts = name.split(".")
    if parts[0] not in PACKAGES:
        return None
    base = ROOT.joinpath(*parts)
    if base.with_suffix(".py").is_file():
        return base.with_suffix(".py")
    if (base / "__init__.py").is_file():
        return base / "__init__.py"
    return None


def _has_code(init: Path) -> bool:
    """An ``__init__.py`` that imports or defines something (not just a docstring)."""
    tree = ast.parse(init.read_text())
    return any(not isinstance(node, ast.Expr | ast.Assign) for node in tree.body)


@cache
def direct_imports(path: Path) -> frozenset[Path]:
    """Files of this repository that ``path`` imports, anywhere in it (lazy imports too),
    with the ``__init__.py`` of every package on the way when it holds code."""
    found: set[Path] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [f"{node.module}.{a.name}" for a in node.names] + [node.module]
        for name in names:
            file = module_file(name)
            if file is None or (file.name == "__init__.py" and not _has_code(file)):
                continue
            found.add(file)
            parts = name.split(".")
            for k in range(1, len(parts)):
                init = module_file(".".join(parts[:k]))
                if init is not None and init.name == "__init__.py" and _has_code(init):
                    found.add(init)
    found.discard(path)
    return frozenset(found)


def module_level_imports(path: Path) -> set[Path]:
    """Files of this repository that importing ``path`` imports: its statements outside
    functions and classes, ``if TYPE_CHECKING:`` blocks included (a circle there is still
    one that a reader must follow). ``from pkg import mod`` counts as ``pkg.mod``."""
    statements: list[ast.Import | ast.ImportFrom] = []
    todo = list(ast.parse(path.read_text()).body)
    while todo:
        node = todo.pop()
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            continue
        if isinstance(node, ast.Import | ast.ImportFrom):
            statements.append(node)
        for field in ("body", "orelse", "handlers", "finalbody"):
            todo.extend(getattr(node, field, None) or [])
    found: set[Path] = set()
    for node in statements:
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif node.module and node.level == 0:
            names = [
                f"{node.module}.{a.name}" if module_file(f"{node.module}.{a.name}") else node.module
                for a in node.names
            ]
        else:
            names = []
        found.update(f for f in map(module_file, names) if f is not None and f != path)
    return found


def import_circles() -> list[list[str]]:
    """Groups of repository modules that import each other at module level, directly or
    through others (the strongly connected components with more than one file)."""
    files = sorted(p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py"))
    graph = {f: module_level_imports(f) for f in files}
    reach = {f: closure_in(graph, f) for f in files}
    circles = {
        tuple(sorted(str(g.relative_to(ROOT)) for g in reach[f] if f in reach[g])) for f in files
    }
    return sorted(list(c) for c in circles if len(c) > 1)


def closure_in(graph: dict[Path, set[Path]], start: Path) -> set[Path]:
    """``start`` and every file reachable from it in ``graph``."""
    seen, todo = set(), [start]
    while todo:
        file = todo.pop()
        if file not in seen:
            seen.add(file)
            todo.extend(graph.get(file, ()))
    return seen


def closure(path: Path) -> set[Path]:
    """``path`` and every repository file it imports, transitively."""
    seen, todo = set(), [path]
    while todo:
        file = todo.pop()
        if file in seen:
            continue
        seen.add(file)
        todo.extend(direct_imports(file))
    return seen


def _dvc() -> dict:
    return yaml.safe_load((ROOT / "dvc.yaml").read_text())


def stage_modules() -> dict[str, Path]:
    """Stage name -> the pipeline module its command runs (``python -m pipeline.X``)."""
    out = {}
    for name, stage in _dvc()["stages"].items():
        cmd = (stage.get("do") or stage)["cmd"]
        words = cmd.split()
        module = words[words.index("-m") + 1]
        file = module_file(module)
        assert file is not None, f"stage {name}: {module} is not a module of this repository"
        out[name] = file
    return out


def listed_code(name: str) -> set[Path]:
    """The Python files a stage lists as deps (folders expanded)."""
    stage = _dvc()["stages"][name]
    deps = (stage.get("do") or stage).get("deps", [])
    files: set[Path] = set()
    for dep in deps:
        path = ROOT / dep
        if path.suffix == ".py":
            files.add(path)
        elif path.is_dir() and (path / "__init__.py").is_file():
            files.update(p for p in path.rglob("*.py") if "__pycache__" not in p.parts)
    return files


def needed_code(name: str) -> set[Path]:
    return closure(stage_modules()[name])


def test_library_never_imports_the_pipeline():
    offenders = {
        str(f.relative_to(ROOT)): sorted(str(d.relative_to(ROOT)) for d in direct_imports(f))
        for f in (ROOT / "forcenet").rglob("*.py")
        if any(d.parts[len(ROOT.parts)] == "pipeline" for d in direct_imports(f))
    }
    assert offenders == {}


def test_no_module_imports_itself_back():
    """No module is imported, at module level, by a module it imports (directly or
    through others): each layer reads one way."""
    assert import_circles() == []


def test_circle_scan_finds_a_circle(tmp_path, monkeypatch):
    """The circle scan sees a two-module circle under ``if TYPE_CHECKING:`` (or the test
    above would pass vacuously)."""
    pkg = tmp_path / "forcenet"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from forcenet.b import B\nA = 1\n")
    (pkg / "b.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from forcenet.a import A\n"
    )
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    monkeypatch.setattr(sys.modules[__name__], "PACKAGES", ("forcenet",))
    assert import_circles() == [["forcenet/a.py", "forcenet/b.py"]]


def test_import_scan_sees_lazy_imports():
    """The scan must see imports inside functions (the CLI imports lazily), or the
    dependency checks below would pass vacuously."""
    cli = direct_imports(ROOT / "forcenet" / "cli.py")
    assert ROOT / "forcenet" / "train" / "__init__.py" in cli
    assert ROOT / "forcenet" / "evaluate.py" in cli


def test_every_stage_lists_exactly_its_code():
    problems = {}
    for name in stage_modules():
        need, have = needed_code(name), listed_code(name)
        missing = sorted(str(p.relative_to(ROOT)) for p in need - have)
        extra = sorted(str(p.relative_to(ROOT)) for p in have - need)
        if missing or extra:
            problems[name] = {"missing": missing, "not imported": extra}
    assert problems == {}


def test_report_stage_lists_the_template_of_its_text():
    """The words of results.md live in a template the report reads: editing it reruns the
    report stage."""
    from pipeline.report import RESULTS_TEMPLATE

    deps = _dvc()["stages"]["report"]["deps"]
    assert str(RESULTS_TEMPLATE.relative_to(ROOT)) in deps
    assert RESULTS_TEMPLATE.is_file()


#: Files that may name a model besides its own modules in forcenet/models/: its entry in
#: MODELS, its settings, and the pipeline's list of models (stages, learning-curve plots).
MODEL_PLACES = {"forcenet/models/__init__.py", "params.yaml", "dvc.yaml"}
#: Not searched: what describes, measures or records the models (tests, docs, benchmarks with
#: sizes of their own, reports, data), and what is not the project's (hidden folders).
NOT_SEARCHED = {"tests", "docs", "benchmarks", "reports", "data", "dvc_plots", "mlruns"}
#: The code and settings searched (Makefile has no suffix); Markdown is documentation.
SEARCHED_SUFFIXES = {".py", ".yaml", ".yml", ".toml", ".j2", ".cfg", ".ini", ".sh", ""}


def files_naming(name: str) -> set[str]:
    """The project's code and settings files (relative paths) in which the word ``name``
    occurs."""
    word = re.compile(rf"\b{re.escape(name)}\b")
    found = set()
    for folder, dirs, files in os.walk(ROOT):
        here = Path(folder).relative_to(ROOT)
        dirs[:] = [
            d
            for d in dirs
            if not d.startswith(".")
            and d != "__pycache__"
            and not d.endswith(".egg-info")  # written by pip install -e
            and not (here == Path(".") and d in NOT_SEARCHED)
        ]
        for file in files:
            path = Path(folder) / file
            if path.suffix in SEARCHED_SUFFIXES and word.search(path.read_text(errors="replace")):
                found.add(str(path.relative_to(ROOT)))
    return found


@pytest.mark.parametrize("name", [m for m in MODELS if m != "forcenet"])  # not the package's
def test_a_model_is_named_only_in_its_module_its_entry_its_params_and_the_pipeline(name):
    """Adding a model touches its module, ``MODELS``, params.yaml and dvc.yaml: every
    other file takes the models from those (``pipeline.params.MODEL_NAMES``)."""
    own = {str(p.relative_to(ROOT)) for p in (ROOT / "forcenet" / "models").glob(f"{name}*.py")}
    assert own, f"no module of {name} in forcenet/models/"
    named = files_naming(name)
    assert named - own == MODEL_PLACES  # the scan sees the places it allows, and no others


def test_model_list_is_one_list():
    from pipeline.params import MODEL_NAMES

    dvc_models = list(_dvc()["vars"][0]["models"])
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    assert dvc_models == list(MODEL_NAMES)
    assert [m for m in params["model"] if m != "hidden"] == list(MODEL_NAMES)
    assert list(params["train"])[-len(MODEL_NAMES) :] == list(MODEL_NAMES)
    # the learning-curve plots show every model's history, against optimizer steps
    for plot in _dvc()["plots"]:
        if isinstance(plot, dict):
            (spec,) = plot.values()
            assert spec["x"] == "step"
            assert list(spec["y"]) == [f"data/models/{m}/history.csv" for m in MODEL_NAMES]


if __name__ == "__main__":  # print the deps each stage needs, for dvc.yaml
    sys.path.insert(0, str(ROOT))
    for name in stage_modules():
        print(f"{name}:")
        for path in sorted(needed_code(name)):
            print(f"  - {path.relative_to(ROOT)}")


def test_model_stages_do_not_depend_on_the_raw_format_or_the_stage_runners():
    """Editing the extxyz parser, the raw shard reader or the data stages' job runner
    reruns the data stages only, never a training or an evaluation."""
    runners = {ROOT / "forcenet" / "data" / f for f in ("extxyz.py", "raw.py", "jobs.py")}
    runners |= {ROOT / "forcenet" / "data" / "graph_build.py", ROOT / "forcenet" / "emt"}
    for name in ("train", "evaluate", "relax", "physics"):
        assert not runners & needed_code(name), name
        assert not runners & listed_code(name), name
    assert ROOT / "forcenet" / "data" / "extxyz.py" in needed_code("preprocess")
