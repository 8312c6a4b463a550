"""Choosing a head's regularisation by an inner grouped CV, and the final fit.

With a few dozen patients, early stopping on one inner split of a handful of them
picks noise. The default rule here is the standard answer: an **inner grouped
k-fold CV over the training groups only** (:func:`fetalscan.splits.inner_group_folds`)
chooses the head's one hyper-parameter, and the head is then refitted on all the
training groups with it (or, with ``ensemble`` = k, the k inner-fold models are kept
and their probabilities averaged).

- ``logreg`` (default): multinomial L2 logistic regression (scikit-learn, lbfgs) on
  standardised embeddings, class-balanced (``class_weight="balanced"``); the inverse
  strength ``C`` is chosen from :data:`C_GRID` (13 values, 1e-4 to 1e2, half-decade
  steps) by the lowest pooled out-of-fold **class-balanced log loss** (the mean over
  classes of each class's mean negative log-probability; ties go to the smaller C,
  i.e. the stronger penalty). The fitted model is stored as the usual cached head
  (:func:`fetalscan.models.heads.linear_head_from_logreg`), so checkpoints, the
  prediction path, fold models and Grad-CAM are unchanged.
- ``linear`` / ``mlp`` (torch) and fine-tuning: every inner fold trains with early
  stopping on its own held-out fold; the epoch count with the lowest mean
  held-out loss over the folds (a fold that stopped early keeps its last loss) is
  chosen, and the refit runs that many epochs of the same schedule.

The held-out predictions of the inner folds (at the chosen value) cover every
training group; they replace the single inner-validation split for temperature
scaling and screening thresholds (``inner_val_predictions.csv``).

``inner_folds = 0`` restores the single inner split (``val_fraction``): torch heads and
fine-tuning keep the early-stopped model (no refit), ``logreg`` chooses C on that split
and refits on all the training groups.

The test fold is never passed to anything here: every function receives the
training records' indices only.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass, replace

import numpy as np
import torch
from torch import nn

from fetalscan.errors import FetalscanError
from fetalscan.inference.predict import predict_logits, softmax_with_temperature
from fetalscan.models.heads import EnsembleHead, linear_head_from_logreg
from fetalscan.models.registry import get_backbone_spec
from fetalscan.runtime import seed_everything, single_thread
from fetalscan.splits import Fold, inner_group_folds
from fetalscan.training.loop import (
    FitResult,
    TrainConfig,
    fit_finetune,
    fit_head,
    new_model,
)

log = logging.getLogger(__name__)


#: Inverse L2 strengths tried for the ``logreg`` head: 1e-4 ... 1e2, half-decade steps.
C_GRID: tuple[float, ...] = tuple(float(f"{c:.4g}") for c in np.logspace(-4, 2, 13))


#: Probabilities are clipped here before the log loss (a class unseen in an inner fold's training).
EPS = 1e-6


#: Offset of the inner CV's seed from the fold's training seed (the inner folds differ from the outer ones).
INNER_SEED_OFFSET = 7919


@dataclass
class HeadFit:
    """A trained head (cached mode) or model (fine-tuning), with its held-out predictions.

    ``val_idx`` are record indices (of the whole dataset) that were held out while
    the hyper-parameter was chosen, and ``val_probs`` their probabilities from a model
    that did not see them; they feed calibration and screening thresholds.
    """

    module: nn.Module
    fit: FitResult
    val_idx: np.ndarray
    val_probs: np.ndarray


def balanced_log_loss(y: np.ndarray, probs: np.ndarray, balanced: bool = True) -> float:
    """Mean negative log-probability of the true class; with ``balanced``, averaged per class first.

    Probabilities are clipped to ``[EPS, 1]``.
    """
    y = np.asarray(y, dtype=np.int64)
    nll = -np.log(np.clip(probs[np.arange(len(y)), y], EPS, 1.0))
    if not balanced:
        return float(nll.mean())
    return float(np.mean([nll[y == c].mean() for c in np.unique(y)]))


def inner_folds_of(train_idx: np.ndarray, labels, groups, k: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """``(inner_train, held_out)`` record indices of a k-fold grouped CV over ``train_idx`` only."""
    train_idx = np.sort(np.asarray(train_idx))
    lab = [labels[i] for i in train_idx]
    grp = [groups[i] for i in train_idx]
    out = []
    for held in inner_group_folds(lab, grp, k, seed):
        mask = np.zeros(len(train_idx), dtype=bool)
        mask[held] = True
        out.append((train_idx[~mask], train_idx[mask]))
    return out


# --------------------------------------------------------------------------- logistic regression


_CONTROLLER = None


def _one_blas_thread():
    """A context that limits BLAS to one thread (the library scan is done once, not per fit)."""
    global _CONTROLLER
    from threadpoolctl import ThreadpoolController

    if _CONTROLLER is None:
        _CONTROLLER = ThreadpoolController()
    return _CONTROLLER.limit(limits=1, user_api="blas")


def fit_logreg(f: torch.Tensor, y: np.ndarray, n_classes: int, c: float, class_weighting: bool = True) -> nn.Sequential:
    """Fit a multinomial L2 logistic regression on standardised ``f`` and return it as a cached head.

    ``softmax(head(f))`` is the fitted model's ``predict_proba``. A single class in
    ``y`` gives a head that predicts it with probability ~1.
    """
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression

    f = torch.as_tensor(f, dtype=torch.float32)
    y = np.asarray(y, dtype=np.int64)
    mean = f.mean(0)
    std = f.std(0, unbiased=False).clamp_min(1e-6)
    present = np.unique(y)
    if len(present) < 2:
        return linear_head_from_logreg(np.zeros((1, f.shape[1])), np.zeros(1), present, mean, std, n_classes)
    x = ((f - mean) / std).double().numpy()
    model = LogisticRegression(C=float(c), class_weight="balanced" if class_weighting else None, max_iter=5000)
    # one BLAS thread: on a few hundred rows, threaded BLAS inside lbfgs is ~10x slower on a busy CPU
    with warnings.catch_warnings(), _one_blas_thread():
        warnings.simplefilter("ignore", ConvergenceWarning)
        model.fit(x, y)
    return linear_head_from_logreg(model.coef_, model.intercept_, model.classes_, mean, std, n_classes)


def _probs(head: nn.Module, f: torch.Tensor) -> np.ndarray:
    head.eval()
    with torch.inference_mode():
        return softmax_with_temperature(head(f))


def _grid(cfg: TrainConfig) -> list[float]:
    return [float(cfg.logreg_c)] if cfg.logreg_c > 0 else list(C_GRID)


def _choose_c(emb: torch.Tensor, y: np.ndarray, splits: list[tuple[np.ndarray, np.ndarray]], n_classes: int,
              cfg: TrainConfig) -> tuple[float, list[float], dict[float, list[nn.Module]], np.ndarray, np.ndarray]:
    """Pooled out-of-fold balanced log loss of every C; returns (C, scores, fold heads per C, held idx, probs)."""
    grid = _grid(cfg)
    held = np.concatenate([va for _, va in splits])
    y_held = y[held]
    scores, heads, probs = [], {}, {}
    for c in grid:
        heads[c] = [fit_logreg(emb[tr], y[tr], n_classes, c, cfg.class_weighting) for tr, _ in splits]
        probs[c] = np.concatenate([_probs(h, emb[va]) for h, (_, va) in zip(heads[c], splits)])
        scores.append(balanced_log_loss(y_held, probs[c], cfg.class_weighting))
    best = int(np.argmin(np.round(scores, 10)))  # first (smallest C) of equal scores
    chosen = grid[best]
    return chosen, scores, heads, held, probs[chosen]


def _fit_logreg_selected(emb, y, labels, groups, fold: Fold, n_classes: int, cfg: TrainConfig,
                         seed: int) -> HeadFit:
    k = cfg.selection_folds
    if k == 0:
        splits = [(fold.inner_train, fold.inner_val)]
        method = "one inner split (val_fraction)"
    else:
        splits = inner_folds_of(fold.train, labels, groups, k, seed + INNER_SEED_OFFSET)
        method = f"inner grouped {len(splits)}-fold CV on the training groups"
    chosen, scores, heads, held, held_probs = _choose_c(emb, y, splits, n_classes, cfg)
    train = fold.train
    if cfg.ensemble >= 2:
        module: nn.Module = EnsembleHead(heads[chosen])
        final = f"ensemble of the {len(splits)} inner-fold models (probabilities averaged)"
    else:
        module = fit_logreg(emb[train], y[train], n_classes, chosen, cfg.class_weighting)
        final = "refitted on all training groups"
    selection = {
        "head": "logreg", "parameter": "C", "method": method if cfg.logreg_c <= 0 else f"fixed C ({method} "
        "only for held-out predictions)", "criterion": "pooled out-of-fold class-balanced log loss"
        if cfg.class_weighting else "pooled out-of-fold log loss", "grid": _grid(cfg),
        "scores": [round(s, 6) for s in scores], "chosen": chosen, "n_inner_folds": len(splits),
        "n_train_groups": len({groups[i] for i in train}), "final": final,
    }
    fit = FitResult(0, float(min(scores)), 0, [], selection)
    return HeadFit(module.eval(), fit, held, held_probs)


# --------------------------------------------------------------------------- torch heads / fine-tuning


def _mean_curve(curves: list[list[float]]) -> np.ndarray:
    """Mean held-out loss per epoch; a fold that stopped early keeps its last loss."""
    length = max(len(c) for c in curves)
    mat = np.array([list(c) + [c[-1]] * (length - len(c)) for c in curves], dtype=np.float64)
    return mat.mean(0)


def _fit_torch_head_selected(emb, y, labels, groups, fold: Fold, n_classes: int, cfg: TrainConfig,
                             seed: int) -> HeadFit:
    k = cfg.selection_folds
    if k == 0:  # the old rule: early stopping on one inner split, no refit
        tr, va = fold.inner_train, fold.inner_val
        head, fit = fit_head(emb[tr], y[tr], emb[va], y[va], n_classes, cfg, seed)
        fit.selection = {"head": cfg.head, "parameter": "epochs", "method": "early stopping on one inner split "
                         "(val_fraction)", "chosen": fit.best_epoch, "final": "the early-stopped model"}
        return HeadFit(head, fit, va, _probs(head, emb[va]) if len(va) else np.zeros((0, n_classes)))
    splits = inner_folds_of(fold.train, labels, groups, k, seed + INNER_SEED_OFFSET)
    curves, best_epochs = [], []
    for j, (tr, va) in enumerate(splits):
        _, f = fit_head(emb[tr], y[tr], emb[va], y[va], n_classes, cfg, seed + j)
        curves.append([h["val_loss"] for h in f.history])
        best_epochs.append(f.best_epoch)
    mean = _mean_curve(curves)
    chosen = int(np.argmin(mean)) + 1
    members = [fit_head(emb[tr], y[tr], emb[:0], y[:0], n_classes, cfg, seed + j, stop_at=chosen)[0]
               for j, (tr, _) in enumerate(splits)]
    held = np.concatenate([va for _, va in splits])
    held_probs = np.concatenate([_probs(m, emb[va]) for m, (_, va) in zip(members, splits)])
    if cfg.ensemble >= 2:
        module: nn.Module = EnsembleHead(members)
        final, epochs_run = f"ensemble of the {len(splits)} inner-fold models (probabilities averaged)", chosen
    else:
        module, refit = fit_head(emb[fold.train], y[fold.train], emb[:0], y[:0], n_classes, cfg, seed, stop_at=chosen)
        final, epochs_run = "refitted on all training groups", refit.epochs_run
    selection = {"head": cfg.head, "parameter": "epochs", "method": f"inner grouped {len(splits)}-fold CV on the "
                 "training groups", "criterion": "mean held-out class-weighted cross-entropy per epoch",
                 "chosen": chosen, "inner_best_epochs": best_epochs, "n_inner_folds": len(splits),
                 "n_train_groups": len({groups[i] for i in fold.train}), "final": final}
    fit = FitResult(chosen, float(mean[chosen - 1]), epochs_run, [], selection)
    return HeadFit(module.eval(), fit, held, held_probs)


def fit_cached_head(emb: torch.Tensor, y: np.ndarray, labels, groups, fold: Fold, n_classes: int,
                    cfg: TrainConfig, seed: int) -> HeadFit:
    """The head of the cached mode for one fold, its hyper-parameter chosen on ``fold``'s training groups only.

    Parameters
    ----------
    emb : tensor, shape (n, d)
        Embeddings of *every* record; only ``fold.train`` (or, with ``inner_folds=0``,
        ``fold.inner_train`` / ``fold.inner_val``) rows are read.
    y, labels, groups : per record
        Class index, label and group of every record.
    fold : Fold
        Its ``test`` records are never read.
    """
    if cfg.head not in ("logreg", "linear", "mlp"):
        raise FetalscanError(f"unknown head {cfg.head!r}")
    with single_thread():  # hundreds of tiny fits: thread wake-ups would cost more than the arithmetic
        if cfg.head == "logreg":
            return _fit_logreg_selected(emb, y, labels, groups, fold, n_classes, cfg, seed)
        return _fit_torch_head_selected(emb, y, labels, groups, fold, n_classes, cfg, seed)


def fit_finetuned(images: torch.Tensor, y: np.ndarray, labels, groups, fold: Fold, n_classes: int,
                  cfg: TrainConfig, device: torch.device, seed: int, fixed_epochs: bool = False) -> HeadFit:
    """A fine-tuned model for one fold: epoch count chosen by an inner grouped CV, then refitted.

    ``inner_folds=0`` (or ``fixed_epochs``) keeps the old rule: one inner split for early
    stopping (or all ``epochs``), no refit. Costs ``inner_folds + 1`` fine-tunings otherwise.
    """
    pre = get_backbone_spec(cfg.backbone).preprocessing

    def held_probs(model, idx):
        if not len(idx):
            return np.zeros((0, n_classes))
        return softmax_with_temperature(predict_logits(model, images[idx], pre, device, cfg.batch_size * 2, cfg.amp))

    if cfg.selection_folds == 0 or fixed_epochs:
        tr, va = fold.inner_train, fold.inner_val
        seed_everything(seed)
        model = new_model(cfg, n_classes)
        fit = fit_finetune(model, pre, images[tr], y[tr], images[va], y[va], n_classes, cfg, device, seed,
                           fixed_epochs=fixed_epochs)
        fit.selection = {"head": cfg.head, "parameter": "epochs", "method": "fixed epochs" if fixed_epochs else
                         "early stopping on one inner split (val_fraction)", "chosen": fit.best_epoch,
                         "final": "the early-stopped model"}
        return HeadFit(model, fit, va, held_probs(model, va))
    splits = inner_folds_of(fold.train, labels, groups, cfg.selection_folds, seed + INNER_SEED_OFFSET)
    curves, best_epochs, parts = [], [], []
    for j, (tr, va) in enumerate(splits):
        seed_everything(seed + j)
        model = new_model(cfg, n_classes)
        f = fit_finetune(model, pre, images[tr], y[tr], images[va], y[va], n_classes, cfg, device, seed + j)
        curves.append([h["val_loss"] for h in f.history])
        best_epochs.append(f.best_epoch)
        parts.append(held_probs(model, va))
        del model
    mean = _mean_curve(curves)
    chosen = int(np.argmin(mean)) + 1
    seed_everything(seed)
    model = new_model(cfg, n_classes)
    train = fold.train
    refit = fit_finetune(model, pre, images[train], y[train], images[:0], y[:0], n_classes, cfg, device, seed,
                         stop_at=chosen)
    selection = {"head": cfg.head, "parameter": "epochs", "method": f"inner grouped {len(splits)}-fold CV on the "
                 "training groups", "criterion": "mean held-out class-weighted cross-entropy per epoch",
                 "chosen": chosen, "inner_best_epochs": best_epochs, "n_inner_folds": len(splits),
                 "n_train_groups": len({groups[i] for i in train}), "final": "refitted on all training groups",
                 "held_out_predictions": "each inner fold's early-stopped model"}
    fit = FitResult(chosen, float(mean[chosen - 1]), refit.epochs_run, refit.history, selection)
    return HeadFit(model, fit, np.concatenate([va for _, va in splits]), np.concatenate(parts))


def linear_probe_config(cfg: TrainConfig) -> TrainConfig:
    """The linear-probe baseline's recipe for a run of ``cfg``: the same backbone and weights,
    frozen, with the default ``logreg`` head (C by inner grouped 5-fold CV), no ensemble."""
    return replace(cfg, mode="cached", head="logreg", logreg_c=0.0, inner_folds=5, ensemble=0, class_weighting=True)


def is_linear_probe(cfg: TrainConfig) -> bool:
    """Whether ``cfg`` trains exactly the linear-probe baseline (then the baseline is the model itself)."""
    base = linear_probe_config(cfg)
    return (cfg.mode, cfg.head, cfg.logreg_c, cfg.selection_folds, cfg.ensemble, cfg.class_weighting) == (
        base.mode, base.head, base.logreg_c, base.selection_folds, base.ensemble, base.class_weighting)
