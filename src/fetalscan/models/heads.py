"""Classification heads and the one factory that builds a classifier from its architecture block.

A cached-feature model is a frozen backbone whose head standardises the pooled embedding
(:class:`FeatureScaler`) before a linear or MLP layer; a fine-tuned model keeps the
backbone's own classifier (or an MLP head).

Head kinds of the cached mode: ``logreg`` (a multinomial L2 logistic regression fitted by
scikit-learn, stored as the same ``FeatureScaler`` + ``Linear`` module, see
:func:`linear_head_from_logreg`), ``linear`` and ``mlp`` (trained with torch). An
``ensemble`` of k heads (:class:`EnsembleHead`) averages the members' probabilities.
"""

from __future__ import annotations

import logging
import math

import numpy as np
import torch
from torch import nn

from fetalscan.models.registry import build_head, create_model, embedding_dim, set_head

log = logging.getLogger(__name__)


class FeatureScaler(nn.Module):
    """Standardise pooled embeddings with the inner-training mean and std (buffers)."""

    def __init__(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("mean", mean.clone().float())
        self.register_buffer("std", std.clone().float().clamp_min(1e-6))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


#: Head kinds of the cached mode; ``logreg`` is stored as a linear layer.
HEAD_KINDS = ("logreg", "linear", "mlp")


#: Logit given to a class that a logistic regression never saw in training (probability ~ 0).
ABSENT_CLASS_LOGIT = -30.0


def _layer_kind(kind: str) -> str:
    return "linear" if kind == "logreg" else kind


def cached_head(in_dim: int, num_classes: int, kind: str, hidden: int, drop: float) -> nn.Sequential:
    """The head of a feature-caching model: ``FeatureScaler`` then linear / MLP."""
    return nn.Sequential(
        FeatureScaler(torch.zeros(in_dim), torch.ones(in_dim)),
        nn.Dropout(drop),
        build_head(in_dim, num_classes, _layer_kind(kind), hidden, drop),
    )


def linear_head_from_logreg(coef: np.ndarray, intercept: np.ndarray, classes_seen: np.ndarray,
                            mean: torch.Tensor, std: torch.Tensor, num_classes: int) -> nn.Sequential:
    """A fitted scikit-learn ``LogisticRegression`` on standardised features as a cached head.

    ``softmax(head(x))`` equals ``predict_proba(((x - mean) / std))`` of the fitted model.

    Parameters
    ----------
    coef, intercept : arrays
        ``coef_`` ``(K', d)`` and ``intercept_`` ``(K',)`` of the fitted model; in the
        binary case ``coef_`` is ``(1, d)`` and the logits are ``[-(w.x + b) / 2, (w.x + b) / 2]``
        (the same softmax as ``[0, w.x + b]``, but each class's logit depends on the input, so a
        Grad-CAM of either class has a gradient).
    classes_seen : int array
        ``classes_`` of the fitted model (indices into the ``num_classes`` outputs).
        A class it never saw gets weight 0 and logit :data:`ABSENT_CLASS_LOGIT`.
    mean, std : tensors, shape (d,)
        The standardisation the model was fitted after (kept in :class:`FeatureScaler`).
    """
    coef = np.asarray(coef, dtype=np.float64)
    intercept = np.asarray(intercept, dtype=np.float64).reshape(-1)
    seen = np.asarray(classes_seen, dtype=np.int64)
    d = coef.shape[1]
    if len(seen) == 2 and coef.shape[0] == 1:
        coef = np.vstack([-coef[0] / 2, coef[0] / 2])
        intercept = np.array([-intercept[0] / 2, intercept[0] / 2])
    if coef.shape[0] != len(seen):
        raise ValueError(f"coef_ has {coef.shape[0]} rows for {len(seen)} classes")
    w = np.zeros((num_classes, d))
    b = np.full(num_classes, ABSENT_CLASS_LOGIT)
    w[seen], b[seen] = coef, intercept
    head = cached_head(d, num_classes, "logreg", 0, 0.0)
    head[0].mean.copy_(mean)
    head[0].std.copy_(std.clamp_min(1e-6))
    with torch.no_grad():
        head[2].weight.copy_(torch.as_tensor(w, dtype=torch.float32))
        head[2].bias.copy_(torch.as_tensor(b, dtype=torch.float32))
    return head.eval()


class EnsembleHead(nn.Module):
    """k heads whose probabilities are averaged: returns ``log(mean_k softmax(head_k(x)))``.

    The output are logits in the sense that ``softmax`` of them is exactly the mean of
    the members' probabilities (the log of a probability vector is its own log-softmax),
    so prediction, temperature scaling, Grad-CAM and checkpoints treat an ensemble like
    any other head.
    """

    def __init__(self, members: list[nn.Module]) -> None:
        super().__init__()
        if not members:
            raise ValueError("an ensemble needs at least one member")
        self.members = nn.ModuleList(members)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logp = torch.stack([torch.log_softmax(m(x).float(), dim=-1) for m in self.members])
        return torch.logsumexp(logp, dim=0) - math.log(len(self.members))


def build_classifier(backbone: str, num_classes: int, *, mode: str = "cached", head: str = "linear",
                     head_hidden: int = 256, drop_rate: float = 0.0, pretrained: str | None = "none",
                     ensemble: int = 0) -> nn.Module:
    """A fresh classifier: backbone + (cached-feature head | the backbone's head | MLP head).

    The arguments are the fields of a checkpoint's ``architecture`` block (plus the
    initial weights), so a checkpoint is rebuilt by exactly the code that built it.
    ``ensemble`` >= 2 (cached mode) makes the head an :class:`EnsembleHead` of that many
    cached heads; 0 or 1 is a single head.
    """
    model = create_model(backbone, num_classes, pretrained, drop_rate)
    if mode == "cached":
        dim = embedding_dim(model)
        if int(ensemble) >= 2:
            set_head(model, EnsembleHead([cached_head(dim, num_classes, head, head_hidden, drop_rate)
                                          for _ in range(int(ensemble))]))
        else:
            set_head(model, cached_head(dim, num_classes, head, head_hidden, drop_rate))
    elif head == "mlp":
        set_head(model, build_head(embedding_dim(model), num_classes, "mlp", head_hidden, drop_rate))
    return model
