"""Two-process DDP fine-tuning (gloo, CPU) equals single-process fine-tuning.

What is compared: a small conv net without batch norm or dropout, fine-tuned by
:func:`fetalscan.training.loop.fit_finetune` (AdamW, cosine schedule, class-weighted loss,
early stopping on a validation set) for 4 epochs of 4 steps on 32 imbalanced 64x64 images,
batch 8, no augmentation: once in this process, once as 2 DDP ranks (batch 4 each). The same
global batches and the averaged gradient make the final weights agree within 1e-5 (float
rounding of the sums in another order), the per-epoch training and validation losses within
1e-5, and the kept epoch exactly. Measured: 8.9e-8; with each rank's own class-weighted mean as
its loss (a common mistake) the weights differ by 1.0e-4, so the test fails then.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from conftest import blob_image
from fetalscan.data.transforms import Preprocessing
from fetalscan.errors import FetalscanError
from fetalscan.training.distributed import DistributedConfig, process_group
from fetalscan.training.loop import TrainConfig, fit_finetune

PRE = Preprocessing(input_size=(64, 64), channels=1, normalization="per_image", mean=(0.0,), std=(1.0,), scale=1.0)
CFG = TrainConfig(mode="finetune", epochs=4, batch_size=8, lr=1e-3, augment=False, patience=2, drop_rate=0.0)
TOL = 1e-5


class _TinyNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 8 * 8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(nn.functional.avg_pool2d(torch.relu(self.conv(x)), 8), 1))


def _data() -> tuple[torch.Tensor, np.ndarray]:
    y = np.array([0] * 26 + [1] * 18)  # imbalanced: the class weights matter
    rng = np.random.default_rng(5)
    y = y[rng.permutation(len(y))]
    x = torch.stack([torch.from_numpy(blob_image(i, 64, bright=bool(c))[..., 0].copy())[None] for i, c in enumerate(y)])
    return x, y


def _fit():
    x, y = _data()
    torch.manual_seed(0)
    model = _TinyNet()
    fit = fit_finetune(model, PRE, x[:32], y[:32], x[32:], y[32:], 2, CFG, torch.device("cpu"), seed=3)
    return model, fit


def _worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    with process_group(DistributedConfig("ddp", world, 1), "cpu") as ctx:
        model, fit = _fit()
        if ctx.is_main:
            torch.save({"state": model.state_dict(), "fit": fit.to_dict()}, out)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_process_ddp_matches_single_process_training(tmp_path: Path) -> None:
    import torch.multiprocessing as mp

    out = tmp_path / "ddp.pt"
    mp.spawn(_worker, args=(2, _free_port(), str(out)), nprocs=2, join=True)
    ddp = torch.load(out, weights_only=False)
    torch.manual_seed(0)
    init = _TinyNet().state_dict()
    model, fit = _fit()
    single = model.state_dict()
    moved = max(float((single[k] - init[k]).abs().max()) for k in single)
    assert moved > 1e-3, "training did not change the weights: the comparison would be empty"
    for k, v in single.items():
        assert torch.allclose(ddp["state"][k], v, atol=TOL, rtol=0), (k, float((ddp["state"][k] - v).abs().max()))
    assert ddp["fit"]["best_epoch"] == fit.best_epoch and ddp["fit"]["epochs_run"] == fit.epochs_run
    for a, b in zip(ddp["fit"]["history"], fit.history, strict=True):
        assert a["train_loss"] == pytest.approx(b["train_loss"], abs=TOL)
        assert a["val_loss"] == pytest.approx(b["val_loss"], abs=TOL)


def test_distributed_options_are_checked() -> None:
    with pytest.raises(FetalscanError, match="needs --mode finetune"):
        DistributedConfig("ddp", 2).validate("cached")
    with pytest.raises(FetalscanError, match="--devices must be >= 1"):
        DistributedConfig("ddp", 0).validate("finetune")
    with pytest.raises(FetalscanError, match="needs --strategy ddp"):
        DistributedConfig("none", 2).validate("finetune")
    with pytest.raises(FetalscanError, match="--strategy must be one of"):
        DistributedConfig("horovod").validate()
    DistributedConfig("ddp", 2, 2).validate("finetune")


def test_ddp_outside_torchrun_is_refused(monkeypatch) -> None:
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    with pytest.raises(FetalscanError, match="not started by torchrun"):
        with process_group(DistributedConfig("ddp", 2)):
            pass


@pytest.mark.slow
def test_fetalscan_train_with_ddp_runs_two_processes_and_rank_0_writes(toy_manifest, tmp_path: Path) -> None:
    """`fetalscan train --strategy ddp --devices 2` starts torchrun itself; the model is written once, by rank 0."""
    import subprocess
    import sys

    from fetalscan.fileio import LOCK_FILE, UNFINISHED_MARKER
    from fetalscan.models.checkpoint import load_checkpoint

    manifest = toy_manifest(groups=6, per_group=2)
    out = tmp_path / "run"
    res = subprocess.run([sys.executable, "-m", "fetalscan", "train", "--data", str(manifest), "--mode", "finetune",
                          "--epochs", "1", "--batch-size", "4", "--inner-folds", "0", "--no-augment", "--strategy",
                          "ddp", "--devices", "2", "--device", "cpu", "--out", str(out), "--no-progress"],
                         capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.count("model: ") == 1  # rank 1 trained silently
    assert sorted(p.name for p in out.iterdir()) == ["audit.json", "inner_val_predictions.csv", "model.pt",
                                                      "train.json"]
    assert not (out / LOCK_FILE).exists() and not (out / UNFINISHED_MARKER).exists()
    assert load_checkpoint(out / "model.pt").classes == ["abnormal", "normal"]
