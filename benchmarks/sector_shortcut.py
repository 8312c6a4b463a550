"""Does the area outside the scan sector tell the image source? The shortcut probe with and without the sector mask.

On the shared fetal_brain set every ``normal`` image comes from FETAL_PLANES_DB and every
abnormal one from another source (``shared/data/README.md``), so a probe that sees no
anatomy can separate normal from abnormal by image style. The probe is fetalscan's own
(:mod:`fetalscan.evaluation.shortcut`: L2 logistic regression on low-level image
statistics, out-of-fold under the grouped stratified 5-fold split a ``fetalscan cv`` run
makes with seed 0, after the rare-class merge into ``other``), scored as the report
scores it: normal-vs-abnormal AUROC (1 - p(normal)), at patient level (mean of the
images) and image level, with 95 % patient-bootstrap intervals (1000 resamples).

Three settings:

- ``original``    the probe as ``fetalscan cv`` / ``report`` run it (file compression included);
- ``pixels only`` the same without the file's bits per pixel (a file property, not a pixel one:
                  a masked copy written to a new file would change it);
- ``sector mask`` pixels only, every image blanked outside its scan sector (fetalscan.data.sector).

The baseline is ``pixels only``; ``ours`` is ``sector mask``; the ratio is ours / baseline of the
patient-level AUROC above chance (AUROC - 0.5).

Run:  python benchmarks/sector_shortcut.py [--out benchmarks/results/sector_shortcut.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from fetalscan.data.records import load_dataset, read_image  # noqa: E402
from fetalscan.data.sector import detect_sector, apply_mask  # noqa: E402
from fetalscan.data.shared import shared_data  # noqa: E402
from fetalscan.errors import DataError  # noqa: E402
from fetalscan.evaluation.bootstrap import auroc_with_ci  # noqa: E402
from fetalscan.evaluation.shortcut import feature_names, image_features, out_of_fold_probabilities  # noqa: E402
from fetalscan.inference.tables import aggregate_groups, prob_columns  # noqa: E402
from fetalscan.splits import apply_rare_class_policy, stratified_group_kfold  # noqa: E402

FOLDS, SEED, N_BOOT = 5, 0, 1000


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "sector_shortcut.json")
    args = ap.parse_args()
    root = shared_data("fetal_brain")
    if root is None:
        print("shared fetal_brain data not found (set FETALSCAN_SHARED); nothing measured")
        return 1
    manifest = root / "manifest.csv"
    data = apply_rare_class_policy(load_dataset(manifest), FOLDS, "merge")
    labels, groups = data.labels, data.groups
    fold = np.zeros(len(data), dtype=int)
    for f, idx in enumerate(stratified_group_kfold(labels, groups, FOLDS, SEED)):
        fold[idx] = f
    t0 = time.perf_counter()
    plain, masked, kept, not_found = [], [], [], 0
    for r in data.records:
        image = read_image(r.path)
        try:
            mask = detect_sector(image).mask
        except DataError:  # no sector found: the image is used whole, as --sector-mask does
            mask, not_found = np.ones(image.shape[:2], dtype=bool), not_found + 1
        kept.append(float(mask.mean()))
        plain.append(image_features(image, r.path.stat().st_size))
        masked.append(image_features(apply_mask(image, mask)))
    seconds = time.perf_counter() - t0
    plain, masked = np.array(plain), np.array(masked)
    bpp = feature_names().index("file_bits_per_pixel")
    no_file = plain.copy()
    no_file[:, bpp] = 0.0
    index = {c: i for i, c in enumerate(data.classes)}
    y = np.array([index[c] for c in labels])
    results = {name: _score(feats, y, fold, data) for name, feats in
               (("original", plain), ("pixels only", no_file), ("sector mask", masked))}
    out = {"n_images": len(data), "n_groups": len(set(groups)), "classes": data.classes, "folds": FOLDS,
           "seed": SEED, "n_boot": N_BOOT, "feature_seconds": round(seconds, 1),
           "sector_fraction_mean": float(np.mean(kept)), "sector_fraction_min": float(np.min(kept)),
           "sector_not_found": not_found,
           "results": results}
    print(f"{len(data)} images, {len(set(groups))} groups, classes {data.classes}; sector keeps "
          f"{np.mean(kept):.0%} of a frame on average (min {np.min(kept):.0%}; not found in {not_found}); "
          f"features {seconds:.0f} s")
    print(f"{'setting':<12} {'patient AUROC (95% CI)':<28} {'image AUROC (95% CI)':<28}")
    for name, r in results.items():
        p, i = r["patient"], r["image"]
        print(f"{name:<12} {p['auroc']:.3f} ({p['ci'][0]:.3f}-{p['ci'][1]:.3f}){'':<8} "
              f"{i['auroc']:.3f} ({i['ci'][0]:.3f}-{i['ci'][1]:.3f})")
    base, ours = results["pixels only"]["patient"]["auroc"], results["sector mask"]["patient"]["auroc"]
    print(f"baseline (pixels only) {base:.3f}, ours (sector mask) {ours:.3f}, "
          f"ratio of AUROC above chance {(ours - 0.5) / (base - 0.5):.2f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    return 0


def _score(feats: np.ndarray, y: np.ndarray, fold: np.ndarray, data) -> dict:
    probs = out_of_fold_probabilities(feats, y, fold, len(data.classes))
    img = pd.DataFrame({"path": [str(r.path) for r in data.records], "group": data.groups, "label": data.labels,
                        "fold": fold})
    for j, col in enumerate(prob_columns(data.classes)):
        img[col] = probs[:, j]
    img["pred"] = [data.classes[i] for i in probs.argmax(1)]
    pat = aggregate_groups(img, data.classes, "mean", "normal")
    out = {}
    for level, df in (("patient", pat), ("image", img)):
        a = auroc_with_ci(1 - df["p_normal"].to_numpy(), df["label"].astype(str).to_numpy() != "normal",
                          df["group"].astype(str).tolist(), n_boot=N_BOOT, seed=SEED)
        out[level] = {"auroc": a["auroc"], "ci": a["ci"]}
    return out


if __name__ == "__main__":
    raise SystemExit(main())
