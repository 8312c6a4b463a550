"""Compute the quality signals and the HC error of the HC18 images a segmenter never saw.

Usage: python benchmarks/quality_signals.py MODEL_DIR OUT_CSV [--manifest CSV] [--limit N]

MODEL_DIR holds ``model.pt`` and ``split.csv`` (image,exam,role: every image the model was
trained or early-stopped on; ``holdout`` rows were not). Scored are the rows of ``--manifest``
(default: the shared HC18 manifest) whose *exam* the model never trained or early-stopped on (so
no image of a seen exam is scored). Writes one row per image: exam, the signals, hc_mm,
hc_ref_mm, hc_diff_mm, status.

For a cross-validated fit, train one segmenter per fold of the development exams and run this
once per fold with that fold's test manifest; ``quality_score.py`` takes all the CSVs.
"""

from __future__ import annotations

import argparse
import csv
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
HC18 = REPO.parent / "shared" / "data" / "hc18" / "manifest.csv"


def unseen_manifest(model_dir: Path, out_csv: Path, limit: int | None = None, manifest: Path = HC18) -> Path:
    with open(model_dir / "split.csv", newline="") as fh:
        seen = {r["exam"] for r in csv.DictReader(fh) if r["role"] != "holdout"}
    with open(manifest, newline="") as fh:
        rows = [r for r in csv.DictReader(fh) if r["exam"] not in seen]
    if limit:
        rows = rows[:limit]
    with open(out_csv, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=["image", "mask", "exam", "pixel_size_mm", "hc_mm"])
        w.writeheader()
        for r in rows:
            w.writerow({**r, "image": str(manifest.parent / r["image"]), "mask": str(manifest.parent / r["mask"])})
    return out_csv


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("model_dir", type=Path)
    ap.add_argument("out_csv", type=Path)
    ap.add_argument("--manifest", type=Path, default=HC18)
    ap.add_argument("--limit", type=int, default=None)
    a = ap.parse_args(argv)
    import torch

    torch.set_num_threads(2)
    from fetalscan.biometry.predict import prediction_records, reference_hc_mm
    from fetalscan.biometry.quality_run import QualityConfig, signals_for_records
    from fetalscan.biometry.segmenter import HeadSegmenter

    man = unseen_manifest(a.model_dir, a.out_csv.with_suffix(".manifest.csv"), a.limit, a.manifest.resolve())
    records = prediction_records(man)
    refs = [reference_hc_mm(r) for r in records]
    seg = HeadSegmenter.load(a.model_dir / "model.pt", "cpu", "onnx")
    t0 = time.perf_counter()
    df = signals_for_records(records, seg, QualityConfig(), "cpu", refs)
    df.insert(1, "exam", [r.group for r in records])
    df.to_csv(a.out_csv, index=False)
    print(f"{len(df)} images, {df['exam'].nunique()} exams, {time.perf_counter() - t0:.0f} s -> {a.out_csv}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
