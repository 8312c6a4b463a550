"""``fetalscan reader-study create``: a reader study's design from a case manifest.

A *case* is a manifest ``group`` (a patient / exam) with all its images; its class is the
manifest label and its truth is ``label != normal_label`` (1 = abnormal).

Designs (Obuchowski 1995; Obuchowski, Gallas & Hillis 2012, "Multi-reader ROC studies with
split-plot designs", Acad Radiol 19:1508-1517):

- ``crossover`` (fully crossed): every reader reads every case once in every arm; one arm per
  session, sessions ``washout_days`` apart so that readers forget the cases.
- ``split-plot``: readers are dealt into ``blocks`` groups and the cases into as many blocks,
  balanced by class (each class's cases are dealt round-robin over the blocks); each reader
  group reads only its block, in every arm. Fewer readings per reader for the same number of
  cases; ``analyze`` recognises the blocks in the readings (readers of different blocks share
  no case, so their covariances are 0; Obuchowski, Gallas & Hillis 2012).

Arm order is counterbalanced across readers with a Williams design (Williams 1949): a Latin
square over arms x sessions in which each arm also follows every other arm equally often
(for an odd number of arms, the square and its mirror image, 2 x arms rows); reader ``j`` of a
block takes row ``j`` modulo the number of rows, so with a multiple of that many readers per
block every arm is read equally often in every session. The order of cases within a session is
random for each reader and session. Arms:

- ``unaided``: the reader alone;
- ``concurrent``: the AI output (probabilities, heatmap) shown from the start;
- ``second-read``: sequential reading - the reader answers unaided, that answer is kept, then
  the AI output is shown and the reader gives the final answer (both are recorded).

Everything but the login codes is a function of the manifest and the seed. Files (plain CSV/JSON):
``design.json``, ``cases.csv`` (case, label, truth, block, images), ``worklist.csv`` (one row per
reading: reader, block, session, day, order, case, arm, ai_shown, sequential),
``readers/<reader>.csv`` (each reader's list), ``readers.csv`` (reader, block, arm order) and
``logins.csv`` (reader, login code; random, not seeded - hand each reader only their own).
"""

from __future__ import annotations

import secrets
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from fetalscan.errors import DataError, FetalscanError

ARM_KINDS = {"unaided": "unaided", "concurrent": "concurrent", "second-read": "second-read",
             "second_read": "second-read", "sequential": "second-read", "second-reader": "second-read"}
AI_SHOWN = {"unaided": "never", "concurrent": "from_start", "second-read": "after_first_answer"}
DESIGNS = ("crossover", "split-plot")
WORKLIST_COLUMNS = ("reader", "block", "session", "day", "order", "case", "arm", "ai_shown", "sequential")


@dataclass
class DesignConfig:
    """Options of ``reader-study create``."""

    readers: int = 3
    arms: tuple[str, ...] = ("unaided", "concurrent", "second-read")
    design: str = "crossover"
    washout_days: int = 28
    blocks: int = 2  # split-plot only: reader groups = case blocks
    seed: int = 0
    normal_label: str = "normal"


@dataclass
class Case:
    """One case of the study: a manifest group."""

    case: str
    label: str
    truth: int
    images: list[str]
    block: int = 0


@dataclass
class StudyDesign:
    """A created design: cases, reader schedules and the worklist (one dict per reading)."""

    config: DesignConfig
    cases: list[Case]
    readers: list[dict]
    worklist: list[dict]
    square: list[list[str]]
    notes: list[str] = field(default_factory=list)

    def summary(self) -> dict:
        """JSON-ready description (``design.json`` without provenance)."""
        by_block = defaultdict(Counter)
        for c in self.cases:
            by_block[c.block][c.label] += 1
        return {"design": self.config.design, "config": {**asdict(self.config), "arms": list(self.config.arms)},
                "arms": [{"name": a, "kind": ARM_KINDS[a], "ai_shown": AI_SHOWN[ARM_KINDS[a]]}
                         for a in self.config.arms],
                "square": self.square, "readers": self.readers,
                "n_cases": len(self.cases), "n_readings": len(self.worklist),
                "cases_per_block_and_class": {str(b): dict(sorted(cnt.items())) for b, cnt in sorted(by_block.items())},
                "notes": self.notes}


def williams_rows(n: int) -> list[list[int]]:
    """Rows of a Williams design for ``n`` treatments (n rows if n is even, 2n if odd)."""
    first = [0]
    lo, hi = 1, n - 1
    for k in range(1, n):
        if k % 2:
            first.append(lo)
            lo += 1
        else:
            first.append(hi)
            hi -= 1
    rows = [[(x + i) % n for x in first] for i in range(n)]
    if n % 2:
        rows += [row[::-1] for row in rows]
    return rows


def _check_config(cfg: DesignConfig) -> None:
    if cfg.design not in DESIGNS:
        raise FetalscanError(f"unknown design {cfg.design!r}; expected one of {', '.join(DESIGNS)}")
    if cfg.readers < 2:
        raise FetalscanError(f"a multi-reader study needs at least 2 readers; got {cfg.readers}")
    if len(cfg.arms) < 2:
        raise FetalscanError(f"a reader study compares at least 2 arms; got {', '.join(cfg.arms) or 'none'}")
    unknown = [a for a in cfg.arms if a not in ARM_KINDS]
    if unknown:
        raise FetalscanError(f"unknown arm(s) {', '.join(map(repr, unknown))}; expected unaided, concurrent, "
                             "second-read")
    if len(set(cfg.arms)) != len(cfg.arms):
        raise FetalscanError(f"arms repeat: {', '.join(cfg.arms)}")
    if cfg.washout_days < 0:
        raise FetalscanError(f"--washout-days must be 0 or more; got {cfg.washout_days}")
    if cfg.design == "split-plot" and not 2 <= cfg.blocks <= cfg.readers:
        raise FetalscanError(f"a split-plot design needs 2 to {cfg.readers} blocks (one reader group each); "
                             f"got {cfg.blocks}")


def cases_from_records(records, normal_label: str = "normal", source: str = "manifest") -> list[Case]:
    """One :class:`Case` per group of manifest records, sorted by name."""
    images: dict[str, list[str]] = defaultdict(list)
    labels: dict[str, str] = {}
    for r in records:
        images[r.group].append(r.image_id)
        labels[r.group] = r.label
    cases = [Case(g, labels[g], int(labels[g] != normal_label), images[g]) for g in sorted(images)]
    kinds = {c.truth for c in cases}
    if len(kinds) < 2:
        only = "normal" if kinds == {0} else "abnormal"
        raise DataError(f"{source}: every case is {only} (normal label {normal_label!r}); a reader study of detection "
                        "needs normal and abnormal cases (set --normal-label if the normal class has another name)")
    return cases


def _deal_blocks(cases: list[Case], blocks: int, rng: np.random.Generator) -> None:
    """Assign blocks class by class, round-robin from a rotating start, so every class is balanced (±1)
    and block sizes differ by at most one."""
    by_class = defaultdict(list)
    for c in cases:
        by_class[c.label].append(c)
    sizes = [0] * blocks
    for label in sorted(by_class):
        members = [by_class[label][i] for i in rng.permutation(len(by_class[label]))]
        order = sorted(range(blocks), key=lambda b: (sizes[b], b))  # smallest blocks first
        for k, c in enumerate(members):
            c.block = order[k % blocks]
            sizes[c.block] += 1


def create_design(cases: list[Case], config: DesignConfig | None = None) -> StudyDesign:
    """The design for ``cases`` (see the module docstring); deterministic given ``config.seed``."""
    cfg = config or DesignConfig()
    _check_config(cfg)
    rng = np.random.default_rng(cfg.seed)
    n_blocks = cfg.blocks if cfg.design == "split-plot" else 1
    if cfg.design == "split-plot":
        if len(cases) < n_blocks:
            raise DataError(f"{len(cases)} case(s) cannot fill {n_blocks} blocks")
        _deal_blocks(cases, n_blocks, rng)
    rows = williams_rows(len(cfg.arms))
    arm_of = [cfg.arms[i] for i in rng.permutation(len(cfg.arms))]  # which arm plays which square symbol
    square = [[arm_of[x] for x in row] for row in rows]
    width = len(str(cfg.readers))
    readers, worklist = [], []
    per_block = defaultdict(int)
    for j in range(cfg.readers):
        block = j % n_blocks
        row = square[per_block[block] % len(square)]
        per_block[block] += 1
        name = f"R{j + 1:0{width}d}"
        readers.append({"reader": name, "block": block, "arm_order": list(row)})
        mine = [c for c in cases if c.block == block]
        for s, arm in enumerate(row):
            kind = ARM_KINDS[arm]
            for order, k in enumerate(rng.permutation(len(mine)), start=1):
                worklist.append({"reader": name, "block": block, "session": s + 1, "day": s * cfg.washout_days,
                                 "order": order, "case": mine[k].case, "arm": arm, "ai_shown": AI_SHOWN[kind],
                                 "sequential": int(kind == "second-read")})
    notes = []
    n_arms = len(cfg.arms)
    uneven = sorted({n for n in per_block.values() if n % n_arms})
    if uneven:
        notes.append(f"blocks of {', '.join(map(str, uneven))} reader(s) are not a multiple of {n_arms} arms: arms are "
                     "not read equally often in every session (not counterbalanced)")
    elif any(n % len(square) for n in per_block.values()):
        notes.append(f"each arm is read equally often in every session; which arm follows which is balanced only "
                     f"with a multiple of {len(square)} readers per block (a Williams design for {n_arms} arms)")
    return StudyDesign(cfg, cases, readers, worklist, square, notes)


def write_design(design: StudyDesign, out: str | Path, manifest: str | Path | None = None,
                 overwrite: bool = False) -> dict:
    """Write the design files into ``out`` (see the module docstring); returns ``design.json``'s content."""
    import pandas as pd

    from fetalscan.fileio import prepare_out_dir, provenance, sha256_file, write_csv, write_json

    out = prepare_out_dir(out, overwrite)
    summary = design.summary()
    summary["manifest"] = None if manifest is None else str(Path(manifest).resolve())
    summary["provenance"] = provenance(seed=design.config.seed,
                                       data_hash=None if manifest is None else sha256_file(manifest))
    write_json(out / "design.json", summary)
    write_csv(out / "cases.csv", pd.DataFrame([{"case": c.case, "label": c.label, "truth": c.truth, "block": c.block,
                                                "n_images": len(c.images), "images": ";".join(c.images)}
                                               for c in design.cases]))
    work = pd.DataFrame(design.worklist, columns=list(WORKLIST_COLUMNS))
    write_csv(out / "worklist.csv", work)
    (out / "readers").mkdir(exist_ok=True)
    for name, part in work.groupby("reader", sort=True):
        write_csv(out / "readers" / f"{name}.csv", part)
    write_csv(out / "readers.csv", pd.DataFrame([{"reader": r["reader"], "block": r["block"],
                                                  "arm_order": " > ".join(r["arm_order"])} for r in design.readers]))
    write_csv(out / "logins.csv", pd.DataFrame([{"reader": r["reader"], "login_code": secrets.token_urlsafe(9)}
                                                for r in design.readers]))
    return summary


def create_study(manifest: str | Path, out: str | Path, config: DesignConfig | None = None,
                 overwrite: bool = False) -> dict:
    """``reader-study create``: read the manifest, design the study and write its files."""
    from fetalscan.data.records import load_manifest
    from fetalscan.fileio import check_out_dir

    cfg = config or DesignConfig()
    _check_config(cfg)
    check_out_dir(out, overwrite)
    cases = cases_from_records(load_manifest(Path(manifest)), cfg.normal_label, str(manifest))
    return write_design(create_design(cases, cfg), out, manifest, overwrite)
