"""Faithfulness: a real heatmap of a model trained here beats random maps on deletion and
insertion, changes when the model is randomised, and puts its mass on the object; the
building blocks (curves, AUC, energy, stages, head-mask sampling) behave as documented."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import blob_image, write_manifest, write_png
from torch import nn

from fetalscan.data.transforms import Preprocessing
from fetalscan.errors import DataError
from fetalscan.explain.faithfulness import (
    FaithfulnessConfig,
    Unit,
    curve_auc,
    energy_in_mask,
    evaluate_faithfulness,
    perturbation_curves,
    random_saliency,
    randomisation_stages,
    randomised_copy,
    sample_head_masks,
    spearman_similarity,
    ssim,
)
from fetalscan.models.checkpoint import LoadedModel

SIZE = 32
PRE = Preprocessing(input_size=(SIZE, SIZE), channels=3)


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny tensors: one thread avoids waiting on a busy second core."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class TinyCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1),
                                      nn.ReLU())
        self.classifier = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x).mean(dim=(2, 3)))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny CNN trained here to tell a bright disc (class 'bright') from a dim one."""
    from fetalscan.data.records import load_dataset
    from fetalscan.data.transforms import normalize

    root = tmp_path_factory.mktemp("discs")
    rows, mrows, xs, ys = [], [], [], []
    for i in range(48):
        bright = i % 2 == 0
        img = blob_image(i, SIZE, bright)
        rel = f"img/{i}.png"
        write_png(root / rel, img)
        rows.append({"path": rel, "label": "bright" if bright else "dim", "group": f"g{i}"})
        if bright:
            write_png(root / f"mask/{i}.png", np.where(img[..., 0] >= 200, 255, 0).astype(np.uint8))  # the disc
            mrows.append({"image": rel, "mask": f"mask/{i}.png", "exam": str(i)})
        xs.append(torch.from_numpy(img).permute(2, 0, 1))
        ys.append(int(bright))
    from fetalscan.runtime import single_thread

    torch.manual_seed(0)
    model = TinyCNN()
    x, y = normalize(torch.stack(xs), PRE), torch.tensor(ys)
    opt = torch.optim.Adam(model.parameters(), lr=0.02)
    with single_thread():  # one thread for a reproducible trajectory; restored for the later tests
        for _ in range(100):
            loss = nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        acc = (model(x).argmax(1) == y).float().mean().item()
    assert acc > 0.95, f"the tiny model did not learn the task (accuracy {acc:.2f})"
    manifest = write_manifest(root / "manifest.csv", rows)
    masks = write_manifest(root / "masks.csv", mrows)
    records = [r for r in load_dataset(manifest).records if r.label == "bright"]
    loaded = LoadedModel(model, ["dim", "bright"], PRE, {"backbone": None})
    return loaded, records, masks


def test_real_heatmaps_beat_random_maps_and_fail_no_sanity_check(trained):
    loaded, records, masks = trained
    cfg = FaithfulnessConfig(methods="gradcam,gradcam++", n_images=12, steps=8, baseline="mean",
                             random_maps=3, head_masks=str(masks), head_images=12, n_boot=100)
    result = evaluate_faithfulness([Unit(loaded, records[:12], "tiny", "features")], cfg)
    for method in ("gradcam", "gradcam++"):
        e = result["methods"][method]
        assert e["n_images"] == 12
        assert e["deletion_auc"] < e["random_deletion_auc"] - 0.05, e
        assert e["insertion_auc"] > e["random_insertion_auc"] + 0.05, e
        assert e["deletion_gain_vs_random_ci95"][0] > 0 and e["insertion_gain_vs_random_ci95"][0] > 0
        # randomising the head and the CAM layer must change the map (Adebayo et al., 2018)
        assert e["randomisation_similarity"] < 0.6, e["randomisation_cascade"]
        # the map's mass lies on the disc, far above the disc's share of the image
        assert e["energy_in_head"] > 2.5 * e["head_area_share"], e
        assert e["peak_in_head_share"] >= 0.9
    assert len(result["curves"]["fractions"]) == 9
    assert any("Adebayo" in n for n in result["notes"])


def test_random_baseline_does_not_depend_on_the_list_of_methods(trained):
    loaded, records, _ = trained
    base = dict(n_images=6, steps=4, baseline="mean", random_maps=2, randomisation_images=1,
                head_masks=None, n_boot=10)
    one = evaluate_faithfulness([Unit(loaded, records[:6], "tiny", "features")],
                                FaithfulnessConfig(methods="gradcam", **base))
    two = evaluate_faithfulness([Unit(loaded, records[:6], "tiny", "features")],
                                FaithfulnessConfig(methods="gradcam++,gradcam", **base))
    for key in ("random_deletion_auc", "random_insertion_auc"):
        assert one["methods"]["gradcam"][key] == two["methods"]["gradcam"][key], key


def test_random_maps_score_at_chance_on_energy_and_similarity():
    rng = np.random.default_rng(0)
    maps = random_saliency(2, (4, 5), (40, 50), rng)
    assert maps.shape == (2, 40, 50) and 0 <= maps.min() and maps.max() <= 1
    assert abs(spearman_similarity(maps[0], maps[1])) < 0.3
    assert spearman_similarity(maps[0], maps[0]) == pytest.approx(1.0)
    assert ssim(maps[0], maps[0]) == pytest.approx(1.0)
    assert ssim(maps[0], maps[1]) < 0.5
    assert np.isnan(spearman_similarity(np.zeros((8, 8)), maps[0][:8, :8]))


def test_curve_auc_and_energy_in_mask_edge_cases():
    assert curve_auc(np.ones((1, 11)))[0] == pytest.approx(1.0)
    assert curve_auc(np.linspace(1, 0, 5)[None])[0] == pytest.approx(0.5)
    mask = np.zeros((10, 10), bool)
    mask[:5] = True
    heat = np.zeros((10, 10))
    heat[:5, :2] = 1.0
    assert energy_in_mask(heat, mask) == (1.0, 0.5, 1.0)
    e, area, peak = energy_in_mask(np.zeros((10, 10)), mask)
    assert np.isnan(e) and area == 0.5 and np.isnan(peak)
    with pytest.raises(DataError, match="differ in size"):
        energy_in_mask(np.zeros((5, 5)), mask)


def test_perturbation_curves_start_at_the_image_and_end_at_the_baseline(trained):
    from fetalscan.data.records import prepare_images
    from fetalscan.explain.faithfulness import baseline_images

    loaded, records, _ = trained
    x, _ = prepare_images(records[:3], PRE)
    base = baseline_images(x, "blur", 0.1)
    assert base.shape == x.shape and float((base - x.float()).abs().mean()) > 1
    maps = random_saliency(3, (8, 8), (SIZE, SIZE), np.random.default_rng(1))
    targets = np.array([1, 1, 1])
    d, i = perturbation_curves(loaded.model, x, maps, targets, PRE, base, steps=4)
    from fetalscan.data.transforms import normalize

    with torch.no_grad():
        p_x = torch.softmax(loaded.model(normalize(x, PRE)), 1)[:, 1].numpy()
        p_b = torch.softmax(loaded.model(normalize(base, PRE)), 1)[:, 1].numpy()
    assert d.shape == i.shape == (3, 5)
    np.testing.assert_allclose(d[:, 0], p_x, atol=1e-5)
    np.testing.assert_allclose(d[:, -1], p_b, atol=1e-5)
    np.testing.assert_allclose(i[:, 0], p_b, atol=1e-5)
    np.testing.assert_allclose(i[:, -1], p_x, atol=1e-5)


def test_randomisation_cascades_from_the_head_and_never_touches_the_model():
    from fetalscan.training.loop import TrainConfig, new_model

    model = new_model(TrainConfig(pretrained="none"), 3).eval()  # cached SonoNet-16 head
    stages = randomisation_stages(model, "adaption")
    assert [k for k, _, _ in stages] == ["head", "head_and_layer", "upper_half", "all"]
    assert stages[1][1] == "head + adaption"
    assert stages[0][2] == ["classifier.2"]
    assert set(stages[1][2]) == {"classifier.2", "adaption.0", "adaption.1"}
    assert all(set(a[2]) < set(b[2]) for a, b in zip(stages, stages[1:]))  # cascading
    assert "features.4.2.0" in stages[2][2] and "features.0.0.0" not in stages[2][2]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    clone = randomised_copy(model, stages[1][2], seed=3)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not torch.equal(clone.classifier[2].weight, model.classifier[2].weight)
    assert torch.equal(clone.features[0][0][0].weight, model.features[0][0][0].weight)


def test_head_mask_sampling_one_per_exam_and_clear_errors(tmp_path, shared_data):
    from fetalscan.data.hc18 import BiometryItem, read_mask

    hc18 = shared_data / "hc18" / "manifest.csv"
    items = sample_head_masks(hc18, 6, seed=1)
    assert len(items) == 6
    exams = [it.image.name.split("_")[0] for it in items]
    assert len(set(exams)) == 6 and exams == [it.exam for it in items]
    assert all(it.mask.name.endswith("_mask.png") and it.mask.is_file() for it in items)
    bad = write_manifest(tmp_path / "bad.csv", [{"image": "a.png", "label": "x"}])
    with pytest.raises(DataError, match=r"missing column\(s\) mask"):
        sample_head_masks(bad, 3)
    missing = write_manifest(tmp_path / "m.csv", [{"image": "a.png", "mask": "b.png"}])
    with pytest.raises(DataError, match=r"m.csv, line 2, field 'image': file does not exist"):
        sample_head_masks(missing, 3)
    # the exam column is optional: each image is then its own exam
    write_png(tmp_path / "a.png", np.zeros((5, 7), np.uint8))
    write_png(tmp_path / "b.png", np.zeros((5, 7), np.uint8))
    (item,) = sample_head_masks(missing, 3)
    assert item.exam == "a.png"
    # the one mask reader (fetalscan.data.hc18.read_mask): a mask of another size than its image is an error
    small = BiometryItem(tmp_path / "img.png", tmp_path / "b.png", "e", None, None, "img.png", 2)
    with pytest.raises(DataError, match=r"has shape 7x5 \(W x H\) but its image .*img.png is 800x540"):
        read_mask(small, (540, 800))
