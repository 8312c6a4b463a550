"""Clinical evaluation of predictions: metrics (:mod:`.metrics`), group-bootstrap intervals
(:mod:`.bootstrap`), calibration (:mod:`.calibration`, :mod:`.calibration_analysis`), the
screening view (:mod:`.screening`), subgroups (:mod:`.subgroups`), the shortcut check
(:mod:`.shortcut`), paired comparison of two runs (:mod:`.compare`), reading run folders
(:mod:`.runs`) and the whole evaluation of a run (:mod:`.evaluate`, configured by
:class:`.config.EvaluationConfig`)."""
