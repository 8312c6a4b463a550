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

#: The guideline the biometry plane statements come from (see docs/biometry.md, "Clinical statements").
ISUOG_BIOMETRY_2019 = ("Salomon LJ, Alfirevic Z, Da Silva Costa F, et al. ISUOG Practice Guidelines: ultrasound "
                       "assessment of fetal biometry and growth. Ultrasound Obstet Gynecol 2019;53:715-723")

#: Where HC and BPD are measured, with its source; every output that names the plane uses this text.
BIOMETRY_PLANE = ("HC and BPD are measured on the transthalamic plane (ISUOG Practice Guidelines 2019, "
                  "Ultrasound Obstet Gynecol 2019;53:715-723)")

#: For head biometry: the sonographer's measurement is the reference.
BIOMETRY_DISCLAIMER = ("Measurements are the model's; the sonographer's measurement is the reference. "
                       + DISCLAIMER)
