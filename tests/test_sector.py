"""Scan-sector detection and burned-in text removal (fetalscan.data.sector).

Real scanner frames from pydicom-data (GE LOGIQ 700 RGB, ALOKA SSD-4000 palette colour)
and shared ultrasound images with names, IDs and dates rendered into a banner, side
panels and a label row: after masking no planted text remains (OCR with tesseract, and
template matching), and the pixels inside the sector are unchanged.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from fetalscan.data.sector import (
    SectorConfig,
    apply_mask,
    background_level,
    detect_sector,
    mask_clip,
    pixel_mask,
    regions_mask,
    ultrasound_regions,
)
from fetalscan.errors import DataError

PLANTED = {  # text burned in around the image -> the tokens OCR must (not) find
    "DOE^JANE": ("DOE", "JANE"),
    "ID 8812345": ("8812345",),
    "DOB 14/03/1985": ("1985",),
    "ST MARY HOSPITAL": ("MARY", "HOSPITAL"),
    "2026-11-30": ("2026",),
    "ACC 445566": ("445566",),
}


# ---------------------------------------------------------------------------- helpers

def _testdata(name: str) -> Path:
    pytest.importorskip("pydicom.data")
    from pydicom.data import get_testdata_file

    path = get_testdata_file(name)
    if path is None:
        pytest.skip(f"pydicom-data file {name} not available (pip install pydicom-data)")
    return Path(path)


def ocr_text(image: np.ndarray, tmp_path: Path) -> str:
    """Upper-case letters and digits tesseract reads in an RGB image (sparse text mode)."""
    import cv2

    if shutil.which("tesseract") is None:
        pytest.skip("tesseract not installed (Debian: apt-get install tesseract-ocr; `make system`)")
    path = tmp_path / f"ocr_{abs(hash(image.tobytes())) % 10**8}.png"
    big = cv2.resize(image, None, fx=2, fy=2, interpolation=cv2.INTER_CUBIC)  # small fonts read better enlarged
    cv2.imwrite(str(path), big[..., ::-1])
    out = subprocess.run(["tesseract", str(path), "stdout", "--psm", "11"], capture_output=True, text=True,
                         timeout=120, check=False)
    return re.sub(r"[^A-Z0-9]+", " ", out.stdout.upper())


def found_tokens(text: str, tokens) -> set[str]:
    squashed = text.replace(" ", "")
    return {t for t in tokens if t in squashed}


def render(text: str, scale: float = 0.7, thickness: int = 2) -> np.ndarray:
    """``text`` alone, white on black, as planted (a template)."""
    import cv2

    (w, h), base = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, scale, thickness)
    canvas = np.zeros((h + base + 6, w + 6, 3), np.uint8)
    cv2.putText(canvas, text, (3, h + 3), cv2.FONT_HERSHEY_SIMPLEX, scale, (255, 255, 255), thickness)
    return canvas


def best_match(image: np.ndarray, template: np.ndarray) -> float:
    """Best normalised correlation of ``template`` anywhere in ``image``."""
    import cv2

    res = cv2.matchTemplate(image.mean(2).astype(np.float32), template.mean(2).astype(np.float32),
                            cv2.TM_CCOEFF_NORMED)
    return float(np.nan_to_num(res).max())


FONT = {True: (0.7, 2), False: (0.5, 1)}  # (scale, thickness) in the banner / elsewhere


def plant(image: np.ndarray, banner: int = 70, panel: int = 130, footer: int = 50):
    """The image on a black scanner screen with identifiers in the banner, side panels and a footer.

    Returns the screen, the image's rectangle ``(y0, x0, y1, x1)`` in it, and the box
    ``(y0, x0, y1, x1)`` of each planted text.
    """
    import cv2

    h, w = image.shape[:2]
    screen = np.zeros((h + banner + footer, w + 2 * panel, 3), np.uint8)
    screen[banner:banner + h, panel:panel + w] = image
    spots = {"DOE^JANE": (10, 28), "ST MARY HOSPITAL": (w // 2 + panel // 2, 28), "DOB 14/03/1985": (10, 58),
             "ID 8812345": (4, banner + 60), "2026-11-30": (w + panel + 6, banner + 60),
             "ACC 445566": (panel + w // 3, banner + h + 36)}
    boxes = {}
    for text, (x, y) in spots.items():
        scale, thickness = FONT[y < banner]
        cv2.putText(screen, text, (x, y), cv2.FONT_HERSHEY_SIMPLEX, scale, (255, 255, 255), thickness)
        (tw, th), base = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, scale, thickness)
        boxes[text] = (max(0, y - th - 2), max(0, x - 2), y + base + 2, x + tw + 2)
    return screen, (banner, panel, banner + h, panel + w), boxes


def fan_image(seed: int = 0, h: int = 300, w: int = 400) -> np.ndarray:
    """A synthetic fan of speckle on black (no shared data needed)."""
    import cv2

    rng = np.random.default_rng(seed)
    speckle = np.clip(rng.gamma(2.0, 40.0, size=(h, w)), 30, 255).astype(np.uint8)
    mask = np.zeros((h, w), np.uint8)
    cv2.ellipse(mask, (w // 2, -h // 3), (int(1.25 * h), int(1.25 * h)), 90, -35, 35, 1, -1)
    img = (speckle * mask).astype(np.uint8)
    return np.repeat(img[..., None], 3, axis=2)


# ---------------------------------------------------------------------------- header regions (PS3.3 C.8.5.5)

def _item(fmt, x0, y0, x1, y1):
    from fetalscan.data.dicom import UltrasoundRegion

    return UltrasoundRegion(index=0, x0=x0, y0=y0, x1=x1, y1=y1, spatial_format=fmt, data_type=1,
                            units_x=3, units_y=3, delta_x=0.01, delta_y=0.01)


def test_regions_union_of_image_regions_inclusive_and_clipped():
    mask = regions_mask([_item(1, 2, 1, 4, 3), _item(0, 0, 0, 9, 9), _item(2, 8, 8, 20, 20)], (10, 10))
    assert mask[1:4, 2:5].all() and mask[8:, 8:].all()  # MaxX1/MaxY1 inclusive; clipped to the frame
    assert mask.sum() == 3 * 3 + 2 * 2  # the format-0 item (colour bar, no image) is left out


def test_regions_without_an_image_region_give_none():
    assert regions_mask([], (5, 5)) is None
    assert regions_mask([_item(5, 0, 0, 4, 4), _item(1, 4, 4, 2, 2)], (5, 5)) is None  # graphics; inverted box


def test_regions_only_source_without_regions_is_an_error():
    with pytest.raises(DataError, match="Ultrasound Regions"):
        detect_sector(fan_image(), None, SectorConfig(source="regions"))


def test_no_sector_in_a_black_frame_is_an_error():
    with pytest.raises(DataError, match="no scan sector"):
        detect_sector(np.zeros((100, 120, 3), np.uint8), where="black.png")


def test_bad_config_is_refused():
    with pytest.raises(DataError, match="source"):
        SectorConfig(source="magic")


# ---------------------------------------------------------------------------- pixels, synthetic

def test_synthetic_fan_text_removed_and_fan_kept():
    import cv2

    fan = fan_image(1)
    screen, (y0, x0, y1, x1), boxes = plant(fan)
    sector = detect_sector(screen)
    assert sector.source == "pixels (intensity)"
    masked = apply_mask(screen, sector.mask)
    inside = np.zeros(screen.shape[:2], bool)
    inside[y0:y1, x0:x1] = fan[..., 0] > 0
    assert sector.mask[inside].mean() > 0.995  # the fan is kept...
    assert np.array_equal(masked[sector.mask], screen[sector.mask])  # ...and unchanged
    for text in PLANTED:
        template = render(text, *FONT[text in ("DOE^JANE", "ST MARY HOSPITAL", "DOB 14/03/1985")])
        assert best_match(screen, template) > 0.8, f"control: {text} not found before masking"
        assert best_match(masked, template) < 0.5, f"{text} still there after masking"
        by, bx, ey, ex = boxes[text]
        assert masked[by:ey, bx:ex].max() == 0, f"{text}: its place is not blank"
    assert cv2.countNonZero(masked[:y0].max(2)) == 0  # the banner is blank


def test_background_level_of_a_lifted_grey_surround():
    fan = fan_image(2)
    lifted = np.clip(fan.astype(np.int16) + 45, 0, 255).astype(np.uint8)  # an export's brightness change
    assert abs(background_level(lifted[..., 0].astype(np.float32)) - 45) <= 2
    assert background_level(fan[..., 0].astype(np.float32)) <= 2
    sector = pixel_mask(lifted)
    assert sector is not None and 0.2 < sector.fraction < 0.9  # not the whole frame


def test_cine_one_mask_despite_a_ticking_clock():
    """Speckle decorrelates from frame to frame, burned-in text does not -- except a clock, which is small."""
    import cv2

    rng = np.random.default_rng(3)
    base = fan_image(3)
    frames = []
    for t in range(8):
        noise = rng.normal(1.0, 0.25, size=base.shape[:2])[..., None]
        frame = np.clip(base * noise, 0, 255).astype(np.uint8)
        screen, (y0, x0, y1, x1), boxes = plant(frame)
        cv2.putText(screen, f"10:42:{t:02d}", (x1 + 4, y0 + 120), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (255, 255, 255), 1)
        frames.append(screen)
    sector = detect_sector(frames)
    assert sector.source == "pixels (motion)"
    out = mask_clip(frames, None)
    assert len(out) == len(frames)
    for frame, masked in zip(frames, out):
        assert masked[:y0].max() == 0 and masked[:, x1 + 2:].max() == 0  # banner, clock panel blank
        assert np.array_equal(masked[sector.mask], frame[sector.mask])


# ---------------------------------------------------------------------------- real scanner frames (pydicom-data)

@pytest.mark.slow
def test_aloka_palette_frame_regions_blank_the_banner(tmp_path):
    """ALOKA SSD-4000: two image regions in the header; name and date in the top banner."""
    from fetalscan.data.dicom import read_dicom_frames

    path = _testdata("gdcm-US-ALOKA-16.dcm")
    frame = read_dicom_frames(path)[0]
    regions = ultrasound_regions(path)
    sector = detect_sector(frame, regions)
    assert sector.source == "regions"
    assert sector.mask[24:416, 32:640].all() and not sector.mask[:24].any() and not sector.mask[416:].any()
    masked = apply_mask(frame, sector.mask)
    assert np.array_equal(masked[sector.mask], frame[sector.mask])
    before, after = ocr_text(frame, tmp_path), ocr_text(masked, tmp_path)
    banner = ("WESTWAY", "MEDICAL", "MAY")
    assert found_tokens(before, banner), f"control: OCR read no banner text before masking: {before[:200]}"
    assert not found_tokens(after, banner), after


@pytest.mark.slow
def test_ge_rgb_frame_text_above_and_below_removed(tmp_path):
    """GE LOGIQ 700 (no region sequence): institution, codes and time above the image, a label below."""
    from fetalscan.data.dicom import read_dicom_frames

    path = _testdata("US1_UNCR.dcm")
    frame = read_dicom_frames(path)[0]
    assert regions_mask(ultrasound_regions(path), frame.shape[:2]) is None
    sector = detect_sector(frame, ultrasound_regions(path))
    assert sector.source.startswith("pixels")
    masked = apply_mask(frame, sector.mask)
    assert sector.mask[150:290, 90:545].all()  # the colour-Doppler boxes in the image
    assert np.array_equal(masked[sector.mask], frame[sector.mask])
    before, after = ocr_text(frame, tmp_path), ocr_text(masked, tmp_path)
    words = ("BAPTIST", "LYMPH", "NODE", "CINE")
    assert len(found_tokens(before, words)) >= 3, f"control: OCR read too little before masking: {before[:200]}"
    assert not found_tokens(after, words), after


# ---------------------------------------------------------------------------- shared images with planted text

SHARED_IMAGES = [
    ("fetal_brain", "normal/Patient00710_Plane3_1_of_6.jpg", None),
    ("fetal_brain", "mild_ventriculomegaly/mild-ventriculomegaly-18c.jpg", None),
    ("hc18", "images/005_HC.png", "masks/005_HC_mask.png"),
    ("hc18", "images/105_HC.png", "masks/105_HC_mask.png"),
]


@pytest.mark.slow
@pytest.mark.parametrize("dataset, rel, head", SHARED_IMAGES, ids=[r for _, r, _ in SHARED_IMAGES])
def test_planted_identifiers_removed_from_real_images(shared_data, tmp_path, dataset, rel, head):
    from fetalscan.data.records import read_image

    path = shared_data / dataset / rel
    if not path.is_file():
        pytest.skip(f"{path} not in this copy of the shared data")
    image = read_image(path)
    screen, (y0, x0, y1, x1), boxes = plant(image)
    sector = detect_sector(screen)
    masked = apply_mask(screen, sector.mask)
    # the anatomy is kept, unchanged: the head (HC18 reference mask), and the image's tissue pixels
    assert np.array_equal(masked[sector.mask], screen[sector.mask])
    tissue = np.zeros(screen.shape[:2], bool)
    tissue[y0:y1, x0:x1] = image.mean(2) > background_level(image.mean(2)) + 30
    assert sector.mask[tissue].mean() > 0.98
    if head is not None:
        from PIL import Image

        head_mask = np.zeros(screen.shape[:2], bool)
        head_mask[y0:y1, x0:x1] = np.asarray(Image.open(shared_data / dataset / head)) > 0
        assert sector.mask[head_mask].all(), "part of the fetal head was blanked"
    # and no planted text remains: OCR and template matching
    tokens = [t for v in PLANTED.values() for t in v]
    before, after = ocr_text(screen, tmp_path), ocr_text(masked, tmp_path)
    assert len(found_tokens(before, tokens)) >= 5, f"control: OCR read too little before masking: {before[:200]}"
    assert not found_tokens(after, tokens), f"planted text left after masking: {found_tokens(after, tokens)}"
    for text, (by, bx, ey, ex) in boxes.items():  # template matching: found where it was planted, then gone
        template = render(text, *FONT[by < y0])
        around = screen[max(0, by - 8):ey + 8, max(0, bx - 8):ex + 8]
        assert best_match(around, template) > 0.8, f"control: {text} not found"
        assert masked[by:ey, bx:ex].max() == 0, f"{text}: its place is not blank"


# ---------------------------------------------------------------------------- the data loaders (--sector-mask)

def test_loader_sector_mask_blanks_outside_and_keeps_inside(tmp_path):
    from conftest import write_png

    from fetalscan.data.records import iter_record_images, load_dataset

    screen, (y0, x0, y1, x1), boxes = plant(fan_image(4))
    write_png(tmp_path / "data" / "normal" / "a.png", screen)
    write_png(tmp_path / "data" / "other" / "b.png", plant(fan_image(5))[0])
    plain = load_dataset(tmp_path / "data")
    masked = load_dataset(tmp_path / "data", sector_mask=True)
    assert masked.loading["sector_mask"] is True and not plain.loading["sector_mask"]
    (_, raw), = [x for x in iter_record_images(plain.records[:1])]
    (_, out), = [x for x in iter_record_images(masked.records[:1])]
    assert np.array_equal(raw, screen)
    assert out[:y0].max() == 0 and out[y1 + 2:].max() == 0  # banner and label row blank
    keep = out > 0
    assert np.array_equal(out[keep], screen[keep])
