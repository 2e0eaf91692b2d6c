"""Frame averaging: principal-axis frames, exact covariance of a force-centric model
averaged over them, the stochastic training mode, and the checkpoint that carries it."""

from __future__ import annotations

import pytest
import torch
from conftest import FORCE_MODELS, build_tiny, make_batch, predict

from forcenet import checkpoint as C
from forcenet.data import keys as K
from forcenet.frames import FrameAveraging, in_frame, pca_frames
from forcenet.geometry import random_rotation
from forcenet.scaling import ScaledModel
from forcenet.train import TrainConfig


def _rotated(batch: dict, rot: torch.Tensor) -> dict:
    """Positions and cells turned together (row vectors: x @ R); offsets stay valid."""
    return dict(batch, pos=batch[K.POS] @ rot, cell=batch[K.CELL] @ rot)


def _averaged(name: str, dtype: torch.dtype, mode: str = "full") -> ScaledModel:
    return ScaledModel(build_tiny(name, dtype=dtype), frame_averaging=mode).to(dtype).eval()


def test_frames_are_orthogonal_and_turn_with_the_structure(slabs, float64):
    batch = make_batch(slabs, float64)
    g = len(batch[K.NATOMS])
    frames, degenerate = pca_frames(batch[K.POS], batch[K.BATCH], g)
    assert frames.shape == (g, 8, 3, 3) and degenerate.shape == (g,)
    eye = torch.eye(3, dtype=float64).expand(g, 8, 3, 3)
    torch.testing.assert_close(frames.transpose(-1, -2) @ frames, eye)
    # the framed positions of a rotated structure are those of the original, as a set of 8
    rot = random_rotation(torch.Generator().manual_seed(0), dtype=float64)
    turned, _ = pca_frames(batch[K.POS] @ rot, batch[K.BATCH], g)
    for s in torch.nonzero(~degenerate).flatten().tolist():
        atoms = batch[K.BATCH] == s
        mine = torch.stack([batch[K.POS][atoms] @ frames[s, k] for k in range(8)])
        theirs = torch.stack([(batch[K.POS][atoms] @ rot) @ turned[s, k] for k in range(8)])
        dist = torch.cdist(mine.flatten(1), theirs.flatten(1))  # [8, 8]: a permutation
        assert float(dist.min(dim=1).values.max()) < 1e-9


def test_tied_variances_are_flagged_degenerate(float64):
    square = torch.tensor(
        [[1.0, 0.0, 0.0], [-1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, -1.0, 0.0], [0, 0, 0.3]],
        dtype=float64,
    )  # a square: the two in-plane variances tie
    skew = square * torch.tensor([1.0, 1.7, 1.0], dtype=float64)
    pos = torch.cat([square, skew])
    batch = torch.tensor([0] * 5 + [1] * 5)
    _, degenerate = pca_frames(pos, batch, 2)
    assert degenerate.tolist() == [True, False]


@pytest.mark.parametrize("name", FORCE_MODELS)
def test_full_frame_averaging_is_rotation_covariant(name, slabs, float64):
    """An untrained force-centric model averaged over its 8 frames turns its forces with
    any rotation or reflection of the input, to round-off in float64; without the frames
    the same model is far from covariant."""
    batch = make_batch(slabs, float64)
    g = len(batch[K.NATOMS])
    _, degenerate = pca_frames(batch[K.POS], batch[K.BATCH], g)
    keep = (~degenerate).index_select(0, batch[K.BATCH])  # atoms of non-degenerate frames
    assert keep.any()
    plain, averaged = _averaged(name, float64, "none"), _averaged(name, float64)
    gen = torch.Generator().manual_seed(1)
    turns = [random_rotation(gen, dtype=float64) for _ in range(3)]
    turns.append(torch.diag(torch.tensor([1.0, 1.0, -1.0], dtype=float64)))  # a mirror
    for rot in turns:
        ref = predict(averaged, batch)[K.OUT_FORCES]
        out = predict(averaged, _rotated(batch, rot))[K.OUT_FORCES]
        assert float((ref @ rot - out)[keep].abs().max()) <= 1e-5
        raw_ref, raw = (predict(plain, b)[K.OUT_FORCES] for b in (batch, _rotated(batch, rot)))
        assert float((raw_ref @ rot - raw)[keep].abs().max()) > 1e-3


def test_stochastic_mode_trains_on_one_frame_and_evaluates_on_all(slabs):
    batch = make_batch(slabs[:3], torch.float32)
    inner = build_tiny("forcenet")
    frames, _ = pca_frames(batch[K.POS], batch[K.BATCH], 3)
    averaging = FrameAveraging("stochastic")
    averaging.train()
    torch.manual_seed(5)
    trained = averaging(inner, batch)[K.OUT_FORCES]
    torch.manual_seed(5)
    pick = torch.randint(0, 8, (3,))
    one = in_frame(inner, batch, frames[torch.arange(3), pick])[K.OUT_FORCES]
    torch.testing.assert_close(trained, one)
    averaging.eval()
    full = FrameAveraging("full")
    torch.testing.assert_close(
        averaging(inner, batch)[K.OUT_FORCES], full(inner, batch)[K.OUT_FORCES]
    )


def test_checkpoint_carries_frame_averaging(tmp_path, slabs):
    model = _averaged("gns", torch.float32, "stochastic")
    state = C.training_state(
        model,
        torch.optim.AdamW(model.parameters()),
        model_name="gns",
        model_kwargs=build_kwargs("gns"),
        progress={"step": 0, "epoch": 0, "best_metric": None},
        params={},
        graph={"cutoff": 4.5, "max_neighbors": 50},
        metrics={},
        base_lr=1e-3,
    )
    C.save_checkpoint(tmp_path / "m.pt", state)
    loaded, ckpt = C.load_model(tmp_path / "m.pt")
    assert ckpt["frame_averaging"] == "stochastic" and loaded.frame_averaging == "stochastic"
    batch = make_batch(slabs[:2], torch.float32)
    torch.testing.assert_close(
        predict(loaded, batch)[K.OUT_FORCES], predict(model, batch)[K.OUT_FORCES]
    )


def build_kwargs(name: str) -> dict:
    from tiny import TINY_KWARGS

    return dict(TINY_KWARGS[name])


def test_frame_averaging_is_refused_for_gradient_forces():
    with pytest.raises(ValueError, match="direct-force models"):
        ScaledModel(build_tiny("schnet"), frame_averaging="full")
    with pytest.raises(ValueError, match="frame_averaging is for direct forces"):
        TrainConfig(max_steps=10, conservative_finetune_steps=5, frame_averaging="stochastic")
