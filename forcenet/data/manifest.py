"""Split manifests: ``<split>/manifest.json`` lists every shard (name, count, digest of
its meta) once all of them exist and are current; the dataset reads it to map a global
index to (shard, key). :func:`write_manifest` is also the "merge" step after a cluster
job array.

The manifest is what makes a split complete: preprocess and neighbors delete it before
they start and write it last, so a run that was killed or failed leaves none, and every
reader (:func:`require_manifest`: the graph stage, the dataset, training, evaluation,
``data inspect``) refuses such a split instead of using the shards that happen to exist.
A graph manifest is written only for a frame split that has a current manifest itself.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from forcenet.atomic import write_text
from forcenet.data import keys as K
from forcenet.data.shards import list_shards, shard_number, source_identity
from forcenet.data.store import (
    KIND_FRAMES,
    KIND_GRAPHS,
    SUFFIX,
    StoreError,
    check_graph_schema,
    list_lmdb,
    meta_digest,
    read_meta,
    release,
    writing,
)

MANIFEST = "manifest.json"


class MissingShardError(StoreError):
    """A split folder lacks some shards (e.g. a cluster job array still running)."""


class StaleShardError(StoreError):
    """A shard was built from an input that has changed since."""


class IncompleteSplitError(StoreError):
    """A split folder without a manifest: its run was interrupted, failed, or is unmerged."""


class StaleManifestError(StoreError):
    """A manifest that no longer lists exactly the shards in its folder."""


_STAGE = {KIND_FRAMES: "forcenet preprocess", KIND_GRAPHS: "forcenet neighbors"}


def _merge_command(split_dir: Path, kind: str) -> str:
    return f"forcenet manifest {split_dir}" + (" --kind graphs" if kind == KIND_GRAPHS else "")


def require_manifest(split_dir: Path, kind: str) -> dict[str, Any]:
    """The manifest of ``split_dir``, checked to be of ``kind`` and current: it lists
    exactly the shards in the folder, each with the digest of its meta.

    Raises :class:`IncompleteSplitError` without a manifest (naming the folder, the
    file, and both ways out: rerun the stage, or merge a job array with
    ``forcenet manifest``), :class:`StaleManifestError` if the shards changed since.
    """
    split_dir = Path(split_dir)
    manifest = read_manifest(split_dir)
    if manifest is None:
        raise IncompleteSplitError(
            f"{split_dir}: no {MANIFEST} ({split_dir / MANIFEST} is missing), so this {kind} "
            f"split is incomplete: a `{_STAGE.get(kind, kind)}` run was interrupted or failed "
            f"(rerun it), or a `--shard i/n` job array has not been merged (once every task "
            f"has finished, run `{_merge_command(split_dir, kind)}`)"
        )
    if manifest.get("kind") != kind:
        raise StoreError(
            f"{split_dir / MANIFEST}: kind {manifest.get('kind')!r}, expected {kind!r}"
        )
    if kind == KIND_GRAPHS:
        check_graph_schema(manifest, split_dir / MANIFEST)
    listed = [s["name"] for s in manifest["shards"]]
    present = [p.name for p in list_lmdb(split_dir)]
    if sorted(listed) != sorted(present):
        raise StaleManifestError(
            f"{split_dir / MANIFEST} does not match the shards in {split_dir} (missing: "
            f"{sorted(set(listed) - set(present))[:10]}, not listed: "
            f"{sorted(set(present) - set(listed))[:10]}); rerun `{_STAGE.get(kind, kind)}` "
            f"or `{_merge_command(split_dir, kind)}`"
        )
    for entry in manifest["shards"]:
        if meta_digest(read_meta(split_dir / entry["name"])) != entry["digest"]:
            raise StaleManifestError(
                f"{split_dir / entry['name']}: changed since {split_dir / MANIFEST} was "
                f"written; rerun `{_STAGE.get(kind, kind)}` or `{_merge_command(split_dir, kind)}`"
            )
    return manifest


def summarise(results, out_dir: Path, kind: str, shard) -> dict[str, Any]:
    """Per-split summary of run_jobs results; writes the manifest once the split is complete."""
    for name, _, _ in results:
        release(out_dir / name)  # a worker may have replaced a file this process had open
    manifest = None
    try:
        manifest = write_manifest(out_dir, kind)
    except MissingShardError:
        if shard is None:
            raise
    return {
        "shards": len(results),
        "written": sum(not skipped for _, _, skipped in results),
        "skipped": sum(skipped for _, _, skipped in results),
        "frames": sum(count for _, count, _ in results),
        "manifest": manifest is not None,
    }


def _expected_names(meta: dict[str, Any], kind: str) -> list[str] | None:
    """Output names the split should have, from the inputs still on disk (None if gone).

    For graphs, the shards of the frame split's (current) manifest: graphs of a frame
    split that is itself incomplete get no manifest.
    """
    src_dir = Path(meta["source"]["dir"])
    if kind == KIND_GRAPHS:
        return [s["name"] for s in require_manifest(src_dir, KIND_FRAMES)["shards"]]
    if not src_dir.is_dir():
        return None
    inputs = list_shards(src_dir)
    return [f"{shard_number(p, pos)}{SUFFIX}" for pos, p in enumerate(inputs)]


def _check_current(path: Path, meta: dict[str, Any], kind: str) -> None:
    """Raise :class:`StaleShardError` if the input of ``path`` changed since it was built."""
    src = meta["source"]
    if kind == KIND_FRAMES:
        xyz = Path(src["dir"]) / src["name"]
        if xyz.is_file() and source_identity(xyz) != src:
            raise StaleShardError(f"{path}: source {xyz} changed since the shard was built")
        return
    frames = Path(src["dir"]) / src["name"]
    if frames.is_file() and meta_digest(read_meta(frames)) != src["digest"]:
        raise StaleShardError(f"{path}: frame shard {frames} changed since the graphs were built")


def _check_complete(split_dir: Path, names: list[str], meta: dict[str, Any], kind: str) -> None:
    """Every input of the split has its shard, and no shard lacks an input."""
    expected = _expected_names(meta, kind)
    missing = sorted(set(expected) - set(names)) if expected is not None else []
    extra = sorted(set(names) - set(expected)) if expected is not None else []
    if extra:
        raise StaleShardError(f"{split_dir}: shards {extra[:10]} have no input any more")
    wanted = meta["split_shards"]
    if missing or len(names) < wanted:
        shown = missing[:10] or [f"{wanted - len(names)} shard(s)"]
        raise MissingShardError(f"{split_dir}: missing {kind} shards {shown}")


def write_manifest(split_dir: Path, kind: str) -> dict[str, Any]:
    """Scan the shard metas of ``split_dir`` and write ``manifest.json`` atomically.

    The "merge" step after a cluster job array: raises :class:`MissingShardError` if a
    shard of the split is absent, :class:`StaleShardError` if one no longer matches its
    input, :class:`StoreError` for a foreign kind, schema or mixed graph settings.
    """
    split_dir = Path(split_dir)
    paths = list_lmdb(split_dir)
    if not paths:
        raise MissingShardError(f"{split_dir}: no {SUFFIX} shards")
    metas = [read_meta(p) for p in paths]
    for path, meta in zip(paths, metas, strict=True):
        if meta.get("kind") != kind:
            raise StoreError(f"{path}: kind {meta.get('kind')!r}, expected {kind!r}")
        _check_current(path, meta, kind)
    sources = {m["source"]["dir"] for m in metas}
    if len(sources) != 1:
        raise StoreError(f"{split_dir}: shards built from different folders {sorted(sources)}")
    names = [p.name for p in paths]
    _check_complete(split_dir, names, metas[0], kind)
    manifest: dict[str, Any] = {
        "kind": kind,
        "schema_version": K.SCHEMA_VERSION,
        "source_dir": metas[0]["source"]["dir"],
        "total": sum(int(m["count"]) for m in metas),
        "shards": [
            {"name": n, "count": int(m["count"]), "digest": meta_digest(m)}
            | ({"source_digest": m["source"]["digest"]} if kind == KIND_GRAPHS else {})
            for n, m in zip(names, metas, strict=True)
        ],
    }
    if kind == KIND_GRAPHS:
        for path, meta in zip(paths, metas, strict=True):
            check_graph_schema(meta, path)
        manifest["graph_schema"] = K.GRAPH_SCHEMA_VERSION
        settings = {(m["cutoff"], m["max_neighbors"]) for m in metas}
        if len(settings) != 1:
            raise StoreError(
                f"{split_dir}: shards built with different (cutoff, max_neighbors) {settings}"
            )
        manifest["cutoff"], manifest["max_neighbors"] = settings.pop()
    with writing(split_dir / MANIFEST):
        write_text(split_dir / MANIFEST, json.dumps(manifest, indent=1, sort_keys=True))
    return manifest


def read_manifest(split_dir: Path) -> dict[str, Any] | None:
    """The split's manifest, or None if there is none yet."""
    path = Path(split_dir) / MANIFEST
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise StoreError(f"{path}: corrupt manifest: {exc}") from exc
    if manifest.get("schema_version") != K.SCHEMA_VERSION:
        raise StoreError(
            f"{path}: schema version {manifest.get('schema_version')}, expected "
            f"{K.SCHEMA_VERSION}; rebuild the store: rerun `forcenet preprocess` and "
            "`forcenet neighbors`, or `dvc repro`"
        )
    return manifest
