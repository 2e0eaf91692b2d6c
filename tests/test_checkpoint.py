"""Checkpoint integrity: a checksum written at save and verified at load; clear failed writes."""

from __future__ import annotations

import errno
import io
import os

import pytest
import torch
from tiny import CUTOFF, MAX_NEIGHBORS, save_model_checkpoint, tiny_kwargs
from typer.testing import CliRunner

from forcenet import checkpoint as C
from forcenet.cli import app

KWARGS = tiny_kwargs("gns")


def _checkpoint(path):
    """A real checkpoint of a tiny untrained GNS, with Adam state; returns its state dict."""
    torch.manual_seed(0)
    model = C.build_scaled_model("gns", KWARGS)
    save_model_checkpoint(path, "gns", model, KWARGS, cutoff=CUTOFF, max_neighbors=MAX_NEIGHBORS)
    return model.state_dict()


def _legacy(path):
    """``path`` rewritten as a checkpoint without a checksum (same content, no key)."""
    ckpt = C.load_checkpoint(path)
    del ckpt[C.CHECKSUM_KEY]
    torch.save(ckpt, path)


def test_overwritten_tensor_bytes_are_refused_naming_the_file(tmp_path):
    path = tmp_path / "best.pt"
    state = _checkpoint(path)
    weight = max(state.values(), key=torch.Tensor.numel)  # the largest tensor
    raw = path.read_bytes()
    at = raw.find(weight.numpy().tobytes())
    assert at > 0 and weight.numel() * 4 > 256
    damaged = bytearray(raw)
    damaged[at + 128 : at + 192] = b"\xff" * 64  # 16 float32 NaNs in the middle of it
    path.write_bytes(bytes(damaged))
    with pytest.raises(C.CheckpointError, match=r"best\.pt: checkpoint is damaged"):
        C.load_checkpoint(path)
    with pytest.raises(C.CheckpointError, match=r"best\.pt: checkpoint is damaged"):
        C.load_model(path)


def test_changed_settings_with_the_old_checksum_are_refused(tmp_path):
    path = tmp_path / "last.pt"
    _checkpoint(path)
    ckpt = C.load_checkpoint(path)
    ckpt["graph"]["cutoff"] = 6.0  # the stored checksum is kept: a tampered file
    torch.save(ckpt, path)
    with pytest.raises(C.CheckpointError, match=r"last\.pt: checkpoint is damaged"):
        C.load_checkpoint(path)


def test_checksum_covers_dtype_shape_values_and_settings():
    base = {"w": torch.zeros(2, 3), "step": 1, "info": {"a": [1.0, None]}}
    same = {"info": {"a": [1.0, None]}, "step": 1, "w": torch.zeros(2, 3)}  # other order
    assert C.state_checksum(base) == C.state_checksum(same)
    assert C.state_checksum(base) == C.state_checksum(base | {C.CHECKSUM_KEY: "x"})
    changed = [
        base | {"w": torch.zeros(3, 2)},
        base | {"w": torch.zeros(2, 3, dtype=torch.float64)},
        base | {"w": torch.zeros(2, 3).index_fill_(1, torch.tensor([2]), 1e-30)},
        base | {"step": 2},
        base | {"info": {"a": (1.0, None)}},
        base | {"info": {"a": "[1.0, null]"}},
    ]
    sums = {C.state_checksum(s) for s in changed}
    assert len(sums) == len(changed) and C.state_checksum(base) not in sums


def test_saving_the_same_state_twice_gives_identical_files(tmp_path):
    _checkpoint(tmp_path / "a.pt")
    _checkpoint(tmp_path / "b.pt")
    assert (tmp_path / "a.pt").read_bytes() == (tmp_path / "b.pt").read_bytes()
    # loading and saving again reproduces the file: the checksum is stable across a load
    C.save_checkpoint(tmp_path / "c.pt", C.load_checkpoint(tmp_path / "a.pt"))
    assert (tmp_path / "c.pt").read_bytes() == (tmp_path / "a.pt").read_bytes()


def test_save_leaves_the_callers_state_alone(tmp_path):
    state = {k: 0 for k in C.REQUIRED_KEYS} | {"format_version": 1}
    C.save_checkpoint(tmp_path / "x.pt", state)
    assert C.CHECKSUM_KEY not in state
    assert C.load_checkpoint(tmp_path / "x.pt")[C.CHECKSUM_KEY].startswith("sha256:")


def test_checkpoint_without_checksum_is_refused_with_how_to_resave(tmp_path):
    path = tmp_path / "old.pt"
    state = _checkpoint(path)
    _legacy(path)
    with pytest.raises(C.CheckpointError, match=r"old\.pt: checkpoint has no checksum") as err:
        C.load_checkpoint(path)
    assert f"forcenet checkpoint-resave {path}" in str(err.value)
    assert "retrain" in str(err.value)

    result = CliRunner().invoke(app, ["checkpoint-resave", str(path)])
    assert result.exit_code == 0, result.output
    assert '"had_checksum": false' in result.output
    model, _ = C.load_model(path)
    for key, value in state.items():
        torch.testing.assert_close(model.state_dict()[key], value, rtol=0, atol=0)


def test_resave_writes_elsewhere_and_refuses_a_damaged_file(tmp_path):
    path = tmp_path / "old.pt"
    _checkpoint(path)
    _legacy(path)
    before = path.read_bytes()
    C.resave_checkpoint(path, tmp_path / "new.pt")
    assert path.read_bytes() == before  # the original is left as it was
    C.load_checkpoint(tmp_path / "new.pt")

    ckpt = C.load_checkpoint(tmp_path / "new.pt")
    ckpt["step"] = 7  # keeps the old checksum: damaged, must not be sealed
    torch.save(ckpt, tmp_path / "bad.pt")
    with pytest.raises(C.CheckpointError, match=r"bad\.pt: checkpoint is damaged"):
        C.resave_checkpoint(tmp_path / "bad.pt")


class _FullDisk(io.FileIO):
    """A file on a disk with 4 KiB free: writes past that fail with ENOSPC."""

    def write(self, data):  # type: ignore[override]
        if self.tell() + len(memoryview(data).cast("B")) > 4096:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return super().write(data)


def test_disk_full_while_saving_names_the_file_and_leaves_no_temp_file(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    _checkpoint(path)
    before = path.read_bytes()
    monkeypatch.setattr(C, "open", _FullDisk, raising=False)  # the module's open()
    with pytest.raises(C.CheckpointError) as err:
        _checkpoint(path)
    message = str(err.value)
    assert message.startswith(f"{path}: cannot save the checkpoint: no space left on the device")
    assert "inline_container" not in message
    assert path.read_bytes() == before  # the previous checkpoint is intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]  # no temp file left


def test_other_failed_writes_name_the_file(tmp_path, monkeypatch):
    def refused(*args, **kwargs):
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(C, "open", refused, raising=False)
    with pytest.raises(
        C.CheckpointError, match=r"last\.pt: cannot save the checkpoint: Input/output error"
    ):
        _checkpoint(tmp_path / "last.pt")
    assert list(tmp_path.iterdir()) == []
