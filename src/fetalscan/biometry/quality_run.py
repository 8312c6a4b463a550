"""``fetalscan quality`` on a dataset: signals of every record, the score, ``quality.csv``.

The per-image work is :mod:`fetalscan.biometry.quality`; this module adds the records,
pixel sizes and reference HCs of ``biometry predict`` (:mod:`fetalscan.biometry.predict`)
and writes the table.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fetalscan.biometry.quality import QualityConfig, image_quality_signals, plane_brain_probability
from fetalscan.errors import DataError


def signals_for_records(records: Sequence, segmenter=None, cfg: QualityConfig | None = None,
                        device=None, refs: Sequence[float | None] | None = None):
    """One row per record: ``path``, the signals, and (with a segmenter) ``status`` and ``hc_mm``
    (plus ``hc_ref_mm`` / ``hc_diff_mm`` when ``refs`` gives reference HCs).

    ``records`` are :class:`fetalscan.data.records.Record`; pixel sizes as in ``biometry predict``.
    """
    import pandas as pd

    from fetalscan.biometry.predict import record_pixel_size
    from fetalscan.data.records import iter_record_images
    from fetalscan.progress import track
    from fetalscan.quality import signals as S

    cfg = cfg or QualityConfig()
    rows: list[dict] = [{} for _ in records]
    pending: list[tuple[int, np.ndarray]] = []

    def flush() -> None:
        if cfg.plane_check and pending:
            probs = plane_brain_probability([im for _, im in pending], device)
            for (j, _), p in zip(pending, probs):
                rows[j]["plane_brain_prob"] = p
        pending.clear()

    for i, image in track(iter_record_images(records), "scoring quality", total=len(records)):
        r = records[i]
        row: dict = {"image": r.image_id, "path": str(r.path)}
        if segmenter is not None:
            ps = record_pixel_size(r, cfg.pixel_size_mm)
            sig, m = image_quality_signals(segmenter, image, ps, shift_px=cfg.shift_px, where=r.image_id)
            row.update({"status": m.status, "hc_mm": m.hc if m.unit == "mm" else None,
                        "hc_px": m.hc / ps if (m.hc is not None and ps) else m.hc})
            if refs is not None:
                ref = refs[i]
                row["hc_ref_mm"] = ref
                row["hc_diff_mm"] = (row["hc_mm"] - ref) if (row["hc_mm"] is not None and ref is not None) else None
        else:
            sig = S.image_signals(image)
        row.update(sig)
        row.setdefault("plane_brain_prob", float("nan"))
        rows[i] = row
        if cfg.plane_check:
            pending.append((i, image))
            if len(pending) == 16:
                flush()
    flush()
    return pd.DataFrame(rows)


@dataclass
class QualityResult:
    """What :func:`quality_to_folder` wrote."""

    table: object  # pandas DataFrame of quality.csv
    out: Path
    model_name: str
    threshold: float
    n_reacquire: int


def score_table(df, model) -> tuple:
    """Add ``quality`` and ``reacquire`` columns to a signals table with a QualityModel."""
    q = model.predict_quality(df)
    df = df.copy()
    df["quality"] = q
    df["reacquire"] = q < model.threshold
    return df


def quality_to_folder(data: str | Path, out: str | Path, *, biometry_model: str | Path | None = None,
                      quality_model: str | Path | None = None, cfg: QualityConfig | None = None,
                      overwrite: bool = False, device: str = "auto") -> QualityResult:
    """``fetalscan quality``: signals + score of every image of ``data`` -> ``out/quality.csv``.

    Without ``biometry_model`` only the image signals exist and the image-only quality model is
    used (its AUROC is lower; see ``docs/quality.md``).
    """
    from fetalscan.biometry.predict import prediction_records, reference_hc_mm
    from fetalscan.biometry.segmenter import HeadSegmenter
    from fetalscan.fileio import prepare_out_dir, write_csv
    from fetalscan.quality.score import load_quality_model
    from fetalscan.quality.signals import ALL_SIGNALS, IMAGE_SIGNALS
    from fetalscan.runtime import resolve_device

    cfg = cfg or QualityConfig()
    data = Path(data)
    if not data.exists():
        raise DataError(f"{data}: no such image, folder or manifest")
    dev = resolve_device(device)
    seg = HeadSegmenter.load(biometry_model, dev, cfg.backend) if biometry_model else None
    model = load_quality_model(quality_model, "full" if seg is not None else "image")
    if not cfg.plane_check and "plane_brain_prob" in model.features:
        raise DataError("the quality model uses the plane gate's brain-plane probability; keep the plane check on")
    records = prediction_records(data)
    if not records:
        raise DataError(f"{data}: no images found")
    refs = [reference_hc_mm(r) for r in records]
    df = signals_for_records(records, seg, cfg, dev, refs if any(v is not None for v in refs) else None)
    df = score_table(df, model)
    signal_cols = [c for c in (ALL_SIGNALS if seg is not None else IMAGE_SIGNALS) if c in df.columns]
    lead = ["path", "image", "quality", "reacquire"]
    extra = [c for c in ("head_found", "status", "hc_mm", "hc_ref_mm", "hc_diff_mm") if c in df.columns]
    df = df[lead + signal_cols + extra]
    out = prepare_out_dir(out, overwrite)
    write_csv(out / "quality.csv", df)
    return QualityResult(df, out, model.name, model.threshold, int(df["reacquire"].sum()))
