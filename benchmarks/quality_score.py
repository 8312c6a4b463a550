"""Fit and judge the quality score out of fold; write the shipped quality models.

Usage: python benchmarks/quality_score.py SIGNALS_CSV [SIGNALS_CSV ...] [--out runs/quality/quality_eval.json]
       [--write-models] [--segmenter TEXT]

Each SIGNALS_CSV comes from ``benchmarks/quality_signals.py`` (HC18 images of exams the segmenter
that measured them never saw; several CSVs = the folds of a cross-validation, concatenated). Failure = |HC difference| > 5 mm or no head found. For the full model (image +
segmentation signals) and the image-only model: grouped (by exam) stratified 5-fold; in each fold
the logistic regression and its re-acquire threshold are fitted on the other 4 folds only.
Prints the AUROC of the score for failure with a 95 % exam-bootstrap CI, the re-acquire rule's
sensitivity / specificity / share flagged, and the error-coverage curve. With --write-models the
final models (fitted on all rows; threshold chosen on them) go to src/fetalscan/quality/models/.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parents[1]


def main(argv=None) -> int:
    from fetalscan.quality.score import (
        FULL_FEATURES,
        IMAGE_FEATURES,
        MODEL_DIR,
        error_coverage,
        evaluate_out_of_fold,
        failure_labels,
        fit_quality_model,
    )

    ap = argparse.ArgumentParser()
    ap.add_argument("signals", type=Path, nargs="+")
    ap.add_argument("--segmenter", default="runs/quality/model.pt",
                    help="how the signals' segmenters were made (written into the shipped models' provenance)")
    ap.add_argument("--out", type=Path, default=REPO / "runs" / "quality" / "quality_eval.json")
    ap.add_argument("--write-models", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)

    df = pd.concat([pd.read_csv(f) for f in a.signals], ignore_index=True)
    if df["image"].duplicated().any():
        raise SystemExit(f"an image appears in two signal tables: {df.loc[df['image'].duplicated(), 'image'].iloc[0]}")
    df["head_found"] = df["head_found"].astype(str) == "True"
    abs_err = np.abs(df["hc_diff_mm"].to_numpy(dtype=float))
    y = failure_labels(abs_err, df["head_found"])
    groups = df["exam"].astype(str).to_numpy()
    print(f"{len(df)} images of {len(set(groups))} exams never seen by the segmenter; failures: {y.sum()} "
          f"({y.mean():.1%}; {int((~df['head_found']).sum())} without a head); mean |HC diff| "
          f"{np.nanmean(abs_err):.2f} mm (median {np.nanmedian(abs_err):.2f})")
    report: dict = {"n": int(len(df)), "n_exams": int(len(set(groups))), "n_failures": int(y.sum()),
                    "n_no_head": int((~df["head_found"]).sum()),
                    "mean_abs_hc_diff_mm": float(np.nanmean(abs_err)), "models": {}}
    # single signals, out of fold sign-free: AUROC of each signal alone (sign fitted on training folds)
    singles = {}
    for name, feats in (("full", list(FULL_FEATURES)), ("image", list(IMAGE_FEATURES))):
        res = evaluate_out_of_fold(df, y, groups, feats, n_splits=5, seed=a.seed, abs_err=abs_err)
        q = res.pop("quality")
        flag = res.pop("reacquire")
        res.pop("fold")
        df[f"quality_oof_{name}"] = q
        df[f"reacquire_oof_{name}"] = flag
        report["models"][name] = res
        lo, hi = res["auroc_ci95"]
        rr = res["reacquire_rule"]
        print(f"\n[{name}] AUROC {res['auroc']:.3f} (95% CI {lo:.3f}-{hi:.3f}, exam bootstrap); re-acquire rule "
              f"(threshold from training folds, {np.min(res['thresholds']):.2f}-{np.max(res['thresholds']):.2f}): "
              f"sensitivity {rr['sensitivity']:.2f}, specificity {rr['specificity']:.2f}, flagged {rr['share_flagged']:.1%}")
        for row in res["error_coverage"]:
            print(f"  set aside lowest {row['set_aside']:4.0%} ({row['n_set_aside']:3d}): mean |HC diff| "
                  f"{row['mean_abs_hc_diff_mm']:.2f} mm, > 5 mm {row['share_over_5mm']:.1%}")
    for f in FULL_FEATURES:
        res = evaluate_out_of_fold(df, y, groups, [f], n_splits=5, seed=a.seed, n_boot=200)
        singles[f] = res["auroc"]
    report["single_signal_auroc_oof"] = singles
    print("\nsingle signals, out of fold: " + ", ".join(f"{k} {v:.2f}" for k, v in singles.items()))
    # error of the re-acquire rule of the full model: with and without abstention
    flag = df["reacquire_oof_full"].to_numpy(bool)
    kept = abs_err[~flag]
    report["reacquire_full_oof"] = {"mean_abs_hc_diff_all_mm": float(np.nanmean(abs_err)),
                                    "mean_abs_hc_diff_kept_mm": float(np.nanmean(kept)),
                                    "share_flagged": float(flag.mean())}
    print(f"full model re-acquire rule: mean |HC diff| {np.nanmean(abs_err):.2f} mm on all measured images, "
          f"{np.nanmean(kept):.2f} mm on the {(~flag).sum()} kept ({flag.mean():.1%} flagged)")
    if a.write_models:
        MODEL_DIR.mkdir(exist_ok=True)
        for name, feats in (("full", list(FULL_FEATURES)), ("image", list(IMAGE_FEATURES))):
            m = fit_quality_model(df, y, feats, name=name, seed=a.seed)
            m.meta.update({"fitted_on": f"{len(df)} HC18 images of {len(set(groups))} exams, each measured by a "
                           f"segmenter that never saw its exam: {a.segmenter} (benchmarks/quality_signals.py)",
                           "oof_auroc": report["models"][name]["auroc"],
                           "oof_auroc_ci95": report["models"][name]["auroc_ci95"],
                           "threshold_rule": "lowest cut-off flagging >= 80 % of the training failures (quality < threshold)"})
            m.to_json(MODEL_DIR / f"quality_{name}.json")
            print(f"wrote {MODEL_DIR / f'quality_{name}.json'} (threshold {m.threshold:.3f})")
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(report, indent=1))
    df.to_csv(a.out.with_suffix(".oof.csv"), index=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
