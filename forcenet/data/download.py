"""Download the official OC20 S2EF archives: resumable, checksummed, safely extracted.

The result is one folder per split, ``<out_dir>/<split>/<k>.extxyz.xz`` + ``<k>.txt.xz``
(see :mod:`forcenet.data.raw`), with split names ``train``, ``val_id``, ``val_ood_ads``,
``val_ood_cat``, ``val_ood_both``. Archive names, MD5s and frame counts are those of the
public OCP ``DATASET.md`` (tag v0.0.3, data version of Feb 2021).
"""

from __future__ import annotations

import hashlib
import http.client
import logging
import os
import re
import shutil
import tarfile
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from tqdm import tqdm

from forcenet.atomic import NotRegularFileError, open_regular, write_text
from forcenet.data import keys as K
from forcenet.data.raw import XYZ_SUFFIX, count_frames, list_shards

log = logging.getLogger(__name__)

BASE_URL = "https://dl.fbaipublicfiles.com/opencatalystproject/data/"
TIMEOUT_S = 60.0  # socket timeout per connect/read; a stalled transfer is retried (resumed)
RETRIES = 5  # attempts per file; each one resumes from the bytes already on disk
RETRY_PAUSE_S = 2.0  # first pause between attempts, doubled each time (max 60 s)


class DownloadError(RuntimeError):
    """A file that could not be fetched; the message names the URL and local file."""


class ChecksumError(DownloadError):
    """A fetched file whose MD5 differs from the expected one."""


class UnsafeArchiveError(ValueError):
    """An archive member that could write outside the destination or is not a plain file."""


@dataclass(frozen=True)
class Archive:
    """One official archive: output split name, file name, MD5 (None = unknown), frames."""

    split: str
    filename: str
    md5: str | None
    frames: int


# Keys are case-insensitive train sizes. The 2M and 20M checksums (863bc983... and
# 953474cb...) are listed swapped between OCP v0.0.3 DATASET.md and today's fairchem docs and
# only their first 8 hex digits are known to us, so these two are not verified (the computed
# MD5 is returned for the user to compare).
TRAIN_ARCHIVES: dict[str, Archive] = {
    "200k": Archive(K.TRAIN, "s2ef_train_200K.tar", "f8d0909c2623a393148435dede7d3a46", 200_000),
    "2m": Archive(K.TRAIN, "s2ef_train_2M.tar", None, 2_000_000),
    "20m": Archive(K.TRAIN, "s2ef_train_20M.tar", None, 20_000_000),
    "all": Archive(K.TRAIN, "s2ef_train_all.tar", "12a7087bfd189a06ccbec9bc7add2bcd", 133_934_018),
}
# Frame counts of the Feb-2021 data (before, each val split had exactly 1,000,000).
VAL_ARCHIVES: dict[str, Archive] = {
    "val_id": Archive("val_id", "s2ef_val_id.tar", "f57f7f5c1302637940f2cc858e789410", 999_866),
    "val_ood_ads": Archive(
        "val_ood_ads", "s2ef_val_ood_ads.tar", "431ab0d7557a4639605ba8b67793f053", 999_838
    ),
    "val_ood_cat": Archive(
        "val_ood_cat", "s2ef_val_ood_cat.tar", "532d6cd1fe541a0ddb0aa0f99962b7db", 999_809
    ),
    "val_ood_both": Archive(
        "val_ood_both", "s2ef_val_ood_both.tar", "5731862978d80502bbf7017d68c2c729", 999_944
    ),
}


# --------------------------------------------------------------------------- fetch


def md5_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _marker(dest: Path) -> Path:
    return dest.with_name(dest.name + ".md5ok")


def _write_marker(dest: Path, digest: str) -> None:
    write_text(_marker(dest), f"{digest} {dest.stat().st_size}\n")


def read_marker(dest: Path) -> str | None:
    """The MD5 recorded when ``dest`` was verified, if it still matches the file size."""
    try:
        digest, size = _marker(dest).read_text().split()
        return digest if int(size) == dest.stat().st_size else None
    except (OSError, ValueError):
        return None


def _already_verified(dest: Path, md5: str | None) -> bool:
    """True if ``dest`` is a complete, verified file (never re-fetched); hashes it if needed."""
    if not dest.is_file():
        return False
    recorded = read_marker(dest)
    if recorded is not None and (md5 is None or recorded == md5.lower()):
        return True
    digest = md5_file(dest)
    if md5 is None or digest == md5.lower():
        _write_marker(dest, digest)
        return True
    bad = dest.with_name(dest.name + ".bad")
    log.warning("%s: MD5 %s != expected %s; moved to %s, fetching again", dest, digest, md5, bad)
    os.replace(dest, bad)
    _marker(dest).unlink(missing_ok=True)
    return False


def _content_range(value: str | None) -> tuple[int, int | None]:
    """(first byte, total size) of a ``Content-Range: bytes a-b/total`` header."""
    m = re.fullmatch(r"bytes (\d+)-\d+/(\d+|\*)", (value or "").strip())
    if m is None:
        raise OSError(f"bad Content-Range header {value!r}")
    return int(m.group(1)), None if m.group(2) == "*" else int(m.group(2))


def _open(url: str, offset: int) -> http.client.HTTPResponse | None:
    """The response for ``url`` from byte ``offset``; None if the server says we have it all."""
    request = urllib.request.Request(url, headers={"Range": f"bytes={offset}-"} if offset else {})
    try:
        return urllib.request.urlopen(request, timeout=TIMEOUT_S)  # noqa: S310 - http(s) only
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and offset:  # range not satisfiable: is the .part already whole?
            total = exc.headers.get("Content-Range", "").rpartition("/")[2]
            exc.close()
            if total.isdigit() and int(total) == offset:
                return None
            raise OSError(f"server refused range from byte {offset} (size {total!r})") from exc
        if 400 <= exc.code < 500:
            raise DownloadError(f"{url}: HTTP {exc.code} {exc.reason}") from exc
        raise


def _download(url: str, part: Path, *, progress: bool, chunk: int) -> None:
    """Append the missing bytes of ``url`` to ``part`` (or restart it if Range is ignored)."""
    if os.path.lexists(part):  # a planted link or FIFO is refused before anything is read
        os.close(open_regular(part, os.O_RDONLY))
    offset = part.stat().st_size if part.exists() else 0
    response = _open(url, offset)
    if response is None:
        return
    with response:
        if response.status == 206:
            start, total = _content_range(response.headers.get("Content-Range"))
            if start != offset:
                part.unlink()
                raise OSError(f"server resumed at byte {start}, expected {offset}; restarting")
        else:  # 200: the server ignored Range, so the body is the whole file
            offset = 0
            length = response.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else None
        # never through a symbolic link: the target would be appended to or emptied
        flags = os.O_WRONLY | os.O_CREAT | (os.O_APPEND if offset else os.O_TRUNC)
        with (
            os.fdopen(open_regular(part, flags), "ab" if offset else "wb") as out,
            tqdm(
                total=total,
                initial=offset,
                unit="B",
                unit_scale=True,
                unit_divisor=1024,
                desc=part.name.removesuffix(".part"),
                disable=not progress,
                leave=False,
            ) as bar,
        ):
            while block := response.read(chunk):
                out.write(block)
                bar.update(len(block))
    size = part.stat().st_size
    if total is not None and size != total:  # urllib returns b"" when a server hangs up early
        raise OSError(f"connection closed after {size} of {total} bytes")


def fetch(
    url: str, dest: Path, md5: str | None, *, progress: bool = True, chunk: int = 1 << 20
) -> Path:
    """Download ``url`` to ``dest``, resuming a partial ``<dest>.part`` with HTTP Range.

    Idempotent: a file verified before (``<dest>.md5ok`` marker, or a re-hash that
    matches) is never fetched again. The data only appears under ``dest`` once complete
    and its MD5 matches ``md5`` (None: not checked, but recorded); on a mismatch the data is
    moved to ``<dest>.bad`` and :class:`ChecksumError` is raised. Network failures are
    retried ``RETRIES`` times, each attempt continuing where the previous one stopped.
    """
    dest = Path(dest)
    if _already_verified(dest, md5):
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    for attempt in range(1, RETRIES + 1):
        try:
            _download(url, part, progress=progress, chunk=chunk)
            break
        except NotRegularFileError:
            raise  # retrying cannot help
        except (OSError, http.client.HTTPException) as exc:
            if attempt == RETRIES:
                raise DownloadError(
                    f"{url}: failed after {attempt} attempts ({exc}); the {part.stat().st_size if part.exists() else 0}"
                    f" bytes fetched so far are kept in {part} and the next call resumes"
                ) from exc
            log.warning("%s: attempt %d failed (%s); resuming", url, attempt, exc)
            time.sleep(min(60.0, RETRY_PAUSE_S * 2 ** (attempt - 1)))
    digest = md5_file(part)
    if md5 is not None and digest != md5.lower():
        bad = dest.with_name(dest.name + ".bad")
        os.replace(part, bad)
        raise ChecksumError(
            f"{dest.name} from {url}: MD5 {digest} does not match the expected {md5.lower()}; "
            f"the data was moved to {bad}"
        )
    os.replace(part, dest)
    _write_marker(dest, digest)
    return dest


# --------------------------------------------------------------------------- extract


def _check_member(tar_path: Path, root: Path, member: tarfile.TarInfo) -> None:
    """Raise unless ``member`` is a plain file or folder that lands inside ``root``."""
    name = member.name

    def refuse(reason: str) -> None:
        raise UnsafeArchiveError(f"{tar_path}: refusing member {name!r}: {reason}")

    if not name or name.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", name):
        refuse("absolute path")
    if ".." in PurePosixPath(name.replace("\\", "/")).parts:
        refuse("'..' in path")
    if not (root / name).resolve().is_relative_to(root):
        refuse("lands outside the destination")
    if member.issym() or member.islnk():
        refuse(f"link (to {member.linkname!r})")
    if member.isdev():
        refuse("device or fifo")
    if not (member.isfile() or member.isdir()):
        refuse(f"unsupported member type {member.type!r}")


def safe_extract(tar_path: Path, dest: Path) -> list[Path]:
    """Extract ``tar_path`` into the new folder ``dest``; returns the files written.

    Every member is checked before anything is written: absolute paths, ``..``, paths
    resolving outside ``dest``, symlinks, hardlinks, devices and fifos are refused with
    :class:`UnsafeArchiveError`. Files are written into ``.<dest>.partial`` and the folder
    is renamed to ``dest`` only when all of them are complete.
    """
    tar_path, dest = Path(tar_path), Path(dest)
    if dest.exists():
        raise FileExistsError(f"{dest}: already exists; not extracting {tar_path} over it")
    tmp = dest.with_name(f".{dest.name}.partial")
    try:
        with tarfile.open(tar_path, "r:*") as tar:
            members = tar.getmembers()
            for member in members:
                _check_member(tar_path, tmp.resolve(), member)
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir(parents=True)
            written = []
            for member in members:
                target = tmp / member.name
                if member.isdir():
                    target.mkdir(parents=True, exist_ok=True)
                    continue
                target.parent.mkdir(parents=True, exist_ok=True)
                src = tar.extractfile(member)  # None only for non-files, refused above
                if src is None:
                    raise UnsafeArchiveError(f"{tar_path}: cannot read member {member.name!r}")
                with src, open(target, "wb") as out:
                    shutil.copyfileobj(src, out, 1 << 20)
                written.append(dest / member.name)
    except tarfile.TarError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise UnsafeArchiveError(f"{tar_path}: not a readable tar archive ({exc})") from exc
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    os.replace(tmp, dest)
    return written


# --------------------------------------------------------------------------- splits


def _archives(train: str | None, val: Sequence[str]) -> list[Archive]:
    chosen = []
    if train is not None:
        if train.lower() not in TRAIN_ARCHIVES:
            raise ValueError(f"unknown train split {train!r}; choose from 200k, 2M, 20M, all")
        chosen.append(TRAIN_ARCHIVES[train.lower()])
    for name in val:
        if name not in VAL_ARCHIVES:
            raise ValueError(f"unknown validation split {name!r}; choose from {K.VAL_SPLITS}")
        chosen.append(VAL_ARCHIVES[name])
    return chosen


def _arrange(tar_path: Path, out_dir: Path, split: str) -> None:
    """Extract ``tar_path`` and move the one folder holding its shards to ``out_dir/split``."""
    staging = out_dir / f".{split}.extract"
    shutil.rmtree(staging, ignore_errors=True)
    safe_extract(tar_path, staging)
    try:
        folders = sorted({p.parent for p in staging.rglob(f"*{XYZ_SUFFIX}")})
        if len(folders) != 1:
            raise DownloadError(
                f"{tar_path}: expected one folder of *{XYZ_SUFFIX} shards, found {len(folders)}"
            )
        list_shards(folders[0])  # every shard has its sidecar
        os.replace(folders[0], out_dir / split)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def download_splits(
    out_dir: Path,
    *,
    base_url: str = BASE_URL,
    train: str | None = "200k",
    val: Sequence[str] = K.VAL_SPLITS,
    checksums: Mapping[str, str] | None = None,
    workdir: Path | None = None,
) -> dict[str, dict]:
    """Fetch, verify and unpack OC20 S2EF archives into ``out_dir/<split>/``.

    ``train`` is one of 200k, 2M, 20M, all (None: no training split); ``val`` lists
    validation splits. ``checksums`` maps archive file names to MD5s and replaces the
    official table. Archives are kept in ``workdir`` (default: ``<out_dir>-downloads``
    next to ``out_dir``, so a DVC output does not hold them) and may be deleted after
    success. A split folder already in place is not touched again. Returns, per split,
    the archive, URL, MD5, whether it was checked, shard and frame counts.
    """
    archives = _archives(train, val)  # reject bad names before touching the disk
    out_dir = Path(out_dir)
    workdir = (
        Path(workdir) if workdir is not None else out_dir.with_name(out_dir.name + "-downloads")
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    summary: dict[str, dict] = {}
    for archive in archives:
        md5 = archive.md5 if checksums is None else checksums.get(archive.filename)
        url = base_url.rstrip("/") + "/" + archive.filename
        tar_path = workdir / archive.filename
        split_dir = out_dir / archive.split
        if not split_dir.is_dir():
            fetch(url, tar_path, md5)
            _arrange(tar_path, out_dir, archive.split)
        frames = count_frames(split_dir)
        if frames != archive.frames:
            log.warning(
                "%s: %d frames, the official %s has %d",
                split_dir,
                frames,
                archive.filename,
                archive.frames,
            )
        summary[archive.split] = {
            "archive": archive.filename,
            "url": url,
            "md5": read_marker(tar_path),
            "md5_checked": md5 is not None,
            "shards": len(list_shards(split_dir)),
            "frames": frames,
            "official_frames": archive.frames,
        }
    return summary
