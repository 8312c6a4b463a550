"""Analyse a study that is on a PACS, and store the results back there (DICOMweb).

======  =====================================================  ==========================================
POST    ``/api/v1/pacs/studies/{study_uid}/analyze``           retrieve the study, analyse it, store the
                                                               SR and Secondary Captures in the study
======  =====================================================  ==========================================

One request does, against the PACS of ``--pacs-url`` (:class:`fetalscan.pacs.PacsClient`):

1. **QIDO-RS** *Search for Studies* by Study Instance UID (PS3.18 §10.6): 404 naming the UID
   when the PACS does not have it.
2. **WADO-RS** *Retrieve Study* (or ``?series=`` one series; PS3.18 §10.4) into a new
   temporary folder (``fetalscan-pacs-*``), removed when the request ends, also on error.
   Instances without pixels (SR, key objects ...) and fetalscan's own earlier outputs
   (Manufacturer ``fetalscan ...``) are left out.
3. The analysis of the upload route, on the same path (:meth:`ServiceContext.analyze`):
   the files go in as uploads named ``<SOP Instance UID>.dcm``; the study is kept in the
   database and in memory like any other (``GET /api/v1/studies/{id}`` ...).
4. **STOW-RS** *Store Instances* (PS3.18 §10.5) of the study's DICOM outputs,
   :func:`fetalscan.serve.reports.dicom_outputs` (the Comprehensive SR first, then the
   Secondary Captures), which carry the source's Study Instance UID and patient module:
   the PACS files them in the same study, as a new series.

The answer is the upload route's result plus ``"pacs": {"url", "study_uid", "series_uid",
"retrieved", "analysed", "skipped", "stored": [SOP Instance UIDs]}``. Errors: 409 without a
configured PACS (the message says how to configure one), 422 for a malformed UID or a study
with nothing to analyse, 404 for a study or series the PACS does not have, 502 when the PACS
refuses the credentials, cannot be reached or refuses to store an output (the message names
the URL, and for a store the refused SOP Instance UIDs and the id of the analysed study),
504 when it does not answer within ``pacs_timeout_s``. Logs name UIDs and counts only.
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
from pathlib import Path
from typing import Annotated

from fastapi import HTTPException, Query

from fetalscan.serve.context import API

log = logging.getLogger(__name__)

#: How to configure a PACS (the 409 message).
HOW_TO_CONFIGURE = ("no PACS is configured: start the service with `fetalscan serve --pacs-url "
                    "http://HOST:PORT/dicom-web` (the PACS's DICOMweb root; credentials in FETALSCAN_PACS_USER and "
                    "FETALSCAN_PACS_PASSWORD, or FETALSCAN_PACS_TOKEN), or set ServeSettings(pacs_url=...)")

#: SOP Class UID prefix of the Structured Report storage classes (PS3.4 B.5): never analysed.
_SR_CLASSES = "1.2.840.10008.5.1.4.1.1.88."


def add_routes(app, ctx) -> None:
    """Add ``POST /api/v1/pacs/studies/{study_uid}/analyze`` to ``app``."""

    @app.post(f"{API}/pacs/studies/{{study_uid}}/analyze", tags=["pacs"], dependencies=ctx.auth,
              summary="Analyse a study on the PACS and store the SR and Secondary Captures back into it",
              responses={404: {"description": "the PACS has no such study or series"},
                         409: {"description": "no PACS configured (--pacs-url)"},
                         422: {"description": "malformed UID, or nothing to analyse in the study"},
                         502: {"description": "the PACS refused the credentials, could not be reached, or refused "
                                               "to store an output"},
                         504: {"description": "the PACS did not answer in time"}})
    def analyze_pacs_study(
        study_uid: str,
        series: Annotated[str | None, Query(description="only this Series Instance UID of the study")] = None,
        pixel_size_mm: Annotated[float | None, Query(description="mm per pixel for images without DICOM "
                                                               "calibration (biometry in mm and GA need it)")] = None,
    ) -> dict:
        return analyze_pacs_study_uid(ctx, study_uid, series_uid=series, pixel_size_mm=pixel_size_mm)


def analyze_pacs_study_uid(ctx, study_uid: str, *, series_uid: str | None = None,
                           pixel_size_mm: float | None = None) -> dict:
    """Retrieve, analyse and store back one PACS study (see the module docstring); the route's answer."""
    from fetalscan.pacs import PacsClient, PacsError, check_uid

    config = _config(ctx)
    try:
        uid = check_uid(study_uid, "Study Instance UID")
        series = check_uid(series_uid, "Series Instance UID") if series_uid else None
    except PacsError as exc:
        raise HTTPException(422, str(exc)) from exc
    with PacsClient(config) as pacs:
        with _pacs_errors(), tempfile.TemporaryDirectory(prefix="fetalscan-pacs-") as tmp:
            pacs.require_study(uid)
            files = pacs.retrieve(uid, Path(tmp), series_uid=series)
            inputs, skipped = _analysable(files)
            if not inputs:
                raise HTTPException(422, f"study {uid} on the PACS has no image fetalscan can analyse: its "
                                         f"{len(files)} instance(s) are structured reports, other non-image objects "
                                         "or fetalscan's own outputs")
            with contextlib.ExitStack() as stack:
                uploads = _uploads(inputs, stack)
                result = ctx.analyze(uploads, pixel_size_mm=pixel_size_mm)
        study_id = result["study"]["id"]
        outputs = _outputs(ctx, study_id, uid)
        try:
            stored = pacs.store(outputs, study_uid=uid).stored
        except PacsError as exc:
            raise _http(exc, f"study {uid} was analysed (GET {API}/studies/{study_id} shows the result) but its "
                             "outputs were not all stored: ", storing=True) from exc
    log.info("PACS study %s: %d instance(s) retrieved, %d analysed as study %s, %d output(s) stored", uid,
             len(files), len(inputs), study_id, len(stored))
    return {**result, "pacs": {"url": config.url, "study_uid": uid, "series_uid": series,
                               "retrieved": len(files), "analysed": len(inputs), "skipped": skipped,
                               "stored": stored}}


def _config(ctx):
    """The PACS connection of the service's settings, or HTTP 409 saying how to configure one."""
    from fetalscan.pacs import PacsError

    settings = ctx.settings
    if not getattr(settings, "pacs_url", None):
        raise HTTPException(409, HOW_TO_CONFIGURE)
    try:
        return settings.pacs_config()
    except PacsError as exc:
        raise HTTPException(409, f"the configured PACS cannot be used: {exc}") from exc


def _analysable(files: list[Path]) -> tuple[list[Path], int]:
    """The retrieved instances to analyse (images, not fetalscan's own outputs) and how many were left out."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    keep: list[Path] = []
    for path in files:
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True, force=True,
                                 specific_tags=["SOPClassUID", "Manufacturer", "Rows", "Columns"])
        except (InvalidDicomError, OSError, ValueError, EOFError):
            keep.append(path)  # the analysis names the file and says what is wrong with it
            continue
        sop_class = str(ds.get("SOPClassUID", ""))
        ours = str(ds.get("Manufacturer", "")).lower().startswith("fetalscan")  # report.study_dicom.MANUFACTURER
        if sop_class.startswith(_SR_CLASSES) or "Rows" not in ds or "Columns" not in ds or ours:
            continue
        keep.append(path)
    return keep, len(files) - len(keep)


def _uploads(paths: list[Path], stack: contextlib.ExitStack) -> list:
    """The retrieved files as uploads named ``<SOP Instance UID>.dcm`` (never a patient's name)."""
    from fetalscan.serve.analysis import UploadedFile

    return [UploadedFile(path.name, stack.enter_context(open(path, "rb"))) for path in paths]


def _outputs(ctx, study_id: str, study_uid: str) -> list:
    """The SR and Secondary Captures of the analysed study, checked to belong to ``study_uid``."""
    from fetalscan.serve.reports import dicom_outputs

    outputs = list(dicom_outputs(ctx, study_id))
    strays = [str(ds.SOPInstanceUID) for ds in outputs if str(ds.get("StudyInstanceUID", "")) != study_uid]
    if strays:  # the sources' Study Instance UID is copied into the outputs; anything else is a bug
        log.error("PACS study %s: %d output(s) of study %s carry another Study Instance UID; nothing stored",
                  study_uid, len(strays), study_id)
        raise HTTPException(500, f"the outputs of study {study_id} do not carry Study Instance UID {study_uid}; "
                                 "nothing was stored on the PACS")
    return outputs


@contextlib.contextmanager
def _pacs_errors():
    """PACS failures as HTTP errors (see :func:`_http`)."""
    from fetalscan.pacs import PacsError

    try:
        yield
    except PacsError as exc:
        raise _http(exc) from exc


def _http(exc, prefix: str = "", *, storing: bool = False) -> HTTPException:
    """404 for a study the PACS lacks (not while storing), 504 for a timeout, 502 for anything else."""
    from fetalscan.pacs import PacsNotFound, PacsTimeoutError

    status = 504 if isinstance(exc, PacsTimeoutError) else 404 if isinstance(exc, PacsNotFound) and not storing \
        else 502
    log.warning("PACS request failed with %s (HTTP %d to the client)", type(exc).__name__, status)
    return HTTPException(status, prefix + str(exc))
