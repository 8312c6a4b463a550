"""The service's audit trail (issue 15, item 6): hash-chained JSON lines, atomic appends, and
``fetalscan audit verify`` finding every kind of tampering, naming the first bad line."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from conftest import blob_image

from fetalscan.cli import build_parser, main
from fetalscan.serve.audit import FIELDS, GENESIS, AuditError, AuditLog, entry_hash, head_path, token_actor, verify


def _log(tmp_path: Path, n: int = 5) -> Path:
    log = AuditLog(tmp_path / "audit.jsonl")
    for i in range(n):
        log.append(actor=f"reader{i % 2}", action="review" if i % 2 else "analyze", study_id=f"{i:032x}",
                   details={"n_files": i, "prediction": "normal"})
    return log.path


def _lines(path: Path) -> list[str]:
    return path.read_text(encoding="utf-8").splitlines(keepends=True)


def _write(path: Path, lines: list[str]) -> None:
    path.write_text("".join(lines), encoding="utf-8")


def _verify_cli(capsys, *argv) -> tuple[int, str, str]:
    code = main(["audit", "verify", *map(str, argv)])
    out, err = capsys.readouterr()
    return code, out, err


def test_entries_are_chained_with_sha256_over_their_canonical_json(tmp_path):
    path = _log(tmp_path, 3)
    entries = [json.loads(line) for line in _lines(path)]
    assert [list(e) for e in entries] == [list(FIELDS)] * 3
    assert [e["seq"] for e in entries] == [1, 2, 3]
    assert entries[0]["prev_hash"] == GENESIS
    for before, entry in zip(entries, entries[1:]):
        assert entry["prev_hash"] == before["hash"]
    import hashlib

    body = {k: v for k, v in entries[1].items() if k != "hash"}
    expected = hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
    assert entries[1]["hash"] == expected == entry_hash(entries[1])
    assert json.loads(head_path(path).read_text()) == {"seq": 3, "hash": entries[2]["hash"]}


def test_an_intact_log_verifies_with_exit_0_and_prints_its_head(tmp_path, capsys):
    path = _log(tmp_path)
    code, out, _ = _verify_cli(capsys, path)
    head = json.loads(_lines(path)[-1])["hash"]
    assert code == 0 and "intact, 5 entries" in out and head in out
    assert _verify_cli(capsys, path, "--expect-head", head)[0] == 0


def _edit(lines: list[str], i: int, rehash: bool) -> list[str]:
    entry = json.loads(lines[i])
    entry["details"]["prediction"] = "abnormal"
    if rehash:
        entry["hash"] = entry_hash(entry)
    return lines[:i] + [json.dumps(entry) + "\n"] + lines[i + 1:]


def _forged(after: str) -> str:
    prev = json.loads(after)
    entry = {"seq": prev["seq"] + 1, "time_utc": prev["time_utc"], "actor": "intruder", "action": "review",
             "study_id": prev["study_id"], "details": {}, "prev_hash": prev["hash"]}
    entry["hash"] = entry_hash(entry)
    return json.dumps(entry) + "\n"


TAMPERING = {
    # name: (how the lines change, first bad line, words of the message)
    "edited": (lambda ls: _edit(ls, 1, rehash=False), 2, "edited"),
    "edited_and_rehashed": (lambda ls: _edit(ls, 1, rehash=True), 3, "prev_hash does not match the hash of line 2"),
    "inserted": (lambda ls: ls[:2] + [_forged(ls[1])] + ls[2:], 4, "seq 3 where 4 was expected"),
    "deleted_middle": (lambda ls: ls[:2] + ls[3:], 3, "seq 4 where 3 was expected"),
    "deleted_first": (lambda ls: ls[1:], 1, "seq 2 where 1 was expected"),
    "reordered": (lambda ls: [ls[0], ls[2], ls[1], *ls[3:]], 2, "seq 3 where 2 was expected"),
    "truncated_tail": (lambda ls: ls[:3], 4, "truncated"),
    "cut_mid_line": (lambda ls: ls[:4] + [ls[4][:40]], 5, "incomplete"),
}


@pytest.mark.parametrize("name", list(TAMPERING))
def test_tampering_is_found_and_its_first_bad_line_named(tmp_path, capsys, name):
    path = _log(tmp_path)
    change, line, words = TAMPERING[name]
    _write(path, change(_lines(path)))
    result = verify(path)
    assert not result.ok and result.bad_line == line and words in result.problem, result.message()
    code, _, err = _verify_cli(capsys, path)
    assert code == 2 and f"line {line}:" in err and words in err, err


def test_tail_truncation_needs_a_head_recorded_outside_the_log(tmp_path, capsys):
    """A log cut at its end is still a valid chain: only the head file, or a head hash kept elsewhere, shows it."""
    path = _log(tmp_path)
    head = json.loads(_lines(path)[-1])["hash"]
    _write(path, _lines(path)[:3])
    assert _verify_cli(capsys, path, "--no-head-file")[0] == 0  # the chain alone cannot tell
    code, _, err = _verify_cli(capsys, path, "--no-head-file", "--expect-head", head)
    assert code == 2 and "line 4:" in err and "cut off its end" in err
    head_path(path).unlink()  # the head file deleted along with the entries: the external head still tells
    assert _verify_cli(capsys, path, "--expect-head", head)[0] == 2


def test_appends_from_threads_and_processes_make_one_chain(tmp_path):
    path = tmp_path / "audit.jsonl"
    script = ("import sys; from fetalscan.serve.audit import AuditLog\n"
              "log = AuditLog(sys.argv[1])\n"
              "for i in range(15): log.append(actor='proc', action='analyze', study_id=None, details={'i': i})\n")
    proc = subprocess.Popen([sys.executable, "-c", script, str(path)])
    log = AuditLog(path)

    def work(k: int) -> None:
        for i in range(10):
            log.append(actor=f"thread{k}", action="review", study_id=None, details={"i": i})

    threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert proc.wait(timeout=120) == 0
    result = verify(path)
    assert result.ok and result.n_entries == 55, result.message()


def test_a_damaged_last_line_stops_appends_instead_of_chaining_onto_it(tmp_path):
    path = _log(tmp_path, 2)
    with open(path, "a", encoding="utf-8") as fh:
        fh.write('{"seq": 3, "half a line')
    size = path.stat().st_size
    with pytest.raises(AuditError, match="damaged at its last line"):
        AuditLog(path).append(actor="a", action="analyze")
    assert path.stat().st_size == size


def test_token_actor_is_a_fingerprint_not_the_token():
    token = "test-token-0123456789abcdef"
    actor = token_actor(token)
    assert actor.startswith("token:") and token not in actor and len(actor) == len("token:") + 12
    assert token_actor(None).startswith("local")


def test_serve_has_an_audit_log_option_and_a_default_beside_the_database(tmp_path):
    from fetalscan.serve.settings import ServeSettings

    assert ServeSettings(db=tmp_path / "db" / "r.sqlite").audit_log_path == tmp_path / "db" / "audit.jsonl"
    assert ServeSettings(audit_log=tmp_path / "a.jsonl").audit_log_path == tmp_path / "a.jsonl"
    args = build_parser().parse_args(["serve", "--audit-log", str(tmp_path / "a.jsonl")])
    assert args.audit_log == tmp_path / "a.jsonl"


# --------------------------------------------------------------------------- the service writes it
def _png(array: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def test_the_service_records_analyses_and_reviews_without_file_names_or_token(tiny_classifier, tmp_path):
    pytest.importorskip("fastapi")
    pytest.importorskip("httpx")
    from fastapi.testclient import TestClient

    from fetalscan.serve import ServeSettings, create_app

    token = "audit-token-0123456789abcdef"
    auth = {"Authorization": f"Bearer {token}"}
    settings = ServeSettings(model=tiny_classifier, token=token, db=tmp_path / "serve" / "reviews.sqlite",
                             device="cpu", warm_up=False)
    client = TestClient(create_app(settings))
    files = [("files", ("Doe_Jane_MRN12345.png", _png(blob_image(k)), "image/png")) for k in range(2)]
    r = client.post("/api/v1/analyze", files=files, headers=auth)
    assert r.status_code == 200, r.text
    study = r.json()["study"]
    r = client.post(f"/api/v1/studies/{study['id']}/review", headers=auth,
                    json={"reader": "Dr Reader", "decision": "confirm", "comment": "ok"})
    assert r.status_code == 201, r.text
    path = tmp_path / "serve" / "audit.jsonl"
    entries = [json.loads(line) for line in _lines(path)]
    assert [e["action"] for e in entries] == ["analyze", "review"]
    analyze, review = entries
    assert analyze["study_id"] == review["study_id"] == study["id"]
    assert analyze["actor"] == token_actor(token)
    assert analyze["details"]["n_files"] == 2 and analyze["details"]["prediction"] == study["prediction"]
    assert review["actor"] == "Dr Reader" and review["details"]["decision"] == "confirm"
    assert review["details"]["final_class"] == study["prediction"]
    text = path.read_text()
    assert "Doe_Jane" not in text and "MRN12345" not in text and token not in text
    assert verify(path).ok
