"""The PDF report of one analysed study (ReportLab), from plain data.

:func:`study_pdf` takes the service's study result (a dict, as ``POST /api/v1/analyze``
returns it), the heatmap overlays of the images to show, and the study's reviews, and
returns the bytes of a PDF with

* the support-not-replace statement (:data:`fetalscan.texts.DISCLAIMER`) at the top and in
  every page's footer;
* the study-level finding with its class probabilities, the rule and the notes;
* the reader's decision in force (the last review), or "NOT REVIEWED" in bold;
* a table of every image: plane (and confidence), class, probabilities;
* the heatmap overlays of the images of highest abnormal probability (at most
  :data:`~fetalscan.report.study_selection.MAX_SHOWN_IMAGES`; the report says which and
  why) with :data:`~fetalscan.texts.HEATMAP_DISCLAIMER`;
* head biometry (HC, BPD, OFD, GA) when measured, with
  :data:`~fetalscan.texts.BIOMETRY_DISCLAIMER` and :data:`~fetalscan.texts.BIOMETRY_PLANE`;
* the model(s): file name, SHA-256, backbone, fetalscan version.

No patient name, ID or birth date and no file name appears in it: images are named by
their index (and frame); the study by the service's random study id, which is also the
file name the service gives the PDF.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from xml.sax.saxutils import escape

from fetalscan.report.study_selection import MAX_SHOWN_IMAGES, abnormal_probability
from fetalscan.texts import BIOMETRY_DISCLAIMER, BIOMETRY_PLANE, DISCLAIMER, HEATMAP_DISCLAIMER

#: Shown when a study has no review.
NOT_REVIEWED = ("NOT REVIEWED: no reader has confirmed or overridden this finding yet. "
                "It is the model's finding only.")


@dataclass(frozen=True)
class ReportImage:
    """An image the report shows in full: its index in ``result["images"]`` and PNG bytes."""

    index: int
    overlay_png: bytes  # the image with its heatmap layered over it
    biometry_png: bytes | None = None  # the head ellipse and axes drawn, when measured


def review_in_force(reviews: Sequence[Mapping]) -> Mapping | None:
    """The last review (reviews are append-only and oldest first: the last one is in force)."""
    return reviews[-1] if reviews else None


def study_pdf(result: Mapping, images: Sequence[ReportImage], reviews: Sequence[Mapping] = (), *,
              normal_class: str = "normal", compress: bool = True, generated_utc: str | None = None) -> bytes:
    """The PDF report of one study (see the module docstring); returns the PDF's bytes.

    Parameters
    ----------
    result : mapping
        The study result: ``study`` (``id``, ``created_utc``, ``prediction``, ``probabilities``,
        ``n_images``, ``rule``, ``notes``), ``images`` (``index``, ``frame``, ``prediction``,
        ``probabilities``, ``plane``, ``plane_confidence``, ``brain_plane``, ``biometry``),
        ``model`` (``name``, ``sha256``, ``backbone``, ``fetalscan_version``, ``biometry``).
    images : sequence of ReportImage
        The images to show with their heatmap, in the order to show them.
    reviews : sequence of mapping
        The study's reviews, oldest first (``reader``, ``decision``, ``final_class``,
        ``comment``, ``created_utc``); the last one is in force.
    normal_class : str
        The class whose complement is the "abnormal probability" images are ranked by.
    compress : bool
        Compress page streams (False leaves the text readable in the file, for tests).
    generated_utc : str, optional
        When the report was made (default: now, UTC).
    """
    from reportlab.lib.pagesizes import A4
    from reportlab.lib.units import mm
    from reportlab.platypus import SimpleDocTemplate

    study = result["study"]
    sid = str(study["id"])
    generated = generated_utc or datetime.now(timezone.utc).isoformat(timespec="seconds")
    buf = io.BytesIO()
    doc = SimpleDocTemplate(buf, pagesize=A4, leftMargin=18 * mm, rightMargin=18 * mm, topMargin=16 * mm,
                            bottomMargin=22 * mm, title=f"fetalscan study report {sid}", author="fetalscan",
                            subject="AI-assisted ultrasound findings (research software)", creator="fetalscan",
                            pageCompression=1 if compress else 0, invariant=1)
    st = _styles()
    story: list = []
    story += _header(study, generated, st)
    story += _findings(result, st)
    story += _review(reviews, st)
    story += _image_table(result, st)
    story += _heatmaps(result, images, normal_class, doc.width, st)
    story += _biometry(result, images, doc.width, st)
    story += _model(result, st)

    def footer(canvas, doc_) -> None:
        canvas.saveState()
        canvas.setFont("Helvetica", 7)
        canvas.drawString(doc_.leftMargin, 12 * mm, f"fetalscan study {sid} - page {doc_.page}")
        canvas.drawString(doc_.leftMargin, 8 * mm, DISCLAIMER)
        canvas.restoreState()

    doc.build(story, onFirstPage=footer, onLaterPages=footer)
    return buf.getvalue()


# ---------------------------------------------------------------------- sections
def _styles() -> dict:
    from reportlab.lib import colors
    from reportlab.lib.styles import ParagraphStyle, getSampleStyleSheet

    base = getSampleStyleSheet()
    return {
        "title": base["Title"],
        "h2": base["Heading2"],
        "body": base["BodyText"],
        "small": ParagraphStyle("small", parent=base["BodyText"], fontSize=8, leading=10),
        "cell": ParagraphStyle("cell", parent=base["BodyText"], fontSize=7, leading=8.5),
        "mono": ParagraphStyle("mono", parent=base["BodyText"], fontName="Courier", fontSize=8, leading=10),
        "box": ParagraphStyle("box", parent=base["BodyText"], fontSize=9, leading=12, borderColor=colors.orange,
                              borderWidth=1, borderPadding=5, backColor=colors.HexColor("#fff4e0"),
                              spaceBefore=4, spaceAfter=10),
        "strong": ParagraphStyle("strong", parent=base["BodyText"], fontName="Helvetica-Bold", fontSize=10,
                                 textColor=colors.HexColor("#b34700")),
    }


def _p(text: str, style) -> object:
    from reportlab.platypus import Paragraph

    return Paragraph(escape(str(text)), style)


def _header(study: Mapping, generated: str, st: dict) -> list:
    return [_p("fetalscan study report", st["title"]),
            _p(f"Study {study['id']} - analysed {study.get('created_utc', '')} (UTC); report made {generated} (UTC)",
               st["small"]),
            _p(DISCLAIMER, st["box"])]


def _pct(value) -> str:
    return "-" if value is None else f"{100.0 * float(value):.1f} %"


def _findings(result: Mapping, st: dict) -> list:
    from reportlab.platypus import Paragraph

    study = result["study"]
    out = [_p("Finding", st["h2"]),
           Paragraph(f"Model's study-level finding: <b>{escape(str(study['prediction']))}</b>", st["body"]),
           _p(f"From {study.get('n_images', len(result['images']))} image(s); study rule: {study.get('rule', '')} "
              "of the image probabilities.", st["small"])]
    rows = [["class", "probability"]] + [[c, _pct(p)] for c, p in study["probabilities"].items()]
    out.append(_table(rows, [90 * _MM, 30 * _MM], st))
    for note in study.get("notes") or []:
        out.append(_p(f"Note: {_without_names(str(note), result)}", st["small"]))
    return out


def _review(reviews: Sequence[Mapping], st: dict) -> list:
    out = [_p("Reader's review", st["h2"])]
    last = review_in_force(reviews)
    if last is None:
        return out + [_p(NOT_REVIEWED, st["strong"])]
    verb = "confirmed the finding" if last["decision"] == "confirm" else "overrode the finding with"
    out.append(_p(f"Decision in force: {last['reader']} {verb} {last['final_class']} "
                  f"({last['created_utc']} UTC; review {len(reviews)} of {len(reviews)}).", st["strong"]))
    if last.get("comment"):
        out.append(_p(f"Comment: {last['comment']}", st["body"]))
    if len(reviews) > 1:
        out.append(_p(f"{len(reviews) - 1} earlier review(s) were superseded and are kept in the service's "
                      "review history.", st["small"]))
    return out


def _image_table(result: Mapping, st: dict) -> list:
    classes = list(result["study"]["probabilities"])
    rows = [["image", "frame", "plane (confidence)", "class"] + classes]
    for im in result["images"]:
        plane = "-" if im.get("plane") is None else f"{im['plane']} ({_pct(im.get('plane_confidence'))})"
        if im.get("brain_plane") is False:
            plane += " - not a brain plane: read with care"
        rows.append([str(im["index"]), "-" if im.get("frame") is None else str(im["frame"]), plane,
                     im["prediction"]] + [_pct(im["probabilities"].get(c)) for c in classes])
    n = len(classes)
    free = 174 - 12 - 12 - 50 - 30  # mm: the text width of A4 with 18 mm margins, less the fixed columns
    widths = [12 * _MM, 12 * _MM, 50 * _MM, 30 * _MM] + [free / max(n, 1) * _MM] * n
    return [_p("Images", st["h2"]),
            _p("Images are named by their position in the upload (0, 1, ...) and, for cine loops and video, the "
               "frame; file names are not printed.", st["small"]),
            _table(rows, widths, st, repeat=1)]


def _heatmaps(result: Mapping, images: Sequence[ReportImage], normal_class: str, width: float, st: dict) -> list:
    from reportlab.platypus import KeepTogether

    n = len(result["images"])
    if not images:
        return []
    what = (f"abnormal probability (1 - p({normal_class}))" if normal_class in result["study"]["probabilities"]
            else "probability of the image's own class")
    out = [_p("Heatmaps", st["h2"]),
           _p(f"Shown: {len(images)} of {n} image(s), those of highest {what}, at most {MAX_SHOWN_IMAGES}. "
              "The page of the service shows every image.", st["small"]),
           _p(HEATMAP_DISCLAIMER, st["small"])]
    for item in images:
        im = result["images"][item.index]
        frame = "" if im.get("frame") is None else f", frame {im['frame']}"
        caption = (f"Image {item.index}{frame}: {im['prediction']} "
                   f"(abnormal probability {_pct(abnormal_probability(im, normal_class))}); heatmap "
                   f"{im.get('heatmap', {}).get('method', '')} for {im.get('heatmap', {}).get('target', '')}")
        out.append(KeepTogether([_image(item.overlay_png, width * 0.6, 95 * _MM), _p(caption, st["small"])]))
    return out


def _biometry(result: Mapping, images: Sequence[ReportImage], width: float, st: dict) -> list:
    measured = [im for im in result["images"] if im.get("biometry")]
    if not measured:
        return []
    rows = [["image", "status", "HC", "BPD", "OFD", "GA (Hadlock 1984)", "pixel size"]]
    for im in measured:
        b = im["biometry"]
        u = b.get("unit") or ""
        frame = "" if im.get("frame") is None else f"#{im['frame']}"
        size = "-" if b.get("pixel_size_mm") is None else (
            f"{b['pixel_size_mm']:.4g} mm ({b.get('pixel_size_source') or '?'}"
            + (f", region {b['pixel_size_region']}" if b.get("pixel_size_region") is not None else "") + ")")
        rows.append([f"{im['index']}{frame}", b.get("status", ""), _len(b.get("hc"), u), _len(b.get("bpd"), u),
                     _len(b.get("ofd"), u), b.get("ga_text") if b.get("ga_weeks") is not None else "-", size])
    out = [_p("Head biometry", st["h2"]), _p(BIOMETRY_DISCLAIMER, st["small"]), _p(BIOMETRY_PLANE + ".", st["small"]),
           _table(rows, [14 * _MM, 16 * _MM, 20 * _MM, 20 * _MM, 20 * _MM, 40 * _MM, 44 * _MM], st, repeat=1)]
    for im in measured:
        for w in im["biometry"].get("warnings") or []:
            out.append(_p(f"Image {im['index']}: {_without_names(w, result)}", st["small"]))
    drawn = [item for item in images if item.biometry_png is not None
             and (result["images"][item.index].get("biometry") or {}).get("status") in ("ok", "check")]
    for item in drawn:
        out += [_image(item.biometry_png, width * 0.45, 70 * _MM),
                _p(f"Image {item.index}: head ellipse and axes as measured", st["small"])]
    return out


def _model(result: Mapping, st: dict) -> list:
    m = result.get("model") or {}
    out = [_p("Model", st["h2"]),
           _p(f"Classifier: {m.get('name', '')} ({m.get('backbone') or 'backbone unknown'}), "
              f"fetalscan {m.get('fetalscan_version', '')}; classes: {', '.join(m.get('classes') or [])}; "
              f"heatmap method: {m.get('heatmap_method', '')}; plane check: {m.get('plane_gate', '')}", st["small"]),
           _p(f"SHA-256 {m.get('sha256', '')}", st["mono"])]
    bio = m.get("biometry")
    if bio:
        out += [_p(f"Head segmentation: {bio.get('name', '')} ({bio.get('encoder', '')})", st["small"]),
                _p(f"SHA-256 {bio.get('sha256', '')}", st["mono"])]
    out.append(_p(DISCLAIMER, st["box"]))
    return out


# ---------------------------------------------------------------------- helpers
_MM = 72.0 / 25.4


def _len(value, unit: str) -> str:
    return "-" if value is None else f"{float(value):.1f} {unit}"


def _without_names(text: str, result: Mapping) -> str:
    """``text`` with every uploaded file's name replaced by ``file <n>`` (1-based, upload order):
    notes and warnings name files, and a file name may hold a patient's name or ID."""
    names: list[str] = []
    for im in result["images"]:
        if im.get("name") and im["name"] not in names:
            names.append(str(im["name"]))
    for n, name in sorted(enumerate(names, 1), key=lambda item: -len(item[1])):  # longest first
        text = text.replace(name, f"file {n}")
    return text


def _table(rows: list[list], widths: list[float], st: dict, repeat: int = 1):
    from reportlab.lib import colors
    from reportlab.platypus import Table, TableStyle

    cells = [[_p(c, st["cell"]) for c in row] for row in rows]
    table = Table(cells, colWidths=widths, repeatRows=repeat, hAlign="LEFT")
    table.setStyle(TableStyle([
        ("GRID", (0, 0), (-1, -1), 0.25, colors.grey),
        ("BACKGROUND", (0, 0), (-1, 0), colors.HexColor("#e8e8e8")),
        ("VALIGN", (0, 0), (-1, -1), "TOP"),
    ]))
    return table


def _image(png: bytes, max_w: float, max_h: float):
    from PIL import Image as PILImage
    from reportlab.platypus import Image

    with PILImage.open(io.BytesIO(png)) as im:
        w, h = im.size
    scale = min(max_w / w, max_h / h)
    return Image(io.BytesIO(png), width=w * scale, height=h * scale, hAlign="LEFT")
