"""Device choice, seeding and thread control, in one place."""

from __future__ import annotations

import contextlib
import os
import random
from collections.abc import Iterator

import numpy as np
import torch

from fetalscan.errors import FetalscanError


def resolve_device(spec: str = "auto") -> torch.device:
    """``auto`` -> CUDA when available else CPU; ``cuda`` without a GPU is an error."""
    spec = (spec or "auto").lower()
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if spec.startswith("cuda") and not torch.cuda.is_available():
        raise FetalscanError(f"device {spec}: CUDA is not available on this machine; use device 'cpu'")
    try:
        return torch.device(spec)
    except RuntimeError as exc:
        raise FetalscanError(f"device {spec!r} is not a valid device: {exc}") from None


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch, and ask torch for deterministic kernels."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True, warn_only=True)
    if torch.backends.cudnn.is_available():
        torch.backends.cudnn.benchmark = False


@contextlib.contextmanager
def single_thread() -> Iterator[None]:
    """Run tiny computations (head fits, small eigen-problems) on one intra-op thread (restored afterwards).

    On a busy 2-core machine a 300-epoch head fit on ~100 embeddings took 4-10 s with
    two threads and 0.1 s with one: the per-op threading overhead dwarfs the work.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)
