"""What every group of routes needs from the running service, in one object.

:func:`fetalscan.serve.app.create_app` builds one :class:`ServiceContext` and hands it to
each route module listed in :data:`fetalscan.serve.app.ROUTE_MODULES`; each such module
defines ``add_routes(app, ctx)``. So a capability (reports, live stream, PACS, the reading
app) adds its routes in its own module, and the core app never grows with them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from fastapi import HTTPException

API = "/api/v1"

_STUDY_ID = re.compile(r"^[0-9a-f]{32}$")


@dataclass
class ServiceContext:
    """The service's state: settings, loaded models, review database, in-memory studies.

    ``auth`` is the FastAPI ``dependencies=`` list that checks the bearer token (the guard
    middleware checks it too, before a body is read); use it on every route but health.
    """

    settings: Any  # fetalscan.serve.settings.ServeSettings
    analyzer: Any  # fetalscan.serve.analysis.Analyzer
    store: Any  # fetalscan.serve.store.ReviewStore
    cache: Any  # fetalscan.serve.store.StudyCache
    auth: list
    audit: Any = None  # fetalscan.serve.audit.AuditLog: who did what to which study (None: not recorded)

    def record(self, action: str, study_id: str | None, details: dict, actor: str | None = None) -> None:
        """Append to the audit trail (:mod:`fetalscan.serve.audit`): by default the actor is the access
        token's fingerprint. ``details`` hold counts, classes and decisions, never file names."""
        if self.audit is not None:
            from fetalscan.serve.audit import token_actor

            self.audit.append(actor=actor or token_actor(self.settings.token), action=action, study_id=study_id,
                              details=details)

    def analyze(self, uploads: list, *, pixel_size_mm: float | None = None) -> dict:
        """Analyse one study's files and keep it: the summary in the database, images in memory.

        ``uploads`` are :class:`fetalscan.serve.analysis.UploadedFile` (a name and an open
        binary stream each). The one path of every route that analyses a study (uploads,
        PACS studies); returns the API's result (``result["study"]["id"]`` is the new id).
        """
        result, cached = self.analyzer.analyze(uploads, pixel_size_mm=pixel_size_mm)
        study = result["study"]
        self.store.add_study({"id": study["id"], "created_utc": study["created_utc"], "n_images": study["n_images"],
                              "prediction": study["prediction"], "probabilities": study["probabilities"],
                              "classes": self.analyzer.classes,
                              "images": [im["name"] + ("" if im["frame"] is None else f"#{im['frame']}")
                                         for im in result["images"]],
                              "model_name": result["model"]["name"], "model_sha256": result["model"]["sha256"]})
        self.cache.put(study["id"], cached)
        self.record("analyze", study["id"], {"n_files": len(uploads), "n_images": study["n_images"],
                                             "prediction": study["prediction"],
                                             "model_sha256": result["model"]["sha256"]})
        return result

    def study_id(self, study_id: str) -> str:
        """``study_id`` if it is 32 hex digits, else HTTP 404 saying what an id looks like."""
        if not _STUDY_ID.match(study_id):
            raise HTTPException(404, f"study {study_id!r} not found (ids are 32 hex digits)")
        return study_id

    def cached_study(self, study_id: str):
        """The in-memory :class:`~fetalscan.serve.store.CachedStudy`, or HTTP 404 saying why not."""
        sid = self.study_id(study_id)
        cached = self.cache.get(sid)
        if cached is None:
            known = self.store.get_study(sid) is not None
            raise HTTPException(404, f"the images of study {sid} are no longer held (the service keeps the last "
                                     f"{self.settings.max_studies} studies in memory, never on disk); analyse the "
                                     "files again" if known else f"study {sid} not found")
        return cached
