"""Biometry ablation: one lever at a time, scored on the same held-out HC18 exams.

Usage:
    python benchmarks/biometry_ablation.py --variant NAME=DIR[+DIR...][:tta] [--variant ...]
        [--abstain NAME] [--data MANIFEST] [--out benchmarks/results/biometry_ablation.json]

Every DIR is a ``fetalscan biometry train`` output (``model.pt``, ``split.csv``, ``train.json``).
The first variant's first DIR (trained with ``--holdout-fraction 0.2``) defines the held-out exams
and the inner-validation exams. A DIR with the same split (same seed) is scored on both; a DIR
trained on a subset of the other exams (e.g. one fold of a cross-validation of the development
exams) must not have seen any held-out image (checked) and is scored on the held-out exams only.
``A+B`` averages the logits of several models (an ensemble); ``:tta`` adds the left-right mirror
at test time.

Each variant is scored on its inner-validation images (the figure a recipe is *chosen* by; only
for variants on the reference split) and on the held-out exams (the figure *reported*; never
used to choose). ``--abstain NAME`` adds the
quality score's re-acquire rule for that variant: the held-out error with and without the images
it sets aside. Bootstrap CIs resample exams.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parents[1]
HC18 = REPO.parent / "shared" / "data" / "hc18" / "manifest.csv"


def parse_variant(text: str) -> tuple[str, list[Path], bool]:
    """``NAME=DIR[+DIR...][:tta]`` -> (name, dirs, tta)."""
    if "=" not in text:
        raise SystemExit(f"--variant {text!r}: expected NAME=DIR[+DIR...][:tta]")
    name, spec = text.split("=", 1)
    tta = spec.endswith(":tta")
    spec = spec[:-4] if tta else spec
    dirs = [Path(d) for d in spec.split("+") if d]
    for d in dirs:
        if not (d / "model.pt").is_file() or not (d / "split.csv").is_file():
            raise SystemExit(f"--variant {name}: {d} has no model.pt / split.csv (a biometry train output)")
    return name, dirs, tta


def roles_of(d: Path) -> dict[str, set[str]]:
    """Image names of ``d``'s split by role (train / inner_val / holdout)."""
    split = pd.read_csv(d / "split.csv")
    return {r: set(split.loc[split["role"] == r, "image"]) for r in ("train", "inner_val", "holdout")}


def same_split(dirs: list[Path], ref: dict[str, set[str]]) -> bool:
    """True if every dir has the reference split; exits if any saw a held-out image."""
    same = True
    for d in dirs:
        roles = roles_of(d)
        seen = (roles["train"] | roles["inner_val"]) & ref["holdout"]
        if seen:
            raise SystemExit(f"{d} trained or early-stopped on {len(seen)} held-out images (e.g. {sorted(seen)[0]})")
        same &= roles == ref
    return same


def train_info(d: Path) -> dict:
    info = json.loads((d / "train.json").read_text())
    cfg, fit = info["config"], info["fit"]
    return {"encoder": cfg["encoder"], "pretrained": cfg["pretrained"],
            "input": f"{cfg['input_height']}x{cfg['input_width']}", "epochs": cfg["epochs"],
            "best_epoch": fit["best_epoch"], "train_seconds": round(fit["seconds"])}


def score(seg, items, n_boot: int) -> tuple[dict, pd.DataFrame]:
    from fetalscan.biometry.scoring import evaluate_segmenter, summarise

    df = evaluate_segmenter(seg, items, description="scoring")
    s = summarise(df, n_boot, 0)
    err = df["hc_abs_diff_mm"].to_numpy(dtype=float)
    ok = np.isfinite(err)
    return ({"n": int(len(df)), "n_no_head": int((~ok).sum()),
             "hc_abs_diff_mm": float(np.mean(err[ok])) if ok.any() else float("nan"),
             "hc_abs_diff_ci95": s["hc_abs_diff_mm_mean_ci95"], "bias_mm": s["hc_diff_mm_mean"], "hc_abs_diff_median_mm": float(np.median(err[ok])),
             "within_2mm": float(np.mean(err[ok] <= 2.0)), "dice": float(df["dice"].mean())}, df)


def paired_difference(df: pd.DataFrame, ref: pd.DataFrame, n_boot: int) -> dict:
    """Mean per-image difference of |HC diff| (variant - reference) on the images both measured, with a
    95 % bootstrap interval resampling exams (the same resample for both arms)."""
    from fetalscan.evaluation.bootstrap import group_bootstrap_weights, percentile_interval

    m = df.merge(ref, on="image", suffixes=("", "_ref"))
    diff = (m["hc_abs_diff_mm"] - m["hc_abs_diff_mm_ref"]).to_numpy(dtype=float)
    ok = np.isfinite(diff)
    diff, exams = diff[ok], m.loc[ok, "exam"].astype(str).tolist()
    stats = [(w @ diff) / np.maximum(w.sum(1), 1e-12) for w in group_bootstrap_weights(exams, n_boot, 0)]
    return {"n": int(ok.sum()), "mean_mm": float(diff.mean()), "ci95": percentile_interval(np.concatenate(stats))}


def abstain(seg, items, n_boot: int, quality_model: str | None, table_out: Path | None = None) -> dict:
    """Held-out error with and without the images the quality rule sets aside, the AUROC of the score for
    failure (|HC diff| > 5 mm or no head) on these images, and the error when the lowest 5/10/20 % are set aside."""
    from fetalscan.biometry.predict import prediction_records, reference_hc_mm
    from fetalscan.biometry.quality_run import score_table, signals_for_records
    from fetalscan.evaluation.bootstrap import (
        group_bootstrap_weights,
        percentile_interval,
    )
    from fetalscan.quality.score import load_quality_model

    with tempfile.TemporaryDirectory() as tmp:
        man = Path(tmp) / "holdout.csv"
        pd.DataFrame([{"image": str(it.image), "exam": it.exam, "pixel_size_mm": it.pixel_size_mm,
                       "hc_mm": it.hc_mm} for it in items]).to_csv(man, index=False)
        records = prediction_records(man)
        refs = [reference_hc_mm(r) for r in records]
        df = score_table(signals_for_records(records, seg, None, "cpu", refs), load_quality_model(quality_model, "full"))
    if table_out is not None:
        df.to_csv(table_out, index=False)
    err = np.abs(df["hc_diff_mm"].to_numpy(dtype=float))
    keep = ~df["reacquire"].to_numpy(bool)
    exams = [r.group for r in records]
    out = {"n": int(len(df)), "n_reacquire": int((~keep).sum())}
    fail = ~np.isfinite(err) | (err > 5.0)
    if 0 < fail.sum() < len(fail):
        from sklearn.metrics import roc_auc_score

        out["n_failures"] = int(fail.sum())
        out["auroc_failure"] = float(roc_auc_score(fail, -df["quality"].to_numpy(float)))
    order = np.argsort(df["quality"].to_numpy(float), kind="stable")
    out["error_coverage"] = {}
    for share in (0.05, 0.10, 0.20):
        kept = np.ones(len(df), bool)
        kept[order[:int(round(share * len(df)))]] = False
        out["error_coverage"][f"{share:.0%}"] = float(np.nanmean(err[kept]))
    for name, sel in (("all", np.ones_like(keep)), ("kept", keep), ("set_aside", ~keep)):
        e = err[sel]
        ok = np.isfinite(e)
        g = [x for x, s in zip(exams, sel) if s]
        ci = [float("nan")] * 2
        if ok.sum() > 1:
            stats = [(w @ np.nan_to_num(e)) / np.maximum(w @ ok, 1e-12)
                     for w in group_bootstrap_weights(g, n_boot, 0)]
            ci = percentile_interval(np.concatenate(stats))
        out[name] = {"n": int(sel.sum()), "n_no_head": int((~ok).sum()),
                     "hc_abs_diff_mm": float(np.mean(e[ok])) if ok.any() else float("nan"), "ci95": ci}
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variant", action="append", required=True)
    ap.add_argument("--abstain", action="append", default=[])
    ap.add_argument("--quality-model", default=None, help="quality model JSON (default: the shipped full model)")
    ap.add_argument("--data", type=Path, default=HC18)
    ap.add_argument("--n-boot", type=int, default=2000)
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "biometry_ablation.json")
    a = ap.parse_args(argv)

    import torch

    torch.set_num_threads(2)
    from fetalscan.biometry.segmenter import HeadSegmenter
    from fetalscan.data.hc18 import load_biometry_manifest

    variants = [parse_variant(v) for v in a.variant]
    roles = roles_of(variants[0][1][0])
    if not roles["holdout"]:
        raise SystemExit(f"{variants[0][1][0]} holds no exams out; train it with --holdout-fraction 0.2")
    items = load_biometry_manifest(a.data)
    subsets = {r: [it for it in items if it.name in roles[r]] for r in ("inner_val", "holdout")}
    print(f"held-out: {len(subsets['holdout'])} images of {len({i.exam for i in subsets['holdout']})} exams; "
          f"inner validation: {len(subsets['inner_val'])} images; training: {len(roles['train'])} images")
    results, frames = [], {}
    for name, dirs, tta in variants:
        t0 = time.perf_counter()
        seg = HeadSegmenter.load([d / "model.pt" for d in dirs], "cpu", "onnx", tta=tta)
        row = {"name": name, "models": [str(d) for d in dirs], "tta": tta,
               "recipes": [train_info(d) for d in dirs]}
        on_ref = same_split(dirs, roles)
        for role, subset in subsets.items():
            if role == "inner_val" and not on_ref:
                row[role] = None
                continue
            row[role], df = score(seg, subset, a.n_boot)
            if role == "holdout":
                df.to_csv(a.out.with_name(f"biometry_ablation_{name}.csv"), index=False)
                frames[name] = df
        if name in a.abstain:
            row["abstention"] = abstain(seg, subsets["holdout"], a.n_boot, a.quality_model,
                                        a.out.with_name(f"biometry_ablation_{name}_quality.csv"))
        row["seconds"] = round(time.perf_counter() - t0, 1)
        results.append(row)
        h, v = row["holdout"], row["inner_val"]
        ci = h["hc_abs_diff_ci95"] or [float("nan")] * 2
        inner = f"{v['hc_abs_diff_mm']:.2f} mm" if v else "   -   "
        print(f"{name:28s} inner-val {inner} | held-out {h['hc_abs_diff_mm']:.2f} mm "
              f"({ci[0]:.2f}-{ci[1]:.2f}), median {h['hc_abs_diff_median_mm']:.2f}, within 2 mm "
              f"{h['within_2mm']:.0%}, Dice {h['dice']:.3f}, no head {h['n_no_head']}", flush=True)
        if "abstention" in row:
            ab = row["abstention"]
            print(f"{'':28s} quality rule sets aside {ab['n_reacquire']} of {ab['n']}: all "
                  f"{ab['all']['hc_abs_diff_mm']:.2f} mm, kept {ab['kept']['hc_abs_diff_mm']:.2f} mm, "
                  f"set aside {ab['set_aside']['hc_abs_diff_mm']:.2f} mm; AUROC for failure "
                  f"{ab.get('auroc_failure', float('nan')):.3f} ({ab.get('n_failures', 0)} failures); lowest "
                  + ", ".join(f"{k} set aside: {v:.2f} mm" for k, v in ab["error_coverage"].items()), flush=True)
    ref = results[0]["name"]
    for row in results[1:]:
        row["paired_vs_" + ref] = paired_difference(frames[row["name"]], frames[ref], a.n_boot)
        d = row["paired_vs_" + ref]
        print(f"{row['name']:28s} minus {ref}: held-out |HC diff| {d['mean_mm']:+.2f} mm "
              f"(paired 95 % CI {d['ci95'][0]:+.2f} to {d['ci95'][1]:+.2f}; {d['n']} images measured by both)")
    best = min((r for r in results if r["inner_val"]), key=lambda r: r["inner_val"]["hc_abs_diff_mm"])
    print(f"chosen by inner validation: {best['name']} (held-out {best['holdout']['hc_abs_diff_mm']:.2f} mm; "
          f"goal <= 2.0 mm {'met' if best['holdout']['hc_abs_diff_mm'] <= 2.0 else 'MISSED'})")
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps({"variants": results, "chosen_by_inner_validation": best["name"]}, indent=2,
                                default=float))
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
