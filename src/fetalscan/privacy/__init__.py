"""Privacy: DICOM de-identification (PS3.15 Annex E) and burned-in text removal.

Layer "privacy" sits just above ``data``: it uses the DICOM readers and the scan-sector
mask of :mod:`fetalscan.data.sector`, and nothing above it.
"""

from fetalscan.privacy.deid import DeidConfig, DeidResult, deidentify

__all__ = ["DeidConfig", "DeidResult", "deidentify"]
