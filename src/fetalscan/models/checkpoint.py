"""One-file model checkpoints: weights, architecture, classes, preprocessing,
training configuration, calibration and provenance.

The file is a plain ``torch.save`` dict of tensors, strings, numbers, lists and
dicts (no pickled classes), so it loads with ``torch.load(weights_only=True)``.
It is written atomically (temporary file, then rename).

Layout (``format_version`` 1)::

    format            "fetalscan-classifier"
    format_version    1
    fetalscan_version "0.1.0"
    architecture      {backbone, num_classes, mode, head, head_hidden, drop_rate, ensemble}
                      # head: logreg | linear | mlp; ensemble: k >= 2 heads averaged (0 = one)
    classes           ["class_a", ...]              # output order of the model
    class_map         {original label: model class}  # after --rare-classes merge
    preprocessing     Preprocessing.to_dict()
    training          {config: TrainConfig.to_dict(), fit: FitResult.to_dict(), split: {...}}
    calibration       {"temperature": 1.0, ...}       # fitted on inner validation only
    provenance        {created, command, seed, data_hash, versions}
    state_dict        {name: tensor}
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from fetalscan import __version__
from fetalscan.data.transforms import Preprocessing
from fetalscan.errors import CheckpointError, FetalscanError
from fetalscan.fileio import read_torch_file, write_bytes

FORMAT = "fetalscan-classifier"


FORMAT_VERSION = 1


@dataclass
class LoadedModel:
    """A model ready for inference and everything the checkpoint says about it."""

    model: nn.Module
    classes: list[str]
    preprocessing: Preprocessing
    architecture: dict
    meta: dict = field(default_factory=dict)

    @property
    def temperature(self) -> float:
        """Temperature of the saved calibration (1.0 = none)."""
        return float((self.meta.get("calibration") or {}).get("temperature", 1.0))

    @property
    def class_map(self) -> dict[str, str]:
        return dict(self.meta.get("class_map") or {})


def cpu_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Detached CPU copies of a state dict's tensors."""
    return {k: v.detach().cpu().clone() for k, v in state.items()}


#: What each fetalscan file format is, and the command that reads it (for error messages).
KNOWN_FORMATS: dict[str, str] = {
    "fetalscan-classifier": "a classifier checkpoint: use `fetalscan predict` / `fetalscan evaluate`",
    "fetalscan-fold-models": "a cv run's fold models: use `fetalscan explain --run`",
    "fetalscan-segmenter": "a head-segmenter checkpoint: use `fetalscan biometry predict`",
}


def save_blob(path: str | Path, fmt: str, *, format_version: int = FORMAT_VERSION, **fields) -> Path:
    """Write a fetalscan file (a plain dict with ``format``, ``format_version``,
    ``fetalscan_version`` and ``fields``) with ``torch.save``, atomically."""
    blob = {"format": fmt, "format_version": format_version, "fetalscan_version": __version__, **fields}
    buf = io.BytesIO()
    torch.save(blob, buf)
    return write_bytes(path, buf.getvalue())


def load_blob(path: str | Path, fmt: str, what: str = "checkpoint", *,
              format_version: int = FORMAT_VERSION, required: tuple[str, ...] = ()) -> dict:
    """Read a file written by :func:`save_blob` and check its format and version.

    Raises :class:`CheckpointError` naming the file for a missing, corrupt or
    foreign file and for one of another format version.
    """
    path = Path(path)
    blob = read_torch_file(path, CheckpointError, what)
    if not isinstance(blob, dict) or blob.get("format") != fmt:
        found = blob.get("format") if isinstance(blob, dict) else type(blob).__name__
        hint = f"; it is {KNOWN_FORMATS[found]}" if found in KNOWN_FORMATS else ""
        raise CheckpointError(f"{path} is not a fetalscan {what} (field 'format' is {found!r}, "
                              f"expected {fmt!r}){hint}")
    version = blob.get("format_version")
    if version != format_version:
        newer = isinstance(version, int) and version > format_version
        raise CheckpointError(
            f"{path}: {what} format_version {version} "
            f"({'made by a newer' if newer else 'from an older'} fetalscan "
            f"{blob.get('fetalscan_version', '?')}); this fetalscan {__version__} reads "
            f"format_version {format_version}. "
            + ("Upgrade fetalscan." if newer else "Retrain the model with this version.")
        )
    missing = [k for k in required if k not in blob]
    if missing:
        raise CheckpointError(f"{path}: {what} lacks the field(s) {', '.join(missing)}")
    return blob


def save_checkpoint(
    path: str | Path,
    model: nn.Module,
    *,
    classes: list[str],
    architecture: dict,
    preprocessing: Preprocessing,
    training: dict | None = None,
    provenance: dict | None = None,
    class_map: dict[str, str] | None = None,
    calibration: dict | None = None,
) -> Path:
    """Write a checkpoint atomically; returns its path."""
    return save_blob(
        path, FORMAT,
        architecture=dict(architecture),
        classes=list(classes),
        class_map=dict(class_map or {}),
        preprocessing=preprocessing.to_dict(),
        training=training or {},
        calibration=calibration or {"temperature": 1.0},
        provenance=provenance or {},
        state_dict=cpu_state(model.state_dict()),
    )


def save_loaded(path: str | Path, loaded: LoadedModel) -> Path:
    """Write a :class:`LoadedModel` (e.g. a model just trained) as one checkpoint file."""
    meta = loaded.meta
    return save_checkpoint(path, loaded.model, classes=loaded.classes, architecture=loaded.architecture,
                           preprocessing=loaded.preprocessing, training=meta.get("training"),
                           provenance=meta.get("provenance"), class_map=meta.get("class_map"),
                           calibration=meta.get("calibration"))


def read_checkpoint(path: str | Path) -> dict:
    """Read and validate the checkpoint dict without building the model."""
    return load_blob(path, FORMAT, "classifier checkpoint",
                     required=("architecture", "classes", "preprocessing", "state_dict"))


def _model_from_blob(path: Path, blob: dict) -> tuple[nn.Module, list[str]]:
    """Build the (untrained) model that a checkpoint's ``architecture`` block describes."""
    from fetalscan.models.heads import build_classifier

    arch = blob["architecture"]
    classes = list(blob["classes"])
    try:
        if int(arch["num_classes"]) != len(classes):
            raise CheckpointError(
                f"{path}: architecture says {arch['num_classes']} classes but the class list has {len(classes)}"
            )
        return build_classifier(arch["backbone"], len(classes), mode=arch["mode"], head=arch["head"],
                                head_hidden=int(arch["head_hidden"]), drop_rate=float(arch["drop_rate"]),
                                ensemble=int(arch.get("ensemble") or 0)), classes
    except KeyError as exc:
        raise CheckpointError(f"{path}: architecture block lacks field {exc}") from None
    except CheckpointError:
        raise
    except FetalscanError as exc:
        raise CheckpointError(f"{path}: architecture {arch} cannot be built here: {exc}") from exc


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> LoadedModel:
    """Rebuild the model of a checkpoint and load its weights (strict)."""
    blob = read_checkpoint(path)
    arch = blob["architecture"]
    model, classes = _model_from_blob(Path(path), blob)
    try:
        model.load_state_dict(blob["state_dict"], strict=True)
    except RuntimeError as exc:
        raise CheckpointError(
            f"{path}: weights do not match the architecture {arch.get('backbone')!r} "
            f"({str(exc).splitlines()[0]})"
        ) from exc
    model.eval().to(device)
    meta = {k: v for k, v in blob.items() if k != "state_dict"}
    meta["file"] = str(Path(path))  # where it came from (the ONNX cache of fetalscan.inference lives beside it)
    return LoadedModel(model, classes, Preprocessing.from_dict(blob["preprocessing"]), dict(arch), meta)


def architecture_of(cfg, n_classes: int) -> dict:
    """The ``architecture`` block for a :class:`~fetalscan.train.TrainConfig`."""
    return {
        "backbone": cfg.backbone,
        "num_classes": n_classes,
        "mode": cfg.mode,
        "head": cfg.head,
        "head_hidden": cfg.head_hidden,
        "drop_rate": cfg.drop_rate,
        "ensemble": int(cfg.ensemble) if cfg.mode == "cached" and int(cfg.ensemble) >= 2 else 0,
    }


FOLD_FORMAT = "fetalscan-fold-models"


FOLD_DIR = "fold_models"


CACHED_FOLDS_FILE = "cached_heads.pt"


def save_cached_fold_models(
    run_dir: str | Path, backbone: nn.Module, heads: dict[int, dict], *, classes: list[str],
    architecture: dict, preprocessing: Preprocessing, class_map: dict[str, str] | None = None,
) -> Path:
    """Save the fold models of a cached-mode CV run as one file: the frozen backbone
    once plus one small head per fold (``RUN/fold_models/cached_heads.pt``)."""
    from fetalscan.models.registry import classifier_attr

    head_name = classifier_attr(backbone) + "."
    return save_blob(
        Path(run_dir) / FOLD_DIR / CACHED_FOLDS_FILE, FOLD_FORMAT,
        architecture=dict(architecture),
        classes=list(classes),
        class_map=dict(class_map or {}),
        preprocessing=preprocessing.to_dict(),
        backbone_state={k: v for k, v in cpu_state(backbone.state_dict()).items() if not k.startswith(head_name)},
        heads={str(k): cpu_state(v) for k, v in heads.items()},
    )


def fold_checkpoint_path(run_dir: str | Path, fold: int) -> Path:
    """Where a fine-tuned fold model of a CV run is saved (a regular checkpoint)."""
    return Path(run_dir) / FOLD_DIR / f"fold_{int(fold)}.pt"


def load_fold_model(run_dir: str | Path, fold: int, device: str | torch.device = "cpu") -> LoadedModel:
    """The model that cross-validation trained for ``fold`` (it never saw that fold's groups).

    Reads ``RUN/fold_models/`` written by ``fetalscan cv`` (``--save-fold-models``).
    Raises :class:`CheckpointError` when the run did not save them.
    """
    run_dir = Path(run_dir)
    per_fold = fold_checkpoint_path(run_dir, fold)
    if per_fold.is_file():
        loaded = load_checkpoint(per_fold, device)
        loaded.meta["origin"] = f"fold {fold} model"
        return loaded
    cached = run_dir / FOLD_DIR / CACHED_FOLDS_FILE
    if not cached.is_file():
        raise CheckpointError(
            f"{run_dir} holds no model for fold {fold} ({FOLD_DIR}/ missing); re-run `fetalscan cv` with "
            "save_fold_models='yes', or explain with a model checkpoint instead"
        )
    blob = load_blob(cached, FOLD_FORMAT, "fold-model file")
    if str(fold) not in blob["heads"]:
        raise CheckpointError(f"{cached} has no head for fold {fold} (folds: {sorted(blob['heads'], key=int)})")
    state = dict(blob["backbone_state"])
    model, _ = _model_from_blob(cached, blob)
    from fetalscan.models.registry import classifier_attr

    head_name = classifier_attr(model)
    state.update({f"{head_name}.{k}": v for k, v in blob["heads"][str(fold)].items()})
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"{cached}: fold {fold} weights do not match the architecture "
                              f"({str(exc).splitlines()[0]})") from exc
    model.eval().to(device)
    meta = {"class_map": blob.get("class_map", {}), "calibration": {"temperature": 1.0},
            "origin": f"fold {fold} model"}
    return LoadedModel(model, list(blob["classes"]), Preprocessing.from_dict(blob["preprocessing"]),
                       dict(blob["architecture"]), meta)
