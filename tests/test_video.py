"""Behaviour of the video reader: every clip is written here with cv2.VideoWriter."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from fetalscan.data.dicom import frame_indices
from fetalscan.data.video import (
    VIDEO_EXTENSIONS,
    VideoInfo,
    is_video,
    read_video_frames,
    read_video_info,
)
from fetalscan.errors import ImageReadError

# One solid colour per frame, RGB; distinct enough to survive lossy codecs.
RGB_COLOURS = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255), (0, 0, 0), (255, 255, 0)]
WIDTH, HEIGHT, FPS = 64, 48, 10.0
CODECS = [("MJPG", ".avi"), ("mp4v", ".mp4"), ("mp4v", ".mkv")]  # .mkv: count by decoding


def write_video(path: Path, fourcc: str = "MJPG", colours=RGB_COLOURS) -> Path:
    """A clip of solid-colour frames; skip the test if this OpenCV cannot encode it."""
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*fourcc), FPS, (WIDTH, HEIGHT))
    if not writer.isOpened():
        pytest.skip(f"OpenCV build cannot write {fourcc} into {path.suffix}")
    for rgb in colours:
        writer.write(np.full((HEIGHT, WIDTH, 3), rgb[::-1], np.uint8))  # cv2 wants BGR
    writer.release()
    return path


def assert_colour(frame: np.ndarray, rgb: tuple[int, int, int], tol: int = 40) -> None:
    assert frame.dtype == np.uint8 and frame.shape == (HEIGHT, WIDTH, 3)
    mean = frame.reshape(-1, 3).mean(axis=0)
    assert np.abs(mean - np.array(rgb)).max() <= tol, (mean, rgb)


@pytest.fixture(params=CODECS, ids=[ext for _, ext in CODECS])
def clip(request, tmp_path) -> Path:
    fourcc, ext = request.param
    return write_video(tmp_path / f"clip{ext}", fourcc)


def test_is_video_by_extension_any_case():
    assert is_video(Path("scan.MP4")) and is_video("a/b.avi")
    assert all(is_video(f"x{ext}") for ext in VIDEO_EXTENSIONS)
    assert not is_video("image.png") and not is_video("IM0001")


def test_info_counts_frames_and_reads_fps_and_size(clip):
    info = read_video_info(clip)
    assert isinstance(info, VideoInfo)
    assert (info.path, info.n_frames, info.width, info.height) == (clip, 6, WIDTH, HEIGHT)
    assert info.fps == pytest.approx(FPS)


def test_all_frames_are_rgb_in_order(clip):
    frames = read_video_frames(clip)
    assert len(frames) == 6
    for frame, rgb in zip(frames, RGB_COLOURS):
        assert_colour(frame, rgb)  # a red frame reads as red: BGR was converted


def test_every_nth_selection_and_requested_order(clip):
    wanted = frame_indices(read_video_info(clip).n_frames, every_nth=2)
    assert wanted == [0, 2, 4]
    for frame, i in zip(read_video_frames(clip, wanted), wanted):
        assert_colour(frame, RGB_COLOURS[i])
    got = read_video_frames(clip, [5, 1, 5])
    for frame, i in zip(got, [5, 1, 5]):
        assert_colour(frame, RGB_COLOURS[i])
    assert read_video_frames(clip, []) == []


@pytest.mark.parametrize("index", [6, -1])
def test_frame_out_of_range_names_file_and_frame(tmp_path, index):
    path = write_video(tmp_path / "clip.avi")
    with pytest.raises(ImageReadError, match=rf"clip\.avi: frame {index} is out of range"):
        read_video_frames(path, [0, index])


def test_truncated_video_counts_only_decodable_frames(tmp_path):
    path = write_video(tmp_path / "cut.avi", colours=RGB_COLOURS * 4)
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * 0.9)])  # header still says 24 frames
    try:
        info = read_video_info(path)
    except ImageReadError:
        return  # this OpenCV refuses the cut file outright: also acceptable
    assert 0 < info.n_frames < 24
    assert len(read_video_frames(path)) == info.n_frames
    with pytest.raises(ImageReadError, match="cut.avi"):
        read_video_frames(path, [info.n_frames])


@pytest.mark.parametrize(
    "content", [b"", b"not a video at all" * 50], ids=["empty", "garbage"]
)
@pytest.mark.parametrize("reader", [read_video_info, read_video_frames])
def test_empty_or_corrupt_file_raises(tmp_path, content, reader):
    path = tmp_path / "broken.mp4"
    path.write_bytes(content)
    with pytest.raises(ImageReadError, match="broken.mp4"):
        reader(path)


def test_missing_file_raises(tmp_path):
    with pytest.raises(ImageReadError, match="nope.avi.*does not exist"):
        read_video_info(tmp_path / "nope.avi")
