"""Setting up and re-running (issue #17, item 8).

``python -m fetalscan`` is the CLI; every test finds the shared data through ``FETALSCAN_SHARED``
(``test_dicom.py`` too); the README says what the tests that need it cover; a command stopped
with Ctrl-C leaves its --out marked, and the re-run says what is there and how to go on.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_python_m_fetalscan_is_the_command_line():
    done = subprocess.run([sys.executable, "-m", "fetalscan", "--version"], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0 and done.stdout.startswith("fetalscan ")
    bad = subprocess.run([sys.executable, "-m", "fetalscan", "no-such-command"], capture_output=True, text=True,
                         timeout=120)
    assert bad.returncode == 2 and "invalid choice" in bad.stderr


def test_dicom_tests_find_the_shared_data_through_fetalscan_shared(tmp_path):
    code = ("import sys; sys.path.insert(0, 'tests'); import test_dicom; "
            "print(test_dicom.SHARED_DATA); print(test_dicom.HC18_IMAGE)")
    env = {**os.environ, "FETALSCAN_SHARED": str(tmp_path / "elsewhere")}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, env=env,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    data, image = done.stdout.split()
    assert Path(data) == tmp_path / "elsewhere" / "data"
    assert Path(image).is_relative_to(tmp_path / "elsewhere")


def test_readme_explains_the_shared_data_and_what_its_tests_cover():
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    assert "FETALSCAN_SHARED" in readme
    section = readme[readme.index("FETALSCAN_SHARED"):]
    assert "27 tests" in section
    for covered in ("HC18", "SonoNet", "fetal_brain", "DICOM"):
        assert covered in section, covered


def test_readme_gives_the_biometry_training_time_and_a_quick_recipe():
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    assert "2 CPU cores" in readme and "quick" in readme.lower()
    assert "fetalscan biometry train" in readme and "--epochs" in readme


# --------------------------------------------------------------------------- Ctrl-C and the re-run


class _Pred:
    notes: list = []
    images = [1, 2]
    patients = [1]


def test_a_run_stopped_by_ctrl_c_is_named_on_the_rerun_with_how_to_start_over(tmp_path, toy_manifest, monkeypatch,
                                                                             capsys):
    from fetalscan.cli import main
    from fetalscan.fileio import UNFINISHED_MARKER, prepare_out_dir, write_text
    from fetalscan.inference import predict

    manifest = toy_manifest(groups=2, per_group=1)
    out = tmp_path / "new"
    interrupt = {"now": True}

    def fake_predict_to_folder(model, data, out_dir, cfg, device, overwrite):
        folder = prepare_out_dir(out_dir, overwrite)
        write_text(folder / "predictions.csv", "path,label\n")
        if interrupt["now"]:
            raise KeyboardInterrupt
        write_text(folder / "patients.csv", "group\n")
        return _Pred()

    monkeypatch.setattr(predict, "predict_to_folder", fake_predict_to_folder)
    command = ["predict", "--model", str(tmp_path / "m.pt"), "--data", str(manifest), "--out", str(out),
               "--device", "cpu"]
    assert main(command) == 130
    err = capsys.readouterr().err
    assert "interrupted" in err and "--overwrite" in err
    assert (out / UNFINISHED_MARKER).is_file()

    # the same command again: refused, with what is there and how to go on
    interrupt["now"] = False
    assert main(command) == 2
    err = capsys.readouterr().err
    assert "unfinished run" in err and "fetalscan predict" in err and "predictions.csv" in err
    assert "--overwrite" in err and "cannot resume" in err

    # with --overwrite it starts over, and a finished folder carries no marker
    assert main([*command, "--overwrite"]) == 0
    assert not (out / UNFINISHED_MARKER).exists() and (out / "patients.csv").is_file()
    capsys.readouterr()
    # a finished folder is refused as before: not empty, no talk of an unfinished run
    assert main(command) == 2
    err = capsys.readouterr().err
    assert "not empty" in err and "unfinished" not in err


def test_the_marker_exists_only_while_a_command_runs(tmp_path):
    from fetalscan.errors import OutputError
    from fetalscan.fileio import UNFINISHED_MARKER, check_out_dir, prepare_out_dir, unfinished_marker, write_text

    with unfinished_marker("fetalscan cv --out x"):
        out = prepare_out_dir(tmp_path / "x")
        assert (out / UNFINISHED_MARKER).is_file()
        assert prepare_out_dir(out) == out  # the run itself may prepare its folder again
    assert not (out / UNFINISHED_MARKER).exists()
    prepare_out_dir(tmp_path / "api")  # the Python API writes no marker
    assert not (tmp_path / "api" / UNFINISHED_MARKER).exists()
    with pytest.raises(KeyboardInterrupt), unfinished_marker("fetalscan cv --out y"):
        write_text(prepare_out_dir(tmp_path / "y") / "audit.json", "{}")
        raise KeyboardInterrupt
    with pytest.raises(OutputError, match="`fetalscan cv --out y`.*was interrupted or failed.*audit.json"):
        check_out_dir(tmp_path / "y")
    assert check_out_dir(tmp_path / "y", overwrite=True)
    with pytest.raises(ValueError), unfinished_marker("fetalscan cv --out z"):
        prepare_out_dir(tmp_path / "z")
        raise ValueError("failed before writing anything")
    assert check_out_dir(tmp_path / "z")  # nothing was left, so nothing stands in the way
