"""The console a new user meets (issue #17, items 6 and 7).

Tables are never cut at 80 columns; warnings have one style ("warning: ..."), each is shown
once (not once per frame of a cine); pydicom's and torch's own tracebacks and "please file an
issue" requests never reach the user; long work prints plain progress lines when stderr is a
log file or a pipe.
"""

from __future__ import annotations

import logging
import re
import warnings

import numpy as np
import pandas as pd
import pytest

from fetalscan import progress
from fetalscan.cli import _ui
from fetalscan.cli._ui import print_table, warn_line

LONG = ["mild_ventriculomegaly", "moderate_ventriculomegaly", "normal", "other"]
COLUMNS = ["class", "images", "sensitivity", "specificity", "AUROC", "patients", "pt sensitivity", "pt specificity"]


@pytest.mark.parametrize("width", [80, 100])
def test_per_class_table_is_never_cut(monkeypatch, capsys, width):
    monkeypatch.setattr(_ui, "_console_width", lambda stream: width)
    rows = [[c, 17, 0.529, 0.839, 0.825, 6, 0.5, 0.828] for c in LONG]
    print_table("Per class", COLUMNS, rows)
    out = capsys.readouterr().out
    assert "…" not in out
    assert max(len(line) for line in out.splitlines()) <= width
    for name in LONG + COLUMNS:
        assert re.search(rf"(?<![\w_]){re.escape(name)}(?![\w_])", out), name


def test_warnings_have_one_style_and_never_say_warning_twice(capsys):
    from fetalscan.cli._ui import console_logging

    with console_logging():
        logging.getLogger("fetalscan.evaluation.calibration").warning("temperature scaling reached its bound")
        warn_line("Warning: a classifier that sees no anatomy separates the classes")
    err = capsys.readouterr().err
    assert "WARNING" not in err and "fetalscan.evaluation.calibration" not in err
    assert "warning: temperature scaling reached its bound" in err
    assert "warning: a classifier that sees no anatomy" in err and "Warning:" not in err


def test_the_shortcut_message_does_not_start_with_warning():
    from fetalscan.evaluation.shortcut import _message

    text = _message(True, [{"metric": "macro AUROC, patient level", "probe": 0.9, "model": 0.8, "warning": True}],
                    "normal")
    assert not text.lower().startswith("warning")


def test_one_warning_per_cine_not_per_frame(capsys):
    from fetalscan.cli._ui import console_logging

    with console_logging():
        log = logging.getLogger("fetalscan.biometry.geometry")
        for frame in range(6):
            log.warning("cine.dcm#%d: pixel size unknown; HC, BPD and OFD are in pixels", frame)
        log.warning("other.png: pixel size unknown; HC, BPD and OFD are in pixels")
    err = capsys.readouterr().err
    assert sum(line.startswith("warning: cine.dcm#") for line in err.splitlines()) == 1 and "other.png" in err
    assert "repeated 5 more time(s)" in err


def test_plane_check_names_a_cine_once():
    from fetalscan.inference.predict import _plane_notes

    images = pd.DataFrame({"path": ["/x/cine.dcm"] * 6 + ["/x/a.png"], "frame": [*range(6), None],
                           "plane": ["3VV"] * 6 + ["Brain (Tv.)"], "plane_confidence": [0.34] * 6 + [0.9],
                           "brain_plane": [False] * 6 + [True]})
    (note,) = _plane_notes(images)
    assert note.count("cine.dcm") == 1 and "6 of 6 frames: 3VV x6" in note


def test_library_warnings_are_one_line_without_source_or_issue_links(capsys):
    from fetalscan.cli._ui import console_logging

    with console_logging():
        warnings.warn_explicit("Complex modules are a new feature under active development. Please file an issue "
                               "at https://github.com/pytorch/pytorch/issues/new?template=bug-report.yml if you "
                               "see one.", UserWarning,
                               "/v/lib/python3.11/site-packages/torch/nn/modules/module.py", 1357)
    err = capsys.readouterr().err
    assert err.startswith("warning: Complex modules are a new feature under active development.")
    assert "(torch)" in err and "file an issue" not in err.lower() and "site-packages" not in err
    assert "github.com" not in err and len(err.strip().splitlines()) == 1


def test_an_unexpected_library_error_is_one_line_without_traceback(monkeypatch, capsys):
    from fetalscan.cli import biometry, main

    def boom(args):
        raise RuntimeError("Reached a code path that should never be called. Please file an issue at "
                           "https://github.com/pytorch/pytorch/issues/new?template=bug-report.yml")

    monkeypatch.setattr(biometry, "cmd_view", boom)
    assert main(["view", "x.png"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: unexpected RuntimeError") and "Traceback" not in err
    assert "file an issue" not in err.lower() and "--verbose" in err


def test_cli_does_not_leave_its_logging_set_up_behind(tmp_path, capsys):
    from fetalscan.cli import main

    before = (list(logging.getLogger().handlers), warnings.showwarning, logging.getLogger().level)
    assert main(["view", str(tmp_path / "missing.png")]) == 2
    assert (list(logging.getLogger().handlers), warnings.showwarning, logging.getLogger().level) == before
    assert capsys.readouterr().err.startswith("error: ")


# --------------------------------------------------------------------------- progress without a terminal


def test_progress_prints_plain_lines_when_stderr_is_not_a_terminal(capsys, monkeypatch):
    import argparse

    from fetalscan.cli._ui import setup_progress

    try:
        setup_progress(argparse.Namespace(progress=None))  # pytest's stderr is not a terminal
        assert progress.mode() == "lines"
        for _ in progress.track(range(20), "too quick to report"):  # a short loop stays silent
            pass
        monkeypatch.setattr(progress, "LINES_AFTER_S", 0.0)  # as if the loop were long
        for _ in progress.track(range(20), "reading images"):
            pass
        progress.step("epoch 1/3: train loss 0.5")
        err = capsys.readouterr().err
        assert "reading images: 2/20" in err and "reading images: 20/20" in err and "too quick" not in err
        assert "epoch 1/3: train loss 0.5" in err and "\r" not in err
        setup_progress(argparse.Namespace(progress=False))
        progress.step("silent")
        assert capsys.readouterr().err == ""
    finally:
        progress.enable(False)


def _tiny_biometry_items(tmp_path, n=8):
    from conftest import write_manifest, write_png

    from fetalscan.data.hc18 import load_biometry_manifest

    rows = []
    yy, xx = np.mgrid[:64, :96]
    for i in range(n):
        a, b = 20 + i, 14 + i // 2
        mask = (((xx - 48) / a) ** 2 + ((yy - 32) / b) ** 2 <= 1).astype(np.uint8) * 255
        img = np.clip(40 + mask * 0.6 + np.random.default_rng(i).integers(0, 30, mask.shape), 0, 255).astype(np.uint8)
        write_png(tmp_path / f"i{i}.png", img)
        write_png(tmp_path / f"i{i}_mask.png", mask)
        rows.append({"image": f"i{i}.png", "mask": f"i{i}_mask.png", "exam": f"e{i}", "pixel_size_mm": "0.5",
                     "hc_mm": f"{np.pi * (a + b) * 0.5:.2f}"})
    return load_biometry_manifest(write_manifest(tmp_path / "m.csv", rows))


@pytest.mark.slow
def test_biometry_training_prints_a_line_per_epoch_and_per_fold(tmp_path, capsys):
    from fetalscan.biometry.training import BiometryTrainConfig, cross_validate

    items = _tiny_biometry_items(tmp_path)
    cfg = BiometryTrainConfig(input_height=32, input_width=64, epochs=2, batch_size=4, patience=5,
                              decoder_channels="8,8,8,8,8", device="cpu", augment=False)
    import torch

    threads = torch.get_num_threads()
    progress.enable("lines")
    try:
        torch.set_num_threads(1)  # tiny tensors: one thread is fastest, and immune to a busy machine
        cross_validate(items, cfg, folds=2, n_boot=10)
    finally:
        progress.enable(False)
        torch.set_num_threads(threads)
    err = capsys.readouterr().err
    for k in (1, 2):
        assert f"fold {k}/2: training on" in err and f"fold {k}/2 done:" in err
        assert f"fold {k}/2: epoch 1/2: train loss" in err and f"fold {k}/2: epoch 2/2: train loss" in err
