"""``fetalscan export`` — a classifier checkpoint as an ONNX file (optionally int8), verified against PyTorch."""

from __future__ import annotations

import argparse
from pathlib import Path

#: Place of this command in ``fetalscan --help`` (after the commands that make and apply models).
ORDER = 25


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export", help="export a classifier to ONNX (normalisation and class names inside), optionally int8",
        description="Write a classifier checkpoint as one ONNX graph: input the prepared uint8 image batch "
                    "(batch, C, h, w), output the logits; normalisation inside the graph; classes, "
                    "preprocessing, temperature and the checkpoint's SHA-256 in its metadata_props. The graph "
                    "is compared with PyTorch on a batch and refused when a probability differs by more than "
                    "1e-4 (float32). With --quantize the int8 graph's difference is printed, and with --check "
                    "its change in patient-level AUROC on a labelled set (docs/inference.md).")
    p.add_argument("--model", type=Path, required=True, help="checkpoint written by `fetalscan train`")
    p.add_argument("--format", default="onnx", choices=("onnx",), help="export format (default: onnx)")
    p.add_argument("--quantize", default="none", choices=("none", "int8", "int8-static"),
                   help="none (float32, default), int8 (dynamic: int8 weights) or int8-static (QDQ, int8 weights "
                        "and activations, calibrated on --calibration images)")
    p.add_argument("--check", type=Path, default=None, metavar="MANIFEST",
                   help="labelled manifest or folder tree: measure patient-level macro AUROC of the exported "
                        "model (and, with --quantize, the int8 model's change)")
    p.add_argument("--calibration", type=Path, default=None, metavar="DATA",
                   help="images (manifest or folder) that calibrate int8-static (default: the --check set)")
    p.add_argument("--calibration-images", type=int, default=64, help="images used to calibrate (default: 64)")
    p.add_argument("--verify-batch", type=int, default=8,
                   help="images on which ONNX Runtime is compared with PyTorch (default: 8)")
    p.add_argument("--out", type=Path, required=True, help="the .onnx file to write")
    p.add_argument("--overwrite", action="store_true", help="replace --out when it exists")
    p.set_defaults(func=cmd_export)


def cmd_export(args: argparse.Namespace) -> int:
    from fetalscan.cli._ui import info_line, warn_line
    from fetalscan.inference.onnx import FLOAT32_TOLERANCE, ExportConfig, export_model

    cfg = ExportConfig(format=args.format, quantize=args.quantize, check=args.check, calibration=args.calibration,
                       calibration_images=args.calibration_images, verify_batch=args.verify_batch)
    report = export_model(args.model, args.out, cfg, overwrite=args.overwrite)
    v = report.verify
    info_line(f"float32 ONNX vs PyTorch on {v['n']} images: max |difference| {v['max_abs_diff_probability']:.2e} in "
              f"probability, {v['max_abs_diff_logit']:.2e} in logit (tolerance {FLOAT32_TOLERANCE:.0e}): ok")
    if report.quantized_verify:
        q = report.quantized_verify
        info_line(f"{report.quantize} ONNX vs PyTorch on the same images: max |difference| "
                  f"{q['max_abs_diff_probability']:.2e} in probability, {q['max_abs_diff_logit']:.2e} in logit")
    if report.auroc:
        a = report.auroc
        line = (f"patient-level macro AUROC on {a['set']} ({a['n_patients']} patients, {a['n_images']} images, "
                f"rule {a['aggregate']}): float32 {a['float32']:.4f}")
        if "int8" in a:
            line += f", {report.quantize} {a['int8']:.4f}, change {a['change']:+.4f}"
        info_line(line)
    for note in report.notes:
        warn_line(note)
    info_line(f"wrote {report.out} ({report.size_bytes / 2**20:.1f} MiB, {report.quantize}; "
              f"checkpoint sha256 {report.checkpoint_sha256[:16]}...)")
    return 0
