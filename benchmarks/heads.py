"""Which head holds up on unseen patients? Heads on frozen embeddings (and fine-tuning) compared.

On the shared fetal_brain set (166 images, 64 patients/case groups, 4 classes after the
5-fold rare-class merge), every head is scored under grouped stratified 5-fold CV,
repeated with 5 seeds (seeds 0-4: 5 different splits), by three patient-level figures:
macro AUROC (one-vs-rest), balanced accuracy and abnormal-vs-normal AUROC
(1 - p(normal)), each with its 95 % patient-bootstrap CI (1000 resamples) on the first
split, and the mean, SD and range across the 5 splits; plus the wall time of one CV.

Heads (all through fetalscan's own training code, :func:`cross_validate_folds`, except k-NN):

- ``logreg``          multinomial L2 logistic regression, class-balanced, C chosen by
                      inner grouped 5-fold CV on the training groups (the new default)
- ``logreg-ens5``     the same, keeping the 5 inner-fold models as an ensemble
- ``linear-split``    torch linear head early-stopped on one inner split (the old default)
- ``linear-cv``       torch linear head, epoch count by inner grouped 5-fold CV, refitted
- ``mlp-split``       torch MLP head early-stopped on one inner split
- ``mlp-cv``          torch MLP head, epoch count by inner grouped 5-fold CV, refitted
- ``knn``             k-nearest neighbours on standardised embeddings (distance-weighted,
                      k in {3, 5, 9, 15} by the same inner grouped CV)
- ``finetune``        every SonoNet-16 weight trained (augmentation, early stopping on one
                      inner split); expensive, so run with fewer epochs and seeds (printed)

Embeddings are computed once per backbone and cached (``--cache-dir``). A timm backbone
(``--timm resnet34``) needs ImageNet weights, which cannot be downloaded offline: they are
looked up in ``$FETALSCAN_WEIGHTS_DIR`` (``resnet34.pth``) and the timm / Hugging Face
cache; if absent, the script says so and skips it (``pretrained none`` is not a
meaningful stand-in: random features say nothing about a pretrained backbone).

Run:  python benchmarks/heads.py [--seeds 5] [--finetune-seeds 1] [--finetune-epochs 12]
      [--no-finetune] [--timm resnet34] [--out benchmarks/results/heads.json]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # fail fast instead of waiting on a network that is not there

import numpy as np
import pandas as pd
import torch

from fetalscan.data.records import load_dataset, prepare_images
from fetalscan.errors import FetalscanError
from fetalscan.evaluation.bootstrap import auroc_with_ci, metrics_with_ci
from fetalscan.fileio import package_versions, write_json
from fetalscan.inference.tables import aggregate_groups, predictions_frame
from fetalscan.models.registry import get_backbone_spec
from fetalscan.splits import apply_rare_class_policy, make_folds
from fetalscan.training.loop import TrainConfig
from fetalscan.training.selection import balanced_log_loss, inner_folds_of
from fetalscan.training.study import cross_validate_folds, embed_dataset

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "fetal_brain" / "manifest.csv"
NORMAL = "normal"
KNN_GRID = (3, 5, 9, 15)

HEADS = {
    "logreg": dict(head="logreg"),
    "logreg-ens5": dict(head="logreg", ensemble=5),
    "linear-split": dict(head="linear", inner_folds=0),
    "linear-cv": dict(head="linear", inner_folds=5),
    "mlp-split": dict(head="mlp", inner_folds=0),
    "mlp-cv": dict(head="mlp", inner_folds=5),
}
DESCRIPTION = {
    "logreg": "logreg, C by inner grouped CV (new default)",
    "logreg-ens5": "logreg, 5 inner-fold models averaged",
    "linear-split": "torch linear, early stop on 1 inner split (old default)",
    "linear-cv": "torch linear, epochs by inner grouped CV",
    "mlp-split": "torch MLP, early stop on 1 inner split",
    "mlp-cv": "torch MLP, epochs by inner grouped CV",
    "knn": "k-NN, k by inner grouped CV",
    "finetune": "fine-tuning (all weights), early stop on 1 inner split",
}


def say(msg: str) -> None:
    print(msg, flush=True)


def patient_scores(dataset, test_idx_probs: list[tuple[np.ndarray, np.ndarray, int]], n_boot: int,
                   seed: int) -> dict:
    """Patient-level macro AUROC, balanced accuracy, abnormal-vs-normal AUROC with patient-bootstrap CIs."""
    classes = dataset.classes
    parts = [predictions_frame([dataset.records[i] for i in idx], probs, classes, fold)
             for idx, probs, fold in test_idx_probs]
    patients = aggregate_groups(pd.concat(parts, ignore_index=True), classes, "mean", NORMAL)
    m = metrics_with_ci(patients, classes, n_boot=n_boot, seed=seed)
    truth = patients["label"].astype(str).to_numpy() != NORMAL
    ab = auroc_with_ci(1 - patients[f"p_{NORMAL}"].to_numpy(), truth, patients["group"].astype(str).tolist(),
                       n_boot=n_boot, seed=seed)
    return {"macro_auroc": m["macro_auroc"], "macro_auroc_ci": m["ci"]["macro_auroc"]["bootstrap"],
            "balanced_accuracy": m["balanced_accuracy"],
            "balanced_accuracy_ci": m["ci"]["balanced_accuracy"]["bootstrap"],
            "abnormal_auroc": ab["auroc"], "abnormal_auroc_ci": ab["ci"], "n_patients": int(len(patients))}


def run_fetalscan_head(dataset, images, folds, cfg, emb, device) -> list[tuple[np.ndarray, np.ndarray, int]]:
    outs = cross_validate_folds(dataset, images, folds, cfg, device, emb=emb)
    return [(o.fold.test, o.test_probs, o.fold.index) for o in outs]


def _knn_probs(f_tr, y_tr, f_te, k, n_classes):
    from sklearn.neighbors import KNeighborsClassifier

    mean, std = f_tr.mean(0), f_tr.std(0).clip(1e-6)
    model = KNeighborsClassifier(n_neighbors=min(k, len(f_tr)), weights="distance")
    model.fit((f_tr - mean) / std, y_tr)
    out = np.zeros((len(f_te), n_classes))
    out[:, model.classes_] = model.predict_proba((f_te - mean) / std)
    return out


def run_knn(dataset, folds, emb, seed) -> list[tuple[np.ndarray, np.ndarray, int]]:
    """k-NN; k chosen on the training groups only by the inner grouped CV's balanced log loss."""
    f, y, n = emb.numpy().astype(np.float64), dataset.y, len(dataset.classes)
    out = []
    for fold in folds:
        splits = inner_folds_of(fold.train, dataset.labels, dataset.groups, 5, seed + fold.index + 7919)
        held = np.concatenate([va for _, va in splits])
        scores = [balanced_log_loss(y[held], np.concatenate([_knn_probs(f[tr], y[tr], f[va], k, n)
                                                             for tr, va in splits])) for k in KNN_GRID]
        k = KNN_GRID[int(np.argmin(scores))]
        out.append((fold.test, _knn_probs(f[fold.train], y[fold.train], f[fold.test], k, n), fold.index))
    return out


def cached_embeddings(backbone: str, pretrained: str, dataset, images, n_classes: int, device, cache: Path) -> torch.Tensor:
    path = cache / f"emb_{backbone}_{pretrained}_{dataset.data_hash()[:12]}.pt"
    if path.is_file():
        say(f"  embeddings from cache {path}")
        return torch.load(path)
    cfg = TrainConfig(backbone=backbone, pretrained=pretrained)
    t0 = time.perf_counter()
    _, emb = embed_dataset(images, cfg, n_classes, device)
    say(f"  embedded {len(emb)} images with frozen {backbone} ({pretrained}) in {time.perf_counter() - t0:.1f} s")
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(emb, path)
    return emb


def summarise(per_seed: list[dict]) -> dict:
    out = {}
    for key in ("macro_auroc", "balanced_accuracy", "abnormal_auroc"):
        v = np.array([r[key] for r in per_seed], dtype=np.float64)
        out[key] = {"first": float(v[0]), "first_ci": per_seed[0][f"{key}_ci"], "mean": float(v.mean()),
                    "sd": float(v.std(ddof=1)) if len(v) > 1 else 0.0, "min": float(v.min()), "max": float(v.max())}
    out["seconds_per_cv"] = float(np.mean([r["seconds"] for r in per_seed]))
    out["n_seeds"] = len(per_seed)
    return out


def table(results: dict, backbone_label: str) -> str:
    lines = [f"### {backbone_label}", "",
             "| head | seeds | macro AUROC mean ± SD (range) | seed-0 CI | balanced acc. mean ± SD | seed-0 CI | "
             "abnormal-vs-normal AUROC mean ± SD (range) | seed-0 CI | s / CV |",
             "|---|---:|---|---|---|---|---|---|---:|"]

    def cell(s, key):
        x = s[key]
        return f"{x['mean']:.3f} ± {x['sd']:.3f} ({x['min']:.3f}–{x['max']:.3f})", \
            f"{x['first_ci'][0]:.3f}–{x['first_ci'][1]:.3f}"

    for name, s in results.items():
        a, aci = cell(s, "macro_auroc")
        b, bci = cell(s, "balanced_accuracy")
        c, cci = cell(s, "abnormal_auroc")
        b = b.split(" (")[0]
        lines.append(f"| {DESCRIPTION.get(name, name)} | {s['n_seeds']} | {a} | {aci} | {b} | {bci} | {c} | {cci} | "
                     f"{s['seconds_per_cv']:.1f} |")
    return "\n".join(lines)


def scored(name, seed, dataset, parts, n_boot, secs, say) -> dict:
    """Patient-level scores of one head and split, with its wall time, printed as one line."""
    scores = patient_scores(dataset, parts, n_boot, seed)
    scores["seconds"] = secs
    say(f"  {name:13s} seed {seed}: macro AUROC {scores['macro_auroc']:.3f}, balanced acc "
        f"{scores['balanced_accuracy']:.3f}, abnormal AUROC {scores['abnormal_auroc']:.3f} ({secs:.1f} s)")
    return scores


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--seeds", type=int, default=5, help="CV repeats (seeds 0..n-1) for the cached heads")
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--heads", default=",".join(list(HEADS) + ["knn"]), help="comma-separated cached heads")
    ap.add_argument("--finetune-seeds", type=int, default=1, help="seeds for fine-tuning (expensive on a CPU)")
    ap.add_argument("--finetune-epochs", type=int, default=12, help="maximum fine-tuning epochs (default 12; "
                    "fetalscan's default is 30)")
    ap.add_argument("--no-finetune", action="store_true")
    ap.add_argument("--timm", default="resnet34", help="timm backbone to try with ImageNet weights ('' to skip)")
    ap.add_argument("--n-boot", type=int, default=1000)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--cache-dir", type=Path, default=Path.home() / ".cache" / "fetalscan" / "bench")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/heads.json"))
    args = ap.parse_args(argv)
    if not args.data.is_file():
        say(f"data not found: {args.data}")
        return 2
    torch.set_num_threads(args.threads)
    device = torch.device("cpu")
    raw = load_dataset(args.data)
    dataset = apply_rare_class_policy(raw, args.folds, "merge")
    n = len(dataset.classes)
    say(f"data: {args.data} — {len(dataset)} images, {len(set(dataset.groups))} patient groups, classes "
        f"{dataset.classes}; grouped stratified {args.folds}-fold CV, seeds 0..{args.seeds - 1}; "
        f"patient level = mean of a patient's image probabilities; CIs: patient bootstrap, {args.n_boot} resamples, "
        "first split (seed 0)")
    report: dict = {"data": str(args.data), "classes": dataset.classes, "n_images": len(dataset),
                    "n_groups": len(set(dataset.groups)), "folds": args.folds, "seeds": args.seeds,
                    "versions": package_versions(), "backbones": {}, "notes": []}
    backbones = [("sononet16", "sononet", "SonoNet-16 (bundled in-domain weights)")]
    if args.timm:
        backbones.append((args.timm, "imagenet", f"{args.timm} (timm, ImageNet weights)"))
    wanted = [h.strip() for h in args.heads.split(",") if h.strip()]
    texts = []
    for backbone, pretrained, label in backbones:
        say(f"\n== {label}")
        pre = get_backbone_spec(backbone).preprocessing
        images, _ = prepare_images(dataset.records, pre)
        try:
            emb = cached_embeddings(backbone, pretrained, dataset, images, n, device, args.cache_dir)
        except FetalscanError as exc:
            note = (f"{label}: not run — its ImageNet weights are not available offline ({str(exc)[:200]}...). "
                    f"Put {backbone}.pth in $FETALSCAN_WEIGHTS_DIR to include it. 'pretrained none' is not a "
                    "meaningful stand-in (random features), so no number is given for it.")
            say("  " + note)
            report["notes"].append(note)
            report["backbones"][backbone] = {"available": False, "note": note}
            continue
        results: dict = {}
        for name in wanted:
            per_seed = []
            for seed in range(args.seeds):
                folds = make_folds(dataset.labels, dataset.groups, "kfold", args.folds, seed, 0.2)
                t0 = time.perf_counter()
                if name == "knn":
                    parts = run_knn(dataset, folds, emb, seed)
                else:
                    cfg = TrainConfig(backbone=backbone, pretrained=pretrained, seed=seed, **HEADS[name])
                    parts = run_fetalscan_head(dataset, images, folds, cfg, emb, device)
                per_seed.append(scored(name, seed, dataset, parts, args.n_boot, time.perf_counter() - t0, say))
            results[name] = {**summarise(per_seed), "per_seed": per_seed}
        if backbone == "sononet16" and not args.no_finetune:
            note = (f"fine-tuning: {args.finetune_seeds} seed(s) instead of {args.seeds}, at most "
                    f"{args.finetune_epochs} epochs (fetalscan default 30), patience 4, early stopping on one inner "
                    "split (inner_folds=0) instead of the inner grouped CV, to fit the CPU budget")
            say(f"  {note}")
            report["notes"].append(note)
            per_seed = []
            for seed in range(args.finetune_seeds):
                folds = make_folds(dataset.labels, dataset.groups, "kfold", args.folds, seed, 0.2)
                cfg = TrainConfig(backbone=backbone, pretrained=pretrained, mode="finetune", seed=seed,
                                  epochs=args.finetune_epochs, patience=4, inner_folds=0, batch_size=16)
                t0 = time.perf_counter()
                parts = run_fetalscan_head(dataset, images, folds, cfg, None, device)
                per_seed.append(scored("finetune", seed, dataset, parts, args.n_boot, time.perf_counter() - t0, say))
            results["finetune"] = {**summarise(per_seed), "per_seed": per_seed}
        report["backbones"][backbone] = {"available": True, "label": label, "heads": results}
        texts.append(table(results, label))
        write_json(args.out, report)  # after each backbone, so a long run leaves its results
    say("\n" + "\n\n".join(texts))
    for note in report["notes"]:
        say(f"\nnote: {note}")
    write_json(args.out, report)
    say(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
