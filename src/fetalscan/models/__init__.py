"""Backbones (timm + SonoNet-16), the model factory, heads and checkpoints."""

from fetalscan.data.transforms import Preprocessing
from fetalscan.models.registry import (
    BackboneSpec,
    build_head,
    classifier_attr,
    create_model,
    embedding_dim,
    get_backbone_spec,
    get_head,
    get_module,
    list_backbones,
    load_imagenet_backbone,
    register_backbone,
    set_head,
)

__all__ = [
    "BackboneSpec",
    "Preprocessing",
    "build_head",
    "classifier_attr",
    "create_model",
    "embedding_dim",
    "get_backbone_spec",
    "get_head",
    "get_module",
    "list_backbones",
    "load_imagenet_backbone",
    "register_backbone",
    "set_head",
]
