"""What a running service is: its model files, access token, limits and review database.

:class:`ServeSettings` is the one configuration of the service; ``fetalscan serve`` maps
its flags 1:1 onto the fields and tests build apps from it directly. Nothing here imports
FastAPI or torch, so the CLI can validate flags before the heavy imports.
"""

from __future__ import annotations

import hmac
import ipaddress
import os
import secrets
from dataclasses import asdict, dataclass, field
from pathlib import Path

from fetalscan.errors import FetalscanError

#: Environment variable that holds the access token.
TOKEN_ENV = "FETALSCAN_TOKEN"

#: Shortest token accepted (a generated one has 32 URL-safe characters).
MIN_TOKEN_LENGTH = 16

#: The model ``make demo`` writes; served when no ``--model`` is given.
DEFAULT_MODEL = Path("runs/demo/model.pt")

#: Where reviews are stored unless told otherwise.
DEFAULT_DB = Path("runs/serve/reviews.sqlite")


@dataclass
class ServeSettings:
    """Configuration of the web service (``fetalscan serve``).

    Attributes
    ----------
    model : Path
        Classifier checkpoint (``fetalscan train`` / ``make demo``).
    biometry_model : Path or None
        Head-segmenter checkpoint (``fetalscan biometry train``); without it no biometry.
    token : str or None
        Bearer token every route but health and the static page requires. Required
        unless ``insecure_local``.
    insecure_local : bool
        Turn authentication off; refused unless ``host`` is a loopback address.
    host, port : str, int
        Where uvicorn listens.
    db : Path
        SQLite file of the reviews and study summaries (created when missing).
    audit_log : Path or None
        The hash-chained audit trail (JSON lines; :mod:`fetalscan.serve.audit`); ``None``
        (default): ``audit.jsonl`` beside ``db``.
    device : str
        ``auto``, ``cpu``, ``cuda`` ...
    backend : str
        Inference engine of the classifier: ``auto`` (ONNX Runtime on a CPU, PyTorch on
        CUDA; default), ``torch`` or ``onnx``. Every prediction of the service (studies and
        the live stream) runs on it, so they agree exactly with each other; ONNX Runtime
        agrees with ``fetalscan predict``'s default PyTorch within 1e-4.
    max_request_mb : float
        Largest request body accepted, in MiB (413 above it).
    max_file_mb : float
        Largest single uploaded file, in MiB (413 above it).
    max_files : int
        Most files in one request.
    max_pixels : int
        Most pixels (width x height) of one image or frame; checked from the header
        before any pixel is decoded (a decompression-bomb guard). 413 above it.
    max_frames : int
        Most frames analysed per cine DICOM or video; longer ones are sampled evenly
        (every N-th frame) and the response says so.
    max_images : int
        Most images (stills plus frames) in one study.
    max_studies : int
        Studies whose images and heatmaps stay in memory for the page (oldest dropped
        first); their summaries and reviews stay in the database.
    aggregate : str
        Study-level rule over the images (``mean``, ``vote``, ``max_abnormal``).
    normal_class : str
        Name of the normal class (for ``max_abnormal``).
    heatmap_method : str
        Grad-CAM family method of the heatmaps (``gradcam`` ...).
    cors_origins : list of str
        Origins allowed to call the API from a browser; empty (default) = CORS closed.
    log_level : str
        uvicorn's log level.
    warm_up : bool
        Run each model once at start, so the first upload is not slower than the others.
    pacs_url : str or None
        DICOMweb root of the PACS (e.g. ``http://127.0.0.1:8042/dicom-web``) that
        ``POST /api/v1/pacs/studies/{uid}/analyze`` retrieves studies from and stores the
        SR and Secondary Captures to; ``None`` (default): that route answers 409.
    pacs_user, pacs_password, pacs_token : str or None
        PACS credentials: HTTP basic or a bearer token (``fetalscan serve`` reads them from
        ``FETALSCAN_PACS_USER`` / ``FETALSCAN_PACS_PASSWORD`` / ``FETALSCAN_PACS_TOKEN``).
    pacs_timeout_s : float
        Seconds to wait for each answer from the PACS.
    """

    model: Path = DEFAULT_MODEL
    biometry_model: Path | None = None
    token: str | None = None
    insecure_local: bool = False
    host: str = "127.0.0.1"
    port: int = 8000
    db: Path = DEFAULT_DB
    audit_log: Path | None = None
    device: str = "auto"
    backend: str = "auto"
    max_request_mb: float = 256.0
    max_file_mb: float = 200.0
    max_files: int = 64
    max_pixels: int = 40_000_000
    max_frames: int = 32
    max_images: int = 256
    max_studies: int = 20
    aggregate: str = "mean"
    normal_class: str = "normal"
    heatmap_method: str = "gradcam"
    cors_origins: list[str] = field(default_factory=list)
    log_level: str = "info"
    warm_up: bool = True
    pacs_url: str | None = None
    pacs_user: str | None = None
    pacs_password: str | None = None
    pacs_token: str | None = None
    pacs_timeout_s: float = 60.0

    @property
    def max_request_bytes(self) -> int:
        return int(self.max_request_mb * 1024 * 1024)

    @property
    def max_file_bytes(self) -> int:
        return int(self.max_file_mb * 1024 * 1024)

    @property
    def audit_log_path(self) -> Path:
        """The audit trail file: ``audit_log``, else ``audit.jsonl`` beside the review database."""
        return Path(self.audit_log) if self.audit_log else Path(self.db).parent / "audit.jsonl"

    @property
    def auth_enabled(self) -> bool:
        return not self.insecure_local

    def validate(self) -> None:
        """Raise :class:`FetalscanError` naming the field for any unusable value."""
        self.model = Path(self.model)
        if self.biometry_model is not None:
            self.biometry_model = Path(self.biometry_model)
        self.db = Path(self.db)
        if self.insecure_local and not is_loopback(self.host):
            raise FetalscanError(f"--insecure-local turns authentication off and is allowed only on a loopback "
                                 f"address (127.0.0.1, ::1, localhost); --host is {self.host!r}")
        if self.auth_enabled:
            if not self.token:
                raise FetalscanError(f"no access token: set {TOKEN_ENV} or let `fetalscan serve` generate one "
                                     "(or pass --insecure-local on a loopback address)")
            if len(self.token) < MIN_TOKEN_LENGTH:
                raise FetalscanError(f"the access token is {len(self.token)} characters long; use at least "
                                     f"{MIN_TOKEN_LENGTH} (unset {TOKEN_ENV} to have one generated)")
        if self.backend not in ("auto", "torch", "onnx"):
            raise FetalscanError(f"--backend must be auto, torch or onnx, got {self.backend!r}")
        if not 0 < self.port < 65536:
            raise FetalscanError(f"--port must be 1-65535, got {self.port}")
        for name in ("max_request_mb", "max_file_mb"):
            if not getattr(self, name) > 0:
                raise FetalscanError(f"{name} must be > 0, got {getattr(self, name)}")
        for name in ("max_files", "max_pixels", "max_frames", "max_images", "max_studies"):
            if int(getattr(self, name)) < 1:
                raise FetalscanError(f"{name} must be >= 1, got {getattr(self, name)}")
        for origin in self.cors_origins:
            if origin == "*" or not origin.startswith(("http://", "https://")):
                raise FetalscanError(f"--cors-origin {origin!r}: give a full origin such as "
                                     "https://pacs.example.org ('*' is not allowed)")
        self.pacs_config()  # a bad --pacs-url fails at start, not at the first request

    def pacs_config(self):
        """The PACS connection (:class:`fetalscan.pacs.PacsConfig`), or ``None`` without ``pacs_url``.

        Raises :class:`~fetalscan.pacs.PacsError` (a ``FetalscanError``) for an unusable URL
        or credentials."""
        if not self.pacs_url:
            return None
        from fetalscan.pacs.client import PacsConfig

        cfg = PacsConfig(url=self.pacs_url, username=self.pacs_user, password=self.pacs_password,
                         token=self.pacs_token, read_timeout_s=self.pacs_timeout_s)
        cfg.validate()
        return cfg

    def limits(self) -> dict:
        """The request limits as the API reports them."""
        return {"max_request_mb": self.max_request_mb, "max_file_mb": self.max_file_mb,
                "max_files": self.max_files, "max_pixels": self.max_pixels, "max_frames": self.max_frames,
                "max_images": self.max_images}

    def to_dict(self) -> dict:
        """Settings without the token (safe to log or show)."""
        d = asdict(self)
        d["token"] = "(set)" if self.token else None
        for secret in ("pacs_password", "pacs_token"):
            d[secret] = "(set)" if d.get(secret) else None
        return {k: str(v) if isinstance(v, Path) else v for k, v in d.items()}


def is_loopback(host: str) -> bool:
    """Whether ``host`` names this machine only (``127.0.0.0/8``, ``::1`` or ``localhost``)."""
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def resolve_token(environ: dict | None = None) -> tuple[str, bool]:
    """The access token: ``FETALSCAN_TOKEN`` when set, else a new random one.

    Returns ``(token, generated)``; the caller shows a generated token once.
    """
    env = os.environ if environ is None else environ
    given = (env.get(TOKEN_ENV) or "").strip()
    if given:
        return given, False
    return secrets.token_urlsafe(24), True


def token_matches(given: str | None, expected: str) -> bool:
    """Constant-time comparison of a presented token with the expected one."""
    if not given:
        return False
    return hmac.compare_digest(given.encode("utf-8"), expected.encode("utf-8"))


def default_model(path: Path | None) -> Path:
    """``path``, or the model ``make demo`` wrote; a clear error when neither exists."""
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise FetalscanError(f"--model {path}: file not found")
        return path
    if DEFAULT_MODEL.is_file():
        return DEFAULT_MODEL
    raise FetalscanError(f"no model to serve: {DEFAULT_MODEL} does not exist; run `make demo` first "
                         "or pass --model")
