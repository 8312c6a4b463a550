"""The served classifier's model card: ``GET /api/v1/model/card``.

The card (:mod:`fetalscan.report.model_card`) is built once, when the service starts,
from the checkpoint and, when the checkpoint sits in its run folder (``make demo``,
``fetalscan cv`` + ``train``), that run's evaluation; the page shows it under
"Model card".
"""

from __future__ import annotations

import functools

from fastapi import FastAPI

from fetalscan.serve.context import API, ServiceContext


def add_routes(app: FastAPI, ctx: ServiceContext) -> None:
    @functools.lru_cache(maxsize=1)
    def card() -> dict:
        from fetalscan.report.model_card import matching_run_metrics, model_card, render_markdown

        metrics = matching_run_metrics(ctx.settings.model)
        c = model_card(ctx.settings.model, metrics=metrics)
        return {"card": c, "markdown": render_markdown(c)}

    @app.get(f"{API}/model/card", tags=["service"], dependencies=ctx.auth,
             summary="The served model's card: intended use, out-of-scope use, training data, metrics with CIs, "
                     "calibration, the shortcut check, human oversight (JSON and Markdown)")
    def model_card_route() -> dict:
        return card()
