"""Classification heads and the one factory that builds a classifier from its architecture block.

A cached-feature model is a frozen backbone whose head standardises the pooled embedding
(:class:`FeatureScaler`) before a linear or MLP layer; a fine-tuned model keeps the
backbone's own classifier (or an MLP head).
"""

from __future__ import annotations

import logging

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


def cached_head(in_dim: int, num_classes: int, kind: str, hidden: int, drop: float) -> nn.Sequential:
    """The head of a feature-caching model: ``FeatureScaler`` then linear / MLP."""
    return nn.Sequential(
        FeatureScaler(torch.zeros(in_dim), torch.ones(in_dim)),
        nn.Dropout(drop),
        build_head(in_dim, num_classes, kind, hidden, drop),
    )


def build_classifier(backbone: str, num_classes: int, *, mode: str = "cached", head: str = "linear",
                     head_hidden: int = 256, drop_rate: float = 0.0, pretrained: str | None = "none") -> nn.Module:
    """A fresh classifier: backbone + (cached-feature head | the backbone's head | MLP head).

    The arguments are the fields of a checkpoint's ``architecture`` block (plus the
    initial weights), so a checkpoint is rebuilt by exactly the code that built it.
    """
    model = create_model(backbone, num_classes, pretrained, drop_rate)
    if mode == "cached":
        set_head(model, cached_head(embedding_dim(model), num_classes, head, head_hidden, drop_rate))
    elif head == "mlp":
        set_head(model, build_head(embedding_dim(model), num_classes, "mlp", head_hidden, drop_rate))
    return model
