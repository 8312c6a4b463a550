"""``fetalscan quality`` (a 0-1 quality score per image, with a re-acquire flag) and
``fetalscan denoise`` (J-invariant-calibrated despeckling). Parsing only; the work is in
:mod:`fetalscan.biometry.quality` and :mod:`fetalscan.quality.despeckle`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from fetalscan.cli._ui import add_runtime_options, info_line, print_table, setup_progress, warn_line

#: Place in ``fetalscan --help``: after biometry.
ORDER = 41


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("quality", help="image quality score (0-1) per image and a re-acquire flag -> quality.csv",
                       description="Label-free quality signals (plane-gate brain probability, sharpness, contrast; "
                       "with --biometry-model also CNR / gCNR of the head, ellipse-fit residual, mask vs ellipse "
                       "area and test-time-augmentation disagreement) combined into one 0-1 score that predicts a "
                       "failed head measurement (|HC difference| > 5 mm or no head). Below the model's documented "
                       "threshold the image is flagged 're-acquire'. See docs/quality.md. The score supports, and "
                       "never replaces, the sonographer's judgement of the image.")
    p.add_argument("--data", type=Path, required=True,
                   help="an image, folder, DICOM, video, or manifest CSV (image or path column; optional "
                        "pixel_size_mm, hc_mm)")
    p.add_argument("--biometry-model", type=Path, default=None,
                   help="head segmenter (`fetalscan biometry train`): adds the segmentation signals; without it "
                        "the image-only quality model is used")
    p.add_argument("--quality-model", type=Path, default=None,
                   help="quality model JSON (default: the shipped one, see docs/quality.md)")
    p.add_argument("--shift-px", type=int, default=4, help="test-time-augmentation shift in network pixels (default: 4)")
    p.add_argument("--pixel-size", dest="pixel_size_mm", metavar="MM", type=float, default=None,
                   help="mm per pixel for images that carry none (HC column only)")
    add_runtime_options(p)
    p.set_defaults(func=cmd_quality)

    p = sub.add_parser("denoise", help="despeckle images (TV, NL-means or bilateral, J-invariant calibrated; or the n2n network)",
                       description="Despeckle ultrasound images with a classical denoiser whose parameters are "
                       "chosen per image without clean images by J-invariant calibration (Batson & Royer 2019). "
                       "Writes one PNG per image. See docs/quality.md for the downstream effect of each method.")
    p.add_argument("--data", type=Path, required=True, help="an image, folder, or manifest CSV")
    p.add_argument("--method", default="tv", choices=("tv", "nl_means", "bilateral", "n2n", "none"),
                   help="denoiser (default: tv, the best calibrated classical method; n2n = the self-supervised "
                        "network trained on HC18, better on HC18-like images; see docs/quality.md)")
    p.add_argument("--work-size", type=int, default=384,
                   help="the longer side the calibration runs at, in pixels (default: 384)")
    add_runtime_options(p)
    p.set_defaults(func=cmd_denoise)


def cmd_quality(args: argparse.Namespace) -> int:
    from fetalscan.biometry.quality_run import QualityConfig, quality_to_folder

    setup_progress(args)
    cfg = QualityConfig(shift_px=args.shift_px, pixel_size_mm=args.pixel_size_mm)
    res = quality_to_folder(args.data, args.out, biometry_model=args.biometry_model,
                            quality_model=args.quality_model, cfg=cfg, overwrite=args.overwrite, device=args.device)
    df = res.table
    rows = [[r["image"], f"{r['quality']:.2f}", "RE-ACQUIRE" if r["reacquire"] else "ok"] for _, r in df.head(30).iterrows()]
    print_table(f"Image quality ({res.model_name} model, re-acquire below {res.threshold:.2f})",
                ["image", "quality", "advice"], rows)
    if len(df) > 30:
        info_line(f"... {len(df) - 30} more in {res.out}/quality.csv")
    if res.n_reacquire:
        warn_line(f"{res.n_reacquire} of {len(df)} image(s) below the quality threshold: re-acquire if possible")
    if args.biometry_model is None:
        warn_line("no --biometry-model: image-only signals and model (weaker; see docs/quality.md)")
    info_line(f"wrote {res.out}/quality.csv. The score supports, and never replaces, the sonographer's judgement.")
    return 0


def cmd_denoise(args: argparse.Namespace) -> int:
    from fetalscan.quality.despeckle import DenoiseConfig, denoise_to_folder

    setup_progress(args)
    res = denoise_to_folder(args.data, args.out, DenoiseConfig(method=args.method, work_size=args.work_size),
                            overwrite=args.overwrite)
    import statistics

    ms = statistics.median(r["seconds"] for r in res) * 1000
    info_line(f"{len(res)} image(s) despeckled with {args.method} -> {args.out}/ (median {ms:.0f} ms per image at "
              f"the {args.work_size}-px working size; parameters and times in denoise.csv)")
    return 0
