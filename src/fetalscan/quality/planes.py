"""Standard-plane quality gate: which of the 13 fetal standard planes (or background) an image shows.

An anomaly read of the fetal brain is only meaningful on a brain plane; a head
measurement only on a head plane. This module runs the published SonoNet-16
plane classifier (Baumgartner et al. 2017) with its bundled weights — the same
architecture and weights as the core pipeline (:mod:`fetalscan.models.sononet`) —
and returns, per image, the plane, its confidence (softmax probability) and all
14 probabilities.

Preprocessing (as the original SonoNet code)
--------------------------------------------
1. **Crop of the scanner frame.** SonoNet was trained on the image area of the
   ultrasound sector, without the scanner's header, side panels and text. The
   crop depends on the scanner's screen layout:

   - ``crop="auto"`` (default): an image of exactly 975 x 735 pixels (W x H), the
     GE Voluson E8 screen layout of the example images shipped with SonoNet, is
     cropped to rows 115:734 and columns 81:874 (the box of the original
     example code). Any other size is used whole: fetalscan does not guess the
     layout of an unknown scanner. Crop such images to the ultrasound sector
     first, or pass an explicit box.
   - ``crop="none"``: the whole image.
   - ``crop=(x0, y0, x1, y1)``: an explicit box in pixels (end exclusive).

   What it means for accuracy: on the 13 example images the layout crop names
   all 13 planes correctly; the same images *uncropped* give 11 of 13 (the
   three-vessel view is read as RVOT and the lips as background) — screen
   overlays and text cost accuracy, so treat plane confidences on uncropped
   screenshots with caution.
2. **Grey scale, resize.** The crop is resized to 288 x 224 (W x H) and turned to
   grey as the mean of R, G, B (:func:`fetalscan.transforms.prepare`: antialiased
   bilinear; the original used bicubic resizing, which changes the example
   confidences by at most 0.05 and no decision).
3. **Per-image standardisation.** ``255 * (x - mean(x)) / std(x)`` over the
   pixels of the image (population std), as SonoNet was trained
   (:func:`fetalscan.transforms.normalize` with the ``sononet16`` preprocessing).

The softmax of the network's 14 logits is the original network's output. The
confidence is that probability; it is not calibrated on fetalscan's data.

Reference
---------
Baumgartner CF, Kamnitsas K, Matthew J, Fletcher TP, Smith S, Koch LM, Kainz B,
Rueckert D. SonoNet: real-time detection and localisation of fetal standard scan
planes in freehand ultrasound. IEEE Trans Med Imaging 2017;36(11):2204-2215.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fetalscan.errors import DataError, FetalscanError

log = logging.getLogger(__name__)


#: (width, height) of the screen layout whose scanner frame is known.
VOLUSON_E8_LAYOUT: tuple[int, int] = (975, 735)


#: Crop box (x0, y0, x1, y1) of that layout, from the original SonoNet example code.
VOLUSON_E8_CROP: tuple[int, int, int, int] = (81, 115, 874, 734)


#: SonoNet planes that show the fetal brain (anomaly reads of the brain need one of them).
BRAIN_PLANES: frozenset[str] = frozenset({"Brain (Tv.)", "Brain (Cb.)"})


#: Planes of the fetal head. HC and BPD are measured on the transthalamic plane (ISUOG 2019), for which
#: SonoNet has no class; its brain planes are the nearest it can tell from other views.
HEAD_PLANES: frozenset[str] = BRAIN_PLANES


@dataclass(frozen=True)
class PlaneResult:
    """SonoNet's reading of one image."""

    plane: str
    confidence: float
    probabilities: dict[str, float] = field(default_factory=dict)
    crop: str = "none"  # how the image was cropped: "voluson_e8", "none" or "x0,y0,x1,y1"

    @property
    def brain_probability(self) -> float:
        """P(a brain plane): the sum of the probabilities of :data:`BRAIN_PLANES`."""
        return float(sum(self.probabilities.get(p, 0.0) for p in BRAIN_PLANES))

    @property
    def is_brain(self) -> bool:
        """Whether the plane is a brain plane (transventricular or transcerebellar)."""
        return is_brain_plane(self.plane)

    def to_dict(self) -> dict:
        return {"plane": self.plane, "confidence": self.confidence, "is_brain_plane": self.is_brain,
                "crop": self.crop, "probabilities": dict(self.probabilities)}


def is_brain_plane(plane: str) -> bool:
    """True for SonoNet's ``"Brain (Tv.)"`` and ``"Brain (Cb.)"``."""
    return plane in BRAIN_PLANES


def crop_scanner_frame(image: np.ndarray, crop: str | Sequence[int] = "auto") -> tuple[np.ndarray, str]:
    """Apply the documented crop rule; returns the cropped image and how it was cropped.

    Parameters
    ----------
    image : array (H, W, 3) uint8
    crop : "auto", "none" or (x0, y0, x1, y1)
        See the module docstring.
    """
    h, w = image.shape[:2]
    if isinstance(crop, str):
        if crop == "none":
            return image, "none"
        if crop != "auto":
            return crop_scanner_frame(image, parse_crop(crop))
        if (w, h) == VOLUSON_E8_LAYOUT:
            x0, y0, x1, y1 = VOLUSON_E8_CROP
            return image[y0:y1, x0:x1], "voluson_e8"
        return image, "none"
    x0, y0, x1, y1 = (int(v) for v in crop)
    if not (0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h):
        raise DataError(f"crop box ({x0}, {y0}, {x1}, {y1}) does not fit inside the {w} x {h} image")
    return image[y0:y1, x0:x1], f"{x0},{y0},{x1},{y1}"


def parse_crop(text: str) -> tuple[int, int, int, int] | str:
    """``"auto"``, ``"none"`` or ``"x0,y0,x1,y1"`` from the command line."""
    if text in ("auto", "none"):
        return text
    try:
        box = tuple(int(v) for v in text.split(","))
    except ValueError:
        box = ()
    if len(box) != 4:
        raise FetalscanError(f"crop must be 'auto', 'none' or 'x0,y0,x1,y1' in pixels, got {text!r}")
    return box  # type: ignore[return-value]


_MODEL_CACHE: dict[str, object] = {}


def load_plane_model(device=None):
    """SonoNet-16 with the bundled weights, in evaluation mode on ``device`` (cached per device)."""
    import torch

    from fetalscan.models.sononet import sononet16

    dev = torch.device(device) if device is not None else torch.device("cpu")
    key = str(dev)
    if key not in _MODEL_CACHE:
        _MODEL_CACHE[key] = sononet16(num_classes=14, pretrained=True).eval().to(dev)
    return _MODEL_CACHE[key]


def classify_planes(
    images: Sequence[np.ndarray],
    device=None,
    *,
    crop: str | Sequence[int] = "auto",
    batch_size: int = 16,
) -> list[PlaneResult]:
    """Name the standard plane of each image with SonoNet-16.

    Parameters
    ----------
    images : sequence of arrays (H, W, 3) uint8
        RGB images as :func:`fetalscan.data.read_image` returns them (grey
        ``(H, W)`` is accepted too).
    device : torch.device or str, optional
        Where to run (default CPU).
    crop : "auto", "none" or (x0, y0, x1, y1)
        Scanner-frame crop rule (module docstring).
    batch_size : int, default 16

    Returns
    -------
    list of PlaneResult
        In the order of ``images``.

    Examples
    --------
    >>> from fetalscan.data import read_image                      # doctest: +SKIP
    >>> classify_planes([read_image(Path("BRAIN-TV.tiff"))])[0].plane  # doctest: +SKIP
    'Brain (Tv.)'
    """
    import torch

    from fetalscan.data.transforms import normalize, prepare
    from fetalscan.models.registry import get_backbone_spec
    from fetalscan.models.sononet import SONONET_PLANES

    pre = get_backbone_spec("sononet16").preprocessing
    model = load_plane_model(device)
    dev = next(model.parameters()).device
    prepared, crops = [], []
    for i, image in enumerate(images):
        img = np.asarray(image)
        if img.ndim == 2:
            img = np.repeat(img[..., None], 3, axis=2)
        if img.ndim != 3 or img.shape[2] != 3 or img.dtype != np.uint8:
            raise DataError(f"image {i}: expected an RGB uint8 (H, W, 3) array, got {img.dtype} {img.shape}")
        cropped, how = crop_scanner_frame(img, crop)
        prepared.append(prepare(cropped, pre))
        crops.append(how)
    results: list[PlaneResult] = []
    for start in range(0, len(prepared), batch_size):
        x = normalize(torch.stack(prepared[start:start + batch_size]).to(dev), pre)
        with torch.inference_mode():
            probs = torch.softmax(model(x).float(), dim=1).cpu().numpy()
        for j, p in enumerate(probs):
            k = int(np.argmax(p))
            results.append(PlaneResult(
                plane=SONONET_PLANES[k], confidence=float(p[k]),
                probabilities={name: float(v) for name, v in zip(SONONET_PLANES, p)},
                crop=crops[start + j],
            ))
    return results


def classify_files(paths: Sequence[str | Path], device=None, *, crop: str | Sequence[int] = "auto") -> list[PlaneResult]:
    """:func:`classify_planes` on image files read with :func:`fetalscan.data.read_image`."""
    from fetalscan.data.records import read_image

    return classify_planes([read_image(Path(p)) for p in paths], device, crop=crop)


def classify_records(records: Sequence, device=None, *, crop: str | Sequence[int] = "auto",
                     batch_size: int = 16) -> list[PlaneResult]:
    """:func:`classify_planes` on dataset records (files, DICOM frames, video frames).

    Images are decoded once each, in batches, so a large dataset never sits in
    memory whole. Results are in the order of ``records``.
    """
    from fetalscan.data.records import iter_record_images
    from fetalscan.progress import track

    results: list[PlaneResult | None] = [None] * len(records)
    index: list[int] = []
    batch: list[np.ndarray] = []

    def flush() -> None:
        for i, res in zip(index, classify_planes(batch, device, crop=crop, batch_size=batch_size)):
            results[i] = res
        index.clear()
        batch.clear()

    for i, image in track(iter_record_images(records), "checking planes", total=len(records)):
        index.append(i)
        batch.append(image)
        if len(batch) == batch_size:
            flush()
    if batch:
        flush()
    return results  # type: ignore[return-value]
