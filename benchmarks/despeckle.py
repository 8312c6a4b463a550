"""Despeckling judged by its downstream effect (docs/quality.md).

Usage: python benchmarks/despeckle.py [--n 30] [--model runs/quality/model.pt] [--manifest CSV] [--out runs/quality/despeckle.json]
       python benchmarks/despeckle.py --speed-only      # timing alone, for a quiet machine

For each method (none = baseline, nl_means, bilateral, tv — each J-invariant-calibrated per image,
fetalscan.quality.despeckle — and n2n, the self-supervised network of fetalscan.quality.n2n)
and each noise condition (original; synthetic multiplicative speckle:
Rayleigh fully developed, gamma 2 looks, gamma 1 look — all with 1 px correlation, seeded per image):

- HC18 (``--n`` images of exams the segmenter never saw, evenly spaced in the unseen list):
  mean |HC difference| (mm) and Dice (filled fitted ellipse vs reference mask) of the head
  segmenter; CNR and gCNR between the reference head mask and a ring around it;
- plane gate: SonoNet-16 accuracy on the 13 published example planes (scanner frame cropped first,
  noise and denoising applied to the frame);
- speed: median ms per image of each method on a 256 x 384 image (calibration + denoising; 2 threads).

Recovered share = (metric with the method under noise - baseline under noise) /
(baseline on originals - baseline under noise), for |HC difference| and plane accuracy.
Paired 95 % bootstrap intervals (2 000 resamples of the HC18 exams, the same resample for every
term) are given for the change in |HC difference| and Dice against no denoising under the same
noise, and for the recovered share of |HC difference| and Dice; images where either arm finds no
head are left out of the |HC difference| pairs (no-head counts are printed). The plane gate is
13 images: its counts are given, without an interval.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
EXPECTED = {
    "3VV": "3VV", "4CH": "4CH", "ABDOMINAL": "Abdominal", "BRAIN-CB": "Brain (Cb.)", "BRAIN-TV": "Brain (Tv.)",
    "FEMUR": "Femur", "KIDNEYS": "Kidneys", "LIPS": "Lips", "LVOT": "LVOT", "PROFILE": "Profile",
    "RVOT": "RVOT", "SPINE-CORONAL": "Spine (cor.)", "SPINE-SAGITTAL": "Spine (sag.)",
}
#: name -> (kind, level or looks)
CONDITIONS = {"original": None, "rayleigh": ("rayleigh", 1.0), "gamma_L2": ("gamma", 2.0), "gamma_L1": ("gamma", 1.0)}


def noisy(image: np.ndarray, cond, seed: int) -> np.ndarray:
    from fetalscan.quality.despeckle import add_speckle, speckle_field

    if cond is None:
        return image
    kind, v = cond
    if kind == "rayleigh":
        return add_speckle(image, v, "rayleigh", correlation_px=1.0, seed=seed)
    f = speckle_field(image.shape[:2], "gamma", looks=v, correlation_px=1.0, seed=seed)
    f = f[..., None] if image.ndim == 3 else f
    return np.clip(np.rint(image.astype(np.float32) * f), 0, 255).astype(np.uint8)


def paired_intervals(table: list[dict], exams: list[str], n_boot: int = 2000, seed: int = 0) -> None:
    """Add paired exam-bootstrap 95 % intervals (change vs no denoising, recovered share) to ``table`` rows."""
    from fetalscan.evaluation.bootstrap import (
        group_bootstrap_weights,
        percentile_interval,
    )

    rows = {(r["condition"], r["method"]): r for r in table}
    weights = np.concatenate(list(group_bootstrap_weights(exams, n_boot, seed)))  # (n_boot, n)

    def wmean(w, v, ok):
        return (w * ok) @ np.nan_to_num(v) / np.maximum((w * ok).sum(1), 1e-12)

    for (cond, method), r in rows.items():
        if method == "none":
            continue
        base_noisy, base_orig = rows[(cond, "none")], rows[("original", "none")]
        for key, col, sign in (("hc_abs_diff_mm", "per_image_hc_abs_diff_mm", -1), ("dice", "per_image_dice", 1)):
            m, bn, b0 = (np.asarray(x[col], float) for x in (r, base_noisy, base_orig))
            ok = np.isfinite(m) & np.isfinite(bn) & np.isfinite(b0)
            r[f"change_{key}"] = float(np.mean((m - bn)[ok]))
            r[f"change_{key}_ci95"] = percentile_interval(wmean(weights, m - bn, ok))
            if cond != "original":
                gain, lost = sign * wmean(weights, m - bn, ok), sign * wmean(weights, b0 - bn, ok)
                with np.errstate(divide="ignore", invalid="ignore"):
                    share = np.where(lost > 1e-9, gain / lost, np.nan)
                r[f"recovered_{key}_ci95"] = percentile_interval(share)


def _signed(v) -> str:
    return "-" if v is None else f"{v:+.2f}"


def _interval(row: dict, key: str) -> str:
    return "({:+.2f} to {:+.2f})".format(*row[key]) if key in row else ""


def measure_speed(image: np.ndarray, methods: list[str], reps: int = 20) -> dict:
    """Median and 90th-percentile ms per 256 x 384 image of each method (calibration + denoising),
    with the load average before and after (2 cores: other jobs inflate the figures)."""
    import os

    import cv2

    from fetalscan.quality.despeckle import DenoiseConfig, denoise_image

    img = cv2.resize(image, (384, 256), interpolation=cv2.INTER_AREA)
    load0 = os.getloadavg()[0]
    speed = {}
    for method in methods:
        cfg = DenoiseConfig(method=method)
        denoise_image(img, cfg)  # warm-up (loads the network once)
        ts = []
        for _ in range(reps):
            t0 = time.perf_counter()
            denoise_image(img, cfg)
            ts.append(1000 * (time.perf_counter() - t0))
        speed[method] = {"median": float(np.median(ts)), "p90": float(np.percentile(ts, 90))}
    speed["load_average_before_after"] = [load0, os.getloadavg()[0]]
    print("speed (ms / image at 256 x 384, calibration + denoising; median, p90): "
          + ", ".join(f"{k} {v['median']:.1f} / {v['p90']:.1f}" for k, v in speed.items() if k in methods)
          + f"; load average {load0:.2f} -> {os.getloadavg()[0]:.2f}; target <= 20 ms")
    return speed


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=30)
    ap.add_argument("--model", type=Path, default=REPO / "runs" / "quality" / "model.pt")
    ap.add_argument("--manifest", type=Path, default=REPO / "runs" / "quality" / "signals.manifest.csv")
    ap.add_argument("--methods", default="none,nl_means,bilateral,tv,n2n")
    ap.add_argument("--out", type=Path, default=REPO / "runs" / "quality" / "despeckle.json")
    ap.add_argument("--speed-only", action="store_true", help="only time the methods (on a quiet machine)")
    a = ap.parse_args(argv)
    import cv2
    import torch

    torch.set_num_threads(2)
    cv2.setNumThreads(2)
    from fetalscan.biometry.segmenter import HeadSegmenter
    from fetalscan.data.records import read_image
    from fetalscan.quality import signals as S
    from fetalscan.quality.despeckle import DenoiseConfig, denoise_image
    from fetalscan.quality.planes import classify_planes, crop_scanner_frame

    methods = a.methods.split(",")
    if a.speed_only:  # one shared HC18 image is enough; no segmenter or manifest needed
        first = sorted((SHARED / "data" / "hc18" / "images").glob("*.png"))[0]
        measure_speed(read_image(first)[..., 0], methods)
        return 0
    with open(a.manifest, newline="") as fh:
        rows = list(csv.DictReader(fh))
    idx = np.linspace(0, len(rows) - 1, a.n).round().astype(int)
    items = [rows[i] for i in idx]
    seg = HeadSegmenter.load(a.model, "cpu", "onnx")
    examples = sorted((SHARED / "models" / "sononet" / "example_images").glob("*.tiff"))
    frames = [crop_scanner_frame(read_image(f))[0] for f in examples]
    res: dict = {"n_images": len(items), "conditions": list(CONDITIONS), "methods": methods, "table": []}
    for cname, cond in CONDITIONS.items():
        for method in methods:
            cfg = DenoiseConfig(method=method)
            errs, dices, cnrs, gcnrs, nohead, params = [], [], [], [], 0, []
            per_err = []
            for k, it in enumerate(items):
                img = read_image(Path(it["image"]))[..., 0]
                ref = cv2.imread(it["mask"], cv2.IMREAD_GRAYSCALE) > 0
                x = noisy(img, cond, seed=1000 + k)
                d = denoise_image(x, cfg)
                params.append(d.params)
                m = seg.measure(d.image, float(it["pixel_size_mm"]))
                ring = S.surround_ring(ref) & S.scanned_area(d.image)
                cnrs.append(S.cnr(d.image, ref, ring))
                gcnrs.append(S.gcnr(d.image, ref, ring))
                if not m.found:
                    nohead += 1
                    dices.append(0.0)
                    per_err.append(float("nan"))
                    continue
                errs.append(abs(m.hc - float(it["hc_mm"])))
                per_err.append(errs[-1])
                e = m.ellipse
                dices.append(S.dice(e.filled_mask(ref.shape), ref))
            planes = []
            for j, fr in enumerate(frames):
                x = noisy(fr, cond, seed=2000 + j)
                planes.append(denoise_image(x, cfg).image)
            pr = classify_planes(planes, crop="none")
            acc = float(np.mean([r.plane == EXPECTED[f.stem] for f, r in zip(examples, pr)]))
            row = {"condition": cname, "method": method, "hc_abs_diff_mm": float(np.mean(errs)) if errs else None,
                   "dice": float(np.mean(dices)), "no_head": nohead, "cnr": float(np.nanmean(cnrs)),
                   "gcnr": float(np.nanmean(gcnrs)), "plane_accuracy": acc,
                   "params_example": params[0] if params else {}, "per_image_hc_abs_diff_mm": per_err,
                   "per_image_dice": dices, "planes_correct": round(acc * len(frames))}
            res["table"].append(row)
            print(f"{cname:9s} {method:9s} |HC diff| {row['hc_abs_diff_mm']:.2f} mm  Dice {row['dice']:.3f}  "
                  f"no head {nohead}  CNR {row['cnr']:.3f}  gCNR {row['gcnr']:.3f}  planes {acc:.2f} ({round(acc*13)}/13)",
                  flush=True)
    # recovered share
    base = {(r["condition"], r["method"]): r for r in res["table"]}
    for r in res["table"]:
        if r["condition"] == "original" or r["method"] == "none":
            continue
        b0, bn = base[("original", "none")], base[(r["condition"], "none")]
        for key, sign in (("hc_abs_diff_mm", -1), ("plane_accuracy", 1), ("dice", 1)):
            lost = sign * (b0[key] - bn[key])
            r[f"recovered_{key}"] = (sign * (r[key] - bn[key]) / lost) if lost > 1e-9 else None
    paired_intervals(res["table"], [it["exam"] for it in items])
    res["speed_ms_256x384"] = measure_speed(read_image(Path(items[0]["image"]))[..., 0], methods)
    print("\nrecovered share of the loss under noise (1 = all, 0 = none, < 0 = worse):")
    for r in res["table"]:
        if "recovered_hc_abs_diff_mm" in r:
            print(f"  {r['condition']:9s} {r['method']:9s} |HC diff| {_signed(r['recovered_hc_abs_diff_mm'])} "
                  f"{_interval(r, 'recovered_hc_abs_diff_mm_ci95')}  Dice {_signed(r['recovered_dice'])} "
                  f"{_interval(r, 'recovered_dice_ci95')}  planes {_signed(r['recovered_plane_accuracy'])}")
    print("\nchange against no denoising under the same noise (paired; |HC diff| mm, Dice):")
    for r in res["table"]:
        if "change_hc_abs_diff_mm" in r:
            print(f"  {r['condition']:9s} {r['method']:9s} |HC diff| {r['change_hc_abs_diff_mm']:+.2f} "
                  "({:+.2f} to {:+.2f})".format(*r["change_hc_abs_diff_mm_ci95"])
                  + f"  Dice {r['change_dice']:+.3f} " + "({:+.3f} to {:+.3f})".format(*r["change_dice_ci95"]))
    a.out.write_text(json.dumps(res, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
