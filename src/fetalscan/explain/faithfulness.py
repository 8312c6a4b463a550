"""How far a heatmap can be trusted: deletion / insertion, randomisation, energy in the head.

Published fetal-ultrasound studies show Grad-CAM maps "so that clinicians can see
where the model looked"; none measured whether the maps are faithful to the
model. fetalscan measures three things, per method:

Deletion and insertion (Petsiuk V., Das A., Saenko K., "RISE: Randomized Input
Sampling for Explanation of Black-box Models", BMVC 2018)
    Pixels are ranked by the heatmap. *Deletion* replaces the most salient
    fraction ``f`` of the pixels by a baseline (a strongly blurred copy of the
    image, or its mean) and tracks the probability of the explained class;
    *insertion* starts from the baseline and puts the most salient pixels back.
    The area under each curve over ``f`` in [0, 1] is reported: a faithful map
    gives a *low* deletion AUC (the probability falls fast) and a *high*
    insertion AUC. Both are compared with **random maps** drawn at the same
    resolution as the CAM layer and upsampled the same way (same blobbiness),
    through the same procedure, averaged over a few seeded draws. Only the
    difference from random is meaningful: perturbed images are out of the
    training distribution (Hooker et al., NeurIPS 2019; Rong et al., "A
    Consistent and Efficient Evaluation Strategy for Attribution Methods"
    (ROAD), ICML 2022), which the blurred baseline softens but does not remove.

Model-parameter randomisation (Adebayo J. et al., "Sanity Checks for Saliency
Maps", NeurIPS 2018)
    The layers are re-initialised from the top down (cascading: the head, then the
    CAM layer, then the upper half of the remaining backbone, then everything) and
    the maps of the randomised model are compared with those of the trained one
    (Spearman rank correlation and SSIM, same target class). A map that explains
    the *trained* model must change; a similarity that stays high means the
    method shows the input's structure rather than what the model learned.
    ``randomisation_similarity`` is the Spearman correlation after randomising
    the head and the CAM layer.

Energy in the fetal head
    On HC18 trans-thalamic head images (van den Heuvel et al., PLoS ONE 2018,
    filled-ellipse head masks) the share of the (non-negative, per-image
    normalised) heatmap mass inside the head, next to the head's share of the
    image area (what a map spread uniformly would score), and the share of images
    whose heatmap peak lies in the head (the "pointing game", Zhang J. et al.,
    ECCV 2016). The head is where a brain-anomaly model should look; mass outside
    it (image borders, calipers, text, the grey-scale bar) is a warning sign of a
    shortcut. HC18 comes from another centre than the training data, so this also
    tests the maps off their home distribution.

Confidence intervals resample *groups* (patients) with replacement, as every
other metric in fetalscan does (:func:`fetalscan.evaluation.bootstrap.group_bootstrap_weights`).
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from fetalscan.errors import DataError, FetalscanError
from fetalscan.explain.cams import (
    METHODS,
    compute_cams,
    layer_for,
    parse_methods,
    resize_heatmap,
)

if TYPE_CHECKING:
    from fetalscan.data.hc18 import BiometryItem

log = logging.getLogger(__name__)


@dataclass
class FaithfulnessConfig:
    """Knobs of the faithfulness measurement; the CLI maps its flags 1:1 onto these.

    Attributes
    ----------
    methods : str
        Comma-separated methods, or ``all``. Score-CAM costs one forward pass per
        channel of the CAM layer per image (64 on SonoNet-16), so it is opt-in.
    n_images : int
        Images for deletion / insertion (one per patient group first).
    steps : int
        Points of each deletion / insertion curve minus one (fractions 0, 1/steps .. 1).
    baseline : str
        ``blur`` (Gaussian blur, ``blur_sigma`` x the longer input side) or ``mean``.
    random_maps : int
        Random maps per image for the random baseline.
    randomisation_images : int
        The first this many of the images are used for the randomisation check
        (four cascade stages, each one heatmap per image and method).
    head_masks : str or None
        HC18-style manifest with ``image,mask`` columns (paths relative to it);
        ``None`` skips the energy-in-head measurement.
    head_images : int
        Head images sampled from ``head_masks`` (one per exam).
    n_boot : int
        Group-bootstrap resamples for the 95% intervals.
    """

    methods: str = "gradcam,gradcam++,eigencam"
    n_images: int = 20
    steps: int = 5
    baseline: str = "blur"
    blur_sigma: float = 0.04
    random_maps: int = 2
    randomisation_images: int = 10
    head_masks: str | None = None
    head_images: int = 20
    n_boot: int = 1000
    batch_size: int = 16
    seed: int = 0

    def validate(self) -> None:
        parse_methods(self.methods)
        if self.baseline not in ("blur", "mean"):
            raise FetalscanError(f"--baseline must be 'blur' or 'mean', got {self.baseline!r}")
        for name in ("n_images", "steps", "random_maps", "randomisation_images", "head_images", "batch_size"):
            if getattr(self, name) < 1:
                raise FetalscanError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.steps < 2:
            raise FetalscanError(f"--steps must be >= 2, got {self.steps}")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Unit:
    """Images explained by one model: a loaded model and the records it explains."""

    loaded: object  # fetalscan.checkpoint.LoadedModel
    records: list
    name: str = "model"
    layer: str | None = None


def baseline_images(x: torch.Tensor, kind: str = "blur", sigma: float = 0.04) -> torch.Tensor:
    """Baseline of prepared images (float, 0-255, (N, C, h, w)): Gaussian blur or the image mean."""
    if kind == "mean":
        return x.float().mean(dim=(1, 2, 3), keepdim=True).expand_as(x).clone()
    from scipy.ndimage import gaussian_filter

    s = max(1.0, sigma * max(x.shape[-2:]))
    arr = x.float().cpu().numpy()
    out = gaussian_filter(arr, sigma=(0, 0, s, s), mode="reflect")
    return torch.from_numpy(out).to(x.device)


def random_saliency(n: int, feature_size: tuple[int, int], out_size: tuple[int, int],
                    rng: np.random.Generator) -> np.ndarray:
    """``n`` random maps: uniform noise at the CAM layer's resolution, upsampled like a CAM."""
    fh, fw = max(1, int(feature_size[0])), max(1, int(feature_size[1]))
    return np.stack([resize_heatmap(rng.random((fh, fw), dtype=np.float32), out_size) for _ in range(n)])


def _ranks(saliency: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Rank of every pixel (0 = most salient); ties broken at random, not by position."""
    flat = saliency.reshape(-1).astype(np.float64)
    jitter = rng.random(flat.size) * 1e-9
    order = np.lexsort((jitter, -flat))
    ranks = np.empty(flat.size, dtype=np.int64)
    ranks[order] = np.arange(flat.size)
    return ranks.reshape(saliency.shape)


def _probs(model: nn.Module, batch: torch.Tensor, pre, targets: np.ndarray, temperature: float) -> np.ndarray:
    from fetalscan.data.transforms import normalize

    with torch.inference_mode():
        logits = model(normalize(batch, pre)).float()
        p = torch.softmax(logits / temperature, dim=1).cpu().numpy()
    return p[np.arange(len(targets)), targets]


def perturbation_curves(
    model: nn.Module, x: torch.Tensor, maps: np.ndarray, targets: np.ndarray, pre,
    base: torch.Tensor, steps: int = 10, temperature: float = 1.0, batch_size: int = 16,
    rng: np.random.Generator | None = None, ends: tuple[np.ndarray, np.ndarray] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Deletion and insertion curves (Petsiuk et al., 2018) of the target-class probability.

    Parameters
    ----------
    model : nn.Module
        In evaluation mode, on ``x``'s device.
    x : Tensor, shape (N, C, h, w)
        Prepared images, float or uint8 in 0-255 (before normalisation).
    maps : ndarray, shape (N, h, w)
        Saliency at the network input size.
    targets : ndarray, shape (N,)
        Class index whose probability is tracked.
    base : Tensor, shape (N, C, h, w)
        Baseline images (see :func:`baseline_images`).
    steps : int
        Curves are sampled at fractions ``0, 1/steps, ..., 1`` of the pixels.
    ends : (p_original, p_baseline), optional
        Probabilities of the unperturbed and fully-baselined images, when already known.

    Returns
    -------
    deletion, insertion : ndarray, shape (N, steps + 1)
    """
    rng = rng or np.random.default_rng(0)
    n, _, h, w = x.shape
    x = x.float()
    targets = np.asarray(targets, dtype=np.int64)
    if ends is None:
        ends = (_probs(model, x, pre, targets, temperature), _probs(model, base, pre, targets, temperature))
    p_orig, p_base = ends
    deletion = np.empty((n, steps + 1))
    insertion = np.empty((n, steps + 1))
    deletion[:, 0], deletion[:, -1] = p_orig, p_base
    insertion[:, 0], insertion[:, -1] = p_base, p_orig
    counts = [int(round(k / steps * h * w)) for k in range(1, steps)]
    jobs = [(i, k, kind) for i in range(n) for k in range(len(counts)) for kind in (0, 1)]
    ranks: dict[int, torch.Tensor] = {}
    for start in range(0, len(jobs), batch_size):
        chunk = jobs[start:start + batch_size]
        imgs = []
        for i, k, kind in chunk:
            if i not in ranks:
                ranks = {i: torch.from_numpy(_ranks(maps[i], rng)).to(x.device)}
            top = (ranks[i] < counts[k])[None]
            imgs.append(torch.where(top, base[i], x[i]) if kind == 0 else torch.where(top, x[i], base[i]))
        p = _probs(model, torch.stack(imgs), pre, targets[[i for i, _, _ in chunk]], temperature)
        for (i, k, kind), v in zip(chunk, p):
            (deletion if kind == 0 else insertion)[i, k + 1] = v
    return deletion, insertion


def curve_auc(curves: np.ndarray) -> np.ndarray:
    """Area under curves sampled at equal fractions of [0, 1] (trapezoid rule), one per row."""
    curves = np.atleast_2d(curves)
    dx = 1.0 / (curves.shape[1] - 1)
    return (curves[:, 1:] + curves[:, :-1]).sum(1) * dx / 2.0


def spearman_similarity(a: np.ndarray, b: np.ndarray, stride: int = 4) -> float:
    """Spearman rank correlation of two maps (every ``stride``-th pixel); NaN if one is constant."""
    from scipy.stats import spearmanr

    u, v = a[::stride, ::stride].ravel(), b[::stride, ::stride].ravel()
    if np.ptp(u) == 0 or np.ptp(v) == 0:
        return float("nan")
    return float(spearmanr(u, v).statistic)


def ssim(a: np.ndarray, b: np.ndarray, sigma: float = 1.5) -> float:
    """Structural similarity of two maps in [0, 1] (Wang Z. et al., IEEE TIP 2004; Gaussian window)."""
    from scipy.ndimage import gaussian_filter

    a, b = a.astype(np.float64), b.astype(np.float64)
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    mu_a, mu_b = gaussian_filter(a, sigma), gaussian_filter(b, sigma)
    var_a = gaussian_filter(a * a, sigma) - mu_a ** 2
    var_b = gaussian_filter(b * b, sigma) - mu_b ** 2
    cov = gaussian_filter(a * b, sigma) - mu_a * mu_b
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a ** 2 + mu_b ** 2 + c1) * (var_a + var_b + c2))
    return float(s.mean())


def _param_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in model.named_modules() if any(True for _ in m.parameters(recurse=False))]


def randomisation_stages(model: nn.Module, layer: str) -> list[tuple[str, str, list[str]]]:
    """Cascading stages (Adebayo et al., 2018): ``(key, label, module names re-initialised)``.

    ``head`` -> ``head_and_layer`` (the head and the CAM layer; the headline stage) ->
    ``upper_half`` (also the upper half of the parameterised layers below it) ->
    ``all``. Modules are in registration order, which is forward order for the
    registered backbones. A model without a recognisable head starts at the layer.
    """
    from fetalscan.models.registry import classifier_attr

    mods = [n for n, _ in _param_modules(model)]
    try:
        head_name = classifier_attr(model)
        head = [n for n in mods if n == head_name or n.startswith(head_name + ".")]
    except FetalscanError:
        head = []
    in_layer = [n for n in mods if n == layer or n.startswith(layer + ".")]
    first = mods.index(in_layer[0]) if in_layer else len(mods)
    below = [n for n in mods[:first] if n not in head]
    upper = below[len(below) // 2:]
    stages: list[tuple[str, str, list[str]]] = []
    if head:
        stages.append(("head", "head", list(head)))
    stages.append(("head_and_layer", f"head + {layer}" if head else layer, head + in_layer))
    if upper:
        stages.append(("upper_half", f"+ upper half of the layers below {layer}", head + in_layer + upper))
    stages.append(("all", "all layers", list(mods)))
    return stages


def randomised_copy(model: nn.Module, names: Sequence[str], seed: int = 0) -> nn.Module:
    """A deep copy of ``model`` whose modules ``names`` are re-initialised (the model is untouched)."""
    clone = copy.deepcopy(model)
    lookup = dict(clone.named_modules())
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for name in names:
            module = lookup[name]
            if hasattr(module, "reset_parameters"):
                module.reset_parameters()
            else:
                for p in module.parameters(recurse=False):
                    nn.init.normal_(p, 0.0, 0.02)
    return clone.eval()


def sample_rows(preds, n: int, seed: int = 0) -> list:
    """Up to ``n`` row labels of ``preds``: one random image from each of a random order of
    groups first (so images are as independent as the data allow), then more per group."""
    rng = np.random.default_rng(seed)
    by_group: dict[str, list] = {}
    for row, g in zip(preds.index, preds["group"].astype(str)):
        by_group.setdefault(g, []).append(row)
    groups = sorted(by_group)
    rng.shuffle(groups)
    queues = [list(rng.permutation(by_group[g])) for g in groups]
    picked: list = []
    while len(picked) < n and any(queues):
        for q in queues:
            if q and len(picked) < n:
                picked.append(q.pop())
    return picked


def sample_head_masks(manifest: str | Path, n: int, seed: int = 0) -> list[BiometryItem]:
    """``n`` rows of an HC18-style manifest (``image,mask[,exam]``), one per exam first, seeded.

    The manifest is read by :func:`fetalscan.data.hc18.load_biometry_manifest`
    (paths relative to it; a missing or empty ``exam`` makes each image its own
    exam); read each mask with :func:`fetalscan.data.hc18.read_mask`.
    """
    from fetalscan.data.hc18 import load_biometry_manifest

    manifest = Path(manifest)
    if not manifest.is_file():
        raise DataError(f"head-mask manifest not found: {manifest}")
    items = load_biometry_manifest(manifest, require_masks=True, require_exam=False)
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(items))
    seen: set[str] = set()
    first, rest = [], []
    for i in order:
        exam = items[i].exam
        (rest if exam in seen else first).append(i)
        seen.add(exam)
    return [items[i] for i in (first + rest)[:n]]


def energy_in_mask(heatmap: np.ndarray, mask: np.ndarray) -> tuple[float, float, float]:
    """``(share of heatmap mass inside the mask, mask's share of the area, peak inside 0/1)``.

    The heatmap is clipped at 0; a map with no mass gives NaN for the first and last value.
    """
    heat = np.clip(np.asarray(heatmap, dtype=np.float64), 0, None)
    if heat.shape != mask.shape:
        raise DataError(f"heatmap {heat.shape} and mask {mask.shape} differ in size")
    total = heat.sum()
    area = float(mask.mean())
    if total <= 0:
        return float("nan"), area, float("nan")
    peak = float(mask.reshape(-1)[int(np.argmax(heat))])
    return float((heat * mask).sum() / total), area, peak


def _mean(v) -> float:
    v = np.asarray(v, dtype=np.float64)
    v = v[np.isfinite(v)]
    return float(v.mean()) if v.size else float("nan")


def _group_ci(values: np.ndarray, groups: Sequence, n_boot: int, seed: int) -> list[float]:
    """95% percentile interval of the mean, resampling groups (patients) with replacement."""
    from fetalscan.evaluation.bootstrap import (
        group_bootstrap_weights,
        percentile_interval,
    )

    values = np.asarray(values, dtype=np.float64)
    keep = np.isfinite(values)
    if keep.sum() < 2:
        return [float("nan"), float("nan")]
    v, g = values[keep], [x for x, k in zip(groups, keep) if k]
    means = []
    for w in group_bootstrap_weights(g, n_boot, seed):
        tot = w.sum(1)
        with np.errstate(invalid="ignore", divide="ignore"):
            means.append(np.where(tot > 0, (w @ v) / np.where(tot > 0, tot, 1), np.nan))
    return percentile_interval(np.concatenate(means)) if means else [float("nan"), float("nan")]


def _prepared(unit: Unit):
    from fetalscan.data.records import prepare_images

    x, _ = prepare_images(unit.records, unit.loaded.preprocessing, description="reading images")
    return x


def _cams(model, x, pre, layer, method, targets, batch_size, device):
    from fetalscan.data.transforms import normalize

    maps, feat, logits = [], (0, 0), []
    for s in range(0, len(x), batch_size):
        xb = normalize(x[s:s + batch_size].to(device), pre)
        tb = None if targets is None else targets[s:s + batch_size]
        res = compute_cams(model, xb, layer, method, tb)
        maps.append(res.maps)
        logits.append(res.logits)
        feat = res.feature_size
    return np.concatenate(maps), feat, torch.cat(logits)


def evaluate_faithfulness(units: Sequence[Unit], cfg: FaithfulnessConfig | None = None,
                          device: torch.device | str = "cpu") -> dict:
    """Deletion / insertion vs random, randomisation and energy in head, per method.

    Parameters
    ----------
    units : sequence of Unit
        Each model with the images it explains (e.g. each fold's model with its own
        held-out images, or one final model with a sample of images).
    cfg : FaithfulnessConfig
    device : torch.device or str

    Returns
    -------
    dict
        ``{"methods": {method: {deletion_auc, insertion_auc, random_deletion_auc,
        random_insertion_auc, randomisation_similarity, energy_in_head, n_images, ...}},
        "curves": {...}, "config": {...}, "notes": [...]}`` — the content of
        ``faithfulness.json``.
    """
    from fetalscan.explain.cams import preserved_model_state

    cfg = cfg or FaithfulnessConfig()
    cfg.validate()
    device = torch.device(device)
    methods = parse_methods(cfg.methods)
    acc = _Accumulator(methods, cfg.seed)
    for u_index, unit in enumerate(units):
        if unit.records:
            with preserved_model_state(unit.loaded.model):
                unit.loaded.model.eval()
                _evaluate_unit(u_index, unit, methods, cfg, device, acc)
    if not acc.groups:
        raise FetalscanError("faithfulness: no images to evaluate")
    head = _energy_in_head(units, methods, cfg, device)
    return _summarise(methods, acc, head, cfg, units)


def faithfulness_to_folder(loaded, records: Sequence, cfg, fcfg: FaithfulnessConfig, out: Path,
                           device: torch.device | str = "cpu") -> dict:
    """Faithfulness of one model's heatmaps on a sample of ``records``, written to ``out``.

    ``fcfg.n_images`` records are sampled, one per patient group first (seeded by
    ``fcfg.seed``); ``cfg`` is the :class:`~fetalscan.explain.cams.ExplainConfig`
    whose ``layer`` names the CAM layer. Writes ``faithfulness.json`` and
    ``faithfulness_curves.png`` (see :func:`write_faithfulness`) and returns the
    JSON's content.
    """
    import pandas as pd

    from fetalscan.explain.cams import DISCLAIMER
    from fetalscan.fileio import provenance

    frame = pd.DataFrame({"group": [r.group for r in records]})
    picked = [records[i] for i in sample_rows(frame, fcfg.n_images, fcfg.seed)]
    result = evaluate_faithfulness([Unit(loaded, picked, "the given model", cfg.layer)], fcfg, device)
    result["notes"].insert(0, "Images explained by the given model; if they were in its training data, "
                              "the numbers describe the model on data it has seen.")
    result["disclaimer"] = DISCLAIMER
    result["provenance"] = provenance(fcfg.seed, device=str(device))
    return write_faithfulness(out, result)


def write_faithfulness(out: Path, result: dict) -> dict:
    """``out/faithfulness_curves.png`` and ``out/faithfulness.json`` (which names the figure); returns ``result``."""
    from fetalscan.figures import save_figure
    from fetalscan.fileio import write_json

    save_figure(curves_figure(result), out / "faithfulness_curves.png")
    result["figures"] = {"curves": "faithfulness_curves.png"}
    write_json(out / "faithfulness.json", result)
    return result


class _Accumulator:
    """Per-image results of every unit, in order."""

    def __init__(self, methods: Sequence[str], seed: int) -> None:
        self.rng = np.random.default_rng(seed)
        # a stream of its own, so the random-map baseline does not depend on the list of methods
        self.random_rng = np.random.default_rng([seed, 1])
        self.per: dict[str, dict[str, list]] = {m: {"del": [], "ins": [], "stages": []} for m in methods}
        self.rand: dict[str, list] = {"del": [], "ins": []}
        self.groups: list[str] = []
        self.rand_groups: list[str] = []


def _evaluate_unit(u_index: int, unit: Unit, methods: list[str], cfg: FaithfulnessConfig,
                   device: torch.device, acc: _Accumulator) -> None:
    """Deletion / insertion (real and random maps) and the randomisation cascade for one model."""
    loaded = unit.loaded
    model, pre, temp = loaded.model, loaded.preprocessing, loaded.temperature
    layer = unit.layer or layer_for(loaded)
    x = _prepared(unit)
    base = baseline_images(x, cfg.baseline, cfg.blur_sigma)
    xd, based = x.to(device), base.to(device)
    # fixed targets: the trained model's predicted class (kept for random maps and randomised models)
    targets = None
    trained_maps: dict[str, np.ndarray] = {}
    feat = (0, 0)
    for m in methods:
        maps, feat, logits = _cams(model, x, pre, layer, m, targets, cfg.batch_size, device)
        if targets is None:
            targets = logits.argmax(1).numpy()
        trained_maps[m] = maps
    ends = (_probs(model, xd.float(), pre, targets, temp), _probs(model, based, pre, targets, temp))

    def curves(maps, rng):
        return perturbation_curves(model, xd, maps, targets, pre, based, cfg.steps, temp, cfg.batch_size,
                                   rng, ends)

    for m in methods:
        d, i = curves(trained_maps[m], acc.rng)
        acc.per[m]["del"].append(d)
        acc.per[m]["ins"].append(i)
    random_curves = [curves(random_saliency(len(x), feat, x.shape[-2:], acc.random_rng), acc.random_rng)
                     for _ in range(cfg.random_maps)]
    acc.rand["del"].append(np.mean([d for d, _ in random_curves], axis=0))
    acc.rand["ins"].append(np.mean([i for _, i in random_curves], axis=0))
    # cascading randomisation, on the first images up to cfg.randomisation_images in all
    k = max(0, min(len(x), cfg.randomisation_images - len(acc.rand_groups)))
    for s_index, (key, stage, names) in enumerate(randomisation_stages(model, layer) if k else []):
        rmodel = randomised_copy(model, names, seed=cfg.seed + 7919 * (s_index + 1) + u_index)
        for m in methods:
            rmaps, _, _ = _cams(rmodel, x[:k], pre, layer, m, targets[:k], cfg.batch_size, device)
            rho = [spearman_similarity(a, b) for a, b in zip(trained_maps[m][:k], rmaps)]
            ss = [ssim(a, b) for a, b in zip(trained_maps[m][:k], rmaps)]
            acc.per[m]["stages"].append((key, stage, rho, ss))
        del rmodel
    acc.rand_groups.extend(str(getattr(r, "group", i)) for i, r in enumerate(unit.records[:k]))
    acc.groups.extend(str(getattr(r, "group", i)) for i, r in enumerate(unit.records))


def _energy_in_head(units: Sequence[Unit], methods: list[str], cfg: FaithfulnessConfig,
                    device: torch.device) -> dict | None:
    """Per method: energy inside the head mask, head area share and peak-in-head, per image."""
    from fetalscan.data.hc18 import read_mask
    from fetalscan.data.records import read_image
    from fetalscan.explain.cams import ExplainConfig, explain_arrays

    if not cfg.head_masks:
        return None
    items = sample_head_masks(cfg.head_masks, cfg.head_images, cfg.seed)
    models = [u for u in units if u.records] or list(units)
    out: dict[str, dict[str, list]] = {m: {"energy": [], "area": [], "peak": []} for m in methods}
    images = [read_image(it.image) for it in items]
    masks = [read_mask(it, img.shape[:2]) for it, img in zip(items, images)]
    for k, unit in enumerate(models):
        idx = list(range(k, len(images), len(models)))
        if not idx:
            continue
        for m in methods:
            exps = explain_arrays(unit.loaded, [images[i] for i in idx], ExplainConfig(method=m, batch_size=cfg.batch_size),
                                  device, unit.layer)
            for i, e in zip(idx, exps):
                energy, area, peak = energy_in_mask(e.heatmap, masks[i])
                out[m]["energy"].append(energy)
                out[m]["area"].append(area)
                out[m]["peak"].append(peak)
    out["_n"] = len(images)  # type: ignore[assignment]
    out["_source"] = str(cfg.head_masks)  # type: ignore[assignment]
    return out


def _summarise(methods, acc: _Accumulator, head, cfg, units) -> dict:
    per, groups, rand_groups = acc.per, acc.groups, acc.rand_groups
    rdel, rins = np.concatenate(acc.rand["del"]), np.concatenate(acc.rand["ins"])
    rdel_auc, rins_auc = curve_auc(rdel), curve_auc(rins)
    fractions = np.linspace(0, 1, cfg.steps + 1)
    result: dict = {"methods": {}, "curves": {"fractions": fractions.tolist(),
                                              "random": {"deletion": rdel.mean(0).tolist(),
                                                         "insertion": rins.mean(0).tolist()}}}
    for m in methods:
        d, i = np.concatenate(per[m]["del"]), np.concatenate(per[m]["ins"])
        dauc, iauc = curve_auc(d), curve_auc(i)
        cascade = []
        for key in dict.fromkeys(k for k, *_ in per[m]["stages"]):
            rows = [(name, rho, ss) for k, name, rho, ss in per[m]["stages"] if k == key]
            rho = np.concatenate([r for _, r, _ in rows])
            ss = np.concatenate([x for _, _, x in rows])
            cascade.append({"key": key, "stage": rows[0][0], "spearman": _mean(rho), "ssim": _mean(ss),
                            "spearman_ci95": _group_ci(rho, rand_groups, cfg.n_boot, cfg.seed),
                            "n_images": int(len(rho)),
                            "n_constant_maps": int(np.sum(~np.isfinite(rho)))})
        headline = next(c for c in cascade if c["key"] == "head_and_layer")
        entry = {
            "name": METHODS[m],
            "deletion_auc": _mean(dauc),
            "insertion_auc": _mean(iauc),
            "random_deletion_auc": _mean(rdel_auc),
            "random_insertion_auc": _mean(rins_auc),
            "randomisation_similarity": headline["spearman"],
            "randomisation_ssim": headline["ssim"],
            "randomisation_stage": headline["stage"],
            "randomisation_n_images": headline["n_images"],
            "energy_in_head": None,
            "n_images": int(len(dauc)),
            "deletion_auc_ci95": _group_ci(dauc, groups, cfg.n_boot, cfg.seed),
            "insertion_auc_ci95": _group_ci(iauc, groups, cfg.n_boot, cfg.seed),
            "deletion_gain_vs_random_ci95": _group_ci(rdel_auc - dauc, groups, cfg.n_boot, cfg.seed),
            "insertion_gain_vs_random_ci95": _group_ci(iauc - rins_auc, groups, cfg.n_boot, cfg.seed),
            "deletion_beats_random_share": float(np.mean(dauc < rdel_auc)),
            "insertion_beats_random_share": float(np.mean(iauc > rins_auc)),
            "randomisation_cascade": cascade,
        }
        if head is not None:
            e = np.asarray(head[m]["energy"], dtype=np.float64)
            a = np.asarray(head[m]["area"], dtype=np.float64)
            pk = np.asarray(head[m]["peak"], dtype=np.float64)
            img_groups = list(range(len(e)))  # one HC18 exam per image (sampled one per exam)
            entry.update({
                "energy_in_head": _mean(e),
                "energy_in_head_ci95": _group_ci(e, img_groups, cfg.n_boot, cfg.seed),
                "head_area_share": _mean(a),
                "peak_in_head_share": _mean(pk),
                "n_head_images": int(np.isfinite(e).sum()),
            })
        result["methods"][m] = entry
        result["curves"][m] = {"deletion": d.mean(0).tolist(), "insertion": i.mean(0).tolist()}
    result["config"] = cfg.to_dict()
    result["notes"] = _notes(cfg, head, units)
    return result


def _notes(cfg: FaithfulnessConfig, head: dict | None, units: Sequence[Unit]) -> list[str]:
    notes = [
        "Deletion / insertion (Petsiuk et al., BMVC 2018): area under the explained-class probability as "
        f"the most salient pixels are replaced by a {cfg.baseline} baseline (deletion, lower is better) or "
        "restored from it (insertion, higher is better), sampled at "
        f"{cfg.steps + 1} fractions. 'random_*' uses {cfg.random_maps} random maps per image drawn at the "
        "CAM layer's resolution; only the gap to random is meaningful, because perturbed images are "
        "outside the training distribution.",
        "Randomisation (Adebayo et al., NeurIPS 2018): Spearman rank correlation between the maps of the "
        "trained model and of a copy with re-initialised layers, same target class; cascading from the "
        "head down ('randomisation_cascade'). 'randomisation_similarity' is the stage in "
        "'randomisation_stage'. A faithful map must change: values near 1 fail the check. Eigen-CAM does "
        "not use the head at all, so randomising only the head cannot change it.",
        "Intervals are 95% percentile intervals of a group bootstrap (patients resampled); with a few "
        "dozen images they are wide.",
        "The explained class is the trained model's predicted class for each image.",
    ]
    if head is None:
        notes.append("energy_in_head not measured: no head-mask manifest was given (--head-masks).")
    else:
        notes.append(
            f"energy_in_head: share of heatmap mass inside the fetal-head mask on {head['_n']} HC18 "
            f"trans-thalamic images ({head['_source']}; van den Heuvel et al., PLoS ONE 2018), next to "
            "'head_area_share', the head's share of the image area, which a uniform map would score; "
            "'peak_in_head_share' is the share of images whose heatmap maximum lies in the head. HC18 "
            "comes from another centre than the training data and its masks are fitted ellipses."
        )
    names = sorted({u.name for u in units if u.records})
    notes.append(f"Models: {', '.join(names)}.")
    return notes


def table_rows(result: dict) -> list[list[object]]:
    """Rows of the faithfulness table (one per method) for the CLI and the docs."""
    rows = []
    for m, e in result["methods"].items():
        rows.append([
            e.get("name", m), e["n_images"],
            e["deletion_auc"], e["random_deletion_auc"], e["insertion_auc"], e["random_insertion_auc"],
            e["randomisation_similarity"], e.get("energy_in_head"), e.get("head_area_share"),
            e.get("peak_in_head_share"),
        ])
    return rows


TABLE_COLUMNS = ["method", "n", "deletion AUC", "random del.", "insertion AUC", "random ins.",
                 "rand. rho", "head energy", "head area", "peak in head"]


def curves_figure(result: dict):
    """Mean deletion and insertion curves per method, with the random-map baseline."""
    from fetalscan.figures import new_figure

    fig, _ = new_figure(9.0, 3.6)
    fig.clear()
    axes = fig.subplots(1, 2)
    x = result["curves"]["fractions"]
    for ax, kind in zip(axes, ("deletion", "insertion")):
        for m in result["methods"]:
            ax.plot(x, result["curves"][m][kind], label=METHODS.get(m, m))
        ax.plot(x, result["curves"]["random"][kind], "k--", label="random map")
        better = "lower" if kind == "deletion" else "higher"
        ax.set(xlabel="fraction of pixels " + ("removed" if kind == "deletion" else "restored"),
               ylabel="probability of the explained class", title=f"{kind.capitalize()} ({better} area is better)",
               ylim=(0, 1))
        ax.legend(fontsize=7)
    return fig
