"""Training lowers the loss on real images, is deterministic, and early-stops on the inner split."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from fetalscan.data.records import load_dataset, prepare_images
from fetalscan.data.transforms import Augment, normalize
from fetalscan.inference.predict import compute_embeddings
from fetalscan.models.registry import get_backbone_spec
from fetalscan.training.loop import (
    TrainConfig,
    class_weights,
    fit_finetune,
    fit_head,
    freeze_backbone,
    new_model,
)


@pytest.fixture(scope="module")
def tiny_real(fetal_brain: Path):
    """12 real images: 6 normal and 6 ventriculomegaly, from different groups."""
    ds = load_dataset(fetal_brain)
    pick, seen = [], {"normal": 0, "mild_ventriculomegaly": 0}
    for i, r in enumerate(ds.records):
        if r.label in seen and seen[r.label] < 6:
            pick.append(i)
            seen[r.label] += 1
    sub = ds.subset(pick)
    sub.classes = ["mild_ventriculomegaly", "normal"]
    pre = get_backbone_spec("sononet16").preprocessing
    images, _ = prepare_images(sub.records, pre)
    return sub, images, pre


@pytest.mark.slow
def test_finetuning_lowers_the_training_loss(tiny_real) -> None:
    ds, images, pre = tiny_real
    y = ds.y
    cfg = TrainConfig(mode="finetune", epochs=6, batch_size=4, lr=1e-3, augment=False, patience=100)
    torch.manual_seed(0)
    model = new_model(cfg, 2)
    fit = fit_finetune(model, pre, images, y, images[:0], y[:0], 2, cfg, torch.device("cpu"), seed=0,
                       fixed_epochs=True)
    losses = [h["train_loss"] for h in fit.history]
    assert losses[-1] < losses[0] * 0.8, losses


def test_cached_head_learns_and_stops_on_validation(tiny_real) -> None:
    ds, images, pre = tiny_real
    y = ds.y
    cfg = TrainConfig()
    backbone = new_model(cfg, 2)
    freeze_backbone(backbone)
    emb = compute_embeddings(backbone, images, pre, torch.device("cpu"))
    assert emb.shape == (12, 64)
    tr, va = np.r_[0:4, 6:10], np.r_[4:6, 10:12]
    head, fit = fit_head(emb[tr], y[tr], emb[va], y[va], 2, cfg, seed=0)
    assert fit.history[0]["train_loss"] > fit.history[fit.best_epoch - 1]["train_loss"]
    assert 1 <= fit.best_epoch <= fit.epochs_run
    # the kept epoch has the lowest inner-validation loss (improvements < 1e-6 do not count)
    lowest = min(h["val_loss"] for h in fit.history)
    assert fit.history[fit.best_epoch - 1]["val_loss"] == pytest.approx(lowest, abs=1e-6)
    assert fit.best_val_loss == fit.history[fit.best_epoch - 1]["val_loss"]


@pytest.mark.slow
def test_training_is_deterministic_for_a_seed(tiny_real) -> None:
    ds, images, pre = tiny_real
    y = ds.y
    cfg = TrainConfig(mode="finetune", epochs=2, batch_size=4)
    outs = []
    for _ in range(2):
        torch.manual_seed(0)
        model = new_model(cfg, 2)
        fit_finetune(model, pre, images[:8], y[:8], images[8:], y[8:], 2, cfg, torch.device("cpu"), seed=3)
        model.eval()
        with torch.inference_mode():
            outs.append(model(normalize(images, pre)))
    assert torch.equal(outs[0], outs[1])


def test_class_weights_balance_present_classes() -> None:
    w = class_weights(np.array([0, 0, 0, 1]), 3)
    assert w.tolist() == pytest.approx([4 / 6, 2.0, 1.0])


def test_augmentation_keeps_shape_range_and_is_seeded() -> None:
    x = torch.randint(0, 256, (4, 1, 32, 40), dtype=torch.uint8).float()
    a, b = Augment(seed=1)(x.clone()), Augment(seed=1)(x.clone())
    assert a.shape == x.shape and torch.equal(a, b)
    assert a.min() >= 0 and a.max() <= 255 and not torch.equal(a, x)
