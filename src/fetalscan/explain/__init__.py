"""Explainability: CAM heatmaps (:mod:`.cams`), their faithfulness (:mod:`.faithfulness`) and the
report gallery of a run (:mod:`.gallery`). Heatmaps support, and never replace, the clinician's reading."""
