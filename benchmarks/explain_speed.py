"""Cost of one heatmap relative to one inference, on the CPU (goal: at most 2x).

Baseline: plain inference of a batch of real fetal-brain images in evaluation mode
under ``torch.inference_mode`` (``fetalscan.train.predict_logits``: normalisation +
forward). Ours: ``fetalscan.explain.compute_cams`` on the same batch (normalisation,
one forward with the target layer's output re-made a leaf, the short backward from
the logits to that layer, the CAM, and the library's release of its hooks and our
restoring of the model state) plus the resize of every map to the original image
size. Both run in the same process, interleaved repeat by repeat so that machine
load hits both alike; medians per image are compared.

Score-CAM is gradient-free and needs one forward pass per channel of the CAM layer
(64 on SonoNet-16, 512 on ResNet34); it is timed separately on fewer images and is
far above 2x by design.

    .venv/bin/python benchmarks/explain_speed.py [--model model.pt] [--backbones sononet16,resnet34]
        [--batch 16] [--repeats 5] [--threads 2] [--no-scorecam]

Without ``--model`` each backbone is built with a fresh head (speed does not depend on
the weights; resnet34 uses --pretrained none, so no download is needed).
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data" / "fetal_brain" / "manifest.csv"
SAMPLE = REPO / "examples" / "fetal_brain_sample" / "manifest.csv"


def _images(manifest: Path, n: int):
    from fetalscan.data.records import iter_record_images, load_dataset

    records = load_dataset(manifest).records
    step = max(1, len(records) // n)
    picked = records[::step][:n]
    return [img for _, img in iter_record_images(picked)]


def _loaded(backbone: str, model: Path | None, n_classes: int = 4):
    from fetalscan.models.checkpoint import (
        LoadedModel,
        architecture_of,
        load_checkpoint,
    )
    from fetalscan.models.registry import get_backbone_spec
    from fetalscan.training.loop import TrainConfig, new_model

    if model is not None:
        return load_checkpoint(model, "cpu")
    pretrained = "sononet" if backbone == "sononet16" else "none"
    cfg = TrainConfig(backbone=backbone, pretrained=pretrained, mode="cached")
    net = new_model(cfg, n_classes).eval()
    classes = [f"c{i}" for i in range(n_classes)]
    return LoadedModel(net, classes, get_backbone_spec(backbone).preprocessing, architecture_of(cfg, n_classes))


def _per_image_ms(fn, n_images: int) -> float:
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1000 / n_images


def bench(loaded, images, batch: int, repeats: int, methods: list[str], scorecam: bool) -> None:
    import torch

    from fetalscan.data.transforms import normalize, prepare
    from fetalscan.explain.cams import METHODS, compute_cams, layer_for, resize_heatmap
    from fetalscan.inference.predict import predict_logits

    pre, model = loaded.preprocessing, loaded.model
    layer = layer_for(loaded)
    x = torch.stack([prepare(img, pre) for img in images[:batch]])
    sizes = [img.shape[:2] for img in images[:batch]]
    n = len(x)
    device = torch.device("cpu")

    def baseline():
        predict_logits(model, x, pre, device, batch_size=n)

    def ours(method: str):
        def run():
            res = compute_cams(model, normalize(x, pre), layer, method)
            for m, size in zip(res.maps, sizes):
                resize_heatmap(m, size)
        return run

    baseline()
    for m in methods:
        ours(m)()  # warm-up (first call imports the CAM library)
    base_t: list[float] = []
    ours_t: dict[str, list[float]] = {m: [] for m in methods}
    for _ in range(repeats):
        base_t.append(_per_image_ms(baseline, n))
        for m in methods:
            ours_t[m].append(_per_image_ms(ours(m), n))
    base = statistics.median(base_t)
    arch = loaded.architecture.get("backbone")
    print(f"{arch}: batch of {n} real images (input {pre.input_size[0]}x{pre.input_size[1]}), CAM layer "
          f"{layer!r}, {repeats} interleaved repeats, {torch.get_num_threads()} CPU thread(s)")
    print(f"  baseline  inference (inference_mode):     {base:7.1f} ms/image (median)")
    for m in methods:
        ms = statistics.median(ours_t[m])
        print(f"  ours      {METHODS[m]:<11} + resize to original {ms:7.1f} ms/image (median)  ratio {ms / base:.2f}x "
              f"(goal <= 2x: {'met' if ms <= 2 * base else 'NOT met'})")
    if scorecam:
        k = min(2, n)
        t0 = time.perf_counter()
        compute_cams(model, normalize(x[:k], pre), layer, "scorecam")
        ms = (time.perf_counter() - t0) * 1000 / k
        print(f"  Score-CAM (separately, {k} images, gradient-free: one forward per channel): {ms:7.1f} ms/image "
              f"ratio {ms / base:.1f}x (not expected to meet 2x)")


def main() -> None:
    import torch

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=None, help="a fetalscan checkpoint (default: fresh heads)")
    ap.add_argument("--backbones", default="sononet16,resnet34", help="comma-separated, without --model")
    ap.add_argument("--data", type=Path, default=SHARED if SHARED.is_file() else SAMPLE)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--methods", default="gradcam,gradcam++,eigencam")
    ap.add_argument("--scorecam", action=argparse.BooleanOptionalAction, default=True)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    images = _images(args.data, args.batch)
    print(f"images: {len(images)} from {args.data}")
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if args.model is not None:
        bench(_loaded("", args.model), images, args.batch, args.repeats, methods, args.scorecam)
        return
    for backbone in args.backbones.split(","):
        bench(_loaded(backbone.strip(), None), images, args.batch, args.repeats, methods, args.scorecam)


if __name__ == "__main__":
    main()
