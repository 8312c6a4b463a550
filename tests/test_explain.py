"""Explainability: heatmaps land where the evidence is, overlays keep the original size,
hooks and model state are left untouched, errors are clear, and the CLI writes
readable files for single images and for a whole CV run."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import blob_image, write_manifest, write_png
from torch import nn

from fetalscan.cli import main
from fetalscan.data.transforms import Preprocessing
from fetalscan.errors import FetalscanError, ModelError
from fetalscan.explain.cams import (
    ExplainConfig,
    compute_cams,
    explain_arrays,
    method_key,
    overlay,
    parse_methods,
)
from fetalscan.explain.gallery import select_gallery
from fetalscan.models.checkpoint import LoadedModel

TINY_PRE = Preprocessing(input_size=(48, 64), channels=3)  # (H, W), ImageNet normalisation


class QuadrantMask(nn.Module):
    """Zeroes every feature outside one quadrant: only that quadrant can matter."""

    def __init__(self, row: int, col: int) -> None:
        super().__init__()
        self.row, self.col = row, col

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        mask = torch.zeros(h, w, device=x.device)
        mask[self.row * h // 2:(self.row + 1) * h // 2, self.col * w // 2:(self.col + 1) * w // 2] = 1
        return x * mask


class QuadrantNet(nn.Module):
    """conv -> ReLU -> quadrant mask -> global average pool -> linear (class 0 = positive evidence)."""

    def __init__(self, row: int = 1, col: int = 0) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.features = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU())
        self.mask = QuadrantMask(row, col)
        self.classifier = nn.Linear(6, 2)
        with torch.no_grad():
            self.features[0].bias.fill_(0.5)
            self.classifier.weight.copy_(torch.tensor([[1.0] * 6, [-1.0] * 6]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.mask(self.features(x)).mean(dim=(2, 3)))


def _tiny_loaded(row: int = 1, col: int = 0) -> LoadedModel:
    return LoadedModel(QuadrantNet(row, col).eval(), ["a", "b"], TINY_PRE, {"backbone": None})


def _noise(h: int, w: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(h, w, 3), dtype=np.uint8)


@pytest.fixture
def one_thread():
    """Tiny tensors: one thread avoids waiting on a busy second core."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _hooks(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
               + len(m._backward_pre_hooks) for m in model.modules())


# --------------------------------------------------------------------------- where the heatmap lands


@pytest.mark.parametrize("method", ["gradcam", "gradcam++", "scorecam", "eigencam"])
@pytest.mark.parametrize("quadrant", [(1, 0), (0, 1)])
def test_heatmap_peak_lies_in_the_only_quadrant_that_matters(method, quadrant, one_thread):
    loaded = _tiny_loaded(*quadrant)
    images = [_noise(90, 150, s) for s in range(3)]  # another size and aspect than the 48x64 input
    exps = explain_arrays(loaded, images, ExplainConfig(method=method, layer="mask", target="a"))
    row, col = quadrant
    for exp in exps:
        assert exp.heatmap.shape == (90, 150)
        x, y = exp.peak()
        assert (y >= 45) == bool(row) and (x >= 75) == bool(col), (method, quadrant, (x, y))
        inside = exp.heatmap[row * 45:(row + 1) * 45, col * 75:(col + 1) * 75].sum()
        assert inside / exp.heatmap.sum() > 0.9


def test_default_target_is_the_predicted_class_and_a_given_one_is_used():
    loaded = _tiny_loaded()
    img = [_noise(40, 40, 1)]
    auto = explain_arrays(loaded, img, ExplainConfig(layer="mask"))[0]
    assert auto.target == auto.pred == "a"  # class 0 has the positive weights
    given = explain_arrays(loaded, img, ExplainConfig(layer="mask", target="b"))[0]
    assert given.target == "b" and given.pred == "a"
    # class b's evidence is negative everywhere: Grad-CAM (after its ReLU) shows nothing
    assert given.heatmap.max() == 0.0
    with pytest.raises(FetalscanError, match="--target 'c' is not a class"):
        explain_arrays(loaded, img, ExplainConfig(layer="mask", target="c"))


# --------------------------------------------------------------------------- hooks and model state


def test_hooks_released_and_model_state_restored_after_100_calls(one_thread):
    model = QuadrantNet()
    model.train()
    model.features[0].weight.requires_grad_(False)
    sentinel = torch.ones_like(model.classifier.weight)
    model.classifier.weight.grad = sentinel
    before = _hooks(model)
    flags = [p.requires_grad for p in model.parameters()]
    x = torch.randn(2, 3, 12, 16)
    for i in range(100):
        res = compute_cams(model, x, "mask", ["gradcam", "gradcam++", "eigencam", "scorecam"][i % 4], 0)
        assert res.maps.shape == (2, 12, 16)
    assert _hooks(model) == before == 0
    assert model.training and all(m.training for m in model.modules())
    assert [p.requires_grad for p in model.parameters()] == flags
    assert model.classifier.weight.grad is sentinel
    # an error inside the computation releases the hooks too
    with pytest.raises(ModelError, match="out of range"):
        compute_cams(model, x, "mask", "gradcam", 7)
    assert _hooks(model) == 0 and model.training


def test_cams_work_inside_inference_mode_and_on_a_frozen_backbone():
    model = QuadrantNet().eval()
    for p in model.parameters():
        p.requires_grad_(False)  # like a cached-mode backbone
    with torch.inference_mode():
        res = compute_cams(model, torch.randn(1, 3, 48, 64), "mask", "gradcam", 0)
    assert res.maps.max() == pytest.approx(1.0)
    assert res.feature_size == (48, 64)


# --------------------------------------------------------------------------- errors


def test_wrong_layer_name_gives_a_clear_error():
    with pytest.raises(ModelError, match=r"layer 'layer9' not found in QuadrantNet; top-level layers are: "
                                         r"features, mask, classifier"):
        compute_cams(QuadrantNet(), torch.randn(1, 3, 48, 64), "layer9")


def test_non_spatial_layer_and_unknown_method_and_unregistered_backbone_are_clear():
    with pytest.raises(ModelError, match="'classifier' gives an output of shape .*spatial feature map"):
        compute_cams(QuadrantNet(), torch.randn(1, 3, 48, 64), "classifier")
    with pytest.raises(FetalscanError, match="--method 'lime' is not supported"):
        method_key("lime")
    assert method_key("Grad-CAM++") == "gradcam++" and parse_methods("all")[0] == "gradcam"
    with pytest.raises(ModelError, match="cannot choose a Grad-CAM layer automatically.*--layer"):
        explain_arrays(_tiny_loaded(), [_noise(20, 20, 0)], ExplainConfig())


# --------------------------------------------------------------------------- overlays


def test_overlay_has_the_original_size_and_keeps_cold_pixels(shared_data):
    from fetalscan.data.records import read_image

    image = read_image(shared_data / "hc18" / "images" / "000_HC.png")  # 800 x 540, not the 224 x 288 input
    heat = np.zeros((224, 288), np.float32)
    heat[:112, :144] = 1.0  # top-left quarter of the network input
    out = overlay(image, heat, alpha=0.6)
    assert out.shape == image.shape and out.dtype == np.uint8
    h, w = image.shape[:2]
    assert np.array_equal(out[h - 50:, w - 50:], image[h - 50:, w - 50:])  # cold: untouched
    assert np.abs(out[:h // 3, :w // 3].astype(int) - image[:h // 3, :w // 3]).mean() > 20  # hot: coloured


def test_sononet_heatmaps_on_real_images_have_the_original_size(shared_data):
    from fetalscan.data.records import read_image
    from fetalscan.models.checkpoint import architecture_of
    from fetalscan.models.registry import get_backbone_spec
    from fetalscan.training.loop import TrainConfig, new_model

    cfg = TrainConfig()
    loaded = LoadedModel(new_model(cfg, 3).eval(), ["x", "y", "z"], get_backbone_spec("sononet16").preprocessing,
                         architecture_of(cfg, 3))
    brain = next((shared_data / "fetal_brain" / "normal").glob("*.jpg"))
    images = [read_image(shared_data / "hc18" / "images" / "000_HC.png"), read_image(brain)]
    for method in ("gradcam", "eigencam"):
        exps = explain_arrays(loaded, images, ExplainConfig(method=method))
        for img, exp in zip(images, exps):
            assert exp.layer == "adaption"  # chosen from the registry
            assert exp.heatmap.shape == img.shape[:2]
            assert overlay(img, exp.heatmap).shape == img.shape
            assert 0.0 <= exp.heatmap.min() and exp.heatmap.max() <= 1.0
    assert _hooks(loaded.model) == 0


# --------------------------------------------------------------------------- gallery selection


def test_gallery_picks_the_most_confident_tp_fp_and_fn_per_class():
    df = pd.DataFrame({
        "label": ["a", "a", "a", "b", "b", "b", ""],
        "pred": ["a", "a", "b", "a", "b", "b", "a"],
        "p_a": [0.9, 0.6, 0.1, 0.8, 0.3, 0.2, 0.99],
        "p_b": [0.1, 0.4, 0.9, 0.2, 0.7, 0.8, 0.01],
    })
    picks = {(p["class"], p["kind"]): (p["row"], p["prob"]) for p in select_gallery(df, ["a", "b"])}
    assert picks[("a", "TP")] == (0, 0.9)
    assert picks[("a", "FP")] == (3, 0.8)  # the unlabelled row 6 is never a false positive
    assert picks[("a", "FN")] == (2, 0.1)
    assert picks[("b", "TP")] == (5, 0.8)
    # rows 2 and 3 are also b's only FP and FN: each image is shown once, its second role noted
    assert ("b", "FP") not in picks and ("b", "FN") not in picks
    also = {(p["class"], p["kind"]): p["also"] for p in select_gallery(df, ["a", "b"])}
    assert also[("a", "FN")] == [{"class": "b", "kind": "FP", "prob": 0.9}]
    assert also[("a", "FP")] == [{"class": "b", "kind": "FN", "prob": 0.2}]
    assert len(select_gallery(df, ["a", "b"], per_kind=2)) == 6  # a: TP 2, FP 1, FN 1; b: TP 2


# --------------------------------------------------------------------------- command line


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory) -> tuple[Path, Path, Path]:
    """A 2-fold cached-SonoNet CV run on 10 tiny two-class images, and an (untrained-head) checkpoint."""
    from fetalscan.data.records import load_dataset
    from fetalscan.models.checkpoint import architecture_of, save_checkpoint
    from fetalscan.models.registry import get_backbone_spec
    from fetalscan.training.loop import TrainConfig, new_model
    from fetalscan.training.study import CVConfig, run_cv

    root = tmp_path_factory.mktemp("toy")
    rows = []
    for ci, c in enumerate(("abnormal", "normal")):
        for g in range(5):
            rel = f"{c}/{c}_{g}.png"
            write_png(root / rel, blob_image(100 * ci + g, size=72, bright=ci == 0))
            rows.append({"path": rel, "label": c, "group": f"{c}_{g}"})
    manifest = write_manifest(root / "manifest.csv", rows)
    cfg = TrainConfig(device="cpu", head_epochs=30)
    run_cv(load_dataset(manifest), cfg, CVConfig(folds=2), root / "run")
    model = save_checkpoint(root / "model.pt", new_model(cfg, 2), classes=["abnormal", "normal"],
                            architecture=architecture_of(cfg, 2),
                            preprocessing=get_backbone_spec("sononet16").preprocessing)
    return manifest, root / "run", model


@pytest.mark.slow
def test_cli_explain_images_writes_readable_overlays_at_original_size(toy_run, tmp_path, capsys):
    from PIL import Image

    manifest, _, model = toy_run
    images = [*sorted((manifest.parent / "abnormal").glob("*.png"))[:1], manifest.parent / "normal"]
    out = tmp_path / "ex"
    code = main(["explain", "--model", str(model), "--images", *map(str, images), "--out", str(out),
                 "--method", "gradcam++", "--alpha", "0.7", "--device", "cpu", "--faithfulness",
                 "--methods", "eigencam", "--n-images", "2", "--steps", "2", "--random-maps", "1",
                 "--randomisation-images", "1", "--head-masks", "none", "--n-boot", "20"])
    assert code == 0
    faith = json.loads((out / "faithfulness.json").read_text())
    assert faith["methods"]["eigencam"]["n_images"] == 2
    assert faith["methods"]["eigencam"]["randomisation_cascade"][0]["spearman"] == pytest.approx(1.0)  # head-blind
    assert (out / "faithfulness_curves.png").is_file()
    table = pd.read_csv(out / "explanations.csv")
    assert len(table) == 6 and set(table["method"]) == {"gradcam++"}  # a file and a folder of 5
    for _, row in table.iterrows():
        original = Image.open(row["path"]).size
        assert Image.open(out / row["overlay"]).size == original
        assert Image.open(out / row["heatmap"]).size == original
        panel = Image.open(out / row["panel"])
        assert panel.size[0] > panel.size[1]  # side by side
    assert "never replace" in capsys.readouterr().out


def test_cli_explain_wrong_layer_is_one_red_line_and_exit_2(toy_run, tmp_path, capsys):
    manifest, _, model = toy_run
    image = next((manifest.parent / "normal").glob("*.png"))
    code = main(["explain", "--model", str(model), "--images", str(image), "--out", str(tmp_path / "x"),
                 "--layer", "nolayer", "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 2
    assert "layer 'nolayer' not found in SonoNet16" in err and "adaption" in err


@pytest.mark.slow
def test_cli_explain_run_writes_gallery_and_faithfulness_with_fold_models(toy_run, capsys):
    _, run, _ = toy_run
    code = main(["explain", "--run", str(run), "--methods", "gradcam", "--n-images", "2", "--steps", "2",
                 "--random-maps", "1", "--head-masks", "none", "--n-boot", "50", "--device", "cpu"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "Faithfulness" in printed and "fold model that held the image out" in printed
    gallery = json.loads((run / "explain" / "gallery.json").read_text())
    assert gallery, "the gallery is empty"
    for item in gallery:
        assert {"class", "kind", "path", "overlay", "prob", "label", "pred", "method"} <= set(item)
        assert item["kind"] in ("TP", "FP", "FN") and item["method"] == "gradcam"
        assert (run / item["overlay"]).is_file()
        assert "held out" in item["model"]
    faith = json.loads((run / "explain" / "faithfulness.json").read_text())
    entry = faith["methods"]["gradcam"]
    for key in ("deletion_auc", "insertion_auc", "random_deletion_auc", "random_insertion_auc",
                "randomisation_similarity", "n_images"):
        assert isinstance(entry[key], (int, float)) and np.isfinite(entry[key]), (key, entry[key])
    assert entry["energy_in_head"] is None and entry["n_images"] == 2
    assert faith["models"]["held_out"] is True, faith["models"]
    assert any("fold model" in n for n in faith["notes"])


def test_eigencam_is_the_library_projection_oriented_towards_strong_activations():
    from pytorch_grad_cam.utils.svd_on_activations import get_2d_projection

    from fetalscan.explain.cams import eigen_projection

    for channels in (16, 200):  # fewer and more channels than the 63 pixels
        act = np.abs(np.random.default_rng(channels).normal(size=(4, channels, 7, 9))).astype(np.float32)
        act[:, : channels // 2, 1:4, 2:6] += 3.0  # strong features in one block
        ours, lib = eigen_projection(act), get_2d_projection(act)
        for a, b in zip(ours, lib):
            assert abs(np.corrcoef(a.ravel(), b.ravel())[0, 1]) > 0.999  # same component, up to sign
            assert np.abs(a).max() == pytest.approx(np.abs(b).max(), rel=1e-4)  # same scale
            assert a[1:4, 2:6].mean() > a.mean()  # oriented: high where activations are strong


@pytest.mark.slow
def test_cli_explain_run_without_folds_needs_the_model_and_says_what_it_cannot_know(toy_run, tmp_path, capsys):
    manifest, _, model = toy_run
    pred = tmp_path / "pred"
    assert main(["predict", "--model", str(model), "--data", str(manifest), "--out", str(pred),
                 "--device", "cpu"]) == 0
    assert main(["explain", "--run", str(pred), "--no-faithfulness", "--device", "cpu"]) == 2
    assert "has no folds" in capsys.readouterr().err
    assert main(["explain", "--run", str(pred), "--model", str(model), "--no-faithfulness",
                 "--gallery-per-kind", "1", "--device", "cpu"]) == 0
    gallery = json.loads((pred / "explain" / "gallery.json").read_text())
    assert gallery and all(item["model"] == "the given model" for item in gallery)
    assert "cannot be told" in capsys.readouterr().err


def test_head_masks_auto_finds_the_shared_hc18_manifest_first_under_fetalscan_shared(tmp_path, monkeypatch):
    from fetalscan.data.shared import shared_data, shared_root

    manifest = tmp_path / "data" / "hc18" / "manifest.csv"
    manifest.parent.mkdir(parents=True)
    manifest.write_text("image,mask,exam\n")
    monkeypatch.setenv("FETALSCAN_SHARED", str(tmp_path))
    assert shared_root() == tmp_path
    assert shared_data("hc18/manifest.csv") == manifest
    assert shared_data("hc18") == manifest.parent
    assert shared_data("no_such_data_set") is None
