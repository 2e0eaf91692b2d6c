"""OC20 downloader against a local HTTP server (never the internet): resume, MD5, safe untar."""

from __future__ import annotations

import hashlib
import io
import re
import tarfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest

from forcenet.data import download as dl
from forcenet.data.frame import Frame
from forcenet.data.raw import iter_split, write_shard

TRAIN_TAR = "s2ef_train_200K.tar"
VAL_TAR = "s2ef_val_id.tar"


@dataclass
class Server:
    """What the test server serves and how it misbehaves; records every request."""

    root: Path
    url: str = ""
    requests: list[tuple[str, str | None]] = field(default_factory=list)
    drop_after: int | None = None  # hang up after this many body bytes ...
    drops_left: int = 0  # ... for this many requests
    ignore_range: bool = False


def _handler(state: Server) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:  # keep pytest output clean
            pass

        def do_GET(self) -> None:  # noqa: N802 - http.server API
            range_header = self.headers.get("Range")
            state.requests.append((self.path, range_header))
            path = state.root / self.path.lstrip("/")
            if not path.is_file():
                self.send_error(404)
                return
            data = path.read_bytes()
            start = 0
            if range_header and not state.ignore_range:
                start = int(re.fullmatch(r"bytes=(\d+)-", range_header).group(1))
                if start >= len(data):
                    self.send_response(416)
                    self.send_header("Content-Range", f"bytes */{len(data)}")
                    self.end_headers()
                    return
                self.send_response(206)
                self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
            else:
                self.send_response(200)
            body = data[start:]
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if state.drops_left > 0:
                state.drops_left -= 1
                body = body[: state.drop_after]
            self.wfile.write(body)

    return Handler


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    state = Server(root=tmp_path / "www")
    state.root.mkdir()
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler(state))
    state.url = f"http://127.0.0.1:{httpd.server_address[1]}/"
    thread = threading.Thread(
        target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
    )
    thread.start()
    yield state
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture(autouse=True)
def _fast_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(dl, "RETRY_PAUSE_S", 0.0)
    monkeypatch.setattr(dl, "TIMEOUT_S", 5.0)


def make_frames(n: int, seed: int) -> list[Frame]:
    rng = np.random.default_rng(seed)
    return [
        Frame(
            atomic_numbers=rng.choice([1, 8, 29], 4),
            pos=rng.uniform(0, 4, (4, 3)),
            cell=np.diag([5.0, 5.0, 20.0]),
            pbc=np.ones(3, bool),
            tags=np.array([0, 1, 1, 2]),
            fixed=np.array([True, False, False, False]),
            forces=rng.normal(size=(4, 3)),
            total_energy=-10.0 - i,
            reference_energy=-3.0,
            sid=seed,
            fid=i,
        )
        for i in range(n)
    ]


def make_archive(server: Server, name: str, frames: list[Frame], tmp: Path) -> str:
    """An archive laid out like the official ones (``<stem>/<stem>/<k>.extxyz.xz``); its MD5."""
    stem = name.removesuffix(".tar")
    shards = tmp / "src" / stem / stem
    write_shard(shards, 0, frames[: len(frames) // 2])
    write_shard(shards, 1, frames[len(frames) // 2 :])
    with tarfile.open(server.root / name, "w") as tar:
        tar.add(tmp / "src" / stem, arcname=stem)
    return hashlib.md5((server.root / name).read_bytes()).hexdigest()


def test_download_splits_layout_and_idempotence(server: Server, tmp_path: Path) -> None:
    train, val = make_frames(5, seed=1), make_frames(3, seed=2)
    sums = {
        TRAIN_TAR: make_archive(server, TRAIN_TAR, train, tmp_path),
        VAL_TAR: make_archive(server, VAL_TAR, val, tmp_path),
    }
    out = tmp_path / "raw"
    result = dl.download_splits(out, base_url=server.url, val=["val_id"], checksums=sums)
    assert sorted(p.name for p in out.iterdir()) == ["train", "val_id"]
    assert sorted(p.name for p in (out / "train").iterdir()) == [
        "0.extxyz.xz",
        "0.txt.xz",
        "1.extxyz.xz",
        "1.txt.xz",
    ]
    assert [f.total_energy for f in iter_split(out / "train")] == [f.total_energy for f in train]
    assert [f.sid for f in iter_split(out / "val_id")] == [2, 2, 2]
    assert result["train"]["md5"] == sums[TRAIN_TAR] and result["train"]["md5_checked"]
    assert (result["train"]["frames"], result["val_id"]["shards"]) == (5, 2)
    assert len(server.requests) == 2

    again = dl.download_splits(out, base_url=server.url, val=["val_id"], checksums=sums)
    assert len(server.requests) == 2  # nothing fetched again
    assert again == result
    shutil_tree = out / "train"
    for p in list(shutil_tree.iterdir()):
        p.unlink()
    shutil_tree.rmdir()  # a lost split is rebuilt from the verified archive, still offline
    dl.download_splits(out, base_url=server.url, val=["val_id"], checksums=sums)
    assert len(server.requests) == 2
    assert len(list(iter_split(out / "train"))) == 5


def test_interrupted_download_resumes_with_range(
    server: Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (server.root / "blob.bin").write_bytes(payload := np.random.default_rng(0).bytes(300_000))
    md5 = hashlib.md5(payload).hexdigest()
    server.drop_after, server.drops_left = 100_000, 1
    dest = tmp_path / "dl" / "blob.bin"
    monkeypatch.setattr(dl, "RETRIES", 1)
    with pytest.raises(dl.DownloadError, match=r"blob\.bin: failed.*100000 bytes.*blob\.bin\.part"):
        dl.fetch(server.url + "blob.bin", dest, md5, progress=False)
    assert not dest.exists() and dest.with_name("blob.bin.part").stat().st_size == 100_000

    dl.fetch(server.url + "blob.bin", dest, md5, progress=False)
    assert server.requests[-1] == ("/blob.bin", "bytes=100000-")
    assert dest.read_bytes() == payload
    assert not dest.with_name("blob.bin.part").exists()
    assert dl.read_marker(dest) == md5


def test_dropped_connection_is_retried_within_one_call(server: Server, tmp_path: Path) -> None:
    (server.root / "blob.bin").write_bytes(payload := bytes(range(256)) * 1000)
    server.drop_after, server.drops_left = 60_000, 2
    dest = dl.fetch(
        server.url + "blob.bin",
        tmp_path / "blob.bin",
        hashlib.md5(payload).hexdigest(),
        progress=False,
    )
    assert [r for _, r in server.requests] == [None, "bytes=60000-", "bytes=120000-"]
    assert dest.read_bytes() == payload


def test_server_without_range_restarts_from_zero(server: Server, tmp_path: Path) -> None:
    (server.root / "blob.bin").write_bytes(payload := b"0123456789" * 5000)
    server.ignore_range = True
    dest = tmp_path / "blob.bin"
    dest.with_name("blob.bin.part").write_bytes(b"garbage-from-an-old-run")
    dl.fetch(server.url + "blob.bin", dest, hashlib.md5(payload).hexdigest(), progress=False)
    assert server.requests == [("/blob.bin", "bytes=23-")]
    assert dest.read_bytes() == payload


def test_md5_mismatch_is_never_taken_as_good(server: Server, tmp_path: Path) -> None:
    (server.root / "blob.bin").write_bytes(b"payload" * 100)
    dest = tmp_path / "blob.bin"
    with pytest.raises(dl.ChecksumError, match=r"blob\.bin from http.*does not match.*0{32}"):
        dl.fetch(server.url + "blob.bin", dest, "0" * 32, progress=False)
    assert not dest.exists() and not dest.with_name("blob.bin.part").exists()
    assert not dest.with_name("blob.bin.md5ok").exists()
    assert dest.with_name("blob.bin.bad").read_bytes() == b"payload" * 100


def test_missing_file_is_not_retried(server: Server, tmp_path: Path) -> None:
    with pytest.raises(dl.DownloadError, match=r"nothing\.tar: HTTP 404"):
        dl.fetch(server.url + "nothing.tar", tmp_path / "nothing.tar", None, progress=False)
    assert len(server.requests) == 1


# ------------------------------------------------------------------ safe_extract


def _tar_with(tmp_path: Path, member: tarfile.TarInfo, data: bytes = b"") -> Path:
    path = tmp_path / "evil.tar"
    with tarfile.open(path, "w") as tar:
        ok = tarfile.TarInfo("s2ef/ok.txt")
        ok.size = 2
        tar.addfile(ok, io.BytesIO(b"ok"))  # a harmless member first: must not be written
        member.size = len(data) if member.isfile() else 0
        tar.addfile(member, io.BytesIO(data) if member.isfile() else None)
    return path


def _member(name: str, kind: bytes = tarfile.REGTYPE, link: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, link
    return info


@pytest.mark.parametrize(
    ("member", "reason"),
    [
        (_member("s2ef/../../escape.txt"), r"'\.\.' in path"),
        (_member("/tmp/absolute.txt"), "absolute path"),
        (_member("s2ef/link", tarfile.SYMTYPE, "/etc/passwd"), r"link \(to '/etc/passwd'\)"),
        (_member("s2ef/hard", tarfile.LNKTYPE, "s2ef/ok.txt"), "link"),
        (_member("s2ef/fifo", tarfile.FIFOTYPE), "device or fifo"),
        (_member("s2ef/dev", tarfile.CHRTYPE), "device or fifo"),
    ],
)
def test_unsafe_members_are_refused_before_writing(
    tmp_path: Path, member: tarfile.TarInfo, reason: str
) -> None:
    tar_path = _tar_with(tmp_path, member, b"pwned")
    dest = tmp_path / "out" / "x"
    with pytest.raises(dl.UnsafeArchiveError, match=rf"evil\.tar: refusing member .*{reason}"):
        dl.safe_extract(tar_path, dest)
    assert not (tmp_path / "out").exists()
    assert not (tmp_path / "escape.txt").exists()


def test_safe_extract_writes_plain_members(tmp_path: Path) -> None:
    tar_path = _tar_with(tmp_path, _member("s2ef/sub/data.bin"), b"\x00\x01")
    files = dl.safe_extract(tar_path, tmp_path / "out")
    assert sorted(files) == [tmp_path / "out/s2ef/ok.txt", tmp_path / "out/s2ef/sub/data.bin"]
    assert (tmp_path / "out/s2ef/sub/data.bin").read_bytes() == b"\x00\x01"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    with pytest.raises(FileExistsError):
        dl.safe_extract(tar_path, tmp_path / "out")


def test_official_table() -> None:
    names = {a.filename for a in (*dl.TRAIN_ARCHIVES.values(), *dl.VAL_ARCHIVES.values())}
    assert "s2ef_train_200K.tar" in names and "s2ef_val_ood_both.tar" in names
    for archive in (*dl.TRAIN_ARCHIVES.values(), *dl.VAL_ARCHIVES.values()):
        assert archive.md5 is None or re.fullmatch(r"[0-9a-f]{32}", archive.md5)
    assert sum(a.frames for a in dl.VAL_ARCHIVES.values()) == 3_999_457
    with pytest.raises(ValueError, match="unknown train split '3M'"):
        dl.download_splits(Path("unused"), train="3M", val=[])


def test_a_partial_file_that_is_a_symbolic_link_is_refused_and_its_target_kept(
    server: Server, tmp_path: Path
) -> None:
    (server.root / "blob.bin").write_bytes(b"payload" * 100)
    victim = tmp_path / "notes.txt"
    victim.write_bytes(b"keep me")
    dest = tmp_path / "blob.bin"
    dest.with_name("blob.bin.part").symlink_to(victim)
    with pytest.raises(OSError, match=r"blob\.bin\.part: is a symbolic link"):
        dl.fetch(server.url + "blob.bin", dest, None, progress=False)
    assert victim.read_bytes() == b"keep me" and not dest.exists()
    assert server.requests == []
