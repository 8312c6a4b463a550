"""``fetalscan cv | train | predict | demo`` — the core pipeline commands."""

from __future__ import annotations

import argparse
from pathlib import Path

from fetalscan.cli._options import (
    add_data_options,
    add_evaluation_options,
    add_predict_options,
    evaluation_config,
    load_data,
    predict_config,
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
    "head": "cached-mode head: logreg (L2 logistic regression, C by inner grouped CV), linear or mlp (torch); "
            "in finetune mode logreg/linear = the backbone's own linear classifier",
    "logreg_c": "inverse L2 strength of the logreg head; 0 = chosen by inner grouped CV from 1e-4..1e2",
    "inner_folds": "folds of the inner grouped CV on the training groups that chooses C / the epoch count "
                   "(0 = one inner split with early stopping; fine-tuning costs inner_folds + 1 trainings)",
    "ensemble": "k >= 2: keep the k inner-fold models and average their probabilities (cached mode; "
                "the checkpoint holds all k); 0 = one model refitted on all training groups",
    "head_hidden": "hidden units of the mlp head",
    "drop_rate": "dropout before the head",
    "epochs": "maximum fine-tuning epochs (the count kept is chosen by the inner grouped CV)",
    "batch_size": "mini-batch size",
    "lr": "fine-tuning learning rate (AdamW, cosine schedule)",
    "weight_decay": "fine-tuning AdamW weight decay",
    "patience": "fine-tuning: epochs without inner-validation improvement before stopping",
    "augment": "ultrasound augmentation while fine-tuning",
    "head_epochs": "maximum epochs of the cached-feature head",
    "head_lr": "learning rate of the cached-feature head",
    "head_weight_decay": "weight decay of the cached-feature head",
    "head_patience": "cached head: epochs without inner-validation improvement before stopping",
    "val_fraction": "share of each class's training groups in the inner validation split (used with "
                    "--inner-folds 0, and for the leakage audit)",
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
    "repeats": "rerun the grouped k-fold split with R seeds (seed, seed+1, ...) and report the mean and spread "
               "across splits; predictions.csv stays that of the first",
    "baseline": "train the linear-probe baseline (logreg on the frozen embeddings) under the same folds",
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
    _add_distributed_options(p)
    add_evaluation_options(p)
    add_runtime_options(p)
    p.set_defaults(func=cmd_cv)

    p = sub.add_parser("train", help="train the final model on all data -> DIR/model.pt",
                       description="Train one model on all data (inner split for early stopping); "
                       "the class policy matches `cv` with the same --folds / --cv.")
    add_data_options(p)
    add_dataclass_options(p, TrainConfig, _HELP, skip=_SKIP, rename=_RENAME)
    add_dataclass_options(p, CVConfig, _HELP, skip=_SKIP, rename=_RENAME)
    _add_distributed_options(p)
    add_runtime_options(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("predict", help="apply a model to images / folders / manifests / DICOM / video",
                       description="Write predictions.csv and patients.csv for new data with a "
                       "trained model.pt (label left empty where unknown).")
    p.add_argument("--model", type=Path, required=True, help="checkpoint written by `fetalscan train`")
    add_data_options(p)
    add_predict_options(p)
    _add_batch_options(p)
    add_runtime_options(p)
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("predict-merge", help="merge the shard folders of `predict --shard i/n` into one run",
                       description="Check that every shard of a sharded `fetalscan predict` is there and finished, "
                       "and write the whole predictions.csv (each image once, in path order) and patients.csv.")
    p.add_argument("shards", type=Path, nargs="+", help="the --out folders of the shards (all n of them)")
    p.add_argument("--out", type=Path, required=True, help="output folder (must be empty unless --overwrite)")
    p.add_argument("--overwrite", action="store_true", help="allow a non-empty --out; its files are replaced")
    p.set_defaults(func=cmd_predict_merge)

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




_DIST_HELP = {
    "strategy": "none = one process; ddp = PyTorch DistributedDataParallel through torchrun (--mode finetune "
                "only; NCCL on GPUs, gloo on CPU; docs/scale.md)",
    "devices": "processes per machine with --strategy ddp (one per GPU, or CPU processes)",
    "num_nodes": "machines with --strategy ddp (each started by its own torchrun, e.g. under Slurm; docs/scale.md)",
}


def _add_distributed_options(p: argparse.ArgumentParser) -> None:
    from fetalscan.training.distributed import DistributedConfig

    add_dataclass_options(p, DistributedConfig, _DIST_HELP, title="distributed training")


def _distributed_config(args: argparse.Namespace, cfg):
    from fetalscan.training.distributed import DistributedConfig

    dist = dataclass_from_args(DistributedConfig, args)
    dist.validate(cfg.mode)
    return dist


def _configs(args: argparse.Namespace):
    from fetalscan.training.loop import TrainConfig
    from fetalscan.training.study import CVConfig

    cfg = dataclass_from_args(TrainConfig, args, seed=args.seed, device=args.device)
    return cfg, dataclass_from_args(CVConfig, args)


def cmd_cv(args: argparse.Namespace) -> int:
    from fetalscan.api import run_study

    from fetalscan.training.distributed import launch_local, launched, process_group

    setup_progress(args)
    cfg, cv = _configs(args)
    evaluation = evaluation_config(args)  # every option checked (validated) before the data are read
    dist = _distributed_config(args, cfg)
    if dist.strategy == "ddp" and not launched():
        return launch_local(args.argv, dist)  # torchrun runs this command in --devices processes
    with process_group(dist, cfg.device) as ctx:
        metrics = run_study(load_data(args), cfg, cv, evaluation, args.out, overwrite=args.overwrite)
    if ctx is not None and not ctx.is_main:
        return 0
    _print_summary(metrics)
    info_line(f"wrote {args.out}/ (report.html, metrics.json, predictions.csv, patients.csv, audit.json)")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from fetalscan.training.study import run_train

    from fetalscan.training.distributed import launch_local, launched, process_group

    setup_progress(args)
    cfg, cv = _configs(args)
    dist = _distributed_config(args, cfg)
    if dist.strategy == "ddp" and not launched():
        return launch_local(args.argv, dist)  # torchrun runs this command in --devices processes
    with process_group(dist, cfg.device) as ctx:
        summary = run_train(load_data(args), cfg, cv, args.out, overwrite=args.overwrite)
    if ctx is not None and not ctx.is_main:
        return 0
    for note in summary["notes"]:
        warn_line(note)
    sel = summary.get("selection") or {}
    chosen = sel.get("chosen")
    chosen = f"{chosen:g}" if isinstance(chosen, float) else chosen
    info_line(f"model: {summary['model']} (classes: {', '.join(summary['classes'])}; {sel.get('head', '')} head, "
              f"{sel.get('parameter', 'epochs')} = {chosen} by {sel.get('method', 'the inner split')}; "
              f"{sel.get('final', '')})")
    return 0


_BATCH_HELP = {
    "engine": "local (this process) or ray (a pool of Ray actors each holding the model; docs/scale.md)",
    "shard": "i/n: predict only the files whose relative path hashes to shard i of n (a Slurm array; merge the "
             "shard folders with `fetalscan predict-merge`)",
    "resume": "continue an interrupted run in --out: images already in its predictions.csv are skipped",
    "chunk": "images per chunk appended (and fsynced) to predictions.csv, and per Ray batch",
    "ray_address": "with --engine ray: empty = a Ray instance on this machine, auto = the running cluster",
    "ray_actors": "with --engine ray: actors holding the model (0 = one per CPU, at most 8)",
}


def _add_batch_options(p: argparse.ArgumentParser) -> None:
    from fetalscan.inference.batch import BatchConfig

    add_dataclass_options(p, BatchConfig, _BATCH_HELP, title="archive-scale prediction (folders stream)")


def cmd_predict_merge(args: argparse.Namespace) -> int:
    from fetalscan.inference.batch import merge_shards

    res = merge_shards(args.shards, args.out, overwrite=args.overwrite)
    info_line(f"{res.n_images} images, {res.n_groups} groups -> {args.out}/predictions.csv, {args.out}/patients.csv")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from fetalscan.inference.batch import BatchConfig, RecordSource, predict_archive
    from fetalscan.inference.predict import predict_to_folder
    from fetalscan.runtime import resolve_device

    setup_progress(args)
    config = predict_config(args)  # every option checked (validated) before the data are read
    batch = dataclass_from_args(BatchConfig, args)
    if args.data.is_dir() or batch.resume or batch.shard or batch.engine != "local":  # streamed, appended
        classes = [c.strip() for c in args.classes.split(",")] if args.classes else None
        source = RecordSource(args.data, args.group_regex, classes, args.every_nth, args.sector_mask)
        res = predict_archive(args.model, source, args.out, config, batch, device=resolve_device(args.device),
                              overwrite=args.overwrite)
        for note in res.notes:
            warn_line(note)
        resumed = f" ({res.n_skipped} already done, {res.n_new} new)" if batch.resume else ""
        groups = f", {res.n_groups} groups" if res.n_groups is not None else ""
        info_line(f"{res.n_images} images{resumed}{groups} -> {args.out}/predictions.csv"
                  + (f", {args.out}/patients.csv" if res.n_groups is not None else ""))
        return 0
    pred = predict_to_folder(args.model, load_data(args, require_labels=False), args.out, config,
                             device=resolve_device(args.device), overwrite=args.overwrite)
    for note in pred.notes:
        warn_line(note)
    info_line(f"{len(pred.images)} images, {len(pred.patients)} groups -> {args.out}/predictions.csv, "
              f"{args.out}/patients.csv")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from fetalscan.api import embedded_sample, run_demo

    setup_progress(args)
    manifest = args.data or embedded_sample()
    info_line(f"fetalscan demo: 5-fold grouped CV + final model on {manifest}")
    metrics, _ = run_demo(args.out, manifest, seed=args.seed, device=args.device)
    _print_summary(metrics)
    info_line(f"wrote {args.out}/: report.html, metrics.json, predictions.csv, patients.csv, audit.json, model.pt")
    info_line("Caveat: in this sample every normal comes from a different source than the anomalies, "
              "so normal-vs-abnormal separation may reflect image source, not anatomy (see README).")
    return 0


def _with_ci(block: dict, key: str) -> str:
    """``0.757 (0.678-0.846)`` from a metrics block and its bootstrap CI, when present."""
    value = block.get(key)
    if value is None or value != value:
        return "-"
    ci = (block.get("ci") or {}).get(key, {}).get("bootstrap")
    return f"{value:.3f}" + (f" ({ci[0]:.3f}-{ci[1]:.3f})" if ci and None not in ci else "")


def _value_ci(value, ci) -> str:
    if value is None or value != value:
        return "-"
    return f"{value:.3f}" + (f" ({ci[0]:.3f}-{ci[1]:.3f})" if ci and None not in ci and ci[0] == ci[0] else "")


def _spread(s: dict) -> str:
    if not s or s.get("mean") is None:
        return "-"
    return f"{s['mean']:.3f} ± {s['sd']:.3f} ({s['min']:.3f}-{s['max']:.3f})"


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
    base = metrics.get("baseline") or {}
    if base.get("available") and base.get("rows"):
        print_table("Linear-probe baseline (logreg on the frozen embeddings, same folds; patient level, 95% CI)",
                    ["metric", "model", "baseline"],
                    [[r["metric"], _value_ci(r["model"], r["model_ci"]), _value_ci(r["baseline"], r["baseline_ci"])]
                     for r in base["rows"]])
        if base.get("warning"):
            warn_line(base["message"])
    rep = metrics.get("repeats") or {}
    if rep.get("summary"):
        rows = [[f"{who}: {key.replace('_', ' ')}", _spread(rep["summary"][who][key])]
                for who in ("model", "baseline") if who in rep["summary"] for key in rep["metrics"]]
        print_table(f"Repeated CV: {rep['n']} splits (seeds {rep['seeds'][0]}..{rep['seeds'][-1]}), patient level, "
                    "mean ± SD (min-max)", ["metric", "across splits"], rows)
    for comp in (metrics.get("shortcut") or {}).get("comparisons", []):
        if comp.get("warning"):
            warn_line(f"shortcut check: a probe that sees no anatomy reaches {comp['metric']} "
                      f"{comp['probe']:.3f} vs the model's {comp['model']:.3f}; the classes may be "
                      "separable by image source (see report.html)")
