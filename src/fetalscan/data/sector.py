"""Find the ultrasound scan sector (fan or rectangle) in a frame and blank everything outside it.

Scanners burn the patient's name, ID, birth date, the institution, the date and time and
the acquisition settings into the pixels *around* the scan sector (the top banner, side
panels, a label row below the image). Blanking everything outside the sector removes
them while leaving the anatomy untouched -- the pixel part of the PS3.15 Annex E
Clean Pixel Data Option (E.3.1), used by ``fetalscan deid --mask-burned-in``; the same
mask is offered to the data loaders (``--sector-mask``) so that a model can be trained
and evaluated on the sector only.

Two sources, the first usable one wins (``SectorConfig.source="auto"``):

1. **The header.** The Sequence of Ultrasound Regions (0018,6011) of the US Region
   Calibration Module, DICOM PS3.3 C.8.5.5: each region is a rectangle
   ``RegionLocationMinX0/MinY0/MaxX1/MaxY1`` (inclusive pixel coordinates). The mask
   is the union of the regions that hold image data -- RegionSpatialFormat
   (C.8.5.5.1.1) 1 (2D), 2 (M-mode), 3 (spectral) or 4 (waveform); format 0 (none,
   e.g. a colour bar) and 5 (graphics) are left out.
2. **The pixels.** Over a cine (3 or more frames): the pixels whose grey level varies
   over time (speckle decorrelates, burned-in text does not); for a still image or a
   cine without motion: the pixels brighter than the background (near black, or the flat
   grey an export or augmentation lifted it to; :func:`background_level`) by ``threshold``
   grey levels (half that for a very dark image). Either map is
   smoothed, opened with a disc about 1.2 % of the image side (removes thin text strokes,
   scale ticks, callipers), and its large connected components (at least
   ``min_area_fraction`` of the frame and ``keep_fraction`` of the largest one; two
   side-by-side views both count) are replaced by their convex hulls -- a fan and a
   rectangle are convex, so dark fluid inside the sector is kept. One mask per clip:
   the frames are combined before the mask is made, so every frame of a cine is
   blanked alike.

A frame where neither source finds a sector raises :class:`~fetalscan.errors.DataError`
(nothing is blanked silently).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fetalscan.data.dicom import UltrasoundRegion
from fetalscan.errors import DataError

log = logging.getLogger(__name__)


#: RegionSpatialFormat values (PS3.3 C.8.5.5.1.1) whose region holds image data.
IMAGE_REGION_FORMATS = frozenset({1, 2, 3, 4})


SOURCES = ("auto", "regions", "pixels")


#: A hull filling at least this share of its bounding box is taken as a rectangular image (its box is kept).
RECTANGLE_FILL = 0.92


@dataclass(frozen=True)
class SectorConfig:
    """How the sector is found (defaults work on common scanner layouts).

    Attributes
    ----------
    source : {"auto", "regions", "pixels"}
        ``auto``: the Ultrasound Region Sequence when it describes an image region,
        else the pixels. ``regions``: the header only (error without one).
        ``pixels``: ignore the header.
    threshold : float
        Grey level (0-255, after smoothing) above which a pixel may belong to the sector.
    motion_threshold : float
        Temporal standard deviation (grey levels) above which a pixel of a cine is moving.
    opening_fraction : float
        Side of the opening disc as a share of the shorter image side (at least 5 px).
    min_area_fraction : float
        Smallest sector, as a share of the frame.
    keep_fraction : float
        Components at least this share of the largest are kept (multi-view layouts).
    margin_px : int
        The mask is grown by this many pixels so that the sector's edge is kept.
    max_frames : int
        At most this many frames of a cine (evenly spaced) are used to find the mask.
    """

    source: str = "auto"
    threshold: float = 12.0
    motion_threshold: float = 3.0
    opening_fraction: float = 0.012
    min_area_fraction: float = 0.05
    keep_fraction: float = 0.2
    margin_px: int = 2
    max_frames: int = 64

    def __post_init__(self) -> None:
        if self.source not in SOURCES:
            raise DataError(f"sector source must be one of {', '.join(SOURCES)}, got {self.source!r}")
        if not 0 < self.min_area_fraction < 1:
            raise DataError(f"min_area_fraction must be in (0, 1), got {self.min_area_fraction}")
        if self.max_frames < 1 or self.margin_px < 0:
            raise DataError("max_frames must be >= 1 and margin_px >= 0, "
                            f"got {self.max_frames} and {self.margin_px}")


@dataclass(frozen=True)
class Sector:
    """A scan-sector mask and where it came from.

    Attributes
    ----------
    mask : numpy.ndarray, shape (H, W), bool
        True inside the sector (kept), False outside (blanked).
    source : str
        ``"regions"`` (Ultrasound Region Sequence), ``"pixels (motion)"`` or
        ``"pixels (intensity)"``.
    """

    mask: np.ndarray
    source: str

    @property
    def fraction(self) -> float:
        """Share of the frame inside the sector."""
        return float(self.mask.mean())


def regions_mask(regions: Sequence[UltrasoundRegion] | None, shape: tuple[int, int]) -> np.ndarray | None:
    """Union of the image regions of a Sequence of Ultrasound Regions, or None.

    Parameters
    ----------
    regions : sequence of :class:`fetalscan.data.dicom.UltrasoundRegion`, optional
        The parsed items of (0018,6011), PS3.3 C.8.5.5
        (:func:`fetalscan.data.dicom.ultrasound_regions`).
    shape : (H, W)
        Frame size; rectangles are clipped to it.

    Returns
    -------
    numpy.ndarray of bool, or None
        None when no item is an image region (RegionSpatialFormat 1-4) with a valid,
        non-empty rectangle inside the frame.
    """
    h, w = shape
    mask = np.zeros((h, w), dtype=bool)
    for r in regions or ():
        if r.spatial_format not in IMAGE_REGION_FORMATS or None in (r.x0, r.y0, r.x1, r.y1):
            continue
        if r.x1 < r.x0 or r.y1 < r.y0:
            continue
        x0, y0, x1, y1 = max(r.x0, 0), max(r.y0, 0), min(r.x1, w - 1), min(r.y1, h - 1)
        if x1 >= x0 and y1 >= y0:
            mask[y0:y1 + 1, x0:x1 + 1] = True
    return mask if mask.any() else None


def pixel_mask(frames: Sequence[np.ndarray] | np.ndarray, cfg: SectorConfig = SectorConfig()) -> Sector | None:
    """The sector of a still image or a cine from its pixels; None when none is found.

    Parameters
    ----------
    frames : array (H, W) / (H, W, 3), or a sequence / array of them
        One frame or the frames of one clip (uint8, RGB or grey).
    """
    stack = _grey_stack(frames, cfg.max_frames)
    if len(stack) >= 3:
        moving = _smooth(stack.std(axis=0), cfg) > cfg.motion_threshold
        mask = _hull_of_components(moving, cfg)
        if mask is not None:
            return Sector(mask, "pixels (motion)")
    mean = stack.mean(axis=0)
    background = background_level(mean)
    for threshold in (cfg.threshold, cfg.threshold / 2):  # a very dark image: half the margin
        bright = mean > background + threshold  # not smoothed: text beside the sector must not merge with it
        mask = _hull_of_components(bright, cfg)
        if mask is not None:
            return Sector(mask, "pixels (intensity)")
    return None


def detect_sector(frames: Sequence[np.ndarray] | np.ndarray, regions: Sequence[UltrasoundRegion] | None = None,
                  cfg: SectorConfig = SectorConfig(), where: str = "image") -> Sector:
    """One sector mask for a frame or a clip: from ``regions`` when usable, else from the pixels.

    Parameters
    ----------
    frames : array or sequence of arrays
        The frame(s), see :func:`pixel_mask`.
    regions : sequence, optional
        The Sequence of Ultrasound Regions (0018,6011) of the file, if any.
    where : str
        Names the file in error messages.

    Raises
    ------
    DataError
        No sector found (``source="regions"`` without usable regions, or no large
        bright / moving area in the pixels).
    """
    shape = _frame_shape(frames)
    if cfg.source in ("auto", "regions"):
        mask = regions_mask(regions, shape)
        if mask is not None:
            return Sector(mask, "regions")
        if cfg.source == "regions":
            raise DataError(f"{where}: no image region in the Sequence of Ultrasound Regions (0018,6011) "
                            "(PS3.3 C.8.5.5); use source 'auto' or 'pixels'")
    sector = pixel_mask(frames, cfg)
    if sector is None:
        raise DataError(f"{where}: no scan sector found in the pixels (no bright or moving area of at least "
                        f"{cfg.min_area_fraction:.0%} of the frame); nothing was blanked")
    return sector


def apply_mask(image: np.ndarray, mask: np.ndarray, fill: int | Sequence[int] = 0) -> np.ndarray:
    """A copy of ``image`` (H, W[, C]) or a clip (N, H, W[, C]) with every pixel outside ``mask`` set to ``fill``.

    Pixels inside the mask are returned unchanged (same values, same dtype).
    """
    out = np.array(image, copy=True)
    hw = mask.shape
    if out.shape[:2] == hw:
        out[~mask] = fill
    elif out.ndim >= 3 and out.shape[1:3] == hw:
        out[:, ~mask] = fill
    else:
        raise DataError(f"mask of shape {hw} does not fit an image of shape {out.shape}")
    return out


def ultrasound_regions(path: str | Path) -> list[UltrasoundRegion]:
    """The Sequence of Ultrasound Regions of a DICOM file (empty when absent or unreadable as DICOM)."""
    from fetalscan.data.dicom import read_ultrasound_regions

    try:
        return read_ultrasound_regions(path)
    except Exception:  # noqa: BLE001 - no header means "no regions": the pixels decide
        return []


def mask_clip(frames: Sequence[np.ndarray], regions: Sequence[UltrasoundRegion] | None = None,
              cfg: SectorConfig = SectorConfig(), where: str = "image") -> list[np.ndarray]:
    """The frames of one clip, each blanked outside the clip's one sector mask (black)."""
    if not len(frames):
        return []
    sector = detect_sector(frames, regions, cfg, where)
    return [apply_mask(f, sector.mask) for f in frames]


def background_level(grey: np.ndarray, band: float = 0.03, share: float = 0.2) -> float:
    """Grey level of a flat background around the sector (0 when there is none).

    Exports and augmentations often lift the black surround to a flat grey. The most
    common level (+-2) of the outermost ``band`` of the frame is taken as the background
    when it holds at least ``share`` of that band's pixels; otherwise the band is tissue
    or text, and 0 is returned.
    """
    h, w = grey.shape
    t = max(1, int(round(band * min(h, w))))
    ring = np.concatenate([grey[:t].ravel(), grey[-t:].ravel(), grey[t:-t, :t].ravel(), grey[t:-t, -t:].ravel()])
    counts = np.bincount(np.clip(np.rint(ring), 0, 255).astype(np.int64), minlength=256)
    window = np.convolve(counts, np.ones(5), mode="same")
    mode = int(np.argmax(window))
    return float(mode) if window[mode] >= share * ring.size else 0.0


def _is_one_frame(frames: Any) -> bool:
    return isinstance(frames, np.ndarray) and (frames.ndim == 2 or (frames.ndim == 3 and frames.shape[-1] in (3, 4)))


def _frame_shape(frames: Sequence[np.ndarray] | np.ndarray) -> tuple[int, int]:
    if _is_one_frame(frames):
        return int(frames.shape[0]), int(frames.shape[1])
    if not len(frames):
        raise DataError("no frame to find a sector in")
    first = np.asarray(frames[0])
    return int(first.shape[0]), int(first.shape[1])


def _grey_stack(frames: Sequence[np.ndarray] | np.ndarray, max_frames: int) -> np.ndarray:
    """(N, H, W) float32 grey levels of at most ``max_frames`` evenly spaced frames."""
    if _is_one_frame(frames):
        frames = [frames]
    if not len(frames):
        raise DataError("no frame to find a sector in")
    n = len(frames)
    pick = np.unique(np.linspace(0, n - 1, min(n, max_frames)).round().astype(int))
    out = []
    for i in pick:
        f = np.asarray(frames[i])
        grey = f[..., :3].astype(np.float32).mean(axis=-1) if f.ndim == 3 else f.astype(np.float32)
        out.append(grey)
    shapes = {g.shape for g in out}
    if len(shapes) != 1:
        raise DataError(f"the frames of one clip differ in size: {sorted(shapes)}")
    return np.stack(out)


def _kernel_side(shape: tuple[int, ...], cfg: SectorConfig) -> int:
    """Odd side (>= 5 px) of the smoothing window and opening disc."""
    return max(5, int(round(cfg.opening_fraction * min(shape[-2:])))) | 1


def _smooth(grey: np.ndarray, cfg: SectorConfig) -> np.ndarray:
    import cv2

    k = _kernel_side(grey.shape, cfg)
    return cv2.blur(grey.astype(np.float32), (k, k))


def _hull_of_components(binary: np.ndarray, cfg: SectorConfig) -> np.ndarray | None:
    """Convex hull of the large connected components of ``binary`` after an opening; None if none."""
    import cv2

    h, w = binary.shape
    side = _kernel_side(binary.shape, cfg)
    disc = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (side, side))
    opened = cv2.morphologyEx(binary.astype(np.uint8), cv2.MORPH_OPEN, disc)
    n, labels, stats, _ = cv2.connectedComponentsWithStats(opened, connectivity=8)
    if n <= 1:
        return None
    areas = stats[1:, cv2.CC_STAT_AREA]
    largest = int(areas.max())
    if largest < cfg.min_area_fraction * h * w:
        return None
    keep = np.flatnonzero(areas >= cfg.keep_fraction * largest) + 1
    points = cv2.findNonZero(np.isin(labels, keep).astype(np.uint8))
    mask = np.zeros((h, w), dtype=np.uint8)
    hull = cv2.convexHull(points)
    x, y, bw, bh = cv2.boundingRect(hull)
    if cv2.contourArea(hull) >= RECTANGLE_FILL * bw * bh:  # a rectangular image with dark corners: its rectangle
        mask[y:y + bh, x:x + bw] = 1
    else:
        cv2.fillConvexPoly(mask, hull, 1)  # one hull: a fan split by dark fluid stays whole
    if cfg.margin_px:
        grow = 2 * cfg.margin_px + 1
        mask = cv2.dilate(mask, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (grow, grow)))
    return mask.astype(bool)
