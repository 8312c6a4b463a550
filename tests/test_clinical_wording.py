"""Clinical statements match the guideline they come from (issue #17, item 2).

HC and BPD are measured on the transthalamic plane (ISUOG Practice Guidelines: ultrasound
assessment of fetal biometry and growth, Ultrasound Obstet Gynecol 2019;53:715-723), not the
transventricular plane. Every message, template and guide is checked; docs/biometry.md lists each
clinical statement with its source.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SOURCES = [p for p in (REPO / "src" / "fetalscan").rglob("*") if p.suffix in (".py", ".j2", ".js", ".html")]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]

BIOMETRY_WORDS = re.compile(r"\b(HC|BPD|head circumference|biparietal|biometry|measure(d|ment)?)\b", re.IGNORECASE)


def _sentences(text: str):
    flat = re.sub(r"\s+", " ", text)
    yield from re.split(r"(?<=[.;!?])\s", flat)


@pytest.mark.parametrize("path", SOURCES + DOCS, ids=lambda p: str(p.relative_to(REPO)))
def test_no_statement_puts_head_biometry_on_the_transventricular_plane(path):
    wrong = [s for s in _sentences(path.read_text(encoding="utf-8"))
             if "transventricular" in s.lower() and BIOMETRY_WORDS.search(s) and "transthalamic" not in s.lower()
             and "lateral ventricle" not in s.lower()]
    assert not wrong, wrong


def test_biometry_messages_name_the_transthalamic_plane_and_cite_isuog():
    from fetalscan.biometry.scoring import LIMITATIONS
    from fetalscan.texts import BIOMETRY_PLANE, ISUOG_BIOMETRY_2019

    assert "transthalamic" in BIOMETRY_PLANE and "ISUOG" in BIOMETRY_PLANE and "2019" in BIOMETRY_PLANE
    assert "Ultrasound Obstet Gynecol 2019;53:715-723" in ISUOG_BIOMETRY_2019
    plane = next(item for item in LIMITATIONS if "plane" in item)
    assert BIOMETRY_PLANE in plane and "transventricular plane (check" not in plane


def test_biometry_guide_lists_every_clinical_statement_with_its_source():
    guide = (REPO / "docs" / "biometry.md").read_text(encoding="utf-8")
    section = guide[guide.index("## Clinical statements and their sources"):guide.index("## References")]
    for source in ("ISUOG Practice Guidelines: ultrasound assessment of fetal biometry and growth",
                   "Hadlock et al. 1984", "first-trimester", "central nervous system"):
        assert source in section, source
    references = guide[guide.index("## References"):]
    assert "Ultrasound Obstet Gynecol 2019;53:715–723" in references


def test_biometry_report_states_the_plane_and_its_source():
    from test_biometry_output import biometry_metrics, scored_images

    from fetalscan.report.biometry import render_biometry_report

    df = scored_images()
    html = render_biometry_report(biometry_metrics(df), df, "Held-out exams", None)
    assert "transthalamic" in html and "Ultrasound Obstet Gynecol 2019" in html
    assert "transventricular plane (check" not in html
