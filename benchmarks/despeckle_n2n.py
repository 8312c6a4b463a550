"""Train the Neighbor2Neighbor despeckling network (fetalscan.quality.n2n) and ship it as ONNX.

Usage: python benchmarks/despeckle_n2n.py [--steps 1500] [--split runs/quality/split.csv]

Training images: the HC18 images of the exams the head segmenter was trained on (split.csv), so
that the network never sees the images the despeckling benchmark judges it on. Images are grey,
resized to 384 x 256 (the working size of fetalscan.quality.despeckle). The stride is
ceil(median speckle correlation length) of the training images at that size.
Writes src/fetalscan/quality/models/despeckle_n2n.onnx and despeckle_n2n.json.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--split", type=Path, default=REPO / "runs" / "quality" / "split.csv")
    ap.add_argument("--steps", type=int, default=1500)
    a = ap.parse_args(argv)
    import cv2
    import torch

    torch.set_num_threads(2)
    from fetalscan.quality.despeckle import speckle_correlation_length
    from fetalscan.quality.n2n import N2NConfig, N2NDenoiser, export_onnx, train_n2n
    from fetalscan.quality.score import MODEL_DIR

    paths = [r["image"] for r in csv.DictReader(open(a.split))]
    imgs = [cv2.resize(cv2.imread(p, cv2.IMREAD_GRAYSCALE), (384, 256), interpolation=cv2.INTER_AREA) for p in paths]
    corr = [speckle_correlation_length(im) for im in imgs[::10]]
    stride = max(2, int(math.ceil(float(np.median(corr)))))
    print(f"{len(imgs)} training images; speckle correlation length at 384 x 256: median {np.median(corr):.2f} px "
          f"-> stride {stride}", flush=True)
    cfg = N2NConfig(stride=stride, steps=a.steps)
    t0 = time.perf_counter()
    model = train_n2n(imgs, cfg, log_every=100, log=lambda s: print(s, flush=True))
    secs = time.perf_counter() - t0
    onnx_path = MODEL_DIR / "despeckle_n2n.onnx"
    export_onnx(model, onnx_path)
    meta = {"config": cfg.to_dict(), "train_seconds": secs, "n_train_images": len(imgs),
            "train_images": f"HC18 images of the segmenter's training exams ({a.split.name})",
            "correlation_length_px_median": float(np.median(corr)), "working_size": [256, 384]}
    (MODEL_DIR / "despeckle_n2n.json").write_text(json.dumps(meta, indent=1) + "\n")
    den = N2NDenoiser(onnx_path, stride)
    x = imgs[0].astype(np.float32) / 255.0
    ts = []
    for _ in range(10):
        t = time.perf_counter()
        den(x)
        ts.append(time.perf_counter() - t)
    print(f"trained in {secs:.0f} s; ONNX {onnx_path.stat().st_size / 1024:.0f} KiB; median "
          f"{1000 * np.median(ts):.1f} ms per 256 x 384 image (onnxruntime, 2 threads)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
