"""The FastAPI application: the versioned API, the page, authentication and limits.

Routes (every one but health, the page and the API description needs the bearer token):

======  =====================================================  ==========================================
GET     ``/``                                                  the page (static HTML/JS/CSS, no data)
GET     ``/api/v1/health``                                     status, model name, classes, version
GET     ``/api/v1/model``                                      the served model(s), limits (checks a token)
POST    ``/api/v1/analyze``                                    multipart ``files`` -> study result
GET     ``/api/v1/studies/{id}``                               a study's result again
GET     ``/api/v1/studies/{id}/images/{k}/image.png``          the image (or frame) as analysed
GET     ``/api/v1/studies/{id}/images/{k}/heatmap.png``        heatmap over the image (``?alpha=``), or
                                                               the colour layer alone (``?layer=true``)
GET     ``/api/v1/studies/{id}/images/{k}/biometry.png``       head ellipse and measurements drawn
POST    ``/api/v1/studies/{id}/review``                        confirm / override (a new record each time)
GET     ``/api/v1/studies/{id}/reviews``                       the study's reviews, oldest first
GET     ``/api/v1/reviews.csv``                                every review, for retraining
======  =====================================================  ==========================================

``/docs`` (Swagger UI) and ``/openapi.json`` describe the API; they carry no data.

Guards, outermost first: the request-size limit (``Content-Length`` and the streamed
body) and the token check run *before* the body is read, so an unauthenticated or
oversized upload is refused without being parsed; CORS is added only for the origins
the settings name (closed by default); every response carries security headers.
"""

from __future__ import annotations

import importlib
import json
import logging
import re
from pathlib import Path
from typing import Annotated, Literal

from fastapi import Depends, FastAPI, File, Form, HTTPException, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from fetalscan import __version__
from fetalscan.errors import FetalscanError
from fetalscan.serve.analysis import (
    Analyzer,
    UploadedFile,
    UploadRejected,
    quiet_dicom_logs,
)
from fetalscan.serve.audit import AuditLog
from fetalscan.serve.context import API, ServiceContext
from fetalscan.serve.settings import ServeSettings, token_matches
from fetalscan.serve.store import ReviewStore, StudyCache
from fetalscan.texts import DISCLAIMER

log = logging.getLogger(__name__)

STATIC = Path(__file__).resolve().parent / "static"

#: Modules under ``fetalscan.serve`` whose ``add_routes(app, ctx)`` adds a group of routes.
ROUTE_MODULES: tuple[str, ...] = ("reports", "pacs_routes", "stream", "card", "reading")

#: Paths anyone may read: the page, its files, health and the API description.
#: ``/api/v1/reading/...`` (the reading app) checks the reader's own session token instead (serve/reading.py).
PUBLIC = re.compile(r"^(/|/static/.*|/api/v1/health|/docs|/docs/oauth2-redirect|/openapi\.json|/favicon\.ico"
                    r"|/api/v1/reading/.*)$")

#: Colour map of the heatmaps (as :class:`fetalscan.explain.cams.ExplainConfig`'s default).
HEATMAP_COLORMAP = "jet"

#: Content-Security-Policy of the page: nothing but this origin (images also as blob: URLs).
PAGE_CSP = ("default-src 'self'; img-src 'self' blob: data:; style-src 'self'; script-src 'self'; "
            "connect-src 'self'; media-src 'self' blob:; object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'")


#: The bearer scheme (module level: annotations are resolved from the module's globals).
BEARER = HTTPBearer(auto_error=False, description="the access token of `fetalscan serve`")


class ReviewIn(BaseModel):
    """A reader's decision on a study's finding."""

    reader: str = Field(min_length=1, max_length=200, description="name of the reader (who)")
    decision: Literal["confirm", "override"] = Field(description="confirm the model's finding or override it")
    final_class: str | None = Field(None, description="the reader's class; required for override, must be "
                                    "one of the model's classes; for confirm it is the model's finding")
    comment: str = Field("", max_length=5000, description="free text")


class ReviewOut(BaseModel):
    id: int
    study_id: str
    created_utc: str
    reader: str
    decision: str
    model_prediction: str
    final_class: str
    comment: str
    model_sha256: str
    supersedes: int | None = None


def create_app(settings: ServeSettings) -> FastAPI:
    """The service for ``settings``: models loaded, database opened, routes and guards in place.

    Raises :class:`~fetalscan.errors.FetalscanError` for unusable settings or model files.
    """
    settings.validate()
    quiet_dicom_logs()
    analyzer = Analyzer(settings)
    store = ReviewStore(settings.db)
    cache = StudyCache(settings.max_studies)
    audit = AuditLog(settings.audit_log_path)

    app = FastAPI(
        title="fetalscan",
        version=__version__,
        summary="AI-assisted reading of fetal brain ultrasound: class probabilities, standard-plane check, "
                "heatmaps and head biometry, with the reader's confirm / override.",
        description=DISCLAIMER + "\n\nAuthenticate with `Authorization: Bearer <token>` (the token "
                    "`fetalscan serve` printed, or `FETALSCAN_TOKEN`).",
    )
    app.state.settings = settings
    app.state.analyzer = analyzer
    app.state.store = store
    app.state.cache = cache
    app.state.audit = audit

    def require_token(creds: Annotated[HTTPAuthorizationCredentials | None, Depends(BEARER)]) -> None:
        if settings.auth_enabled and not (creds and token_matches(creds.credentials, settings.token or "")):
            raise HTTPException(401, "missing or wrong access token", headers={"WWW-Authenticate": "Bearer"})

    auth = [Depends(require_token)]
    ctx = ServiceContext(settings=settings, analyzer=analyzer, store=store, cache=cache, auth=auth, audit=audit)
    app.state.ctx = ctx

    # ------------------------------------------------------------------ errors as JSON
    @app.exception_handler(UploadRejected)
    async def _rejected(request: Request, exc: UploadRejected) -> JSONResponse:
        log.warning("request %s %s rejected with %d", request.method, request.url.path, exc.status)
        return JSONResponse({"detail": str(exc), "file": exc.file}, status_code=exc.status)

    @app.exception_handler(FetalscanError)
    async def _fetalscan_error(request: Request, exc: FetalscanError) -> JSONResponse:
        return JSONResponse({"detail": str(exc), "file": None}, status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return JSONResponse({"detail": str(exc.detail), "file": None}, status_code=exc.status_code,
                            headers=getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        parts = []
        for err in exc.errors():
            where = ".".join(str(x) for x in err.get("loc", ()) if x not in ("body", "query", "path"))
            parts.append(f"{where or 'request'}: {err.get('msg', 'invalid')}")
        return JSONResponse({"detail": "; ".join(parts) or "invalid request", "file": None,
                             "errors": json.loads(json.dumps(exc.errors(), default=str))}, status_code=422)

    # ------------------------------------------------------------------ public
    @app.get("/", include_in_schema=False)
    def page() -> FileResponse:
        return FileResponse(STATIC / "index.html", media_type="text/html")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get(f"{API}/health", tags=["service"], summary="Is the service up, and with which model")
    def health() -> dict:
        info = analyzer.model_info()
        return {"status": "ok", "version": __version__, "model": info["name"], "model_sha256": info["sha256"],
                "classes": analyzer.classes, "biometry": analyzer.segmenter is not None,
                "auth": "token" if settings.auth_enabled else "off (--insecure-local)",
                "disclaimer": DISCLAIMER}

    # ------------------------------------------------------------------ authenticated
    @app.get(f"{API}/model", tags=["service"], dependencies=auth, summary="The served models and the limits")
    def model() -> dict:
        return {"model": analyzer.model_info(), "limits": settings.limits(),
                "auth": "token" if settings.auth_enabled else "off (--insecure-local)", "disclaimer": DISCLAIMER}

    @app.post(f"{API}/analyze", tags=["analysis"], dependencies=auth,
              summary="Analyse one study: images, DICOM (single or multi-frame) or a video",
              responses={401: {"description": "missing or wrong token"},
                         413: {"description": "too large: request, file, pixels or images"},
                         415: {"description": "not an image, DICOM file or video"},
                         422: {"description": "unreadable or corrupt file (the message names it)"}})
    def analyze(files: Annotated[list[UploadFile], File(description="one or more images, DICOM files or cine "
                                                                    "loops, or a video: one study")],
                pixel_size_mm: Annotated[float | None, Form(description="mm per pixel for images without DICOM "
                                                             "calibration (biometry in mm and GA need it)")] = None,
                ) -> dict:
        uploads = [UploadedFile(f.filename or "", f.file) for f in files]
        return ctx.analyze(uploads, pixel_size_mm=pixel_size_mm)

    _study_id = ctx.study_id

    @app.get(f"{API}/studies/{{study_id}}", tags=["analysis"], dependencies=auth, summary="A study's result")
    def study(study_id: str) -> dict:
        sid = _study_id(study_id)
        cached = cache.get(sid)
        if cached is not None:
            return {**cached.result, "images_available": True, "reviews": store.reviews_of(sid)}
        row = store.get_study(sid)
        if row is None:
            raise HTTPException(404, f"study {sid} not found")
        return {"study": {"id": sid, "created_utc": row["created_utc"], "prediction": row["prediction"],
                          "probabilities": row["probabilities"], "n_images": row["n_images"],
                          "images": row["images"]},
                "images": [], "images_available": False, "model": {"name": row["model_name"],
                                                                   "sha256": row["model_sha256"]},
                "reviews": store.reviews_of(sid), "disclaimer": DISCLAIMER}

    def _image(study_id: str, index: int):
        sid = _study_id(study_id)
        cached = ctx.cached_study(sid)
        if not 0 <= index < len(cached.images):
            raise HTTPException(404, f"study {sid} has images 0-{len(cached.images) - 1}, not {index}")
        return cached.images[index]

    png = {"content": {"image/png": {}}, "description": "PNG"}

    @app.get(f"{API}/studies/{{study_id}}/images/{{index}}/image.png", tags=["images"], dependencies=auth,
             response_class=Response, responses={200: png}, summary="The image (or frame) as analysed")
    def image_png(study_id: str, index: int) -> Response:
        return _png(_image(study_id, index).image_png)

    @app.get(f"{API}/studies/{{study_id}}/images/{{index}}/heatmap.png", tags=["images"], dependencies=auth,
             response_class=Response, responses={200: png},
             summary="The heatmap over the image, or (layer=true) the colour layer alone with transparency")
    def heatmap_png(study_id: str, index: int, alpha: float = 0.5, layer: bool = False) -> Response:
        if not 0.0 <= alpha <= 1.0:
            raise HTTPException(422, f"alpha must be between 0 and 1, got {alpha}")
        item = _image(study_id, index)
        return _png(_heatmap_png(item, alpha, layer))

    @app.get(f"{API}/studies/{{study_id}}/images/{{index}}/biometry.png", tags=["images"], dependencies=auth,
             response_class=Response, responses={200: png}, summary="The head ellipse and measurements drawn")
    def biometry_png(study_id: str, index: int) -> Response:
        item = _image(study_id, index)
        if item.biometry_png is None:
            raise HTTPException(404, "no biometry: the service was started without --biometry-model")
        return _png(item.biometry_png)

    @app.post(f"{API}/studies/{{study_id}}/review", tags=["reviews"], dependencies=auth, status_code=201,
              response_model=ReviewOut, summary="Confirm or override the study's finding (a new record each time)")
    def review(study_id: str, body: ReviewIn) -> dict:
        sid = _study_id(study_id)
        row = store.get_study(sid)
        if row is None:
            raise HTTPException(404, f"study {sid} not found")
        reader = body.reader.strip()
        if not reader:
            raise HTTPException(422, "reader: give the reader's name")
        classes = row["classes"]
        if body.decision == "confirm":
            if body.final_class not in (None, "", row["prediction"]):
                raise HTTPException(422, f"final_class {body.final_class!r} differs from the finding "
                                         f"{row['prediction']!r}: use decision 'override'")
            final = row["prediction"]
        else:
            if not body.final_class:
                raise HTTPException(422, f"an override needs final_class, one of: {', '.join(classes)}")
            if body.final_class not in classes:
                raise HTTPException(422, f"final_class {body.final_class!r} is not a class of the model; "
                                         f"choose one of: {', '.join(classes)}")
            final = body.final_class
        saved = store.add_review(sid, reader=reader, decision=body.decision, final_class=final,
                                 comment=body.comment.strip())
        ctx.record("review", sid, {"review_id": saved["id"], "decision": body.decision, "final_class": final,
                                   "model_prediction": row["prediction"], "reader": reader}, actor=reader)
        return saved

    @app.get(f"{API}/studies/{{study_id}}/reviews", tags=["reviews"], dependencies=auth,
             response_model=list[ReviewOut], summary="A study's reviews, oldest first (the last is in force)")
    def reviews(study_id: str) -> list[dict]:
        sid = _study_id(study_id)
        if store.get_study(sid) is None:
            raise HTTPException(404, f"study {sid} not found")
        return store.reviews_of(sid)

    @app.get(f"{API}/reviews.csv", tags=["reviews"], dependencies=auth, response_class=PlainTextResponse,
             responses={200: {"content": {"text/csv": {}}, "description": "CSV"}},
             summary="Every review with its study, for retraining")
    def reviews_csv() -> Response:
        return Response(store.reviews_csv(), media_type="text/csv; charset=utf-8",
                        headers={"Content-Disposition": 'attachment; filename="reviews.csv"'})

    for name in ROUTE_MODULES:
        importlib.import_module(f"fetalscan.serve.{name}").add_routes(app, ctx)

    # ------------------------------------------------------------------ guards (added last = outermost)
    if settings.cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=list(settings.cors_origins), allow_credentials=False,
                           allow_methods=["GET", "POST"], allow_headers=["Authorization", "Content-Type"])
    app.add_middleware(GuardMiddleware, settings=settings)
    return app


def _png(data: bytes) -> Response:
    return Response(data, media_type="image/png", headers={"Cache-Control": "private, no-store"})


def _heatmap_png(item, alpha: float, layer: bool) -> bytes:
    """The overlay (image + heatmap at ``alpha``) or the RGBA colour layer of one cached image."""
    import io

    import matplotlib
    import numpy as np
    from PIL import Image

    from fetalscan.explain.cams import overlay, png_bytes

    heat = np.asarray(item.heatmap, dtype=np.float32) / 255.0
    if layer:
        rgba = np.empty(heat.shape + (4,), dtype=np.uint8)
        colour = matplotlib.colormaps[HEATMAP_COLORMAP](heat)[..., :3]
        rgba[..., :3] = np.clip(colour * 255.0 + 0.5, 0, 255).astype(np.uint8)
        rgba[..., 3] = np.clip(np.sqrt(heat) * 255.0 + 0.5, 0, 255).astype(np.uint8)  # as overlay() weighs it
        return png_bytes(rgba)
    with Image.open(io.BytesIO(item.image_png)) as im:
        image = np.asarray(im.convert("RGB"), dtype=np.uint8)
    return png_bytes(overlay(image, heat, alpha=alpha, colormap=HEATMAP_COLORMAP))


class GuardMiddleware:
    """Pure ASGI guard: body-size limit, token check before the body is read, security headers."""

    def __init__(self, app, settings: ServeSettings) -> None:
        self.app = app
        self.settings = settings

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        limit = self.settings.max_request_bytes
        started = False

        async def send_secure(message):
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                extra = [(b"x-content-type-options", b"nosniff"), (b"referrer-policy", b"no-referrer"),
                         (b"x-frame-options", b"DENY")]
                if path == "/" or path.startswith("/static/"):
                    extra.append((b"content-security-policy", PAGE_CSP.encode()))
                if path.startswith(API):
                    extra.append((b"cache-control", b"no-store"))
                names = {k.lower() for k, _ in message.get("headers", [])}
                message = {**message, "headers": list(message.get("headers", []))
                           + [(k, v) for k, v in extra if k not in names]}
            await send(message)

        async def reply(status: int, detail: str, extra_headers: dict | None = None):
            body = json.dumps({"detail": detail, "file": None}).encode()
            hdrs = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
            hdrs += [(k.encode(), v.encode()) for k, v in (extra_headers or {}).items()]
            if scope.get("method") == "POST":
                hdrs.append((b"connection", b"close"))  # the unread body is not waited for
            await send_secure({"type": "http.response.start", "status": status, "headers": hdrs})
            await send_secure({"type": "http.response.body", "body": body})

        if self.settings.auth_enabled and not PUBLIC.match(path) and scope.get("method") != "OPTIONS":
            given = headers.get("authorization", "")
            scheme, _, token = given.partition(" ")
            if scheme.lower() != "bearer" or not token_matches(token.strip(), self.settings.token or ""):
                await reply(401, "missing or wrong access token: send 'Authorization: Bearer <token>'",
                            {"www-authenticate": "Bearer"})
                return

        declared = headers.get("content-length")
        if declared is not None:
            try:
                too_big = int(declared) > limit
            except ValueError:
                await reply(400, "Content-Length is not a number")
                return
            if too_big:
                await reply(413, f"request body of {int(declared) / 2**20:.1f} MiB exceeds the limit of "
                                 f"{self.settings.max_request_mb:g} MiB")
                return

        received = 0

        async def receive_limited():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise _TooLarge(self.settings.max_request_mb)
            return message

        try:
            await self.app(scope, receive_limited, send_secure)
        except _TooLarge:
            if not started:
                await reply(413, f"request body exceeds the limit of {self.settings.max_request_mb:g} MiB")
        except BaseException as exc:  # anyio wraps errors of concurrent tasks into groups
            inner = getattr(exc, "exceptions", None)
            if inner and all(isinstance(e, _TooLarge) for e in inner) and not started:
                await reply(413, f"request body exceeds the limit of {self.settings.max_request_mb:g} MiB")
                return
            raise


class _TooLarge(StarletteHTTPException):
    """The streamed body passed the limit (an HTTPException so FastAPI's body parser lets it through)."""

    def __init__(self, limit_mb: float) -> None:
        super().__init__(413, f"request body exceeds the limit of {limit_mb:g} MiB")
