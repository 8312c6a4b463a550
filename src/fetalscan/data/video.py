"""Read ultrasound video clips as RGB uint8 frames, through OpenCV.

Every frame handed to the rest of the pipeline is a ``numpy.uint8`` array of
shape ``(H, W, 3)`` in RGB order (OpenCV decodes to BGR; it is converted here).
Frames are decoded sequentially, once, and only the requested ones are kept in
memory. ``cv2`` is imported lazily so that importing this module is instant.
"""

from __future__ import annotations

import contextlib
import logging
import math
import operator
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fetalscan.errors import ImageReadError

logger = logging.getLogger(__name__)


VIDEO_EXTENSIONS = (".mp4", ".avi", ".mov", ".mkv", ".m4v", ".wmv", ".mpg", ".mpeg")


# Containers whose frame count OpenCV only estimates (from duration x fps); their
# frames are always counted by decoding. Other counts are checked at the end.
_ESTIMATED_COUNT = (".mkv", ".wmv", ".mpg", ".mpeg")


@dataclass(frozen=True)
class VideoInfo:
    """What one video file holds.

    Attributes
    ----------
    path : Path
        The file.
    n_frames : int
        Number of decodable frames (counted by decoding when the container's
        count is missing or unreliable).
    fps : float or None
        Frames per second from the container; None when absent or invalid.
    width, height : int
        Frame size in pixels.
    """

    path: Path
    n_frames: int
    fps: float | None
    width: int
    height: int


def is_video(path: str | Path) -> bool:
    """Whether ``path`` has a video extension (:data:`VIDEO_EXTENSIONS`, any case).

    The file is not opened.
    """
    return Path(path).suffix.lower() in VIDEO_EXTENSIONS


def read_video_info(path: str | Path) -> VideoInfo:
    """Frame count, frame rate and frame size of a video.

    The first frame is decoded to check the file is readable and to get its
    size. The container's frame count is used when it is present and verified
    (the last frame exists, nothing after it); otherwise frames are counted by
    decoding them all.

    Raises
    ------
    ImageReadError
        The file is missing, OpenCV cannot open it, or it has no decodable frame.
    """
    path = Path(path)
    with _open(path) as cap:
        first = _read_first(path, cap)
        height, width = first.shape[:2]
        fps = _fps(cap)
        n_frames = _frame_count(path, cap)
    return VideoInfo(path=path, n_frames=n_frames, fps=fps, width=width, height=height)


def read_video_frames(
    path: str | Path, indices: Sequence[int] | None = None
) -> list[np.ndarray]:
    """Decode frames of a video as RGB ``uint8`` arrays of shape ``(H, W, 3)``.

    Parameters
    ----------
    path : str or Path
        A video file OpenCV can open.
    indices : sequence of int, optional
        0-based frames to return, in the order given (duplicates allowed).
        ``None`` returns every frame.

    Returns
    -------
    list of numpy.ndarray
        One ``(H, W, 3)`` uint8 RGB array per requested index.

    Notes
    -----
    The video is decoded once from the start up to the last requested frame;
    frames in between are skipped without colour conversion and not kept.

    Raises
    ------
    ImageReadError
        The file is missing, cannot be opened, has no decodable frame, or a
        requested frame is negative or beyond the last decodable frame.
    """
    path = Path(path)
    if indices is None:
        with _open(path) as cap:
            frames = [_to_rgb(f) for f in _iter_bgr(cap)]
        if not frames:
            raise ImageReadError(f"{path}: video has no decodable frame")
        return frames
    wanted = [operator.index(i) for i in indices]
    if not wanted:
        return []
    negative = [i for i in wanted if i < 0]
    if negative:
        raise ImageReadError(f"{path}: frame {negative[0]} is out of range (negative index)")
    kept = _read_selected(path, set(wanted))
    return [kept[i] for i in wanted]


@contextlib.contextmanager
def _open(path: Path) -> Iterator[Any]:
    """A ``cv2.VideoCapture`` on ``path``, released on exit; ImageReadError if unusable."""
    import cv2

    if not path.is_file():
        what = "is not a file" if path.exists() else "does not exist"
        raise ImageReadError(f"{path}: video file {what}")
    if path.stat().st_size == 0:
        raise ImageReadError(f"{path}: video file is empty (0 bytes)")
    cap = cv2.VideoCapture(str(path))
    try:
        if not cap.isOpened():
            raise ImageReadError(
                f"{path}: OpenCV cannot open this video; the file may be corrupt, "
                "truncated or use a codec this OpenCV build lacks"
            )
        yield cap
    finally:
        cap.release()


def _read_first(path: Path, cap: Any) -> np.ndarray:
    ok, frame = cap.read()
    if not ok or frame is None:
        raise ImageReadError(f"{path}: video has no decodable frame (empty or corrupt)")
    return frame


def _fps(cap: Any) -> float | None:
    import cv2

    fps = float(cap.get(cv2.CAP_PROP_FPS))
    return fps if math.isfinite(fps) and fps > 0 else None


def _frame_count(path: Path, cap: Any) -> int:
    """Frames in the video; ``cap`` must be positioned after the first frame."""
    import cv2

    claimed = int(cap.get(cv2.CAP_PROP_FRAME_COUNT))
    if claimed > 0 and path.suffix.lower() not in _ESTIMATED_COUNT:
        if _count_is_exact(cap, claimed):
            return claimed
        logger.warning("%s: container says %d frames but that count does not check out; "
                       "counting by decoding", path, claimed)
    cap.set(cv2.CAP_PROP_POS_FRAMES, 0)
    return sum(1 for _ in iter(cap.grab, False))


def _count_is_exact(cap: Any, claimed: int) -> bool:
    """Whether frame ``claimed - 1`` decodes and no frame follows it."""
    import cv2

    if claimed > 1 and not cap.set(cv2.CAP_PROP_POS_FRAMES, claimed - 1):
        return False
    if claimed > 1 and not cap.grab():
        return False
    return not cap.grab()


def _iter_bgr(cap: Any) -> Iterator[np.ndarray]:
    while True:
        ok, frame = cap.read()
        if not ok or frame is None:
            return
        yield frame


def _read_selected(path: Path, wanted: set[int]) -> dict[int, np.ndarray]:
    """Decode from the start up to ``max(wanted)``, keeping only ``wanted`` frames (RGB)."""
    kept: dict[int, np.ndarray] = {}
    with _open(path) as cap:
        for index in range(max(wanted) + 1):
            if index in wanted:
                ok, frame = cap.read()
                ok = ok and frame is not None
            else:
                ok = cap.grab()
            if not ok:
                raise ImageReadError(_ended_early(path, index, wanted))
            if index in wanted:
                kept[index] = _to_rgb(frame)
    return kept


def _ended_early(path: Path, n_read: int, wanted: set[int]) -> str:
    """The message for a video that stopped after ``n_read`` frames."""
    if n_read == 0:
        return f"{path}: video has no decodable frame (empty or corrupt)"
    missing = min(i for i in wanted if i >= n_read)
    return (
        f"{path}: frame {missing} is out of range; the video ends (or stops decoding) "
        f"after {n_read} frame(s), valid indices are 0..{n_read - 1}"
    )


def _to_rgb(frame: np.ndarray) -> np.ndarray:
    """An OpenCV frame (BGR, BGRA or gray) -> contiguous ``(H, W, 3)`` uint8 RGB."""
    import cv2

    if frame.ndim == 2 or frame.shape[-1] == 1:
        return cv2.cvtColor(frame, cv2.COLOR_GRAY2RGB)
    if frame.shape[-1] == 4:
        return cv2.cvtColor(frame, cv2.COLOR_BGRA2RGB)
    return cv2.cvtColor(frame, cv2.COLOR_BGR2RGB)
