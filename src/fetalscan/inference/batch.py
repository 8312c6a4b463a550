"""Archive-scale batch prediction: streamed, appended as it goes, resumable, sharded, optionally on Ray.

``fetalscan predict`` on a folder (or with ``--resume``, ``--shard`` or ``--engine ray``) runs
:func:`predict_archive`. It never holds the archive in memory: the folder is walked lazily in
sorted order (:func:`iter_source_records`, the order ``load_dataset`` gives), records are cut
into chunks of ``chunk`` images (whole files: a cine's frames stay together), and each chunk goes
through **the** prediction path, :func:`fetalscan.inference.predict.predict`, which itself
decodes ``CHUNK_BATCHES * batch_size`` images at a time. The rows of each chunk are appended to
``predictions.csv`` (same columns and number formatting as the whole-list path) and made durable
(``flush`` + ``fsync``) before the next chunk starts; ``patients.csv`` is aggregated from the
per-image rows once every image is done.

- ``resume``: the rows already in ``predictions.csv`` are read (image id = path + frame) and
  those images are skipped; a partial last line left by a killed run is cut off first, so no
  row is lost twice or written twice. ``predict_run.json`` (model hash, data, options, shard)
  must match, so a resumed run cannot mix two models.
- ``shard`` ``i/n``: this run predicts the files whose relative path hashes (SHA-1, stable
  across machines and Python versions) to ``i`` modulo ``n``; the ``n`` shards of a Slurm
  array partition the archive. Each shard writes its own folder (``predictions.csv`` only:
  a patient's images may fall in several shards); :func:`merge_shards`
  (``fetalscan predict-merge``) checks that every shard is there and finished, and writes
  the whole ``predictions.csv`` and ``patients.csv``.
- ``engine`` ``ray``: the same chunks run in a pool of Ray actors, each holding the loaded
  model once (Ray Data ``from_items`` + ``map_batches`` with ``concurrency``; Moritz et al. 2018,
  "Ray: A Distributed Framework for Emerging AI Applications", OSDI). Each actor calls
  :func:`~fetalscan.inference.predict.predict` and returns the CSV rows; the driver appends
  them in order. ``ray_address`` ``""`` starts (or reuses) a Ray instance on this machine,
  ``auto`` joins a running cluster (``ray start --head`` / ``ray start --address``).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from fetalscan.data.records import Dataset, Record, expand_file, load_dataset, media_kind
from fetalscan.errors import DataError, FetalscanError, OutputError
from fetalscan.inference.predict import PredictConfig, predict
from fetalscan.inference.tables import META_COLUMNS, PLANE_COLUMNS, aggregate_groups, classes_from_columns

log = logging.getLogger(__name__)

ENGINES = ("local", "ray")
PREDICTIONS = "predictions.csv"
PATIENTS = "patients.csv"
RUN_FILE = "predict_run.json"

#: Test hook: after this many chunks, write half of the next one and SIGKILL this process
#: (a deterministic stand-in for a run killed in the middle of a write).
KILL_ENV = "FETALSCAN_TEST_KILL_AFTER_CHUNKS"

#: Options whose change makes a resumed run's rows incomparable with the earlier ones.
_RESUME_KEYS = ("aggregate", "normal_class", "plane_check", "crop", "backend")


@dataclass
class BatchConfig:
    """How an archive is predicted; the CLI maps ``--engine``, ``--shard``, ``--resume``,
    ``--chunk``, ``--ray-address`` and ``--ray-actors`` onto these fields."""

    engine: str = "local"
    shard: str = ""  # "i/n": this run's share of the files; "" = all
    resume: bool = False
    chunk: int = 512  # images per appended chunk (and per Ray batch)
    ray_address: str = ""  # "" = a Ray instance on this machine; "auto" = the running cluster
    ray_actors: int = 0  # Ray actors holding the model; 0 = one per CPU Ray offers (at most 8)

    def validate(self) -> None:
        if self.engine not in ENGINES:
            raise FetalscanError(f"--engine must be one of {', '.join(ENGINES)}, got {self.engine!r}")
        if self.chunk < 1:
            raise FetalscanError(f"--chunk must be >= 1, got {self.chunk}")
        if self.ray_actors < 0:
            raise FetalscanError(f"--ray-actors must be >= 0 (0 = automatic), got {self.ray_actors}")
        parse_shard(self.shard)

    def to_dict(self) -> dict:
        return asdict(self)


def parse_shard(spec: str) -> tuple[int, int]:
    """``"i/n"`` -> ``(i, n)``; ``""`` -> ``(0, 1)``. Errors name the option and the valid range."""
    if not spec:
        return 0, 1
    m = re.fullmatch(r"\s*(-?\d+)\s*/\s*(-?\d+)\s*", str(spec))
    if not m:
        raise FetalscanError(f"--shard {spec}: expected i/n (e.g. 0/8: the first of 8 shards)")
    i, n = int(m.group(1)), int(m.group(2))
    if n < 1:
        raise FetalscanError(f"--shard {spec}: the number of shards must be >= 1")
    if not 0 <= i < n:
        raise FetalscanError(f"--shard {spec}: shard index must be 0..{n - 1}")
    return i, n


def shard_of(name: str, n: int) -> int:
    """Shard (``0..n-1``) of a file by a stable hash of its relative path (SHA-1, first 8 bytes)."""
    return int.from_bytes(hashlib.sha1(name.encode("utf-8")).digest()[:8], "big") % n


# --------------------------------------------------------------------------- the records, lazily


@dataclass
class RecordSource:
    """What ``--data`` names and how it is read (the ``load_dataset`` options)."""

    path: Path
    group_regex: str | None = None
    classes: Sequence[str] | None = None
    every_nth: int = 1
    sector_mask: bool = False


def _sorted_files(folder: Path) -> Iterator[Path]:
    """Files under ``folder`` in ``sorted(folder.rglob("*"))`` order, found lazily (depth first, names sorted)."""
    try:
        entries = sorted(os.scandir(folder), key=lambda e: e.name)
    except OSError as exc:
        raise DataError(f"cannot list {folder}: {exc.strerror or exc}") from exc
    for e in entries:
        if e.is_dir():
            yield from _sorted_files(Path(e.path))
        elif e.is_file() and not e.name.startswith("."):
            p = Path(e.path)
            if media_kind(p) != "unknown":
                yield p


def iter_source_records(source: RecordSource) -> Iterator[Record]:
    """The records of ``source`` one file at a time, in the order :func:`load_dataset` gives them.

    A folder is walked lazily (a folder-per-class tree: labels from the first level, as in
    ``load_dataset``); a manifest or a single file is loaded whole (its records are small).
    The dataset-wide checks of ``load_dataset`` that need every record at once (one label per
    group, label spellings) are not made here; a group with two labels still fails when
    ``patients.csv`` is aggregated.
    """
    root = Path(source.path).resolve()
    if not root.exists():
        raise DataError(f"data not found: {root}")
    if not root.is_dir():
        yield from load_dataset(root, require_labels=False, group_regex=source.group_regex,
                                classes=source.classes, every_nth=source.every_nth,
                                sector_mask=source.sector_mask).records
        return
    if source.every_nth < 1:
        raise DataError(f"every_nth must be >= 1, got {source.every_nth}")
    regex = None
    if source.group_regex:
        try:
            regex = re.compile(source.group_regex)
        except re.error as exc:
            raise DataError(f"group_regex {source.group_regex!r} is not a valid regular expression: {exc}") from None
    class_dirs = sorted((p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")),
                        key=lambda p: p.name)
    tops = [(c, c.name) for c in class_dirs] if class_dirs else [(root, None)]
    n = 0
    for folder, label in tops:
        n_here = 0
        for path in _sorted_files(folder):
            rel = path.relative_to(root).as_posix()
            group = None
            if regex is not None:
                m = regex.search(rel)
                if not m:
                    raise DataError(f"group_regex {regex.pattern!r} does not match {rel} ({path})")
                group = m.group(1) if m.groups() else m.group(0)
            for r in expand_file(path, label, group, rel, source.every_nth):
                n_here += 1
                yield r if not source.sector_mask else _masked(r)
        if label is not None and not n_here:
            raise DataError(f"{folder}: empty class folder (no image, DICOM or video files)")
        n += n_here
    if not n:
        raise DataError(f"{root}: empty folder (no image, DICOM or video files)")


def _masked(r: Record) -> Record:
    from dataclasses import replace

    return replace(r, sector_mask=True)


def image_key(path: str, frame) -> str:
    """The id of one row: its path, and ``#frame`` for a frame of a cine file."""
    frame = "" if frame is None or (isinstance(frame, float) and np.isnan(frame)) else str(frame)
    return f"{path}#{frame}" if frame != "" else str(path)


def _chunks(records: Iterable[Record], size: int) -> Iterator[list[Record]]:
    """Lists of about ``size`` records, cut only between files (a cine file is decoded once)."""
    chunk: list[Record] = []
    for r in records:
        if len(chunk) >= size and r.path != chunk[-1].path:
            yield chunk
            chunk = []
        chunk.append(r)
    if chunk:
        yield chunk


# --------------------------------------------------------------------------- rows as CSV text


def rows_text(images: pd.DataFrame, header: bool) -> str:
    """``predictions.csv`` text of ``images`` (the formatting of :func:`~fetalscan.fileio.write_csv`)."""
    buf = io.StringIO()
    images.to_csv(buf, index=False, header=header, lineterminator="\n")
    return buf.getvalue()


def _predict_chunk(loaded, records: list[Record], cfg: PredictConfig, device) -> tuple[str, list[str], list[str]]:
    """One chunk through :func:`predict`: (CSV text with header, columns, notes)."""
    pred = predict(loaded, Dataset(records, [], "batch"), cfg, device, aggregate_patients=False)
    return rows_text(pred.images, header=True), list(map(str, pred.images.columns)), list(pred.notes)


# --------------------------------------------------------------------------- the run


@dataclass
class ArchiveResult:
    """What :func:`predict_archive` did."""

    out: Path
    n_images: int  # rows in predictions.csv now
    n_new: int  # rows this run added
    n_skipped: int  # images found already done (resume)
    n_groups: int | None  # rows of patients.csv (None for a shard)
    notes: list[str] = field(default_factory=list)


def _run_info(model: Path, source: RecordSource, cfg: PredictConfig, batch: BatchConfig, classes) -> dict:
    from fetalscan.fileio import sha256_file

    return {"model": str(Path(model).resolve()), "model_sha256": sha256_file(model), "classes": list(classes),
            "data": str(Path(source.path).resolve()), "group_regex": source.group_regex,
            "every_nth": source.every_nth, "sector_mask": source.sector_mask, "shard": batch.shard or "0/1",
            "config": cfg.to_dict(), "finished": False}


def _check_resumable(out: Path, info: dict) -> None:
    path = out / RUN_FILE
    try:
        before = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise OutputError(f"--resume: {path} is missing or unreadable ({exc}); {out} does not hold a "
                          "`fetalscan predict` run to resume (run without --resume, with --overwrite)") from None
    for key in ("model_sha256", "data", "shard", "group_regex", "every_nth", "sector_mask"):
        if before.get(key) != info[key]:
            raise OutputError(f"--resume: {out} was predicted with {key} = {before.get(key)!r}, this run has "
                              f"{info[key]!r}; resume with the same model, data and options, or start over "
                              "with --overwrite")
    for key in _RESUME_KEYS:
        if (before.get("config") or {}).get(key) != info["config"].get(key):
            raise OutputError(f"--resume: {out} was predicted with {key} = {before['config'].get(key)!r}, this "
                              f"run has {info['config'].get(key)!r}; resume with the same options")


def repair_partial_line(csv_path: Path) -> int:
    """Cut a partial last line (no newline: the run was killed while writing it); returns bytes removed."""
    size = csv_path.stat().st_size
    if not size:
        return 0
    with open(csv_path, "rb+") as fh:
        fh.seek(-1, os.SEEK_END)
        if fh.read(1) == b"\n":
            return 0
        pos, block = size, 1 << 16
        while pos > 0:  # find the last newline
            start = max(0, pos - block)
            fh.seek(start)
            data = fh.read(pos - start)
            k = data.rfind(b"\n")
            if k >= 0:
                keep = start + k + 1
                break
            pos = start
        else:
            keep = 0
        fh.truncate(keep)
        fh.flush()
        os.fsync(fh.fileno())
    log.warning("%s ended in a partial line (a run killed while writing); removed its %d byte(s)", csv_path,
                size - keep)
    return size - keep


def done_keys(csv_path: Path) -> tuple[set[str], list[str] | None]:
    """Image ids (``path#frame``) already in ``predictions.csv`` and its header (``None`` if empty)."""
    if not csv_path.is_file() or not csv_path.stat().st_size:
        return set(), None
    keys: set[str] = set()
    header = None
    for part in pd.read_csv(csv_path, dtype=str, keep_default_na=False, usecols=lambda c: c in ("path", "frame"),
                            chunksize=50_000):
        keys.update(image_key(p, f) for p, f in zip(part["path"], part.get("frame", [""] * len(part))))
    header = pd.read_csv(csv_path, nrows=0).columns.map(str).tolist()
    return keys, header


def read_predictions(csv_path: Path, skip: Sequence[str] = ()) -> pd.DataFrame:
    """``predictions.csv`` back as the frame :func:`predict` made (text columns kept as text),
    without the columns named in ``skip``."""
    classes = classes_from_columns(pd.read_csv(csv_path, nrows=0).columns.map(str).tolist())
    df = pd.read_csv(csv_path, dtype=str, keep_default_na=False, usecols=lambda c: c not in skip)
    for c in classes:
        df[f"p_{c}"] = df[f"p_{c}"].astype(np.float64)
    for col in ("frame", "fold"):
        if col in df:
            df[col] = pd.array([int(v) if v != "" else pd.NA for v in df[col]], dtype="Int64")
    for col in ("ga_weeks", PLANE_COLUMNS[1]):
        if col in df:
            df[col] = pd.to_numeric(df[col].replace("", np.nan))
    if PLANE_COLUMNS[2] in df:
        df[PLANE_COLUMNS[2]] = df[PLANE_COLUMNS[2]].map({"True": True, "False": False})
    for col in META_COLUMNS[1:]:
        if col in df:
            df[col] = df[col].replace("", None)
    return df


def write_patients(out: Path, aggregate: str, normal_class: str) -> int:
    """``patients.csv`` from the per-image rows of ``out/predictions.csv``; returns its number of rows."""
    from fetalscan.fileio import write_csv

    classes = classes_from_columns(pd.read_csv(out / PREDICTIONS, nrows=0).columns.map(str).tolist())
    images = read_predictions(out / PREDICTIONS, skip=("path", "frame", "pred"))  # not read by the aggregation
    patients = aggregate_groups(images, classes, aggregate, normal_class)
    write_csv(out / PATIENTS, patients)
    return len(patients)


def predict_archive(model: str | Path, source: RecordSource | str | Path, out: str | Path,
                    config: PredictConfig | None = None, batch: BatchConfig | None = None, *,
                    device: torch.device | str = "cpu", overwrite: bool = False) -> ArchiveResult:
    """Predict every image of ``source`` into ``out`` chunk by chunk (module docstring).

    Parameters
    ----------
    model : path
        A checkpoint of ``fetalscan train``.
    source : RecordSource or path
        A folder (walked lazily), a manifest, or one file.
    out : path
        Refused when not empty, unless ``overwrite`` (start over) or ``batch.resume``.
    config : PredictConfig
    batch : BatchConfig
        Engine, shard, resume and chunk size.

    Returns
    -------
    ArchiveResult
    """
    from fetalscan.fileio import check_out_dir, prepare_out_dir, write_json
    from fetalscan.models.checkpoint import load_checkpoint

    cfg = config or PredictConfig()
    cfg.validate()
    batch = batch or BatchConfig()
    batch.validate()
    source = source if isinstance(source, RecordSource) else RecordSource(Path(source))
    if batch.resume and overwrite:
        raise FetalscanError("--resume and --overwrite contradict each other: --resume keeps the rows in --out, "
                             "--overwrite starts over")
    out = Path(out)
    resuming = batch.resume and (out / RUN_FILE).is_file()
    out = check_out_dir(out, overwrite or resuming)
    shard_i, shard_n = parse_shard(batch.shard)
    device = torch.device(device)
    loaded = load_checkpoint(model, device)
    info = _run_info(Path(model), source, cfg, batch, loaded.classes)
    csv_path = out / PREDICTIONS
    done: set[str] = set()
    header = None
    if resuming:
        _check_resumable(out, info)
        if csv_path.is_file():
            repair_partial_line(csv_path)
            done, header = done_keys(csv_path)
    records = (r for r in iter_source_records(source) if shard_n == 1 or shard_of(r.name, shard_n) == shard_i)
    skipped = 0

    def todo() -> Iterator[Record]:
        nonlocal skipped
        for r in records:
            if done and image_key(str(r.path), r.frame) in done:
                skipped += 1
                continue
            yield r

    pending = todo()
    first = next(pending, None)
    if first is None and not done and shard_n == 1:
        raise DataError(f"{source.path}: no images to predict")
    prepare_out_dir(out, overwrite=True)
    if not resuming or not (out / RUN_FILE).is_file():
        write_json(out / RUN_FILE, info)
        if csv_path.exists():
            csv_path.unlink()  # --overwrite: start over
    notes: list[str] = []
    n_new = 0
    if first is not None:
        import itertools

        stream = itertools.chain([first], pending)
        results = (_ray_results(model, stream, cfg, batch, device) if batch.engine == "ray"
                   else _local_results(loaded, stream, cfg, batch, device))
        n_new = _append(csv_path, results, header, notes)
    n_images = len(done) + n_new
    n_groups = None
    info["finished"] = True
    info["n_images"] = n_images
    if shard_n == 1:
        if n_images:
            n_groups = write_patients(out, cfg.aggregate, cfg.normal_class)
    else:
        notes.append(f"shard {shard_i}/{shard_n}: predictions.csv only (a patient's images may be in several "
                     "shards); `fetalscan predict-merge` writes the whole predictions.csv and patients.csv")
    write_json(out / RUN_FILE, info)
    if not n_images:  # a shard that no file hashed to (more shards than files): finished, and empty
        notes.append(f"shard {batch.shard}: no file of {source.path} falls in this shard")
    return ArchiveResult(out, n_images, n_new, skipped, n_groups, notes)


def _local_results(loaded, records: Iterable[Record], cfg: PredictConfig, batch: BatchConfig, device):
    from fetalscan.progress import step

    n = 0
    for chunk in _chunks(records, batch.chunk):
        yield _predict_chunk(loaded, chunk, cfg, device)
        n += len(chunk)
        step(f"predicted {n} images")


def _append(csv_path: Path, results: Iterable[tuple[str, list[str], list[str]]], header: list[str] | None,
            notes: list[str]) -> int:
    """Append each chunk's rows to ``csv_path`` (header once), flushed and fsynced per chunk."""
    kill_after = int(os.environ.get(KILL_ENV, "0") or 0)
    n_rows = 0
    with open(csv_path, "a", encoding="utf-8", newline="") as fh:
        for k, (text, columns, chunk_notes) in enumerate(results):
            body = text.partition("\n")[2]
            if header is None:
                header = columns
                body = text  # header line + rows
            elif columns != header:
                raise OutputError(f"{csv_path}: this chunk's columns {columns} differ from the file's {header} "
                                  "(another model, options or manifest columns); start over with --overwrite")
            if kill_after and k == kill_after:  # test hook: killed in the middle of a write
                import signal

                fh.write(body[: len(body) // 2 + 1])
                fh.flush()
                os.fsync(fh.fileno())
                os.kill(os.getpid(), signal.SIGKILL)
            fh.write(body)
            fh.flush()
            os.fsync(fh.fileno())
            n_rows += body.count("\n") - (1 if body is text else 0)
            for note in chunk_notes:
                if note not in notes and len(notes) < 20:
                    notes.append(note)
    return n_rows


# --------------------------------------------------------------------------- Ray


class _RayPredictor:
    """A Ray actor holding the loaded model; each batch of pickled records goes through :func:`predict`."""

    def __init__(self, model: str, cfg: dict, device: str) -> None:
        from fetalscan.models.checkpoint import load_checkpoint

        torch.set_num_threads(1)
        self.cfg = PredictConfig(**cfg)
        self.device = torch.device(device)
        self.loaded = load_checkpoint(model, self.device)

    def __call__(self, batch: dict) -> dict:
        import pickle

        records = [pickle.loads(b) for b in batch["record"]]
        text, columns, notes = _predict_chunk(self.loaded, records, self.cfg, self.device)
        return {"seq": np.array([int(batch["seq"][0])]), "csv": np.array([text], dtype=object),
                "columns": np.array([json.dumps(columns)], dtype=object), "notes": np.array([json.dumps(notes)],
                                                                                           dtype=object)}


def _ray_results(model, records: Iterable[Record], cfg: PredictConfig, batch: BatchConfig, device):
    """The chunks of ``records`` predicted by a pool of Ray actors, in order (Ray Data ``map_batches``)."""
    import pickle

    try:
        import ray
    except ImportError as exc:
        raise FetalscanError("--engine ray needs Ray: pip install 'fetalscan[scale]' (ray[data])") from exc
    if not ray.is_initialized():
        ray.init(address=batch.ray_address or None, include_dashboard=False, ignore_reinit_error=True,
                 log_to_driver=False)
    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True  # rows appended in the archive's order
    items = [{"seq": k, "record": pickle.dumps(r)} for k, r in enumerate(records)]
    actors = batch.ray_actors or max(1, min(8, int(ray.available_resources().get("CPU", 1))))
    ds = ray.data.from_items(items, override_num_blocks=max(1, -(-len(items) // batch.chunk)))
    gpu = 1 if torch.device(device).type == "cuda" else 0
    out = ds.map_batches(_RayPredictor, fn_constructor_args=(str(Path(model).resolve()), cfg.to_dict(), str(device)),
                         batch_size=batch.chunk, batch_format="numpy", concurrency=actors, num_gpus=gpu,
                         num_cpus=1)
    del items
    for row in out.iter_rows():
        yield str(row["csv"]), json.loads(row["columns"]), json.loads(row["notes"])


# --------------------------------------------------------------------------- shards


def merge_shards(folders: Sequence[str | Path], out: str | Path, overwrite: bool = False) -> ArchiveResult:
    """``fetalscan predict-merge``: the shard folders of one sharded run -> the whole ``predictions.csv``
    (rows in path order, each image once) and ``patients.csv``.

    Every shard ``0..n-1`` must be present exactly once and finished, all with the same model,
    data and options; an image in two shards is an error.
    """
    from fetalscan.fileio import check_out_dir, prepare_out_dir, write_csv, write_json

    folders = [Path(f) for f in folders]
    if not folders:
        raise FetalscanError("predict-merge: name the shard folders to merge")
    infos = []
    for f in folders:
        try:
            infos.append(json.loads((f / RUN_FILE).read_text(encoding="utf-8")))
        except (OSError, ValueError) as exc:
            raise DataError(f"predict-merge: {f / RUN_FILE} is missing or unreadable ({exc}); is {f} the --out "
                            "of a `fetalscan predict --shard` run?") from None
    ref = infos[0]
    n = parse_shard(ref["shard"])[1]
    seen: dict[int, Path] = {}
    for f, info in zip(folders, infos):
        i, n_i = parse_shard(info["shard"])
        for key in ("model_sha256", "data", "group_regex", "every_nth", "sector_mask", "config"):
            if info.get(key) != ref.get(key):
                raise DataError(f"predict-merge: {f} was predicted with another {key} than {folders[0]}")
        if n_i != n:
            raise DataError(f"predict-merge: {f} is shard {info['shard']}, {folders[0]} one of {n}")
        if i in seen:
            raise DataError(f"predict-merge: shard {i}/{n} given twice ({seen[i]} and {f})")
        if not info.get("finished"):
            raise DataError(f"predict-merge: shard {info['shard']} in {f} did not finish; rerun it with --resume")
        seen[i] = f
    missing = sorted(set(range(n)) - set(seen))
    if missing:
        raise DataError(f"predict-merge: shard(s) {', '.join(f'{i}/{n}' for i in missing)} missing")
    out = check_out_dir(out, overwrite)
    parts = [read_predictions(seen[i] / PREDICTIONS) for i in range(n) if (seen[i] / PREDICTIONS).is_file()]
    images = pd.concat(parts, ignore_index=True)
    keys = [image_key(p, None if pd.isna(fr) else int(fr)) for p, fr in zip(images["path"], images["frame"])]
    dup = pd.Series(keys)[pd.Series(keys).duplicated()]
    if len(dup):
        raise DataError(f"predict-merge: {len(dup)} image(s) appear in two shards, e.g. {dup.iloc[0]}")
    order = sorted(range(len(images)), key=lambda k: (Path(images["path"].iloc[k]).parts,
                                                      -1 if pd.isna(images["frame"].iloc[k])
                                                      else int(images["frame"].iloc[k])))
    images = images.iloc[order].reset_index(drop=True)
    cfg = ref["config"]
    patients = aggregate_groups(images, classes_from_columns(images.columns), cfg["aggregate"], cfg["normal_class"])
    prepare_out_dir(out, overwrite=True)
    write_csv(out / PREDICTIONS, images)
    write_csv(out / PATIENTS, patients)
    write_json(out / RUN_FILE, {**ref, "shard": "0/1", "merged_from": [str(seen[i]) for i in range(n)],
                                "finished": True, "n_images": len(images)})
    return ArchiveResult(out, len(images), 0, 0, len(patients))
