"""Streaming reader of ``multipart/related`` bodies: each part written to a file as it arrives.

A WADO-RS *Retrieve Study* / *Retrieve Series* answer (DICOM PS3.18 §10.4, payload as in
§8.6.1.2 "Multipart Payloads", RFC 2387) is one ``multipart/related`` body holding every
instance as its own part. :func:`split_parts` cuts such a body, given as an iterator of
byte chunks, into parts and writes each part's content to a new file beside the others
as soon as its closing delimiter has arrived; memory use stays at one chunk plus the
delimiter, however large the study is. The bytes written are the instance exactly as
the server sent it (no DICOM decoding and re-encoding).
"""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

#: Longest header block of one part accepted (a part's headers are a few short lines).
MAX_HEADER_BYTES = 64 * 1024

_BOUNDARY = re.compile(r'boundary\s*=\s*(?:"([^"]+)"|([^;\s]+))', re.IGNORECASE)


class MultipartError(ValueError):
    """A body that is not the ``multipart/related`` message its Content-Type announced."""


def boundary_of(content_type: str) -> str | None:
    """The ``boundary`` parameter of a ``multipart/...`` Content-Type, or ``None``."""
    match = _BOUNDARY.search(content_type or "")
    if match is None:
        return None
    return match.group(1) or match.group(2)


def split_parts(chunks: Iterable[bytes], boundary: str, folder: Path) -> Iterator[tuple[dict[str, str], Path]]:
    """Yield ``(headers, path)`` for every part of a multipart body, each part's content in a new file.

    Parameters
    ----------
    chunks : iterable of bytes
        The body as it arrives (``requests.Response.iter_content``).
    boundary : str
        The Content-Type's ``boundary`` parameter.
    folder : Path
        Where the part files are made (``.part-*.tmp``); the caller renames or removes
        each one. A part whose content is incomplete when the body ends is removed.

    Raises
    ------
    MultipartError
        The body ends before the closing delimiter, or a part's headers never end.
    """
    delimiter = b"\r\n--" + boundary.encode("latin-1")
    keep = len(delimiter) + 4  # enough to find a delimiter split across two chunks
    buf = bytearray(b"\r\n")  # the first delimiter has no CRLF before it in the body
    state = "preamble"
    out = None
    out_path: Path | None = None
    headers: dict[str, str] = {}
    try:
        for chunk in _with_end(chunks):
            if chunk is not None:
                buf += chunk
            ended = chunk is None
            while True:
                if state == "preamble":
                    at = buf.find(delimiter)
                    if at < 0:
                        del buf[: max(0, len(buf) - keep)]
                        break
                    del buf[: at + len(delimiter)]
                    state = "after-delimiter"
                elif state == "after-delimiter":
                    if len(buf) < 2 and not ended:
                        break
                    if buf[:2] == b"--":
                        return  # the closing delimiter; anything after it is the epilogue
                    end = buf.find(b"\r\n\r\n")
                    if end < 0:
                        if len(buf) > MAX_HEADER_BYTES:
                            raise MultipartError("a part's headers do not end (no blank line within 64 KiB)")
                        if ended:
                            raise MultipartError("the body ended inside a part's headers")
                        break
                    headers = _headers(bytes(buf[:end]))
                    del buf[: end + 4]
                    fd, name = tempfile.mkstemp(prefix=".part-", suffix=".tmp", dir=folder)
                    out, out_path = os.fdopen(fd, "wb"), Path(name)
                    state = "body"
                else:  # body
                    at = buf.find(delimiter)
                    if at < 0:
                        if len(buf) > keep:
                            out.write(buf[: len(buf) - keep])
                            del buf[: len(buf) - keep]
                        break
                    out.write(buf[:at])
                    del buf[: at + len(delimiter)]
                    out.close()
                    done, out, out_path = out_path, None, None
                    yield headers, done
                    state = "after-delimiter"
            if ended:
                break
        raise MultipartError("the body ended before its closing delimiter (the transfer was cut short)")
    finally:
        if out is not None:
            out.close()
        if out_path is not None:
            out_path.unlink(missing_ok=True)


def _with_end(chunks: Iterable[bytes]) -> Iterator[bytes | None]:
    """The non-empty chunks, then ``None`` for the end of the body."""
    for chunk in chunks:
        if chunk:
            yield chunk
    yield None


def _headers(block: bytes) -> dict[str, str]:
    """A part's header lines as a dict with lower-case names (the first CRLF is the delimiter line's)."""
    out: dict[str, str] = {}
    for line in block.decode("latin-1").split("\r\n"):
        name, sep, value = line.partition(":")
        if sep:
            out[name.strip().lower()] = value.strip()
    return out
