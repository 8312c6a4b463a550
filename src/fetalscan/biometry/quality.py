"""Quality signals and score of head images measured with a trained segmenter (``fetalscan quality``).

The label-free signals are defined in :mod:`fetalscan.quality.signals`; this module produces
the segmentation-dependent inputs (head region, probabilities, test-time-augmented passes) with
a :class:`~fetalscan.biometry.segmenter.HeadSegmenter`, adds the plane gate's brain-plane
probability (:mod:`fetalscan.quality.planes`), and scores each image with a
:class:`~fetalscan.quality.score.QualityModel` (see ``docs/quality.md``). It lives in
``biometry/`` because it needs the segmenter; ``quality/`` stays below it and takes arrays.

Test-time augmentation (TTA): the network input (after resizing) is passed plainly, mirrored
left-right, and shifted by ``shift_px`` input pixels in x, in y and diagonally (edges
replicated); each output is mapped back (mirror / shift undone) and upsampled to the image. The
Dice spread and the HC spread over the passes are the uncertainty signals (Wang et al. 2019).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

log = logging.getLogger(__name__)


@dataclass
class QualityConfig:
    """How ``fetalscan quality`` scores images; the CLI maps flags 1:1 onto these fields.

    Attributes
    ----------
    shift_px : int
        TTA shift in network-input pixels (4 px at 128 x 192 is ~2 % of the width).
    plane_check : bool
        Compute the plane gate's brain-plane probability (SonoNet-16, ~0.1 s per image on CPU).
    pixel_size_mm : float or None
        Millimetres per pixel for images that carry none (only for the HC column).
    backend : str
        Segmenter backend: ``auto``, ``torch`` or ``onnx``.
    """

    shift_px: int = 4
    plane_check: bool = True
    pixel_size_mm: float | None = None
    backend: str = "auto"

    def to_dict(self) -> dict:
        return asdict(self)


def _shift(x, dy: int, dx: int):
    """Shift a (N, C, h, w) tensor by (dy, dx) pixels, replicating the edges."""
    import torch.nn.functional as F

    if dy == 0 and dx == 0:
        return x
    pad = (max(dx, 0), max(-dx, 0), max(dy, 0), max(-dy, 0))
    xp = F.pad(x.float(), pad, mode="replicate")
    h, w = x.shape[-2:]
    y0, x0 = max(-dy, 0), max(-dx, 0)
    return xp[..., y0:y0 + h, x0:x0 + w].to(x.dtype)


def tta_logits(segmenter, image: np.ndarray, shift_px: int = 4) -> list[np.ndarray]:
    """Low-resolution logits of the plain pass and the augmented passes, each mapped back.

    Returns ``[plain, mirrored, shift x, shift y, shift xy]`` as (h, w) float32 arrays. Each pass
    is the network's own output (the segmenter's mirror TTA, if set, is not applied: it would hide
    the mirror disagreement this measures).
    """
    import torch

    x = segmenter.prepare(image)[None]  # (1, 1, h, w) uint8
    s = int(shift_px)
    shifts = [(0, s), (s, 0), (s, s)]
    batch = torch.cat([x, torch.flip(x, dims=[-1])] + [_shift(x, dy, dx) for dy, dx in shifts])
    out = segmenter.logits(batch, tta=False)
    maps = [out[0], out[1][:, ::-1]]
    for k, (dy, dx) in enumerate(shifts):
        back = _shift(torch.from_numpy(np.ascontiguousarray(out[2 + k]))[None, None], -dy, -dx)
        maps.append(back[0, 0].numpy())
    return [np.ascontiguousarray(m, dtype=np.float32) for m in maps]


def _head_region(mask: np.ndarray):
    """(filled largest region as bool, its outer contour (N, 2)) of a binary mask, or (None, None)."""
    import cv2

    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    if not contours:
        return None, None
    c = max(contours, key=cv2.contourArea)
    region = np.zeros(mask.shape, np.uint8)
    cv2.drawContours(region, [c], -1, 1, thickness=-1)
    return region.astype(bool), c.reshape(-1, 2)


def image_quality_signals(segmenter, image: np.ndarray, pixel_size_mm: float | None = None, *,
                          shift_px: int = 4, where: str = "image"):
    """Measure one image and compute its segmentation and image signals.

    Returns
    -------
    (signals, measurement)
        ``signals``: dict of :data:`fetalscan.quality.signals.SEGMENTATION_SIGNALS` and the
        image signals, plus ``head_found``; ``measurement``: the plain pass's
        :class:`~fetalscan.biometry.geometry.HeadMeasurement` (what ``biometry predict`` reports:
        the plain pass, or the mean of the plain and mirrored passes for a segmenter with TTA).
    """
    from fetalscan.biometry.geometry import fit_head_ellipse
    from fetalscan.biometry.segmenter import _sigmoid, upsample_logits
    from fetalscan.quality import signals as S

    shape = image.shape[:2]
    logits = tta_logits(segmenter, image, shift_px)
    own = 0.5 * (logits[0] + logits[1]) if getattr(segmenter, "tta", False) else logits[0]
    measurement = segmenter.measure_logits(own, shape, pixel_size_mm, where)
    sig = S.image_signals(image)
    sig["head_found"] = bool(measurement.found)
    if not measurement.found or measurement.fit is None or measurement.fit.ellipse is None:
        sig.update(S.segmentation_signals(image, None))
        return sig, measurement
    up = [upsample_logits(lg, shape) for lg in logits]
    masks = [u > 0.0 for u in up]
    region, contour = _head_region(masks[0])
    tta_masks, tta_hc = [], [measurement.fit.ellipse.perimeter()]
    for m in masks[1:]:
        fit = fit_head_ellipse(m)
        reg, _ = _head_region(m)
        tta_masks.append(reg if reg is not None else np.zeros(shape, bool))
        tta_hc.append(fit.ellipse.perimeter() if fit.found and fit.ellipse is not None else None)
    e = measurement.fit.ellipse
    seg = S.SegmentationInputs(
        mask=region, prob=_sigmoid(up[0]), contour_xy=contour,
        ellipse=(e.cx, e.cy, e.semi_major, e.semi_minor, e.angle_deg),
        fit_iou=measurement.fit.fit_iou, tta_masks=tta_masks, tta_hc=tta_hc,
    )
    sig.update(S.segmentation_signals(image, seg))
    return sig, measurement


def plane_brain_probability(images: Sequence[np.ndarray], device=None) -> list[float]:
    """P(brain plane) per image from the plane gate (SonoNet-16): the sum of its two brain classes,
    Brain (Tv.) and Brain (Cb.); SonoNet-16 has no transthalamic class, so this says "a brain plane",
    not "the biometry plane"."""
    from fetalscan.quality.planes import classify_planes

    res = classify_planes(list(images), device)
    return [r.brain_probability for r in res]


#: What the console, the CSV and the service say below the threshold.
REACQUIRE_TEXT = "re-acquire"


def quality_summary(segmenter, image: np.ndarray, pixel_size_mm: float | None = None, *, where: str = "image",
                    plane_brain_prob: float | None = None, model=None, device=None) -> dict:
    """The quality score of one image for ``biometry predict`` and the service.

    Returns ``{"quality", "reacquire", "threshold", "model", "advice", "signals"}``; ``advice`` is
    ``"re-acquire"`` below the threshold, else ``"ok"``. The plane gate runs here unless
    ``plane_brain_prob`` is given.
    """
    from fetalscan.quality.score import load_quality_model

    model = model or load_quality_model(None, "full")
    sig, _ = image_quality_signals(segmenter, image, pixel_size_mm, where=where)
    sig["plane_brain_prob"] = (plane_brain_probability([image], device)[0] if plane_brain_prob is None
                               else float(plane_brain_prob))
    import pandas as pd

    q = float(model.predict_quality(pd.DataFrame([sig]))[0])
    low = q < model.threshold
    clean = {k: (float(v) if isinstance(v, (int, float, np.floating)) and np.isfinite(v) else None)
             for k, v in sig.items() if k != "head_found"}
    return {"quality": q, "reacquire": bool(low), "threshold": float(model.threshold), "model": model.name,
            "advice": REACQUIRE_TEXT if low else "ok", "signals": clean}
