"""Backbone registry, SonoNet-16 and the pretrained-weight loading paths."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from fetalscan.errors import ModelError
from fetalscan.models.registry import (
    create_model,
    embedding_dim,
    get_backbone_spec,
    get_module,
    list_backbones,
    load_imagenet_backbone,
)
from fetalscan.models.sononet import (
    SONONET16_SHA256,
    SONONET16_WEIGHTS,
    SONONET_PLANES,
    sononet16,
)


def test_the_published_backbones_and_a_small_one_are_registered() -> None:
    names = list_backbones()
    for name in ("resnet34", "densenet169", "sononet16", "mobilenetv3_large_100", "efficientnet_b0"):
        assert name in names


@pytest.mark.parametrize("name", list_backbones())
def test_every_backbone_forward_backward_and_config(name: str) -> None:
    spec = get_backbone_spec(name)
    pre = spec.preprocessing
    assert pre.channels in (1, 3) and len(pre.input_size) == 2 and spec.weights_origin
    torch.manual_seed(0)
    model = create_model(name, num_classes=3)
    h, w = (64, 64) if name != "sononet16" else (64, 80)
    x = torch.randn(2, pre.channels, h, w, requires_grad=True)
    feats = model.forward_features(x)
    emb = model.forward_head(feats, pre_logits=True)
    out = model.forward_head(feats)
    assert emb.shape == (2, embedding_dim(model)) and out.shape == (2, 3)
    out.sum().backward()
    assert torch.isfinite(out).all() and x.grad is not None and torch.isfinite(x.grad).all()
    # the Grad-CAM layer named in the config exists and produces a spatial map
    layer = get_module(model, spec.cam_layer)
    grabbed = []
    handle = layer.register_forward_hook(lambda m, i, o: grabbed.append(o))
    model(x)
    handle.remove()
    assert grabbed[0].ndim == 4


def test_unknown_backbone_and_wrong_source_are_clear_errors() -> None:
    with pytest.raises(ModelError, match="unknown backbone 'vgg99'.*choose one of"):
        create_model("vgg99", 2)
    with pytest.raises(ModelError, match="pretrained='sononet' is not available for 'resnet34'"):
        create_model("resnet34", 2, "sononet")
    with pytest.raises(ModelError, match="layer 'layer9' not found"):
        get_module(create_model("resnet34", 2), "layer9")


def test_bundled_sononet_weights_are_the_published_file() -> None:
    from fetalscan.fileio import sha256_file

    assert sha256_file(SONONET16_WEIGHTS) == SONONET16_SHA256
    assert (SONONET16_WEIGHTS.parent / "LICENSE").is_file() and (SONONET16_WEIGHTS.parent / "NOTICE").is_file()


def _sononet_input(path: Path) -> torch.Tensor:
    """The original SonoNet preprocessing (crop of the scanner frame, grey, 224x288, standardise x255)."""
    from PIL import Image

    im = np.asarray(Image.open(path).convert("RGB"))[115:734, 81:874]
    im = np.asarray(Image.fromarray(im).resize((288, 224), Image.BICUBIC), dtype=np.float32).mean(2)
    x = torch.from_numpy(im)[None, None]
    return 255.0 * (x - x.mean()) / x.std(unbiased=False)


def test_sononet16_names_the_example_planes(sononet_examples: Path) -> None:
    model = sononet16(pretrained=True).eval()
    expected = {"3VV": "3VV", "4CH": "4CH", "ABDOMINAL": "Abdominal", "BRAIN-CB": "Brain (Cb.)",
                "BRAIN-TV": "Brain (Tv.)", "FEMUR": "Femur", "KIDNEYS": "Kidneys", "LIPS": "Lips",
                "LVOT": "LVOT", "PROFILE": "Profile", "RVOT": "RVOT", "SPINE-CORONAL": "Spine (cor.)",
                "SPINE-SAGITTAL": "Spine (sag.)"}
    correct = 0
    with torch.inference_mode():
        for stem, plane in expected.items():
            p = model(_sononet_input(sononet_examples / f"{stem}.tiff")).softmax(1)[0]
            correct += SONONET_PLANES[int(p.argmax())] == plane
    assert correct >= 12


def test_sononet_head_folding_matches_the_original_layer_maths() -> None:
    """Pool -> folded Linear equals the original 1x1 conv + BN + pool of the published layout."""
    state = torch.load(SONONET16_WEIGHTS, map_location="cpu", weights_only=True)
    model = sononet16(pretrained=True).eval()
    x = torch.randn(1, 1, 64, 80)
    with torch.inference_mode():
        fmap = model.forward_features(x)
        conv = torch.nn.functional.conv2d(fmap, state["adaption.3.weight"])
        bn = torch.nn.functional.batch_norm(conv, state["adaption.4.running_mean"], state["adaption.4.running_var"],
                                            state["adaption.4.weight"], state["adaption.4.bias"], False, 0.0, 1e-5)
        original = bn.mean(dim=(2, 3))
        ours = model.forward_head(fmap)
    assert torch.allclose(original, ours, atol=1e-4)


def test_new_task_keeps_backbone_and_gets_a_fresh_head() -> None:
    pretrained = create_model("sononet16", 4, "sononet")
    scratch = create_model("sononet16", 4, "none")
    ref = sononet16(pretrained=True)
    assert torch.equal(pretrained.features[0][0][0].weight, ref.features[0][0][0].weight)
    assert not torch.equal(scratch.features[0][0][0].weight, ref.features[0][0][0].weight)
    assert pretrained.classifier.out_features == 4


def test_imagenet_path_loads_a_local_file_through_timm(tmp_path: Path) -> None:
    """The real download-and-cache loader, pointed at a file saved locally (no network)."""
    import timm

    source = timm.create_model("efficientnet_b0", pretrained=False, num_classes=1000)
    torch.save(source.state_dict(), tmp_path / "weights.pth")
    model = load_imagenet_backbone("efficientnet_b0.ra_in1k", tmp_path / "weights.pth", num_classes=3)
    assert torch.equal(model.conv_stem.weight, source.conv_stem.weight)
    assert model.classifier.out_features == 3  # head re-initialised for the new task


def test_imagenet_weights_dir_environment_variable(tmp_path: Path, monkeypatch) -> None:
    import timm

    source = timm.create_model("resnet34", pretrained=False)
    torch.save(source.state_dict(), tmp_path / "resnet34.tv_in1k.pth")
    monkeypatch.setenv("FETALSCAN_WEIGHTS_DIR", str(tmp_path))
    model = create_model("resnet34", 2, "imagenet")
    assert torch.equal(model.conv1.weight, source.conv1.weight)


def test_missing_imagenet_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="not found"):
        load_imagenet_backbone("resnet34.tv_in1k", tmp_path / "absent.pth", num_classes=2)


def test_pretrained_from_a_state_dict_file(tmp_path: Path) -> None:
    donor = create_model("sononet16", 5, "sononet")
    torch.save(donor.state_dict(), tmp_path / "donor.pt")
    model = create_model("sononet16", 2, str(tmp_path / "donor.pt"))  # other head size: head skipped
    assert torch.equal(model.adaption[0].weight, donor.adaption[0].weight)
    with pytest.raises(ModelError, match="do not match this architecture"):
        create_model("resnet34", 2, str(tmp_path / "donor.pt"))
