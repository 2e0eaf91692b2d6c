"""Two-process DDP on CPU (gloo, file:// rendezvous): ranks stay in sync and match one process.

One spawn runs three checks to keep the test near 10 s: (1) ``train_step`` on per-rank
halves equals one process on the whole batch; (2) ``evaluate`` over non-padded shards with
all-reduced sums equals the single-process metrics; (3) ``fit_datasets`` under DDP trains
ForceNet with an (unused, force-only) energy head without the DDP unused-parameter error,
rank 0 alone writes the checkpoint, and both ranks end with identical weights.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from test_train import CUTOFF, GRAPH, TINY_GNS, make_samples, plain_loss, tiny_config
from tiny import fit_split, tiny_kwargs
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Subset

from forcenet import checkpoint as C
from forcenet import distributed as D
from forcenet import train as T
from forcenet.data.batch import collate

WORLD = 2
STEPS = 3
HALF = 3  # structures per rank per step
TINY_FORCENET = tiny_kwargs(
    "forcenet",
    hidden_channels=8,
    num_interactions=1,
    cutoff=CUTOFF,
    num_freqs=4,
    decoder_hidden_channels=8,
    energy_head=True,
)


def _fresh_gns():
    torch.manual_seed(0)
    model = C.build_scaled_model("gns", TINY_GNS)
    model.force_scale.fill_(0.5)
    return model


def _step_batch(samples, step, rank=None):
    start = step * WORLD * HALF
    if rank is None:
        return collate(samples[start : start + WORLD * HALF])
    return collate(samples[start + rank * HALF : start + (rank + 1) * HALF])


def _worker(rank: int, init_file: str, out_dir: str, samples: list) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        dev = Subset(samples, D.shard_indices(7, rank, WORLD))
        loader = DataLoader(dev, batch_size=2, collate_fn=collate)
        metrics = T.evaluate(_fresh_gns(), loader, device="cpu")  # summed over both ranks
        model = _fresh_gns()
        ddp = DistributedDataParallel(model, find_unused_parameters=True)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        for step in range(STEPS):
            T.train_step(
                ddp, _step_batch(samples, step, rank), opt, loss_fn=plain_loss(force_scale=0.5)
            )
        cfg = tiny_config(max_epochs=1, batch_size=2)
        fit_split(cfg, "forcenet", TINY_FORCENET, samples[:13], out_dir, graph=GRAPH, train=8)
        result = {
            "step_state": model.state_dict(),
            "metrics": torch.tensor([metrics["forces_mae"], metrics["num_free_atoms"]]),
            "files": torch.tensor(len(list(__import__("pathlib").Path(out_dir).glob("*.pt")))),
            "fit_state": C.load_checkpoint(f"{out_dir}/last.pt")["model_state"],
        }
        torch.save(result, f"{out_dir}/rank{rank}.res")
    finally:
        dist.destroy_process_group()


def test_two_ranks_match_one_process(tmp_path):
    samples = make_samples(n_systems=5, frames_per_system=4, seed=7)
    mp.spawn(_worker, args=(str(tmp_path / "init"), str(tmp_path), samples), nprocs=WORLD)
    res = [torch.load(tmp_path / f"rank{r}.res", weights_only=True) for r in range(WORLD)]

    # (1) ranks in sync, and equal to one process on the doubled batch
    single = _fresh_gns()
    opt = torch.optim.AdamW(single.parameters(), lr=1e-2)
    for step in range(STEPS):
        T.train_step(single, _step_batch(samples, step), opt, loss_fn=plain_loss(force_scale=0.5))
    for key, value in single.state_dict().items():
        assert torch.equal(res[0]["step_state"][key], res[1]["step_state"][key]), key
        assert torch.allclose(res[0]["step_state"][key], value, atol=2e-5, rtol=1e-4), key

    # (2) exact evaluation over non-padded shards
    loader = DataLoader(samples[:7], batch_size=7, collate_fn=collate)
    ref = T.evaluate(_fresh_gns(), loader, device="cpu")
    assert torch.equal(res[0]["metrics"], res[1]["metrics"])
    assert float(res[0]["metrics"][0]) == pytest.approx(ref["forces_mae"], rel=1e-6)
    assert float(res[0]["metrics"][1]) == ref["num_free_atoms"]  # no padded duplicates

    # (3) DDP fit: checkpoint files from rank 0 only (last + best), identical weights
    assert int(res[0]["files"]) == 2
    for key in res[0]["fit_state"]:
        assert torch.equal(res[0]["fit_state"][key], res[1]["fit_state"][key]), key
