"""Error types of fetalscan.

Library code never prints and never calls ``sys.exit``; it raises a subclass of
:class:`FetalscanError` whose message names the file, row or field at fault and,
where possible, the fix. The command line turns any of them into one red line
and exit code 2.
"""

from __future__ import annotations


class FetalscanError(Exception):
    """Base class of every error fetalscan raises on purpose (bad input, bad state)."""

    exit_code = 2


class DataError(FetalscanError):
    """A manifest, image, DICOM or video file cannot be used as given."""


class ImageReadError(DataError):
    """An image file is unreadable, corrupt or truncated."""


class SplitError(FetalscanError):
    """The requested cross-validation split is impossible with this data."""


class LeakageError(SplitError):
    """The leakage audit found a group or a near-duplicate image on both sides of a split."""


class CheckpointError(FetalscanError):
    """A checkpoint file is missing, corrupt, or from another version or architecture."""


class ModelError(FetalscanError):
    """An unknown backbone, an unusable pretrained source, or a wrong layer name."""


class OutputError(FetalscanError):
    """An output folder or file cannot be written safely (e.g. non-empty ``--out``)."""
