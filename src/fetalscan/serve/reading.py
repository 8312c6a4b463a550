"""The reading app of a reader study: blinded, timed, resumable readings in the browser.

A coordinator registers a ``fetalscan reader-study create`` folder (service token); each reader
logs in with their own code from ``logins.csv`` and gets a session token; the page
(``/static/reading.html``) then shows one reading at a time from that reader's worklist.

======  ==========================================================  ==========================================
POST    ``/api/v1/reading-admin/studies``                           register a design folder (service token)
GET     ``/api/v1/reading-admin/studies/{id}/reads.csv``            export for ``reader-study analyze`` (service
                                                                    token; ``?first_reads=true`` adds the
                                                                    second-read arm's unaided first answers)
POST    ``/api/v1/reading/login``                                   ``{"code"}`` -> a reader session token
GET     ``/api/v1/reading/next``                                    the reader's current reading (or done / locked)
GET     ``/api/v1/reading/items/{pos}/images/{k}.png``              image ``k`` of the current reading's case
GET     ``/api/v1/reading/items/{pos}/ai``                          the AI output, only in an AI arm (and in the
                                                                    second-read arm only after the first answer)
GET     ``/api/v1/reading/items/{pos}/ai/{k}/heatmap.png``          the AI heatmap over image ``k`` (same rule)
POST    ``/api/v1/reading/answer``                                  ``{"position","step","answer","confidence"}``
======  ==========================================================  ==========================================

The ``/api/v1/reading/`` routes take the *reader's* session token as the bearer token (they are
exempt from the service token in :data:`fetalscan.serve.app.PUBLIC`); a reader sees only their
own current case: never its name, label or truth, never other readers' answers. Reading time is
measured on the server (:mod:`fetalscan.reader.store`). Sessions after the first open
``day`` days (the design's washout) after the reader's first answer. Answers are appended,
never edited.
"""

from __future__ import annotations

import io
import threading
from datetime import datetime, timezone
from pathlib import Path
from typing import Literal

from fastapi import Depends, HTTPException, Request
from fastapi.responses import PlainTextResponse, Response
from pydantic import BaseModel, Field

from fetalscan.errors import FetalscanError
from fetalscan.reader.store import ReadingStore
from fetalscan.serve.context import API
from fetalscan.texts import HEATMAP_DISCLAIMER

READING = f"{API}/reading"
ADMIN = f"{API}/reading-admin"


class RegisterIn(BaseModel):
    design_dir: str = Field(description="folder written by `fetalscan reader-study create`")


class LoginIn(BaseModel):
    code: str = Field(min_length=4, max_length=200, description="the reader's login code (logins.csv)")


class AnswerIn(BaseModel):
    position: int = Field(ge=0, description="the reading's position, as /next gave it")
    step: Literal["single", "first", "final"] = Field(description="as /next gave it")
    answer: str = Field(min_length=1, max_length=200, description="the reader's diagnosis (a class name)")
    confidence: float = Field(ge=0, le=100, description="0-100: how confident the case is abnormal")


def _png(data: bytes) -> Response:
    return Response(data, media_type="image/png", headers={"Cache-Control": "private, no-store"})


class _Images:
    """Case images read from the study's manifest folder, as PNG (a small in-memory cache)."""

    def __init__(self, capacity: int = 64) -> None:
        self._cache: dict[tuple[str, str], bytes] = {}
        self._lock = threading.Lock()
        self.capacity = capacity

    def png(self, manifest: str, image_id: str) -> bytes:
        key = (manifest, image_id)
        with self._lock:
            if key in self._cache:
                return self._cache[key]
        from PIL import Image

        from fetalscan.data.records import expand_file, read_record_image

        name, _, frame = image_id.partition("#")
        path = (Path(manifest).parent / name).resolve()
        records = expand_file(path, None, "case", name)
        record = next((r for r in records if (r.frame is None and not frame) or str(r.frame) == frame), records[0])
        buf = io.BytesIO()
        Image.fromarray(read_record_image(record)).save(buf, format="PNG")
        with self._lock:
            if len(self._cache) >= self.capacity:
                self._cache.pop(next(iter(self._cache)))
            self._cache[key] = buf.getvalue()
        return buf.getvalue()


def add_routes(app, ctx) -> None:
    """Add the reading app's routes (see the module docstring)."""
    store = ReadingStore(ctx.settings.db)
    app.state.reading_store = store
    images = _Images()
    ai_studies: dict[tuple[str, str], str] = {}  # (reading study, case) -> the service's analysed study id
    ai_lock = threading.Lock()

    def reader(request: Request) -> tuple[str, str]:
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        who = store.reader_of(token.strip()) if scheme.lower() == "bearer" and token.strip() else None
        if who is None:
            raise HTTPException(401, "log in with your reader code first (POST /api/v1/reading/login)",
                                headers={"WWW-Authenticate": "Bearer"})
        return who

    def current(study_id: str, name: str) -> dict:
        """The reader's current reading with its step, or a done / locked status."""
        items = store.worklist(study_id, name)
        answers = store.answered(study_id, name)
        for item in items:
            pos = item["position"]
            if item["sequential"]:
                step = "first" if (pos, "first") not in answers else "final" if (pos, "final") not in answers else None
            else:
                step = None if (pos, "single") in answers else "single"
            if step is None:
                continue
            start = store.first_answer_time(study_id, name)
            if item["day"] and start is not None and store.clock() < start + item["day"] * 86400:
                opens = datetime.fromtimestamp(start + item["day"] * 86400, timezone.utc)
                return {"status": "locked", "session": item["session"],
                        "opens_utc": opens.isoformat(timespec="minutes"), "n_done": pos, "n_total": len(items)}
            return {"status": "reading", "item": item, "step": step, "n_done": pos, "n_total": len(items)}
        return {"status": "done", "n_done": len(items), "n_total": len(items)}

    def ai_visible(item: dict, step: str) -> bool:
        return item["ai_shown"] == "from_start" or (item["ai_shown"] == "after_first_answer" and step == "final")

    def current_item(study_id: str, name: str, position: int) -> tuple[dict, str]:
        state = current(study_id, name)
        if state["status"] != "reading" or state["item"]["position"] != position:
            raise HTTPException(404, f"reading {position} is not your current reading")
        return state["item"], state["step"]

    def ai_result(study_id: str, case_name: str) -> tuple[str, dict]:
        """The service's analysis of a case (analysed once, again if its images left the memory cache)."""
        from fetalscan.serve.analysis import UploadedFile

        with ai_lock:
            sid = ai_studies.get((study_id, case_name))
            if sid is not None and ctx.cache.get(sid) is not None:
                return sid, ctx.cache.get(sid).result
            study = store.study(study_id)
            case = store.case(study_id, case_name)
            paths = list(dict.fromkeys(p.partition("#")[0] for p in case["images"]))
            root = Path(study["manifest"]).parent
            handles = [open(root / p, "rb") for p in paths]
            try:
                result = ctx.analyze([UploadedFile(f"image{k}{Path(p).suffix}", h)
                                      for k, (p, h) in enumerate(zip(paths, handles))])
            finally:
                for h in handles:
                    h.close()
            ai_studies[(study_id, case_name)] = result["study"]["id"]
            return result["study"]["id"], result

    # ------------------------------------------------------------------ coordinator
    @app.post(f"{ADMIN}/studies", tags=["reading"], dependencies=ctx.auth, status_code=201,
              summary="Register a reader-study design folder for reading")
    def register(body: RegisterIn) -> dict:
        try:
            study = store.register_study(body.design_dir)
        except FetalscanError as exc:
            raise HTTPException(422, str(exc)) from exc
        return {"id": study["id"], "classes": study["classes"]}

    @app.get(f"{ADMIN}/studies/{{study_id}}/reads.csv", tags=["reading"], dependencies=ctx.auth,
             response_class=PlainTextResponse, summary="The readings as reader,treatment,case,truth,rating,...")
    def export(study_id: str, first_reads: bool = False) -> PlainTextResponse:
        try:
            store.study(study_id)
        except FetalscanError as exc:
            raise HTTPException(404, str(exc)) from exc
        return PlainTextResponse(store.export_csv(study_id, first_reads), media_type="text/csv",
                                 headers={"Content-Disposition": 'attachment; filename="reads.csv"'})

    # ------------------------------------------------------------------ readers
    @app.post(f"{READING}/login", tags=["reading"], summary="Log in with a reader code")
    def login(body: LoginIn) -> dict:
        session = store.login(body.code.strip())
        if session is None:
            raise HTTPException(401, "unknown reader code")
        return {"token": session["token"], "reader": session["reader"]}

    @app.get(f"{READING}/next", tags=["reading"], summary="The reader's current reading")
    def next_reading(who: tuple[str, str] = Depends(reader)) -> dict:
        study_id, name = who
        state = current(study_id, name)
        out = {k: v for k, v in state.items() if k != "item"}
        out["reader"] = name
        if state["status"] != "reading":
            return out
        item, step = state["item"], state["step"]
        store.record_shown(study_id, name, item["position"], step)
        n_images = len(store.case(study_id, item["case_name"])["images"])
        base = f"{READING}/items/{item['position']}"
        out.update({"position": item["position"], "session": item["session"], "arm": item["arm"], "step": step,
                    "sequential": bool(item["sequential"]), "ai": ai_visible(item, step),
                    "images": [f"{base}/images/{k}.png" for k in range(n_images)],
                    "classes": store.study(study_id)["classes"]})
        if step == "final":
            first = store.answered(study_id, name)[(item["position"], "first")]
            out["first_answer"] = {"answer": first["answer"], "confidence": first["confidence"]}
        return out

    @app.get(f"{READING}/items/{{position}}/images/{{k}}.png", tags=["reading"], response_class=Response)
    def case_image(position: int, k: int, who: tuple[str, str] = Depends(reader)) -> Response:
        item, _ = current_item(*who, position)
        case = store.case(who[0], item["case_name"])
        if not 0 <= k < len(case["images"]):
            raise HTTPException(404, f"this case has images 0-{len(case['images']) - 1}")
        return _png(images.png(store.study(who[0])["manifest"], case["images"][k]))

    @app.get(f"{READING}/items/{{position}}/ai", tags=["reading"], summary="The AI output, in AI arms only")
    def ai_output(position: int, who: tuple[str, str] = Depends(reader)) -> dict:
        item, step = current_item(*who, position)
        if not ai_visible(item, step):
            raise HTTPException(403, "the AI output is not shown in this arm" + (" before your first answer"
                                                                               if item["sequential"] else ""))
        _, result = ai_result(who[0], item["case_name"])
        base = f"{READING}/items/{position}/ai"
        return {"prediction": result["study"]["prediction"], "probabilities": result["study"]["probabilities"],
                "heatmaps": [f"{base}/{k}/heatmap.png" for k in range(len(result["images"]))],
                "disclaimer": HEATMAP_DISCLAIMER}

    @app.get(f"{READING}/items/{{position}}/ai/{{k}}/heatmap.png", tags=["reading"], response_class=Response)
    def ai_heatmap(position: int, k: int, who: tuple[str, str] = Depends(reader)) -> Response:
        from fetalscan.serve.reports import overlay_rgb

        item, step = current_item(*who, position)
        if not ai_visible(item, step):
            raise HTTPException(403, "the AI output is not shown in this arm now")
        sid, _ = ai_result(who[0], item["case_name"])
        cached = ctx.cache.get(sid)
        if cached is None or not 0 <= k < len(cached.images):
            raise HTTPException(404, "no such heatmap")
        from PIL import Image

        buf = io.BytesIO()
        Image.fromarray(overlay_rgb(cached.images[k])).save(buf, format="PNG")
        return _png(buf.getvalue())

    @app.post(f"{READING}/answer", tags=["reading"], status_code=201, summary="Record an answer (appended)")
    def answer(body: AnswerIn, who: tuple[str, str] = Depends(reader)) -> dict:
        study_id, name = who
        item, step = current_item(study_id, name, body.position)
        if body.step != step:
            raise HTTPException(409, f"reading {body.position} expects its {step!r} answer, not {body.step!r}")
        classes = store.study(study_id)["classes"]
        if body.answer not in classes:
            raise HTTPException(422, f"answer must be one of {', '.join(classes)}; got {body.answer!r}")
        try:
            rec = store.record_answer(study_id, name, body.position, step, body.answer, body.confidence)
        except FetalscanError as exc:
            raise HTTPException(409, str(exc)) from exc
        return {"id": rec["id"], "seconds": rec["seconds"]}
