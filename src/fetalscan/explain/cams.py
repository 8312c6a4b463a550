"""Grad-CAM family heatmaps on the original ultrasound image, panels and the report gallery.

A heatmap says which parts of the picture carried the evidence for one class in
one model. fetalscan computes it with the ``pytorch-grad-cam`` library on the
model's Grad-CAM layer (chosen per backbone from the registry), resizes it back
to the *original* image (the network input is a plain resize of the whole
picture, so a plain resize back is exact geometry), and overlays it in colour.
How far such maps can be trusted is measured in :mod:`fetalscan.explain.faithfulness`.

Methods
-------
``gradcam``
    Selvaraju R.R. et al., "Grad-CAM: Visual Explanations from Deep Networks via
    Gradient-based Localization", ICCV 2017. Channel weights = spatial mean of the
    class-score gradient; one forward and one (short) backward pass.
``gradcam++``
    Chattopadhay A. et al., "Grad-CAM++: Generalized Gradient-based Visual
    Explanations for Deep Convolutional Networks", WACV 2018. Higher-order
    gradient weights; same cost as Grad-CAM.
``scorecam``
    Wang H. et al., "Score-CAM: Score-Weighted Visual Explanations for
    Convolutional Neural Networks", CVPR Workshops 2020. Gradient-free: one extra
    forward pass per channel of the layer (64 for SonoNet-16, 512 for ResNet34),
    so it is one to two orders of magnitude slower.
``eigencam``
    Muhammad M.B., Yeasin M., "Eigen-CAM: Class Activation Map using Principal
    Components", IJCNN 2020. First principal component of the layer's
    activations: class-agnostic (the same map whatever the target class). The
    component's sign is arbitrary; fetalscan orients it to correlate positively
    with the summed activation (the library leaves it to its SVD routine, so a map
    can come out inverted).

How the computation stays safe for the caller's model (after MONAI's
``visualize/class_activation_maps.py``): every module's train/eval flag, every
parameter's ``requires_grad`` and ``.grad`` are restored afterwards, and the
library's hooks are released by its context manager even when an error is
raised. During the call the graph is cut at the target layer (its output is
re-made a leaf), so the backward pass runs only through the layers *after* it:
the gradient w.r.t. the layer's activations is unchanged, the cost is about one
forward pass, and a frozen (cached-mode) backbone needs no gradient at all.
"""

from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from fetalscan.errors import DataError, FetalscanError, ModelError
from fetalscan.runtime import single_thread
from fetalscan.texts import HEATMAP_DISCLAIMER as DISCLAIMER

log = logging.getLogger(__name__)


#: Method key -> display name.
METHODS: dict[str, str] = {
    "gradcam": "Grad-CAM",
    "gradcam++": "Grad-CAM++",
    "scorecam": "Score-CAM",
    "eigencam": "Eigen-CAM",
}




@dataclass
class ExplainConfig:
    """How heatmaps and overlays are made; the CLI maps its flags 1:1 onto these fields.

    Attributes
    ----------
    method : str
        One of :data:`METHODS` (``gradcam``, ``gradcam++``, ``scorecam``, ``eigencam``).
    layer : str or None
        Dotted module path of the target layer; ``None`` = the backbone's registered
        Grad-CAM layer (e.g. ``layer4`` for ResNet34, ``adaption`` for SonoNet-16).
    target : str or None
        Class whose evidence is shown; ``None`` = each image's predicted class.
    batch_size : int
        Images per forward/backward pass.
    alpha : float
        Opacity of the heatmap colour at its hottest point (0 = invisible, 1 = opaque).
    colormap : str
        A matplotlib colour map name (``jet``, ``turbo``, ``inferno`` ...).
    score_batch : int
        Masked images per forward pass inside Score-CAM.
    """

    method: str = "gradcam"
    layer: str | None = None
    target: str | None = None
    batch_size: int = 16
    alpha: float = 0.5
    colormap: str = "jet"
    score_batch: int = 32

    def validate(self) -> None:
        self.method = method_key(self.method)
        if not 0.0 <= self.alpha <= 1.0:
            raise FetalscanError(f"--alpha must be between 0 and 1, got {self.alpha}")
        if self.batch_size < 1 or self.score_batch < 1:
            raise FetalscanError("--batch-size and --score-batch must be >= 1")
        _colormap(self.colormap)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class CamResult:
    """Raw output of :func:`compute_cams` for one batch.

    ``maps``: float32 (B, h, w) in [0, 1] at the network input size (min-max
    normalised per image; all zeros when the method found no positive evidence);
    ``logits``: float32 (B, K) of the same forward pass; ``targets``: (B,) class
    indices the maps explain; ``feature_size``: (fh, fw) of the target layer.
    """

    maps: np.ndarray
    logits: torch.Tensor
    targets: np.ndarray
    feature_size: tuple[int, int]


@dataclass
class Explanation:
    """One image's heatmap at its original size, with what the model said about it."""

    heatmap: np.ndarray  # float32 (H, W) in [0, 1], the original image size
    method: str
    layer: str
    target: str
    pred: str
    probs: dict[str, float] = field(default_factory=dict)

    @property
    def p_target(self) -> float:
        return self.probs[self.target]

    @property
    def p_pred(self) -> float:
        return self.probs[self.pred]

    def peak(self) -> tuple[int, int]:
        """``(x, y)`` pixel of the heatmap maximum in the original image."""
        y, x = np.unravel_index(int(np.argmax(self.heatmap)), self.heatmap.shape)
        return int(x), int(y)


def method_key(name: str) -> str:
    """Normalise a method name (``Grad-CAM++`` -> ``gradcam++``); unknown ones raise."""
    key = re.sub(r"[\s_\-]", "", str(name).lower()).replace("plusplus", "++").replace("pp", "++")
    if key not in METHODS:
        raise FetalscanError(f"--method {name!r} is not supported; choose one of: {', '.join(METHODS)}")
    return key


def parse_methods(spec: str | Sequence[str]) -> list[str]:
    """``"gradcam,eigencam"`` or ``"all"`` -> method keys, in order, without repeats."""
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    items = [s.strip() for s in items if s and s.strip()]
    if items == ["all"]:
        return list(METHODS)
    if not items:
        raise FetalscanError(f"--methods: no method given; choose from {', '.join(METHODS)} or 'all'")
    return list(dict.fromkeys(method_key(s) for s in items))


def default_layer(backbone: str | None) -> str:
    """The registered Grad-CAM layer of a backbone, or :class:`ModelError` saying what to do."""
    from fetalscan.models.registry import get_backbone_spec, list_backbones

    if not backbone:
        raise ModelError("cannot choose a Grad-CAM layer automatically: the model does not say "
                         "which backbone it is; pass --layer with a dotted module name")
    if backbone not in list_backbones():
        raise ModelError(f"cannot choose a Grad-CAM layer automatically for the unregistered "
                         f"backbone {backbone!r}; pass --layer with a dotted module name "
                         f"(registered: {', '.join(list_backbones())})")
    return get_backbone_spec(backbone).cam_layer


def layer_for(loaded, layer: str | None = None) -> str:
    """The target layer name for a :class:`~fetalscan.checkpoint.LoadedModel` (checked to exist)."""
    from fetalscan.models.registry import get_module

    name = layer or default_layer((loaded.architecture or {}).get("backbone"))
    get_module(loaded.model, name)  # a wrong name raises ModelError listing the layers
    return name


def class_index(classes: Sequence[str], target: str | None) -> int | None:
    """Index of ``target`` in ``classes`` (``None`` stays ``None`` = predicted class)."""
    if target is None or target == "":
        return None
    if target not in classes:
        raise FetalscanError(f"--target {target!r} is not a class of the model; its classes are: "
                             f"{', '.join(classes)}")
    return list(classes).index(target)


def _colormap(name: str):
    import matplotlib

    try:
        return matplotlib.colormaps[name]
    except KeyError:
        raise FetalscanError(f"--colormap {name!r} is not a matplotlib colour map "
                             "(try jet, turbo, inferno, viridis)") from None


def _cam_class(method: str):
    """The pytorch-grad-cam class of a method (two are thin subclasses, built on first use)."""
    from pytorch_grad_cam import GradCAM, GradCAMPlusPlus

    key = method_key(method)
    if key in ("gradcam", "gradcam++"):
        return {"gradcam": GradCAM, "gradcam++": GradCAMPlusPlus}[key]
    if key not in _CUSTOM:
        _CUSTOM.update(_custom_classes())
    return _CUSTOM[key]


_CUSTOM: dict[str, type] = {}


def _custom_classes() -> dict[str, type]:
    from pytorch_grad_cam import EigenCAM, ScoreCAM

    class QuietScoreCAM(ScoreCAM):
        """Score-CAM (Wang et al., 2020) without the library's progress bar on stderr.

        Same maths as ``pytorch_grad_cam.ScoreCAM.get_cam_weights``: each activation
        channel, upsampled and min-max scaled, masks the input; the softmax over
        channels of the target scores of the masked inputs are the channel weights.
        """

        def get_cam_weights(self, input_tensor, target_layer, targets, activations, grads):
            with torch.no_grad():
                act = torch.from_numpy(activations).to(self.device)
                up = torch.nn.functional.interpolate(act, size=input_tensor.shape[-2:], mode="bilinear",
                                                     align_corners=True)
                flat = up.flatten(2)
                lo, hi = flat.min(-1)[0][..., None, None], flat.max(-1)[0][..., None, None]
                up = (up - lo) / (hi - lo + 1e-8)
                step = int(getattr(self, "batch_size", 32))
                weights = []
                for target, x, masks in zip(targets, input_tensor, up):
                    scores = []
                    for i in range(0, masks.shape[0], step):
                        batch = x[None] * masks[i:i + step, None]
                        scores.append(target(self.model(batch)).float().cpu().reshape(-1))
                    weights.append(torch.softmax(torch.cat(scores), dim=0))
                return torch.stack(weights).numpy()

    class OrientedEigenCAM(EigenCAM):
        """Eigen-CAM (Muhammad & Yeasin, 2020): projection of the layer's activations on
        their first principal component, computed for the whole batch with one economy SVD.

        The sign of a principal component is arbitrary (the library keeps whatever its
        SVD returns, so a map can come out inverted and then be zeroed by the ReLU that
        follows). Here it is oriented to correlate positively with the summed activation,
        so that the map is high where the layer's features are strong.
        """

        def get_cam_image(self, input_tensor, target_layer, targets, activations, grads, eigen_smooth):
            return eigen_projection(activations)

    return {"scorecam": QuietScoreCAM, "eigencam": OrientedEigenCAM}


def eigen_projection(activations: np.ndarray) -> np.ndarray:
    """First-principal-component projection of (B, C, h, w) activations -> (B, h, w), sign-oriented.

    The component is the top eigenvector of the smaller Gram matrix (channels x
    channels or pixels x pixels), one batched ``eigh`` in torch: the same
    projection as the library's ``get_2d_projection`` (an SVD per image) up to its
    arbitrary sign, without its cost (NumPy's SVD took seconds per batch on a busy
    2-core CPU).
    """
    with single_thread():  # a tiny problem: do not wait for OpenMP workers still busy after the forward
        return _eigen_projection(torch.nan_to_num(torch.as_tensor(np.asarray(activations), dtype=torch.float64)))


def _eigen_projection(a: torch.Tensor) -> np.ndarray:
    b, c, h, w = a.shape
    x = a.reshape(b, c, h * w).transpose(1, 2)  # (B, pixels, channels)
    x = x - x.mean(dim=1, keepdim=True)
    if c <= h * w:
        v = torch.linalg.eigh(x.transpose(1, 2) @ x)[1][..., -1]  # (B, channels)
        proj = (x @ v[..., None])[..., 0]
    else:
        gram = x @ x.transpose(1, 2)  # (B, pixels, pixels)
        u = torch.linalg.eigh(gram)[1][..., -1:]
        norm = (x.transpose(1, 2) @ u).norm(dim=1, keepdim=True).clamp_min(1e-12)
        proj = (gram @ u / norm)[..., 0]
    energy = a.sum(dim=1).reshape(b, -1)
    corr = ((proj - proj.mean(1, keepdim=True)) * (energy - energy.mean(1, keepdim=True))).sum(1)
    proj = proj * torch.where(corr < 0, -1.0, 1.0).to(proj.dtype)[:, None]
    return proj.reshape(b, h, w).float().numpy()


@contextlib.contextmanager
def preserved_model_state(model: nn.Module) -> Iterator[None]:
    """Restore every module's train/eval flag and every parameter's ``requires_grad`` and ``.grad``."""
    modes = [(m, m.training) for m in model.modules()]
    params = [(p, p.requires_grad, p.grad) for p in model.parameters()]
    try:
        yield
    finally:
        for p, flag, grad in params:
            p.requires_grad_(flag)
            p.grad = grad
        for m, mode in modes:
            m.training = mode


def _cut_graph_hook(layer_name: str, shapes: list):
    """Forward hook: re-make the layer's output a leaf that requires grad (see module notes)."""

    def hook(module: nn.Module, args, output):
        if not isinstance(output, torch.Tensor) or output.ndim != 4:
            shape = tuple(output.shape) if isinstance(output, torch.Tensor) else type(output).__name__
            raise ModelError(
                f"layer {layer_name!r} gives an output of shape {shape}; CAM methods need a spatial "
                "feature map (batch, channels, height, width); choose a convolutional layer"
            )
        shapes.append(tuple(output.shape[-2:]))
        return output.detach().requires_grad_(True).clone()

    return hook


def compute_cams(
    model: nn.Module,
    inputs: torch.Tensor,
    layer: str,
    method: str = "gradcam",
    targets: Sequence[int] | int | None = None,
    score_batch: int = 32,
) -> CamResult:
    """Heatmaps of a normalised batch at the network input size (the raw step, no overlay).

    Parameters
    ----------
    model : nn.Module
        Any classifier whose ``layer`` gives a (B, C, h', w') map; it is left exactly
        as it was (train/eval flags, ``requires_grad``, ``.grad``, no hooks).
    inputs : Tensor, shape (B, C, h, w)
        Network input (after :func:`fetalscan.transforms.normalize`), on the model's device.
    layer : str
        Dotted module path, e.g. ``"layer4"``; a wrong name raises :class:`ModelError`
        listing the model's top-level layers.
    method : str
        ``gradcam`` | ``gradcam++`` | ``scorecam`` | ``eigencam``.
    targets : int, sequence of int, or None
        Class index per image (an int applies to all); ``None`` = predicted class.

    Returns
    -------
    CamResult
        ``maps`` (B, h, w) float32 in [0, 1], the logits of the same forward pass,
        the target indices and the layer's spatial size.

    References
    ----------
    Selvaraju et al., ICCV 2017; Chattopadhay et al., WACV 2018; Wang et al., CVPRW
    2020; Muhammad & Yeasin, IJCNN 2020 (see the module docstring).
    """
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    from fetalscan.models.registry import get_module

    module = get_module(model, layer)
    cam_cls = _cam_class(method)
    n = int(inputs.shape[0])
    if isinstance(targets, (int, np.integer)):
        targets = [int(targets)] * n
    wanted = None if targets is None else [ClassifierOutputTarget(int(t)) for t in targets]
    if wanted is not None and len(wanted) != n:
        raise FetalscanError(f"compute_cams: {len(wanted)} targets for a batch of {n} images")
    shapes: list = []
    result = None
    with preserved_model_state(model):
        for p in model.parameters():
            p.requires_grad_(False)  # only the cut layer output needs a gradient
        handle = module.register_forward_hook(_cut_graph_hook(layer, shapes), prepend=True)
        try:
            with torch.inference_mode(False), torch.enable_grad():
                x = inputs.detach().clone()
                with cam_cls(model=model, target_layers=[module]) as cam:
                    if method_key(method) == "scorecam":
                        cam.batch_size = score_batch
                    try:
                        maps = cam(input_tensor=x, targets=wanted)
                    except IndexError as exc:  # the library's __exit__ would swallow it
                        raise ModelError(f"CAM target out of range for this model: {exc}") from exc
                    logits = cam.outputs.detach().float().cpu()
                    result = (maps, logits)
        finally:
            handle.remove()
    if result is None:  # pragma: no cover - defensive: the library swallowed an error
        raise ModelError(f"{METHODS[method_key(method)]} failed on layer {layer!r}")
    maps, logits = result
    if targets is None:
        chosen = logits.argmax(1).numpy()
    else:
        chosen = np.asarray(list(targets), dtype=np.int64)
        if chosen.min() < 0 or chosen.max() >= logits.shape[1]:
            raise ModelError(f"CAM target out of range: the model has {logits.shape[1]} classes")
    maps = np.nan_to_num(np.asarray(maps, dtype=np.float32), nan=0.0)
    return CamResult(maps, logits, chosen.astype(np.int64), shapes[0] if shapes else (0, 0))


def resize_heatmap(heatmap: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of a (h, w) map to ``size`` = (H, W), clipped to [0, 1]."""
    import cv2

    heatmap = np.asarray(heatmap, dtype=np.float32)
    h, w = int(size[0]), int(size[1])
    if heatmap.shape == (h, w):
        return np.clip(heatmap, 0.0, 1.0)
    out = cv2.resize(heatmap, (w, h), interpolation=cv2.INTER_LINEAR)
    return np.clip(out, 0.0, 1.0)


def overlay(image: np.ndarray, heatmap: np.ndarray, alpha: float = 0.5, colormap: str = "jet") -> np.ndarray:
    """Colour the heatmap over the image; RGB uint8 of the image's size.

    The colour's opacity grows with the heatmap value (``alpha`` at the maximum,
    0 where the map is 0), so the ultrasound stays visible where the model found
    no evidence. A map of another size is resized to the image first.
    """
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise DataError(f"overlay expects an RGB uint8 (H, W, 3) image, got {image.dtype} {image.shape}")
    heat = resize_heatmap(heatmap, image.shape[:2])
    colour = _colormap(colormap)(heat)[..., :3]
    weight = (alpha * np.sqrt(heat))[..., None]
    out = image.astype(np.float32) / 255.0 * (1.0 - weight) + colour * weight
    return np.clip(out * 255.0 + 0.5, 0, 255).astype(np.uint8)


def png_bytes(array: np.ndarray) -> bytes:
    """PNG encoding of a uint8 (H, W) or (H, W, 3) array."""
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG", optimize=False)
    return buf.getvalue()


def panel_figure(image: np.ndarray, over: np.ndarray, title: str, subtitle: str = "",
                 colormap: str = "jet"):
    """Side-by-side figure: the original image and the overlay, with a colour bar."""
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize
    from matplotlib.figure import Figure

    h, w = image.shape[:2]
    side = 4.2
    fig = Figure(figsize=(2 * side + 0.9, side * h / w + 1.0), dpi=100, layout="constrained")
    axes = fig.subplots(1, 3, gridspec_kw={"width_ratios": [1, 1, 0.05]})
    for ax, img, name in zip(axes, (image, over), ("original", "heatmap overlay")):
        ax.imshow(img)
        ax.set_title(name, fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    bar = fig.colorbar(ScalarMappable(Normalize(0, 1), _colormap(colormap)), cax=axes[2])
    bar.set_label("relative evidence (0-1 per image)", fontsize=8)
    bar.ax.tick_params(labelsize=7)
    fig.suptitle(title + ("\n" + subtitle if subtitle else ""), fontsize=9)
    fig.supxlabel(DISCLAIMER, fontsize=7, color="0.35")
    return fig


def describe(exp: Explanation, label: str | None = None) -> str:
    """One-line caption: label, prediction, the class the map explains, method."""
    parts = []
    if label:
        parts.append(f"label: {label}")
    parts.append(f"predicted: {exp.pred} (p={exp.p_pred:.2f})")
    if exp.target != exp.pred:
        parts.append(f"map for: {exp.target} (p={exp.p_target:.2f})")
    parts.append(f"{METHODS[exp.method]} on {exp.layer}")
    return " | ".join(parts)


def explain_arrays(loaded, images: Sequence[np.ndarray], cfg: ExplainConfig | None = None,
                   device: torch.device | str = "cpu", layer: str | None = None) -> list[Explanation]:
    """Heatmaps (at each image's own size) for RGB uint8 images under a loaded checkpoint.

    Parameters
    ----------
    loaded : LoadedModel
        From :func:`fetalscan.checkpoint.load_checkpoint` (or built for a fold model).
    images : sequence of ndarray
        RGB uint8 (H, W, 3), any sizes.
    cfg : ExplainConfig
        Method, layer, target class, batch size.
    """
    from fetalscan.data.transforms import normalize, prepare
    from fetalscan.inference.predict import softmax_with_temperature

    cfg = cfg or ExplainConfig()
    cfg.validate()
    device = torch.device(device)
    layer = layer or layer_for(loaded, cfg.layer)
    target = class_index(loaded.classes, cfg.target)
    pre = loaded.preprocessing
    out: list[Explanation] = []
    for start in range(0, len(images), cfg.batch_size):
        chunk = images[start:start + cfg.batch_size]
        try:
            x = torch.stack([prepare(img, pre) for img in chunk]).to(device)
        except ValueError as exc:
            raise DataError(f"cannot explain image: {exc}") from exc
        res = compute_cams(loaded.model, normalize(x, pre), layer, cfg.method, target, cfg.score_batch)
        probs = softmax_with_temperature(res.logits, loaded.temperature)
        for img, m, p, t in zip(chunk, res.maps, probs, res.targets):
            out.append(Explanation(
                heatmap=resize_heatmap(m, img.shape[:2]), method=cfg.method, layer=layer,
                target=loaded.classes[int(t)], pred=loaded.classes[int(np.argmax(p))],
                probs={c: float(v) for c, v in zip(loaded.classes, p)},
            ))
    return out


def iter_explanations(loaded, records: Sequence, cfg: ExplainConfig, device: torch.device | str = "cpu",
                      ) -> Iterator[tuple[object, np.ndarray, Explanation]]:
    """Yield ``(record, RGB image, Explanation)`` for records, reading each file once, batched."""
    from fetalscan.data.records import iter_record_images

    layer = layer_for(loaded, cfg.layer)
    batch: list[tuple[object, np.ndarray]] = []
    for i, image in iter_record_images(records):
        batch.append((records[i], image))
        if len(batch) == cfg.batch_size:
            yield from _explain_batch(loaded, batch, cfg, device, layer)
            batch = []
    if batch:
        yield from _explain_batch(loaded, batch, cfg, device, layer)


def _explain_batch(loaded, batch, cfg, device, layer):
    exps = explain_arrays(loaded, [img for _, img in batch], cfg, device, layer)
    for (rec, img), exp in zip(batch, exps):
        yield rec, img, exp


def safe_stem(name: str) -> str:
    """A file-name-safe stem for an image id (``a/b c.jpg#3`` -> ``a__b_c_f3``)."""
    name = str(name)
    frame = ""
    if "#" in name:
        name, frame = name.rsplit("#", 1)
        frame = f"_f{frame}"
    stem = Path(name).with_suffix("").as_posix().strip("/")
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", stem.replace("/", "__")).strip("._") or "image"
    return stem[-120:] + frame


def write_image_outputs(out: Path, stem: str, image: np.ndarray, exp: Explanation, cfg: ExplainConfig,
                        title: str, subtitle: str) -> dict[str, Path]:
    """Write ``<stem>_<method>_overlay.png`` / ``_panel.png`` / ``_heatmap.png``; returns their paths."""
    from fetalscan.figures import save_figure
    from fetalscan.fileio import write_bytes

    tag = exp.method.replace("+", "p")
    over = overlay(image, exp.heatmap, cfg.alpha, cfg.colormap)
    paths = {
        "overlay": write_bytes(out / f"{stem}_{tag}_overlay.png", png_bytes(over)),
        "heatmap": write_bytes(out / f"{stem}_{tag}_heatmap.png",
                               png_bytes(np.round(exp.heatmap * 255).astype(np.uint8))),
    }
    fig = panel_figure(image, over, title, subtitle, cfg.colormap)
    paths["panel"] = save_figure(fig, out / f"{stem}_{tag}_panel.png", dpi=100)
    return paths


def image_records(paths: Sequence[str | Path], loaded, every_nth: int = 1) -> tuple[list, set[str]]:
    """Records of images, folders, manifests, DICOM or video files, labels mapped into the model's classes.

    Returns ``(records, unknown)``: ``unknown`` holds the labels that are not
    classes of ``loaded`` (through its ``class_map``); those records keep their
    label only in ``label_original`` and are explained without one.
    """
    from fetalscan.data.records import Dataset, load_dataset
    from fetalscan.inference.predict import labels_for_model

    records = []
    for path in paths:
        records.extend(load_dataset(Path(path), require_labels=False, every_nth=every_nth).records)
    dataset, unknown = labels_for_model(Dataset(records, list(loaded.classes), "images"), loaded.classes,
                                        loaded.class_map)
    return dataset.records, unknown


def explain_to_folder(loaded, records: Sequence, cfg: ExplainConfig, out: Path,
                      device: torch.device | str = "cpu"):
    """Overlays, heatmaps and panels for every record in ``out``; returns the index table.

    Writes, per image, ``<name>_<method>_overlay.png`` (original size),
    ``_heatmap.png`` (the map as 8-bit grey, original size) and ``_panel.png``
    (original beside overlay), and ``explanations.csv`` with one row per image.
    """
    import pandas as pd

    from fetalscan.fileio import write_csv
    from fetalscan.progress import track

    cfg.validate()
    rows = []
    used: set[str] = set()
    for rec, image, exp in track(iter_explanations(loaded, records, cfg, device), "explaining",
                                 total=len(records)):
        stem = safe_stem(getattr(rec, "image_id", str(rec)))
        base, k = stem, 2
        while stem in used:
            stem, k = f"{base}_{k}", k + 1
        used.add(stem)
        label = getattr(rec, "label", None)
        paths = write_image_outputs(out, stem, image, exp, cfg, Path(str(rec.path)).name, describe(exp, label))
        x, y = exp.peak()
        rows.append({
            "path": str(rec.path), "frame": getattr(rec, "frame", None), "label": label or "",
            "pred": exp.pred, "p_pred": exp.p_pred, "target": exp.target, "p_target": exp.p_target,
            "method": exp.method, "layer": exp.layer, "width": image.shape[1], "height": image.shape[0],
            "peak_x": x, "peak_y": y,
            **{k: v.name for k, v in paths.items()},
        })
    df = pd.DataFrame(rows)
    if len(df):
        df["frame"] = df["frame"].astype("Int64")
    write_csv(out / "explanations.csv", df)
    return df
