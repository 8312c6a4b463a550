"""Bad inputs a new user tries (issue 15, item 5): each is one clear error line and exit 2 before any
work, or a stated warning, and nothing already written is lost."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import blob_image, write_manifest, write_png
from test_biometry import _hc18_like

from fetalscan.cli import main
from fetalscan.data.records import load_dataset
from fetalscan.errors import DataError, FetalscanError, OutputError
from fetalscan.fileio import LOCK_FILE, check_out_dir, check_writable


def _run(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def _labelled(tmp_path: Path, labels: dict[str, str], name: str = "m.csv", extra_rows=()) -> Path:
    """A manifest with one image per group: ``{group: label}``."""
    rows = []
    for k, (group, label) in enumerate(labels.items()):
        write_png(tmp_path / f"{group}.png", blob_image(k, bright=label.lower() != "normal"))
        rows.append({"path": f"{group}.png", "label": label, "group": group})
    return write_manifest(tmp_path / name, [*rows, *extra_rows], ["path", "label", "group"])


def _one_error_line(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and "Traceback" not in err, err
    return lines[0]


# --------------------------------------------------------------------------- --out that cannot be written
@pytest.fixture
def a_file(tmp_path: Path) -> Path:
    path = tmp_path / "notes.txt"
    path.write_text("precious")
    return path


@pytest.mark.parametrize("command", ["predict", "cv", "train", "evaluate", "explain", "biometry"])
def test_out_under_a_file_is_one_error_naming_the_file_before_any_work(command, tmp_path, a_file, toy_manifest,
                                                                        tiny_classifier, capsys):
    m = toy_manifest(groups=3, per_group=1)
    out = a_file / "run"
    argv = {
        "predict": ["predict", "--model", tiny_classifier, "--data", m, "--out", out],
        "cv": ["cv", "--data", m, "--folds", "3", "--out", out],
        "train": ["train", "--data", m, "--out", out],
        "evaluate": ["evaluate", "--model", tiny_classifier, "--data", m, "--out", out],
        "explain": ["explain", "--model", tiny_classifier, "--images", m.parent / "normal", "--out", out],
        "biometry": ["biometry", "train", "--data", _hc18_like(tmp_path / "hc", n=4), "--out", out],
    }[command]
    code, _, err = _run(capsys, *argv, "--no-progress") if command != "explain" else _run(capsys, *argv)
    assert code == 2
    line = _one_error_line(err)
    assert str(a_file) in line and "is a file" in line, line
    assert a_file.read_text() == "precious"


@pytest.fixture
def immutable(tmp_path: Path):
    """A folder made immutable with ``chattr +i`` (the only way to refuse writes to root); skips without it."""
    made = []

    def make(folder: Path) -> Path:
        folder.mkdir(parents=True, exist_ok=True)
        try:
            done = subprocess.run(["chattr", "+i", str(folder)], capture_output=True)
        except FileNotFoundError:
            pytest.skip("chattr is not available")
        if done.returncode != 0:
            pytest.skip(f"chattr +i is not permitted here: {done.stderr.decode().strip()}")
        made.append(folder)
        return folder

    yield make
    for folder in made:
        subprocess.run(["chattr", "-i", str(folder)], check=False)


def test_out_in_an_immutable_folder_is_refused_before_any_work(tmp_path, immutable, toy_manifest, tiny_classifier,
                                                               capsys):
    m = toy_manifest(groups=3, per_group=1)
    locked = immutable(tmp_path / "locked")
    for argv in (["predict", "--model", tiny_classifier, "--data", m, "--out", locked / "run"],
                 ["cv", "--data", m, "--folds", "3", "--out", locked / "run"],
                 ["predict", "--model", tiny_classifier, "--data", m, "--out", locked, "--overwrite"]):
        code, _, err = _run(capsys, *argv, "--no-progress")
        assert code == 2
        line = _one_error_line(err)
        assert "not writable" in line and str(locked) in line, line


def test_report_into_an_immutable_run_is_refused_and_its_files_kept(tmp_path, immutable, toy_manifest,
                                                                    tiny_classifier, capsys):
    m = toy_manifest(groups=3, per_group=1)
    run = tmp_path / "ext"
    code, _, err = _run(capsys, "evaluate", "--model", tiny_classifier, "--data", m, "--out", run, "--n-boot", "10",
                        "--no-shortcut", "--n-perm", "10", "--no-progress")
    assert code == 0, err
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    immutable(run)
    code, _, err = _run(capsys, "report", run, "--n-boot", "10", "--no-shortcut", "--no-progress")
    assert code == 2 and "not writable" in _one_error_line(err)
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == before


def test_a_folder_the_user_may_not_write_is_named(tmp_path, monkeypatch):
    """What a non-root user meets in a read-only folder (``os.access`` says no), checked without root's powers."""
    real = os.access
    ro = tmp_path / "ro"
    ro.mkdir()
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: False if Path(p) == ro else real(p, mode, **kw))
    with pytest.raises(OutputError, match="ro is not writable"):
        check_out_dir(ro / "deep" / "run")
    (tmp_path / "x.txt").write_text("x")
    with pytest.raises(OutputError, match="x.txt is a file"):
        check_writable(tmp_path / "x.txt" / "sub")


# --------------------------------------------------------------------------- manifests
def test_repeated_manifest_rows_are_an_error_naming_the_lines(tmp_path, capsys):
    m = _labelled(tmp_path, {"a": "normal", "b": "abnormal", "c": "normal"},
                  extra_rows=[{"path": "a.png", "label": "normal", "group": "a"},
                              {"path": "./b.png", "label": "abnormal", "group": "b"}])
    with pytest.raises(DataError, match=r"2 repeated row\(s\): line 5 repeats line 2 \(a\.png\); line 6 repeats "
                                        r"line 3"):
        load_dataset(m)
    code, _, err = _run(capsys, "cv", "--data", m, "--out", tmp_path / "o", "--no-progress")
    assert code == 2 and "repeats line 2" in _one_error_line(err)
    assert not (tmp_path / "o").exists()


def test_labels_differing_only_in_case_are_an_error_naming_both(tmp_path):
    m = _labelled(tmp_path, {"a": "normal", "b": "abnormal", "c": "Normal"})
    with pytest.raises(DataError) as info:
        load_dataset(m)
    text = str(info.value)
    assert "'normal'" in text and "'Normal'" in text and "line 2" in text and "line 4" in text, text
    # a folder tree with Normal/ and normal/ alike
    for k, cls in enumerate(("Normal", "normal")):
        write_png(tmp_path / "tree" / cls / f"x{k}.png", blob_image(k))
    with pytest.raises(DataError, match="differ only in case"):
        load_dataset(tmp_path / "tree")


def test_a_class_named_in_classes_without_images_is_an_error(tmp_path, capsys):
    m = _labelled(tmp_path, {"a": "normal", "b": "abnormal"})
    with pytest.raises(DataError, match=r"class\(es\) \['cyst'\] .* have no images"):
        load_dataset(m, classes=["normal", "abnormal", "cyst"])
    assert load_dataset(m, classes=["normal", "abnormal"]).classes == ["normal", "abnormal"]
    code, _, err = _run(capsys, "train", "--data", m, "--classes", "normal,abnormal,cyst", "--out", tmp_path / "o")
    assert code == 2 and "'cyst'" in _one_error_line(err)


# --------------------------------------------------------------------------- options checked before work
def test_n_boot_0_is_refused_before_training_and_writes_nothing(tmp_path, toy_manifest, capsys, monkeypatch):
    from fetalscan import api
    from fetalscan.evaluation.config import EvaluationConfig

    m = toy_manifest(groups=3, per_group=1)
    out = tmp_path / "run"
    code, _, err = _run(capsys, "cv", "--data", m, "--folds", "3", "--n-boot", "0", "--out", out, "--no-progress")
    assert code == 2 and "n_boot" in _one_error_line(err)
    assert not out.exists()

    def no_training(*args, **kwargs):
        raise AssertionError("training started before the options were checked")

    monkeypatch.setattr(api, "run_cv", no_training)
    with pytest.raises(FetalscanError, match="n_boot"):
        api.run_study(load_dataset(m), api.TrainConfig(), api.CVConfig(folds=3), EvaluationConfig(n_boot=0), out)
    assert not out.exists()


def test_biometry_n_boot_0_is_refused_before_training(tmp_path, capsys):
    from fetalscan.report.biometry import cross_validate_to_folder

    with pytest.raises(FetalscanError, match="--n-boot"):
        cross_validate_to_folder([], _biometry_config(), tmp_path / "o", n_boot=0)
    assert not (tmp_path / "o").exists()


def _biometry_config(**kw):
    from fetalscan.biometry.training import BiometryTrainConfig

    return BiometryTrainConfig(input_height=32, input_width=64, **kw)


# --------------------------------------------------------------------------- stated warnings
def test_evaluate_names_labels_the_model_does_not_know_on_the_console_and_in_metrics(tmp_path, tiny_classifier,
                                                                                     capsys):
    labels = {f"n{g}": "normal" for g in range(3)} | {f"a{g}": "abnormal" for g in range(3)}
    m = _labelled(tmp_path, labels | {"c0": "cyst", "c1": "cyst"})
    out = tmp_path / "ext"
    code, _, err = _run(capsys, "evaluate", "--model", tiny_classifier, "--data", m, "--out", out, "--n-boot", "10",
                        "--no-shortcut", "--n-perm", "10", "--no-progress")
    assert code == 0, err
    warning = next(ln for ln in err.splitlines() if "cyst" in ln)
    assert warning.startswith("warning:") and "'cyst' (2 images)" in warning and "unscored" in warning, err
    metrics = json.loads((out / "metrics.json").read_text())
    assert any("'cyst' (2 images)" in n for n in metrics["task"]["notes"])
    assert metrics["external"]["unknown_label_images"] == {"cyst": 2}


def test_a_tiny_image_is_classified_with_a_warning_naming_it(tmp_path, tiny_classifier, capsys):
    from fetalscan.data.records import MIN_IMAGE_SIDE

    write_png(tmp_path / "dot.png", np.full((1, 1, 3), 128, np.uint8))
    write_png(tmp_path / "fine.png", blob_image(3, size=MIN_IMAGE_SIDE))
    code, _, err = _run(capsys, "predict", "--model", tiny_classifier, "--data", tmp_path / "dot.png",
                        "--out", tmp_path / "o1", "--no-progress")
    assert code == 0 and (tmp_path / "o1" / "predictions.csv").is_file()
    assert "warning:" in err and "dot.png is only 1 x 1 pixels" in err and f"minimum of {MIN_IMAGE_SIDE}" in err
    code, _, err = _run(capsys, "predict", "--model", tiny_classifier, "--data", tmp_path / "fine.png",
                        "--out", tmp_path / "o2", "--no-progress")
    assert code == 0 and "pixels" not in err


# --------------------------------------------------------------------------- biometry batch larger than the data
def test_one_cycle_schedule_survives_step_counts_that_broke_torch():
    import torch

    from fetalscan.biometry.training import effective_batch_size, one_cycle

    for steps in (1, 2, 9, 10, 11, 20):
        opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
        sched = one_cycle(opt, 1e-3, steps)
        for _ in range(steps):
            opt.step()
            sched.step()
    assert effective_batch_size(10, 64) == 10 and effective_batch_size(10, 4) == 4
    with pytest.raises(FetalscanError, match="at least 2 training images"):
        effective_batch_size(1, 8)


@pytest.mark.slow
def test_biometry_train_with_a_batch_larger_than_the_data_trains_with_a_warning(tmp_path, capsys):
    m = _hc18_like(tmp_path, n=12)
    code, _, err = _run(capsys, "biometry", "train", "--data", m, "--out", tmp_path / "bio", "--batch-size", "64",
                        "--epochs", "10", "--input-height", "32", "--input-width", "64", "--no-augment",
                        "--no-progress")
    assert code == 0, err
    assert "--batch-size 64 is larger than the" in err and (tmp_path / "bio" / "model.pt").is_file()


# --------------------------------------------------------------------------- two runs, one --out
_HOLDER = """
import sys
from fetalscan.fileio import lock_out_dir, unfinished_marker
with unfinished_marker("fetalscan cv --out held"):
    lock_out_dir(sys.argv[1])
    print("locked", flush=True)
    sys.stdin.readline()
"""


def test_a_second_run_into_the_same_out_is_refused_naming_the_first(tmp_path, tiny_classifier, toy_manifest, capsys):
    m = toy_manifest(groups=3, per_group=1)
    out = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", _HOLDER, str(out)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        code, _, err = _run(capsys, "predict", "--model", tiny_classifier, "--data", m, "--out", out, "--no-progress")
        assert code == 2
        line = _one_error_line(err)
        assert "in use by another run" in line and f"pid {holder.pid}" in line and "fetalscan cv --out held" in line
        assert sorted(p.name for p in out.iterdir()) == [LOCK_FILE]  # nothing of the refused run
    finally:
        holder.communicate("\n", timeout=60)
    assert not out.exists()  # the holder wrote nothing: its folder and lock are gone
    code, _, err = _run(capsys, "predict", "--model", tiny_classifier, "--data", m, "--out", out, "--no-progress")
    assert code == 0, err
    assert (out / "predictions.csv").is_file() and not (out / LOCK_FILE).exists()


def test_a_stale_lock_of_a_dead_run_is_taken_over_with_a_warning(tmp_path, tiny_classifier, toy_manifest, capsys):
    m = toy_manifest(groups=3, per_group=1)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    out = tmp_path / "run"
    out.mkdir()
    (out / LOCK_FILE).write_text(json.dumps({"pid": int(dead.stdout), "command": "fetalscan predict --out run",
                                             "started": "2026-01-01T00:00:00+00:00"}))
    code, _, err = _run(capsys, "predict", "--model", tiny_classifier, "--data", m, "--out", out, "--no-progress")
    assert code == 0, err
    assert "no longer running" in err and f"pid {int(dead.stdout)}" in err
    assert (out / "predictions.csv").is_file() and not (out / LOCK_FILE).exists()
