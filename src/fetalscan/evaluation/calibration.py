"""Calibration: reliability bins, ECE, MCE, Brier score, NLL and temperature scaling.

A classifier is *calibrated* when, among the images it gives a confidence of
0.8, about 80 % are correct. The measures here follow Guo et al. (2017):

- **Reliability bins**: the top-class confidence ``max_k p_k`` is cut into
  ``n_bins`` equal-width bins on [0, 1]; each bin has its mean confidence and
  its accuracy (share of images whose arg-max class is the true class).
- **ECE** (expected calibration error): ``sum_b n_b / n * |acc_b - conf_b|``.
- **MCE** (maximum calibration error): ``max_b |acc_b - conf_b|`` over non-empty bins.
- **Brier score** (Brier 1950), multi-class form: mean over images of
  ``sum_k (p_k - 1[y = k])^2`` (0 is perfect, 2 the worst).
- **NLL**: mean ``-log p_y``.

Temperature scaling (Guo et al. 2017) divides the logits by one scalar ``T``
fitted by minimising the NLL on held-out data. Only probabilities are stored in
fetalscan's prediction files, so it is applied to log-probabilities:
``softmax(log p / T)`` -- identical to ``softmax(z / T)`` for the logits ``z``
that produced ``p``, because ``log softmax(z) = z - logsumexp(z)`` differs from
``z`` by a per-image constant. ``T > 1`` softens over-confident models, ``T < 1``
sharpens under-confident ones, and the arg-max (hence accuracy) never changes.

Edge-case rules: an empty input is an error; bins without images are skipped by
ECE and MCE; probabilities are clipped to ``[1e-12, 1]`` before logarithms.

References
----------
Guo C, Pleiss G, Sun Y, Weinberger KQ. On calibration of modern neural networks.
ICML 2017. arXiv:1706.04599.
Brier GW. Verification of forecasts expressed in terms of probability.
Monthly Weather Review 1950;78(1):1-3.
Naeini MP, Cooper GF, Hauskrecht M. Obtaining well calibrated probabilities
using Bayesian binning. AAAI 2015 (ECE / MCE).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np

from fetalscan.errors import DataError

log = logging.getLogger(__name__)


EPS = 1e-12


#: Search range of the temperature (log-uniform); beyond it the data are degenerate.
T_MIN, T_MAX = 0.05, 20.0


DEFAULT_BINS = 15


def _check(probs: np.ndarray, y: Sequence[int] | np.ndarray, where: str = "probs") -> tuple[np.ndarray, np.ndarray]:
    """Validate ``probs`` (n, k) and integer labels ``y`` (n,); return float64 / int64 copies."""
    p = np.asarray(probs, dtype=np.float64)
    if p.ndim != 2:
        raise DataError(f"{where}: expected a 2-D array (images, classes), got shape {p.shape}")
    labels = np.asarray(y)
    if labels.shape != (p.shape[0],):
        raise DataError(f"{where}: {p.shape[0]} rows of probabilities but {labels.shape} labels")
    if p.shape[0] == 0:
        raise DataError(f"{where}: no images to calibrate on (empty input)")
    if not np.issubdtype(labels.dtype, np.integer):
        raise DataError(f"{where}: labels must be class indices (integers), got dtype {labels.dtype}")
    if labels.min() < 0 or labels.max() >= p.shape[1]:
        raise DataError(f"{where}: class index out of range 0..{p.shape[1] - 1}")
    if not np.isfinite(p).all():
        raise DataError(f"{where}: probabilities contain NaN or infinity")
    return p, labels.astype(np.int64)


def reliability_bins(probs: np.ndarray, y: Sequence[int], n_bins: int = DEFAULT_BINS) -> dict:
    """Top-class confidence vs accuracy in ``n_bins`` equal-width bins (Guo et al. 2017).

    Parameters
    ----------
    probs : array, shape (n, k)
        Class probabilities.
    y : array of int, shape (n,)
        True class indices.
    n_bins : int, default 15

    Returns
    -------
    dict
        ``edges`` (n_bins + 1), and per bin ``count``, ``confidence`` (mean top-class
        probability) and ``accuracy`` (``NaN`` for empty bins).
    """
    p, labels = _check(probs, y)
    conf = p.max(1)
    correct = (p.argmax(1) == labels).astype(np.float64)
    idx = bin_index(conf, n_bins)
    count = np.bincount(idx, minlength=n_bins).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_conf = np.bincount(idx, conf, minlength=n_bins) / count
        acc = np.bincount(idx, correct, minlength=n_bins) / count
    return {
        "edges": np.linspace(0.0, 1.0, n_bins + 1).tolist(),
        "count": count.astype(int).tolist(),
        "confidence": mean_conf.tolist(),
        "accuracy": acc.tolist(),
    }


def bin_index(confidence: np.ndarray, n_bins: int = DEFAULT_BINS) -> np.ndarray:
    """Bin of each confidence in ``n_bins`` equal-width bins; 1.0 falls in the last bin."""
    if n_bins < 1:
        raise DataError(f"n_bins must be at least 1, got {n_bins}")
    return np.clip((np.asarray(confidence) * n_bins).astype(np.int64), 0, n_bins - 1)


def calibration_errors_weighted(confidence: np.ndarray, correct: np.ndarray, weights: np.ndarray,
                                n_bins: int = DEFAULT_BINS) -> tuple[np.ndarray, np.ndarray]:
    """ECE and MCE under each row of a weight matrix (for the group bootstrap).

    Parameters
    ----------
    confidence, correct : arrays, shape (n,)
        Top-class probability and 1/0 correctness of each image.
    weights : array, shape (b, n)
        Non-negative weights (e.g. how often each image's group was drawn).

    Returns
    -------
    ece, mce : arrays, shape (b,)
    """
    w = np.atleast_2d(np.asarray(weights, dtype=np.float64))
    onehot = np.zeros((len(confidence), n_bins))
    onehot[np.arange(len(confidence)), bin_index(confidence, n_bins)] = 1.0
    count = w @ onehot
    conf_sum = w @ (onehot * np.asarray(confidence, dtype=np.float64)[:, None])
    corr_sum = w @ (onehot * np.asarray(correct, dtype=np.float64)[:, None])
    total = count.sum(1)
    gap = np.abs(corr_sum - conf_sum)
    with np.errstate(invalid="ignore", divide="ignore"):
        ece = gap.sum(1) / total
        per_bin = np.where(count > 0, gap / np.where(count > 0, count, 1.0), -np.inf)
        mce = per_bin.max(1)
    mce[~np.isfinite(mce)] = np.nan
    ece[total <= 0] = np.nan
    return ece, mce


def expected_calibration_error(probs: np.ndarray, y: Sequence[int], n_bins: int = DEFAULT_BINS) -> float:
    """ECE: bin-size-weighted mean gap between accuracy and confidence (Naeini et al. 2015; Guo et al. 2017)."""
    p, labels = _check(probs, y)
    ece, _ = calibration_errors_weighted(p.max(1), p.argmax(1) == labels, np.ones((1, len(labels))), n_bins)
    return float(ece[0])


def maximum_calibration_error(probs: np.ndarray, y: Sequence[int], n_bins: int = DEFAULT_BINS) -> float:
    """MCE: the largest accuracy-confidence gap over non-empty bins (Naeini et al. 2015)."""
    p, labels = _check(probs, y)
    _, mce = calibration_errors_weighted(p.max(1), p.argmax(1) == labels, np.ones((1, len(labels))), n_bins)
    return float(mce[0])


def brier_score(probs: np.ndarray, y: Sequence[int]) -> float:
    """Multi-class Brier score: mean of ``sum_k (p_k - 1[y=k])^2`` (Brier 1950); 0 is perfect."""
    p, labels = _check(probs, y)
    onehot = np.zeros_like(p)
    onehot[np.arange(len(labels)), labels] = 1.0
    return float(((p - onehot) ** 2).sum(1).mean())


def negative_log_likelihood(probs: np.ndarray, y: Sequence[int]) -> float:
    """Mean ``-log p_y`` (natural log), probabilities clipped at 1e-12."""
    p, labels = _check(probs, y)
    return float(-np.log(np.clip(p[np.arange(len(labels)), labels], EPS, 1.0)).mean())


def calibration_metrics(probs: np.ndarray, y: Sequence[int], n_bins: int = DEFAULT_BINS) -> dict:
    """ECE, MCE, Brier score, NLL and the reliability bins of one set of predictions."""
    p, labels = _check(probs, y)
    return {
        "n": int(len(labels)),
        "ece": expected_calibration_error(p, labels, n_bins),
        "mce": maximum_calibration_error(p, labels, n_bins),
        "brier": brier_score(p, labels),
        "nll": negative_log_likelihood(p, labels),
        "n_bins": int(n_bins),
        "bins": reliability_bins(p, labels, n_bins),
    }


def apply_temperature(probs: np.ndarray, temperature: float) -> np.ndarray:
    """``softmax(log p / T)``: the probabilities a model would give with its logits divided by ``T``."""
    if not temperature > 0 or not np.isfinite(temperature):
        raise DataError(f"temperature must be a positive number, got {temperature}")
    p = np.asarray(probs, dtype=np.float64)
    z = np.log(np.clip(p, EPS, 1.0)) / float(temperature)
    z -= z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def _nll_at(log_p: np.ndarray, labels: np.ndarray, temperature: float) -> float:
    z = log_p / temperature
    z = z - z.max(1, keepdims=True)
    lse = np.log(np.exp(z).sum(1))
    return float((lse - z[np.arange(len(labels)), labels]).mean())


def fit_temperature(probs: np.ndarray, y: Sequence[int]) -> float:
    """Temperature ``T`` minimising the NLL of ``softmax(log p / T)`` (Guo et al. 2017).

    Fit it on held-out predictions that played no part in training nor in the
    evaluation it will be applied to (fetalscan uses the inner validation split).

    Parameters
    ----------
    probs : array, shape (n, k)
        Probabilities of the held-out images (at temperature 1).
    y : array of int, shape (n,)
        Their true class indices.

    Returns
    -------
    float
        The fitted temperature, searched on a log scale in ``[0.05, 20]``. When the
        held-out set is perfectly separated the NLL keeps falling as ``T`` shrinks,
        and the lower bound is returned (logged as a warning).

    References
    ----------
    Guo C, Pleiss G, Sun Y, Weinberger KQ. On calibration of modern neural
    networks. ICML 2017.

    Examples
    --------
    >>> import numpy as np
    >>> p = np.array([[0.99, 0.01], [0.98, 0.02], [0.03, 0.97], [0.97, 0.03]])
    >>> round(fit_temperature(p, np.array([0, 1, 1, 0])), 1) > 1.0  # over-confident
    True
    """
    from scipy.optimize import minimize_scalar

    p, labels = _check(probs, y)
    log_p = np.log(np.clip(p, EPS, 1.0))
    res = minimize_scalar(lambda lt: _nll_at(log_p, labels, float(np.exp(lt))),
                          bounds=(np.log(T_MIN), np.log(T_MAX)), method="bounded",
                          options={"xatol": 1e-4})
    t = float(np.exp(res.x))
    # the bounded search may stop just inside a bound; compare with the bounds themselves
    for edge in (T_MIN, T_MAX):
        if _nll_at(log_p, labels, edge) < _nll_at(log_p, labels, t):
            t = edge
    if t <= T_MIN * 1.01 or t >= T_MAX * 0.99:
        log.warning("temperature scaling reached its search bound (T=%.3g): the held-out set of %d images "
                    "is too small or perfectly separated for a reliable fit", t, len(labels))
    return t


def temperature_block(probs: np.ndarray, y: Sequence[int], fitted_on: str = "inner validation",
                      n_bins: int = DEFAULT_BINS) -> dict:
    """Fit ``T`` and describe it the way checkpoints store it.

    Returns ``{"temperature", "fitted_on", "n", "ece_before", "ece_after",
    "nll_before", "nll_after", "method"}``.
    """
    p, labels = _check(probs, y)
    t = fit_temperature(p, labels)
    q = apply_temperature(p, t)
    return {
        "temperature": t,
        "fitted_on": fitted_on,
        "n": int(len(labels)),
        "ece_before": expected_calibration_error(p, labels, n_bins),
        "ece_after": expected_calibration_error(q, labels, n_bins),
        "nll_before": negative_log_likelihood(p, labels),
        "nll_after": negative_log_likelihood(q, labels),
        "method": "temperature scaling (Guo et al. 2017), NLL minimised on log-probabilities",
    }
