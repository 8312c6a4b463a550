"""The one Jinja environment of fetalscan's HTML pages (``fetalscan/report/templates``).

Every page (the run report ``report.html.j2``, the biometry report
``biometry_report.html.j2``) is rendered through :func:`environment`: templates
from this package's ``templates`` folder, HTML autoescaping, ``StrictUndefined``
(a missing value is an error, not an empty cell), ``trim_blocks`` and
``lstrip_blocks``. Page-specific helpers are passed in the render context.
"""

from __future__ import annotations

import functools
from pathlib import Path

TEMPLATES = Path(__file__).parent / "templates"


@functools.lru_cache(maxsize=1)
def environment():
    """The shared :class:`jinja2.Environment` (created once)."""
    from jinja2 import Environment, FileSystemLoader, StrictUndefined, select_autoescape

    return Environment(loader=FileSystemLoader(str(TEMPLATES)), autoescape=select_autoescape(["html", "j2"]),
                       undefined=StrictUndefined, trim_blocks=True, lstrip_blocks=True)


@functools.lru_cache(maxsize=1)
def plain_environment():
    """The same templates folder without HTML escaping, for text outputs (the Markdown model card)."""
    from jinja2 import Environment, FileSystemLoader, StrictUndefined

    return Environment(loader=FileSystemLoader(str(TEMPLATES)), autoescape=False, undefined=StrictUndefined,
                       trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True)


def render(template_name: str, **context) -> str:
    """Render ``templates/<template_name>`` with ``context``."""
    return environment().get_template(template_name).render(**context)
