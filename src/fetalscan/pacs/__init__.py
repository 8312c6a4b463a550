"""Talk to a PACS over DICOMweb (DICOM PS3.18): search, retrieve and store studies.

>>> from fetalscan.pacs import PacsClient, config_from_env          # doctest: +SKIP
>>> with PacsClient(config_from_env("http://127.0.0.1:8042/dicom-web")) as pacs:  # doctest: +SKIP
...     [s.study_uid for s in pacs.search_studies(date="20260101-")]
...     pacs.retrieve("1.2.3...", "study/")          # -> study/<SOP Instance UID>.dcm, ...
...     pacs.store(["sr.dcm", "overlay.dcm"]).stored  # -> the SOP Instance UIDs stored

``fetalscan pacs find | pull | push`` is the command line and
``POST /api/v1/pacs/studies/{uid}/analyze`` the service route (``docs/pacs.md``). The
layer sits above ``report`` and below ``reader`` / ``api`` / ``serve``; it needs
``dicomweb-client`` (the ``serve`` extra), imported only when a client is made.
"""

from __future__ import annotations

from fetalscan.pacs.client import (
    PASSWORD_ENV,
    TOKEN_ENV,
    USER_ENV,
    InstanceInfo,
    PacsAuthError,
    PacsClient,
    PacsConfig,
    PacsConnectionError,
    PacsError,
    PacsNotFound,
    PacsStoreError,
    PacsTimeoutError,
    SeriesInfo,
    StoreResult,
    StudyInfo,
    check_uid,
    config_from_env,
    dicom_files,
)

__all__ = [
    "PASSWORD_ENV", "TOKEN_ENV", "USER_ENV", "InstanceInfo", "PacsAuthError", "PacsClient", "PacsConfig",
    "PacsConnectionError", "PacsError", "PacsNotFound", "PacsStoreError", "PacsTimeoutError", "SeriesInfo",
    "StoreResult", "StudyInfo", "check_uid", "config_from_env", "dicom_files",
]
