"""``fetalscan cv | train | predict | demo`` — the core pipeline commands."""

from __future__ import annotations

import argparse
from pathlib import Path

from fetalscan.cli._options import (
    add_data_options,
    add_evaluation_options,
    evaluation_config,
    load_data,
)
from fetalscan.cli._ui import (
    add_dataclass_options,
    add_runtime_options,
    dataclass_from_args,
    info_line,
    print_table,
    setup_progress,
    warn_line,
)

# help for each TrainConfig / CVConfig field; flags are generated 1:1 from the dataclasses
_HELP = {
    "backbone": "network: sononet16, resnet34, densenet169, efficientnet_b0, mobilenetv3_large_100",
    "pretrained": "initial weights: sononet (bundled, sononet16), imagenet (timm download/cache), none, or a file",
    "mode": "cached = frozen backbone, embeddings computed once, head trained per fold (fast); "
            "finetune = train every weight (the published way, slow on CPU)",
    "head": "classification head: linear or mlp",
    "head_hidden": "hidden units of the mlp head",
    "drop_rate": "dropout before the head",
    "epochs": "maximum fine-tuning epochs (early stopping on the inner split)",
    "batch_size": "mini-batch size",
    "lr": "fine-tuning learning rate (AdamW, cosine schedule)",
    "weight_decay": "fine-tuning AdamW weight decay",
    "patience": "fine-tuning: epochs without inner-validation improvement before stopping",
    "augment": "ultrasound augmentation while fine-tuning",
    "head_epochs": "maximum epochs of the cached-feature head",
    "head_lr": "learning rate of the cached-feature head",
    "head_weight_decay": "weight decay of the cached-feature head",
    "head_patience": "cached head: epochs without inner-validation improvement before stopping",
    "val_fraction": "share of each class's training groups held out as the inner validation split",
    "class_weighting": "class-weighted cross-entropy (balanced weights)",
    "amp": "mixed precision on CUDA (ignored on CPU)",
    "scheme": "cross-validation: kfold (stratified group k-fold) or logo (leave one group out)",
    "folds": "number of folds for kfold",
    "rare_classes": "classes with fewer groups than the split needs: merge (pool into one class), "
                    "drop, or error",
    "merged_name": "name of the pooled class for --rare-classes merge",
    "near_duplicates": "near-duplicate images (perceptual hash) in different groups: error "
                       "(refuse to train) or merge (pool their groups)",
    "phash_threshold": "Hamming distance of the 64-bit pHash at or below which images are near-duplicates",
    "aggregate": "patient-level rule: mean, vote or max_abnormal",
    "normal_class": "name of the normal class (used by max_abnormal)",
    "save_fold_models": "keep each fold's model in RUN/fold_models/ (for held-out heatmaps): auto = always in "
                        "cached mode (one backbone + small heads), for <= 10 folds when fine-tuning; yes; no",
}
_SKIP = {"seed", "device"}  # provided by add_runtime_options
_RENAME = {"scheme": "cv"}

#: Place of these commands in ``fetalscan --help`` (the order in which data flow through them).
ORDER = 10




def register(sub: argparse._SubParsersAction) -> None:
    from fetalscan.training.loop import TrainConfig
    from fetalscan.training.study import CVConfig

    p = sub.add_parser("cv", help="grouped cross-validation -> out-of-fold predictions and metrics",
                       description="Leak-free grouped cross-validation: stratified group k-fold or "
                       "leave-one-group-out, inner validation split for early stopping, leakage audit, "
                       "out-of-fold image- and patient-level predictions and metrics.")
    add_data_options(p)
    add_dataclass_options(p, TrainConfig, _HELP, skip=_SKIP, rename=_RENAME)
    add_dataclass_options(p, CVConfig, _HELP, skip=_SKIP, rename=_RENAME)
    add_evaluation_options(p)
    add_runtime_options(p)
    p.set_defaults(func=cmd_cv)

    p = sub.add_parser("train", help="train the final model on all data -> DIR/model.pt",
                       description="Train one model on all data (inner split for early stopping); "
                       "the class policy matches `cv` with the same --folds / --cv.")
    add_data_options(p)
    add_dataclass_options(p, TrainConfig, _HELP, skip=_SKIP, rename=_RENAME)
    add_dataclass_options(p, CVConfig, _HELP, skip=_SKIP, rename=_RENAME)
    add_runtime_options(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("predict", help="apply a model to images / folders / manifests / DICOM / video",
                       description="Write predictions.csv and patients.csv for new data with a "
                       "trained model.pt (label left empty where unknown).")
    p.add_argument("--model", type=Path, required=True, help="checkpoint written by `fetalscan train`")
    add_data_options(p)
    p.add_argument("--aggregate", default="mean", help="patient-level rule: mean, vote or max_abnormal")
    p.add_argument("--normal-class", default="normal", help="normal class (for max_abnormal)")
    p.add_argument("--batch-size", type=int, default=32, help="inference batch size")
    p.add_argument("--plane-check", action="store_true",
                   help="name each image's standard plane with SonoNet-16 and flag images that are not a "
                   "brain plane (transventricular / transcerebellar); flagged rows are kept")
    p.add_argument("--crop", default="auto",
                   help="scanner-frame crop for --plane-check: auto, none or x0,y0,x1,y1 (docs/biometry.md)")
    add_runtime_options(p)
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("demo", help="run cv + final model on the embedded real sample -> runs/demo",
                       description="Grouped 5-fold CV and a final model with SonoNet-16 features on the "
                       "small real fetal-brain sample shipped in examples/ (works offline).")
    p.add_argument("--data", type=Path, default=None, help="manifest to use instead of the embedded sample")
    p.add_argument("--out", type=Path, default=Path("runs/demo"), help="output folder (default: runs/demo)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None, help="progress bars")
    p.set_defaults(func=cmd_demo)


# --------------------------------------------------------------------------- handlers




def _configs(args: argparse.Namespace):
    from fetalscan.training.loop import TrainConfig
    from fetalscan.training.study import CVConfig

    cfg = dataclass_from_args(TrainConfig, args, seed=args.seed, device=args.device)
    return cfg, dataclass_from_args(CVConfig, args)


def cmd_cv(args: argparse.Namespace) -> int:
    from fetalscan.training.study import run_cv

    setup_progress(args)
    dataset = load_data(args)
    cfg, cv = _configs(args)
    metrics = run_cv(dataset, cfg, cv, args.out, overwrite=args.overwrite, eval_cfg=evaluation_config(args))
    _print_summary(metrics)
    info_line(f"wrote {args.out}/ (report.html, metrics.json, predictions.csv, patients.csv, audit.json)")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from fetalscan.training.study import run_train

    setup_progress(args)
    dataset = load_data(args)
    cfg, cv = _configs(args)
    summary = run_train(dataset, cfg, cv, args.out, overwrite=args.overwrite)
    for note in summary["notes"]:
        warn_line(note)
    info_line(f"model: {summary['model']} (classes: {', '.join(summary['classes'])}; best epoch "
              f"{summary['best_epoch']} of {summary['epochs_run']} on the inner validation split)")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from fetalscan.fileio import check_out_dir
    from fetalscan.inference.predict import (
        add_plane_columns,
        labels_for_model,
        predict_dataset,
        predictions_frame,
        write_prediction_files,
    )
    from fetalscan.models.checkpoint import load_checkpoint
    from fetalscan.quality.planes import classify_records, parse_crop
    from fetalscan.runtime import resolve_device

    setup_progress(args)
    crop = parse_crop(args.crop)
    device = resolve_device(args.device)
    loaded = load_checkpoint(args.model, device)
    dataset = load_data(args, require_labels=False)
    dataset, unknown = labels_for_model(dataset, loaded.classes, loaded.class_map)
    if unknown:
        warn_line(f"label(s) {sorted(unknown)} are not classes of the model; left empty in 'label' "
                  "(kept in 'label_original')")
    out = check_out_dir(args.out, args.overwrite)
    probs = predict_dataset(loaded, dataset, device, args.batch_size)
    df = predictions_frame(dataset.records, probs, loaded.classes)
    if args.plane_check:
        df = add_plane_columns(df, classify_records(dataset.records, device, crop=crop))
        off = df.loc[~df["brain_plane"]]
        if len(off):
            shown = ", ".join(f"{Path(p).name} ({pl}, {c:.2f})" for p, pl, c in
                              off[["path", "plane", "plane_confidence"]].head(5).itertuples(index=False))
            warn_line(f"{len(off)} of {len(df)} image(s) do not look like a brain plane (SonoNet-16): "
                      f"{shown}{', ...' if len(off) > 5 else ''}; their predictions are kept and flagged "
                      "in the 'brain_plane' column: read them with care.")
    write_prediction_files(out, df, loaded.classes, args.aggregate, args.normal_class)
    info_line(f"{len(df)} images, {df['group'].nunique()} groups -> {out}/predictions.csv, {out}/patients.csv")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from fetalscan.data.records import load_dataset
    from fetalscan.training.loop import TrainConfig
    from fetalscan.training.study import CVConfig, run_cv, run_train

    setup_progress(args)
    manifest = args.data or _embedded_manifest()
    info_line(f"fetalscan demo: 5-fold grouped CV + final model on {manifest}")
    dataset = load_dataset(manifest)
    cfg = TrainConfig(seed=args.seed, device=args.device)
    cv = CVConfig()
    metrics = run_cv(dataset, cfg, cv, args.out, overwrite=True)
    _print_summary(metrics)
    run_train(load_dataset(manifest), cfg, cv, args.out, overwrite=True)
    info_line(f"wrote {args.out}/: report.html, metrics.json, predictions.csv, patients.csv, audit.json, model.pt")
    info_line("Caveat: in this sample every normal comes from a different source than the anomalies, "
              "so normal-vs-abnormal separation may reflect image source, not anatomy (see README).")
    return 0


def _embedded_manifest() -> Path:
    from fetalscan.errors import DataError

    here = Path(__file__).resolve()
    for root in (here.parents[3], Path.cwd()):
        cand = root / "examples" / "fetal_brain_sample" / "manifest.csv"
        if cand.is_file():
            return cand
    raise DataError("the embedded sample examples/fetal_brain_sample/manifest.csv was not found; "
                    "run from the repository root or pass --data")


def _with_ci(block: dict, key: str) -> str:
    """``0.757 (0.678-0.846)`` from a metrics block and its bootstrap CI, when present."""
    value = block.get(key)
    if value is None or value != value:
        return "-"
    ci = (block.get("ci") or {}).get(key, {}).get("bootstrap")
    return f"{value:.3f}" + (f" ({ci[0]:.3f}-{ci[1]:.3f})" if ci and None not in ci else "")


def _print_summary(metrics: dict) -> None:
    for note in metrics["task"]["notes"]:
        warn_line(note)
    img, pat = metrics["image_level"], metrics["patient_level"]
    rows = [[name, _with_ci(img, key), _with_ci(pat, key)]
            for name, key in (("accuracy", "accuracy"), ("balanced accuracy", "balanced_accuracy"),
                              ("macro AUROC", "macro_auroc"))]
    rows.append(["n", img["n"], pat["n"]])
    print_table(f"Out-of-fold results ({metrics['cv']['scheme']}, {metrics['cv']['n_folds_run']} folds; "
                f"patient level = {metrics['cv']['aggregate']}; 95% CI: patient bootstrap)",
                ["metric", "image level", "patient level"], rows)
    per = [[c, img["per_class"][c]["n"], img["per_class"][c]["sensitivity"], img["per_class"][c]["specificity"],
            img["per_class"][c]["auroc"], pat["per_class"][c]["n"], pat["per_class"][c]["sensitivity"],
            pat["per_class"][c]["specificity"]] for c in metrics["task"]["classes"]]
    print_table("Per class", ["class", "images", "sensitivity", "specificity", "AUROC",
                              "patients", "pt sensitivity", "pt specificity"], per)
    for comp in (metrics.get("shortcut") or {}).get("comparisons", []):
        if comp.get("warning"):
            warn_line(f"shortcut check: a probe that sees no anatomy reaches {comp['metric']} "
                      f"{comp['probe']:.3f} vs the model's {comp['model']:.3f}; the classes may be "
                      "separable by image source (see report.html)")
