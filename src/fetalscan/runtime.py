"""Device choice and seeding, in one place."""

from __future__ import annotations

import os
import random

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
