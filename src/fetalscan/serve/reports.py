"""Reports of an analysed study: a PDF for people, a DICOM SR and Secondary Captures for a PACS.

Routes (each behind the bearer token; 404 naming the study when it is unknown or its images
are no longer held in memory):

======  =====================================================  ==========================================
GET     ``/api/v1/studies/{id}/report.pdf``                    the PDF report (:mod:`fetalscan.report.study_pdf`)
GET     ``/api/v1/studies/{id}/sr.dcm``                        the Comprehensive SR (TID 1500)
GET     ``/api/v1/studies/{id}/images/{k}/sc.dcm``             a Secondary Capture of image ``k`` with its heatmap
======  =====================================================  ==========================================

:func:`dicom_outputs` gives the same DICOM objects as datasets (the SR first, then the SCs of
the images the PDF shows) for other parts of the service (PACS / STOW-RS).
"""

from __future__ import annotations

import io

import numpy as np
from fastapi import HTTPException
from fastapi.responses import Response

from fetalscan.errors import FetalscanError
from fetalscan.serve.context import API

#: Opacity of the heatmap in reports and Secondary Captures (as the page's default).
REPORT_ALPHA = 0.5


def overlay_rgb(item, alpha: float = REPORT_ALPHA) -> np.ndarray:
    """A cached image with its heatmap layered over it, ``(H, W, 3)`` uint8 RGB."""
    from PIL import Image

    from fetalscan.explain.cams import overlay
    from fetalscan.serve.app import HEATMAP_COLORMAP

    with Image.open(io.BytesIO(item.image_png)) as im:
        image = np.asarray(im.convert("RGB"), dtype=np.uint8)
    heat = np.asarray(item.heatmap, dtype=np.float32) / 255.0
    return np.ascontiguousarray(overlay(image, heat, alpha=alpha, colormap=HEATMAP_COLORMAP), dtype=np.uint8)


def _sources(cached) -> list:
    return [getattr(im, "dicom", None) for im in cached.images]


def _shown(ctx, cached) -> list[int]:
    from fetalscan.report.study_selection import select_images

    return select_images(cached.result, getattr(ctx.settings, "normal_class", "normal"))


def dicom_outputs(ctx, study_id: str) -> list:
    """The DICOM outputs of a study held in memory: the SR first, then the SC(s).

    The SCs are those of the images the PDF shows (at most
    :data:`fetalscan.report.study_selection.MAX_SHOWN_IMAGES`, highest abnormal probability
    first). Outputs of a DICOM upload carry its StudyInstanceUID and patient attributes and
    form a new series; UIDs are stable per study (asking again gives the same instances).

    Raises
    ------
    fastapi.HTTPException
        404 when the study is unknown or no longer in memory (``ctx.cached_study``);
        422 when the upload mixes DICOM files of several patients.
    """
    from fetalscan.report.study_dicom import study_outputs

    cached = ctx.cached_study(study_id)
    overlays = {k: overlay_rgb(cached.images[k]) for k in _shown(ctx, cached)}
    try:
        return study_outputs(cached.result, _sources(cached), overlays)
    except FetalscanError as exc:
        raise HTTPException(422, str(exc)) from exc


def _dicom_bytes(ds) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def _attachment(data: bytes, media_type: str, filename: str) -> Response:
    return Response(data, media_type=media_type,
                    headers={"Content-Disposition": f'attachment; filename="{filename}"',
                             "Cache-Control": "private, no-store"})


def add_routes(app, ctx) -> None:
    """Add the report routes to ``app`` (see the module docstring)."""
    auth = ctx.auth
    dcm = {200: {"content": {"application/dicom": {}}, "description": "DICOM Part 10 file"}}

    @app.get(f"{API}/studies/{{study_id}}/report.pdf", tags=["reports"], dependencies=auth,
             response_class=Response, responses={200: {"content": {"application/pdf": {}}, "description": "PDF"}},
             summary="The study's PDF report (findings, heatmaps, biometry, the review in force)")
    def report_pdf(study_id: str) -> Response:
        sid = ctx.study_id(study_id)
        data = study_pdf_bytes(ctx, sid)
        ctx.record("report_download", sid, {"format": "pdf"})
        return _attachment(data, "application/pdf", f"{sid}.pdf")

    @app.get(f"{API}/studies/{{study_id}}/sr.dcm", tags=["reports"], dependencies=auth, response_class=Response,
             responses=dcm, summary="The study's DICOM Comprehensive SR (TID 1500 measurement report)")
    def sr_dcm(study_id: str) -> Response:
        sid = ctx.study_id(study_id)
        data = _dicom_bytes(dicom_outputs(ctx, sid)[0])
        ctx.record("report_download", sid, {"format": "dicom_sr"})
        return _attachment(data, "application/dicom", f"{sid}_sr.dcm")

    @app.get(f"{API}/studies/{{study_id}}/images/{{index}}/sc.dcm", tags=["reports"], dependencies=auth,
             response_class=Response, responses=dcm,
             summary="A DICOM Secondary Capture of the image with its heatmap layered over it")
    def sc_dcm(study_id: str, index: int) -> Response:
        from fetalscan.report.study_dicom import secondary_capture, study_identity

        sid = ctx.study_id(study_id)
        cached = ctx.cached_study(sid)
        if not 0 <= index < len(cached.images):
            raise HTTPException(404, f"study {sid} has images 0-{len(cached.images) - 1}, not {index}")
        sources = _sources(cached)
        try:
            identity = study_identity(cached.result, sources)
        except FetalscanError as exc:
            raise HTTPException(422, str(exc)) from exc
        ds = secondary_capture(cached.result, index, overlay_rgb(cached.images[index]), sources[index], identity)
        data = _dicom_bytes(ds)
        ctx.record("report_download", sid, {"format": "dicom_sc", "image": index})
        return _attachment(data, "application/dicom", f"{sid}_sc_{index}.dcm")


def study_pdf_bytes(ctx, study_id: str) -> bytes:
    """The PDF report of a study held in memory, with its reviews from the database."""
    from fetalscan.report.study_pdf import ReportImage, study_pdf

    cached = ctx.cached_study(study_id)
    shown = _shown(ctx, cached)
    images = [ReportImage(index=k, overlay_png=_png(overlay_rgb(cached.images[k])),
                          biometry_png=cached.images[k].biometry_png) for k in shown]
    return study_pdf(cached.result, images, ctx.store.reviews_of(study_id),
                     normal_class=getattr(ctx.settings, "normal_class", "normal"))


def _png(rgb: np.ndarray) -> bytes:
    from fetalscan.explain.cams import png_bytes

    return png_bytes(rgb)
