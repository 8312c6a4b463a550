"""Leak-free splits: grouped stratified k-fold, leave-one-group-out, inner validation,
and the leakage audit that runs before every training.

Everything here works on *groups* (patient, exam, case): a group is never split
between training, inner validation and test. Stratification is done on the
group's label, so each fold holds a similar share of every class's *groups*.

The inner validation split is always drawn from the training groups of a fold
and is the only data used for early stopping and model selection; the test fold
is touched once, for the out-of-fold predictions.
"""

from __future__ import annotations

import logging
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import numpy as np

from fetalscan.data.records import Dataset
from fetalscan.errors import LeakageError, SplitError

log = logging.getLogger(__name__)

#: Hamming distance on the 64-bit perceptual hash at or below which two images
#: count as near-duplicates. The same threshold was used (and visually confirmed)
#: when the shared fetal_brain set was de-duplicated; re-encoded, slightly
#: cropped or brightness-shifted copies of one picture fall well below it, while
#: different pictures of the same anatomy rarely do.
PHASH_THRESHOLD = 6


@dataclass(frozen=True)
class Fold:
    """Record indices of one outer fold and of its inner split (all disjoint by group)."""

    index: int
    test: np.ndarray
    inner_train: np.ndarray
    inner_val: np.ndarray

    @property
    def train(self) -> np.ndarray:
        """Every training record of the fold (inner train + inner validation)."""
        return np.sort(np.concatenate([self.inner_train, self.inner_val]))


# --------------------------------------------------------------------------- groups


def group_labels(labels: Sequence[str], groups: Sequence[str]) -> dict[str, str]:
    """Map each group to its single label; a group with two labels is an error."""
    out: dict[str, str] = {}
    for lab, grp in zip(labels, groups):
        prev = out.setdefault(grp, lab)
        if prev != lab:
            raise SplitError(f"group {grp!r} carries two labels: {prev!r} and {lab!r}")
    return out


def groups_per_class(labels: Sequence[str], groups: Sequence[str]) -> dict[str, int]:
    """Number of distinct groups of each class."""
    return dict(Counter(group_labels(labels, groups).values()))


def min_groups_required(scheme: str, n_splits: int) -> int:
    """Groups each class needs: ``n_splits`` for stratified k-fold (one group per
    test fold), 2 for leave-one-group-out (one to test while another trains)."""
    return 2 if scheme == "logo" else n_splits


def deficient_classes(labels: Sequence[str], groups: Sequence[str], required: int) -> dict[str, int]:
    """Classes with fewer than ``required`` groups, with their group counts."""
    return {c: n for c, n in sorted(groups_per_class(labels, groups).items()) if n < required}


# --------------------------------------------------------------------------- outer folds


def stratified_group_kfold(
    labels: Sequence[str], groups: Sequence[str], n_splits: int, seed: int = 0
) -> list[np.ndarray]:
    """Test-record indices of ``n_splits`` folds, stratified on the *groups* of each class.

    The patient is the unit: each class's groups are shuffled (seeded) and dealt
    to the folds in turn, starting each class at the folds that hold the fewest
    groups so far, so every fold gets ``floor(n_c / k)`` or ``ceil(n_c / k)`` groups
    of class ``c`` and fold sizes stay balanced. (scikit-learn's
    ``StratifiedGroupKFold`` balances image counts instead, which lets a fold miss
    a class's patients when groups differ in size.) Raises :class:`SplitError`
    when a class has fewer groups than folds.
    """
    if n_splits < 2:
        raise SplitError(f"folds must be at least 2, got {n_splits}")
    n_groups = len(set(groups))
    if n_groups < n_splits:
        raise SplitError(f"folds {n_splits} needs at least {n_splits} groups; the data has {n_groups}")
    short = deficient_classes(labels, groups, n_splits)
    if short:
        raise SplitError(_deficient_message(short, n_splits, "kfold"))
    return _deal_groups(labels, groups, n_splits, seed)


def _deal_groups(labels: Sequence[str], groups: Sequence[str], n_splits: int, seed: int) -> list[np.ndarray]:
    """Deal each class's shuffled groups to the least-loaded folds in turn (seeded)."""
    by_class: dict[str, list[str]] = defaultdict(list)
    for g, c in sorted(group_labels(labels, groups).items()):
        by_class[c].append(g)
    rng = np.random.default_rng(seed)
    fold_of: dict[str, int] = {}
    load = np.zeros(n_splits, dtype=int)
    for c in sorted(by_class, key=lambda c: (-len(by_class[c]), c)):
        gs = list(by_class[c])
        rng.shuffle(gs)
        order = sorted(range(n_splits), key=lambda k: (load[k], rng.random()))
        for i, g in enumerate(gs):
            k = order[i % n_splits]
            fold_of[g] = k
            load[k] += 1
    fold_idx = np.array([fold_of[g] for g in groups])
    return [np.flatnonzero(fold_idx == k) for k in range(n_splits)]


def inner_group_folds(
    labels: Sequence[str], groups: Sequence[str], n_splits: int, seed: int = 0
) -> list[np.ndarray]:
    """Held-out indices of an *inner* grouped k-fold over a fold's training records.

    Used to choose a head's regularisation (or epoch count) on the training groups
    only. The groups are dealt as in :func:`stratified_group_kfold`, but a class with
    fewer groups than folds is allowed (it is missing from some held-out folds), and
    the number of folds is capped at the number of groups. Indices are positions in
    ``labels`` / ``groups`` (i.e. relative to the training records passed in).
    """
    n_groups = len(set(groups))
    k = min(int(n_splits), n_groups)
    if k < 2:
        raise SplitError(f"an inner grouped CV needs at least 2 training groups; got {n_groups}")
    return [f for f in _deal_groups(labels, groups, k, seed) if len(f)]


def leave_one_group_out(labels: Sequence[str], groups: Sequence[str]) -> list[np.ndarray]:
    """Test-record indices of one fold per group (groups in sorted order)."""
    short = deficient_classes(labels, groups, 2)
    if short:
        raise SplitError(_deficient_message(short, 2, "logo"))
    g = np.asarray(groups)
    return [np.flatnonzero(g == grp) for grp in sorted(set(groups))]


def _deficient_message(short: dict[str, int], required: int, scheme: str) -> str:
    listing = ", ".join(f"{c} ({n} group{'s' if n != 1 else ''})" for c, n in short.items())
    what = f"{required}-fold stratified CV" if scheme == "kfold" else "leave-one-group-out CV"
    return (
        f"class with fewer groups than {what} needs ({required}): {listing}. "
        "Use fewer folds, rare_classes='merge' (pool them into one class) or "
        "rare_classes='drop' (leave them out), or add data."
    )


# --------------------------------------------------------------------------- inner split


def inner_split(
    train_idx: np.ndarray,
    labels: Sequence[str],
    groups: Sequence[str],
    val_fraction: float = 0.2,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """Split a fold's training records into inner-train and inner-validation by group.

    Per class, ``round(val_fraction * n_groups)`` of its training groups go to
    validation, but always at least one stays in inner-train (a class with a single
    training group is kept entirely for training). If that leaves validation
    empty, one group of the class with the most groups is moved there.
    """
    if not 0.0 < val_fraction < 1.0:
        raise SplitError(f"val_fraction must be between 0 and 1, got {val_fraction}")
    train_idx = np.asarray(train_idx)
    lab = np.asarray(labels)[train_idx]
    grp = np.asarray(groups)[train_idx]
    by_class: dict[str, list[str]] = defaultdict(list)
    for g, c in sorted(group_labels(lab, grp).items()):
        by_class[c].append(g)
    rng = np.random.default_rng(seed)
    val_groups: set[str] = set()
    for c in sorted(by_class):
        gs = list(by_class[c])
        rng.shuffle(gs)
        k = min(int(round(val_fraction * len(gs))), len(gs) - 1)
        val_groups.update(gs[:k])
    if not val_groups:
        biggest = max(sorted(by_class), key=lambda c: len(by_class[c]))
        if len(by_class[biggest]) < 2:
            raise SplitError(
                "cannot draw an inner validation split: every class has a single training "
                "group in this fold; more groups are needed for early stopping"
            )
        val_groups.add(sorted(by_class[biggest])[int(rng.integers(len(by_class[biggest])))])
    in_val = np.isin(grp, sorted(val_groups))
    return np.sort(train_idx[~in_val]), np.sort(train_idx[in_val])


def make_folds(
    labels: Sequence[str],
    groups: Sequence[str],
    scheme: str = "kfold",
    n_splits: int = 5,
    seed: int = 0,
    val_fraction: float = 0.2,
) -> list[Fold]:
    """Outer folds (``kfold`` or ``logo``) each with its inner validation split."""
    if scheme == "kfold":
        tests = stratified_group_kfold(labels, groups, n_splits, seed)
    elif scheme == "logo":
        tests = leave_one_group_out(labels, groups)
    else:
        raise SplitError(f"unknown CV scheme {scheme!r}; choose 'kfold' or 'logo'")
    n = len(labels)
    folds = []
    for i, test in enumerate(tests):
        train = np.setdiff1d(np.arange(n), test)
        inner_tr, inner_val = inner_split(train, labels, groups, val_fraction, seed + 1000 + i)
        folds.append(Fold(i, np.sort(test), inner_tr, inner_val))
    return folds


def final_split(
    labels: Sequence[str], groups: Sequence[str], val_fraction: float = 0.2, seed: int = 0
) -> Fold:
    """The split of a final model trained on all data: inner-train / inner-val, no test."""
    inner_tr, inner_val = inner_split(np.arange(len(labels)), labels, groups, val_fraction, seed)
    return Fold(-1, np.array([], dtype=int), inner_tr, inner_val)


# --------------------------------------------------------------------------- leakage audit


def hamming_pairs(hashes: np.ndarray, threshold: int = PHASH_THRESHOLD) -> list[tuple[int, int, int]]:
    """All index pairs ``(i, j, distance)``, ``i < j``, with Hamming distance <= threshold.

    ``hashes`` holds one 64-bit perceptual hash per record (uint64). The pairwise
    distance is computed in blocks with a popcount table, so 10^4 images are fine.
    """
    h = np.asarray(hashes, dtype=np.uint64)
    n = len(h)
    table = np.array([bin(i).count("1") for i in range(256)], dtype=np.uint8)
    pairs: list[tuple[int, int, int]] = []
    block = 512
    for start in range(0, n, block):
        x = np.bitwise_xor(h[start:start + block, None], h[None, :])
        d = table[x.view(np.uint8)].reshape(x.shape + (8,)).sum(-1)
        ii, jj = np.nonzero(d <= threshold)
        for i, j in zip(ii + start, jj):
            if i < j:
                pairs.append((int(i), int(j), int(d[i - start, j])))
    return pairs


def merge_near_duplicate_groups(
    groups: Sequence[str], pairs: Sequence[tuple[int, int, int]]
) -> list[str]:
    """Union the groups of near-duplicate images (union-find); returns new group names.

    A merged group is named by its members joined with ``+`` (sorted), so the
    output still says which original groups were pooled.
    """
    parent: dict[str, str] = {g: g for g in groups}

    def find(g: str) -> str:
        while parent[g] != g:
            parent[g] = parent[parent[g]]
            g = parent[g]
        return g

    for i, j, _ in pairs:
        a, b = find(groups[i]), find(groups[j])
        if a != b:
            parent[max(a, b)] = min(a, b)
    members: dict[str, set[str]] = defaultdict(set)
    for g in set(groups):
        members[find(g)].add(g)
    name = {root: "+".join(sorted(m)) for root, m in members.items()}
    return [name[find(g)] for g in groups]


@dataclass
class AuditReport:
    """Outcome of :func:`audit_folds`; written as ``audit.json`` into the run folder."""

    passed: bool
    n_records: int
    n_groups: int
    phash_threshold: int
    near_duplicate_pairs: list[dict] = field(default_factory=list)
    violations: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    folds: list[dict] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {
            "passed": self.passed,
            "n_records": self.n_records,
            "n_groups": self.n_groups,
            "hash": "64-bit DCT perceptual hash (imagehash.phash), Hamming distance",
            "phash_threshold": self.phash_threshold,
            "near_duplicate_pairs": self.near_duplicate_pairs,
            "violations": self.violations,
            "warnings": self.warnings,
            "folds": self.folds,
        }


def audit_folds(
    folds: Sequence[Fold],
    labels: Sequence[str],
    groups: Sequence[str],
    names: Sequence[str],
    hashes: np.ndarray | None,
    threshold: int = PHASH_THRESHOLD,
) -> AuditReport:
    """Check that no group and no near-duplicate image crosses train/test.

    Violations (the run is refused): a group in two test folds; a group on two
    sides (inner-train / inner-val / test) of any fold; a near-duplicate pair of
    images from different groups with one image in training and the other in the
    test fold. A near-duplicate pair across inner-train and inner-validation only
    biases early stopping and is recorded as a warning.
    """
    labels = list(labels)
    groups = list(groups)
    violations: list[str] = []
    warnings: list[str] = []
    seen_in_test: dict[str, int] = {}
    fold_rows = []
    for f in folds:
        sides = {"inner_train": f.inner_train, "inner_val": f.inner_val, "test": f.test}
        gsets = {k: {groups[i] for i in v} for k, v in sides.items()}
        for a, b in (("inner_train", "test"), ("inner_val", "test"), ("inner_train", "inner_val")):
            both = sorted(gsets[a] & gsets[b])
            if both:
                violations.append(f"fold {f.index}: group(s) {both[:5]} in both {a} and {b}")
        for g in gsets["test"]:
            if g in seen_in_test and seen_in_test[g] != f.index:
                violations.append(f"group {g!r} is in the test set of folds {seen_in_test[g]} and {f.index}")
            seen_in_test.setdefault(g, f.index)
        fold_rows.append({
            "fold": f.index,
            **{f"n_{k}_images": int(len(v)) for k, v in sides.items()},
            **{f"n_{k}_groups": len(gsets[k]) for k in sides},
            "test_classes": dict(sorted(Counter(labels[i] for i in f.test).items())),
            "test_groups": sorted(gsets["test"]),
        })
    pairs_out: list[dict] = []
    if hashes is not None:
        for i, j, d in hamming_pairs(hashes, threshold):
            cross = groups[i] != groups[j]
            pairs_out.append({"a": names[i], "b": names[j], "distance": d,
                              "group_a": groups[i], "group_b": groups[j], "same_group": not cross})
            if not cross:
                continue
            for f in folds:
                side = _side_of(f)
                sa, sb = side.get(i), side.get(j)
                if {sa, sb} in ({"test", "inner_train"}, {"test", "inner_val"}):
                    violations.append(
                        f"fold {f.index}: near-duplicate images {names[i]!r} (group {groups[i]}) and "
                        f"{names[j]!r} (group {groups[j]}) are on both sides of train/test "
                        f"(pHash distance {d} <= {threshold})"
                    )
                elif {sa, sb} == {"inner_train", "inner_val"}:
                    warnings.append(
                        f"fold {f.index}: near-duplicates {names[i]!r} and {names[j]!r} straddle "
                        "inner-train / inner-validation (biases early stopping only)"
                    )
    return AuditReport(
        passed=not violations,
        n_records=len(labels),
        n_groups=len(set(groups)),
        phash_threshold=threshold,
        near_duplicate_pairs=pairs_out,
        violations=violations,
        warnings=warnings,
        folds=fold_rows,
    )


def _side_of(f: Fold) -> dict[int, str]:
    side = {int(i): "inner_train" for i in f.inner_train}
    side.update({int(i): "inner_val" for i in f.inner_val})
    side.update({int(i): "test" for i in f.test})
    return side


def raise_if_failed(report: AuditReport, where: str) -> None:
    """Raise :class:`LeakageError` listing the first violations (audit saved at ``where``)."""
    if report.passed:
        return
    shown = "; ".join(report.violations[:3])
    more = f" (+{len(report.violations) - 3} more)" if len(report.violations) > 3 else ""
    raise LeakageError(
        f"leakage audit failed, training refused: {shown}{more}. Full audit: {where}. "
        "Fix the groups in the manifest, or set near_duplicates='merge' to pool the "
        "groups of near-duplicate images."
    )


def apply_rare_class_policy(dataset: Dataset, required: int, policy: str, merged_name: str = "other") -> Dataset:
    """Deal with classes that have fewer than ``required`` groups.

    ``error`` raises :class:`~fetalscan.errors.SplitError` listing them; ``drop``
    removes their records; ``merge`` relabels them all as ``merged_name`` (the
    original label is kept in ``Record.label_original``). A merged class that still
    has too few groups is an error. What was done is appended to ``dataset.notes``.
    """
    short = deficient_classes(dataset.labels, dataset.groups, required)
    if not short:
        return dataset
    if policy == "error":
        raise SplitError(f"{dataset.source}: " + _deficient_message(short, required, "kfold" if required > 2 else "logo"))
    if policy == "drop":
        keep = [i for i, r in enumerate(dataset.records) if r.label not in short]
        if not keep:
            raise SplitError(f"{dataset.source}: every class has fewer than {required} groups")
        out = dataset.subset(keep)
        out.classes = [c for c in dataset.classes if c not in short]
        out.notes.append(f"dropped classes with fewer than {required} groups: {short}")
        return out
    if policy == "merge":
        if merged_name in dataset.classes and merged_name not in short:
            raise SplitError(f"rare_classes='merge': a class named {merged_name!r} already exists")
        records = [
            replace(r, label=merged_name, label_original=r.label) if r.label in short else r
            for r in dataset.records
        ]
        classes = sorted({c for c in dataset.classes if c not in short} | {merged_name})
        out = Dataset(records, classes, dataset.source, list(dataset.notes), dict(dataset.loading))
        still = deficient_classes(out.labels, out.groups, required)
        if still:
            raise SplitError(
                f"{dataset.source}: after merging {sorted(short)} into {merged_name!r}: "
                + _deficient_message(still, required, "kfold" if required > 2 else "logo")
            )
        out.notes.append(
            f"merged classes with fewer than {required} groups into {merged_name!r}: "
            + ", ".join(f"{c} ({n})" for c, n in short.items())
        )
        return out
    raise SplitError(f"unknown rare_classes policy {policy!r}; choose error, merge or drop")
