"""Inference: the one prediction path (:mod:`.predict`) and the tables it writes (:mod:`.tables`:
``predictions.csv``, ``patients.csv``, patient-level aggregation)."""
