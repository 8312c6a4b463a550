"""``fetalscan model-card`` — the model card of a classifier checkpoint, as Markdown.

    fetalscan model-card CKPT [--run RUN] [--out FILE]

``--run`` is the cross-validation run whose evaluation describes the model (``fetalscan cv``
/ ``demo`` output with ``metrics.json``); without it the run folder holding the checkpoint is
used when its metrics belong to the same data and classes, and otherwise the card says it
has no evaluation. The card is written to ``--out`` (default: ``model_card.md`` beside the
checkpoint).
"""

from __future__ import annotations

import argparse
from pathlib import Path

ORDER = 35


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("model-card", help="write a classifier's model card (Markdown)",
                       description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", type=Path, help="classifier checkpoint (model.pt)")
    p.add_argument("--run", type=Path, default=None, help="cv run folder whose metrics.json describes the model")
    p.add_argument("--out", type=Path, default=None, help="Markdown file (default: model_card.md beside CKPT)")
    p.set_defaults(func=cmd_model_card)


def cmd_model_card(args: argparse.Namespace) -> int:
    from fetalscan.cli._ui import info_line, warn_line
    from fetalscan.fileio import write_text
    from fetalscan.report.model_card import matching_run_metrics, model_card, render_markdown

    metrics = None if args.run is not None else matching_run_metrics(args.checkpoint)
    card = model_card(args.checkpoint, args.run, metrics=metrics)
    out = args.out or args.checkpoint.parent / "model_card.md"
    write_text(out, render_markdown(card))
    for note in card["notes"]:
        warn_line(note)
    info_line(f"model card: {out}")
    return 0
