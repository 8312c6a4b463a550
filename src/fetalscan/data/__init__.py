"""Reading data: records and datasets from manifests, folder trees, DICOM and video
(:mod:`.records`, :mod:`.dicom`, :mod:`.video`), the HC18-style head-biometry manifest
(:mod:`.hc18`), image preparation and ultrasound augmentation (:mod:`.transforms`).

Everything is keyed by a ``group`` (patient, exam, case) that no split may cross."""
