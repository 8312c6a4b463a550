"""fetalscan: AI-assisted detection of fetal anomalies in prenatal ultrasound.

A second reader, never a replacement for the clinician. The pipeline flows one way::

    manifest / folder / DICOM / video -> data -> splits -> models/train
    -> predict (predictions.csv, patients.csv) -> evaluate -> explain -> report
"""

__version__ = "0.1.0"
