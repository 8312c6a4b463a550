"""Fetal head biometry: head mask -> ellipse -> HC, BPD, OFD (mm) -> gestational age.

The chain (each step is a public function, usable alone):

1. :class:`HeadSegmenter` predicts the head as a probability map at a reduced
   input size (a U-Net from ``segmentation_models_pytorch``), and the logits are
   upsampled bilinearly to the original image size.
2. :func:`fit_head_ellipse` keeps the largest connected component of the mask
   (only if it dominates, see below), takes its outer contour and fits an
   ellipse to it with OpenCV's least-squares ``fitEllipse`` (Fitzgibbon et al.
   1999).
3. :func:`measure_mask` turns the ellipse into head circumference (Ramanujan's
   perimeter), biparietal and occipito-frontal diameters (the ellipse axes) and
   converts pixels to millimetres with the pixel size; :func:`hadlock_ga`
   estimates the gestational age from HC (Hadlock et al. 1984).
4. :func:`draw_overlay` draws the ellipse, the BPD / OFD axes and the values on
   the image.

Conventions
-----------
- **Caliper convention.** The ellipse follows the *outer* border of the skull
  (as the HC18 reference annotations do). OFD is the major axis and BPD the
  minor axis of that ellipse, both outer-to-outer. The clinical BPD of Hadlock's
  charts is outer-to-inner (leading edge to leading edge), so the BPD reported
  here exceeds it by about one skull-bone thickness (roughly 1-3 mm depending on
  age); HC, the measurement used for gestational age here, is not affected.
- **Pixel size.** Millimetres come only from a known pixel size (manifest column
  ``pixel_size_mm`` / ``pixel_spacing_mm`` or the DICOM Ultrasound Region
  Sequence / Pixel Spacing, see :func:`fetalscan.dicom.pixel_spacing_mm`). When it
  is missing every length is reported in pixels, with a warning, and no
  gestational age is given. A millimetre value is never guessed.
- **Axis offset.** The HC18 masks were drawn so that the reference ellipse lies
  about 1.4 pixels inside the mask's outer edge (0.9 pixel inside the centres of
  its boundary pixels). A trained
  segmenter carries a calibrated ``axis_offset_px`` (added to both semi-axes
  before measuring), estimated on its inner-validation images only; the plain
  geometry functions default to no offset.
- **"Check".** A head region that is not elliptical (IoU with its fitted ellipse
  below :data:`MIN_FIT_IOU`) is measured, but the result has ``status == "check"``:
  the ellipse, and so HC, may be wrong. No gestational age is given for it, and the
  summary line and the overlay say why.
- **"No head found".** An empty mask, a largest region smaller than
  ``min_area_fraction`` of the image, or a mask whose largest region holds less
  than ``min_dominance`` (default 80 %) of the foreground pixels (several blobs of
  similar size: which one is the head cannot be told) gives a result with
  ``status == "no_head"`` and a reason, never an exception.

References
----------
Hadlock FP, Deter RL, Harrist RB, Park SK. Estimating fetal age: computer-assisted
analysis of multiple fetal growth parameters. Radiology 1984;152(2):497-501.

Ramanujan S. Modular equations and approximations to pi. Quart. J. Pure Appl.
Math. 1914;45:350-372 (the second perimeter approximation).

Fitzgibbon A, Pilu M, Fisher RB. Direct least square fitting of ellipses. IEEE
TPAMI 1999;21(5):476-480.

van den Heuvel TLA, de Bruijn D, de Korte CL, van Ginneken B. Automated
measurement of fetal head circumference using 2D ultrasound images. PLoS ONE
2018;13(8):e0200412 (the HC18 data and its scoring).

Ronneberger O, Fischer P, Brox T. U-Net: convolutional networks for biomedical
image segmentation. MICCAI 2015.
"""

from __future__ import annotations

import io
import logging
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fetalscan.data.hc18 import as_binary_mask
from fetalscan.errors import DataError

log = logging.getLogger(__name__)


#: Hadlock 1984 HC formula: GA (weeks) = 8.96 + 0.540 HC + 0.0003 HC^3, HC in cm.
HADLOCK_HC_COEFFICIENTS: tuple[float, float, float] = (8.96, 0.540, 0.0003)


#: HC range (mm) of the formula's published table; outside it no age is given.
HADLOCK_HC_RANGE_MM: tuple[float, float] = (68.0, 360.0)


#: Stated variability of the HC-derived age: (upper HC bound in mm, +/-2 SD in weeks).
#: An HC between two tabulated bands takes the wider (next) band.
HADLOCK_HC_2SD_WEEKS: tuple[tuple[float, float], ...] = (
    (144.0, 1.19), (219.0, 1.48), (280.0, 2.06), (325.0, 2.98), (360.0, 3.20),
)


@dataclass(frozen=True)
class GestationalAge:
    """Gestational (menstrual) age estimated from head circumference."""

    weeks: float | None
    two_sd_weeks: float | None
    note: str = ""

    def text(self) -> str:
        """``"24w 3d ± 2.1 wk"`` or the reason why there is no estimate."""
        if self.weeks is None:
            return self.note or "no estimate"
        w = int(self.weeks)
        d = int(round((self.weeks - w) * 7))
        if d == 7:
            w, d = w + 1, 0
        sd = f" ± {self.two_sd_weeks:.1f} wk (2 SD)" if self.two_sd_weeks is not None else ""
        return f"{w}w {d}d{sd}"


def hadlock_ga(hc_mm: float | None) -> GestationalAge:
    """Gestational age from head circumference by Hadlock's 1984 regression.

    ``GA (weeks) = 8.96 + 0.540 * HC + 0.0003 * HC**3`` with HC in centimetres
    (Hadlock FP, Deter RL, Harrist RB, Park SK. Radiology 1984;152:497-501). The
    formula was derived from 361 fetuses of 14-42 menstrual weeks; its published
    table spans HC 6.8-36.0 cm, with a +/-2 SD variability that grows from
    1.19 weeks (HC up to 14.4 cm) to 1.48, 2.06, 2.98 and 3.20 weeks (HC up to
    21.9, 28.0, 32.5 and 36.0 cm). These bands were taken from a manufacturer's
    reproduction of the table (Hologic SuperSonic MACH obstetric references,
    "GA by HC - Hadlock 1984"), which the formula reproduces.

    Parameters
    ----------
    hc_mm : float or None
        Head circumference in millimetres (outer perimeter).

    Returns
    -------
    GestationalAge
        ``weeks`` and ``two_sd_weeks``; both ``None`` (with a ``note``) for a
        missing HC or one outside 68-360 mm, where the formula was not tabulated.

    Examples
    --------
    >>> round(hadlock_ga(175.0).weeks, 2)
    20.02
    """
    if hc_mm is None or not math.isfinite(hc_mm):
        return GestationalAge(None, None, "not estimated: no head circumference")
    lo, hi = HADLOCK_HC_RANGE_MM
    if not lo <= hc_mm <= hi:
        return GestationalAge(
            None, None,
            f"not estimated: HC {hc_mm:.1f} mm is outside the range of the Hadlock 1984 table "
            f"({lo:.0f}-{hi:.0f} mm)",
        )
    c0, c1, c3 = HADLOCK_HC_COEFFICIENTS
    hc_cm = hc_mm / 10.0
    weeks = c0 + c1 * hc_cm + c3 * hc_cm**3
    two_sd = next(sd for upper, sd in HADLOCK_HC_2SD_WEEKS if hc_mm <= upper)
    return GestationalAge(float(weeks), float(two_sd))


def ramanujan_perimeter(a: float, b: float) -> float:
    """Perimeter of an ellipse with semi-axes ``a`` and ``b`` (Ramanujan's second approximation).

    ``pi (a + b) (1 + 3h / (10 + sqrt(4 - 3h)))`` with ``h = ((a - b) / (a + b))^2``;
    its relative error is below 1e-9 for the eccentricities of fetal heads
    (Ramanujan 1914).
    """
    a, b = float(a), float(b)
    if a < 0 or b < 0:
        raise DataError(f"ellipse semi-axes must be >= 0, got a={a}, b={b}")
    if a + b == 0:
        return 0.0
    h = ((a - b) / (a + b)) ** 2
    return math.pi * (a + b) * (1.0 + 3.0 * h / (10.0 + math.sqrt(4.0 - 3.0 * h)))


@dataclass(frozen=True)
class Ellipse:
    """An ellipse in image pixel coordinates (x to the right, y down, pixel centres at integers).

    ``angle_deg`` is the direction of the major axis, in degrees from +x towards +y.
    """

    cx: float
    cy: float
    semi_major: float
    semi_minor: float
    angle_deg: float

    @classmethod
    def from_opencv(cls, box: tuple) -> Ellipse:
        """From OpenCV's ``((cx, cy), (width, height), angle)`` rotated rectangle."""
        (cx, cy), (w, h), angle = box
        if w >= h:
            return cls(float(cx), float(cy), w / 2.0, h / 2.0, float(angle) % 180.0)
        return cls(float(cx), float(cy), h / 2.0, w / 2.0, (float(angle) + 90.0) % 180.0)

    def to_opencv(self) -> tuple:
        return ((self.cx, self.cy), (2 * self.semi_major, 2 * self.semi_minor), self.angle_deg)

    def grown(self, delta_px: float) -> Ellipse:
        """The ellipse with ``delta_px`` added to both semi-axes (negative shrinks)."""
        return Ellipse(self.cx, self.cy, max(self.semi_major + delta_px, 0.0),
                       max(self.semi_minor + delta_px, 0.0), self.angle_deg)

    def perimeter(self) -> float:
        """Perimeter in pixels (Ramanujan)."""
        return ramanujan_perimeter(self.semi_major, self.semi_minor)

    def axis_endpoints(self) -> tuple[tuple[tuple[float, float], tuple[float, float]], ...]:
        """``(major, minor)`` axes as pairs of end points ``((x0, y0), (x1, y1))``."""
        t = math.radians(self.angle_deg)
        ux, uy = math.cos(t), math.sin(t)
        a, b = self.semi_major, self.semi_minor
        major = ((self.cx - a * ux, self.cy - a * uy), (self.cx + a * ux, self.cy + a * uy))
        minor = ((self.cx + b * uy, self.cy - b * ux), (self.cx - b * uy, self.cy + b * ux))
        return major, minor

    def filled_mask(self, shape: tuple[int, int], origin: tuple[int, int] = (0, 0)) -> np.ndarray:
        """A boolean mask of ``shape`` (H, W) with the ellipse filled (sub-pixel drawing).

        ``origin`` (x, y) is the image position of the mask's top-left pixel (for crops).
        """
        import cv2

        out = np.zeros(shape, dtype=np.uint8)
        shift = 4
        f = 1 << shift
        cv2.ellipse(out, (int(round((self.cx - origin[0]) * f)), int(round((self.cy - origin[1]) * f))),
                    (int(round(self.semi_major * f)), int(round(self.semi_minor * f))),
                    self.angle_deg, 0, 360, 1, thickness=-1, lineType=cv2.LINE_8, shift=shift)
        return out.astype(bool)

    def to_dict(self) -> dict:
        return asdict(self)


#: The contour points are the centres of the region's boundary pixels, which lie half a
#: pixel inside the region's edge; the fitted semi-axes are grown by this much so that a
#: filled mask measures its own outline (an analytic ellipse of >= 40 px semi-axes is then
#: measured within 0.15 %; without it the fit is about 0.45 px short).
CONTOUR_TO_EDGE_PX = 0.5


@dataclass(frozen=True)
class HeadFit:
    """The head region of a mask and the ellipse fitted to it (or why there is none)."""

    found: bool
    ellipse: Ellipse | None
    reason: str = ""
    n_components: int = 0
    area_px: int = 0
    dominance: float = float("nan")  # largest region / all foreground pixels
    fit_iou: float = float("nan")  # IoU(largest region, filled fitted ellipse)
    touches_border: bool = False




def fit_head_ellipse(
    mask: np.ndarray,
    *,
    min_area_fraction: float = 0.001,
    min_dominance: float = 0.8,
) -> HeadFit:
    """Fit an ellipse to the head in a binary mask.

    Rule: the separate regions of the mask (8-connected outer contours; holes
    and anything inside a hole belong to the region) are found; the largest one
    is the head if it holds at least ``min_dominance`` of all
    foreground pixels and at least ``min_area_fraction`` of the image. Its outer
    contour (holes ignored) is fitted with OpenCV's least-squares ellipse
    (Fitzgibbon et al. 1999), and both semi-axes are grown by
    :data:`CONTOUR_TO_EDGE_PX` (contour points are pixel centres, half a pixel
    inside the mask's edge). Anything else gives ``found=False`` with a reason.

    Parameters
    ----------
    mask : array (H, W)
        bool, probabilities (> 0.5 is head) or integers (> 0 is head).
    min_area_fraction : float, default 0.001
        Smallest head region, as a fraction of the image area.
    min_dominance : float, default 0.8
        Share of the foreground pixels the largest region must hold.

    Returns
    -------
    HeadFit
    """
    import cv2

    binary = as_binary_mask(mask).astype(np.uint8)
    h, w = binary.shape
    contours, _ = cv2.findContours(binary, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    if not contours:
        return HeadFit(False, None, "no head found: the mask is empty")
    # pixels of each region (holes filled) by Pick's theorem: polygon area + boundary / 2 + 1
    areas = np.array([cv2.contourArea(c) + len(c) / 2.0 + 1.0 for c in contours])
    k = int(np.argmax(areas))
    area, total = float(areas[k]), float(areas.sum())
    dominance = area / total
    base = {"n_components": int(len(contours)), "area_px": int(round(area)), "dominance": float(dominance)}
    min_area = max(min_area_fraction * h * w, 20.0)
    if area < min_area:
        return HeadFit(False, None, f"no head found: the largest region has {area:.0f} pixels, "
                       f"fewer than the minimum {min_area:.0f} ({min_area_fraction:.2%} of the image)", **base)
    if dominance < min_dominance:
        return HeadFit(False, None, f"no head found: {len(contours)} separate regions and the largest holds only "
                       f"{dominance:.0%} of the head pixels (< {min_dominance:.0%}); cannot tell which is the head",
                       **base)
    contour = contours[k]
    if len(contour) < 5:
        return HeadFit(False, None, "no head found: the head region is too small to fit an ellipse", **base)
    ellipse = Ellipse.from_opencv(cv2.fitEllipse(contour)).grown(CONTOUR_TO_EDGE_PX)
    if not (math.isfinite(ellipse.semi_major) and ellipse.semi_minor > 0):
        return HeadFit(False, None, "no head found: the ellipse fit failed (degenerate region)", **base)
    x0, y0, bw, bh = cv2.boundingRect(contour)
    iou = _region_ellipse_iou(contour, (h, w), (x0, y0, bw, bh), ellipse)
    border = x0 == 0 or y0 == 0 or x0 + bw >= w or y0 + bh >= h
    return HeadFit(True, ellipse, "", fit_iou=iou, touches_border=bool(border), **base)


def _region_ellipse_iou(contour: np.ndarray, shape: tuple[int, int], box: tuple[int, int, int, int],
                        ellipse: Ellipse) -> float:
    """IoU of the filled region outline and the filled ellipse, inside their joint bounding box only."""
    import cv2

    h, w = shape
    x0, y0, bw, bh = box
    r = ellipse.semi_major + 2
    xa, ya = max(0, min(x0, int(ellipse.cx - r))), max(0, min(y0, int(ellipse.cy - r)))
    xb, yb = min(w, max(x0 + bw, int(ellipse.cx + r) + 1)), min(h, max(y0 + bh, int(ellipse.cy + r) + 1))
    region = np.zeros((yb - ya, xb - xa), np.uint8)
    cv2.drawContours(region, [contour], -1, 1, thickness=-1, offset=(-xa, -ya))
    filled = ellipse.filled_mask((yb - ya, xb - xa), origin=(xa, ya))
    region = region.astype(bool)
    union = np.count_nonzero(filled | region)
    return np.count_nonzero(filled & region) / union if union else float("nan")


#: Below this IoU between the head region and its fitted ellipse the region is "not elliptical":
#: the result is measured but flagged ``check`` and gets no gestational age.
MIN_FIT_IOU = 0.85


@dataclass
class HeadMeasurement:
    """HC, BPD and OFD of one image, in mm (or pixels when the pixel size is unknown)."""

    status: str  # "ok", "check" (measured, but the fit is doubtful: no GA) or "no_head"
    unit: str  # "mm" or "px"
    hc: float | None = None
    bpd: float | None = None
    ofd: float | None = None
    pixel_size_mm: float | None = None
    ga: GestationalAge = field(default_factory=lambda: GestationalAge(None, None, "no head circumference"))
    ellipse: Ellipse | None = None  # after the axis offset, in image pixels
    fit: HeadFit | None = None
    warnings: list[str] = field(default_factory=list)

    @property
    def found(self) -> bool:
        """A head was found and measured (``ok``, or ``check`` when the fit is doubtful)."""
        return self.status in ("ok", "check")

    @property
    def check_reason(self) -> str:
        """Why a ``check`` result is doubtful ("" otherwise)."""
        return self.ga.note if self.status == "check" else ""

    def to_row(self) -> dict[str, Any]:
        """A flat dict for CSV output: ``hc_mm, bpd_mm, ofd_mm`` or ``hc_px ...`` columns."""
        e = self.ellipse
        row: dict[str, Any] = {
            "status": self.status,
            "unit": self.unit,
            "pixel_size_mm": self.pixel_size_mm,
            "hc_mm": self.hc if self.unit == "mm" else None,
            "bpd_mm": self.bpd if self.unit == "mm" else None,
            "ofd_mm": self.ofd if self.unit == "mm" else None,
            "hc_px": self.hc if self.unit == "px" else (self.hc / self.pixel_size_mm if self.hc and self.pixel_size_mm else None),
            "ga_weeks": self.ga.weeks,
            "ga_2sd_weeks": self.ga.two_sd_weeks,
            "ga_note": self.ga.note if self.ga.weeks is None else "",
            "ellipse_cx": e.cx if e else None,
            "ellipse_cy": e.cy if e else None,
            "ellipse_semi_major_px": e.semi_major if e else None,
            "ellipse_semi_minor_px": e.semi_minor if e else None,
            "ellipse_angle_deg": e.angle_deg if e else None,
            "fit_iou": self.fit.fit_iou if self.fit else None,
            "n_regions": self.fit.n_components if self.fit else None,
            "warnings": " | ".join(self.warnings),
        }
        return row

    def summary(self) -> str:
        """One line: ``HC 175.2 mm, BPD 47.1 mm, OFD 62.0 mm, GA 20w 5d ± 1.5 wk``."""
        if not self.found:
            return self.fit.reason if self.fit and self.fit.reason else "no head found"
        u = self.unit
        text = f"HC {self.hc:.1f} {u}, BPD {self.bpd:.1f} {u}, OFD {self.ofd:.1f} {u}"
        if self.status == "check":
            return f"{text}; CHECK: {self.check_reason}"
        if self.unit == "mm":
            text += f", GA {self.ga.text()}"
        return text


def _check_pixel_size(pixel_size_mm: float | None, where: str) -> float | None:
    if pixel_size_mm is None:
        return None
    try:
        value = float(pixel_size_mm)
    except (TypeError, ValueError):
        raise DataError(f"{where}: pixel size must be a number in mm, got {pixel_size_mm!r}") from None
    if not math.isfinite(value):
        return None
    if value <= 0:
        raise DataError(f"{where}: pixel size must be > 0 mm, got {value}")
    return value


def measure_ellipse(ellipse: Ellipse, pixel_size_mm: float | None, where: str = "image") -> HeadMeasurement:
    """HC (Ramanujan), BPD (minor axis) and OFD (major axis) of an ellipse; GA from HC.

    Without ``pixel_size_mm`` the lengths stay in pixels, a warning is attached
    (and logged), and no gestational age is given.
    """
    ps = _check_pixel_size(pixel_size_mm, where)
    hc_px = ellipse.perimeter()
    bpd_px, ofd_px = 2 * ellipse.semi_minor, 2 * ellipse.semi_major
    if ps is None:
        msg = (f"{where}: pixel size unknown (no pixel_size_mm in the manifest and no DICOM calibration); "
               "HC, BPD and OFD are in pixels and no gestational age is given")
        log.warning(msg)
        return HeadMeasurement("ok", "px", hc_px, bpd_px, ofd_px, None,
                               GestationalAge(None, None, "pixel size unknown"), ellipse, None, [msg])
    hc = hc_px * ps
    return HeadMeasurement("ok", "mm", hc, bpd_px * ps, ofd_px * ps, ps, hadlock_ga(hc), ellipse, None, [])


def measure_mask(
    mask: np.ndarray,
    pixel_size_mm: float | None = None,
    *,
    axis_offset_px: float = 0.0,
    min_area_fraction: float = 0.001,
    min_dominance: float = 0.8,
    where: str = "image",
) -> HeadMeasurement:
    """Measure the head in a binary mask: largest region -> ellipse -> HC/BPD/OFD (-> GA).

    Parameters
    ----------
    mask : array (H, W)
        Head mask at the resolution of the original image.
    pixel_size_mm : float or None
        Millimetres per pixel; ``None`` reports pixels (with a warning).
    axis_offset_px : float, default 0
        Added to both semi-axes of the fitted ellipse before measuring (the
        calibrated mask-drawing convention of a trained segmenter).
    min_area_fraction, min_dominance : float
        The "no head found" rule of :func:`fit_head_ellipse`.
    where : str
        How messages name the image.

    Returns
    -------
    HeadMeasurement
        ``status == "no_head"`` (never an exception) when no head region qualifies.
    """
    pixel_size_mm = _check_pixel_size(pixel_size_mm, where)
    fit = fit_head_ellipse(mask, min_area_fraction=min_area_fraction, min_dominance=min_dominance)
    if not fit.found:
        return HeadMeasurement("no_head", "mm" if pixel_size_mm else "px", pixel_size_mm=pixel_size_mm,
                               ga=GestationalAge(None, None, fit.reason), fit=fit,
                               warnings=[f"{where}: {fit.reason}"])
    assert fit.ellipse is not None
    result = measure_ellipse(fit.ellipse.grown(axis_offset_px), pixel_size_mm, where)
    result.fit = fit
    if fit.touches_border:
        result.warnings.append(f"{where}: the head touches the image border; the ellipse is extrapolated")
    if fit.fit_iou < MIN_FIT_IOU:
        result.warnings.append(f"{where}: the head region is not elliptical (IoU with the fitted ellipse "
                               f"{fit.fit_iou:.2f}); check the overlay")
        result.status = "check"
        result.ga = GestationalAge(None, None, f"the head region is not elliptical (IoU {fit.fit_iou:.2f} with the "
                                   "fitted ellipse), so HC may be wrong: no GA given; check the overlay")
    if fit.n_components > 1:
        result.warnings.append(f"{where}: {fit.n_components - 1} small extra region(s) ignored")
    return result


def draw_overlay(image: np.ndarray, m: HeadMeasurement, *, color=(0, 255, 0)) -> np.ndarray:
    """The image (RGB uint8) with the fitted ellipse, the BPD / OFD axes and the values as text.

    The ellipse is green (orange for a ``check`` result, which also gets a red
    "CHECK" line and no GA), OFD (major axis) cyan, BPD (minor axis) yellow. When
    no head was found the reason is written instead.
    """
    import cv2

    if m.status == "check":
        color = (255, 140, 0)

    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=2)
    out = np.ascontiguousarray(image[..., :3].copy())
    h, w = out.shape[:2]
    scale = max(0.4, min(h, w) / 700.0)
    thick = max(1, int(round(2 * scale)))
    shift, f = 4, 16
    if m.found and m.ellipse is not None:
        e = m.ellipse
        cv2.ellipse(out, (int(round(e.cx * f)), int(round(e.cy * f))),
                    (int(round(e.semi_major * f)), int(round(e.semi_minor * f))),
                    e.angle_deg, 0, 360, color, thick, cv2.LINE_AA, shift)
        major, minor = e.axis_endpoints()
        for (p0, p1), col in ((major, (0, 255, 255)), (minor, (255, 255, 0))):
            cv2.line(out, (int(round(p0[0] * f)), int(round(p0[1] * f))),
                     (int(round(p1[0] * f)), int(round(p1[1] * f))), col, thick, cv2.LINE_AA, shift)
    _put_lines(out, overlay_lines(m), scale)
    return out


#: Colour (RGB) of the overlay lines that flag a doubtful result.
WARN_RGB = (255, 80, 80)


def overlay_lines(m: HeadMeasurement) -> list[tuple[str, tuple[int, int, int]]]:
    """The text lines of :func:`draw_overlay` with their colours (a ``check`` result leads with a red line)."""
    white = (255, 255, 255)
    if m.found:
        u = m.unit
        lines = []
        if m.status == "check":
            iou = f" (IoU {m.fit.fit_iou:.2f})" if m.fit is not None else ""
            lines.append((f"CHECK: head region not elliptical{iou}", WARN_RGB))
        lines += [(f"HC  {m.hc:.1f} {u}", white), (f"BPD {m.bpd:.1f} {u} (outer-outer)", white),
                  (f"OFD {m.ofd:.1f} {u}", white)]
        if m.status == "check":
            lines.append(("GA  not given: HC may be wrong", WARN_RGB))
        else:
            lines.append((f"GA  {m.ga.text()}", white) if u == "mm" else ("pixel size unknown: no mm, no GA", white))
    else:
        lines = [("no head found", WARN_RGB), ((m.fit.reason if m.fit else "")[:70], white)]
    lines.append(("supports, never replaces, the clinician", white))
    return lines


def _put_lines(out: np.ndarray, lines: Sequence[tuple[str, tuple[int, int, int]]], scale: float) -> None:
    import cv2

    font = cv2.FONT_HERSHEY_SIMPLEX
    fs = 0.55 * scale
    y = int(22 * scale)
    for text, colour in lines:
        if not text:
            continue
        (tw, th), base = cv2.getTextSize(text, font, fs, 1)
        cv2.rectangle(out, (4, y - th - 4), (10 + tw, y + base), (0, 0, 0), -1)
        cv2.putText(out, text, (7, y), font, fs, colour, 1, cv2.LINE_AA)
        y += th + base + 8


def save_overlay(path: str | Path, image: np.ndarray, m: HeadMeasurement) -> Path:
    """Write :func:`draw_overlay` as PNG atomically."""
    from PIL import Image

    from fetalscan.fileio import write_bytes

    buf = io.BytesIO()
    Image.fromarray(draw_overlay(image, m)).save(buf, format="PNG")
    return write_bytes(path, buf.getvalue())
