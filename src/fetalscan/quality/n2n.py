"""A small self-supervised despeckling network: Neighbor2Neighbor on a decorrelated sub-grid.

Neighbor2Neighbor (Huang T, Li S, Jia X, Lu H, Liu J. *Neighbor2Neighbor: self-supervised
denoising from single noisy images.* CVPR 2021) trains a denoiser ``f`` from noisy images alone:
two sub-images ``g1, g2`` are drawn from each image by picking, in every 2 x 2 cell, one pixel for
``g1`` and a different, adjacent one for ``g2``; ``f(g1)`` is trained towards ``g2`` (whose noise is
independent of ``g1``'s), with a regulariser for the small misalignment between them:

``L = |f(g1) - g2|^2 + gamma |f(g1) - g2 - (s1(f(y)) - s2(f(y)))|^2``  (``f(y)`` without gradient).

Ultrasound speckle is spatially correlated, so adjacent pixels do **not** carry independent
noise. Here the image is first split into its ``stride``-polyphase components
``y[a::stride, b::stride]``, with ``stride`` at least the speckle correlation length
(:func:`fetalscan.quality.despeckle.speckle_correlation_length`), and Neighbor2Neighbor runs on
a component: paired pixels lie ``stride`` original pixels apart. At inference every component is
denoised the same way and the components are interleaved back, so the network always sees the
statistics it was trained on. ``g1`` and ``g2`` never share a pixel (tested by gradients).
"""

from __future__ import annotations

import io
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from fetalscan.errors import DataError


@dataclass
class N2NConfig:
    """Training settings of :func:`train_n2n`."""

    stride: int = 3
    channels: int = 16
    layers: int = 3
    steps: int = 1500
    batch_size: int = 16
    lr: float = 1e-3
    gamma: float = 2.0
    seed: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


def build_n2n(channels: int = 16, layers: int = 3):
    """A small residual CNN: conv-ReLU x (layers + 1), conv; output = input - predicted noise."""
    import torch
    from torch import nn

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            mods: list = [nn.Conv2d(1, channels, 3, padding=1), nn.ReLU(inplace=True)]
            for _ in range(layers):
                mods += [nn.Conv2d(channels, channels, 3, padding=1), nn.ReLU(inplace=True)]
            mods += [nn.Conv2d(channels, 1, 3, padding=1)]
            self.body = nn.Sequential(*mods)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x - self.body(x)

    return Net()


def neighbour_masks(n: int, h: int, w: int, generator=None):
    """Random Neighbor2Neighbor choices for ``(n, 1, h, w)`` images: flat indices (into each 2x2
    cell's 4 positions) of the ``g1`` and ``g2`` pixels, adjacent (not diagonal) and distinct."""
    import torch

    hh, ww = h // 2, w // 2
    # positions in a cell: 0 (0,0) 1 (0,1) 2 (1,0) 3 (1,1); adjacent pairs (no diagonals)
    pairs = torch.tensor([[0, 1], [0, 2], [1, 0], [1, 3], [2, 0], [2, 3], [3, 1], [3, 2]])
    k = torch.randint(0, len(pairs), (n, hh, ww), generator=generator)
    return pairs[k, 0], pairs[k, 1]


def subsample(y, idx):
    """Pick one pixel per 2x2 cell of ``y`` (n, 1, h, w) by ``idx`` (n, h//2, w//2) -> (n, 1, h//2, w//2)."""
    n, c, h, w = y.shape
    hh, ww = h // 2, w // 2
    cells = y[:, :, : 2 * hh, : 2 * ww].reshape(n, c, hh, 2, ww, 2).permute(0, 1, 2, 4, 3, 5).reshape(n, c, hh, ww, 4)
    return cells.gather(-1, idx[:, None, :, :, None].expand(n, c, hh, ww, 1))[..., 0]


def polyphase(x, stride: int):
    """All ``stride**2`` components ``x[..., a::stride, b::stride]`` of (n, 1, H, W), cropped to a
    common size (H // stride, W // stride), stacked on the batch axis (component-major)."""
    import torch

    h, w = x.shape[-2] // stride, x.shape[-1] // stride
    comps = [x[..., a::stride, b::stride][..., :h, :w] for a in range(stride) for b in range(stride)]
    return torch.cat(comps, dim=0)


def unpolyphase(comps, n: int, stride: int, shape: tuple[int, int]):
    """Inverse of :func:`polyphase` on the cropped area; pixels beyond it are taken from ``fill``."""
    import torch

    h, w = comps.shape[-2:]
    out = torch.zeros((n, comps.shape[1], shape[0], shape[1]), dtype=comps.dtype)
    k = 0
    for a in range(stride):
        for b in range(stride):
            out[..., a: a + stride * h: stride, b: b + stride * w: stride] = comps[k * n:(k + 1) * n]
            k += 1
    return out


def n2n_loss(model, y, stride: int, gamma: float = 2.0, generator=None):
    """The Neighbor2Neighbor loss on a random polyphase component (``stride``) of each image of ``y``."""
    import torch

    n = y.shape[0]
    a, b = (int(v) for v in torch.randint(0, stride, (2,), generator=generator))
    g = y[..., a::stride, b::stride]
    i1, i2 = neighbour_masks(n, g.shape[-2], g.shape[-1], generator)
    g1, g2 = subsample(g, i1), subsample(g, i2)
    with torch.no_grad():
        fg = model(g)
    out = model(g1)
    rec = ((out - g2) ** 2).mean()
    reg = ((out - g2 - (subsample(fg, i1) - subsample(fg, i2))) ** 2).mean()
    return rec + gamma * reg


def train_n2n(images: list[np.ndarray], cfg: N2NConfig | None = None, log_every: int = 100, log=None):
    """Train the network on uint8 grey images (already at the working size). Returns the model."""
    import torch

    cfg = cfg or N2NConfig()
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    data = [torch.from_numpy(np.asarray(im, np.float32) / 255.0)[None] for im in images]
    if not data:
        raise DataError("no training images for the despeckling network")
    h = min(d.shape[-2] for d in data)
    w = min(d.shape[-1] for d in data)
    data = torch.stack([d[:, :h, :w] for d in data])
    model = build_n2n(cfg.channels, cfg.layers)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, cfg.steps)
    ramp = max(cfg.steps // 2, 1)
    for step in range(cfg.steps):
        idx = torch.randint(0, len(data), (cfg.batch_size,), generator=gen)
        y = data[idx]
        if torch.rand(1, generator=gen).item() < 0.5:
            y = torch.flip(y, dims=[-1])
        loss = n2n_loss(model, y, cfg.stride, cfg.gamma * min(1.0, step / ramp), gen)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if log is not None and (step % log_every == 0 or step == cfg.steps - 1):
            log(f"step {step} loss {loss.item():.6f}")
    return model.eval()


def export_onnx(model, path: str | Path | None = None) -> bytes:
    """ONNX bytes of the network with dynamic batch / height / width (also written to ``path``)."""
    import warnings

    import torch

    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model.eval(), torch.zeros(1, 1, 64, 64), buf, input_names=["image"], output_names=["clean"],
                          dynamic_axes={"image": {0: "n", 2: "h", 3: "w"}, "clean": {0: "n", 2: "h", 3: "w"}},
                          opset_version=17, dynamo=False)
    blob = buf.getvalue()
    if path is not None:
        Path(path).write_bytes(blob)
    return blob


class N2NDenoiser:
    """The exported network run by onnxruntime (CPU) on each polyphase component of an image."""

    def __init__(self, onnx_path: str | Path, stride: int = 3, threads: int = 2) -> None:
        import onnxruntime as ort

        path = Path(onnx_path)
        if not path.is_file():
            raise DataError(f"{path}: no such despeckling network (train it with benchmarks/despeckle_n2n.py)")
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.log_severity_level = 3
        self.session = ort.InferenceSession(path.read_bytes(), opts, providers=["CPUExecutionProvider"])
        self.stride = int(stride)

    def __call__(self, image01: np.ndarray) -> np.ndarray:
        """Denoise a float image (H, W) in [0, 1]; same shape out."""
        s = self.stride
        h, w = image01.shape
        hp, wp = int(math.ceil(h / s) * s), int(math.ceil(w / s) * s)
        x = np.pad(image01.astype(np.float32), ((0, hp - h), (0, wp - w)), mode="edge")
        # polyphase components (a-major, as polyphase()) by a reshape, and back
        comps = np.ascontiguousarray(x.reshape(hp // s, s, wp // s, s).transpose(1, 3, 0, 2)).reshape(s * s, 1, hp // s, wp // s)
        out = self.session.run(None, {"image": comps})[0]
        full = out.reshape(s, s, hp // s, wp // s).transpose(2, 0, 3, 1).reshape(hp, wp)
        return np.clip(full[:h, :w], 0.0, 1.0)
