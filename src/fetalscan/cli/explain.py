"""``fetalscan explain`` — Grad-CAM family overlays, the report gallery and faithfulness scores.

Two forms::

    fetalscan explain --model CKPT --images PATH [PATH ...] --out DIR [--method gradcam]
    fetalscan explain --run RUN_DIR [--model CKPT]

The first writes, for every image, the overlay at the original size, the heatmap
and a side-by-side panel (``--faithfulness`` adds the faithfulness table for these
images). The second writes ``RUN_DIR/explain/``: the gallery of the most confident
true positives, false positives and false negatives per class, and
``faithfulness.json`` (deletion / insertion vs random maps, randomisation check,
energy in the fetal head), which ``fetalscan report`` shows.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from fetalscan.cli._ui import (
    add_dataclass_options,
    dataclass_from_args,
    info_line,
    print_table,
    setup_progress,
    warn_line,
)

_HELP = {
    "method": "heatmap method: gradcam, gradcam++, scorecam (slow: one forward pass per channel) or eigencam",
    "layer": "dotted name of the target layer (default: the backbone's registered Grad-CAM layer)",
    "target": "class whose evidence is shown (default: each image's predicted class)",
    "batch_size": "images per forward/backward pass",
    "alpha": "opacity of the heatmap colour at its hottest point, 0-1",
    "colormap": "matplotlib colour map of the overlay (jet, turbo, inferno ...)",
    "score_batch": "masked images per forward pass inside Score-CAM",
    "methods": "faithfulness: comma-separated methods or 'all' (scorecam is slow)",
    "n_images": "faithfulness: images for deletion/insertion (one per patient group first)",
    "randomisation_images": "faithfulness: the first N of those images are used for the randomisation check",
    "steps": "faithfulness: deletion/insertion curve steps (fractions 0, 1/steps, ..., 1)",
    "baseline": "faithfulness: what removed pixels become: blur or mean",
    "blur_sigma": "faithfulness: Gaussian blur sigma of the baseline, as a fraction of the longer input side",
    "random_maps": "faithfulness: random maps per image for the random baseline",
    "head_masks": "faithfulness: HC18-style manifest (image,mask) for energy-in-head; 'auto' looks for "
                  "../shared/data/hc18/manifest.csv, 'none' skips it",
    "head_images": "faithfulness: head images sampled from --head-masks (one per exam)",
    "n_boot": "faithfulness: group-bootstrap resamples for the 95%% intervals",
}
_SKIP = {"seed", "batch_size"}

#: Place of these commands in ``fetalscan --help`` (the order in which data flow through them).
ORDER = 30


def _add_options(p: argparse.ArgumentParser, cls, title: str, skip: set[str] = frozenset()) -> None:
    """Flags of a config dataclass (``--head-masks`` defaults to ``auto`` on the command line)."""
    add_dataclass_options(p, cls, _HELP, title=title, skip=skip, defaults={"head_masks": "auto"})


def register(sub: argparse._SubParsersAction) -> None:
    from fetalscan.explain.cams import ExplainConfig
    from fetalscan.explain.faithfulness import FaithfulnessConfig

    p = sub.add_parser(
        "explain", help="Grad-CAM family heatmaps over the images, report gallery, faithfulness scores",
        description="Heatmaps of where a model found its evidence, overlaid on the original ultrasound "
        "images, and how faithful those heatmaps are. Images: --model CKPT --images PATH... --out DIR. "
        "A CV run folder: --run RUN_DIR (gallery + faithfulness into RUN_DIR/explain, each image explained "
        "by the fold model saved by `fetalscan cv` that held it out; or pass --model). Heatmaps support, and never "
        "replace, the clinician's reading.",
    )
    p.add_argument("--model", type=Path, default=None, help="checkpoint written by `fetalscan train`")
    p.add_argument("--images", type=Path, nargs="+", default=None,
                   help="images, folders, manifests, DICOM or video files to explain")
    p.add_argument("--run", type=Path, default=None, help="run folder written by `fetalscan cv`")
    p.add_argument("--out", type=Path, default=None,
                   help="output folder (required with --images; default with --run: RUN/explain)")
    p.add_argument("--overwrite", action="store_true", help="allow a non-empty output folder")
    p.add_argument("--faithfulness", action=argparse.BooleanOptionalAction, default=None,
                   help="measure faithfulness (default: on with --run, off with --images)")
    p.add_argument("--gallery-per-kind", type=int, default=1,
                   help="gallery images per class and kind (TP, FP, FN) (default: 1)")
    p.add_argument("--every-nth", type=int, default=1, help="keep every N-th frame of cine DICOM / video")
    _add_options(p, ExplainConfig, "heatmaps")
    _add_options(p, FaithfulnessConfig, "faithfulness", _SKIP)
    p.add_argument("--device", default="auto",
                   help="'auto' (CUDA when present, else CPU), 'cpu', 'cuda' or 'cuda:N' (default: auto)")
    p.add_argument("--seed", type=int, default=0, help="seed of image sampling and random maps (default: 0)")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="show progress bars (default: when stderr is a terminal)")
    p.set_defaults(func=cmd_explain)


def _configs(args: argparse.Namespace):
    from fetalscan.explain.cams import ExplainConfig
    from fetalscan.explain.faithfulness import FaithfulnessConfig

    cfg = dataclass_from_args(ExplainConfig, args)
    fcfg = dataclass_from_args(FaithfulnessConfig, args, seed=args.seed, batch_size=args.batch_size,
                               head_masks=_head_masks(args.head_masks))
    return cfg, fcfg


def _head_masks(value: str | None) -> str | None:
    """``auto`` -> the shared HC18 manifest when one is found, ``none`` -> None, else the path."""
    from fetalscan.data.shared import shared_data
    from fetalscan.errors import DataError

    if value is None or value.lower() == "none":
        return None
    if value.lower() != "auto":
        if not Path(value).is_file():
            raise DataError(f"--head-masks {value}: file not found")
        return value
    found = shared_data("hc18/manifest.csv")
    if found is not None and found.is_file():
        return str(found)
    warn_line("--head-masks auto: no HC18 manifest found (../shared/data/hc18/manifest.csv); "
              "energy in head is not measured")
    return None


def cmd_explain(args: argparse.Namespace) -> int:
    from fetalscan.errors import FetalscanError

    setup_progress(args)
    if (args.run is None) == (args.images is None):
        raise FetalscanError("give either --images (with --model and --out) or --run RUN_DIR")
    if args.run is not None:
        return _cmd_run(args)
    if args.model is None or args.out is None:
        raise FetalscanError("--images needs --model CKPT and --out DIR")
    return _cmd_images(args)


def _cmd_images(args: argparse.Namespace) -> int:
    from fetalscan.explain.cams import explain_to_folder, image_records
    from fetalscan.explain.faithfulness import faithfulness_to_folder
    from fetalscan.fileio import prepare_out_dir
    from fetalscan.models.checkpoint import load_checkpoint
    from fetalscan.runtime import resolve_device, seed_everything

    cfg, fcfg = _configs(args)
    cfg.validate()
    if args.faithfulness:
        fcfg.validate()
    device = resolve_device(args.device)
    seed_everything(args.seed)
    loaded = load_checkpoint(args.model, device)
    records, unknown = image_records(args.images, loaded, args.every_nth)
    if unknown:
        warn_line(f"label(s) {sorted(unknown)} are not classes of the model; shown as unknown")
    out = prepare_out_dir(args.out, args.overwrite)
    df = explain_to_folder(loaded, records, cfg, out, device)
    info_line(f"{len(df)} image(s) explained with {cfg.method} -> {out}/ "
              "(<name>_<method>_overlay.png, _panel.png, _heatmap.png, explanations.csv)")
    if args.faithfulness:
        _print_faithfulness(faithfulness_to_folder(loaded, records, cfg, fcfg, out, device))
        info_line(f"wrote {out}/faithfulness.json and faithfulness_curves.png")
    info_line("Heatmaps show where the model's evidence lay; they support, and never replace, the clinician.")
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    from fetalscan.explain.gallery import explain_run
    from fetalscan.runtime import resolve_device, seed_everything

    cfg, fcfg = _configs(args)
    want = True if args.faithfulness is None else args.faithfulness
    device = resolve_device(args.device)
    seed_everything(args.seed)
    res = explain_run(args.run, cfg, fcfg if want else None, model_path=args.model,
                      per_kind=args.gallery_per_kind, out=args.out, overwrite=args.overwrite, device=device)
    models = res["models"]
    (info_line if models.get("held_out") else warn_line)(models["note"])
    rows = [[g["class"], g["kind"], Path(g["path"]).name, g["prob"], g["label"], g["pred"]] for g in res["gallery"]]
    print_table(f"Gallery ({cfg.method}): most confident per class", ["class", "kind", "image", "p(class)",
                                                                      "label", "predicted"], rows)
    if res["faithfulness"] is not None:
        _print_faithfulness(res["faithfulness"])
    info_line(f"wrote {res['out']}/ (gallery.json, gallery/*.png"
              + (", faithfulness.json, faithfulness_curves.png)" if res["faithfulness"] else ")"))
    info_line(f"`fetalscan report {args.run}` adds them to report.html")
    return 0


def _print_faithfulness(result: dict) -> None:
    from fetalscan.explain.faithfulness import TABLE_COLUMNS, table_rows

    print_table("Faithfulness of the heatmaps (means; see faithfulness.json for 95% intervals)",
                TABLE_COLUMNS, table_rows(result))
    for method, e in result["methods"].items():
        cascade = ", ".join(f"{c['stage']}: {c['spearman']:.2f}" for c in e["randomisation_cascade"])
        info_line(f"{e.get('name', method)} randomisation cascade (Spearman): {cascade}")
    for note in result["notes"]:
        info_line(f"- {note}")
