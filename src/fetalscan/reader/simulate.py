"""Roe-Metz simulation of multi-reader multi-case ROC studies (Roe & Metz 1997, Acad Radiol 4:298-303).

A reader's latent confidence for case ``k`` (truth ``d``) in treatment ``i`` is

    X_ijk = d (mu + tau_i) + R_j^d + C_k + (TR)_ij^d + (TC)_ik + (RC)_jk + E_ijk,

every effect normal with mean 0 and its own variance; the reader effects are drawn
separately for normal and abnormal cases, so readers differ in accuracy. With all
case-related variances summing to 1, a reader of average skill has AUC
``Phi((mu + tau_i) / sqrt(2))`` in treatment ``i``. Used by the tests (null and effect
simulations, the check of the power formula); ratings are continuous, so no ties.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy import stats


@dataclass
class RoeMetzConfig:
    """Sizes and variance components of a Roe-Metz study (defaults: a low reader variability
    structure in the spirit of Roe & Metz 1997, AUC about 0.855 without an effect)."""

    n_readers: int = 5
    n_normal: int = 50
    n_abnormal: int = 50
    mu: float = 1.5
    tau: tuple[float, ...] = field(default=(0.0, 0.0))
    var_r: float = 0.011
    var_tr: float = 0.011
    var_c: float = 0.3
    var_tc: float = 0.1
    var_rc: float = 0.2
    var_e: float = 0.4

    def auc(self) -> np.ndarray:
        """Population AUC of each treatment for a reader of average skill (reader effects 0)."""
        total = self.var_c + self.var_tc + self.var_rc + self.var_e
        return stats.norm.cdf((self.mu + np.asarray(self.tau)) / np.sqrt(2 * total))


def simulate_roe_metz(cfg: RoeMetzConfig, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """One simulated study: ratings ``(t, r, c)`` and truth ``(c,)`` (normal cases first)."""
    t, r = len(cfg.tau), cfg.n_readers
    n0, n1 = cfg.n_normal, cfg.n_abnormal
    c = n0 + n1
    truth = np.r_[np.zeros(n0, int), np.ones(n1, int)]
    sd = np.sqrt
    reader = rng.normal(0, sd(cfg.var_r), (2, r))  # per truth state
    tr = rng.normal(0, sd(cfg.var_tr), (2, t, r))
    case = rng.normal(0, sd(cfg.var_c), c)
    tc = rng.normal(0, sd(cfg.var_tc), (t, c))
    rc = rng.normal(0, sd(cfg.var_rc), (r, c))
    err = rng.normal(0, sd(cfg.var_e), (t, r, c))
    mean = truth[None, :] * (cfg.mu + np.asarray(cfg.tau)[:, None])  # (t, c)
    x = (mean[:, None, :] + reader[truth].T[None, :, :] + np.moveaxis(tr[truth], 0, -1)
         + case[None, None, :] + tc[:, None, :] + rc[None, :, :] + err)
    return x, truth
