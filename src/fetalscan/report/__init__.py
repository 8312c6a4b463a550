"""Reports: the evaluation report of a run (:mod:`.html`), evaluating a run folder or an external
set into it (:mod:`.runs`), and the HTML templates (``templates/``)."""
