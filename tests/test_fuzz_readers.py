"""Fuzzing the readers: any input ends in a result or a FetalscanError, never another exception.

Hypothesis feeds the image, DICOM, video and manifest readers random bytes behind real
headers and valid small files with bytes flipped, inserted or cut off. ``derandomize=True``
makes every run try the same examples (a failure is reproducible); the number of examples
per reader is in ``EXAMPLES``. Also: the explicit pixel limit of ``read_image`` refuses
decompression bombs from the header, before decoding.
"""

from __future__ import annotations

import io
import os
import tempfile
from pathlib import Path

import numpy as np
import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from fetalscan.errors import FetalscanError  # noqa: E402

# corrupt input makes pydicom and Pillow warn before they fail or recover: expected here
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

EXAMPLES = {"image": 500, "dicom": 500, "video": 150, "manifest": 300}


def _settings(reader: str):
    return settings(max_examples=EXAMPLES[reader], deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


# ---------------------------------------------------------------------------- seeds: small valid files

def _picture(seed: int = 0, size: int = 24) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 255, size=(size, size + 8, 3), dtype=np.uint8)


def _encoded(fmt: str) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    img = Image.fromarray(_picture())
    if fmt == "PNG16":
        Image.fromarray((_picture()[..., 0].astype(np.uint16) * 257)).save(buf, format="PNG")
    else:
        (img.convert("P") if fmt == "GIF" else img).save(buf, format=fmt)
    return buf.getvalue()


IMAGE_SEEDS = {".png": _encoded("PNG"), ".jpg": _encoded("JPEG"), ".bmp": _encoded("BMP"),
               ".gif": _encoded("GIF"), ".tif": _encoded("TIFF"), ".webp": _encoded("WEBP")}
IMAGE_SEEDS_16 = _encoded("PNG16")


def _dicom_bytes(photometric: str = "MONOCHROME2", frames: int = 1) -> bytes:
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID, ds.SOPInstanceUID = "1.2.840.10008.5.1.4.1.1.6.1", generate_uid(entropy_srcs=["fuzz"])
    ds.StudyInstanceUID = generate_uid(entropy_srcs=["fuzz-study"])
    ds.Modality = "US"
    pic = _picture(1, 16)
    arr = pic if photometric == "RGB" else pic[..., 0]
    if frames > 1:
        arr = np.stack([arr] * frames)
    ds.set_pixel_data(arr, photometric, 8, generate_instance_uid=False)
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def _video_bytes() -> bytes:
    import cv2

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "clip.avi")
        writer = cv2.VideoWriter(path, cv2.VideoWriter_fourcc(*"MJPG"), 10, (32, 24))
        for i in range(4):
            writer.write(_picture(i, 24)[:, :32, ::-1].copy())
        writer.release()
        return Path(path).read_bytes()


# ---------------------------------------------------------------------------- mutations

@st.composite
def mutated(draw, seed: bytes, keep_header: int = 0) -> bytes:
    """``seed`` with some bytes overwritten, inserted or deleted, or cut short (its first ``keep_header`` kept)."""
    data = bytearray(seed)
    for _ in range(draw(st.integers(1, 8))):
        kind = draw(st.sampled_from(["flip", "insert", "delete", "truncate", "splice"]))
        if len(data) <= keep_header + 1:
            break
        at = draw(st.integers(keep_header, len(data) - 1))
        if kind == "flip":
            data[at] = draw(st.integers(0, 255))
        elif kind == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=64))
        elif kind == "delete":
            del data[at:at + draw(st.integers(1, 64))]
        elif kind == "truncate":
            del data[at:]
        else:  # a run of 0xFF / 0x00 / a big number: lengths and sizes gone wrong
            data[at:at + 4] = draw(st.sampled_from([b"\xff\xff\xff\xff", b"\x00\x00\x00\x00", b"\x7f\xff\xff\xff"]))
    return bytes(data)


def _random_with_header(headers: list[bytes]):
    return st.builds(lambda h, b: h + b, st.sampled_from(headers), st.binary(max_size=512))


def _write(data: bytes, suffix: str) -> Path:
    fd, name = tempfile.mkstemp(suffix=suffix)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
    return Path(name)


def _check(fn, path: Path):
    """Run a reader: a result, or a FetalscanError naming the file; anything else fails the test."""
    try:
        return fn(path)
    except FetalscanError as exc:
        assert str(exc).strip(), "an empty error message"
        return None
    finally:
        path.unlink(missing_ok=True)


# ---------------------------------------------------------------------------- the readers

_IMAGE_HEADERS = [b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff\xe0", b"GIF89a", b"BM", b"II*\x00", b"MM\x00*",
                  b"RIFF\x00\x00\x00\x00WEBPVP8 "]


@pytest.mark.slow
@_settings("image")
@given(st.one_of(
    st.sampled_from(sorted(IMAGE_SEEDS)).flatmap(lambda ext: st.tuples(st.just(ext), mutated(IMAGE_SEEDS[ext]))),
    st.tuples(st.just(".png"), mutated(IMAGE_SEEDS_16)),
    st.tuples(st.sampled_from(sorted(IMAGE_SEEDS)), _random_with_header(_IMAGE_HEADERS)),
))
def test_fuzz_image_reader(case):
    from fetalscan.data.records import read_image

    ext, data = case
    image = _check(read_image, _write(data, ext))
    if image is not None:
        assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3


@pytest.mark.slow
@_settings("dicom")
@given(st.one_of(
    mutated(_dicom_bytes("MONOCHROME2"), keep_header=132),
    mutated(_dicom_bytes("RGB", frames=3), keep_header=132),
    mutated(_dicom_bytes("MONOCHROME2")),
    _random_with_header([b"\x00" * 128 + b"DICM"]),
))
def test_fuzz_dicom_reader(data):
    from fetalscan.data.dicom import read_dicom_frames, read_dicom_info

    def read(path: Path):
        info = read_dicom_info(path)
        frames = read_dicom_frames(path)
        assert len(frames) == info.n_frames
        assert all(f.dtype == np.uint8 and f.shape == (info.rows, info.columns, 3) for f in frames)
        return frames

    _check(read, _write(data, ".dcm"))


@_settings("video")
@given(mutated(_video_bytes(), keep_header=12))
def test_fuzz_video_reader(data):
    from fetalscan.data.video import read_video_frames, read_video_info

    def read(path: Path):
        info = read_video_info(path)
        frames = read_video_frames(path, list(range(info.n_frames)))
        assert all(f.dtype == np.uint8 and f.ndim == 3 for f in frames)
        return frames

    _check(read, _write(data, ".avi"))


_CELLS = st.one_of(st.text(max_size=12), st.sampled_from(["", " ", "a.png", "../a.png", "/etc/passwd", "x" * 300,
                                                           "nan", "1e309", "-1", "\x00", "\"", "a,b"]))


@st.composite
def manifests(draw) -> bytes:
    columns = draw(st.lists(st.sampled_from(["path", "label", "group", "ga_weeks", "pixel_spacing_mm", "center",
                                             "extra", "", "path"]), max_size=7))
    rows = draw(st.lists(st.lists(_CELLS, min_size=0, max_size=len(columns) + 2), max_size=6))
    text = "\n".join([",".join(columns)] + [",".join(r) for r in rows])
    data = text.encode("utf-8", "surrogatepass")
    if draw(st.booleans()):
        data = draw(mutated(data)) if data else data
    return draw(st.sampled_from([b"", b"\xef\xbb\xbf"])) + data


@pytest.mark.slow
@_settings("manifest")
@given(manifests())
def test_fuzz_manifest_reader(data):
    from fetalscan.data.records import load_dataset

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "a.png").write_bytes(IMAGE_SEEDS[".png"])
        path = root / "manifest.csv"
        path.write_bytes(data)
        for require_labels in (True, False):
            try:
                dataset = load_dataset(path, require_labels=require_labels)
            except FetalscanError as exc:
                assert str(exc).strip()
                continue
            assert len(dataset) >= 1 and all(r.path.is_file() for r in dataset.records)


# ---------------------------------------------------------------------------- the pixel limit

def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width`` x ``height`` (a decompression bomb needs no more to be refused)."""
    import struct
    import zlib

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


@pytest.mark.parametrize("width, height", [(30000, 30000), (8000, 7000)])
def test_decompression_bomb_refused_from_the_header(tmp_path, width, height):
    from fetalscan.data.records import read_image
    from fetalscan.errors import ImageReadError

    path = tmp_path / "bomb.png"
    path.write_bytes(_png_header_only(width, height))
    with pytest.raises(ImageReadError, match=r"bomb\.png: refused, .*the limit of 50,000,000"):
        read_image(path)


def test_pixel_limit_is_configurable(tmp_path, monkeypatch):
    from conftest import write_png

    from fetalscan.data.records import read_image
    from fetalscan.errors import DataError, ImageReadError

    path = write_png(tmp_path / "small.png", _picture(3, 40))
    assert read_image(path).shape == (40, 48, 3)
    with pytest.raises(ImageReadError, match="limit of 1,000"):
        read_image(path, max_pixels=1000)
    monkeypatch.setenv("FETALSCAN_MAX_IMAGE_PIXELS", "1000")
    with pytest.raises(ImageReadError, match="FETALSCAN_MAX_IMAGE_PIXELS"):
        read_image(path)
    monkeypatch.setenv("FETALSCAN_MAX_IMAGE_PIXELS", "lots")
    with pytest.raises(DataError, match="positive whole number"):
        read_image(path)
