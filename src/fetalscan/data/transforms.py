"""Image preprocessing (shared by training, prediction and explanation) and
ultrasound-appropriate augmentation.

Preprocessing has two steps so that images can be decoded and resized once and
cached as ``uint8``:

1. :func:`prepare` — RGB ``uint8 (H, W, 3)`` -> ``uint8 (C, h, w)`` at the
   network's input size (antialiased bilinear resize; grey = mean of RGB, as
   SonoNet's reference code does).
2. :func:`normalize` — a ``uint8``/float batch -> the float tensor the network
   expects (ImageNet mean/std, or SonoNet's per-image standardisation x 255).

:class:`Augment` works on the prepared batch before normalisation. Its
transforms are the ones that keep an ultrasound image plausible: small
rotations, scaling and shifts (probe position), left-right flip (the fetus lies
either way), gain / contrast / gamma changes (time-gain compensation and dynamic
range settings), multiplicative speckle-like noise and slight blur. No vertical
flip (the probe is at the top) and no colour jitter (grey-scale modality).
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F

from fetalscan.errors import CheckpointError, DataError

log = logging.getLogger(__name__)


def prepare(image: np.ndarray, pre: Preprocessing) -> torch.Tensor:
    """Resize an RGB uint8 image to ``pre.input_size`` and set its channels; uint8 (C, h, w)."""
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise DataError(f"expected an RGB uint8 (H, W, 3) image, got {image.dtype} {image.shape}")
    x = torch.from_numpy(np.array(image, copy=True)).permute(2, 0, 1).float()[None]
    h, w = pre.input_size
    if x.shape[-2:] != (h, w):
        x = F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False, antialias=True)
    if pre.channels == 1:
        x = x.mean(dim=1, keepdim=True)
    return x[0].round_().clamp_(0, 255).to(torch.uint8)


def normalize(batch: torch.Tensor, pre: Preprocessing) -> torch.Tensor:
    """Turn a prepared (B, C, h, w) batch (uint8 or float in 0-255) into network input."""
    x = batch.float()
    if pre.normalization == "imagenet":
        mean = torch.tensor(pre.mean, device=x.device).view(1, -1, 1, 1) * 255.0
        std = torch.tensor(pre.std, device=x.device).view(1, -1, 1, 1) * 255.0
        return (x - mean) / std
    if pre.normalization == "per_image":
        flat = x.flatten(1)
        mu = flat.mean(1).view(-1, 1, 1, 1)
        sd = flat.std(1, unbiased=False).view(-1, 1, 1, 1).clamp_min(1e-6)
        return pre.scale * (x - mu) / sd
    raise CheckpointError(f"unknown normalization {pre.normalization!r} in the preprocessing block; "
                          "expected one this fetalscan version writes")


@dataclass(frozen=True)
class AugmentConfig:
    """Strength of each augmentation (0 switches it off)."""

    rotate_deg: float = 10.0
    scale: float = 0.10  # zoom in [1 - s, 1 + s]
    translate: float = 0.05  # fraction of the image size
    hflip: float = 0.5  # probability
    gain: float = 0.20  # brightness factor in [1 - g, 1 + g]
    contrast: float = 0.20
    gamma: float = 0.20  # gamma in [1 / (1 + g), 1 + g]
    speckle: float = 0.08  # std of multiplicative noise
    blur: float = 0.2  # probability of a 3x3 Gaussian blur

    def to_dict(self) -> dict:
        return asdict(self)


class Augment:
    """Random ultrasound augmentation on a prepared batch (float, 0-255), seeded."""

    def __init__(self, cfg: AugmentConfig | None = None, seed: int = 0) -> None:
        self.cfg = cfg or AugmentConfig()
        self.gen = torch.Generator().manual_seed(seed)

    def _u(self, n: int, lo: float, hi: float) -> torch.Tensor:
        return lo + (hi - lo) * torch.rand(n, generator=self.gen)

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        c = self.cfg
        x = batch.float()
        n = x.shape[0]
        x = self._affine(x, n)
        if c.gain or c.contrast:
            gain = self._u(n, 1 - c.gain, 1 + c.gain).view(-1, 1, 1, 1)
            con = self._u(n, 1 - c.contrast, 1 + c.contrast).view(-1, 1, 1, 1)
            mean = x.mean(dim=(1, 2, 3), keepdim=True)
            x = ((x - mean) * con + mean) * gain
        if c.gamma:
            g = torch.exp(self._u(n, -np.log1p(c.gamma), np.log1p(c.gamma))).view(-1, 1, 1, 1)
            x = 255.0 * (x.clamp(0, 255) / 255.0) ** g
        if c.speckle:
            noise = torch.randn(x.shape, generator=self.gen) * c.speckle
            x = x * (1.0 + noise)
        if c.blur:
            pick = torch.rand(n, generator=self.gen) < c.blur
            if pick.any():
                x[pick] = _blur3(x[pick])
        return x.clamp_(0, 255)

    def _affine(self, x: torch.Tensor, n: int) -> torch.Tensor:
        c = self.cfg
        angle = torch.deg2rad(self._u(n, -c.rotate_deg, c.rotate_deg))
        zoom = self._u(n, 1 - c.scale, 1 + c.scale)
        tx, ty = self._u(n, -c.translate, c.translate) * 2, self._u(n, -c.translate, c.translate) * 2
        flip = torch.where(torch.rand(n, generator=self.gen) < c.hflip, -1.0, 1.0)
        cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
        theta = torch.stack([
            torch.stack([cos * flip, -sin, tx], dim=1),
            torch.stack([sin * flip, cos, ty], dim=1),
        ], dim=1)
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def _blur3(x: torch.Tensor) -> torch.Tensor:
    k = torch.tensor([1.0, 2.0, 1.0])
    k = (k[:, None] * k[None, :]) / 16.0
    ch = x.shape[1]
    weight = k.view(1, 1, 3, 3).repeat(ch, 1, 1, 1)
    return F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), weight, groups=ch)


IMAGENET_MEAN = (0.485, 0.456, 0.406)


IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Preprocessing:
    """How an RGB uint8 image becomes the network input; saved in every checkpoint.

    ``normalization`` is ``"imagenet"`` (divide by 255, subtract ``mean``, divide by
    ``std`` per channel) or ``"per_image"`` (SonoNet: ``scale * (x - mean(x)) / std(x)``
    per image, on the 0-255 grey values).
    """

    input_size: tuple[int, int] = (224, 224)  # (height, width)
    channels: int = 3
    normalization: str = "imagenet"
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    scale: float = 1.0

    def to_dict(self) -> dict:
        d = asdict(self)
        d["input_size"] = list(self.input_size)
        d["mean"] = list(self.mean)
        d["std"] = list(self.std)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> Preprocessing:
        try:
            return cls(
                input_size=tuple(int(v) for v in d["input_size"]),  # type: ignore[arg-type]
                channels=int(d["channels"]),
                normalization=str(d["normalization"]),
                mean=tuple(float(v) for v in d["mean"]),
                std=tuple(float(v) for v in d["std"]),
                scale=float(d.get("scale", 1.0)),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(f"preprocessing block is malformed ({exc!r}): {d}") from exc
