"""Archive-scale prediction: streamed output equals the whole-list path, a killed run resumes each
file exactly once, shards partition the archive, and Ray actors give the local numbers."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from conftest import blob_image, write_png
from fetalscan.data.records import load_dataset
from fetalscan.errors import FetalscanError
from fetalscan.inference.batch import (
    KILL_ENV,
    BatchConfig,
    merge_shards,
    parse_shard,
    predict_archive,
    shard_of,
)
from fetalscan.inference.predict import PredictConfig, predict_to_folder

N_IMAGES = 30


@pytest.fixture(scope="module")
def archive(tmp_path_factory) -> Path:
    """30 blob images in a class tree, nested folders, groups of 1-3 images (file stems p<k>_<i>)."""
    root = tmp_path_factory.mktemp("archive") / "scans"
    for k in range(N_IMAGES):
        cls = "abnormal" if k % 3 == 0 else "normal"
        write_png(root / cls / f"site{k % 2}" / f"p{k // 3:02d}_{k}.png", blob_image(100 + k, bright=cls == "abnormal"))
    return root


def _same_tables(a: Path, b: Path, tol: float = 1e-12) -> None:
    """predictions.csv and patients.csv of two runs: the same rows, columns and text, probabilities within
    ``tol`` (a batch of another composition may change the last bits of a float)."""
    for name in ("predictions.csv", "patients.csv"):
        x, y = pd.read_csv(a / name, dtype=str, keep_default_na=False), pd.read_csv(b / name, dtype=str,
                                                                                   keep_default_na=False)
        assert list(x.columns) == list(y.columns), name
        probs = [c for c in x.columns if c.startswith("p_")]
        pd.testing.assert_frame_equal(x.drop(columns=probs), y.drop(columns=probs))
        assert np.abs(x[probs].astype(float).to_numpy() - y[probs].astype(float).to_numpy()).max() <= tol, name


def _ids(df: pd.DataFrame) -> list[str]:
    return [f"{p}#{'' if pd.isna(f) else int(f)}" for p, f in zip(df["path"], df["frame"])]


@pytest.fixture(scope="module")
def reference(archive: Path, tiny_classifier: Path, tmp_path_factory) -> Path:
    """The whole-list path (load_dataset + predict_to_folder) on the archive."""
    out = tmp_path_factory.mktemp("reference")
    predict_to_folder(tiny_classifier, load_dataset(archive, require_labels=False), out, PredictConfig(batch_size=4),
                      overwrite=True)
    return out


def test_streamed_folder_writes_the_whole_list_paths_files(archive, tiny_classifier, reference, tmp_path) -> None:
    # chunks of whole batches: the network sees the very batches of the whole-list path -> the same bytes
    res = predict_archive(tiny_classifier, archive, tmp_path / "out", PredictConfig(batch_size=4),
                          BatchConfig(chunk=8))
    assert res.n_images == N_IMAGES and res.n_new == N_IMAGES
    for name in ("predictions.csv", "patients.csv"):
        assert (tmp_path / "out" / name).read_bytes() == (reference / name).read_bytes(), name


def _cli(args: list[str], env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fetalscan", *args], capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}, timeout=300)


@pytest.mark.slow
def test_killed_run_resumes_and_predicts_each_file_exactly_once(archive, tiny_classifier, reference, tmp_path) -> None:
    out = tmp_path / "run"
    args = ["predict", "--model", str(tiny_classifier), "--data", str(archive), "--out", str(out),
            "--chunk", "4", "--batch-size", "4", "--no-progress"]
    killed = _cli(args, {KILL_ENV: "2"})  # killed (SIGKILL) halfway through writing its third chunk
    assert killed.returncode == -9, killed.stderr
    raw = (out / "predictions.csv").read_bytes()
    assert not raw.endswith(b"\n"), "the hook should leave a partial last line"
    complete_rows = raw.count(b"\n") - 1  # header
    assert 8 <= complete_rows < N_IMAGES

    again = _cli(args)  # the same command without --resume is refused, and says how to go on
    assert again.returncode == 2 and "--resume" in again.stderr, again.stderr

    resumed = _cli([*args, "--resume"])
    assert resumed.returncode == 0, resumed.stderr
    assert f"({complete_rows} already done, {N_IMAGES - complete_rows} new)" in resumed.stdout + resumed.stderr
    got = pd.read_csv(out / "predictions.csv")
    ref = pd.read_csv(reference / "predictions.csv")
    ids = _ids(got)
    assert len(ids) == len(set(ids)) == N_IMAGES  # every image exactly once
    assert ids == _ids(ref)  # and in the order of an uninterrupted run
    _same_tables(out, reference)  # the probabilities of an uninterrupted run


def test_shards_partition_the_archive_and_merge_to_the_whole_run(archive, tiny_classifier, reference,
                                                                tmp_path) -> None:
    folders, seen = [], []
    for i in range(3):
        folder = tmp_path / f"shard{i}"
        res = predict_archive(tiny_classifier, archive, folder, PredictConfig(batch_size=4),
                              BatchConfig(shard=f"{i}/3", chunk=5))
        assert res.n_groups is None and not (folder / "patients.csv").exists()
        seen += _ids(pd.read_csv(folder / "predictions.csv"))
        folders.append(folder)
    all_ids = _ids(pd.read_csv(reference / "predictions.csv"))
    assert sorted(seen) == sorted(all_ids) and len(seen) == len(set(seen))  # each file in exactly one shard
    with pytest.raises(FetalscanError, match=r"shard\(s\) 2/3 missing"):
        merge_shards(folders[:2], tmp_path / "partial")
    merge_shards(list(reversed(folders)), tmp_path / "merged")
    _same_tables(tmp_path / "merged", reference)


def test_shard_assignment_is_a_stable_hash_and_options_are_checked() -> None:
    assert shard_of("normal/site0/p00_1.png", 7) == shard_of("normal/site0/p00_1.png", 7)
    assert shard_of("abc", 1000) == int.from_bytes(__import__("hashlib").sha1(b"abc").digest()[:8], "big") % 1000
    counts = np.bincount([shard_of(f"scan_{k}.png", 4) for k in range(4000)], minlength=4)
    assert counts.min() > 900  # about even
    assert parse_shard("1/3") == (1, 3) and parse_shard("") == (0, 1)
    with pytest.raises(FetalscanError, match=r"--shard 3/3: shard index must be 0..2"):
        parse_shard("3/3")
    with pytest.raises(FetalscanError, match="expected i/n"):
        parse_shard("first")
    with pytest.raises(FetalscanError, match="--engine must be one of local, ray"):
        BatchConfig(engine="spark").validate()


def test_resume_refuses_another_model_and_overwrite(archive, tiny_classifier, tmp_path) -> None:
    out = tmp_path / "run"
    predict_archive(tiny_classifier, archive, out, PredictConfig(batch_size=8), BatchConfig(chunk=16))
    with pytest.raises(FetalscanError, match="contradict"):
        predict_archive(tiny_classifier, archive, out, batch=BatchConfig(resume=True), overwrite=True)
    with pytest.raises(FetalscanError, match="aggregate"):
        predict_archive(tiny_classifier, archive, out, PredictConfig(aggregate="vote"), BatchConfig(resume=True))
    res = predict_archive(tiny_classifier, archive, out, PredictConfig(batch_size=8), BatchConfig(resume=True))
    assert (res.n_skipped, res.n_new, res.n_images) == (N_IMAGES, 0, N_IMAGES)


@pytest.mark.slow
def test_ray_engine_gives_the_local_probabilities(archive, tiny_classifier, reference, tmp_path) -> None:
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        res = predict_archive(tiny_classifier, archive, tmp_path / "ray", PredictConfig(batch_size=4),
                              BatchConfig(engine="ray", chunk=8, ray_actors=2))
    finally:
        ray.shutdown()
    assert res.n_images == N_IMAGES
    got = pd.read_csv(tmp_path / "ray" / "predictions.csv")
    ref = pd.read_csv(reference / "predictions.csv")
    assert _ids(got) == _ids(ref)
    probs = [c for c in ref.columns if c.startswith("p_")]
    assert np.abs(got[probs].to_numpy() - ref[probs].to_numpy()).max() <= 1e-6
    assert list(got.columns) == list(ref.columns) and (got["pred"] == ref["pred"]).all()


def test_cli_checks_the_shard_and_predict_merge_gives_the_whole_run(archive, tiny_classifier, reference, tmp_path,
                                                                    capsys) -> None:
    from fetalscan.cli import main

    base = ["predict", "--model", str(tiny_classifier), "--data", str(archive), "--batch-size", "4", "--no-progress"]
    assert main([*base, "--out", str(tmp_path / "bad"), "--shard", "3/3"]) == 2
    assert "--shard 3/3: shard index must be 0..2" in " ".join(capsys.readouterr().err.split())
    assert not (tmp_path / "bad").exists()
    shards = [str(tmp_path / f"s{i}") for i in range(2)]
    for i, folder in enumerate(shards):
        assert main([*base, "--out", folder, "--shard", f"{i}/2"]) == 0
    assert main(["predict-merge", *shards, "--out", str(tmp_path / "merged")]) == 0
    _same_tables(tmp_path / "merged", reference)
    assert main(["predict-merge", shards[0], shards[0], "--out", str(tmp_path / "twice")]) == 2
    assert "given twice" in capsys.readouterr().err
