"""Which images of a study a report shows in full (with their heatmap): the most abnormal ones.

Shared by the PDF report (:mod:`.study_pdf`) and the DICOM outputs (:mod:`.study_dicom`), so
that the Secondary Captures sent to a PACS are the images the PDF shows.
"""

from __future__ import annotations

from collections.abc import Mapping

#: Images shown with their heatmap in the PDF and sent as Secondary Captures, at most.
MAX_SHOWN_IMAGES = 4


def abnormal_probability(image: Mapping, normal_class: str = "normal") -> float:
    """1 - p(normal) when the model has a normal class, else the probability of its own class."""
    probs = image["probabilities"]
    if normal_class in probs:
        return 1.0 - float(probs[normal_class])
    return float(probs.get(image["prediction"], 0.0))


def select_images(result: Mapping, normal_class: str = "normal", limit: int = MAX_SHOWN_IMAGES) -> list[int]:
    """Indices of the ``limit`` images of highest abnormal probability, highest first (ties: lower index)."""
    images = result["images"]
    order = sorted(range(len(images)), key=lambda k: (-abnormal_probability(images[k], normal_class), k))
    return order[: max(0, int(limit))]
