"""Report figures are readable on a 1,400 px page and on paper (issue #17, item 3).

ROC, precision-recall, reliability and confusion plots: at least 700 px wide (at the 100 dpi
they are embedded with, one figure pixel is one CSS pixel), every tick, label and legend text at
least 11 pt, legends outside the axes (so they cover no curve), and confusion-matrix class names
written horizontally.
"""

from __future__ import annotations

import io

import pytest
from PIL import Image

from fetalscan.evaluation.config import EvaluationConfig
from fetalscan.figures import figure_png
from fetalscan.report import html as report_html
from fetalscan.report.runs import evaluate_run


@pytest.fixture(scope="module")
def figures(tmp_path_factory):
    """Every figure object the report of a small three-class run draws, by title."""
    from test_report import make_cv_run

    run = make_cv_run(tmp_path_factory.mktemp("figs"), with_images=False)
    drawn = []
    original = report_html._uri
    report_html._uri = lambda fig: (drawn.append(fig), original(fig))[1]
    try:
        evaluate_run(run, EvaluationConfig(n_boot=50, n_perm=20, shortcut=False))
    finally:
        report_html._uri = original
    return {fig.axes[0].get_title(): fig for fig in drawn}


KINDS = ("ROC, patient level", "ROC, image level", "Precision-recall, patient level",
         "Precision-recall, image level", "Reliability, patient level", "Reliability, image level",
         "Confusion matrix, patient level", "Confusion matrix, image level")


def _texts(ax):
    yield from ax.get_xticklabels()
    yield from ax.get_yticklabels()
    yield ax.xaxis.label
    yield ax.yaxis.label
    legend = ax.get_legend()
    if legend is not None:
        yield from legend.get_texts()


@pytest.mark.parametrize("title", KINDS)
def test_figure_is_at_least_700_px_wide_with_11_pt_text(figures, title):
    fig = figures[title]
    width, _ = Image.open(io.BytesIO(figure_png(fig, dpi=100))).size
    assert width >= 700, (title, width)
    ax = fig.axes[0]
    small = [(t.get_text(), t.get_fontsize()) for t in _texts(ax) if t.get_text() and t.get_fontsize() < 11]
    assert not small, (title, small)


@pytest.mark.parametrize("title", [k for k in KINDS if not k.startswith("Confusion")])
def test_legend_lies_outside_the_plot_area(figures, title):
    fig = figures[title]
    ax = fig.axes[0]
    legend = ax.get_legend()
    assert legend is not None, title
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    renderer = FigureCanvasAgg(fig).get_renderer()
    box, area = legend.get_window_extent(renderer), ax.get_window_extent(renderer)
    assert box.y1 <= area.y0 + 1 or box.x0 >= area.x1 - 1, (title, box, area)  # below or beside, never over


@pytest.mark.parametrize("title", ["Confusion matrix, patient level", "Confusion matrix, image level"])
def test_confusion_matrix_class_names_are_horizontal(figures, title):
    ax = figures[title].axes[0]
    labels = ax.get_xticklabels()
    assert labels and all(t.get_rotation() == 0 for t in labels)
    assert {t.get_text().replace("\n", " ") for t in labels} == {"cyst", "normal", "ventriculomegaly"}
