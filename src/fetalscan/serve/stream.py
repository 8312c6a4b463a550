"""Live mode: ``/api/v1/stream``, a WebSocket that analyses the frames of a cine or video as they come.

Protocol (``docs/service.md``, *Live mode*)::

    client                                           server
    ------                                           ------
    connect, subprotocols ["fetalscan.stream.v1",   accept (echoes "fetalscan.stream.v1")
                           "bearer.<token>"]
      or, instead of the bearer.* protocol,
    text {"type": "auth", "token": "<token>"}        wrong / missing token: close code 1008
                                                     text {"type": "ready", classes, model, backend, disclaimer}
    binary  <JPEG or PNG bytes>                      text {"type": "result", "frame", "probabilities",
      or    b"FSF1" + uint32 BE n + n bytes JSON           "prediction", "plane", "latency_ms",
            header {"id", "t", "heatmap"} + image          "inference_ms", "dropped", "dropped_total", "t"}
    text {"type": "options", "plane": true}          (the SonoNet-16 plane of every frame; off by default)
    text {"type": "heatmap"}                         text {"type": "heatmap", "frame", "png_base64", ...}
    text {"type": "ping"}                            text {"type": "pong", "received"}
                                                     text {"type": "error", "frame", "detail"} (connection stays)

The token is never taken from the query string (it would land in access logs). Browsers
cannot set an ``Authorization`` header on a WebSocket, hence the subprotocol or the first
message; the guard middleware of :mod:`fetalscan.serve.app` lets WebSocket scopes through,
so this module checks the token itself (constant time).

Frames go into a one-slot mailbox: a worker always takes the newest frame and a frame that
was not started before the next one arrived is dropped (and counted in the next answer's
``dropped``). So when the model is slower than the stream, answers lag by at most one
frame's analysis, never by a growing queue. Each frame goes through the service's one
probability function (:func:`fetalscan.inference.predict.probabilities_of_arrays`) on the
service's backend (ONNX Runtime on a CPU by default), decoded as the prediction path
decodes files, so a frame's probabilities are those of ``predict`` on the same image.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import logging
import struct
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from fastapi import FastAPI, WebSocket, WebSocketDisconnect

from fetalscan.serve.context import API
from fetalscan.serve.settings import token_matches
from fetalscan.texts import DISCLAIMER, HEATMAP_DISCLAIMER

log = logging.getLogger(__name__)

#: The route.
STREAM_PATH = f"{API}/stream"

#: Subprotocol the server speaks (echoed on accept) and the prefix of the token subprotocol.
SUBPROTOCOL = "fetalscan.stream.v1"
TOKEN_PROTOCOL_PREFIX = "bearer."

#: Magic of a binary message that carries a JSON header before the image bytes.
HEADER_MAGIC = b"FSF1"

#: Longest JSON header of a framed message, in bytes.
MAX_HEADER_BYTES = 4096

#: Seconds a connection may wait before sending its token.
AUTH_TIMEOUT_S = 10.0

#: WebSocket close code for a policy violation (wrong or missing token).
POLICY_VIOLATION = 1008

_JPEG = b"\xff\xd8\xff"
_PNG = b"\x89PNG\r\n\x1a\n"


class FrameError(Exception):
    """A frame that cannot be analysed; the message names it and the connection stays open."""


@dataclass
class Frame:
    """One received frame: its id, bytes, arrival time and the client's header fields."""

    id: Any
    data: bytes
    received: float
    client_time: Any = None
    heatmap: bool = False


@dataclass
class Mailbox:
    """A one-slot mailbox: :meth:`put` replaces a frame not yet taken (counted as dropped).

    :meth:`take` waits for the newest frame (or a heatmap request) and returns it with the
    number of frames dropped since the previous one was taken.
    """

    frame: Frame | None = None
    heatmap_wanted: bool = False
    dropped_since: int = 0
    dropped_total: int = 0
    closed: bool = False
    _event: asyncio.Event = field(default_factory=asyncio.Event)

    def put(self, frame: Frame) -> None:
        if self.frame is not None:
            self.dropped_since += 1
            self.dropped_total += 1
        self.frame = frame
        self._event.set()

    def want_heatmap(self) -> None:
        self.heatmap_wanted = True
        self._event.set()

    def close(self) -> None:
        self.closed = True
        self._event.set()

    async def take(self) -> tuple[str, Frame | None, int]:
        """``("frame", frame, dropped)``, ``("heatmap", None, 0)`` or ``("closed", None, 0)``."""
        while True:
            if self.closed:
                return "closed", None, 0
            if self.frame is not None:
                frame, dropped = self.frame, self.dropped_since
                self.frame, self.dropped_since = None, 0
                return "frame", frame, dropped
            if self.heatmap_wanted:
                self.heatmap_wanted = False
                return "heatmap", None, 0
            self._event.clear()
            await self._event.wait()


class FrameAnalyzer:
    """What the stream's worker does with one frame (in a thread): decode, classify, plane, heatmap.

    Shared by every connection of one app (``app.state.stream``); the classifier is the
    service's loaded model on the service's backend.
    """

    def __init__(self, ctx) -> None:
        self.ctx = ctx
        self.settings = ctx.settings
        self.analyzer = ctx.analyzer

    @property
    def loaded(self):
        return self.analyzer.loaded

    @property
    def classes(self) -> list[str]:
        return list(self.loaded.classes)

    def backend(self) -> str:
        from fetalscan.inference.predict import backend_of

        return backend_of(self.loaded, None, self.analyzer.device)

    def decode(self, frame: Frame) -> np.ndarray:
        """RGB ``uint8`` pixels of a JPEG / PNG frame, decoded as the prediction path decodes files;
        the pixel count is checked from the header first."""
        from PIL import Image, UnidentifiedImageError

        from fetalscan.data.records import _pil_to_rgb  # the prediction path's own conversion

        try:
            with Image.open(io.BytesIO(frame.data)) as im:
                w, h = im.size
                if w * h > self.settings.max_pixels:
                    raise FrameError(f"frame {frame.id}: {w} x {h} pixels exceed the limit of "
                                     f"{self.settings.max_pixels}")
                im.load()
                return _pil_to_rgb(im)
        except FrameError:
            raise
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
            raise FrameError(f"frame {frame.id}: unreadable or corrupt image ({exc})") from None

    def classify(self, image: np.ndarray) -> np.ndarray:
        """Class probabilities ``(n_classes,)`` of one decoded frame (the service's backend)."""
        from fetalscan.inference.predict import probabilities_of_arrays

        return probabilities_of_arrays(self.loaded, [image], self.analyzer.device)[0]

    def plane(self, image: np.ndarray):
        from fetalscan.quality.planes import classify_planes

        return classify_planes([image], self.analyzer.device)[0]

    def heatmap_png(self, image: np.ndarray) -> tuple[bytes, str]:
        """The heatmap overlay (PNG) of one frame and the class it explains."""
        from fetalscan.explain.cams import ExplainConfig, explain_arrays, overlay, png_bytes

        lock = getattr(self.analyzer, "_lock", None) or threading.Lock()
        with lock:  # CAM hooks are per model: one heatmap at a time, as the study analysis does
            exp = explain_arrays(self.loaded, [image], ExplainConfig(method=self.settings.heatmap_method),
                                 self.analyzer.device)[0]
        return png_bytes(overlay(image, exp.heatmap, alpha=0.5)), str(getattr(exp, "target", ""))

    def analyse(self, frame: Frame, options: dict) -> tuple[dict, np.ndarray]:
        """The result message of one frame (without the timing and drop fields) and its pixels."""
        image = self.decode(frame)
        started = time.perf_counter()
        probs = self.classify(image)
        result: dict[str, Any] = {
            "probabilities": {c: float(p) for c, p in zip(self.classes, probs)},
            "prediction": self.classes[int(np.argmax(probs))],
            "plane": None, "plane_confidence": None, "brain_plane": None,
        }
        if options.get("plane"):
            res = self.plane(image)
            result.update(plane=res.plane, plane_confidence=float(res.confidence), brain_plane=bool(res.is_brain))
        result["inference_ms"] = round((time.perf_counter() - started) * 1000.0, 2)
        return result, image


def add_routes(app: FastAPI, ctx) -> None:
    """Add ``/api/v1/stream`` (see the module docstring) to the service."""
    app.state.stream = FrameAnalyzer(ctx)

    @app.websocket(STREAM_PATH)
    async def stream(websocket: WebSocket) -> None:
        await _serve_stream(websocket, websocket.app.state.stream, ctx.settings)


def _offered(websocket: WebSocket) -> list[str]:
    raw = websocket.headers.get("sec-websocket-protocol", "")
    return [p.strip() for p in raw.split(",") if p.strip()]


async def _authenticate(websocket: WebSocket, settings) -> bool:
    """Accept the connection and check the token (subprotocol or first message); close 1008 if wrong."""
    offered = _offered(websocket)
    await websocket.accept(subprotocol=SUBPROTOCOL if SUBPROTOCOL in offered else None)
    if not settings.auth_enabled:
        return True
    token = next((p[len(TOKEN_PROTOCOL_PREFIX):] for p in offered if p.startswith(TOKEN_PROTOCOL_PREFIX)), None)
    if token is None:
        try:
            message = await asyncio.wait_for(websocket.receive(), AUTH_TIMEOUT_S)
        except asyncio.TimeoutError:
            message = {}
        if message.get("type") == "websocket.disconnect":
            return False
        try:
            body = json.loads(message.get("text") or "")
            token = body.get("token") if isinstance(body, dict) and body.get("type") == "auth" else None
        except ValueError:
            token = None
    if not token_matches(token, settings.token or ""):
        log.warning("stream connection refused: missing or wrong access token")
        await websocket.close(code=POLICY_VIOLATION, reason="missing or wrong access token: send "
                              f"the subprotocol '{TOKEN_PROTOCOL_PREFIX}<token>' or a first message "
                              '{"type": "auth", "token": "<token>"}')
        return False
    return True


def _parse_frame(data: bytes, default_id: int, received: float) -> Frame:
    """A :class:`Frame` from a binary message: plain image bytes, or the framed header + bytes."""
    if data[:4] != HEADER_MAGIC:
        return Frame(default_id, data, received)
    if len(data) < 8:
        raise FrameError(f"frame {default_id}: a framed message needs 4 bytes of header length after {HEADER_MAGIC!r}")
    (n,) = struct.unpack(">I", data[4:8])
    if n > MAX_HEADER_BYTES or 8 + n > len(data):
        raise FrameError(f"frame {default_id}: header length {n} is larger than the message or than "
                         f"{MAX_HEADER_BYTES} bytes")
    try:
        header = json.loads(data[8:8 + n].decode("utf-8"))
        if not isinstance(header, dict):
            raise ValueError("not an object")
    except ValueError as exc:
        raise FrameError(f"frame {default_id}: the header is not a JSON object ({exc})") from None
    frame_id = header.get("id", default_id)
    if not isinstance(frame_id, (int, str)) or len(str(frame_id)) > 64:
        raise FrameError(f"frame {default_id}: 'id' must be a number or a short string")
    return Frame(frame_id, data[8 + n:], received, header.get("t"), bool(header.get("heatmap", False)))


async def _serve_stream(websocket: WebSocket, engine: FrameAnalyzer, settings) -> None:
    if not await _authenticate(websocket, settings):
        return
    send_lock = asyncio.Lock()

    async def send(message: dict) -> None:
        async with send_lock:
            await websocket.send_text(json.dumps(message, allow_nan=False, default=str))

    mailbox = Mailbox()
    options: dict[str, Any] = {"plane": False}
    last: dict[str, Any] = {"image": None, "frame": None}
    counters = {"received": 0, "analysed": 0}

    async def heatmap_of(frame_id, image) -> None:
        try:
            png, target = await asyncio.to_thread(engine.heatmap_png, image)
        except Exception as exc:  # noqa: BLE001 - a failure inside the heatmap library: say so, keep serving
            log.exception("stream: heatmap failed")
            await send({"type": "error", "frame": frame_id, "detail": f"the heatmap of frame {frame_id} failed "
                        f"({type(exc).__name__})"})
            return
        await send({"type": "heatmap", "frame": frame_id, "png_base64": base64.b64encode(png).decode("ascii"),
                    "method": settings.heatmap_method, "target": target, "disclaimer": HEATMAP_DISCLAIMER})

    async def worker() -> None:
        while True:
            kind, frame, dropped = await mailbox.take()
            if kind == "closed":
                return
            if kind == "heatmap":
                if last["image"] is None:
                    await send({"type": "error", "frame": None, "detail": "no frame analysed yet: send a frame "
                                "before asking for its heatmap"})
                else:
                    await heatmap_of(last["frame"], last["image"])
                continue
            try:
                result, image = await asyncio.to_thread(engine.analyse, frame, dict(options))
            except FrameError as exc:
                await send({"type": "error", "frame": frame.id, "detail": str(exc), "dropped": dropped,
                            "dropped_total": mailbox.dropped_total})
                continue
            except Exception as exc:  # noqa: BLE001 - a failure inside the model: say so, keep serving
                log.exception("stream: analysis of a frame failed")
                await send({"type": "error", "frame": frame.id, "detail": f"the analysis of frame {frame.id} failed "
                            f"inside the model ({type(exc).__name__})", "dropped": dropped,
                            "dropped_total": mailbox.dropped_total})
                continue
            counters["analysed"] += 1
            last["image"], last["frame"] = image, frame.id
            await send({"type": "result", "frame": frame.id, **result,
                        "latency_ms": round((time.perf_counter() - frame.received) * 1000.0, 2),
                        "dropped": dropped, "dropped_total": mailbox.dropped_total,
                        "analysed": counters["analysed"], "t": frame.client_time})
            if frame.heatmap:
                await heatmap_of(frame.id, image)

    await send({"type": "ready", "protocol": SUBPROTOCOL, "classes": engine.classes,
                "model": engine.analyzer.model_info().get("name"), "model_sha256": engine.analyzer.model_sha256,
                "backend": await asyncio.to_thread(engine.backend), "max_pixels": settings.max_pixels,
                "max_frame_mb": settings.max_file_mb, "disclaimer": DISCLAIMER})
    task = asyncio.create_task(worker())
    try:
        while True:
            message = await websocket.receive()
            if message["type"] == "websocket.disconnect":
                break
            received = time.perf_counter()
            data = message.get("bytes")
            if data is not None:
                index = counters["received"]
                counters["received"] += 1
                try:
                    frame = _parse_frame(data, index, received)
                    if len(frame.data) > settings.max_file_bytes:
                        raise FrameError(f"frame {frame.id}: {len(frame.data) / 2**20:.1f} MiB exceeds the limit of "
                                         f"{settings.max_file_mb:g} MiB")
                    if not (frame.data.startswith(_JPEG) or frame.data.startswith(_PNG)):
                        raise FrameError(f"frame {frame.id}: not a JPEG or PNG image (send each frame as JPEG or "
                                         "PNG bytes, optionally after a FSF1 header)")
                except FrameError as exc:
                    await send({"type": "error", "frame": _frame_id(exc, index), "detail": str(exc)})
                    continue
                mailbox.put(frame)
                continue
            await _control(message.get("text") or "", send, mailbox, options, counters)
    except WebSocketDisconnect:
        pass
    finally:
        mailbox.close()
        task.cancel()
        try:
            await task
        except (asyncio.CancelledError, Exception):  # noqa: BLE001 - the client is gone; nothing to tell
            pass


def _frame_id(exc: FrameError, default: int):
    text = str(exc)
    if text.startswith("frame "):
        head = text[6:].split(":", 1)[0]
        return int(head) if head.isdigit() else head
    return default


async def _control(text: str, send, mailbox: Mailbox, options: dict, counters: dict) -> None:
    """A text message: options, heatmap, ping (auth again is ignored)."""
    try:
        body = json.loads(text)
        kind = body.get("type") if isinstance(body, dict) else None
    except ValueError:
        kind, body = None, {}
    if kind == "ping":
        await send({"type": "pong", "received": counters["received"], "dropped_total": mailbox.dropped_total})
    elif kind == "options":
        if "plane" in body:
            options["plane"] = bool(body["plane"])
        await send({"type": "options", "plane": options["plane"]})
    elif kind == "heatmap":
        mailbox.want_heatmap()
    elif kind == "auth":
        pass
    else:
        await send({"type": "error", "frame": None, "detail": "unknown message: send frames as binary messages, and "
                    "text messages {\"type\": \"options\" | \"heatmap\" | \"ping\"}"})
