"""
Sheet readers: ``Image``/``Description`` tables (``.xlsx``, ``.csv``) as :py:class:`SheetRow` rows.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import NamedTuple

from himix_monai.errors import DatalistError

__all__ = ["SheetRow", "read_description_sheet"]


class SheetRow(NamedTuple):
    """One data row of an ``Image``/``Description`` table.

    Args:
        row: the row number as a human sees it in the file (header is row 1, first data row is row 2).
        image: the ``Image`` cell, stripped; ``""`` when empty.
        description: the ``Description`` cell, stripped; ``""`` when empty or NaN.
    """

    row: int
    image: str
    description: str


def read_description_sheet(
    path: str | os.PathLike, image_column: str = "Image", text_column: str = "Description"
) -> list[SheetRow]:
    """Read an ``Image``/``Description`` table from an ``.xlsx``/``.xls`` or ``.csv`` file.

    Column names are matched ignoring case and surrounding spaces. Cells are read as text; empty and NaN
    cells become ``""``.

    Args:
        path: the sheet.
        image_column: the column holding image names.
        text_column: the column holding the descriptions.

    Returns:
        The data rows with their human row numbers (header is row 1).

    Raises:
        DatalistError: when the file cannot be read or lacks one of the columns.
    """
    import pandas as pd

    path = Path(path)
    try:
        if path.suffix.lower() in (".xlsx", ".xls", ".xlsm"):
            table = pd.read_excel(path, dtype=str)
        else:
            table = pd.read_csv(path, dtype=str, skip_blank_lines=False, encoding="utf-8-sig")
    except Exception as err:  # pandas/openpyxl raise many types for corrupt files
        raise DatalistError(f"{path}: cannot read the sheet: {type(err).__name__}: {err}") from err
    by_name = {str(column).strip().lower(): column for column in reversed(table.columns)}  # the first one wins
    missing = [name for name in (image_column, text_column) if name.lower() not in by_name]
    if missing:
        found = ", ".join(repr(str(c)) for c in table.columns) or "none"
        raise DatalistError(f"{path}: lacks the column(s) {', '.join(map(repr, missing))} (found: {found})")
    cells = table[[by_name[image_column.lower()], by_name[text_column.lower()]]].fillna("")
    rows = [SheetRow(offset + 2, str(image).strip(), str(text).strip()) for offset, (image, text) in
            enumerate(cells.values)]
    return [row for row in rows if row.image or row.description]  # blank lines are left out
