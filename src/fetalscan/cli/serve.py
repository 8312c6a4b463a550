"""``fetalscan serve`` — the web service and its page (FastAPI under uvicorn)."""

from __future__ import annotations

import argparse
from pathlib import Path

#: Place of this command in ``fetalscan --help`` (after the commands that make models).
ORDER = 60


def register(sub: argparse._SubParsersAction) -> None:
    from fetalscan.serve.settings import (
        DEFAULT_DB,
        DEFAULT_MODEL,
        TOKEN_ENV,
        ServeSettings,
    )

    d = ServeSettings()
    p = sub.add_parser(
        "serve", help="web service + page: upload images / DICOM / video, see findings, confirm or override",
        description="Start the fetalscan web service (FastAPI under uvicorn): a page for readers and a "
                    "versioned API (/api/v1, described at /docs). Every route but health and the page needs "
                    f"the access token: {TOKEN_ENV} when set, else one generated and printed once.")
    p.add_argument("--model", type=Path, default=None,
                   help=f"classifier checkpoint (default: {DEFAULT_MODEL}, written by `make demo`)")
    p.add_argument("--biometry-model", type=Path, default=None,
                   help="head-segmenter checkpoint (`fetalscan biometry train`); enables HC/BPD/OFD and GA")
    p.add_argument("--host", default=d.host, help=f"address to listen on (default: {d.host}; loopback only)")
    p.add_argument("--port", type=int, default=d.port, help=f"port (default: {d.port})")
    p.add_argument("--insecure-local", action="store_true",
                   help="turn authentication off (refused unless --host is a loopback address); the page says so")
    p.add_argument("--db", type=Path, default=DEFAULT_DB, help=f"SQLite file of the reviews (default: {DEFAULT_DB})")
    p.add_argument("--audit-log", type=Path, default=None,
                   help="hash-chained audit trail, JSON lines: who analysed / reviewed / downloaded which "
                        "(pseudonymous) study; check it with `fetalscan audit verify` (default: audit.jsonl beside "
                        "--db; docs/service.md)")
    p.add_argument("--device", default=d.device, help="auto, cpu, cuda or cuda:N (default: auto)")
    p.add_argument("--backend", default=d.backend, choices=("auto", "torch", "onnx"),
                   help="classifier engine: auto (ONNX Runtime on CPU, PyTorch on CUDA), torch or onnx "
                        f"(default: {d.backend}; docs/inference.md)")
    p.add_argument("--max-request-mb", type=float, default=d.max_request_mb,
                   help=f"largest request body in MiB (default: {d.max_request_mb:g})")
    p.add_argument("--max-file-mb", type=float, default=d.max_file_mb,
                   help=f"largest uploaded file in MiB (default: {d.max_file_mb:g})")
    p.add_argument("--max-files", type=int, default=d.max_files, help=f"most files per request (default: {d.max_files})")
    p.add_argument("--max-pixels", type=int, default=d.max_pixels,
                   help=f"most pixels per image or frame, checked before decoding (default: {d.max_pixels})")
    p.add_argument("--max-frames", type=int, default=d.max_frames,
                   help=f"most frames analysed per cine / video; longer ones are sampled (default: {d.max_frames})")
    p.add_argument("--max-images", type=int, default=d.max_images,
                   help=f"most images (stills + frames) per study (default: {d.max_images})")
    p.add_argument("--max-studies", type=int, default=d.max_studies,
                   help=f"studies whose images stay in memory for the page (default: {d.max_studies})")
    p.add_argument("--aggregate", default=d.aggregate, choices=("mean", "vote", "max_abnormal"),
                   help=f"study-level rule over the images (default: {d.aggregate})")
    p.add_argument("--normal-class", default=d.normal_class, help="name of the normal class (for max_abnormal)")
    p.add_argument("--cors-origin", action="append", default=[], metavar="ORIGIN",
                   help="allow browser calls from this origin (repeatable; default: none, CORS closed)")
    p.add_argument("--pacs-url", default=None, metavar="URL",
                   help="DICOMweb root of a PACS for POST /api/v1/pacs/studies/{uid}/analyze, e.g. "
                        "http://127.0.0.1:8042/dicom-web (credentials: FETALSCAN_PACS_USER and "
                        "FETALSCAN_PACS_PASSWORD, or FETALSCAN_PACS_TOKEN; default: no PACS)")
    p.set_defaults(func=cmd_serve)


def _pacs_settings(url: str | None) -> dict:
    """The ``pacs_*`` settings: ``--pacs-url`` and the credentials from the environment."""
    import os

    from fetalscan.pacs.client import PASSWORD_ENV, TOKEN_ENV, USER_ENV

    if not url:
        return {}
    return {"pacs_url": url, "pacs_user": os.environ.get(USER_ENV) or None,
            "pacs_password": os.environ.get(PASSWORD_ENV) or None, "pacs_token": os.environ.get(TOKEN_ENV) or None}


def cmd_serve(args: argparse.Namespace) -> int:
    from fetalscan.cli._ui import info_line, warn_line
    from fetalscan.serve import (
        ServeSettings,
        default_model,
        is_loopback,
        resolve_token,
        run,
    )
    from fetalscan.serve.settings import TOKEN_ENV

    model = default_model(args.model)
    token, generated = (None, False) if args.insecure_local else resolve_token()
    settings = ServeSettings(
        model=model, biometry_model=args.biometry_model, token=token, insecure_local=args.insecure_local,
        host=args.host, port=args.port, db=args.db, audit_log=args.audit_log, device=args.device, backend=args.backend, max_request_mb=args.max_request_mb,
        max_file_mb=args.max_file_mb, max_files=args.max_files, max_pixels=args.max_pixels,
        max_frames=args.max_frames, max_images=args.max_images, max_studies=args.max_studies,
        aggregate=args.aggregate, normal_class=args.normal_class, cors_origins=list(args.cors_origin),
        log_level="info" if args.verbose else "warning", **_pacs_settings(args.pacs_url))
    settings.validate()
    host = f"[{args.host}]" if ":" in args.host else args.host
    info_line(f"fetalscan serve: model {model}" + (f", biometry {args.biometry_model}" if args.biometry_model else ""))
    if args.pacs_url:
        info_line(f"PACS (DICOMweb): {settings.pacs_url}")
    if args.insecure_local:
        warn_line("authentication is OFF (--insecure-local); only this machine can connect")
    elif generated:
        info_line(f"access token (shown once; set {TOKEN_ENV} to choose your own): {token}")
    else:
        info_line(f"access token: from {TOKEN_ENV}")
    if not is_loopback(args.host):
        warn_line(f"listening on {args.host}: the service speaks plain HTTP; put it behind a TLS reverse proxy "
                  "before other machines use it")
    info_line("loading the model(s)...")
    run(settings, on_ready=lambda: info_line(
        f"open http://{host}:{args.port}/  (API description: http://{host}:{args.port}/docs); Ctrl+C stops"))
    return 0
