"""Grouped splits and the leakage audit."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from fetalscan.data.records import load_dataset
from fetalscan.errors import LeakageError, SplitError
from fetalscan.splits import (
    Fold,
    apply_rare_class_policy,
    audit_folds,
    hamming_pairs,
    inner_split,
    make_folds,
    merge_near_duplicate_groups,
    raise_if_failed,
)


def _toy(n_groups_per_class=(10, 7, 5), per_group=3, seed=0):
    rng = np.random.default_rng(seed)
    labels, groups = [], []
    for c, n in enumerate(n_groups_per_class):
        for g in range(n):
            for _ in range(int(rng.integers(1, per_group + 1))):
                labels.append(f"c{c}")
                groups.append(f"c{c}_g{g}")
    return labels, groups


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_kfold_no_group_crosses_and_every_record_tested_once(seed: int) -> None:
    labels, groups = _toy(seed=seed)
    folds = make_folds(labels, groups, "kfold", 5, seed)
    tested = np.concatenate([f.test for f in folds])
    assert sorted(tested) == list(range(len(labels)))
    g = np.asarray(groups)
    for f in folds:
        sides = [set(g[f.inner_train]), set(g[f.inner_val]), set(g[f.test])]
        assert not (sides[0] & sides[1]) and not (sides[0] & sides[2]) and not (sides[1] & sides[2])
        assert len(f.inner_val) > 0
        assert set(f.train) | set(f.test) == set(range(len(labels)))


def test_kfold_is_stratified_by_group_label() -> None:
    labels, groups = _toy((10, 10, 5))
    folds = make_folds(labels, groups, "kfold", 5, 0)
    lab, grp = np.asarray(labels), np.asarray(groups)
    for f in folds:
        per_class = Counter(lab[i] for i in {int(np.flatnonzero(grp == x)[0]) for x in set(grp[f.test])})
        assert per_class["c0"] == 2 and per_class["c1"] == 2 and per_class["c2"] == 1


def test_inner_split_only_uses_training_groups_and_keeps_singletons() -> None:
    labels = ["a"] * 6 + ["b"] * 2
    groups = [f"a{i}" for i in range(6)] + ["b0", "b0"]
    train = np.arange(len(labels))
    tr, va = inner_split(train, labels, groups, 0.2, 0)
    assert set(tr) | set(va) == set(train)
    assert {groups[i] for i in va} <= {f"a{i}" for i in range(6)}
    assert {"b0"} <= {groups[i] for i in tr}  # the single group of class b stays in training


def test_leave_one_group_out_tests_each_group_once() -> None:
    labels, groups = _toy((4, 3))
    folds = make_folds(labels, groups, "logo", seed=0)
    assert len(folds) == len(set(groups))
    assert all(len({groups[i] for i in f.test}) == 1 for f in folds)


def test_class_with_fewer_groups_than_folds_is_refused() -> None:
    labels, groups = _toy((10, 3))
    with pytest.raises(SplitError, match=r"c1 \(3 groups\)"):
        make_folds(labels, groups, "kfold", 5, 0)


def test_real_data_folds_after_merge(fetal_brain: Path) -> None:
    ds = apply_rare_class_policy(load_dataset(fetal_brain), 5, "merge")
    folds = make_folds(ds.labels, ds.groups, "kfold", 5, 0)
    report = audit_folds(folds, ds.labels, ds.groups, [r.image_id for r in ds.records], None)
    assert report.passed, report.violations


# --------------------------------------------------------------------------- audit


def test_audit_flags_a_group_on_both_sides() -> None:
    labels = ["a", "a", "b", "b"]
    groups = ["p1", "p1", "p2", "p3"]
    bad = Fold(0, test=np.array([0]), inner_train=np.array([1, 2]), inner_val=np.array([3]))
    report = audit_folds([bad], labels, groups, ["i0", "i1", "i2", "i3"], None)
    assert not report.passed
    assert "['p1'] in both inner_train and test" in report.violations[0]
    with pytest.raises(LeakageError, match="training refused"):
        raise_if_failed(report, "audit.json")


def test_hamming_pairs_finds_close_hashes_only() -> None:
    h = np.array([0b0, 0b111, 0xFFFF_FFFF_FFFF_FFFF, 0b1], dtype=np.uint64)
    pairs = hamming_pairs(h, 3)
    assert (0, 1, 3) in pairs and (0, 3, 1) in pairs and (1, 3, 2) in pairs
    assert all(2 not in p[:2] for p in pairs)


def test_audit_catches_an_injected_near_duplicate(tmp_path: Path, toy_manifest) -> None:
    import shutil

    from fetalscan.data.records import prepare_images
    from fetalscan.models.registry import get_backbone_spec

    m = toy_manifest(groups=5, per_group=2)
    # copy one picture of group abnormal_0 into group abnormal_1 under a new name (a leak)
    shutil.copy(m.parent / "abnormal/abnormal_0_0.png", m.parent / "abnormal/copy.png")
    with open(m, "a") as fh:
        fh.write("abnormal/copy.png,abnormal,abnormal_1\n")
    ds = load_dataset(m)
    _, hashes = prepare_images(ds.records, get_backbone_spec("sononet16").preprocessing, with_hashes=True)
    names = [r.image_id for r in ds.records]
    crossing = []
    for seed in range(6):
        folds = make_folds(ds.labels, ds.groups, "kfold", 5, seed)
        report = audit_folds(folds, ds.labels, ds.groups, names, hashes)
        assert any(p["b"].endswith("copy.png") or p["a"].endswith("copy.png") for p in report.near_duplicate_pairs)
        crossing.append(not report.passed)
        if not report.passed:
            assert "near-duplicate" in report.violations[0] and "copy.png" in report.violations[0]
    assert any(crossing)  # in some split the two groups land on different sides
    merged = merge_near_duplicate_groups(ds.groups, hamming_pairs(hashes))
    folds = make_folds(ds.labels, merged, "kfold", 4, 0)
    assert audit_folds(folds, ds.labels, merged, names, hashes).passed
    assert "abnormal_0+abnormal_1" in merged
