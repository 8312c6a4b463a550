"""The one statement of what fetalscan is for, used by every output (reports, files, the CLI).

Every result says that it supports, and never replaces, the clinician; the variants below
add what a particular output is (a heatmap, a measurement) to the same statement.
"""

from __future__ import annotations

#: The support-not-replace statement; reports, metrics files, the CLI help and the service show it.
DISCLAIMER = ("fetalscan is research software that supports, and never replaces, the clinician's "
              "reading; it is not a medical device.")

#: For heatmaps: where the model's evidence lay is not where the anomaly is.
HEATMAP_DISCLAIMER = ("Heatmaps show where the model's evidence lay, not where the anomaly is. " + DISCLAIMER)

#: For head biometry: the sonographer's measurement is the reference.
BIOMETRY_DISCLAIMER = ("Measurements are the model's; the sonographer's measurement is the reference. "
                       + DISCLAIMER)
