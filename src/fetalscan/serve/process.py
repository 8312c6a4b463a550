"""Start ``fetalscan serve`` as its own process on a free loopback port, and stop it.

For scripts, benchmarks (``benchmarks/load.py``, ``benchmarks/stream.py``) and tests
that need the service exactly as a user starts it: ``python -m fetalscan serve ...``
with a temporary review database, waited for on ``/api/v1/health``, always stopped
when the ``with`` block ends (also on error).

>>> with running_service("runs/demo/model.pt", Path("/tmp/x")) as svc:   # doctest: +SKIP
...     print(svc.url, svc.headers())
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from fetalscan.errors import FetalscanError

#: Seconds a service may take to load its models and listen (2 busy cores: generous).
START_TIMEOUT_S = 180.0


@dataclass(frozen=True)
class Service:
    """A running service: its base URL, its access token, and the file its output goes to."""

    url: str
    token: str
    log: Path

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def running_service(model: str | Path, workdir: Path, *, token: str = "local-process-token-0123456789",
                    extra_args: Sequence[str] = ()) -> Iterator[Service]:
    """``fetalscan serve --model MODEL`` on a free loopback port until the block ends."""
    port = free_port()
    workdir = Path(workdir)
    cmd = [sys.executable, "-m", "fetalscan", "serve", "--model", str(model), "--host", "127.0.0.1",
           "--port", str(port), "--db", str(workdir / "reviews.sqlite"), "--device", "cpu", *extra_args]
    with running_server(cmd, port, workdir, env={"FETALSCAN_TOKEN": token}) as (url, log):
        yield Service(url=url, token=token, log=log)


@contextlib.contextmanager
def running_server(cmd: Sequence[str], port: int, workdir: Path,
                   env: dict[str, str] | None = None) -> Iterator[tuple[str, Path]]:
    """Run ``cmd`` (a server listening on 127.0.0.1:``port`` with ``/api/v1/health``) until the block ends.

    Yields the base URL and the file its output goes to; waits until health answers; always
    terminates the process (killed after 20 s) when the block ends.
    """
    workdir = Path(workdir)
    log = workdir / "serve.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(list(cmd), stdout=out, stderr=subprocess.STDOUT, cwd=workdir,
                                env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})
        url = f"http://127.0.0.1:{port}"
        try:
            _wait_healthy(proc, url, log)
            yield url, log
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=20)


def _wait_healthy(proc: subprocess.Popen, url: str, log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise FetalscanError(f"the server exited with {proc.returncode}:\n{log.read_text(errors='replace')}")
        try:
            with urllib.request.urlopen(f"{url}/api/v1/health", timeout=2.0) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.25)
    raise FetalscanError(f"the server did not answer within {START_TIMEOUT_S:.0f} s:\n"
                       f"{log.read_text(errors='replace')}")
