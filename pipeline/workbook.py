"""The report's tables as an ``.xlsx`` workbook (one sheet per table).

Planners pass targets and town splits on in spreadsheets; the workbook holds
the same rows and values as the GeoPackage tables (geometry dropped), with
the column descriptions of :mod:`pipeline.glossary` in a ``columns`` sheet.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.glossary import describe
from pipeline.io import atomic_path

#: Excel's sheet-name limit [characters].
MAX_SHEET_NAME = 31


def _plain(frame: pd.DataFrame) -> pd.DataFrame:
    """Drop geometry, make infinities blank and text of everything non-numeric."""
    out = pd.DataFrame(frame.drop(columns=["geometry"], errors="ignore")).copy()
    for col in out.columns:
        s = out[col]
        if pd.api.types.is_bool_dtype(s):
            continue
        if pd.api.types.is_numeric_dtype(s):
            out[col] = s.replace([np.inf, -np.inf], np.nan)
        else:
            out[col] = s.astype(object).where(s.notna(), None)
    return out


def write_workbook(path: Path, sheets: dict[str, pd.DataFrame]) -> None:
    """Write tables to an ``.xlsx`` workbook atomically.

    Parameters
    ----------
    path : Path
        The workbook.
    sheets : dict
        Sheet name (at most 31 characters) to table; a ``columns`` sheet
        with the glossary description of every column is added.
    """
    long = [n for n in sheets if len(n) > MAX_SHEET_NAME]
    if long:
        raise ValueError(f"sheet names longer than {MAX_SHEET_NAME} characters: {long}")
    cols = sorted({c for f in sheets.values() for c in f.columns if c != "geometry"})
    glossary = pd.DataFrame({"column": cols, "meaning": [describe(c) for c in cols]})
    with atomic_path(path) as tmp:
        with pd.ExcelWriter(tmp, engine="openpyxl") as xw:
            for name, frame in sheets.items():
                _plain(frame).to_excel(xw, sheet_name=name, index=False)
                ws = xw.sheets[name]
                ws.freeze_panes = "A2"
                for i, col in enumerate(frame.drop(columns=["geometry"], errors="ignore")
                                        .columns, start=1):
                    letter = ws.cell(row=1, column=i).column_letter
                    ws.column_dimensions[letter].width = min(max(len(str(col)) + 2, 10), 40)
            glossary.to_excel(xw, sheet_name="columns", index=False)
