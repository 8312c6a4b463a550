"""Behaviour of the DICOM reader: every file is built here, from real or synthetic pixels."""

from __future__ import annotations

import io
import logging
from pathlib import Path

import numpy as np
import pytest
from conftest import SHARED
from dicom_builders import base_dataset, write_dicom
from PIL import Image
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate
from pydicom.pixels import get_decoder
from pydicom.uid import (
    JPEGBaseline8Bit,
    JPEGLSLossless,
)

from fetalscan.data.dicom import (
    DicomInfo,
    frame_indices,
    is_dicom,
    read_dicom_frames,
    read_dicom_info,
)
from fetalscan.errors import FetalscanError, ImageReadError

SHARED_DATA = SHARED / "data"  # honours FETALSCAN_SHARED, like every other test (tests/conftest.py)
HC18_IMAGE = SHARED_DATA / "hc18" / "images" / "000_HC.png"
BRAIN_DIR = SHARED_DATA / "fetal_brain" / "normal"

# Solid colours that must survive a YBR round trip (RGB).
COLOURS = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (128, 128, 128), (224, 172, 105), (0, 0, 0)]


# ------------------------------------------------------------------------- builders

def colour_blocks(height: int = 8, block: int = 4) -> np.ndarray:
    """A (height, block*len(COLOURS), 3) uint8 RGB strip of solid colour blocks."""
    return np.concatenate(
        [np.full((height, block, 3), c, np.uint8) for c in COLOURS], axis=1
    )


def gradient(rows: int = 6, cols: int = 10, dtype=np.uint8) -> np.ndarray:
    return (np.arange(rows * cols).reshape(rows, cols) * 4).astype(dtype)


def need(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"shared data not available: {path} (present in CI)")
    return path


# ---------------------------------------------------------------- detection & info


def test_is_dicom_by_magic_even_without_extension(tmp_path):
    path = write_dicom(tmp_path / "IM0001", gradient())
    png = tmp_path / "image.png"
    Image.fromarray(gradient()).save(png)
    assert is_dicom(path)
    assert not is_dicom(png)
    assert not is_dicom(tmp_path / "missing.dcm")
    assert not is_dicom(tmp_path)


def test_info_reads_header_fields(tmp_path):
    frames = np.stack([gradient()] * 4)
    path = write_dicom(tmp_path / "cine.dcm", frames, FrameTime="33.3")
    info = read_dicom_info(path)
    assert isinstance(info, DicomInfo)
    assert (info.path, info.n_frames, info.rows, info.columns) == (path, 4, 6, 10)
    assert info.photometric == "MONOCHROME2"
    assert info.study_uid == "1.2.826.0.1.3680043.8.498.1"
    assert info.patient_id == "PAT-001"
    assert info.frame_time_ms == pytest.approx(33.3)
    assert info.pixel_spacing_mm is None
    assert info.bits_allocated == 8


def test_frame_time_falls_back_to_cine_rate(tmp_path):
    path = write_dicom(tmp_path / "a.dcm", np.stack([gradient()] * 2), CineRate=25)
    assert read_dicom_info(path).frame_time_ms == pytest.approx(40.0)


def test_missing_study_uid_is_none(tmp_path):
    path = write_dicom(tmp_path / "a.dcm", gradient())
    ds = dcmread(path)
    del ds.StudyInstanceUID
    ds.save_as(path, enforce_file_format=True)
    assert read_dicom_info(path).study_uid is None


# -------------------------------------------------------------------- pixel spacing


def _region(units_x=3, delta_x=0.01, fmt=1, units_y=3, delta_y=None) -> Dataset:
    region = Dataset()
    region.RegionSpatialFormat = fmt
    region.PhysicalUnitsXDirection = units_x
    region.PhysicalUnitsYDirection = units_y
    region.PhysicalDeltaX = delta_x
    region.PhysicalDeltaY = delta_x if delta_y is None else delta_y
    return region


def test_spacing_from_us_region_cm_to_mm(tmp_path):
    path = write_dicom(tmp_path / "a.dcm", gradient(),
                       SequenceOfUltrasoundRegions=[_region(delta_x=0.0123)],
                       PixelSpacing=[0.5, 0.5])
    assert read_dicom_info(path).pixel_spacing_mm == pytest.approx(0.123)


def test_spacing_prefers_2d_region(tmp_path):
    regions = [_region(delta_x=0.05, fmt=3), _region(delta_x=0.02, fmt=1)]
    path = write_dicom(tmp_path / "a.dcm", gradient(), SequenceOfUltrasoundRegions=regions)
    assert read_dicom_info(path).pixel_spacing_mm == pytest.approx(0.2)


def test_spacing_skips_regions_not_in_cm(tmp_path):
    regions = [_region(units_x=0, delta_x=1.0), _region(delta_x=0.03, fmt=2)]
    path = write_dicom(tmp_path / "a.dcm", gradient(), SequenceOfUltrasoundRegions=regions)
    assert read_dicom_info(path).pixel_spacing_mm == pytest.approx(0.3)


def test_anisotropic_region_returns_x_and_warns(tmp_path, caplog):
    region = _region(delta_x=0.01, delta_y=0.02)
    path = write_dicom(tmp_path / "a.dcm", gradient(), SequenceOfUltrasoundRegions=[region])
    with caplog.at_level(logging.WARNING, logger="fetalscan.dicom"):
        assert read_dicom_info(path).pixel_spacing_mm == pytest.approx(0.1)
    assert "a.dcm: ultrasound region has anisotropic pixels" in caplog.text


def test_spacing_falls_back_to_pixel_spacing_then_imager(tmp_path):
    no_cm = [_region(units_x=0, delta_x=1.0)]
    a = write_dicom(tmp_path / "a.dcm", gradient(), SequenceOfUltrasoundRegions=no_cm,
                    PixelSpacing=[0.25, 0.3])
    b = write_dicom(tmp_path / "b.dcm", gradient(), ImagerPixelSpacing=[0.4, 0.4])
    c = write_dicom(tmp_path / "c.dcm", gradient(), PixelSpacing=[0, 0])
    assert read_dicom_info(a).pixel_spacing_mm == pytest.approx(0.25)
    assert read_dicom_info(b).pixel_spacing_mm == pytest.approx(0.4)
    assert read_dicom_info(c).pixel_spacing_mm is None


# --------------------------------------------------------------------- grayscale


def test_monochrome2_8bit_is_exact_and_replicated(tmp_path):
    gray = gradient()
    (frame,) = read_dicom_frames(write_dicom(tmp_path / "a.dcm", gray))
    assert frame.dtype == np.uint8 and frame.shape == (6, 10, 3)
    for channel in range(3):
        np.testing.assert_array_equal(frame[..., channel], gray)


def test_real_ultrasound_grayscale_round_trip(tmp_path):
    gray = np.asarray(Image.open(need(HC18_IMAGE)).convert("L"))
    (frame,) = read_dicom_frames(write_dicom(tmp_path / "hc.dcm", gray))
    assert frame.shape == (*gray.shape, 3)
    np.testing.assert_array_equal(frame[..., 1], gray)


def test_monochrome1_is_inverted(tmp_path):
    gray = gradient()
    (frame,) = read_dicom_frames(write_dicom(tmp_path / "a.dcm", gray, "MONOCHROME1"))
    np.testing.assert_array_equal(frame[..., 0], 255 - gray)


def test_16bit_without_window_is_min_max_scaled(tmp_path):
    gray = np.linspace(1000, 3000, 60).reshape(6, 10).astype(np.uint16)
    (frame,) = read_dicom_frames(write_dicom(tmp_path / "a.dcm", gray))
    assert frame[0, 0, 0] == 0 and frame[-1, -1, 0] == 255
    assert np.all(np.diff(frame[..., 0].ravel().astype(int)) >= 0)  # order kept


def test_16bit_window_is_applied(tmp_path):
    gray = np.array([[0, 900, 1000, 1100, 4000]], dtype=np.uint16)
    path = write_dicom(tmp_path / "a.dcm", gray, WindowCenter=1000, WindowWidth=200)
    (frame,) = read_dicom_frames(path)
    values = frame[0, :, 0]
    assert values[0] == 0 and values[1] < 5
    assert abs(int(values[2]) - 128) <= 2
    assert values[3] > 250 and values[4] == 255


def test_16bit_monochrome1_window_then_invert(tmp_path):
    gray = np.array([[0, 4000]], dtype=np.uint16)
    path = write_dicom(tmp_path / "a.dcm", gray, "MONOCHROME1",
                       WindowCenter=2000, WindowWidth=1000)
    (frame,) = read_dicom_frames(path)
    assert frame[0, 0, 0] == 255 and frame[0, 1, 0] == 0


# ------------------------------------------------------------------------- colour


@pytest.mark.parametrize("planar", [0, 1])
def test_rgb_planar_configurations(tmp_path, planar):
    rgb = colour_blocks()
    (frame,) = read_dicom_frames(write_dicom(tmp_path / "a.dcm", rgb, "RGB", planar=planar))
    np.testing.assert_array_equal(frame, rgb)


@pytest.mark.parametrize("photometric", ["YBR_FULL", "YBR_FULL_422"])
def test_ybr_comes_back_as_rgb(tmp_path, photometric):
    rgb = colour_blocks()
    path = write_dicom(tmp_path / "a.dcm", rgb, photometric)
    assert read_dicom_info(path).photometric == photometric
    (frame,) = read_dicom_frames(path)
    assert frame.shape == rgb.shape
    assert np.abs(frame.astype(int) - rgb).max() <= 2  # rounding only, no JPEG
    assert tuple(frame[0, 0]) == pytest.approx((255, 0, 0), abs=2)  # red stays red


@pytest.mark.parametrize("photometric", ["RGB", "YBR_FULL"])
def test_real_colour_ultrasound_round_trip(tmp_path, photometric):
    images = sorted(BRAIN_DIR.glob("*.jpg")) if BRAIN_DIR.is_dir() else []
    if not images:
        pytest.skip(f"shared data not available: {BRAIN_DIR}/*.jpg (present in CI)")
    rgb = np.asarray(Image.open(images[0]).convert("RGB"))
    (frame,) = read_dicom_frames(write_dicom(tmp_path / "b.dcm", rgb, photometric, planar=1))
    assert frame.shape == rgb.shape
    assert np.abs(frame.astype(int) - rgb).max() <= 2


def write_jpeg_dicom(path: Path, rgb: np.ndarray) -> Path:
    """A JPEG baseline (YBR_FULL_422) DICOM, encoded by Pillow."""
    if not get_decoder(JPEGBaseline8Bit).is_available:
        pytest.skip("no JPEG baseline decoder (Pillow plugin) available")
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="JPEG", quality=100, subsampling=1)
    ds = base_dataset(path, *rgb.shape[:2], "YBR_FULL_422", 8, transfer_syntax=JPEGBaseline8Bit)
    ds.SamplesPerPixel, ds.PlanarConfiguration = 3, 0
    ds.PixelData = encapsulate([buf.getvalue()])
    ds["PixelData"].VR = "OB"
    ds.save_as(path, enforce_file_format=True)
    return path


@pytest.fixture(params=[True, False], ids=["pydicom-converts", "pydicom-leaves-ybr"])
def pydicom_converts_ybr(request, monkeypatch):
    """Run a test with pydicom converting YBR itself (its default) and without."""
    if not request.param:
        import pydicom.pixels

        real = pydicom.pixels.as_pixel_options
        monkeypatch.setattr(pydicom.pixels, "as_pixel_options",
                            lambda ds, **kw: real(ds, **{**kw, "as_rgb": False}))
    return request.param


@pytest.mark.parametrize("photometric", ["YBR_FULL", "YBR_FULL_422"])
def test_ybr_converted_exactly_once(tmp_path, photometric, pydicom_converts_ybr):
    rgb = colour_blocks()
    (frame,) = read_dicom_frames(write_dicom(tmp_path / "a.dcm", rgb, photometric))
    assert np.abs(frame.astype(int) - rgb).max() <= 2


def test_jpeg_baseline_ybr_converted_exactly_once(tmp_path, pydicom_converts_ybr):
    """pydicom 3 returns JPEG YBR as RGB while the header still says YBR_FULL_422."""
    rgb = colour_blocks(height=16, block=16)
    (frame,) = read_dicom_frames(write_jpeg_dicom(tmp_path / "jpeg.dcm", rgb))
    centres = frame[8, 8::16].astype(int)  # centre of each colour block
    assert np.abs(centres - np.array(COLOURS)).max() <= 8


def test_palette_color(tmp_path):
    lut = {"Red": [65535, 0, 0, 32896], "Green": [0, 65535, 0, 32896], "Blue": [0, 0, 65535, 0]}
    index = np.array([[0, 1, 2, 3]], dtype=np.uint8)
    elements = {}
    for name, values in lut.items():
        elements[f"{name}PaletteColorLookupTableDescriptor"] = [4, 0, 16]
        elements[f"{name}PaletteColorLookupTableData"] = np.array(values, "<u2").tobytes()
    path = write_dicom(tmp_path / "a.dcm", index, "PALETTE COLOR", **elements)
    (frame,) = read_dicom_frames(path)
    np.testing.assert_array_equal(
        frame[0], [[255, 0, 0], [0, 255, 0], [0, 0, 255], [128, 128, 0]]
    )


# -------------------------------------------------------------------------- frames


def cine(tmp_path: Path, n: int = 6) -> tuple[Path, np.ndarray]:
    frames = np.stack([np.full((4, 6), 10 * i + 5, np.uint8) for i in range(n)])
    frames[:, 0, 0] = 255  # a marker that must stay in the top-left corner
    return write_dicom(tmp_path / "cine.dcm", frames, FrameTime=40), frames


def test_multiframe_every_nth_returns_the_right_frames(tmp_path):
    path, _ = cine(tmp_path)
    info = read_dicom_info(path)
    assert info.n_frames == 6
    wanted = frame_indices(info.n_frames, every_nth=2)
    assert wanted == [0, 2, 4]
    got = read_dicom_frames(path, wanted)
    assert [f[1, 1, 0] for f in got] == [5, 25, 45]
    assert all(f[0, 0, 0] == 255 and f.shape == (4, 6, 3) for f in got)


def test_all_frames_and_requested_order(tmp_path):
    path, _ = cine(tmp_path)
    assert len(read_dicom_frames(path)) == 6
    got = read_dicom_frames(path, [5, 0, 5])
    assert [f[2, 2, 0] for f in got] == [55, 5, 55]
    assert read_dicom_frames(path, []) == []


def test_single_frame_file_with_number_of_frames_one(tmp_path):
    path = write_dicom(tmp_path / "a.dcm", gradient()[None], multiframe=True)
    assert read_dicom_info(path).n_frames == 1
    assert len(read_dicom_frames(path)) == 1


@pytest.mark.parametrize("index", [6, -1])
def test_frame_index_out_of_range(tmp_path, index):
    path, _ = cine(tmp_path)
    with pytest.raises(ImageReadError, match=rf"cine\.dcm.*frame {index}.*6 frame"):
        read_dicom_frames(path, [0, index])


def test_frame_indices_validates_every_nth():
    assert frame_indices(7, 3) == [0, 3, 6]
    assert frame_indices(1, 5) == [0]
    assert frame_indices(0) == []
    with pytest.raises(FetalscanError, match="every_nth"):
        frame_indices(5, 0)
    with pytest.raises(FetalscanError, match="every_nth"):
        frame_indices(5, 1.5)


# -------------------------------------------------------------------------- errors


def test_truncated_file_names_the_file(tmp_path):
    path = write_dicom(tmp_path / "cut.dcm", gradient(40, 40))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 500])
    with pytest.raises(ImageReadError, match="cut.dcm"):
        read_dicom_frames(path)
    path.write_bytes(data[:200])  # cut inside the header
    with pytest.raises(ImageReadError, match="cut.dcm"):
        read_dicom_info(path)


def test_not_dicom_and_missing_file(tmp_path):
    png = tmp_path / "image.png"
    Image.fromarray(gradient()).save(png)
    with pytest.raises(ImageReadError, match="image.png.*not a DICOM"):
        read_dicom_info(png)
    with pytest.raises(ImageReadError, match="nope.dcm.*does not exist"):
        read_dicom_frames(tmp_path / "nope.dcm")


def test_missing_pixel_data(tmp_path):
    path = write_dicom(tmp_path / "a.dcm", gradient())
    ds = dcmread(path)
    del ds.PixelData
    ds.save_as(path, enforce_file_format=True)
    with pytest.raises(ImageReadError, match="a.dcm.*no pixel data"):
        read_dicom_frames(path)


def test_undecodable_transfer_syntax_says_what_to_install(tmp_path):
    path = tmp_path / "jls.dcm"
    ds = base_dataset(path, 4, 4, "MONOCHROME2", 8, transfer_syntax=JPEGLSLossless)
    ds.PixelData = encapsulate([b"\xff\xd8not really jpeg-ls\xff\xd9"])
    ds["PixelData"].VR = "OB"
    ds.save_as(path, enforce_file_format=True)
    pattern = "jls.dcm.*JPEG-LS" if get_decoder(JPEGLSLossless).is_available \
        else "jls.dcm.*JPEG-LS.*pylibjpeg.*gdcm"
    with pytest.raises(ImageReadError, match=pattern):
        read_dicom_frames(path)


def test_a_dicom_frame_above_the_pixel_limit_is_refused_before_decoding(tmp_path, monkeypatch):
    """A header claiming more pixels than the limit is refused naming the file (a decompression bomb)."""
    from fetalscan.data.dicom import read_dicom_frames
    from fetalscan.errors import ImageReadError

    path = tmp_path / "big.dcm"
    write_dicom(path, np.zeros((64, 80), dtype=np.uint8))
    monkeypatch.setenv("FETALSCAN_MAX_IMAGE_PIXELS", str(64 * 80 - 1))
    with pytest.raises(ImageReadError, match=r"big\.dcm: refused, each frame of 80 x 64 = 5,120 pixels"):
        read_dicom_frames(path)
    monkeypatch.setenv("FETALSCAN_MAX_IMAGE_PIXELS", str(64 * 80))
    assert read_dicom_frames(path)[0].shape == (64, 80, 3)


def test_jpeg_syntax_with_data_that_is_not_jpeg_is_one_error_and_nothing_logged(tmp_path, caplog):
    """pydicom's plugins log their own failures; the user gets one line naming the file, no log noise."""
    from fetalscan.data.dicom import read_dicom_frames
    from fetalscan.errors import ImageReadError

    path = tmp_path / "fake_jpeg.dcm"
    ds = base_dataset(path, 64, 64, "MONOCHROME2", 8, transfer_syntax=JPEGBaseline8Bit)
    ds.PixelData = encapsulate([b"this is not a JPEG stream" * 10])
    ds["PixelData"].VR = "OB"
    ds.save_as(path, enforce_file_format=False)
    caplog.set_level(logging.DEBUG)
    with pytest.raises(ImageReadError) as info:
        read_dicom_frames(path)
    message = str(info.value)
    assert message.startswith(f"{path}: cannot decode frame 0 (JPEG Baseline") and "\n" not in message
    assert not [r for r in caplog.records if r.name.startswith("pydicom") and r.levelno >= logging.WARNING]
