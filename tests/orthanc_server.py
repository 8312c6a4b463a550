"""A real Orthanc PACS for the tests: Debian's ``Orthanc`` binary with its DICOMweb plugin.

:func:`start_orthanc` starts ``/usr/sbin/Orthanc`` as its own process with a temporary
JSON configuration (storage and index in a temporary folder, free loopback ports, the
DICOMweb plugin on ``/dicom-web/``, remote access off, HTTP basic authentication with one
test user, the DICOM server off), waits until ``GET /system`` answers, and returns an
:class:`Orthanc` whose :meth:`Orthanc.stop` terminates the process and waits for it.
The ``orthanc`` fixture in ``tests/test_pacs.py`` wraps it so the server is always stopped,
also when a test fails; without the binary or the plugin the tests are skipped and say why
(``make system`` installs both: ``apt-get install orthanc orthanc-dicomweb``).

Orthanc listens on every interface (1.10 has no bind-address option) but with
``RemoteAccessAllowed: false`` answers only loopback clients; nothing leaves the machine.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

#: Where Debian's ``orthanc`` package puts the server and ``orthanc-dicomweb`` its plugin.
ORTHANC_BINARY = Path("/usr/sbin/Orthanc")
DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")

#: The test user of the temporary configuration (HTTP basic authentication).
USER = "fetalscan"
PASSWORD = "orthanc-test-password"


def missing_reason() -> str | None:
    """Why Orthanc cannot be started here (the skip reason), or ``None`` when it can."""
    binary = Path(os.environ.get("FETALSCAN_ORTHANC", ORTHANC_BINARY))
    if not (binary.is_file() or shutil.which(str(binary))):
        return (f"Orthanc not found at {binary}: install Debian's orthanc and orthanc-dicomweb "
                "(`make system`, as root) or set FETALSCAN_ORTHANC to the binary")
    if not DICOMWEB_PLUGIN.exists():
        return (f"Orthanc's DICOMweb plugin not found at {DICOMWEB_PLUGIN}: install Debian's orthanc-dicomweb "
                "(`make system`, as root)")
    return None


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Orthanc:
    """A running Orthanc: its base URL, DICOMweb root, credentials and process."""

    url: str
    process: subprocess.Popen
    folder: Path
    user: str = USER
    password: str = PASSWORD
    log_file: Path = field(default=Path())

    @property
    def dicomweb(self) -> str:
        """The DICOMweb root (QIDO, WADO and STOW under it), e.g. ``http://127.0.0.1:PORT/dicom-web``."""
        return f"{self.url}/dicom-web"

    def get_json(self, path: str):
        """``GET`` an Orthanc REST path with the test user (for checks the tests make directly)."""
        req = urllib.request.Request(f"{self.url}{path}", headers={"Authorization": _basic(self.user, self.password)})
        with urllib.request.urlopen(req, timeout=10) as resp:
            return json.loads(resp.read().decode("utf-8"))

    def log_tail(self, n: int = 30) -> str:
        """The last ``n`` lines of Orthanc's own output (for failure messages)."""
        try:
            return "\n".join(self.log_file.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def stop(self, timeout: float = 15.0) -> None:
        """Terminate the server and wait for it (killed when it does not stop within ``timeout``)."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=timeout)


def _basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode("ascii")


def configuration(folder: Path, http_port: int, dicom_port: int) -> dict:
    """The temporary configuration: everything in ``folder``, loopback only, one test user."""
    return {
        "Name": "FETALSCAN_TEST",
        "StorageDirectory": str(folder / "storage"),
        "IndexDirectory": str(folder / "index"),
        "StorageCompression": False,
        "HttpServerEnabled": True,
        "HttpPort": http_port,
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": True,
        "RegisteredUsers": {USER: PASSWORD},
        "DicomServerEnabled": False,  # the tests speak DICOMweb only
        "DicomPort": dicom_port,
        "DicomAet": "FETALSCANTEST",
        "HttpThreadsCount": 4,
        "ConcurrentJobs": 1,
        "SaveJobs": False,
        "ExecuteLuaEnabled": False,
        "DeidentifyLogs": True,
        "Plugins": [str(DICOMWEB_PLUGIN)],
        "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "EnableWado": False, "Ssl": False,
                     "StudiesMetadata": "Full", "SeriesMetadata": "Full"},
    }


def _answers(url: str, timeout: float = 1.0) -> bool:
    req = urllib.request.Request(f"{url}/system", headers={"Authorization": _basic(USER, PASSWORD)})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status == 200
    except (urllib.error.URLError, OSError):
        return False


def start_orthanc(folder: Path, *, startup_timeout: float = 60.0, attempts: int = 3) -> Orthanc:
    """Start Orthanc with a fresh configuration in ``folder`` and wait until ``/system`` answers.

    A port taken between choosing it and Orthanc binding it makes Orthanc exit; then
    it is started again on other ports (up to ``attempts`` times). Raises
    ``RuntimeError`` with the end of Orthanc's log when it never answers.
    """
    binary = os.environ.get("FETALSCAN_ORTHANC", str(ORTHANC_BINARY))
    folder = Path(folder)
    last = ""
    for attempt in range(attempts):
        run = folder / f"run{attempt}"
        run.mkdir(parents=True, exist_ok=True)
        http_port, dicom_port = free_port(), free_port()
        config = run / "orthanc.json"
        config.write_text(json.dumps(configuration(run, http_port, dicom_port), indent=2))
        log_file = run / "orthanc.log"
        with open(log_file, "wb") as log:
            process = subprocess.Popen([binary, str(config)], stdout=log, stderr=subprocess.STDOUT,
                                       stdin=subprocess.DEVNULL, cwd=run, start_new_session=True)
        server = Orthanc(url=f"http://127.0.0.1:{http_port}", process=process, folder=run, log_file=log_file)
        deadline = time.monotonic() + startup_timeout
        try:
            while time.monotonic() < deadline and process.poll() is None:
                if _answers(server.url):
                    return server
                time.sleep(0.2)
        except BaseException:
            server.stop()
            raise
        last = server.log_tail()
        server.stop()
    raise RuntimeError(f"Orthanc did not answer on /system after {attempts} attempt(s); its log ends:\n{last}")
