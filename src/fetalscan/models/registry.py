"""Backbone registry and the one model factory of fetalscan.

A backbone is registered with :func:`register_backbone` beside a small
:class:`BackboneSpec` (input size, channels, normalisation, Grad-CAM layer, the
origin and licence of its pretrained weights). Every model is built through
:func:`create_model`, so fine-tuning, feature caching, Grad-CAM and checkpoints
all see the same interface (timm's ``forward_features`` / ``forward_head``).

Published references for the two anomaly backbones
---------------------------------------------------
- ResNet34 pretrained on ImageNet, leave-one-patient-out CV, patient-level vote:
  Lin M. et al., "Use of real-time artificial intelligence in detection of
  abnormal image patterns in standard sonographic reference planes in screening
  for fetal intracranial malformations", Ultrasound Obstet. Gynecol. 59(3), 2022
  (the four CNS anomalies study).
- DenseNet-169 for cystic hygroma in first-trimester scans: Walker M.C. et al.,
  "Using deep-learning in fetal ultrasound analysis for diagnosis of cystic
  hygroma in the first trimester", PLoS ONE 17(6): e0269323, 2022.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from torch import nn

from fetalscan.data.transforms import Preprocessing
from fetalscan.errors import ModelError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BackboneSpec:
    """What fetalscan needs to know about one backbone."""

    name: str
    build: Callable[[int, str | None, float], nn.Module]  # (num_classes, pretrained_kind, drop)
    preprocessing: Preprocessing
    cam_layer: str  # dotted module path inside the backbone, last spatial feature layer
    pretrained_sources: tuple[str, ...]  # which of imagenet / sononet apply
    weights_origin: dict[str, str] = field(default_factory=dict)  # source -> origin + licence
    description: str = ""


_REGISTRY: dict[str, BackboneSpec] = {}


def register_backbone(spec: BackboneSpec) -> BackboneSpec:
    """Add a backbone to the registry (names are unique)."""
    if spec.name in _REGISTRY:
        raise ValueError(f"backbone {spec.name!r} is registered twice")
    _REGISTRY[spec.name] = spec
    return spec


def list_backbones() -> list[str]:
    """Names of every registered backbone, sorted."""
    return sorted(_REGISTRY)


def get_backbone_spec(name: str) -> BackboneSpec:
    """Look up a backbone; unknown names raise :class:`ModelError` listing the valid ones."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ModelError(
            f"unknown backbone {name!r}; choose one of: {', '.join(list_backbones())}"
        ) from None


def _timm_builder(arch: str, imagenet_tag: str) -> Callable[[int, str | None, float], nn.Module]:
    def build(num_classes: int, pretrained: str | None, drop: float) -> nn.Module:
        import timm

        kwargs: dict = {"num_classes": num_classes, "drop_rate": drop}
        if pretrained == "imagenet":
            return load_imagenet_backbone(f"{arch}.{imagenet_tag}", **kwargs)
        return timm.create_model(arch, pretrained=False, **kwargs)

    return build


def load_imagenet_backbone(
    timm_name: str, weights_file: str | Path | None = None, **kwargs
) -> nn.Module:
    """Create a timm model with ImageNet weights through timm's own loading path.

    Without ``weights_file`` timm downloads the weights from the Hugging Face hub
    (or the URL in the model's pretrained config) into its cache, where later runs
    find them offline. ``weights_file`` (or the ``FETALSCAN_WEIGHTS_DIR`` folder
    holding ``<timm_name>.pth`` / ``.safetensors``) points the *same* loader at a
    local file via timm's ``pretrained_cfg_overlay``, which is how an offline site
    supplies weights and how the tests exercise this code without the network.
    A classifier of another size than the weights' is re-initialised by timm.
    """
    import timm

    if weights_file is None:
        weights_file = _find_local_weights(timm_name)
    overlay = None
    if weights_file is not None:
        weights_file = Path(weights_file)
        if not weights_file.is_file():
            raise ModelError(f"ImageNet weights file not found: {weights_file}")
        overlay = {"file": str(weights_file)}
    try:
        return timm.create_model(
            timm_name, pretrained=True, pretrained_cfg_overlay=overlay, **kwargs
        )
    except (OSError, RuntimeError, ValueError) as exc:
        where = str(weights_file) if weights_file else "the timm / Hugging Face cache or network"
        raise ModelError(
            f"could not load ImageNet weights for {timm_name!r} from {where}: {exc}. "
            "Offline? Put the weights file in $FETALSCAN_WEIGHTS_DIR as "
            f"{timm_name}.pth, or use pretrained='sononet', 'none' or a weights file."
        ) from exc


def _find_local_weights(timm_name: str) -> Path | None:
    folder = os.environ.get("FETALSCAN_WEIGHTS_DIR")
    if not folder:
        return None
    for ext in (".safetensors", ".pth", ".pt", ".bin"):
        cand = Path(folder) / f"{timm_name}{ext}"
        if cand.is_file():
            return cand
    return None


_IMAGENET_PRE = Preprocessing()


_LICENCE_TV = "torchvision ImageNet-1k weights via timm (BSD-3-Clause)"


register_backbone(
    BackboneSpec(
        name="resnet34",
        build=_timm_builder("resnet34", "tv_in1k"),
        preprocessing=_IMAGENET_PRE,
        cam_layer="layer4",
        pretrained_sources=("imagenet",),
        weights_origin={"imagenet": f"timm resnet34.tv_in1k, {_LICENCE_TV}"},
        description="ResNet34, the backbone of the published CNS-anomaly study",
    )
)


register_backbone(
    BackboneSpec(
        name="densenet169",
        build=_timm_builder("densenet169", "tv_in1k"),
        preprocessing=_IMAGENET_PRE,
        cam_layer="features.norm5",
        pretrained_sources=("imagenet",),
        weights_origin={"imagenet": f"timm densenet169.tv_in1k, {_LICENCE_TV}"},
        description="DenseNet-169, the backbone of the published cystic-hygroma study",
    )
)


register_backbone(
    BackboneSpec(
        name="efficientnet_b0",
        build=_timm_builder("efficientnet_b0", "ra_in1k"),
        preprocessing=_IMAGENET_PRE,
        cam_layer="bn2",
        pretrained_sources=("imagenet",),
        weights_origin={"imagenet": "timm efficientnet_b0.ra_in1k (Apache-2.0)"},
        description="EfficientNet-B0, small and fast",
    )
)


register_backbone(
    BackboneSpec(
        name="mobilenetv3_large_100",
        build=_timm_builder("mobilenetv3_large_100", "ra_in1k"),
        preprocessing=_IMAGENET_PRE,
        cam_layer="blocks",
        pretrained_sources=("imagenet",),
        weights_origin={"imagenet": "timm mobilenetv3_large_100.ra_in1k (Apache-2.0)"},
        description="MobileNetV3-Large, the fastest on a CPU",
    )
)


def _build_sononet16(num_classes: int, pretrained: str | None, drop: float) -> nn.Module:
    from fetalscan.models.sononet import sononet16

    return sononet16(num_classes=num_classes, pretrained=pretrained == "sononet", drop_rate=drop)


register_backbone(
    BackboneSpec(
        name="sononet16",
        build=_build_sononet16,
        preprocessing=Preprocessing(
            input_size=(224, 288),
            channels=1,
            normalization="per_image",
            mean=(0.0,),
            std=(1.0,),
            scale=255.0,
        ),
        cam_layer="adaption",
        pretrained_sources=("sononet",),
        weights_origin={
            "sononet": "SonoNet16 weights, Baumgartner et al. 2017, bundled "
            "(Apache-2.0, see fetalscan/models/weights/NOTICE)"
        },
        description="SonoNet-16, in-domain fetal standard-plane network (works offline)",
    )
)


def create_model(
    backbone: str,
    num_classes: int,
    pretrained: str = "none",
    drop_rate: float = 0.0,
) -> nn.Module:
    """Build a classifier: a registered backbone with a ``num_classes`` head.

    Parameters
    ----------
    backbone : str
        A name from :func:`list_backbones`.
    num_classes : int
        Outputs of the classification head.
    pretrained : str
        ``"imagenet"`` (timm download-and-cache, ImageNet backbones), ``"sononet"``
        (bundled in-domain weights, ``sononet16`` only), ``"none"``, or a path to a
        fetalscan checkpoint or a state-dict file whose backbone keys match.
    drop_rate : float
        Dropout before the head.
    """
    spec = get_backbone_spec(backbone)
    kind = pretrained.lower() if pretrained.lower() in ("imagenet", "sononet", "none") else "path"
    if kind in ("imagenet", "sononet") and kind not in spec.pretrained_sources:
        raise ModelError(
            f"pretrained={kind!r} is not available for {backbone!r}; "
            f"it supports: {', '.join(spec.pretrained_sources + ('none', 'PATH'))}"
        )
    model = spec.build(num_classes, None if kind in ("none", "path") else kind, drop_rate)
    if kind == "path":
        load_backbone_weights(model, Path(pretrained))
    return model


def load_backbone_weights(model: nn.Module, path: Path) -> None:
    """Initialise ``model`` from a file, keeping its own head when sizes differ.

    Accepts a fetalscan checkpoint (its ``state_dict``) or a plain state dict. Every
    backbone key of the model must be present with the same shape; head keys whose
    shape differs (another number of classes) are skipped.
    """
    from fetalscan.fileio import read_torch_file

    obj = read_torch_file(path, ModelError, "file of pretrained weights")
    state = obj.get("state_dict", obj) if isinstance(obj, dict) else None
    if not isinstance(state, dict):
        raise ModelError(f"pretrained weights {path} hold no state dict")
    own = model.state_dict()
    head = _head_prefixes(model)
    missing = [k for k in own if k not in state and not k.startswith(head)]
    if missing:
        raise ModelError(
            f"pretrained weights {path} do not match this architecture; "
            f"{len(missing)} backbone keys missing, e.g. {missing[:3]}"
        )
    usable = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    bad = [k for k in own if k in state and k not in usable and not k.startswith(head)]
    if bad:
        raise ModelError(f"pretrained weights {path} have wrong shapes for backbone keys {bad[:3]}")
    model.load_state_dict(usable, strict=False)
    log.info("initialised %d tensors from %s", len(usable), path)


def _head_prefixes(model: nn.Module) -> tuple[str, ...]:
    names = ("classifier", "fc", "head")
    return tuple(n + "." for n in names if hasattr(model, n))


def get_module(model: nn.Module, dotted: str) -> nn.Module:
    """Return the sub-module at ``dotted`` (e.g. ``"layer4"``), or raise :class:`ModelError`."""
    try:
        return model.get_submodule(dotted)
    except AttributeError:
        names = [n for n, _ in model.named_modules() if n and n.count(".") == 0]
        raise ModelError(
            f"layer {dotted!r} not found in {type(model).__name__}; top-level layers are: "
            f"{', '.join(names)}"
        ) from None


def embedding_dim(model: nn.Module) -> int:
    """Size of ``forward_head(..., pre_logits=True)``, the vector the head sees."""
    dim = getattr(model, "head_hidden_size", None) or getattr(model, "num_features", None)
    if not dim:
        raise ModelError(f"{type(model).__name__} does not expose num_features")
    return int(dim)


def classifier_attr(model: nn.Module) -> str:
    """Attribute name of the model's classification head (``fc``, ``classifier`` ...)."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    name = cfg.get("classifier", "classifier")
    if not hasattr(model, name):
        raise ModelError(f"{type(model).__name__} has no classifier attribute {name!r}")
    return name


def build_head(in_dim: int, num_classes: int, kind: str = "linear", hidden: int = 256,
               drop: float = 0.0) -> nn.Module:
    """A classification head on pooled features: ``linear`` or a one-hidden-layer ``mlp``."""
    if kind == "linear":
        return nn.Linear(in_dim, num_classes)
    if kind == "mlp":
        return nn.Sequential(
            nn.Linear(in_dim, hidden), nn.ReLU(inplace=True), nn.Dropout(drop),
            nn.Linear(hidden, num_classes),
        )
    raise ModelError(f"unknown head {kind!r}; choose 'linear' or 'mlp'")


def set_head(model: nn.Module, head: nn.Module) -> None:
    """Replace the model's classification head (used for the MLP head and feature caching)."""
    setattr(model, classifier_attr(model), head)


def get_head(model: nn.Module) -> nn.Module:
    """The model's classification head module."""
    return getattr(model, classifier_attr(model))
