"""The report's tables as an ``.xlsx`` workbook (one sheet per table).

Planners pass targets and town splits on in spreadsheets; the workbook holds
the same rows and values as the GeoPackage tables (geometry dropped), with
the column descriptions of :mod:`pipeline.glossary` in a ``columns`` sheet.

Writing is in two steps, because a cell-by-cell writer costs 10-50 us a cell
(openpyxl wrote 954k cells in 50 s at 250k buildings): ``xlsxwriter`` writes
the package (workbook, styles, sheet names, the bold frozen header row,
column widths), then the data rows are encoded column by column into
SpreadsheetML (``<row>``/``<c>`` elements with inline strings) and spliced
into each sheet's ``<sheetData>`` while the package is copied to its final
zip. Missing values and infinities are blank cells, as before; floats are
written with the shortest text that round-trips them (openpyxl kept 16
significant digits); dates, which the report's tables do not have, would be
text.

A table longer than Excel's 1,048,576 rows continues on sheets named
``<name> (2)``, ``<name> (3)``, ... each with the header row, so every row is
kept; the GeoPackage layer of the same name holds the table in one piece.
"""

from __future__ import annotations

import io
import logging
import re
import zipfile
from concurrent.futures import ThreadPoolExecutor
from itertools import chain
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.glossary import describe
from pipeline.io import atomic_path

log = logging.getLogger(__name__)

#: Excel's sheet-name limit [characters].
MAX_SHEET_NAME = 31
#: Excel's row limit per sheet, header row included [rows].
EXCEL_MAX_ROWS = 1_048_576
#: Rows encoded and compressed at a time (bounds the memory of a large sheet) [rows].
CHUNK_ROWS = 50_000

_CONTROL = re.compile("[\x00-\x08\x0b-\x1f]")


def _escape(text: str) -> str:
    """XML text of a cell string; control characters as Excel's ``_xHHHH_``."""
    text = text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    if _CONTROL.search(text):
        text = _CONTROL.sub(lambda m: f"_x{ord(m.group()):04X}_", text)
    return text


def _string_payload(text: str) -> str:
    if text == "":
        return ""
    space = ' xml:space="preserve"' if text != text.strip() else ""
    return f'" t="inlineStr"><is><t{space}>{_escape(text)}</t></is></c>'


def _number_payload(value: float) -> str:
    if value != value or value in (np.inf, -np.inf):
        return ""
    return f'"><v>{value!r}</v></c>'


_TRUE = '" t="b"><v>1</v></c>'
_FALSE = '" t="b"><v>0</v></c>'


def _value_payload(v: object) -> str:
    """Cell payload of one value of a mixed column (``""`` for a blank cell)."""
    if v is None or v is pd.NA or v is pd.NaT:
        return ""
    if isinstance(v, bool | np.bool_):
        return _TRUE if v else _FALSE
    if isinstance(v, int | np.integer):
        return f'"><v>{int(v)}</v></c>'
    if isinstance(v, float | np.floating):
        return _number_payload(float(v))
    return _string_payload(str(v))


def column_cells(values: pd.Series, letter: str, rows: list[str]) -> list[str]:
    """Each value as a SpreadsheetML cell (``""`` for a blank cell).

    Numbers are ``<v>`` with the shortest text that round-trips the float,
    booleans ``t="b"``, text an inline string (XML-escaped, control
    characters as Excel's ``_xHHHH_``); missing values, NaN and infinities
    give no cell.

    Parameters
    ----------
    values : Series
        One column.
    letter : str
        Its column letters (``"A"``, ..., ``"AB"``).
    rows : list of str
        The Excel row number of each value.

    Returns
    -------
    list of str
        ``<c r="B7" ...>...</c>`` or ``""`` per value.
    """
    s, pre = values, f'<c r="{letter}'
    if isinstance(s.dtype, np.dtype) and s.dtype.kind == "b":
        return [pre + r + (_TRUE if v else _FALSE)
                for r, v in zip(rows, s.tolist(), strict=True)]
    if isinstance(s.dtype, np.dtype) and s.dtype.kind in "iu":
        return [f'{pre}{r}"><v>{v}</v></c>' for r, v in zip(rows, s.tolist(), strict=True)]
    if isinstance(s.dtype, np.dtype) and s.dtype.kind == "f":
        arr = s.to_numpy()
        ok = np.isfinite(arr).tolist()
        return [f'{pre}{r}"><v>{v!r}</v></c>' if k else ""
                for r, v, k in zip(rows, arr.tolist(), ok, strict=True)]
    if isinstance(s.dtype, pd.CategoricalDtype):
        codes, uniques = s.cat.codes.to_numpy(), s.cat.categories.tolist()
        payload = [_value_payload(v) for v in uniques]
    elif pd.api.types.infer_dtype(s, skipna=True) in ("string", "empty"):
        codes, index = pd.factorize(s, use_na_sentinel=True)
        payload = [_string_payload(str(u)) for u in index]
    else:
        return [pre + r + p if p else "" for r, p in
                zip(rows, map(_value_payload, s.astype(object).tolist()), strict=True)]
    table = payload + [""]  # code -1 (missing) takes the trailing ""
    return [pre + r + table[c] if table[c] else ""
            for r, c in zip(rows, codes.tolist(), strict=True)]


def _column_letters(n: int) -> list[str]:
    out = []
    for i in range(n):
        name, k = "", i + 1
        while k:
            k, r = divmod(k - 1, 26)
            name = chr(65 + r) + name
        out.append(name)
    return out


def sheet_rows_xml(frame: pd.DataFrame, first_row: int) -> str:
    """The ``<row>`` elements of a table's data rows.

    Parameters
    ----------
    frame : DataFrame
        The rows (no geometry column).
    first_row : int
        Excel row number of the first row (1-based; 2 below a header).

    Returns
    -------
    str
        SpreadsheetML ``<row r=..><c r=..>...</c></row>...``.
    """
    nums = [str(r) for r in range(first_row, first_row + len(frame))]
    cols = [column_cells(frame[col], letter, nums)
            for letter, col in zip(_column_letters(frame.shape[1]), frame.columns, strict=True)]
    opens = [f'<row r="{r}">' for r in nums]
    closes = ["</row>"] * len(nums)
    return "".join(chain.from_iterable(zip(opens, *cols, closes, strict=True)))


def _split(name: str, frame: pd.DataFrame, max_rows: int) -> list[tuple[str, pd.DataFrame]]:
    """A table as sheets of at most ``max_rows`` rows, header included."""
    per = max_rows - 1
    if len(frame) <= per:
        return [(name, frame)]
    parts = []
    for k, start in enumerate(range(0, len(frame), per), start=1):
        suffix = "" if k == 1 else f" ({k})"
        parts.append((name[:MAX_SHEET_NAME - len(suffix)] + suffix,
                      frame.iloc[start:start + per]))
    log.info("workbook: %s has %d rows, more than Excel's %d a sheet: it continues on "
             "sheets %s (the GeoPackage layer holds it in one piece)", name, len(frame),
             max_rows, ", ".join(repr(p[0]) for p in parts[1:]))
    return parts


def write_workbook(path: Path, sheets: dict[str, pd.DataFrame],
                   max_rows: int = EXCEL_MAX_ROWS) -> None:
    """Write tables to an ``.xlsx`` workbook atomically.

    Parameters
    ----------
    path : Path
        The workbook.
    sheets : dict
        Sheet name (at most 31 characters) to table; a ``columns`` sheet
        with the glossary description of every column is added.
    max_rows : int
        Rows a sheet holds, header included [rows] (Excel: 1,048,576); a
        longer table continues on sheets ``<name> (2)``, ...
    """
    import xlsxwriter

    long = [n for n in sheets if len(n) > MAX_SHEET_NAME]
    if long:
        raise ValueError(f"sheet names longer than {MAX_SHEET_NAME} characters: {long}")
    cols = sorted({c for f in sheets.values() for c in f.columns if c != "geometry"})
    glossary = pd.DataFrame({"column": cols, "meaning": [describe(c) for c in cols]})
    parts: list[tuple[str, pd.DataFrame]] = []
    for name, frame in [*sheets.items(), ("columns", glossary)]:
        parts += _split(name, pd.DataFrame(frame.drop(columns=["geometry"], errors="ignore")),
                        max_rows)
    names = [n.lower() for n, _ in parts]
    if len(set(names)) != len(names):
        raise ValueError(f"sheet names repeat: {[n for n, _ in parts]}")

    skeleton = io.BytesIO()
    wb = xlsxwriter.Workbook(skeleton, {"in_memory": True, "strings_to_numbers": False,
                                        "strings_to_formulas": False, "strings_to_urls": False})
    header = wb.add_format({"bold": True, "border": 1, "align": "center", "valign": "top"})
    for name, frame in parts:
        ws = wb.add_worksheet(name)
        ws.write_row(0, 0, [str(c) for c in frame.columns], header)
        ws.freeze_panes(1, 0)
        for i, col in enumerate(frame.columns):
            ws.set_column(i, i, min(max(len(str(col)) + 2, 10), 40))
    wb.close()

    with atomic_path(path) as tmp:
        with zipfile.ZipFile(io.BytesIO(skeleton.getvalue())) as zin, \
                zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED,
                                compresslevel=1) as zout:
            bodies = {f"xl/worksheets/sheet{i}.xml": frame
                      for i, (_, frame) in enumerate(parts, start=1)}
            for info in zin.infolist():
                data = zin.read(info.filename)
                frame = bodies.get(info.filename)
                if frame is None or len(frame) == 0 or frame.shape[1] == 0:
                    zout.writestr(info.filename, data)
                    continue
                _write_sheet(zout, info.filename, data.decode("utf-8"), frame)


def _write_sheet(zout: zipfile.ZipFile, member: str, xml: str, frame: pd.DataFrame) -> None:
    """Copy a skeleton sheet with the table's data rows after its header row."""
    head, tail = xml.split("</sheetData>", 1)
    last = _column_letters(frame.shape[1])[-1]
    head = re.sub(r'<dimension ref="[^"]*"/>', f'<dimension ref="A1:{last}{len(frame) + 1}"/>',
                  head, count=1)
    # zlib releases the GIL: compress one chunk in a thread while the next is encoded
    with zout.open(member, "w", force_zip64=True) as out, ThreadPoolExecutor(1) as pool:
        out.write(head.encode("utf-8"))
        pending = None
        for start in range(0, len(frame), CHUNK_ROWS):
            data = sheet_rows_xml(frame.iloc[start:start + CHUNK_ROWS], start + 2).encode("utf-8")
            if pending is not None:
                pending.result()
            pending = pool.submit(out.write, data)
        if pending is not None:
            pending.result()
        out.write(("</sheetData>" + tail).encode("utf-8"))
