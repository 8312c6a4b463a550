"""Reader studies: design, readings, multi-reader multi-case (MRMC) analysis and power.

- :mod:`~fetalscan.reader.design`: counterbalanced crossover / split-plot designs from a case manifest.
- :mod:`~fetalscan.reader.reads`: the readings CSV (``reader,treatment,case,truth,rating[,answer,seconds,session]``).
- :mod:`~fetalscan.reader.fom`, :mod:`~fetalscan.reader.covariance`, :mod:`~fetalscan.reader.mrmc`: empirical AUC,
  jackknife / DeLong / unbiased covariances, Obuchowski-Rockette (Hillis df) and DBM.
- :mod:`~fetalscan.reader.timing`: reading time by arm; :mod:`~fetalscan.reader.power`: Hillis-Obuchowski power;
  :mod:`~fetalscan.reader.simulate`: the Roe-Metz model.
- :mod:`~fetalscan.reader.analysis`: ``reader-study analyze`` (``mrmc.json`` + ``report.html``).

Submodules are imported on demand (``from fetalscan.reader.analysis import analyze``).
"""
