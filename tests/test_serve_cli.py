"""``fetalscan serve``: flags -> ServeSettings -> one call of ``fetalscan.serve.run``; the token shown once."""

from __future__ import annotations

from pathlib import Path

import pytest

from fetalscan.cli import main
from fetalscan.serve.settings import TOKEN_ENV


@pytest.fixture
def captured(monkeypatch):
    """Replace the server by a recorder of the settings it would have served."""
    from fetalscan import serve

    seen = []
    def fake_run(settings, on_ready=None):
        seen.append(settings)
        if on_ready is not None:
            on_ready()

    monkeypatch.setattr(serve, "run", fake_run)
    return seen


@pytest.fixture
def model_file(tmp_path) -> Path:
    path = tmp_path / "m.pt"
    path.write_bytes(b"not read by the CLI")  # the CLI checks it exists; the app loads it
    return path


def test_without_a_model_it_says_to_run_make_demo(tmp_path, monkeypatch, capsys, captured):
    monkeypatch.chdir(tmp_path)
    assert main(["serve"]) == 2
    err = capsys.readouterr().err
    assert "run `make demo` first or pass --model" in err and not captured


def test_the_demo_model_is_the_default(tmp_path, monkeypatch, capsys, captured):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs" / "demo").mkdir(parents=True)
    (tmp_path / "runs" / "demo" / "model.pt").write_bytes(b"x")
    monkeypatch.setenv(TOKEN_ENV, "from-the-environment-0123456789")
    assert main(["serve"]) == 0
    assert "open http://127.0.0.1:8000/" in capsys.readouterr().out
    assert captured[0].model == Path("runs/demo/model.pt")
    assert captured[0].host == "127.0.0.1" and captured[0].port == 8000


def test_a_generated_token_is_printed_once_and_an_environment_token_never(model_file, monkeypatch, capsys,
                                                                          captured):
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    assert main(["serve", "--model", str(model_file)]) == 0
    out = capsys.readouterr().out
    token = captured[0].token
    assert token and len(token) >= 32 and out.count(token) == 1 and "access token" in out
    monkeypatch.setenv(TOKEN_ENV, "my-own-secret-token-0123456789")
    assert main(["serve", "--model", str(model_file)]) == 0
    out = capsys.readouterr().out
    assert captured[1].token == "my-own-secret-token-0123456789" and "my-own-secret" not in out
    assert f"from {TOKEN_ENV}" in out


def test_flags_map_onto_the_settings(model_file, tmp_path, monkeypatch, captured):
    monkeypatch.setenv(TOKEN_ENV, "x" * 20)
    seg = tmp_path / "seg.pt"
    assert main(["serve", "--model", str(model_file), "--biometry-model", str(seg), "--port", "8123",
                 "--db", str(tmp_path / "r.sqlite"), "--device", "cpu", "--max-request-mb", "10",
                 "--max-file-mb", "5", "--max-files", "3", "--max-pixels", "1000", "--max-frames", "4",
                 "--max-images", "9", "--max-studies", "2", "--aggregate", "vote",
                 "--cors-origin", "https://a.example.org"]) == 0
    s = captured[0]
    assert (s.biometry_model, s.port, s.db, s.device) == (seg, 8123, tmp_path / "r.sqlite", "cpu")
    assert (s.max_request_mb, s.max_file_mb, s.max_files, s.max_pixels) == (10, 5, 3, 1000)
    assert (s.max_frames, s.max_images, s.max_studies, s.aggregate) == (4, 9, 2, "vote")
    assert s.cors_origins == ["https://a.example.org"] and s.insecure_local is False


def test_insecure_local_is_refused_off_loopback_and_announced_on_it(model_file, monkeypatch, capsys, captured):
    assert main(["serve", "--model", str(model_file), "--insecure-local", "--host", "0.0.0.0"]) == 2
    assert "loopback" in capsys.readouterr().err and not captured
    assert main(["serve", "--model", str(model_file), "--insecure-local"]) == 0
    err = capsys.readouterr().err
    assert "authentication is OFF" in err and captured[0].token is None and captured[0].insecure_local


def test_a_public_host_gets_a_plain_http_warning(model_file, monkeypatch, capsys, captured):
    monkeypatch.setenv(TOKEN_ENV, "x" * 20)
    assert main(["serve", "--model", str(model_file), "--host", "0.0.0.0"]) == 0
    assert "TLS reverse proxy" in capsys.readouterr().err


def test_a_short_environment_token_is_refused(model_file, monkeypatch, capsys, captured):
    monkeypatch.setenv(TOKEN_ENV, "short")
    assert main(["serve", "--model", str(model_file)]) == 2
    assert "at least 16" in capsys.readouterr().err and not captured


def test_a_missing_model_file_is_a_clear_error(tmp_path, capsys, captured):
    assert main(["serve", "--model", str(tmp_path / "nope.pt")]) == 2
    assert "nope.pt: file not found" in capsys.readouterr().err
