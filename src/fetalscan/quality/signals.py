"""Label-free image-quality signals of one ultrasound image (and, optionally, its head segmentation).

Every function here takes plain arrays and returns plain numbers, so the quality layer
never needs the segmenter: the caller (``fetalscan.biometry.quality``) segments the image,
runs the test-time augmentations and passes the masks / probabilities / measurements in.

Signals, each oriented as its name says:

- **sharpness** — variance of the Laplacian of the grey image in [0, 1] (Pech-Pacheco et al.
  2000); **gradient_energy** — mean squared Sobel gradient magnitude ("Tenengrad",
  Krotkov 1987). Both fall when an image is blurred.
- **contrast** — RMS contrast: standard deviation of the grey image in [0, 1] inside the
  scanned area (pixels above the darkest 1 %-ile + 2/255; the black surround of a sector is left out).
- **cnr** — contrast-to-noise ratio ``|mu_in - mu_out| / sqrt(var_in + var_out)`` between the
  head region and a ring of its surroundings.
- **gcnr** — generalised CNR (Rodriguez-Molares A, et al. *The generalized contrast-to-noise
  ratio: a formal definition for lesion detectability.* IEEE TUFFC 2020;67(4):745-759):
  ``1 - overlap`` of the two intensity histograms, in [0, 1]; 1 = the two regions share no
  intensity, 0 = indistinguishable. Unlike CNR it is invariant to monotone grey-level transforms.
- **ellipse_residual** — mean |r - 1| of the head's contour points, where r is the point's
  normalised elliptical radius ``sqrt((x/a)^2 + (y/b)^2)`` in the fitted ellipse's frame
  (0 for a perfect ellipse; ~0.5 px / semi-axis for a rasterised one).
- **area_ratio** — head-mask area / fitted-ellipse area (1 for an elliptical region).
- **tta_dice_disagreement**, **tta_hc_spread** — segmentation uncertainty from test-time
  augmentation (Wang G, et al. *Aleatoric uncertainty estimation with test-time augmentation for
  medical image segmentation with convolutional neural networks.* Neurocomputing 2019;338:34-45):
  1 - mean Dice of each augmented mask (mapped back) with the plain mask, and the coefficient of
  variation of the HC over the augmentations.
- **uncertain_fraction** — pixels with head probability in (0.1, 0.9) per head pixel.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from fetalscan.errors import DataError


def to_grey01(image: np.ndarray) -> np.ndarray:
    """RGB or grey uint8 (or float in 0-255) -> float32 grey in [0, 1]."""
    img = np.asarray(image)
    if img.ndim == 3:
        img = img[..., :3].mean(axis=2)
    if img.ndim != 2:
        raise DataError(f"expected an image (H, W) or (H, W, 3), got shape {img.shape}")
    img = img.astype(np.float32)
    if img.size == 0:
        raise DataError("expected a non-empty image")
    return img / 255.0


def sharpness(image: np.ndarray) -> float:
    """Variance of the Laplacian (3x3) of the grey image in [0, 1]; lower = blurrier."""
    import cv2

    g = to_grey01(image)
    return float(cv2.Laplacian(g, cv2.CV_32F, ksize=1).var())


def gradient_energy(image: np.ndarray) -> float:
    """Mean squared Sobel gradient magnitude of the grey image in [0, 1] (Tenengrad)."""
    import cv2

    g = to_grey01(image)
    gx = cv2.Sobel(g, cv2.CV_32F, 1, 0, ksize=3)
    gy = cv2.Sobel(g, cv2.CV_32F, 0, 1, ksize=3)
    return float(np.mean(gx * gx + gy * gy))


def scanned_area(image: np.ndarray) -> np.ndarray:
    """Pixels brighter than the darkest 1 %-ile + 2/255 (the scanned area, not the black surround)."""
    g = to_grey01(image)
    return g > (np.percentile(g, 1) + 2.0 / 255.0)


def contrast(image: np.ndarray) -> float:
    """RMS contrast: std of the grey image in [0, 1] inside :func:`scanned_area`."""
    g = to_grey01(image)
    area = scanned_area(image)
    return float(g[area].std()) if area.sum() > 10 else float(g.std())


def surround_ring(mask: np.ndarray, width_fraction: float = 0.25, min_width_px: int = 5) -> np.ndarray:
    """A ring outside ``mask`` of width ``width_fraction`` x the region's equivalent radius."""
    import cv2

    m = np.asarray(mask).astype(bool)
    area = int(m.sum())
    if area == 0:
        return np.zeros_like(m)
    width = max(int(round(width_fraction * math.sqrt(area / math.pi))), int(min_width_px))
    k = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * width + 1, 2 * width + 1))
    dil = cv2.dilate(m.astype(np.uint8), k).astype(bool)
    return dil & ~m


def _two_regions(image: np.ndarray, inside: np.ndarray, outside: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    g = to_grey01(image)
    inside, outside = np.asarray(inside, bool), np.asarray(outside, bool)
    if inside.shape != g.shape or outside.shape != g.shape:
        raise DataError(f"masks {inside.shape} / {outside.shape} do not match the image {g.shape}")
    return g[inside], g[outside]


def cnr(image: np.ndarray, inside: np.ndarray, outside: np.ndarray) -> float:
    """Contrast-to-noise ratio ``|mu_i - mu_o| / sqrt(var_i + var_o)``; NaN if a region is empty."""
    a, b = _two_regions(image, inside, outside)
    if a.size < 2 or b.size < 2:
        return float("nan")
    den = math.sqrt(float(a.var()) + float(b.var()))
    return float(abs(a.mean() - b.mean()) / den) if den > 0 else float("inf") if a.mean() != b.mean() else 0.0


def gcnr(image: np.ndarray, inside: np.ndarray, outside: np.ndarray, bins: int = 256) -> float:
    """Generalised CNR (Rodriguez-Molares et al. 2020): ``1 - sum_k min(p_in(k), p_out(k))``.

    Histograms over ``bins`` equal bins of [0, 1]; NaN if a region is empty.
    """
    a, b = _two_regions(image, inside, outside)
    if a.size == 0 or b.size == 0:
        return float("nan")
    edges = np.linspace(0.0, 1.0 + 1e-6, bins + 1)
    pa = np.histogram(a, edges)[0] / a.size
    pb = np.histogram(b, edges)[0] / b.size
    return float(1.0 - np.minimum(pa, pb).sum())


def ellipse_residual(contour_xy: np.ndarray, cx: float, cy: float, semi_major: float, semi_minor: float,
                     angle_deg: float) -> float:
    """Mean |r - 1| of contour points (N, 2) as (x, y) against an ellipse (OpenCV angle convention:
    the major axis at ``angle_deg`` from the x axis)."""
    p = np.asarray(contour_xy, dtype=np.float64).reshape(-1, 2)
    if p.shape[0] == 0 or not (semi_major > 0 and semi_minor > 0):
        return float("nan")
    t = math.radians(angle_deg)
    dx, dy = p[:, 0] - cx, p[:, 1] - cy
    u = dx * math.cos(t) + dy * math.sin(t)
    v = -dx * math.sin(t) + dy * math.cos(t)
    r = np.sqrt((u / semi_major) ** 2 + (v / semi_minor) ** 2)
    return float(np.mean(np.abs(r - 1.0)))


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice of two boolean masks; 1.0 when both are empty."""
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    s = int(a.sum()) + int(b.sum())
    return 1.0 if s == 0 else 2.0 * int(np.count_nonzero(a & b)) / s


def tta_disagreement(base_mask: np.ndarray, tta_masks: Sequence[np.ndarray]) -> float:
    """1 - mean Dice of each test-time-augmented mask (already mapped back) with the plain mask."""
    if not tta_masks:
        return float("nan")
    return float(1.0 - np.mean([dice(base_mask, m) for m in tta_masks]))


def relative_spread(values: Sequence[float | None]) -> float:
    """Coefficient of variation (population std / mean) of the finite values; NaN with < 2 of them.

    A missing value (``None``/NaN: no head found under that augmentation) makes the spread 1.0,
    the largest value the signal takes for a disagreement that large."""
    vals = np.array([np.nan if v is None else float(v) for v in values], dtype=float)
    if vals.size and not np.all(np.isfinite(vals)):
        return 1.0
    if vals.size < 2 or not np.all(vals > 0):
        return float("nan")
    return float(min(vals.std() / vals.mean(), 1.0))


def uncertain_fraction(prob: np.ndarray, lo: float = 0.1, hi: float = 0.9) -> float:
    """Pixels with ``lo < p < hi`` per pixel with ``p >= 0.5``; NaN if there is no head pixel."""
    p = np.asarray(prob, dtype=np.float32)
    head = int(np.count_nonzero(p >= 0.5))
    if head == 0:
        return float("nan")
    return float(np.count_nonzero((p > lo) & (p < hi)) / head)


#: Image-only signals: need neither the segmenter nor labels.
IMAGE_SIGNALS: tuple[str, ...] = ("plane_brain_prob", "sharpness", "gradient_energy", "contrast")

#: Signals that need the segmentation (NaN when no head was found).
SEGMENTATION_SIGNALS: tuple[str, ...] = (
    "cnr", "gcnr", "ellipse_residual", "area_ratio", "fit_iou",
    "tta_dice_disagreement", "tta_hc_spread", "uncertain_fraction",
)

ALL_SIGNALS: tuple[str, ...] = IMAGE_SIGNALS + SEGMENTATION_SIGNALS


@dataclass
class SegmentationInputs:
    """What the caller measured with its segmenter, for :func:`segmentation_signals`.

    Attributes
    ----------
    mask : bool (H, W)
        The head region actually measured (largest region, holes filled).
    prob : float (H, W)
        Head probability at image size.
    contour_xy : (N, 2)
        Outer contour of the head region, (x, y) pixel centres.
    ellipse : (cx, cy, semi_major, semi_minor, angle_deg)
        The fitted ellipse (before any calibration offset).
    fit_iou : float
        IoU of the region with its filled ellipse.
    tta_masks : list of bool (H, W)
        Masks of the augmented passes, mapped back to the image.
    tta_hc : list of float or None
        HC (any unit) of the plain pass followed by the augmented passes; None = no head.
    """

    mask: np.ndarray
    prob: np.ndarray
    contour_xy: np.ndarray
    ellipse: tuple[float, float, float, float, float]
    fit_iou: float
    tta_masks: list
    tta_hc: list


def image_signals(image: np.ndarray) -> dict[str, float]:
    """Sharpness, gradient energy and contrast of one image."""
    return {"sharpness": sharpness(image), "gradient_energy": gradient_energy(image), "contrast": contrast(image)}


def segmentation_signals(image: np.ndarray, seg: SegmentationInputs | None) -> dict[str, float]:
    """The :data:`SEGMENTATION_SIGNALS` of an image; all NaN when ``seg`` is None (no head found)."""
    if seg is None:
        return {k: float("nan") for k in SEGMENTATION_SIGNALS}
    cx, cy, a, b, ang = seg.ellipse
    ring = surround_ring(seg.mask)
    ring &= scanned_area(image)
    area = float(np.count_nonzero(seg.mask))
    return {
        "cnr": cnr(image, seg.mask, ring),
        "gcnr": gcnr(image, seg.mask, ring),
        "ellipse_residual": ellipse_residual(seg.contour_xy, cx, cy, a, b, ang),
        "area_ratio": area / (math.pi * a * b) if a > 0 and b > 0 else float("nan"),
        "fit_iou": float(seg.fit_iou),
        "tta_dice_disagreement": tta_disagreement(seg.mask, seg.tta_masks),
        "tta_hc_spread": relative_spread(seg.tta_hc),
        "uncertain_fraction": uncertain_fraction(seg.prob),
    }
