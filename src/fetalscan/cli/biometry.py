"""``fetalscan biometry train | predict | evaluate`` and ``fetalscan view``.

- ``biometry train``: head segmenter on an HC18-style manifest -> ``DIR/model.pt``
  (optionally holding out a share of the exams for ``evaluate --split holdout``).
- ``biometry predict``: HC, BPD, OFD and gestational age of images, with an overlay
  PNG per image and ``measurements.csv``.
- ``biometry evaluate``: HC18-style scores (Dice, Hausdorff, HC difference) either
  from grouped cross-validation (no ``--model``: one segmenter per fold) or of a
  trained ``--model`` on a manifest.
- ``view``: the standard plane (SonoNet-16) of each image and its confidence.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from fetalscan.cli._ui import (
    add_dataclass_options,
    add_runtime_options,
    dataclass_from_args,
    info_line,
    print_table,
    setup_progress,
    warn_line,
)

_HELP = {
    "encoder": "U-Net encoder: sononet16 (SonoNet-16 trunk, fetalscan) or a segmentation_models_pytorch encoder: mobilenet_v2, resnet18, resnet34, efficientnet-b0 ...",
    "decoder_channels": "five decoder widths, comma-separated",
    "input_height": "network input height (multiple of 32); images are resized, logits upsampled back",
    "input_width": "network input width (multiple of 32)",
    "pretrained": "encoder weights: none (offline), imagenet (smp encoders; downloaded once by the library) or sononet (the bundled SonoNet-16 weights, with --encoder sononet16; offline)",
    "epochs": "maximum training epochs (early stopping on the inner-validation HC difference)",
    "batch_size": "mini-batch size",
    "lr": "peak learning rate (AdamW, one-cycle schedule)",
    "weight_decay": "AdamW weight decay",
    "patience": "epochs without inner-validation improvement before stopping",
    "augment": "joint geometric (image + mask) and intensity augmentation",
    "rotate_deg": "maximum augmentation rotation in degrees",
    "val_fraction": "share of the training exams held out as the inner validation split",
    "backend": "inference engine: auto (onnx on CPU, torch on CUDA), torch or onnx",
    "every_nth": "keep every N-th frame of cine DICOM / video",
    "plane_check": "also name the standard plane (SonoNet-16) and flag images that are not a brain plane "
                   "(the measurement is still made and reported)",
    "quality_check": "also score image quality (0-1) and say 're-acquire' below the documented threshold "
                     "(docs/quality.md; test-time augmentation + plane gate, slower)",
}
_SKIP = {"seed", "device"}

#: Place of these commands in ``fetalscan --help`` (the order in which data flow through them).
ORDER = 40


def _add_train_options(p: argparse.ArgumentParser) -> None:
    from fetalscan.biometry.training import BiometryTrainConfig

    add_dataclass_options(p, BiometryTrainConfig, _HELP, title="training", skip=_SKIP)


def _train_config(args: argparse.Namespace):
    from fetalscan.biometry.training import BiometryTrainConfig

    return dataclass_from_args(BiometryTrainConfig, args, seed=args.seed, device=args.device)


def register(sub: argparse._SubParsersAction) -> None:
    from fetalscan.biometry.predict import BiometryPredictConfig

    bio = sub.add_parser("biometry", help="fetal head biometry: segmentation -> ellipse -> HC/BPD/OFD -> GA",
                         description="Fetal head biometry on HC18-style data (image,mask,exam,pixel_size_mm,hc_mm). "
                         "Measurements support, and never replace, the sonographer's measurement.")
    bsub = bio.add_subparsers(dest="biometry_command", metavar="SUBCOMMAND", required=True)

    p = bsub.add_parser("train", help="train the head segmenter -> DIR/model.pt",
                        description="Train a U-Net head segmenter with an inner validation split of exams "
                        "(early stopping and calibration); optionally hold out a share of the exams for "
                        "`biometry evaluate --split holdout`.")
    p.add_argument("--data", type=Path, required=True, help="manifest CSV: image,mask,exam,pixel_size_mm,hc_mm")
    p.add_argument("--holdout-fraction", type=float, default=0.0,
                   help="share of the exams kept out of training entirely, for a held-out evaluation (default: 0)")
    _add_train_options(p)
    add_runtime_options(p)
    p.set_defaults(func=cmd_train)

    p = bsub.add_parser("predict", help="measure HC, BPD, OFD and GA on images; overlay PNGs",
                        description="Segment the head, fit an ellipse and measure it. Pixel size comes from "
                        "--pixel-size, a manifest column (pixel_size_mm / pixel_spacing_mm) or the DICOM "
                        "calibration; without it values are in pixels (with a warning) and no GA is given.")
    p.add_argument("--model", type=Path, required=True, help="segmenter written by `fetalscan biometry train`")
    p.add_argument("--data", type=Path, required=True,
                   help="an image, DICOM, video, folder, or manifest CSV: an image (or path) column; optional "
                        "exam (or group), pixel_size_mm, and hc_mm (a reference HC, written as hc_ref_mm beside "
                        "the measured hc_mm)")
    p.add_argument("--pixel-size", dest="pixel_size_mm", metavar="MM", type=float, default=None,
                   help="mm per pixel for every image (overrides nothing: manifest/DICOM values win)")
    add_dataclass_options(p, BiometryPredictConfig, _HELP, title="measurement", skip={"pixel_size_mm"})
    add_runtime_options(p)
    p.set_defaults(func=cmd_predict)

    p = bsub.add_parser("evaluate", help="HC18-style scores: grouped CV (default) or a trained --model",
                        description="Without --model: grouped k-fold cross-validation by exam (one segmenter per "
                        "fold, out-of-fold scores). With --model: score that segmenter on the manifest "
                        "(--split holdout keeps only the exams it held out). Writes biometry_metrics.json, "
                        "biometry_images.csv, bland_altman.png and report.html.")
    p.add_argument("--data", type=Path, required=True, help="manifest CSV: image,mask,exam,pixel_size_mm,hc_mm")
    p.add_argument("--model", type=Path, default=None, help="a trained segmenter (else: cross-validation)")
    p.add_argument("--split", default="all", choices=("all", "holdout"),
                   help="with --model: all rows (refused if any was used in training) or the held-out exams")
    p.add_argument("--backend", default="auto", choices=("auto", "torch", "onnx"), help="inference engine with --model")
    p.add_argument("--folds", type=int, default=5, help="cross-validation folds, grouped by exam (default: 5)")
    p.add_argument("--save-models", action="store_true", help="cross-validation: also save each fold's model")
    p.add_argument("--n-boot", type=int, default=1000, help="bootstrap resamples (exams) for the 95%% CIs")
    _add_train_options(p)
    add_runtime_options(p)
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("view", help="standard plane of each image (SonoNet-16) and its confidence",
                       description="Classify images into the 13 fetal standard planes or background with the "
                       "bundled SonoNet-16. Crop rule: 975x735 screenshots (GE Voluson E8 layout) are cropped to "
                       "the scanner frame; other sizes are used whole unless --crop gives a box.")
    p.add_argument("images", nargs="+", type=Path, help="image, DICOM or video files, or folders of them")
    p.add_argument("--every-nth", type=int, default=1, help="keep every N-th frame of cine DICOM / video")
    p.add_argument("--crop", default="auto", help="auto, none, or x0,y0,x1,y1 in pixels (default: auto)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--top", type=int, default=1, help="also list the next most likely planes (default: 1)")
    p.set_defaults(func=cmd_view)


# --------------------------------------------------------------------------- handlers


def _num(v, digits: int, sign: str = "") -> str:
    """A number for the console; missing / NaN as '-' (never 'nan')."""
    return "-" if v is None or v != v else f"{v:{sign}.{digits}f}"


def _print_metrics(m: dict, title: str) -> None:
    rows = []
    for key, label, digits in (("dice", "Dice (fitted ellipse)", 4), ("dice_raw", "Dice (raw mask)", 4),
                               ("hausdorff_mm", "Hausdorff (mm)", 2), ("hc_abs_diff_mm", "|HC difference| (mm)", 2),
                               ("hc_diff_mm", "HC difference (mm)", 2),
                               ("hc_ref_mask_fit_diff_mm", "HC fit on reference masks (mm)", 2)):
        lo, hi = m[f"{key}_mean_ci95"]
        ci = "-" if lo is None or hi is None or lo != lo else f"{lo:.{digits}f} – {hi:.{digits}f}"
        rows.append([label, _num(m[f"{key}_mean"], digits), _num(m[f"{key}_sd"], digits), ci, m[f"{key}_n"]])
    print_table(title, ["measure", "mean", "SD", "95% CI (exams)", "n"], rows)
    head = f"{m['n_images']} images, {m['n_exams']} exams; no head found in {m['n_no_head']}"
    if m.get("n_check"):
        head += f"; {m['n_check']} with a non-elliptical head region (measured, flagged 'check')"
    if not m.get("hc_abs_diff_mm_n"):
        warn_line(f"{head}. No measurable heads: there is no HC difference, Bland-Altman plot or goal check. "
                  "The segmenter failed on these images (train longer or on more data; docs/biometry.md).")
        return
    info_line(f"{head}. HC difference mean ± SD: {_num(m['hc_abs_diff_mm_mean'], 2)} ± "
              f"{_num(m['hc_abs_diff_mm_sd'], 2)} mm (absolute), {_num(m['hc_diff_mm_mean'], 2, '+')} ± "
              f"{_num(m['hc_diff_mm_sd'], 2)} mm (signed); "
              f"goal ≤ {m['goal_hc_abs_diff_mm']:.1f} mm: {'met' if m['goal_met'] else 'not met'}.")


def cmd_train(args: argparse.Namespace) -> int:
    from fetalscan.biometry.training import train_final
    from fetalscan.data.hc18 import load_biometry_manifest

    setup_progress(args)
    cfg = _train_config(args)
    items = load_biometry_manifest(args.data)
    s = train_final(items, cfg, args.out, holdout_fraction=args.holdout_fraction, overwrite=args.overwrite,
                    manifest=str(args.data))
    fit, cal = s["fit"], s["calibration"]
    info_line(f"model: {s['model']} (best epoch {fit['best_epoch']} of {fit['epochs_run']}; inner-validation "
              f"|HC difference| {fit['best_val_hc_abs_diff_mm']:.2f} mm; axis offset {cal['axis_offset_px']:+.2f} px)")
    if args.holdout_fraction > 0:
        info_line(f"{s['split']['n_holdout_images']} images of {len(s['split']['holdout_exams'])} exams held out: "
                  f"score them with `fetalscan biometry evaluate --model {s['model']} --data {args.data} "
                  "--split holdout`")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from fetalscan.biometry.predict import BiometryPredictConfig, predict_to_folder

    setup_progress(args)
    cfg = dataclass_from_args(BiometryPredictConfig, args)
    res = predict_to_folder(args.model, args.data, args.out, cfg, overwrite=args.overwrite, device=args.device)
    for text, is_warning in res.console_lines():
        (warn_line if is_warning else info_line)(text)
    for warning in res.warnings:
        warn_line(warning)
    info_line(f"{len(res.images)} image(s) -> {res.out}/measurements.csv and {res.out}/overlays/. "
              "Measurements support, and never replace, the sonographer's.")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from fetalscan.data.hc18 import load_biometry_manifest
    from fetalscan.report.biometry import (
        cross_validate_to_folder,
        evaluate_checkpoint_to_folder,
    )

    setup_progress(args)
    items = load_biometry_manifest(args.data)
    if args.model is not None:
        m = evaluate_checkpoint_to_folder(args.model, items, args.out, split=args.split, device=args.device,
                                          backend=args.backend, overwrite=args.overwrite, n_boot=args.n_boot,
                                          seed=args.seed, manifest=str(args.data))
        _print_metrics(m, f"{m['evaluation']}")
    else:
        m = cross_validate_to_folder(items, _train_config(args), args.out, folds=args.folds,
                                     overwrite=args.overwrite, n_boot=args.n_boot, manifest=str(args.data),
                                     save_models=args.save_models)
        _print_metrics(m, f"Grouped {args.folds}-fold cross-validation by exam (out-of-fold)")
    files = ["biometry_metrics.json", "biometry_images.csv"]
    files += ["bland_altman.png"] if (Path(args.out) / "bland_altman.png").is_file() else []
    info_line(f"wrote {args.out}/ ({', '.join(files + ['report.html'])})")
    return 0


def cmd_view(args: argparse.Namespace) -> int:
    from fetalscan.data.records import load_dataset
    from fetalscan.quality.planes import classify_records, parse_crop
    from fetalscan.runtime import resolve_device

    crop = parse_crop(args.crop)
    device = resolve_device(args.device)
    records = [r for p in args.images for r in load_dataset(p, require_labels=False, every_nth=args.every_nth).records]
    results = classify_records(records, device, crop=crop)
    rows = []
    for rec, r in zip(records, results):
        name = rec.path.name + (f"#{rec.frame}" if rec.frame is not None else "")
        others = sorted(r.probabilities.items(), key=lambda kv: -kv[1])[1:max(args.top, 1)]
        rows.append([name, r.plane, f"{r.confidence:.2f}", "yes" if r.is_brain else "no", r.crop,
                     ", ".join(f"{k} {v:.2f}" for k, v in others) or "-"])
    print_table("Standard plane (SonoNet-16)", ["image", "plane", "confidence", "brain plane", "crop", "next"], rows)
    info_line("The plane gate supports, and never replaces, the sonographer's judgement of the plane.")
    return 0
