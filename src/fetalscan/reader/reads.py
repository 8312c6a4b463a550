"""A reader study's readings: the CSV layout, its checks, and the arrays the analysis uses.

The layout is one row per reading, ``reader,treatment,case,truth,rating`` (the layout
MRMCaov and RJafroc read) with optional ``answer,seconds,session``:

- ``truth``: 1 = abnormal (diseased), 0 = normal; one value per case across all rows.
- ``rating``: a number; higher = more confident the case is abnormal (a 0-100 confidence,
  a 1-5 scale ...). The empirical AUC uses only its order.
- ``answer``: the reader's binary or class answer; ``0``, ``normal``, ``negative``, ``no``
  (or the study's normal label) count as *normal*, any other value as *abnormal*. It gives
  sensitivity and specificity.
- ``seconds``: reading time (positive), ``session``: free text.

The analysis needs a fully crossed study (every reader read every case in every treatment,
once) or a split-plot one (groups of readers, each group reading its own block of cases in every
treatment). Every problem is a :class:`~fetalscan.errors.DataError` that names the
CSV lines at fault.
"""

from __future__ import annotations

import csv
import math
import re
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fetalscan.errors import DataError

REQUIRED = ("reader", "treatment", "case", "truth", "rating")
OPTIONAL = ("answer", "seconds", "session")
NORMAL_ANSWERS = frozenset({"0", "0.0", "normal", "negative", "neg", "no", "false", "benign"})


def natural_key(value: str) -> tuple:
    """Sort key that orders ``"2"`` before ``"10"`` and names alphabetically."""
    parts = re.split(r"(\d+(?:\.\d+)?)", value)
    return tuple((0, float(p)) if re.fullmatch(r"\d+(?:\.\d+)?", p) else (1, p) for p in parts if p != "")


def sort_names(values: Iterable[str]) -> list[str]:
    """Distinct names in natural order (the order of treatments in every output)."""
    return sorted(set(values), key=natural_key)


@dataclass
class Reads:
    """A fully crossed or split-plot reader study as arrays (NaN where a reader did not read a case).

    Attributes
    ----------
    treatments, readers, cases : sorted names (natural order).
    truth : (c,) int array, 1 = abnormal.
    ratings : (t, r, c) float array.
    answers : (t, r, c) float array of 0/1, or ``None`` when the CSV has no ``answer``.
    seconds : (t, r, c) float array, or ``None`` when the CSV has no ``seconds``.
    source : where the readings came from, for messages.
    """

    treatments: list[str]
    readers: list[str]
    cases: list[str]
    truth: np.ndarray
    ratings: np.ndarray
    answers: np.ndarray | None = None
    seconds: np.ndarray | None = None
    source: str = "readings"
    sessions: dict[tuple[str, str, str], str] = field(default_factory=dict)
    reader_block: np.ndarray | None = None  # (r,) block of each reader; None or all 0: fully crossed
    case_block: np.ndarray | None = None  # (c,) block of each case

    def __post_init__(self) -> None:
        t, r, c = self.ratings.shape
        if self.reader_block is None:
            self.reader_block = np.zeros(r, dtype=int)
        if self.case_block is None:
            self.case_block = np.zeros(c, dtype=int)

    @property
    def n_blocks(self) -> int:
        return int(self.reader_block.max()) + 1

    @property
    def split_plot(self) -> bool:
        """Whether reader groups read disjoint case blocks (else fully crossed)."""
        return self.n_blocks > 1

    def blocks(self) -> list[tuple[np.ndarray, np.ndarray]]:
        """``(reader indices, case indices)`` of each block."""
        return [(np.flatnonzero(self.reader_block == b), np.flatnonzero(self.case_block == b))
                for b in range(self.n_blocks)]

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.ratings.shape  # type: ignore[return-value]

    def subset_treatments(self, names: Sequence[str]) -> Reads:
        """The same study restricted to some treatments (in the order given)."""
        idx = [self.treatments.index(n) for n in names]
        pick = (lambda a: None if a is None else a[idx])
        return Reads(list(names), self.readers, self.cases, self.truth, self.ratings[idx],
                     pick(self.answers), pick(self.seconds), self.source, self.sessions, self.reader_block,
                     self.case_block)


def _lines(lines: list[int], limit: int = 8) -> str:
    shown = ", ".join(str(x) for x in lines[:limit])
    return shown + (f" and {len(lines) - limit} more" if len(lines) > limit else "")


def _parse_number(text: str) -> float | None:
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def answer_is_abnormal(text: str, normal_label: str = "normal") -> float:
    """1.0 when an ``answer`` cell says abnormal, 0.0 when normal, NaN when empty."""
    value = text.strip().lower()
    if value == "":
        return float("nan")
    return 0.0 if value in NORMAL_ANSWERS or value == normal_label.lower() else 1.0


def read_reads_csv(path: str | Path) -> list[tuple[int, dict[str, str]]]:
    """``(line, row)`` pairs of a readings CSV (header = line 1), column names stripped."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"readings file not found: {path}")
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            columns = [c.strip() for c in (reader.fieldnames or [])]
            rows = []
            for i, raw in enumerate(reader, start=2):
                if None in raw:
                    raise DataError(f"{path}, line {i}: more cells than the header has columns; is this a readings "
                                    f"CSV (columns {', '.join(REQUIRED)})?")
                rows.append((i, {(k or "").strip(): (v or "").strip() for k, v in raw.items()}))
    except (UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"{path} is not a readable CSV file: {exc}") from exc
    missing = [c for c in REQUIRED if c not in columns]
    if missing:
        raise DataError(f"{path}: missing column(s) {', '.join(missing)}; found {', '.join(columns) or '(none)'}; "
                        f"required: {', '.join(REQUIRED)} (optional: {', '.join(OPTIONAL)})")
    if not rows:
        raise DataError(f"{path}: no readings")
    return rows


def load_reads(path: str | Path, *, known_cases: dict[str, int] | None = None, normal_label: str = "normal",
               min_treatments: int = 2) -> Reads:
    """Read and check a readings CSV (see the module docstring); ``known_cases`` maps the study's
    case names to their truth (from the design), so unknown cases and wrong truths are caught."""
    return reads_from_rows(read_reads_csv(path), source=str(path), known_cases=known_cases,
                           normal_label=normal_label, min_treatments=min_treatments)


def _check_cells(rows, source: str) -> None:
    empty = defaultdict(list)
    for line, row in rows:
        for col in REQUIRED:
            if row.get(col, "") == "":
                empty[col].append(line)
    for col, lines in empty.items():
        raise DataError(f"{source}: column {col!r} is empty on line(s) {_lines(lines)}")
    bad = [(line, row["rating"]) for line, row in rows if _parse_number(row["rating"]) is None]
    if bad:
        raise DataError(f"{source}: rating is not a number on line(s) {_lines([b[0] for b in bad])} "
                        f"(e.g. {bad[0][1]!r}); ratings must be finite numbers, higher = more likely abnormal")
    bad_truth = [line for line, row in rows if row["truth"] not in ("0", "1", "0.0", "1.0")]
    if bad_truth:
        raise DataError(f"{source}: truth must be 0 (normal) or 1 (abnormal); line(s) {_lines(bad_truth)}")
    if any("seconds" in row for _, row in rows):
        bad_s = [line for line, row in rows if row.get("seconds", "") != ""
                 and ((v := _parse_number(row["seconds"])) is None or v <= 0)]
        if bad_s:
            raise DataError(f"{source}: seconds must be a positive number; line(s) {_lines(bad_s)}")


def _case_truth(rows, source: str, known_cases: dict[str, int] | None) -> dict[str, int]:
    seen: dict[str, dict[int, list[int]]] = defaultdict(lambda: defaultdict(list))
    for line, row in rows:
        seen[row["case"]][int(float(row["truth"]))].append(line)
    for case, by_truth in seen.items():
        if len(by_truth) > 1:
            raise DataError(f"{source}: case {case!r} has truth 0 on line(s) {_lines(by_truth[0])} and truth 1 on "
                            f"line(s) {_lines(by_truth[1])}; a case has one truth")
    truth = {case: next(iter(by_truth)) for case, by_truth in seen.items()}
    if known_cases is not None:
        unknown = defaultdict(list)
        for line, row in rows:
            if row["case"] not in known_cases:
                unknown[row["case"]].append(line)
        if unknown:
            names = sorted(unknown, key=natural_key)
            first = names[0]
            raise DataError(f"{source}: {len(names)} case(s) not in the study's case list: "
                            f"{', '.join(repr(n) for n in names[:8])} (case {first!r} on line(s) "
                            f"{_lines(unknown[first])})")
        wrong = [c for c in truth if known_cases[c] != truth[c]]
        if wrong:
            c = sorted(wrong, key=natural_key)[0]
            raise DataError(f"{source}: truth of case {c!r} is {truth[c]} in the readings but {known_cases[c]} in "
                            f"the study's case list ({len(wrong)} case(s) disagree)")
    classes = set(truth.values())
    if len(classes) < 2:
        only = "abnormal (truth 1)" if classes == {1} else "normal (truth 0)"
        raise DataError(f"{source}: every case is {only}; an ROC analysis needs both normal and abnormal cases")
    return truth


def _check_design(rows, source, treatments, readers, cases) -> tuple[dict[tuple[str, str, str], int], np.ndarray]:
    """Line of every reading and the block of every reader: fully crossed (one block) or split-plot
    (readers in blocks; the readers of a block read the same cases, blocks share no case)."""
    index: dict[tuple[str, str, str], int] = {}
    dup = []
    per_reader = defaultdict(set)
    for line, row in rows:
        key = (row["treatment"], row["reader"], row["case"])
        if key in index:
            dup.append((key, index[key], line))
        index[key] = line
        per_reader[row["reader"]].add(row["treatment"])
    if dup:
        (t, r, c), a, b = dup[0]
        raise DataError(f"{source}: reader {r!r} read case {c!r} in treatment {t!r} twice (lines {a} and {b}; "
                        f"{len(dup)} duplicate(s)); keep one reading per reader, treatment and case (the reading "
                        "app's export keeps the last answer)")
    for r in readers:
        lacking = [t for t in treatments if t not in per_reader[r]]
        if lacking:
            raise DataError(f"{source}: reader {r!r} has no readings in treatment(s) {', '.join(map(repr, lacking))}; "
                            "the analysis needs every reader in every treatment")
    read_by: dict[str, frozenset[str]] = {}
    for r in readers:
        union = {c for (t, rr, c) in index if rr == r}
        for t in treatments:
            missing = [c for c in cases if c in union and (t, r, c) not in index]
            if missing:
                raise DataError(f"{source}: reader {r!r} in treatment {t!r} did not read {len(missing)} case(s): "
                                f"{', '.join(map(repr, missing[:8]))}; every reader must read the same cases in every "
                                "treatment")
        read_by[r] = frozenset(union)
    sets = list(dict.fromkeys(read_by[r] for r in readers))
    for a in range(len(sets)):
        for b in range(a + 1, len(sets)):
            if sets[a] & sets[b]:
                ra = next(r for r in readers if read_by[r] == sets[a])
                rb = next(r for r in readers if read_by[r] == sets[b])
                raise DataError(f"{source}: readers {ra!r} and {rb!r} share {len(sets[a] & sets[b])} case(s) but not "
                                "all: the study is neither fully crossed (every reader reads every case) nor "
                                "split-plot (reader groups read disjoint case blocks)")
    block = np.array([sets.index(read_by[r]) for r in readers])
    return index, block


def reads_from_rows(rows: Sequence[tuple[int, dict[str, str]]], *, source: str = "readings",
                    known_cases: dict[str, int] | None = None, normal_label: str = "normal",
                    min_treatments: int = 2) -> Reads:
    """Check ``(line, row)`` pairs and build :class:`Reads` (see :func:`load_reads`)."""
    _check_cells(rows, source)
    truth_of = _case_truth(rows, source, known_cases)
    treatments = sort_names(row["treatment"] for _, row in rows)
    readers = sort_names(row["reader"] for _, row in rows)
    cases = sort_names(truth_of)
    if len(treatments) < min_treatments:
        raise DataError(f"{source}: {len(treatments)} treatment(s) ({', '.join(map(repr, treatments))}); comparing "
                        f"treatments needs at least {min_treatments}")
    if len(readers) < 2:
        raise DataError(f"{source}: one reader ({readers[0]!r}); a multi-reader analysis needs at least 2")
    index, reader_block = _check_design(rows, source, treatments, readers, cases)
    shape = (len(treatments), len(readers), len(cases))
    by_line = dict(rows)
    ratings = np.full(shape, np.nan)
    has_answer = any(row.get("answer", "") != "" for _, row in rows)
    has_seconds = any(row.get("seconds", "") != "" for _, row in rows)
    answers = np.full(shape, np.nan) if has_answer else None
    seconds = np.full(shape, np.nan) if has_seconds else None
    sessions = {}
    for i, t in enumerate(treatments):
        for j, r in enumerate(readers):
            for k, c in enumerate(cases):
                if (t, r, c) not in index:
                    continue  # split-plot: another block's case
                row = by_line[index[(t, r, c)]]
                ratings[i, j, k] = float(row["rating"])
                if answers is not None:
                    answers[i, j, k] = answer_is_abnormal(row.get("answer", ""), normal_label)
                if seconds is not None and row.get("seconds", ""):
                    seconds[i, j, k] = float(row["seconds"])
                if row.get("session"):
                    sessions[(t, r, c)] = row["session"]
    read = ~np.isnan(ratings)
    if answers is not None and np.isnan(answers[read]).any():
        lines = sorted(index[(treatments[i], readers[j], cases[k])]
                       for i, j, k in np.argwhere(np.isnan(answers) & read))
        raise DataError(f"{source}: answer is empty on line(s) {_lines(lines)} while other rows have one; give every "
                        "reading an answer or leave the column out")
    truth = np.array([truth_of[c] for c in cases], dtype=int)
    case_block = np.array([reader_block[int(np.argmax(read[0, :, k]))] for k in range(len(cases))])
    for b in range(int(reader_block.max()) + 1):
        kinds = set(truth[case_block == b].tolist())
        if len(kinds) < 2:
            who = ", ".join(repr(r) for r, rb in zip(readers, reader_block) if rb == b)
            raise DataError(f"{source}: the cases of reader(s) {who} are all {'abnormal' if kinds == {1} else 'normal'}; "
                            "each block of a split-plot study needs normal and abnormal cases")
    return Reads(treatments, readers, cases, truth, ratings, answers, seconds, source, sessions,
                 reader_block=reader_block, case_block=case_block)
