"""
Sheet readers: ``Image``/``Description`` tables (``.xlsx``, ``.csv``) as :py:class:`SheetRow` rows.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

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


def _cell_text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float) and math.isnan(value):
        return ""
    return str(value).strip()


def _find_column(columns: Sequence[Any], wanted: str) -> Any | None:
    for column in columns:
        if str(column).strip().lower() == wanted.lower():
            return column
    return None


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
    columns = list(table.columns)
    image_key, text_key = _find_column(columns, image_column), _find_column(columns, text_column)
    missing = [name for name, key in ((image_column, image_key), (text_column, text_key)) if key is None]
    if missing:
        found = ", ".join(repr(str(c)) for c in columns) or "none"
        raise DatalistError(f"{path}: lacks the column(s) {', '.join(map(repr, missing))} (found: {found})")
    rows = []
    for offset, (image, text) in enumerate(zip(table[image_key].tolist(), table[text_key].tolist())):
        image, text = _cell_text(image), _cell_text(text)
        if not image and not text:
            continue  # blank line
        rows.append(SheetRow(row=offset + 2, image=image, description=text))
    return rows
