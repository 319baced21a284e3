"""Report texts that a config parser would act on, shared by the tests that prove reports are only data.

Each template may hold ``{marker}`` (a file that must never be created: code ran) and ``{config}`` (a config
file MONAI Label's ``%``-macro would read). :py:func:`hostile_texts` fills them in.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["HOSTILE_TEMPLATES", "hostile_texts"]

HOSTILE_TEMPLATES: tuple[str, ...] = (
    '$__import__("os").system("touch {marker}") or "one infected area, upper left lung."',
    '$open("{marker}", "w").write("x")',
    "@device",
    "@displayable_configs",
    "%{config}#device",
    "# one infected area",
    '{{"_target_": "pathlib.Path.touch", "self": "{marker}"}}',
    '["$open(\\"{marker}\\", \\"w\\")"]',
    "upper left lung. " * 400,
)


def hostile_texts(marker: Path, config: Path) -> list[str]:
    """The templates with ``marker`` and ``config`` filled in, in template order."""
    return [template.format(marker=marker, config=config) for template in HOSTILE_TEMPLATES]
