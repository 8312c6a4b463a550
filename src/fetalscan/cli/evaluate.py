"""``fetalscan evaluate | report | compare`` — clinical evaluation, its report, and paired comparison."""

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
    add_runtime_options,
    info_line,
    print_table,
    setup_progress,
    warn_line,
)

#: Place of these commands in ``fetalscan --help`` (the order in which data flow through them).
ORDER = 20






def register(sub: argparse._SubParsersAction) -> None:

    p = sub.add_parser("evaluate", help="external validation: score a trained model on other data -> report.html",
                       description="Score a model (model.pt from `fetalscan train`) on a labelled dataset from "
                       "another centre or device and write predictions.csv, patients.csv, metrics.json and "
                       "report.html. Nothing is fitted on these data: the model's temperature and screening "
                       "threshold (chosen on its inner validation split) are used as stored.")
    p.add_argument("--model", type=Path, required=True, help="checkpoint written by `fetalscan train`")
    add_data_options(p)
    add_predict_options(p)
    p.add_argument("--description", default="", help="what the external set is (centre, device, period, how "
                   "labels were obtained); shown at the top of the report")
    add_evaluation_options(p)
    add_runtime_options(p)
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("report", help="(re)compute metrics with CIs and write report.html for a run folder",
                       description="Read a run folder (from `fetalscan cv` or `fetalscan evaluate`), compute "
                       "metrics with group-bootstrap CIs, the screening view, calibration, subgroups and the "
                       "shortcut check, and rewrite metrics.json (all keys kept) and report.html.")
    p.add_argument("run", type=Path, metavar="RUN_DIR", help="run folder with predictions.csv")
    add_evaluation_options(p)
    p.add_argument("--seed", type=int, default=None,
                   help="bootstrap / permutation seed (default: the run's own seed from metrics.json, else 0)")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None, help="progress bars")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("compare", help="paired comparison of two runs on the same cases (DeLong, McNemar)",
                       description="Paired difference of two runs on the same cases: AUROC by DeLong's test "
                       "(per class, macro with a group-bootstrap CI, and any-anomaly-vs-normal) and accuracy by "
                       "McNemar's test, with confidence intervals.")
    p.add_argument("run_a", type=Path, metavar="RUN_A", help="first run folder")
    p.add_argument("run_b", type=Path, metavar="RUN_B", help="second run folder")
    p.add_argument("--level", default="patient", choices=["patient", "image"],
                   help="compare patients (patients.csv, default) or images (predictions.csv)")
    p.add_argument("--n-boot", type=int, default=1000, help="bootstrap resamples of patients (default: 1000)")
    p.add_argument("--confidence", type=float, default=0.95, help="confidence level (default: 0.95)")
    p.add_argument("--normal-class", default=None, help="normal class for the screening comparison "
                   "(default: the run's, else 'normal')")
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed (default: 0)")
    p.add_argument("--out", type=Path, default=None, help="folder to write compare.json into (optional)")
    p.set_defaults(func=cmd_compare)


# --------------------------------------------------------------------------- handlers


def cmd_evaluate(args: argparse.Namespace) -> int:
    from fetalscan.report.runs import evaluate_external
    from fetalscan.runtime import resolve_device

    setup_progress(args)
    cfg = evaluation_config(args)
    cfg.seed = args.seed
    cfg.validate()
    pcfg = predict_config(args)  # every option checked (validated) before the data are read
    device = resolve_device(args.device)
    dataset = load_data(args, require_labels=False)
    metrics = evaluate_external(args.model, dataset, args.out, cfg, predict_config=pcfg,
                                device=device, overwrite=args.overwrite, description=args.description)
    for note in metrics["task"]["notes"]:  # e.g. labels the model does not know, left unscored
        warn_line(note)
    print_summary(metrics)
    info_line(f"wrote {args.out}/ (predictions.csv, patients.csv, metrics.json, report.html)")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from fetalscan.report.runs import evaluate_run

    setup_progress(args)
    cfg = evaluation_config(args)
    cfg.seed = args.seed if args.seed is not None else _run_seed(args.run)
    metrics = evaluate_run(args.run, cfg)
    print_summary(metrics)
    info_line(f"wrote {args.run}/report.html and {args.run}/metrics.json")
    return 0


def _run_seed(run: Path) -> int:
    """The seed recorded in a run's metrics.json (0 when absent or unreadable)."""
    import json

    try:
        seed = json.loads((Path(run) / "metrics.json").read_text(encoding="utf-8"))["provenance"]["seed"]
        return int(seed) if seed is not None else 0
    except (OSError, ValueError, KeyError, TypeError):
        return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from fetalscan.evaluation.compare import compare_runs
    from fetalscan.fileio import write_json

    result = compare_runs(args.run_a, args.run_b, level=args.level, n_boot=args.n_boot, seed=args.seed,
                          confidence=args.confidence, normal_class=args.normal_class)
    acc = result["accuracy"]
    rows = [["accuracy (McNemar)", acc["accuracy_a"], acc["accuracy_b"], acc["difference"],
             _ci(acc["ci_bootstrap"]), acc["p_value"]]]
    macro = result["auroc"]["macro"]
    if "difference" in macro:
        rows.append(["macro AUROC (bootstrap)", macro["auroc_a"], macro["auroc_b"], macro["difference"],
                     _ci(macro["ci_bootstrap"]), None])
    scr = result["auroc"]["screening"]
    if scr:
        rows.append([f"AUROC abnormal vs {scr['normal_class']} (DeLong)", scr["auroc_a"], scr["auroc_b"],
                     scr["difference"], _ci(scr["ci"]), scr["p_value"]])
    for c, r in result["auroc"]["per_class"].items():
        if "difference" in r:
            rows.append([f"AUROC {c} (DeLong)", r["auroc_a"], r["auroc_b"], r["difference"], _ci(r["ci"]), r["p_value"]])
    print_table(f"A = {args.run_a}, B = {args.run_b} ({result['n']} {result['level']}s, paired)",
                ["measure", "A", "B", "A - B", f"{args.confidence:.0%} CI", "p"], rows)
    for note in result["notes"]:
        warn_line(note)
    if args.out:
        path = write_json(Path(args.out) / "compare.json", result)
        info_line(f"wrote {path}")
    return 0


def _ci(interval) -> str:
    if not interval or any(v is None or v != v for v in interval):
        return "-"
    return f"{interval[0]:+.3f} to {interval[1]:+.3f}"


def _fmt_ci(value: float, interval) -> str:
    if value is None or value != value:
        return "-"
    if not interval or any(v is None or v != v for v in interval):
        return f"{value:.3f}"
    return f"{value:.3f} ({interval[0]:.3f}-{interval[1]:.3f})"


def print_summary(metrics: dict) -> None:
    """Headline numbers with their intervals, and the warnings, on the terminal."""
    img, pat = metrics["image_level"], metrics["patient_level"]
    rows = []
    for name, label in (("accuracy", "accuracy"), ("balanced_accuracy", "balanced accuracy"),
                        ("macro_auroc", "macro AUROC"), ("micro_auroc", "micro AUROC")):
        rows.append([label, _fmt_ci(img[name], img["ci"][name]["bootstrap"]),
                     _fmt_ci(pat[name], pat["ci"][name]["bootstrap"])])
    rows.append(["n", f"{img['n']} images", f"{pat['n']} patients"])
    print_table("Results with 95% group-bootstrap intervals", ["metric", "image level", "patient level"], rows)
    scr = metrics.get("screening") or {}
    if scr.get("available"):
        op = scr["patient"].get("operating_point")
        line = f"screening (any anomaly vs {scr['normal_class']}), patients: AUROC " + \
            _fmt_ci(scr["patient"]["roc"]["auroc"], scr["patient"]["roc"]["ci"])
        if op:
            line += (f"; sensitivity {_fmt_ci(op['sensitivity'], op['sensitivity_ci']['bootstrap'])}, "
                     f"specificity {_fmt_ci(op['specificity'], op['specificity_ci']['bootstrap'])}")
        info_line(line)
    sc = metrics.get("shortcut") or {}
    if sc.get("available"):
        info_line(f"shortcut probe (no anatomy): patient-level macro AUROC "
                  f"{_fmt_ci(sc['probe_patient_level']['macro_auroc'], sc['probe_patient_level']['ci']['macro_auroc']['bootstrap'])}")
        if sc.get("warning"):
            warn_line(sc["message"])
    elif sc.get("note"):
        warn_line(sc["note"])
    info_line(metrics.get("disclaimer", ""))
