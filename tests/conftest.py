"""Shared fixtures: where the real data live, and tiny images made on the fly.

Tests that need ``../shared`` (the real public ultrasound data beside the
repository) use the ``shared_data`` fixture and are skipped, with the reason,
when it is absent. Everything else runs on images the tests make.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("FETALSCAN_SHARED", REPO.parent / "shared"))
EXAMPLES = REPO / "examples" / "fetal_brain_sample" / "manifest.csv"

os.environ.setdefault("OMP_NUM_THREADS", "2")


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """``../shared/data``; skips the test when it is not there."""
    path = SHARED / "data"
    if not (path / "fetal_brain" / "manifest.csv").is_file():
        pytest.skip(f"real data not found at {path} (set FETALSCAN_SHARED or put ../shared beside the repo)")
    return path


@pytest.fixture(scope="session")
def fetal_brain(shared_data: Path) -> Path:
    """The shared fetal-brain manifest."""
    return shared_data / "fetal_brain" / "manifest.csv"


@pytest.fixture(scope="session")
def sononet_examples() -> Path:
    """The 13 SonoNet example plane images."""
    path = SHARED / "models" / "sononet" / "example_images"
    if not path.is_dir():
        pytest.skip(f"SonoNet example images not found at {path}")
    return path


@pytest.fixture(scope="session")
def example_manifest() -> Path:
    """The embedded real sample shipped in the repository (always present)."""
    assert EXAMPLES.is_file(), f"embedded sample missing: {EXAMPLES}"
    return EXAMPLES


def write_png(path: Path, array: np.ndarray) -> Path:
    """Save a uint8 array (H, W) or (H, W, 3) as PNG."""
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path


def blob_image(seed: int, size: int = 64, bright: bool = False) -> np.ndarray:
    """A small RGB test picture: a seed-specific smooth background, noise, and a disc whose
    brightness encodes the class (distinct seeds give perceptual hashes far apart)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 90, size=(4, 4), dtype=np.uint8)  # smooth, seed-specific background
    smooth = np.asarray(Image.fromarray(coarse).resize((size, size), Image.BICUBIC), dtype=np.int16)
    img = np.clip(smooth + rng.integers(0, 20, size=(size, size)), 0, 255).astype(np.uint8)
    yy, xx = np.mgrid[:size, :size]
    cy, cx = rng.integers(size // 4, 3 * size // 4, size=2)
    disc = (yy - cy) ** 2 + (xx - cx) ** 2 < (size // 5) ** 2
    img[disc] = 230 if bright else 110
    return np.repeat(img[..., None], 3, axis=2)


def write_manifest(path: Path, rows: Sequence[dict], columns: Sequence[str] | None = None) -> Path:
    """Write a manifest CSV (columns default to the first row's keys)."""
    columns = list(columns or rows[0].keys())
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=columns, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow(r)
    return path


@pytest.fixture
def toy_manifest(tmp_path: Path) -> Callable[..., Path]:
    """Factory: a manifest of tiny two-class images, ``groups`` per class, ``per_group`` images each."""

    def make(groups: int = 6, per_group: int = 2, classes: Sequence[str] = ("abnormal", "normal")) -> Path:
        rows = []
        k = 0
        for ci, c in enumerate(classes):
            for g in range(groups):
                for i in range(per_group):
                    rel = f"{c}/{c}_{g}_{i}.png"
                    write_png(tmp_path / "toy" / rel, blob_image(k, bright=ci == 0))
                    rows.append({"path": rel, "label": c, "group": f"{c}_{g}"})
                    k += 1
        return write_manifest(tmp_path / "toy" / "manifest.csv", rows)

    return make


@pytest.fixture(scope="session")
def tiny_classifier(tmp_path_factory) -> Path:
    """A classifier checkpoint trained on 24 two-class blob images (6 groups per class), for the
    service, report and stream tests: real weights, seconds to make, no shared data needed."""
    from fetalscan.api import Classifier

    root = tmp_path_factory.mktemp("tiny_classifier")
    rows, k = [], 0
    for ci, c in enumerate(("abnormal", "normal")):
        for g in range(6):
            for i in range(2):
                rel = f"{c}/{c}_{g}_{i}.png"
                write_png(root / rel, blob_image(k, bright=ci == 0))
                rows.append({"path": rel, "label": c, "group": f"{c}_{g}"})
                k += 1
    manifest = write_manifest(root / "manifest.csv", rows)
    Classifier(head_epochs=20, seed=0, device="cpu").fit(manifest).save(root / "model.pt")
    return root / "model.pt"


@pytest.fixture(scope="module")
def chromium() -> str:
    """Debian's Chromium for the Playwright tests; the test is skipped, saying why, when there is none."""
    from live_service import chromium_path

    path = chromium_path()
    if path is None:
        pytest.skip("Chromium is not installed (make system installs Debian's chromium)")
    return path
