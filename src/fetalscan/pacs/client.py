"""A small DICOMweb client: QIDO-RS search, WADO-RS retrieve into a folder, STOW-RS store.

Built on ``dicomweb-client`` (:class:`dicomweb_client.DICOMwebClient`) with a
``requests`` session that carries the PACS credentials (HTTP basic or a bearer token)
and connect / read timeouts on every request, so a PACS that is down or stalls gives an
error within seconds instead of a hang. The three services, as DICOM PS3.18 defines them:

- **QIDO-RS** *Search* (PS3.18 §10.6): studies by Study Instance UID, Patient ID or
  Study Date (a date or a range), the series and instances of a study.
- **WADO-RS** *Retrieve* (PS3.18 §10.4) of a study or one series, asking for the
  instances as stored (``transfer-syntax=*``, §8.7.3.5.2). The multipart answer
  (§8.6.1.2) is streamed to disk part by part (:mod:`fetalscan.pacs.multipart`), each
  instance written to a temporary file and renamed to ``<SOP Instance UID>.dcm``: files
  are complete or absent, byte for byte what the PACS holds, and never named after the
  patient. (``dicomweb-client`` decodes every part into a pydicom dataset in memory and
  rejects files without a preamble, so this one request goes through the same session
  directly.)
- **STOW-RS** *Store Instances* (PS3.18 §10.5) of datasets or files, in batches; the
  answer's Failed SOP Sequence (§10.5.3, failure reasons from PS3.4 Annex B.2.3) becomes
  a :class:`PacsStoreError` naming every SOP Instance UID that was not stored.

Every failure is a :class:`PacsError` (a :class:`~fetalscan.errors.FetalscanError`)
naming the PACS URL and what failed. Nothing here logs a patient's name, ID or any
other header value; logs name counts and UIDs only, and query strings (which may hold a
Patient ID) are cut from the HTTP libraries' debug lines.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from fetalscan.errors import FetalscanError

log = logging.getLogger(__name__)

#: Environment variables holding PACS credentials (never given as flags, so they stay out of
#: shell histories and process lists).
USER_ENV = "FETALSCAN_PACS_USER"
PASSWORD_ENV = "FETALSCAN_PACS_PASSWORD"
TOKEN_ENV = "FETALSCAN_PACS_TOKEN"

#: A DICOM UID (PS3.5 §9.1): digits and dots, at most 64 characters, no empty component.
_UID = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")

#: A QIDO-RS date (PS3.18 §8.3.4.1 matching, DA value): ``YYYYMMDD`` or a range ``A-B`` / ``A-`` / ``-B``.
_DATE = re.compile(r"^(\d{8}|\d{8}-|-\d{8}|\d{8}-\d{8})$")

#: STOW-RS failure reasons (Failure Reason (0008,1197); PS3.4 Annex B.2.3, PS3.18 §10.5.3).
FAILURE_REASONS = {
    0x0110: "processing failure",
    0x0111: "duplicate SOP instance",
    0x0117: "invalid SOP instance",
    0x0122: "SOP class not supported",
    0x0124: "not authorised",
    0xA700: "out of resources",
    0xA900: "data set does not match SOP class",
    0xC000: "cannot understand",
    0xC122: "transfer syntax not supported",
}

#: Attributes asked for in a study search (PS3.18 §10.6.1.2.1 lists the defaults).
STUDY_FIELDS = ("StudyInstanceUID", "StudyDate", "StudyTime", "ModalitiesInStudy", "PatientID",
                "NumberOfStudyRelatedSeries", "NumberOfStudyRelatedInstances")


class PacsError(FetalscanError):
    """A DICOMweb request failed; the message names the PACS URL and what was being done.

    ``status`` is the HTTP status the PACS answered with (``None`` when there was no answer).
    """

    def __init__(self, message: str, *, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class PacsConnectionError(PacsError):
    """The PACS could not be reached (refused, unknown host, TLS failure)."""


class PacsTimeoutError(PacsError):
    """The PACS did not answer within the configured timeout."""


class PacsAuthError(PacsError):
    """The PACS refused the credentials (HTTP 401) or the request (HTTP 403)."""


class PacsNotFound(PacsError):
    """The study, series or instance is not on the PACS (HTTP 404 or an empty search)."""


class PacsStoreError(PacsError):
    """STOW-RS stored some or none of the instances; ``failed`` maps SOP Instance UID -> reason."""

    def __init__(self, message: str, *, stored: Sequence[str], failed: dict[str, str],
                 status: int | None = None) -> None:
        super().__init__(message, status=status)
        self.stored = list(stored)
        self.failed = dict(failed)


@dataclass
class PacsConfig:
    """Where the PACS's DICOMweb service is and how to talk to it.

    Attributes
    ----------
    url : str
        DICOMweb root (the prefix of ``/studies``), e.g. ``http://pacs:8042/dicom-web``
        for Orthanc. No credentials in it: they would end up in logs and messages.
    username, password : str or None
        HTTP basic authentication (``FETALSCAN_PACS_USER`` / ``FETALSCAN_PACS_PASSWORD``).
    token : str or None
        Bearer token instead (``FETALSCAN_PACS_TOKEN``), e.g. for a cloud PACS.
    connect_timeout_s : float
        Seconds to wait for the connection to open.
    read_timeout_s : float
        Seconds to wait for each read from the server (not the whole transfer).
    batch_size : int
        Instances per STOW-RS request.
    verify_tls : bool or str
        Check the server's TLS certificate (or a CA bundle file) for ``https://`` URLs.
    """

    url: str
    username: str | None = None
    password: str | None = None
    token: str | None = None
    connect_timeout_s: float = 5.0
    read_timeout_s: float = 60.0
    batch_size: int = 16
    verify_tls: bool | str = True

    def validate(self) -> None:
        """Raise :class:`PacsError` naming the field for an unusable value."""
        parts = urlsplit(self.url or "")
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise PacsError(f"PACS URL {self.url!r}: give the DICOMweb root as http(s)://host[:port]/path, "
                            "e.g. http://127.0.0.1:8042/dicom-web for Orthanc")
        if parts.username or parts.password:
            raise PacsError("PACS URL: put no user name or password in the URL; set "
                            f"{USER_ENV} / {PASSWORD_ENV} (or {TOKEN_ENV}) instead")
        if parts.query or parts.fragment:
            raise PacsError(f"PACS URL {self.url!r}: give the DICOMweb root without ?query or #fragment")
        self.url = self.url.rstrip("/")
        if self.token and (self.username or self.password):
            raise PacsError("PACS credentials: give either a user name and password or a bearer token, not both")
        if self.password and not self.username:
            raise PacsError(f"PACS credentials: a password without a user name; set {USER_ENV} too")
        for name in ("connect_timeout_s", "read_timeout_s"):
            if not getattr(self, name) > 0:
                raise PacsError(f"PACS {name} must be > 0 seconds, got {getattr(self, name)}")
        if int(self.batch_size) < 1:
            raise PacsError(f"PACS batch_size must be >= 1, got {self.batch_size}")

    @property
    def auth_kind(self) -> str:
        """``basic``, ``bearer`` or ``none`` (safe to show)."""
        return "bearer" if self.token else "basic" if self.username else "none"


def config_from_env(url: str, environ: dict | None = None, **options: Any) -> PacsConfig:
    """A :class:`PacsConfig` for ``url`` with credentials from the environment (see :data:`USER_ENV`)."""
    env = os.environ if environ is None else environ
    given = {"username": env.get(USER_ENV) or None, "password": env.get(PASSWORD_ENV) or None,
             "token": env.get(TOKEN_ENV) or None}
    given.update({k: v for k, v in options.items() if v is not None})
    cfg = PacsConfig(url=url, **given)
    cfg.validate()
    return cfg


@dataclass
class StudyInfo:
    """One study a QIDO-RS search found."""

    study_uid: str
    date: str | None = None
    time: str | None = None
    modalities: list[str] = field(default_factory=list)
    patient_id: str | None = None
    n_series: int | None = None
    n_instances: int | None = None


@dataclass
class SeriesInfo:
    """One series of a study."""

    series_uid: str
    modality: str | None = None
    number: int | None = None
    n_instances: int | None = None


@dataclass
class InstanceInfo:
    """One instance of a study."""

    sop_uid: str
    sop_class_uid: str | None = None
    series_uid: str | None = None
    number: int | None = None


@dataclass
class StoreResult:
    """What a STOW-RS store did: the SOP Instance UIDs stored, and those refused with the reason."""

    stored: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)


def check_uid(uid: str, what: str = "UID") -> str:
    """``uid`` if it is a valid DICOM UID (PS3.5 §9.1), else :class:`PacsError` naming it."""
    uid = (uid or "").strip()
    if len(uid) > 64 or not _UID.match(uid):
        raise PacsError(f"{what} {uid!r} is not a DICOM UID (digits and dots, at most 64 characters, "
                        "e.g. 1.2.826.0.1.3680043.8.498.1)")
    return uid


def check_date(date: str) -> str:
    """A QIDO-RS Study Date: ``YYYYMMDD`` or a range ``YYYYMMDD-YYYYMMDD`` (either end open)."""
    date = (date or "").strip()
    if not _DATE.match(date):
        raise PacsError(f"date {date!r}: give YYYYMMDD, or a range YYYYMMDD-YYYYMMDD (either end may be left open)")
    return date


class PacsClient:
    """QIDO-RS, WADO-RS and STOW-RS against one DICOMweb service (DICOM PS3.18).

    >>> with PacsClient(PacsConfig("http://127.0.0.1:8042/dicom-web")) as pacs:  # doctest: +SKIP
    ...     studies = pacs.search_studies(patient_id="P0001")
    ...     files = pacs.retrieve(studies[0].study_uid, "study/")
    ...     result = pacs.store(files)

    Use it as a context manager (or call :meth:`close`) so the HTTP session is closed.
    """

    def __init__(self, config: PacsConfig) -> None:
        try:
            import requests
            from dicomweb_client import DICOMwebClient
        except ImportError as exc:
            raise PacsError(f"talking to a PACS needs dicomweb-client ({exc.name} is not installed): "
                            "pip install 'fetalscan[serve]'") from exc

        config.validate()
        quiet_http_logs()
        self.config = config
        self.url = config.url
        self.session = requests.Session()
        self.session.verify = config.verify_tls
        if config.token:
            self.session.headers["Authorization"] = f"Bearer {config.token}"
        elif config.username:
            self.session.auth = (config.username, config.password or "")
        self.timeout = (float(config.connect_timeout_s), float(config.read_timeout_s))
        self.dicomweb = DICOMwebClient(self.url, session=self.session, timeout=self.timeout)
        self.dicomweb.set_http_retry_params(retry=False)  # a failure is reported at once, not after backing off

    def close(self) -> None:
        self.session.close()

    def __enter__(self) -> PacsClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ QIDO-RS (PS3.18 §10.6)
    def search_studies(self, *, study_uid: str | None = None, patient_id: str | None = None,
                       date: str | None = None, limit: int = 1000) -> list[StudyInfo]:
        """Studies matching every given key (PS3.18 §10.6.1: *Search for Studies*).

        ``patient_id`` is matched exactly, ``date`` is a Study Date or range (see
        :func:`check_date`). At most ``limit`` studies are returned.
        """
        filters: dict[str, str] = {}
        if study_uid:
            filters["StudyInstanceUID"] = check_uid(study_uid, "Study Instance UID")
        if patient_id:
            filters["PatientID"] = patient_id
        if date:
            filters["StudyDate"] = check_date(date)
        with self._errors("searching for studies (QIDO-RS)"):
            found = self.dicomweb.search_for_studies(search_filters=filters, fields=list(STUDY_FIELDS),
                                                     limit=int(limit))
            out = [_study_info(_dataset(item)) for item in found]
        log.info("QIDO-RS: %d study(ies) found", len(out))
        return out

    def search_series(self, study_uid: str) -> list[SeriesInfo]:
        """The series of a study (PS3.18 §10.6.1: *Search for Series*)."""
        uid = check_uid(study_uid, "Study Instance UID")
        with self._errors(f"searching the series of study {uid} (QIDO-RS)"):
            found = self.dicomweb.search_for_series(study_instance_uid=uid,
                                                    fields=["NumberOfSeriesRelatedInstances"])
            out = [_series_info(_dataset(item)) for item in found]
        return sorted(out, key=lambda s: (s.number is None, s.number or 0, s.series_uid))

    def search_instances(self, study_uid: str, series_uid: str | None = None) -> list[InstanceInfo]:
        """The instances of a study or of one of its series (PS3.18 §10.6.1: *Search for Instances*)."""
        uid = check_uid(study_uid, "Study Instance UID")
        series = check_uid(series_uid, "Series Instance UID") if series_uid else None
        with self._errors(f"searching the instances of study {uid} (QIDO-RS)"):
            found = self.dicomweb.search_for_instances(study_instance_uid=uid, series_instance_uid=series)
            out = [_instance_info(_dataset(item)) for item in found]
        return out

    def require_study(self, study_uid: str) -> StudyInfo:
        """The study with this UID, or :class:`PacsNotFound` naming the UID and the PACS."""
        uid = check_uid(study_uid, "Study Instance UID")
        found = self.search_studies(study_uid=uid, limit=2)
        match = [s for s in found if s.study_uid == uid]
        if not match:
            raise PacsNotFound(f"study {uid} not found on the PACS at {self.url} (QIDO-RS search returned no "
                               "study with this Study Instance UID)", status=404)
        return match[0]

    # ------------------------------------------------------------------ WADO-RS (PS3.18 §10.4)
    def retrieve(self, study_uid: str, out: str | Path, *, series_uid: str | None = None) -> list[Path]:
        """Retrieve a study (or one of its series) into ``out`` as ``<SOP Instance UID>.dcm`` files.

        Each instance is streamed to a temporary file in ``out`` and renamed when
        complete (an existing file of the same instance is replaced). Returns the paths,
        in the order the PACS sent them. Raises :class:`PacsNotFound` when the PACS
        does not have the study or series.
        """
        from fetalscan.pacs.multipart import MultipartError, boundary_of, split_parts

        uid = check_uid(study_uid, "Study Instance UID")
        path = f"/studies/{uid}"
        what = f"study {uid}"
        if series_uid:
            series = check_uid(series_uid, "Series Instance UID")
            path += f"/series/{series}"
            what = f"series {series} of study {uid}"
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        headers = {"Accept": 'multipart/related; type="application/dicom"; transfer-syntax=*'}
        written: list[Path] = []
        with self._errors(f"retrieving {what} (WADO-RS)", not_found=what):
            with self.session.get(self.url + path, headers=headers, stream=True, timeout=self.timeout) as resp:
                resp.raise_for_status()
                content_type = resp.headers.get("Content-Type", "")
                chunks = resp.iter_content(chunk_size=1 << 20)
                boundary = boundary_of(content_type)
                try:
                    if content_type.lower().startswith("multipart/") and boundary:
                        for _headers, part in split_parts(chunks, boundary, out):
                            written.append(_keep_instance(part, out, self.url))
                    elif content_type.lower().startswith("application/dicom"):  # one instance, not wrapped
                        written.append(_keep_instance(_save_stream(chunks, out), out, self.url))
                    else:
                        raise PacsError(f"the PACS at {self.url} answered the retrieval of {what} with "
                                        f"{content_type or 'no Content-Type'}, not multipart/related DICOM "
                                        "(PS3.18 §10.4.3); is the URL the DICOMweb root?", status=resp.status_code)
                except MultipartError as exc:
                    raise PacsError(f"retrieving {what} from the PACS at {self.url}: {exc}; "
                                    f"{len(written)} instance(s) were complete") from exc
        if not written:
            raise PacsNotFound(f"{what} has no instances on the PACS at {self.url}", status=404)
        log.info("WADO-RS: %d instance(s) of study %s retrieved", len(written), uid)
        return written

    # ------------------------------------------------------------------ STOW-RS (PS3.18 §10.5)
    def store(self, items: Iterable[Any], *, study_uid: str | None = None,
              raise_on_failure: bool = True) -> StoreResult:
        """Store datasets and/or DICOM files (PS3.18 §10.5: *Store Instances*), in batches.

        With ``study_uid`` the request goes to ``/studies/{study_uid}`` and the PACS
        refuses every instance of another study (PS3.18 §10.5.1). Returns the SOP
        Instance UIDs stored. With ``raise_on_failure`` (default), any instance the PACS
        refused raises :class:`PacsStoreError` naming each refused UID with its reason
        (the others stay stored; STOW-RS is per instance).
        """
        study = check_uid(study_uid, "Study Instance UID") if study_uid else None
        result = StoreResult()
        batch: list = []
        for item in items:
            batch.append(_file_dataset(item))
            if len(batch) >= self.config.batch_size:
                self._store_batch(batch, result, study)
                batch = []
        if batch:
            self._store_batch(batch, result, study)
        log.info("STOW-RS: %d instance(s) stored, %d refused", len(result.stored), len(result.failed))
        if raise_on_failure and result.failed:
            shown = "; ".join(f"{uid}: {why}" for uid, why in list(result.failed.items())[:10])
            more = f" (and {len(result.failed) - 10} more)" if len(result.failed) > 10 else ""
            raise PacsStoreError(f"the PACS at {self.url} refused {len(result.failed)} of "
                                 f"{len(result.failed) + len(result.stored)} instance(s) (STOW-RS): {shown}{more}",
                                 stored=result.stored, failed=result.failed)
        return result

    def _store_batch(self, batch: list, result: StoreResult, study_uid: str | None) -> None:
        import requests

        sent = [str(ds.SOPInstanceUID) for ds in batch]
        answer = None
        with self._errors(f"storing {len(batch)} instance(s) (STOW-RS)"):
            try:
                answer = self.dicomweb.store_instances(batch, study_instance_uid=study_uid)
            except requests.HTTPError as exc:  # 409 / 400: some or all refused; the body says which
                answer = _stow_answer(exc.response)
                if answer is None:
                    raise
        stored, failed = _stow_outcome(answer, sent)
        result.stored.extend(stored)
        result.failed.update(failed)

    # ------------------------------------------------------------------ errors
    @contextlib.contextmanager
    def _errors(self, doing: str, *, not_found: str | None = None) -> Iterator[None]:
        """Turn the HTTP libraries' exceptions into :class:`PacsError` naming the URL and ``doing``."""
        import requests

        try:
            yield
        except PacsError:
            raise
        except requests.exceptions.SSLError as exc:
            raise PacsConnectionError(f"TLS failed with the PACS at {self.url} while {doing} ({_reason(exc)}); "
                                      "check the certificate or the CA bundle") from exc
        except requests.exceptions.ConnectTimeout as exc:
            raise PacsTimeoutError(f"the PACS at {self.url} did not accept a connection within "
                                   f"{self.timeout[0]:g} s while {doing}; is it running and reachable?") from exc
        except requests.exceptions.ConnectionError as exc:
            if isinstance(exc.__context__, requests.exceptions.ReadTimeout) or "timed out" in str(exc).lower():
                raise PacsTimeoutError(f"the PACS at {self.url} stopped answering (no data for "
                                       f"{self.timeout[1]:g} s) while {doing}") from exc
            raise PacsConnectionError(f"cannot connect to the PACS at {self.url} while {doing} ({_reason(exc)}); "
                                      "is it running, and is the URL right?") from exc
        except requests.exceptions.Timeout as exc:
            raise PacsTimeoutError(f"the PACS at {self.url} did not answer within {self.timeout[1]:g} s while "
                                   f"{doing}") from exc
        except requests.HTTPError as exc:
            raise self._http_error(exc.response, doing, not_found) from exc
        except requests.RequestException as exc:
            raise PacsError(f"request to the PACS at {self.url} failed while {doing}: {_reason(exc)}") from exc
        except (ValueError, KeyError, TypeError) as exc:  # an answer that is not DICOMweb (bad JSON, media type)
            from pydicom.errors import InvalidDicomError

            kind = "DICOM" if isinstance(exc, InvalidDicomError) else "DICOMweb"
            raise PacsError(f"the PACS at {self.url} sent an answer that is not valid {kind} while {doing} "
                            f"({type(exc).__name__}: {str(exc)[:200]}); is the URL the DICOMweb root?") from exc

    def _http_error(self, response, doing: str, not_found: str | None) -> PacsError:
        status = getattr(response, "status_code", None)
        where = _without_query(getattr(response, "url", "") or self.url)
        if status == 401:
            how = {"basic": f"check {USER_ENV} / {PASSWORD_ENV}", "bearer": f"check {TOKEN_ENV}",
                   "none": f"the PACS needs credentials: set {USER_ENV} and {PASSWORD_ENV} (or {TOKEN_ENV})"}
            return PacsAuthError(f"the PACS at {self.url} refused the credentials (HTTP 401 Unauthorized) while "
                                 f"{doing}; {how[self.config.auth_kind]}", status=401)
        if status == 403:
            return PacsAuthError(f"the PACS at {self.url} does not allow this (HTTP 403 Forbidden) while {doing}; "
                                 "ask its administrator for access", status=403)
        if status == 404:
            if not_found:
                return PacsNotFound(f"{not_found} not found on the PACS at {self.url} (HTTP 404 from {where})",
                                    status=404)
            return PacsNotFound(f"the PACS at {self.url} has no DICOMweb service at {where} (HTTP 404) while "
                                f"{doing}; is the URL the DICOMweb root (e.g. http://host:8042/dicom-web)?",
                                status=404)
        reason = getattr(response, "reason", "") or ""
        return PacsError(f"the PACS at {self.url} answered HTTP {status} {reason} while {doing} ({where})".rstrip(),
                         status=status)


# ---------------------------------------------------------------------------- helpers
def _dataset(item: dict):
    import pydicom

    return pydicom.Dataset.from_json(item)


def _text(ds, keyword: str) -> str | None:
    value = ds.get(keyword)
    return None if value in (None, "") else str(value)


def _int(ds, keyword: str) -> int | None:
    value = ds.get(keyword)
    try:
        return None if value in (None, "") else int(value)
    except (TypeError, ValueError):
        return None


def _study_info(ds) -> StudyInfo:
    mods = ds.get("ModalitiesInStudy") or []
    mods = [mods] if isinstance(mods, str) else [str(m) for m in mods]
    return StudyInfo(study_uid=str(ds.StudyInstanceUID), date=_text(ds, "StudyDate"), time=_text(ds, "StudyTime"),
                     modalities=mods, patient_id=_text(ds, "PatientID"),
                     n_series=_int(ds, "NumberOfStudyRelatedSeries"),
                     n_instances=_int(ds, "NumberOfStudyRelatedInstances"))


def _series_info(ds) -> SeriesInfo:
    return SeriesInfo(series_uid=str(ds.SeriesInstanceUID), modality=_text(ds, "Modality"),
                      number=_int(ds, "SeriesNumber"), n_instances=_int(ds, "NumberOfSeriesRelatedInstances"))


def _instance_info(ds) -> InstanceInfo:
    return InstanceInfo(sop_uid=str(ds.SOPInstanceUID), sop_class_uid=_text(ds, "SOPClassUID"),
                        series_uid=_text(ds, "SeriesInstanceUID"), number=_int(ds, "InstanceNumber"))


def _save_stream(chunks: Iterable[bytes], folder: Path) -> Path:
    """A non-multipart body (one instance) written to a temporary file in ``folder``."""
    import tempfile

    fd, name = tempfile.mkstemp(prefix=".part-", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as fh:
            for chunk in chunks:
                fh.write(chunk)
    except BaseException:
        Path(name).unlink(missing_ok=True)
        raise
    return Path(name)


def _keep_instance(part: Path, folder: Path, url: str) -> Path:
    """Rename a received part to ``<SOP Instance UID>.dcm`` (the UID read from the file, checked)."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        try:
            ds = pydicom.dcmread(part, force=True, stop_before_pixels=True,
                                 specific_tags=["SOPInstanceUID"])
            uid = str(ds.get("SOPInstanceUID") or ds.file_meta.get("MediaStorageSOPInstanceUID") or "")
        except (InvalidDicomError, OSError, ValueError, AttributeError, EOFError) as exc:
            raise PacsError(f"the PACS at {url} sent a part that is not a DICOM instance ({type(exc).__name__})") \
                from exc
        if len(uid) > 64 or not _UID.match(uid):  # never let a header value choose a path
            raise PacsError(f"the PACS at {url} sent an instance without a valid SOP Instance UID")
        target = folder / f"{uid}.dcm"
        with open(part, "rb") as fh:
            os.fsync(fh.fileno())
        os.chmod(part, 0o644)
        os.replace(part, target)
        return target
    finally:
        part.unlink(missing_ok=True)


def _file_dataset(item: Any):
    """A dataset ready for STOW-RS: read from a file, or a dataset given a preamble and file meta."""
    import io

    import pydicom
    from pydicom.errors import InvalidDicomError

    if isinstance(item, (str, os.PathLike)):
        path = Path(item)
        try:
            ds = pydicom.dcmread(path)
        except (InvalidDicomError, OSError, ValueError, EOFError) as exc:
            raise PacsError(f"{path}: not a DICOM file that can be stored ({type(exc).__name__}: "
                            f"{str(exc)[:160]})") from exc
    elif isinstance(item, pydicom.Dataset):
        ds = item
    else:
        raise PacsError(f"cannot store a {type(item).__name__}: give pydicom datasets or DICOM file paths")
    uid = ds.get("SOPInstanceUID")
    if not uid:
        raise PacsError("a dataset to store has no SOP Instance UID (0008,0018)")
    meta = getattr(ds, "file_meta", None)
    if getattr(ds, "preamble", None) is not None and meta is not None and "TransferSyntaxUID" in meta:
        return ds
    buf = io.BytesIO()  # add the preamble and File Meta Information (PS3.10 §7.1) the PACS expects
    try:
        pydicom.dcmwrite(buf, ds, enforce_file_format=True)
    except (ValueError, AttributeError, TypeError) as exc:
        raise PacsError(f"instance {uid}: cannot be encoded as a DICOM file ({str(exc)[:200]})") from exc
    buf.seek(0)
    return pydicom.dcmread(buf)


def _stow_answer(response):
    """The Store Instances Response Module (PS3.18 §10.5.3) of an error answer, if it has one."""
    import json

    import pydicom

    if response is None or not response.content:
        return None
    try:
        return pydicom.Dataset.from_json(json.loads(response.content.decode("utf-8")))
    except (ValueError, TypeError, KeyError, UnicodeDecodeError):
        return None


def _stow_outcome(answer, sent: list[str]) -> tuple[list[str], dict[str, str]]:
    """(stored UIDs, {refused UID: reason}) from a STOW-RS answer; instances it does not name count as refused."""
    stored: list[str] = []
    failed: dict[str, str] = {}
    for item in getattr(answer, "ReferencedSOPSequence", None) or []:
        stored.append(str(item.ReferencedSOPInstanceUID))
    for item in getattr(answer, "FailedSOPSequence", None) or []:
        code = item.get("FailureReason")
        why = FAILURE_REASONS.get(int(code), "failure") if code is not None else "failure"
        failed[str(item.ReferencedSOPInstanceUID)] = f"{why} (0x{int(code):04X})" if code is not None else why
    for uid in sent:
        if uid not in stored and uid not in failed:
            failed[uid] = "not confirmed in the PACS's answer"
    return stored, failed


def _reason(exc: BaseException) -> str:
    """The innermost cause of a connection error, short (e.g. 'Connection refused')."""
    text = str(exc)
    for marker in ("Connection refused", "Name or service not known", "No route to host",
                   "Temporary failure in name resolution", "Connection reset", "certificate verify failed"):
        if marker.lower() in text.lower():
            return marker
    inner = exc
    while getattr(inner, "__cause__", None) is not None or getattr(inner, "__context__", None) is not None:
        inner = inner.__cause__ or inner.__context__
    return type(inner).__name__


def _without_query(url: str) -> str:
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, parts.path, "", ""))


class _NoQueryStrings(logging.Filter):
    """Cut query strings (a QIDO-RS search may hold a Patient ID) from third-party log lines."""

    _QUERY = re.compile(r"\?[^\s\"']*")

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.msg, str) and "?" in record.getMessage():
            record.msg = self._QUERY.sub("?<query>", record.getMessage())
            record.args = None
        return True


_FILTER = _NoQueryStrings()


def quiet_http_logs() -> None:
    """Install the query-string filter on the loggers that print request URLs (idempotent)."""
    for name in ("dicomweb_client.web", "urllib3.connectionpool"):
        logger = logging.getLogger(name)
        if _FILTER not in logger.filters:
            logger.addFilter(_FILTER)


def dicom_files(paths: Iterable[str | Path]) -> list[Path]:
    """The DICOM files among ``paths``: files as given, folders searched recursively.

    In folders, files without the DICOM file signature (``DICM`` after the 128-byte
    preamble, PS3.10 §7.1) and hidden files are skipped; a file named directly that is
    not DICOM, or a path that does not exist, is a :class:`PacsError` naming it.
    """
    out: list[Path] = []
    for given in paths:
        path = Path(given)
        if path.is_dir():
            out.extend(p for p in sorted(path.rglob("*"))
                       if p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts)
                       and _is_dicom_file(p))
        elif path.is_file():
            if not _is_dicom_file(path):
                raise PacsError(f"{path}: not a DICOM file (no 'DICM' signature after the 128-byte preamble)")
            out.append(path)
        else:
            raise PacsError(f"{path}: no such file or folder")
    return out


def _is_dicom_file(path: Path) -> bool:
    try:
        with open(path, "rb") as fh:
            head = fh.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:] == b"DICM"
