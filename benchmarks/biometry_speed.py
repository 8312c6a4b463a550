"""Speed of head biometry (segmentation + ellipse + measurement) per image on the CPU.

Baseline: plain eager PyTorch (the model in evaluation mode under ``torch.no_grad``).
Ours: the same network exported to ONNX and run by onnxruntime, as
``HeadSegmenter(backend="onnx")`` does by default on a CPU. Both include the same
preprocessing (resize, grey, standardisation), logit upsampling to the original
size, connected components, ellipse fit and HC/BPD/OFD/GA; image decoding is
timed separately and not included. The goal is <= 50 ms per image on 2 cores.

    .venv/bin/python benchmarks/biometry_speed.py [--model runs/biometry_final/model.pt] [--threads 2]

Without ``--model`` (or when the file is missing) an untrained segmenter of the
default architecture is timed: speed does not depend on the weights.
"""

from __future__ import annotations

import argparse
import csv
import os
import statistics
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
HC18 = REPO.parent / "shared" / "data" / "hc18" / "manifest.csv"


def _images(manifest: Path, n: int):
    from fetalscan.data.records import read_image

    with open(manifest, newline="") as fh:
        rows = list(csv.DictReader(fh))
    step = max(1, len(rows) // n)
    picked = rows[::step][:n]
    t0 = time.perf_counter()
    images = [(read_image(manifest.parent / r["image"]), float(r["pixel_size_mm"])) for r in picked]
    decode_ms = (time.perf_counter() - t0) / len(images) * 1000
    return images, decode_ms


def _segmenter(model: Path | None, backend: str):
    from fetalscan.biometry.segmenter import HeadSegmenter
    from fetalscan.biometry.training import BiometryTrainConfig
    from fetalscan.models.segmenters import build_segmenter

    if model is not None and model.is_file():
        return HeadSegmenter.load(model, "cpu", backend)
    cfg = BiometryTrainConfig().segmenter()  # the default recipe's architecture
    return HeadSegmenter(build_segmenter(cfg), cfg, {}, device="cpu", backend=backend)


def _time_interleaved(fns, images, repeats: int) -> list[list[float]]:
    """Per-image times (ms) of each function, run alternately so both see the same machine load."""
    for image, ps in images[:3]:
        for fn in fns:
            fn(image, ps)  # warm-up
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for image, ps in images:
            for k, fn in enumerate(fns):
                t0 = time.perf_counter()
                fn(image, ps)
                times[k].append((time.perf_counter() - t0) * 1000)
    return times


def main() -> None:
    import torch

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=REPO / "runs" / "biometry_final" / "model.pt")
    ap.add_argument("--data", type=Path, default=HC18, help="HC18-style manifest")
    ap.add_argument("--images", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2, help="CPU threads for both engines (default: 2)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    images, decode_ms = _images(args.data, args.images)

    eager = _segmenter(args.model, "torch")
    ours = _segmenter(args.model, "onnx")
    ours._session = None
    from fetalscan.biometry.segmenter import onnx_session

    ours._session = onnx_session(ours.model, ours.cfg, threads=args.threads)

    def baseline(image, ps):
        from fetalscan.data.transforms import normalize

        x = normalize(eager.prepare(image)[None], eager.pre)
        with torch.no_grad():
            logit = eager.model(x)[0, 0].numpy()
        return eager.measure_logits(logit, image.shape[:2], ps)

    def fast(image, ps):
        return ours.measure(image, ps)

    # the two paths must agree before their speed is compared
    for image, ps in images[:3]:
        a, b = baseline(image, ps), fast(image, ps)
        if a.found and b.found:
            assert abs(a.hc - b.hc) < 0.5, (a.hc, b.hc)

    t_base, t_ours = _time_interleaved([baseline, fast], images, args.repeats)
    # split of our time: network vs everything else
    x = ours.prepare(images[0][0])[None]
    t_net = []
    for _ in range(10):
        t0 = time.perf_counter()
        ours.logits(x)
        t_net.append((time.perf_counter() - t0) * 1000)
    base_ms, ours_ms = statistics.median(t_base), statistics.median(t_ours)
    print(f"model: {args.model if args.model and args.model.is_file() else 'untrained default architecture'} "
          f"({ours.cfg.encoder} U-Net, input {ours.cfg.input_height}x{ours.cfg.input_width}); "
          f"{len(images)} HC18 images x {args.repeats}; {args.threads} CPU thread(s)")
    print(f"image decoding (not included): {decode_ms:.1f} ms/image; machine load average "
          f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} cores (other processes slow both paths)")
    print(f"baseline  eager PyTorch (no_grad):   {base_ms:6.1f} ms/image (median; p90 "
          f"{statistics.quantiles(t_base, n=10)[-1]:.1f})")
    print(f"ours      onnxruntime + same post:  {ours_ms:6.1f} ms/image (median; p90 "
          f"{statistics.quantiles(t_ours, n=10)[-1]:.1f}); network alone {statistics.median(t_net):.1f} ms")
    print(f"ratio baseline/ours: {base_ms / ours_ms:.2f}x; goal <= 50 ms/image: "
          f"{'met' if ours_ms <= 50 else 'NOT met'}")


if __name__ == "__main__":
    main()
