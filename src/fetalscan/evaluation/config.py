"""How a run is evaluated: :class:`EvaluationConfig`, the one place its defaults live."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from fetalscan.errors import FetalscanError
from fetalscan.evaluation.calibration import DEFAULT_BINS

#: Subgroups with fewer patients than this are flagged as too small to read.
SMALL_SUBGROUP = 10


@dataclass
class EvaluationConfig:
    """How a run is evaluated; the CLI maps its flags 1:1 onto these fields."""

    n_boot: int = 1000
    confidence: float = 0.95
    target_sensitivity: float = 0.95
    n_bins: int = DEFAULT_BINS
    subgroups: str = "auto"
    small_subgroup: int = SMALL_SUBGROUP
    shortcut: bool = True
    probe_floor: float = 0.80
    probe_margin: float = 0.05
    n_perm: int = 2000
    seed: int = 0

    def validate(self) -> None:
        if self.n_boot < 1:
            raise FetalscanError(f"n_boot must be at least 1, got {self.n_boot}")
        if not 0.5 < self.confidence < 1.0:
            raise FetalscanError(f"confidence must be between 0.5 and 1, got {self.confidence}")
        if not 0.0 < self.target_sensitivity <= 1.0:
            raise FetalscanError(f"target_sensitivity must be in (0, 1], got {self.target_sensitivity}")
        if self.n_bins < 2:
            raise FetalscanError(f"n_bins must be at least 2, got {self.n_bins}")
        if self.small_subgroup < 1:
            raise FetalscanError(f"small_subgroup must be at least 1, got {self.small_subgroup}")

    def to_dict(self) -> dict:
        return asdict(self)
