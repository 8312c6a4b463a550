"""Despeckling without clean images, and synthetic speckle to test it.

**Denoisers** (scikit-image): non-local means (Buades, Coll & Morel 2005), bilateral
(Tomasi & Manduchi 1998) and total variation (Chambolle 2004). Each one's strength is chosen
**per image without a clean reference** by J-invariant calibration (Batson J, Royer L.
*Noise2Self: blind denoising by self-supervision.* ICML 2019;
``skimage.restoration.calibrate_denoiser``): the parameter minimising the self-supervised
loss ``|f_J(x)_J - x_J|^2`` of the J-invariant version of the denoiser (each pixel predicted
without seeing itself) is kept. J-invariance assumes pixel-independent noise; ultrasound
speckle is spatially correlated over about a resolution cell
(:func:`speckle_correlation_length`), so calibration runs at a reduced working size
(``work_size``, longer side, default 384 px) where neighbouring pixels are nearly
decorrelated, and the result is resized back to the original size.

**Synthetic speckle** (:func:`add_speckle`): fully developed speckle multiplies the echo
amplitude by a Rayleigh-distributed factor (Goodman 1976; Burckhardt 1978); averaged
("multi-look") speckle intensity is gamma-distributed. The factor has mean 1; ``level``
scales its deviation from 1. Spatial correlation comes from low-pass filtering the
underlying complex Gaussian field (``correlation_px``), whose magnitude stays Rayleigh.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from fetalscan.errors import DataError, FetalscanError

#: Variance of a unit-mean Rayleigh variable: (4 - pi) / pi.
RAYLEIGH_UNIT_VAR = (4.0 - math.pi) / math.pi

METHODS = ("none", "nl_means", "bilateral", "tv", "n2n")


def speckle_field(shape: tuple[int, int], kind: str = "rayleigh", *, looks: float = 1.0, correlation_px: float = 0.0,
                  seed: int = 0) -> np.ndarray:
    """Unit-mean multiplicative speckle factor of ``shape``.

    ``rayleigh``: magnitude of a (optionally Gaussian-low-passed) complex Gaussian field,
    divided by its mean ``sqrt(pi / 2)`` (variance ``(4 - pi) / pi``).
    ``gamma``: Gamma(shape=``looks``, scale=1/``looks``) (variance ``1 / looks``); with
    ``correlation_px`` it is the mean of ``looks`` (whole number) independent exponential
    intensities of low-passed complex Gaussian fields, which is exactly that gamma law.
    """
    import cv2

    rng = np.random.default_rng(seed)
    h, w = int(shape[0]), int(shape[1])

    def lowpass(x: np.ndarray) -> np.ndarray:
        if correlation_px <= 0:
            return x
        y = cv2.GaussianBlur(x.astype(np.float32), (0, 0), float(correlation_px))
        return y / y.std() * x.std()  # keep the component variance

    if kind == "rayleigh":
        re = lowpass(rng.standard_normal((h, w)))
        im = lowpass(rng.standard_normal((h, w)))
        return (np.sqrt(re.astype(np.float64) ** 2 + im.astype(np.float64) ** 2) / math.sqrt(math.pi / 2)).astype(np.float32)
    if kind == "gamma":
        if looks <= 0:
            raise FetalscanError(f"looks must be > 0, got {looks}")
        if correlation_px <= 0:
            return rng.gamma(looks, 1.0 / looks, (h, w)).astype(np.float32)
        if looks != int(looks):
            raise FetalscanError(f"correlated gamma speckle needs a whole number of looks, got {looks}")
        # L-look intensity: mean of L independent exponential intensities |z|^2 / 2 of correlated fields
        acc = np.zeros((h, w), np.float64)
        for _ in range(int(looks)):
            re = lowpass(rng.standard_normal((h, w))).astype(np.float64)
            im = lowpass(rng.standard_normal((h, w))).astype(np.float64)
            acc += (re * re + im * im) / 2.0
        return (acc / int(looks)).astype(np.float32)
    raise FetalscanError(f"speckle kind must be 'rayleigh' or 'gamma', got {kind!r}")


def add_speckle(image: np.ndarray, level: float, kind: str = "rayleigh", *, correlation_px: float = 1.0,
                seed: int = 0) -> np.ndarray:
    """``image * (1 + level * (S - 1))`` with S a unit-mean speckle factor; uint8 in, uint8 out.

    ``level`` 0 returns the image unchanged; 1 is fully developed speckle. RGB input gets one
    factor for all channels.
    """
    img = np.asarray(image)
    if img.dtype != np.uint8:
        raise DataError(f"expected a uint8 image, got {img.dtype}")
    if level == 0:
        return img.copy()
    s = speckle_field(img.shape[:2], kind, correlation_px=correlation_px, seed=seed)
    f = 1.0 + float(level) * (s - 1.0)
    if img.ndim == 3:
        f = f[..., None]
    return np.clip(np.rint(img.astype(np.float32) * f), 0, 255).astype(np.uint8)


def speckle_correlation_length(image: np.ndarray, max_lag: int = 20) -> float:
    """Speckle correlation length (pixels): the lag where the normalised autocorrelation of the
    high-pass residual (image minus its 7x7 mean) first falls below 1/e, averaged over x and y,
    linearly interpolated. Computed by FFT (Wiener-Khinchin)."""
    import cv2

    g = np.asarray(image, dtype=np.float32)
    if g.ndim == 3:
        g = g.mean(axis=2)
    r = g - cv2.blur(g, (7, 7))
    r = r - r.mean()
    f = np.fft.rfft2(r, s=(2 * g.shape[0], 2 * g.shape[1]))
    ac = np.fft.irfft2(np.abs(f) ** 2)[: g.shape[0], : g.shape[1]]
    ac = ac / ac[0, 0]
    lengths = []
    for line in (ac[0, : max_lag + 1], ac[: max_lag + 1, 0]):
        below = np.flatnonzero(line < 1 / math.e)
        if below.size == 0:
            lengths.append(float(max_lag))
            continue
        k = int(below[0])
        a, b = line[k - 1], line[k]
        lengths.append(float(k - 1 + (a - 1 / math.e) / (a - b)))
    return float(np.mean(lengths))


@dataclass
class DenoiseConfig:
    """Denoising settings; the CLI maps flags 1:1 onto these fields.

    Attributes
    ----------
    method : str
        ``nl_means``, ``bilateral``, ``tv``, ``n2n`` (the self-supervised network of
        :mod:`fetalscan.quality.n2n`, shipped as ONNX; no per-image calibration) or ``none``.
    work_size : int
        Longer side (pixels) of the working image; the output is resized back.
    stride : int
        Stride of the J-invariant masks in the calibration (``calibrate_denoiser``).
    decorrelate : bool
        Calibrate on the working image subsampled by ``ceil(correlation length)``
        (:func:`speckle_correlation_length`), so that neighbouring calibration pixels carry nearly
        independent speckle, as J-invariance assumes (the idea of neighbour subsampling,
        Huang et al., Neighbor2Neighbor, CVPR 2021). Without it, the J-invariant loss of correlated
        speckle favours the weakest setting (measured: docs/quality.md).
    """

    method: str = "tv"
    work_size: int = 384
    stride: int = 4
    decorrelate: bool = True

    def validate(self) -> None:
        if self.method not in METHODS:
            raise FetalscanError(f"method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if self.work_size < 32:
            raise FetalscanError(f"work_size must be >= 32 pixels, got {self.work_size}")

    def to_dict(self) -> dict:
        return asdict(self)


def _denoiser(method: str) -> tuple[Callable, dict]:
    """The scikit-image denoiser of ``method`` and its calibration grid (image in [0, 1])."""
    from skimage.restoration import denoise_bilateral, denoise_nl_means, denoise_tv_chambolle

    if method == "nl_means":
        return (lambda x, h: denoise_nl_means(x, patch_size=5, patch_distance=6, h=h, fast_mode=True),
                {"h": [0.02, 0.04, 0.06, 0.09, 0.13]})
    if method == "bilateral":
        return (lambda x, sigma_color: denoise_bilateral(x, sigma_color=sigma_color, sigma_spatial=1.5, bins=256),
                {"sigma_color": [0.03, 0.06, 0.1, 0.15, 0.25]})
    if method == "tv":
        return (lambda x, weight: denoise_tv_chambolle(x, weight=weight, max_num_iter=60),
                {"weight": [0.02, 0.04, 0.07, 0.11, 0.17]})
    raise FetalscanError(f"method must be one of {', '.join(METHODS)}, got {method!r}")


def j_invariant_losses(image01: np.ndarray, method: str, stride: int = 4) -> tuple[list[dict], list[float]]:
    """Each calibration parameter and its self-supervised (J-invariant) loss on ``image01`` (float, [0, 1])."""
    from skimage.restoration import calibrate_denoiser

    fn, grid = _denoiser(method)
    _, (params, losses) = calibrate_denoiser(image01, fn, grid, stride=stride, extra_output=True)
    return list(params), [float(v) for v in losses]


def identity_loss(image01: np.ndarray, stride: int = 4) -> float:
    """The same J-invariant loss for the identity "denoiser" made J-invariant (each masked pixel
    replaced by the mean of its 4 neighbours, as ``calibrate_denoiser`` does)."""
    from skimage.restoration import calibrate_denoiser

    _, (_, losses) = calibrate_denoiser(image01, lambda x, k: x, {"k": [0]}, stride=stride, extra_output=True)
    return float(losses[0])


@dataclass
class DenoiseResult:
    """One denoised image, the parameter chosen and the time it took."""

    image: np.ndarray  # same shape and dtype (uint8) as the input
    method: str
    params: dict
    loss: float
    seconds: float


def _work_resize(g: np.ndarray, work_size: int) -> np.ndarray:
    import cv2

    h, w = g.shape
    s = min(1.0, work_size / max(h, w))
    if s >= 1.0:
        return g
    return cv2.resize(g, (max(1, round(w * s)), max(1, round(h * s))), interpolation=cv2.INTER_AREA)


def denoise_image(image: np.ndarray, cfg: DenoiseConfig | None = None, params: dict | None = None) -> DenoiseResult:
    """Despeckle one uint8 image (grey or RGB -> same shape; RGB is processed as its grey mean).

    With ``params`` None the parameter is calibrated on this image (J-invariant); else it is used.
    The output is deterministic for a given input.
    """
    cfg = cfg or DenoiseConfig()
    cfg.validate()
    img = np.asarray(image)
    if img.dtype != np.uint8 or img.ndim not in (2, 3):
        raise DataError(f"expected a uint8 (H, W) or (H, W, 3) image, got {img.dtype} {img.shape}")
    t0 = time.perf_counter()
    if cfg.method == "none":
        return DenoiseResult(img.copy(), "none", {}, float("nan"), 0.0)
    grey = img.astype(np.float32).mean(axis=2) if img.ndim == 3 else img.astype(np.float32)
    work = _work_resize(grey / 255.0, cfg.work_size).astype(np.float64)
    loss = float("nan")
    if cfg.method == "n2n":
        den = _n2n_denoiser()
        out = np.asarray(den(work), dtype=np.float32)
        return _finish(out, grey, img, "n2n", {"stride": den.stride}, loss, t0)
    fn, _ = _denoiser(cfg.method)
    if params is None:
        calib = work
        step = 1
        if cfg.decorrelate:
            step = max(1, int(math.ceil(speckle_correlation_length(work * 255.0))))
            calib = work[::step, ::step]
        plist, losses = j_invariant_losses(calib, cfg.method, cfg.stride)
        k = int(np.argmin(losses))
        params, loss = dict(plist[k]), losses[k]
        params["calibration_subsample"] = step
    params = dict(params)
    call = {k: v for k, v in params.items() if k != "calibration_subsample"}
    out = np.asarray(fn(work, **call), dtype=np.float32)
    return _finish(out, grey, img, cfg.method, params, loss, t0)


_N2N: dict = {}


def _n2n_denoiser():
    """The shipped Neighbor2Neighbor network (``quality/models/despeckle_n2n.onnx``), loaded once."""
    import json

    from fetalscan.quality.n2n import N2NDenoiser

    if "model" not in _N2N:
        base = Path(__file__).with_name("models")
        meta_path = base / "despeckle_n2n.json"
        if not meta_path.is_file():
            raise DataError(f"{meta_path}: the despeckling network is not installed (benchmarks/despeckle_n2n.py)")
        stride = int(json.loads(meta_path.read_text())["config"]["stride"])
        _N2N["model"] = N2NDenoiser(base / "despeckle_n2n.onnx", stride)
    return _N2N["model"]


def _finish(out: np.ndarray, grey: np.ndarray, img: np.ndarray, method: str, params: dict, loss: float,
            t0: float) -> DenoiseResult:
    import cv2

    if out.shape != grey.shape:
        out = cv2.resize(out, (grey.shape[1], grey.shape[0]), interpolation=cv2.INTER_LINEAR)
    out8 = np.clip(np.rint(out * 255.0), 0, 255).astype(np.uint8)
    if img.ndim == 3:
        out8 = np.repeat(out8[..., None], img.shape[2], axis=2)
    return DenoiseResult(out8, method, dict(params), loss, time.perf_counter() - t0)


def denoise_to_folder(data: str | Path, out: str | Path, cfg: DenoiseConfig | None = None, *,
                      overwrite: bool = False) -> list[dict]:
    """``fetalscan denoise``: despeckle every image of ``data`` -> ``out/<name>.png`` + ``out/denoise.csv``."""
    import pandas as pd
    from PIL import Image

    from fetalscan.data.records import iter_record_images, load_dataset
    from fetalscan.fileio import prepare_out_dir, write_csv
    from fetalscan.progress import track

    cfg = cfg or DenoiseConfig()
    cfg.validate()
    data = Path(data)
    if not data.exists():
        raise DataError(f"{data}: no such image, folder or manifest")
    records = load_dataset(data, require_labels=False).records
    if not records:
        raise DataError(f"{data}: no images found")
    outdir = prepare_out_dir(out, overwrite)
    rows = []
    for i, image in track(iter_record_images(records), "despeckling", total=len(records)):
        r = records[i]
        res = denoise_image(image, cfg)
        name = f"{i:05d}_{Path(r.name).stem}" + (f"_frame{r.frame}" if r.frame is not None else "") + ".png"
        Image.fromarray(res.image).save(outdir / name)
        rows.append({"image": r.image_id, "path": str(r.path), "output": name, "method": res.method,
                     "params": ";".join(f"{k}={v}" for k, v in res.params.items()),
                     "j_invariant_loss": res.loss, "seconds": res.seconds})
    write_csv(outdir / "denoise.csv", pd.DataFrame(rows))
    return rows
