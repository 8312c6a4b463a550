"""Training: full fine-tuning, and the frozen-backbone feature-caching mode.

Both modes minimise class-weighted cross-entropy with AdamW and a cosine
learning-rate schedule, and stop early on the *inner validation* split only
(best epoch = lowest inner-validation loss; the test fold is never looked at).

- ``finetune`` (the published way, e.g. ResNet34 in the CNS-anomaly study):
  every weight is trained, with ultrasound augmentation, on mini-batches.
- ``cached`` (fetalscan's fast mode): the pretrained backbone is frozen, each
  image's pooled embedding is computed once (:func:`compute_embeddings`) and
  reused by every fold; only a head is trained on standardised embeddings: by
  default a class-balanced multinomial L2 logistic regression whose strength is
  chosen by an inner grouped CV (:mod:`fetalscan.training.selection`), or a
  linear / MLP head trained with torch, full-batch. Leave-one-group-out over hundreds of groups becomes a
  matter of seconds per fold on a CPU. The trained head is put back on the
  backbone, so the saved model predicts from images exactly like any other.

Images arrive already prepared (``uint8 (N, C, h, w)``, see
:mod:`fetalscan.transforms`), so decoding and resizing happen once per run.

Called inside a DDP process group (``--strategy ddp``, :mod:`fetalscan.training.distributed`),
:func:`fit_finetune` trains data-parallel with the same global batches, loss and stopping
decisions as one process; outside one it runs the single-process code, unchanged.
"""

from __future__ import annotations

import copy
import logging
import math
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from torch import nn

from fetalscan.data.transforms import Augment, Preprocessing, normalize
from fetalscan.errors import FetalscanError
from fetalscan.inference.predict import _autocast, predict_logits
from fetalscan.models.heads import HEAD_KINDS, build_classifier, cached_head
from fetalscan.models.registry import (
    get_backbone_spec,
)
from fetalscan.progress import track
from fetalscan.runtime import single_thread
from fetalscan.training import distributed

log = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    """Every knob of a training run; the CLI maps its flags 1:1 onto these fields."""

    backbone: str = "sononet16"
    pretrained: str = "sononet"
    mode: str = "cached"  # "cached" (frozen backbone + head) or "finetune"
    head: str = "logreg"  # "logreg" (scikit-learn, cached mode), "linear" or "mlp" (torch)
    head_hidden: int = 256
    drop_rate: float = 0.2
    # fine-tuning
    epochs: int = 30
    batch_size: int = 16
    lr: float = 3e-4
    weight_decay: float = 1e-4
    patience: int = 6
    augment: bool = True
    # cached-feature head
    head_epochs: int = 300
    head_lr: float = 1e-2
    head_weight_decay: float = 1e-2
    head_patience: int = 40
    # logistic-regression head: inverse L2 strength; 0 = chosen by the inner grouped CV over C_GRID
    logreg_c: float = 0.0
    # choosing C / the epoch count: folds of an inner grouped CV over the training groups
    # (0 = one inner split of val_fraction with early stopping, the fetalscan <= 0.1 behaviour)
    inner_folds: int = 5
    # k >= 2: keep the k models of a k-fold inner grouped CV and average their probabilities
    ensemble: int = 0
    # shared
    val_fraction: float = 0.2
    class_weighting: bool = True
    seed: int = 0
    device: str = "auto"
    amp: bool = True

    def to_dict(self) -> dict:
        return asdict(self)

    def validate(self) -> None:
        if self.mode not in ("cached", "finetune"):
            raise FetalscanError(f"mode must be 'cached' or 'finetune', got {self.mode!r}")
        if self.head not in HEAD_KINDS:
            raise FetalscanError(f"head must be one of {', '.join(HEAD_KINDS)}, got {self.head!r}")
        for name in ("epochs", "batch_size", "head_epochs"):
            if getattr(self, name) < 1:
                raise FetalscanError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.inner_folds == 1 or self.inner_folds < 0:
            raise FetalscanError(f"inner_folds must be 0 (one inner split) or >= 2, got {self.inner_folds}")
        if self.ensemble < 0:
            raise FetalscanError(f"ensemble must be 0 (one model) or the number of fold models >= 2, "
                                 f"got {self.ensemble}")
        if self.ensemble >= 2 and self.mode != "cached":
            raise FetalscanError("ensemble >= 2 needs mode='cached' (an ensemble of fine-tuned networks would hold "
                                 f"{self.ensemble} full backbones); use mode='cached' or ensemble=0")
        if self.logreg_c < 0:
            raise FetalscanError(f"logreg_c must be > 0, or 0 to choose it by inner grouped CV; got {self.logreg_c}")
        get_backbone_spec(self.backbone)

    @property
    def selection_folds(self) -> int:
        """Folds of the inner grouped CV that chooses C / the epoch count (0 = one inner split)."""
        return int(self.ensemble) if self.ensemble >= 2 else int(self.inner_folds)


@dataclass
class FitResult:
    """What one training produced (the model itself is returned beside it)."""

    best_epoch: int
    best_val_loss: float
    epochs_run: int
    history: list[dict] = field(default_factory=list)
    selection: dict = field(default_factory=dict)  # how C / the epoch count was chosen (inner grouped CV)

    def to_dict(self) -> dict:
        return asdict(self)


def class_weights(y: np.ndarray, n_classes: int) -> torch.Tensor:
    """Balanced weights ``n / (K * n_c)`` for classes present in ``y`` (1 for absent ones)."""
    counts = np.bincount(y, minlength=n_classes).astype(np.float64)
    present = counts > 0
    w = np.ones(n_classes)
    w[present] = counts.sum() / (present.sum() * counts[present])
    return torch.tensor(w, dtype=torch.float32)


def _batch(images: torch.Tensor, y: torch.Tensor, idx: torch.Tensor, pre: Preprocessing, device: torch.device,
           augment: Augment | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The training batch ``idx``: images augmented (if any), normalised and on ``device``, with their labels."""
    xb = images[idx].float()
    if augment is not None:
        xb = augment(xb)
    return normalize(xb.to(device), pre), y[idx].to(device)


def _step(loss: torch.Tensor, optimizer: torch.optim.Optimizer, scheduler) -> None:
    """One optimiser and scheduler step on ``loss``."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    scheduler.step()


def train_one_epoch(
    model: nn.Module, images: torch.Tensor, y: torch.Tensor, pre: Preprocessing,
    optimizer: torch.optim.Optimizer, scheduler, loss_fn: nn.Module, device: torch.device,
    batch_size: int, gen: torch.Generator, augment: Augment | None, amp: bool,
) -> float:
    """One pass over the training images in a seeded random order; mean loss."""
    model.train()
    order = torch.randperm(len(images), generator=gen)
    total, seen = 0.0, 0
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        if len(idx) < 2 and len(order) > 1:  # batch norm cannot train on one sample
            continue
        xb, yb = _batch(images, y, idx, pre, device, augment)
        with _autocast(device, amp):
            loss = loss_fn(model(xb).float(), yb)
        _step(loss, optimizer, scheduler)
        total += loss.item() * len(idx)
        seen += len(idx)
    return total / max(seen, 1)


def _train_one_epoch_ddp(
    model: nn.Module, images: torch.Tensor, y: torch.Tensor, pre: Preprocessing,
    optimizer: torch.optim.Optimizer, scheduler, weights: torch.Tensor, device: torch.device,
    batch_size: int, gen: torch.Generator, augment: Augment | None, amp: bool, ctx,
) -> float:
    """:func:`train_one_epoch` as one rank of a DDP group (``model`` wrapped in DistributedDataParallel).

    The same seeded permutation and global batches as one process; this rank trains on
    ``batch[rank::world]`` with its share of the global batch's class-weighted mean loss
    (times the world size, since DDP averages gradients), so the averaged gradient is the
    single-process one. A batch that would leave a rank without an image is skipped on all.
    """
    model.train()
    order = torch.randperm(len(images), generator=gen)
    ce = nn.CrossEntropyLoss(weight=weights.to(device), reduction="sum")
    total, seen = 0.0, 0
    for start in range(0, len(order), batch_size):
        batch = order[start:start + batch_size]
        if (len(batch) < 2 and len(order) > 1) or len(batch) < ctx.world_size:
            continue
        idx = distributed.rank_share(batch, ctx)
        denominator = float(weights[y[batch]].sum())  # every rank knows the whole global batch
        xb, yb = _batch(images, y, idx, pre, device, augment)
        with _autocast(device, amp):
            part = ce(model(xb).float(), yb) / denominator
        _step(part * ctx.world_size, optimizer, scheduler)
        total += part.item() * len(batch)  # summed over ranks: the global batch's mean loss x its size
        seen += len(batch)
    return distributed.all_reduce_sum([total], device)[0] / max(seen, 1)


def _val_loss_ddp(model: nn.Module, x_val: torch.Tensor, y_val: torch.Tensor, pre: Preprocessing,
                  weights: torch.Tensor, device: torch.device, batch_size: int, amp: bool, ctx) -> float:
    """Class-weighted mean validation loss, each rank scoring ``x_val[rank::world]``; rank 0's value on all."""
    idx = torch.arange(len(x_val))[ctx.rank::ctx.world_size]
    num = 0.0
    if len(idx):
        logits = predict_logits(model, x_val[idx], pre, device, batch_size, amp)
        num = float(nn.CrossEntropyLoss(weight=weights, reduction="sum")(logits, y_val[idx]))
    den = float(weights[y_val[idx]].sum())
    num, den = distributed.all_reduce_sum([num, den], device)
    return distributed.broadcast_float(num / den, device)


def fit_finetune(
    model: nn.Module, pre: Preprocessing, x_tr: torch.Tensor, y_tr: np.ndarray,
    x_val: torch.Tensor, y_val: np.ndarray, n_classes: int, cfg: TrainConfig,
    device: torch.device, seed: int, fixed_epochs: bool = False, stop_at: int | None = None,
) -> FitResult:
    """Train every weight; keep the epoch with the lowest inner-validation loss.

    With ``fixed_epochs`` (benchmark of the published protocol) all ``cfg.epochs``
    run and the last epoch is kept. With ``stop_at`` (a refit with the epoch count an
    inner grouped CV chose) the first ``stop_at`` epochs of the same schedule run, no
    validation data is used, and the last epoch is kept.
    """
    if stop_at is not None:
        fixed_epochs = True
    model.to(device)
    weights = class_weights(y_tr, n_classes) if cfg.class_weighting else torch.ones(n_classes)
    loss_fn = nn.CrossEntropyLoss(weight=weights.to(device))
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps = cfg.epochs * max(1, math.ceil(len(x_tr) / cfg.batch_size))
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)
    gen = torch.Generator().manual_seed(seed)
    ddp = distributed.active()  # None in one process: the code below is the single-process path unchanged
    aug_seed = seed if ddp is None else seed + distributed.RANK_SEED_STRIDE * ddp.rank
    augment = Augment(seed=aug_seed) if cfg.augment else None
    if ddp is not None:
        net = distributed.wrap(model, device, ddp)
        if ddp.rank:
            torch.manual_seed(aug_seed)  # dropout masks differ between ranks; rank 0 keeps the caller's stream
    yt, yv = torch.as_tensor(y_tr), torch.as_tensor(y_val)
    best = (math.inf, 0, copy.deepcopy(model.state_dict()))
    history = []
    n_epochs = cfg.epochs if stop_at is None else max(1, min(int(stop_at), cfg.epochs))
    for epoch in track(range(1, n_epochs + 1), "fine-tuning", total=n_epochs):
        if ddp is not None:
            train_loss = _train_one_epoch_ddp(net, x_tr, yt, pre, optimizer, scheduler, weights, device,
                                              cfg.batch_size, gen, augment, cfg.amp, ddp)
        else:
            train_loss = train_one_epoch(model, x_tr, yt, pre, optimizer, scheduler, loss_fn, device,
                                         cfg.batch_size, gen, augment, cfg.amp)
        val_loss = math.nan
        if len(x_val) and not fixed_epochs and ddp is not None:
            val_loss = _val_loss_ddp(model, x_val, yv, pre, weights, device, cfg.batch_size * 2,
                                     cfg.amp, ddp)
        elif len(x_val) and not fixed_epochs:
            logits = predict_logits(model, x_val, pre, device, cfg.batch_size * 2, cfg.amp)
            val_loss = float(loss_fn(logits.to(device), yv.to(device)))
        history.append({"epoch": epoch, "train_loss": train_loss, "val_loss": val_loss})
        if fixed_epochs:
            continue
        if val_loss < best[0] - 1e-6:
            best = (val_loss, epoch, copy.deepcopy(model.state_dict()))
        elif epoch - best[1] >= cfg.patience:
            break
    if fixed_epochs:
        return FitResult(len(history), math.nan, len(history), history)
    model.load_state_dict(best[2])
    return FitResult(best[1], best[0], len(history), history)




def fit_head(
    f_tr: torch.Tensor, y_tr: np.ndarray, f_val: torch.Tensor, y_val: np.ndarray,
    n_classes: int, cfg: TrainConfig, seed: int, stop_at: int | None = None,
) -> tuple[nn.Sequential, FitResult]:
    """Train a torch head (``linear`` / ``mlp``) on cached embeddings, full-batch, early-stopped
    on inner validation; with ``stop_at``, exactly that many epochs of the same schedule
    (no validation data; the last epoch is kept)."""
    with single_thread():
        return _fit_head(f_tr, y_tr, f_val, y_val, n_classes, cfg, seed, stop_at)


def _fit_head(f_tr, y_tr, f_val, y_val, n_classes, cfg, seed, stop_at):
    torch.manual_seed(seed)
    kind = "linear" if cfg.head == "logreg" else cfg.head
    head = cached_head(f_tr.shape[1], n_classes, kind, cfg.head_hidden, cfg.drop_rate)
    head[0].mean.copy_(f_tr.mean(0))
    head[0].std.copy_(f_tr.std(0, unbiased=False).clamp_min(1e-6))
    weights = class_weights(y_tr, n_classes) if cfg.class_weighting else torch.ones(n_classes)
    loss_fn = nn.CrossEntropyLoss(weight=weights)
    optimizer = torch.optim.AdamW(head.parameters(), lr=cfg.head_lr, weight_decay=cfg.head_weight_decay)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=cfg.head_epochs)
    yt, yv = torch.as_tensor(y_tr), torch.as_tensor(y_val)
    best = (math.inf, 0, copy.deepcopy(head.state_dict()))
    history = []
    n_epochs = cfg.head_epochs if stop_at is None else max(1, min(int(stop_at), cfg.head_epochs))
    for epoch in range(1, n_epochs + 1):
        head.train()
        loss = loss_fn(head(f_tr), yt)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        head.eval()
        if stop_at is not None:
            history.append({"epoch": epoch, "train_loss": loss.item(), "val_loss": math.nan})
            continue
        with torch.inference_mode():
            val_loss = float(loss_fn(head(f_val), yv)) if len(f_val) else math.nan
        history.append({"epoch": epoch, "train_loss": loss.item(), "val_loss": val_loss})
        if val_loss < best[0] - 1e-6:
            best = (val_loss, epoch, copy.deepcopy(head.state_dict()))
        elif epoch - best[1] >= cfg.head_patience:
            break
    if stop_at is not None:
        return head.eval(), FitResult(n_epochs, math.nan, n_epochs, history)
    head.load_state_dict(best[2])
    head.eval()
    return head, FitResult(best[1], best[0], len(history), history)


def new_model(cfg: TrainConfig, n_classes: int) -> nn.Module:
    """A fresh model for ``cfg``: backbone + (cached head | plain head)."""
    return build_classifier(cfg.backbone, n_classes, mode=cfg.mode, head=cfg.head, head_hidden=cfg.head_hidden,
                            drop_rate=cfg.drop_rate, pretrained=cfg.pretrained,
                            ensemble=cfg.ensemble if cfg.mode == "cached" else 0)


def freeze_backbone(model: nn.Module) -> None:
    """Freeze every parameter (used by the cached mode; the head is swapped in afterwards)."""
    for p in model.parameters():
        p.requires_grad_(False)
    model.eval()
