"""The web service: a FastAPI app with a versioned API and a page for readers (``fetalscan serve``).

>>> from fetalscan.serve import ServeSettings, create_app        # doctest: +SKIP
>>> app = create_app(ServeSettings(model="runs/demo/model.pt", token="a-long-secret-token"))  # doctest: +SKIP

:func:`create_app` builds the app (tests use it with FastAPI's test client);
:func:`run` builds it and serves it with uvicorn. Analysis goes through the one prediction
path (:func:`fetalscan.inference.predict.predict`); see :mod:`fetalscan.serve.app` for the
routes and ``docs/service.md`` for the guide. Every result the service returns or shows
says that it supports, and never replaces, the clinician.

FastAPI, uvicorn and python-multipart are the ``serve`` extra
(``pip install 'fetalscan[serve]'``); they are imported only when an app is built.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fetalscan.serve.settings import (
    ServeSettings,
    default_model,
    is_loopback,
    resolve_token,
)

__all__ = ["ServeSettings", "create_app", "default_model", "is_loopback", "resolve_token", "run"]


def _require_extra() -> None:
    from importlib.util import find_spec

    missing = [pkg for pkg, modules in (("fastapi", ("fastapi",)), ("uvicorn", ("uvicorn",)),
                                        ("python-multipart", ("python_multipart", "multipart")))
               if not any(find_spec(m) for m in modules)]
    if missing:
        from fetalscan.errors import FetalscanError

        raise FetalscanError(f"the service needs the 'serve' extra ({', '.join(missing)} not installed): "
                             "pip install 'fetalscan[serve]'")


def create_app(settings: ServeSettings) -> Any:
    """The FastAPI app for ``settings`` (see :func:`fetalscan.serve.app.create_app`)."""
    _require_extra()
    from fetalscan.serve.app import create_app as _create

    return _create(settings)


def run(settings: ServeSettings, on_ready: Callable[[], None] | None = None) -> None:
    """Build the app and serve it with uvicorn on ``settings.host:settings.port`` until stopped.

    ``on_ready`` is called once the models are loaded, just before uvicorn starts listening.
    """
    import uvicorn

    app = create_app(settings)
    if on_ready is not None:
        on_ready()
    uvicorn.run(app, host=settings.host, port=settings.port, log_level=settings.log_level,
                server_header=False, proxy_headers=False, timeout_keep_alive=5)
