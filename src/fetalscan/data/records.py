"""Datasets: manifest CSV, folder-per-class tree, DICOM and video -> :class:`Record` lists.

Sources
-------
- **Manifest CSV** with required columns ``path,label,group`` and optional
  ``ga_weeks,center,device,view`` (``pixel_spacing_mm`` too); paths are relative
  to the CSV. A row may point to an image, a DICOM file or a video; multi-frame
  files expand into one record per (every N-th) frame, all in the row's group.
- **Folder tree** ``ROOT/<class>/<file>``: the class is the sub-folder name; the
  group is the file stem, or the first capture group of ``--group-regex``
  matched against the path relative to ROOT. DICOM files default to their
  StudyInstanceUID as group, videos to their stem.
- **A single file or a flat folder** (prediction only): unlabelled records.

Every image handed on is RGB ``uint8`` ``(H, W, 3)``; grey-scale pictures are
replicated to three channels so that ImageNet backbones and SonoNet (which
averages the channels back to grey) see the same pixels.

The class order is explicit: sorted label names unless the caller passes
``classes``; it is saved in every checkpoint and every output file.
"""

from __future__ import annotations

import csv
import hashlib
import logging
import re
import struct
from collections import defaultdict
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fetalscan.data.limits import MAX_IMAGE_PIXELS, max_image_pixels  # noqa: F401 - the limit of read_image
from fetalscan.errors import DataError, ImageReadError

log = logging.getLogger(__name__)


REQUIRED_COLUMNS = ("path", "label", "group")


OPTIONAL_COLUMNS = ("ga_weeks", "center", "device", "view", "pixel_spacing_mm")


KNOWN_COLUMNS = frozenset(REQUIRED_COLUMNS + OPTIONAL_COLUMNS)


IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".gif", ".webp")


DICOM_EXTENSIONS = (".dcm", ".dicom")


#: Images whose shorter side has fewer pixels than this are still used, with a warning naming the file:
#: upsampled to the network's input they carry almost no anatomy (a 1 x 1 picture is a single colour).
MIN_IMAGE_SIDE = 32


@dataclass(frozen=True)
class Record:
    """One image: a file (and frame, for DICOM cine / video) with its label and group."""

    path: Path
    label: str | None
    group: str
    name: str  # how outputs name the image: manifest path as written, or path relative to the root
    frame: int | None = None
    ga_weeks: float | None = None
    center: str | None = None
    device: str | None = None
    view: str | None = None
    pixel_spacing_mm: float | None = None
    source_row: int | None = None  # 1-based line in the manifest (header = line 1)
    sector_mask: bool = False  # blank the pixels outside the scan sector when read (fetalscan.data.sector)
    label_original: str | None = None  # before --rare-classes merge
    extra: dict[str, str] = field(default_factory=dict, compare=False)  # other manifest columns

    @property
    def image_id(self) -> str:
        """Unique name of the image in outputs: ``name`` or ``name#frame``."""
        return self.name if self.frame is None else f"{self.name}#{self.frame}"

    def where(self) -> str:
        """Human description for error messages: file, frame, manifest row."""
        s = str(self.path)
        if self.frame is not None:
            s += f" (frame {self.frame})"
        if self.source_row is not None:
            s += f" [manifest line {self.source_row}]"
        return s


@dataclass
class Dataset:
    """Records plus the explicit class order."""

    records: list[Record]
    classes: list[str]
    source: str
    notes: list[str] = field(default_factory=list)
    loading: dict = field(default_factory=dict)  # the load_dataset options, to re-read it identically

    def __len__(self) -> int:
        return len(self.records)

    @property
    def labels(self) -> list[str]:
        return [r.label or "" for r in self.records]

    @property
    def groups(self) -> list[str]:
        return [r.group for r in self.records]

    @property
    def y(self) -> np.ndarray:
        """Class indices of the records (requires every record labelled)."""
        index = {c: i for i, c in enumerate(self.classes)}
        return np.array([index[r.label] for r in self.records if r.label is not None], dtype=np.int64)

    @property
    def is_labelled(self) -> bool:
        return all(r.label for r in self.records)

    def subset(self, keep: Sequence[int]) -> Dataset:
        """A dataset with only the records at ``keep`` (same classes)."""
        return Dataset([self.records[i] for i in keep], list(self.classes), self.source, list(self.notes),
                       dict(self.loading))

    def data_hash(self) -> str:
        """SHA-256 over (name, frame, label, group, file bytes hash) of every record."""
        h = hashlib.sha256()
        file_hash: dict[Path, str] = {}
        for r in self.records:
            if r.path not in file_hash:
                file_hash[r.path] = _quick_file_hash(r.path)
            h.update(f"{r.image_id}\t{r.label}\t{r.group}\t{file_hash[r.path]}\n".encode())
        return h.hexdigest()

    def summary(self) -> dict:
        """Counts of images and groups per class."""
        imgs: dict[str, int] = defaultdict(int)
        grps: dict[str, set[str]] = defaultdict(set)
        for r in self.records:
            imgs[r.label or ""] += 1
            grps[r.label or ""].add(r.group)
        return {
            "n_images": len(self.records),
            "n_groups": len({r.group for r in self.records}),
            "classes": list(self.classes),
            "per_class": {c: {"images": imgs.get(c, 0), "groups": len(grps.get(c, ()))} for c in self.classes},
        }


def _quick_file_hash(path: Path) -> str:
    from fetalscan.fileio import sha256_file

    try:
        return sha256_file(path)
    except OSError as exc:
        raise ImageReadError(f"cannot read {path}: {exc.strerror or exc}") from exc


def media_kind(path: Path) -> str:
    """``"image"``, ``"dicom"`` or ``"video"`` (by extension, DICOM also by its magic bytes)."""
    ext = path.suffix.lower()
    if ext in IMAGE_EXTENSIONS:
        return "image"
    if ext in DICOM_EXTENSIONS:
        return "dicom"
    from fetalscan.data import dicom, video

    if video.is_video(path):
        return "video"
    if path.is_file() and dicom.is_dicom(path):
        return "dicom"
    return "unknown"


def read_image(path: Path, max_pixels: int | None = None) -> np.ndarray:
    """Read a still image file as RGB uint8 ``(H, W, 3)``; fully decoded or an error.

    16-bit grey images are scaled by their maximum to 0-255; alpha is dropped;
    palette and CMYK images are converted. A truncated or corrupt file, or one larger
    than ``max_pixels`` (default :func:`max_image_pixels`; checked from the header,
    before decoding), raises :class:`ImageReadError` naming it.
    """
    import warnings

    from PIL import Image, UnidentifiedImageError

    limit = max_image_pixels() if max_pixels is None else int(max_pixels)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own limit decides
            with Image.open(path) as im:
                _check_size(path, im.size, limit)
                im.load()  # force the full decode: truncated files fail here
                return _pil_to_rgb(im)
    except FileNotFoundError:
        raise ImageReadError(f"image not found: {path}") from None
    except Image.DecompressionBombError as exc:
        raise ImageReadError(f"{path}: refused, larger than the limit of {limit:,} pixels (a decompression bomb, "
                             f"or not an ultrasound frame; Pillow: {exc})") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError, IndexError, KeyError, TypeError,
            ZeroDivisionError, MemoryError, struct.error) as exc:  # Pillow's plugins raise all of these on bad input
        raise ImageReadError(f"unreadable or corrupt image {path}: {type(exc).__name__}: {exc}") from exc


def _check_size(path: Path, size: tuple[int, int], limit: int) -> None:
    from fetalscan.data.limits import check_size

    check_size(path, size[0], size[1], limit)


def _pil_to_rgb(im) -> np.ndarray:
    if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(im, dtype=np.float64)
        top = arr.max() if arr.size and arr.max() > 0 else 1.0
        arr = np.clip(arr / top * 255.0, 0, 255).round().astype(np.uint8)
        return np.repeat(arr[..., None], 3, axis=2)
    if im.mode == "L":
        arr = np.asarray(im, dtype=np.uint8)
        return np.repeat(arr[..., None], 3, axis=2)
    return np.asarray(im.convert("RGB"), dtype=np.uint8)


#: Frames of one multi-frame file (DICOM cine, video) decoded at a time: memory holds this many
#: frames, never a whole cine of thousands.
FRAMES_PER_READ = 32


def iter_record_images(records: Sequence[Record]) -> Iterator[tuple[int, np.ndarray]]:
    """Yield ``(index, RGB image)`` for each record, decoding each multi-frame file once.

    Records of the same DICOM / video file are read together, in file order, and
    yielded in the order of ``records`` within that file. Records with ``sector_mask``
    come back blanked outside the scan sector, one mask per file (the DICOM Ultrasound
    Region Sequence, else the pixels of the frames read; :mod:`fetalscan.data.sector`).
    """
    by_file: dict[Path, list[int]] = defaultdict(list)
    order: list[Path] = []
    for i, r in enumerate(records):
        if r.path not in by_file:
            order.append(r.path)
        by_file[r.path].append(i)
    for path in order:
        idx = by_file[path]
        mask = None  # one sector mask per file, found on its first frames
        for start in range(0, len(idx), FRAMES_PER_READ):  # a long cine is decoded a few frames at a time
            part = idx[start:start + FRAMES_PER_READ]
            try:
                images = _read_frames(path, [records[i].frame for i in part])
                if records[part[0]].sector_mask:
                    images, mask = _mask_sector(path, images, mask)
            except ImageReadError as exc:
                row = records[part[0]].source_row
                raise ImageReadError(f"{exc} [manifest line {row}]" if row else str(exc)) from exc
            for i, image in zip(part, images):
                _warn_if_tiny(records[i], image)
                yield i, image


def _warn_if_tiny(record: Record, image: np.ndarray) -> None:
    """A warning naming the file when the image is smaller than :data:`MIN_IMAGE_SIDE` on its short side."""
    h, w = image.shape[:2]
    if min(h, w) < MIN_IMAGE_SIDE:
        log.warning("%s is only %d x %d pixels (below the minimum of %d on the short side): it is classified, "
                    "but its result means little; check that it is the image you meant", record.where(), w, h,
                    MIN_IMAGE_SIDE)


def _mask_sector(path: Path, images: list[np.ndarray],
                 mask: np.ndarray | None = None) -> tuple[list[np.ndarray], np.ndarray | None]:
    """The images of one file blanked outside its scan sector, and the mask used.

    ``mask`` is the file's mask found on its earlier frames (one mask per clip); without it
    the sector is found now. Unmasked, with a warning, when no sector is found.
    """
    from fetalscan.data import sector

    if mask is None:
        regions = sector.ultrasound_regions(path) if media_kind(path) == "dicom" else None
        try:
            mask = sector.detect_sector(images, regions, where=str(path)).mask
        except DataError as exc:  # e.g. an all-dark frame: used whole, and said
            log.warning("%s; the image is used unmasked (--sector-mask)", exc)
            return images, None
    return [sector.apply_mask(im, mask) for im in images], mask


def _read_frames(path: Path, frames: list[int | None]) -> list[np.ndarray]:
    """Images of ``frames`` of one file (``None`` = a still image or single-frame DICOM)."""
    from fetalscan.data import dicom, video

    kind = media_kind(path)
    if kind == "image":
        return [read_image(path)] * len(frames)
    if kind == "dicom":
        return dicom.read_dicom_frames(path, [0 if f is None else int(f) for f in frames])
    if kind == "video":
        return video.read_video_frames(path, [int(f or 0) for f in frames])
    raise ImageReadError(f"unsupported file type: {path}")


def read_record_image(record: Record) -> np.ndarray:
    """The RGB image of one record."""
    return next(iter_record_images([record]))[1]


def expand_file(
    path: Path,
    label: str | None,
    group: str | None,
    name: str,
    every_nth: int = 1,
    **meta,
) -> list[Record]:
    """Records for one file: one for an image, one per selected frame for DICOM / video.

    ``group=None`` means "derive it": DICOM -> a pseudonym of the StudyInstanceUID
    (:func:`fetalscan.data.dicom.study_pseudonym`; else the stem),
    anything else -> the file stem.
    """
    if not path.is_file():
        raise DataError(f"file not found: {path}")
    kind = media_kind(path)
    if kind == "image":
        return [Record(path, label, group or path.stem, name, **meta)]
    from fetalscan.data import dicom, video

    if kind == "dicom":
        info = dicom.read_dicom_info(path)
        if meta.get("pixel_spacing_mm") is None and info.pixel_spacing_mm is not None:
            meta["pixel_spacing_mm"] = info.pixel_spacing_mm
        group = group or (dicom.study_pseudonym(info.study_uid) if info.study_uid else path.stem)
        if info.n_frames <= 1:
            return [Record(path, label, group, name, **meta)]
        return [Record(path, label, group, name, frame=i, **meta)
                for i in dicom.frame_indices(info.n_frames, every_nth)]
    if kind == "video":
        info = video.read_video_info(path)
        return [Record(path, label, group or path.stem, name, frame=i, **meta)
                for i in dicom.frame_indices(info.n_frames, every_nth)]
    raise DataError(
        f"unsupported file type {path.suffix or '(no extension)'}: {path}; "
        f"expected an image ({', '.join(IMAGE_EXTENSIONS)}), DICOM or video"
    )


def read_csv_table(csv_path: Path) -> tuple[list[str], list[dict[str, str]]]:
    """Column names (stripped) and rows of a manifest CSV (UTF-8, BOM allowed).

    Raises :class:`DataError` naming the file when it is missing or not readable as CSV.
    """
    if not csv_path.is_file():
        raise DataError(f"manifest not found: {csv_path}")
    try:
        with open(csv_path, newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            columns = [c.strip() for c in (reader.fieldnames or [])]
            rows = list(reader)
    except (UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"{csv_path} is not a readable CSV file: {exc}") from exc
    return columns, rows


def parse_float(value: str, field_name: str, line: int, csv_path: Path) -> float | None:
    """A manifest cell as a float (``None`` when empty); a clear error naming file, line and field."""
    value = value.strip()
    if value == "":
        return None
    try:
        return float(value)
    except ValueError:
        raise DataError(
            f"{csv_path}, line {line}, field {field_name!r}: expected a number, got {value!r}"
        ) from None


def load_manifest(csv_path: Path, require_labels: bool = True, every_nth: int = 1) -> list[Record]:
    """Read a manifest CSV into records, validating every row.

    Raises :class:`DataError` naming the file, line and field for: missing
    columns, an empty path / group (/ label when ``require_labels``), a path that
    does not exist, a non-numeric ``ga_weeks`` / ``pixel_spacing_mm``, and a group
    that carries two labels.
    """
    csv_path = Path(csv_path)
    columns, rows = read_csv_table(csv_path)
    required = REQUIRED_COLUMNS if require_labels else ("path",)
    missing = [c for c in required if c not in columns]
    if missing:
        raise DataError(
            f"{csv_path}: missing required column(s) {', '.join(missing)}; "
            f"found columns: {', '.join(columns) or '(none)'}; required: {', '.join(required)}"
        )
    if not rows:
        raise DataError(f"{csv_path}: the manifest has no rows")
    root = csv_path.parent
    records: list[Record] = []
    for line, raw in enumerate(rows, start=2):
        if None in raw:  # csv.DictReader puts the cells beyond the header's columns under None
            raise DataError(f"{csv_path}, line {line}: {len(raw[None])} more field(s) than the {len(columns)} "
                            "column(s) of the header; quote cells that contain commas")
        row = {(k or "").strip(): (v or "").strip() for k, v in raw.items()}
        rel = row.get("path", "")
        if not rel:
            raise DataError(f"{csv_path}, line {line}, field 'path': empty")
        label = row.get("label") or None
        if require_labels and not label:
            raise DataError(f"{csv_path}, line {line}, field 'label': empty")
        group = row.get("group") or None
        if "group" in columns and not group and require_labels:
            raise DataError(f"{csv_path}, line {line}, field 'group': empty")
        path = _manifest_path(root, rel, f"{csv_path}, line {line}, field 'path'")
        meta = {
            "ga_weeks": parse_float(row.get("ga_weeks", ""), "ga_weeks", line, csv_path),
            "pixel_spacing_mm": parse_float(row.get("pixel_spacing_mm", ""), "pixel_spacing_mm", line, csv_path),
            "center": row.get("center") or None,
            "device": row.get("device") or None,
            "view": row.get("view") or None,
            "source_row": line,
            "extra": {k: v for k, v in row.items() if k and k not in KNOWN_COLUMNS},
        }
        try:
            records.extend(expand_file(path, label, group, rel, every_nth, **meta))
        except DataError as exc:
            raise type(exc)(f"{csv_path}, line {line}: {exc}") from exc
    check_repeated_rows(records, csv_path)
    check_group_labels(records, str(csv_path))
    return records


def _manifest_path(root: Path, rel: str, where: str) -> Path:
    """The file a manifest cell names (relative to the manifest's folder), or :class:`DataError`."""
    try:
        path = (root / rel).resolve() if not Path(rel).is_absolute() else Path(rel)
        exists = path.is_file()
    except (OSError, ValueError) as exc:  # a NUL byte, a name too long for the file system ...
        raise DataError(f"{where}: not a usable file path ({type(exc).__name__}: {exc})") from None
    if not exists:
        raise DataError(f"{where}: file does not exist: {rel}")
    return path


def check_repeated_rows(records: Sequence[Record], csv_path: Path) -> None:
    """Raise :class:`DataError` when a manifest lists the same image (file, and frame) on two lines,
    naming them: a repeated image would count twice in every metric."""
    refuse_repeated_lines((((r.path, r.frame), r.source_row, r.name) for r in records), csv_path)


def refuse_repeated_lines(entries: Iterable[tuple[object, int | None, str]], csv_path: Path) -> None:
    """Raise :class:`DataError` for ``csv_path`` naming every line whose key (image file, and frame)
    an earlier line already had; ``entries`` are ``(key, line, name)`` triples."""
    first: dict = {}
    pairs: dict[tuple[int | None, int | None], str] = {}
    for key, line, name in entries:
        seen = first.setdefault(key, line)
        if seen != line:
            pairs.setdefault((seen, line), name)
    if pairs:
        shown = "; ".join(f"line {b} repeats line {a} ({name})" for (a, b), name in list(pairs.items())[:5])
        more = f" and {len(pairs) - 5} more" if len(pairs) > 5 else ""
        raise DataError(f"{csv_path}: {len(pairs)} repeated row(s): {shown}{more}. Each image must be listed once "
                        "(a repeated image counts twice in every metric); remove the repeated lines")


def check_label_spellings(records: Sequence[Record], source: str) -> None:
    """Raise :class:`DataError` when two labels differ only in case or surrounding spaces (``Normal`` /
    ``normal``), naming both spellings and an image of each: they would become two classes."""
    first: dict[str, Record] = {}
    for r in records:
        if not r.label:
            continue
        seen = first.setdefault(r.label.strip().casefold(), r)
        if seen.label != r.label:
            raise DataError(f"{source}: labels {seen.label!r} ({seen.where()}) and {r.label!r} ({r.where()}) differ "
                            "only in case or spaces and would become two classes; spell each class one way")


def check_group_labels(records: Sequence[Record], source: str) -> None:
    """Raise :class:`DataError` when a group carries two labels (naming rows)."""
    seen: dict[str, Record] = {}
    for r in records:
        if r.label is None:
            continue
        first = seen.setdefault(r.group, r)
        if first.label != r.label:
            raise DataError(
                f"{source}: group {r.group!r} carries two labels: {first.label!r} "
                f"({first.where()}) and {r.label!r} ({r.where()}); a group is one patient "
                "and must have one label"
            )


def _media_files(folder: Path) -> list[Path]:
    files = []
    for p in sorted(folder.rglob("*")):
        if p.is_file() and not p.name.startswith(".") and media_kind(p) != "unknown":
            files.append(p)
    return files


def _group_from_regex(regex: re.Pattern[str], rel: str, path: Path) -> str:
    m = regex.search(rel)
    if not m:
        raise DataError(f"group_regex {regex.pattern!r} does not match {rel} ({path})")
    return m.group(1) if m.groups() else m.group(0)


def load_folder_tree(root: Path, group_regex: str | None = None, every_nth: int = 1) -> list[Record]:
    """Read ``ROOT/<class>/<files>``; every sub-folder of ROOT is a class."""
    root = Path(root)
    regex = _compile_regex(group_regex)
    class_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not class_dirs:
        raise DataError(f"{root}: no class sub-folders (expected ROOT/<class>/<image files>)")
    records: list[Record] = []
    for cdir in class_dirs:
        files = _media_files(cdir)
        if not files:
            raise DataError(f"{cdir}: empty class folder (no image, DICOM or video files)")
        for path in files:
            rel = path.relative_to(root).as_posix()
            group = _group_from_regex(regex, rel, path) if regex else None
            records.extend(expand_file(path, cdir.name, group, rel, every_nth))
    check_group_labels(records, str(root))
    return records


def load_unlabelled(path: Path, group_regex: str | None = None, every_nth: int = 1) -> list[Record]:
    """Records for a single file or a flat folder of files, without labels."""
    path = Path(path)
    regex = _compile_regex(group_regex)
    if path.is_file():
        group = _group_from_regex(regex, path.name, path) if regex else None
        return expand_file(path, None, group, path.name, every_nth)
    files = _media_files(path)
    if not files:
        raise DataError(f"{path}: empty folder (no image, DICOM or video files)")
    records: list[Record] = []
    for f in files:
        rel = f.relative_to(path).as_posix()
        group = _group_from_regex(regex, rel, f) if regex else None
        records.extend(expand_file(f, None, group, rel, every_nth))
    return records


def _compile_regex(pattern: str | None) -> re.Pattern[str] | None:
    if not pattern:
        return None
    try:
        return re.compile(pattern)
    except re.error as exc:
        raise DataError(f"group_regex {pattern!r} is not a valid regular expression: {exc}") from None


def load_dataset(
    path: str | Path,
    *,
    require_labels: bool = True,
    group_regex: str | None = None,
    classes: Sequence[str] | None = None,
    every_nth: int = 1,
    sector_mask: bool = False,
) -> Dataset:
    """Load any supported source into a :class:`Dataset`.

    Parameters
    ----------
    path : path-like
        A manifest ``.csv``, a folder-per-class tree, or (with
        ``require_labels=False``) a single image / DICOM / video or a flat folder.
    require_labels : bool
        Training and CV need labels; prediction does not.
    group_regex : str, optional
        Regular expression whose first group (or whole match) names the group,
        matched against the path relative to the folder root.
    classes : sequence of str, optional
        Explicit class order. Labels outside it are an error. Default: sorted labels.
    every_nth : int
        Keep every N-th frame of cine DICOM and video files.
    sector_mask : bool
        Blank every pixel outside the scan sector when images are read
        (:mod:`fetalscan.data.sector`), so a model sees the sector only.
    """
    path = Path(path).resolve()
    if every_nth < 1:
        raise DataError(f"every_nth must be >= 1, got {every_nth}")
    if not path.exists():
        raise DataError(f"data not found: {path}")
    if path.is_file() and path.suffix.lower() == ".csv":
        records = load_manifest(path, require_labels=require_labels, every_nth=every_nth)
    elif path.is_dir() and any(p.is_dir() and not p.name.startswith(".") for p in path.iterdir()):
        records = load_folder_tree(path, group_regex, every_nth)
    elif require_labels:
        raise DataError(
            f"{path}: labels are needed here; give a manifest CSV (path,label,group) or a "
            "folder with one sub-folder per class"
        )
    else:
        records = load_unlabelled(path, group_regex, every_nth)
    if not records:
        raise DataError(f"{path}: no images found")
    check_label_spellings(records, str(path))
    labels = sorted({r.label for r in records if r.label})
    if classes:
        unknown = sorted(set(labels) - set(classes))
        if unknown:
            raise DataError(f"{path}: label(s) {unknown} are not in the given classes {list(classes)}")
        repeated = sorted({c for c in classes if list(classes).count(c) > 1})
        if repeated:
            raise DataError(f"classes: {repeated} named more than once in {list(classes)}")
        empty = [c for c in classes if c not in labels]
        if labels and empty:
            raise DataError(f"{path}: class(es) {empty} given in classes have no images (labels found: {labels}); "
                            "remove them from --classes or add their images")
        class_list = list(classes)
    else:
        class_list = labels
    if sector_mask:
        from dataclasses import replace

        records = [replace(r, sector_mask=True) for r in records]
    loading = {"group_regex": group_regex, "classes": list(classes) if classes else None, "every_nth": every_nth,
               "require_labels": require_labels, "sector_mask": sector_mask}
    return Dataset(records, class_list, str(path), loading=loading)


def phash64(image: np.ndarray) -> np.uint64:
    """64-bit DCT perceptual hash (``imagehash.phash``) of an RGB image, as an integer."""
    import imagehash
    from PIL import Image

    bits = imagehash.phash(Image.fromarray(image)).hash.flatten()
    return np.uint64(int("".join("1" if b else "0" for b in bits), 2))


def prepare_images(records: Sequence[Record], pre, with_hashes: bool = False,
                   description: str = "reading images"):
    """Decode every record once and resize it for the network.

    Returns ``(images, hashes)``: a ``uint8`` tensor ``(N, C, h, w)`` prepared with
    :func:`fetalscan.transforms.prepare` and, if asked, the ``uint64`` perceptual
    hashes of the original pictures (else ``None``).
    """
    import torch

    from fetalscan.data.transforms import prepare
    from fetalscan.progress import track

    h, w = pre.input_size
    out = torch.empty((len(records), pre.channels, h, w), dtype=torch.uint8)
    hashes = np.zeros(len(records), dtype=np.uint64) if with_hashes else None
    for i, image in track(iter_record_images(records), description, total=len(records)):
        out[i] = prepare(image, pre)
        if hashes is not None:
            hashes[i] = phash64(image)
    return out, hashes
