"""Flags shared by several commands: the data to read and how a run is evaluated."""

from __future__ import annotations

import argparse
from pathlib import Path

from fetalscan.cli._ui import add_dataclass_options, dataclass_from_args


def add_data_options(p: argparse.ArgumentParser, required: bool = True) -> None:
    p.add_argument("--data", type=Path, required=required,
                   help="manifest CSV (path,label,group[,ga_weeks,center,device,view]), folder-per-class "
                        "tree, or (predict) an image / DICOM / video / folder")
    p.add_argument("--group-regex", default=None,
                   help="regex whose first group names the patient group, matched on the path relative "
                        "to a folder tree (default: file stem; DICOM: StudyInstanceUID)")
    p.add_argument("--classes", default=None,
                   help="explicit comma-separated class order (default: sorted label names)")
    p.add_argument("--every-nth", type=int, default=1, help="keep every N-th frame of cine DICOM / video")
    p.add_argument("--sector-mask", action="store_true",
                   help="blank every pixel outside the scan sector (DICOM Ultrasound Region Sequence, else found in "
                        "the pixels; one mask per file) before the model sees the image: no burned-in text, scale "
                        "bars or borders; use the same setting for train, predict and evaluate (docs/privacy.md)")


def load_data(args: argparse.Namespace, require_labels: bool = True):
    from fetalscan.data.records import load_dataset

    classes = [c.strip() for c in args.classes.split(",")] if getattr(args, "classes", None) else None
    return load_dataset(args.data, require_labels=require_labels, group_regex=args.group_regex,
                        classes=classes, every_nth=args.every_nth,
                        sector_mask=getattr(args, "sector_mask", False))


_EVAL_HELP = {
    "n_boot": "bootstrap resamples of patients (groups) for every confidence interval",
    "confidence": "confidence level of the intervals",
    "target_sensitivity": "screening view: sensitivity the operating point must reach on validation data",
    "n_bins": "equal-width confidence bins of the reliability diagram / ECE / MCE",
    "subgroups": "metadata columns to break results down by: auto, none, or a comma-separated list "
                 "(ga_weeks is binned <14, 14-<20, 20-<28, >=28 weeks)",
    "small_subgroup": "subgroups with fewer patients than this are flagged as small (never hidden)",
    "shortcut": "run the shortcut check (a probe on image statistics without anatomy; needs the images)",
    "probe_floor": "shortcut warning when the probe's AUROC reaches this",
    "probe_margin": "shortcut warning when the probe is above chance and within this of the model's AUROC",
    "n_perm": "permutations of the subgroup heterogeneity test",
}


def add_evaluation_options(p: argparse.ArgumentParser) -> None:
    """Add one flag per :class:`~fetalscan.evaluate.EvaluationConfig` field (``seed`` excepted:
    commands take it from ``--seed``). Usable by any command that evaluates, e.g. ``cv``."""
    from fetalscan.evaluation.config import EvaluationConfig

    add_dataclass_options(p, EvaluationConfig, _EVAL_HELP, title="evaluation", skip={"seed"})


def evaluation_config(args: argparse.Namespace):
    """The :class:`~fetalscan.evaluate.EvaluationConfig` of parsed arguments (seed from ``--seed``)."""
    from fetalscan.evaluation.config import EvaluationConfig

    return dataclass_from_args(EvaluationConfig, args)


_PREDICT_HELP = {
    "aggregate": "patient-level rule: mean, vote or max_abnormal",
    "normal_class": "normal class (for max_abnormal)",
    "batch_size": "inference batch size",
    "plane_check": "name each image's standard plane with SonoNet-16 and flag images that are not a "
                   "brain plane (transventricular / transcerebellar); flagged rows are kept",
    "crop": "scanner-frame crop for --plane-check: auto, none or x0,y0,x1,y1 (docs/biometry.md)",
    "backend": "inference engine: torch (default: PyTorch, the numbers of `cv`), onnx (ONNX Runtime on the CPU; "
               "the graph is exported once and cached beside the model file) or auto (onnx on CPU, torch on CUDA); "
               "docs/inference.md",
}


def add_predict_options(p: argparse.ArgumentParser) -> None:
    """One flag per :class:`~fetalscan.inference.predict.PredictConfig` field."""
    from fetalscan.inference.predict import PredictConfig

    add_dataclass_options(p, PredictConfig, _PREDICT_HELP, title="prediction")


def predict_config(args: argparse.Namespace):
    """The :class:`~fetalscan.inference.predict.PredictConfig` of parsed arguments."""
    from fetalscan.inference.predict import PredictConfig

    return dataclass_from_args(PredictConfig, args)
