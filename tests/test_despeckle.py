"""Despeckling: synthetic speckle statistics, calibrated denoisers beat identity on the J-invariant
loss, outputs keep size / dtype / range and are deterministic, and the CLI."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fetalscan.quality.despeckle import (
    RAYLEIGH_UNIT_VAR,
    DenoiseConfig,
    add_speckle,
    denoise_image,
    identity_loss,
    j_invariant_losses,
    speckle_correlation_length,
    speckle_field,
)


def _phantom(shape=(96, 144)) -> np.ndarray:
    """A smooth 'head' (bright ring, mid interior) on a dark background, uint8."""
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    r = np.sqrt(((yy - shape[0] / 2) / 35.0) ** 2 + ((xx - shape[1] / 2) / 50.0) ** 2)
    img = np.where(r < 1, 110.0, 40.0) + np.where(np.abs(r - 1) < 0.08, 110.0, 0.0)
    return img.astype(np.uint8)


def test_rayleigh_speckle_has_unit_mean_and_the_rayleigh_variance():
    f = speckle_field((300, 300), "rayleigh", seed=0)
    assert f.mean() == pytest.approx(1.0, abs=0.01)
    assert f.var() == pytest.approx(RAYLEIGH_UNIT_VAR, rel=0.03)
    assert RAYLEIGH_UNIT_VAR == pytest.approx((4 - math.pi) / math.pi)
    # correlation keeps the law (a low-passed complex Gaussian is still Gaussian)
    fc = speckle_field((300, 300), "rayleigh", correlation_px=1.5, seed=0)
    assert fc.mean() == pytest.approx(1.0, abs=0.03) and fc.var() == pytest.approx(RAYLEIGH_UNIT_VAR, rel=0.1)


@pytest.mark.parametrize("looks", [1, 2, 4])
def test_gamma_speckle_variance_is_one_over_looks(looks):
    for corr in (0.0, 1.0):
        f = speckle_field((300, 300), "gamma", looks=looks, correlation_px=corr, seed=1)
        assert f.mean() == pytest.approx(1.0, abs=0.03)
        assert f.var() == pytest.approx(1.0 / looks, rel=0.1)


def test_correlated_speckle_has_a_longer_correlation_length():
    base = np.full((200, 200), 120, np.uint8)
    white = add_speckle(base, 1.0, correlation_px=0.0, seed=2)
    corr = add_speckle(base, 1.0, correlation_px=2.0, seed=2)
    assert speckle_correlation_length(corr) > speckle_correlation_length(white) + 1.0


def test_add_speckle_level_zero_is_identity_and_keeps_dtype():
    img = _phantom()
    assert np.array_equal(add_speckle(img, 0.0), img)
    out = add_speckle(img, 1.0, seed=3)
    assert out.dtype == np.uint8 and out.shape == img.shape
    assert np.array_equal(out, add_speckle(img, 1.0, seed=3))


@pytest.mark.parametrize("method", ["nl_means", "bilateral", "tv"])
def test_calibrated_denoiser_beats_identity_on_the_j_invariant_loss(method):
    noisy = add_speckle(_phantom(), 1.0, correlation_px=0.0, seed=4).astype(np.float64) / 255.0
    _, losses = j_invariant_losses(noisy, method)
    assert min(losses) < identity_loss(noisy)


@pytest.mark.parametrize("method", ["nl_means", "bilateral", "tv", "none"])
def test_denoiser_keeps_size_dtype_range_and_is_deterministic(method):
    img = add_speckle(_phantom(), 1.0, seed=5)
    cfg = DenoiseConfig(method=method, work_size=96)
    a, b = denoise_image(img, cfg), denoise_image(img, cfg)
    assert a.image.shape == img.shape and a.image.dtype == np.uint8
    assert np.array_equal(a.image, b.image) and a.params == b.params
    rgb = np.repeat(img[..., None], 3, axis=2)
    c = denoise_image(rgb, cfg)
    assert c.image.shape == rgb.shape and c.image.dtype == np.uint8


def test_denoising_speckle_brings_the_image_closer_to_the_clean_one():
    clean = _phantom()
    noisy = add_speckle(clean, 1.0, correlation_px=0.0, seed=6)
    den = denoise_image(noisy, DenoiseConfig(method="tv", work_size=200, decorrelate=False)).image
    err = lambda x: float(np.mean((x.astype(float) - clean) ** 2))  # noqa: E731
    assert err(den) < err(noisy)


def test_denoise_cli_writes_images_and_rejects_a_bad_file(tmp_path, capsys):
    from PIL import Image

    from fetalscan.cli import main

    Image.fromarray(add_speckle(_phantom(), 1.0, seed=7)).save(tmp_path / "a.png")
    rc = main(["denoise", "--data", str(tmp_path / "a.png"), "--method", "tv", "--work-size", "96",
               "--out", str(tmp_path / "d"), "--no-progress"])
    assert rc == 0
    outs = list((tmp_path / "d").glob("*.png"))
    assert len(outs) == 1 and (tmp_path / "d" / "denoise.csv").is_file()
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG broken")
    assert main(["denoise", "--data", str(bad), "--out", str(tmp_path / "e"), "--no-progress"]) == 2
    assert "bad.png" in capsys.readouterr().err


def test_a_few_real_hc18_images_get_despeckled(shared_data):
    from fetalscan.data.records import read_image

    files = sorted((shared_data / "hc18" / "images").glob("*.png"))[:2]
    for f in files:
        img = read_image(f)[..., 0]
        assert 1.0 < speckle_correlation_length(img) < 20.0
        out = denoise_image(img, DenoiseConfig(method="tv"))
        assert out.image.shape == img.shape and out.params["calibration_subsample"] >= 1


def test_n2n_pairs_never_share_a_pixel_and_lie_stride_apart():
    """d g1 / d y and d g2 / d y have disjoint support; paired pixels are ``stride`` pixels apart."""
    import torch

    from fetalscan.quality.n2n import neighbour_masks, subsample

    stride, a, b = 3, 1, 2
    y = torch.rand(2, 1, 36, 48, requires_grad=True)
    g = y[..., a::stride, b::stride]
    i1, i2 = neighbour_masks(2, g.shape[-2], g.shape[-1], torch.Generator().manual_seed(0))
    g1, g2 = subsample(g, i1), subsample(g, i2)
    (grad1,) = torch.autograd.grad(g1.sum(), y, retain_graph=True)
    (grad2,) = torch.autograd.grad(g2.sum(), y)
    assert not torch.any((grad1 != 0) & (grad2 != 0))  # no pixel feeds both input and target
    assert int((grad1 != 0).sum()) == g1.numel() == int((grad2 != 0).sum())
    rr, cc = torch.meshgrid(torch.arange(i1.shape[1]), torch.arange(i1.shape[2]), indexing="ij")

    def image_coords(idx):
        return torch.stack([a + stride * (2 * rr + idx // 2), b + stride * (2 * cc + idx % 2)], -1)

    dist = (image_coords(i1) - image_coords(i2)).abs().sum(-1)
    assert torch.all(dist == stride)  # adjacent on the sub-grid, never diagonal


def test_n2n_network_never_sees_its_target_pixels():
    """Gradient test: the network's output on g1 does not depend on any pixel of the target g2."""
    import torch

    from fetalscan.quality.n2n import build_n2n, neighbour_masks, subsample

    torch.manual_seed(0)
    model = build_n2n(4, 2)
    y = torch.rand(1, 1, 48, 60, requires_grad=True)
    g = y[..., 0::3, 1::3]
    i1, i2 = neighbour_masks(1, g.shape[-2], g.shape[-1], torch.Generator().manual_seed(1))
    out = model(subsample(g, i1))
    (grad_out,) = torch.autograd.grad(out.sum(), y)
    (target_support,) = torch.autograd.grad(subsample(g, i2).sum(), y)
    assert torch.count_nonzero(grad_out) > 0
    assert torch.count_nonzero(grad_out[target_support != 0]) == 0


def test_polyphase_round_trip_and_n2n_denoiser_shape(tmp_path):
    import torch

    from fetalscan.quality.n2n import N2NDenoiser, build_n2n, export_onnx, polyphase, unpolyphase

    x = torch.rand(1, 1, 30, 45)
    assert torch.equal(unpolyphase(polyphase(x, 3), 1, 3, (30, 45)), x)
    torch.manual_seed(0)
    export_onnx(build_n2n(4, 1), tmp_path / "n.onnx")
    den = N2NDenoiser(tmp_path / "n.onnx", stride=3)
    img = np.random.default_rng(0).uniform(0, 1, (50, 71)).astype(np.float32)
    out = den(img)
    assert out.shape == img.shape and out.min() >= 0 and out.max() <= 1
    assert np.array_equal(out, den(img))
