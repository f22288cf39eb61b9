"""Vectorised helpers for per-value column work on large frames.

Text columns of a building stock hold few distinct values (``building=yes``
a million times), so a per-value Python function runs once per distinct
value and the results are gathered back with integer codes
(:func:`map_unique`). :func:`records_json` builds each row's attributes as a
JSON object column by column instead of row by row.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import numpy as np
import pandas as pd


def map_unique(values: pd.Series | np.ndarray, func: Callable[[Any], Any],
               null: Any = None) -> np.ndarray:
    """Apply ``func`` once per distinct non-null value.

    Parameters
    ----------
    values : Series or ndarray
        The column.
    func : callable
        Function of one non-null value.
    null : object
        Result for null values (None, NaN, ``pd.NA``, ``NaT``).

    Returns
    -------
    ndarray of object
        ``func(v)`` for each value, ``null`` where the value is null; the
        same as ``[func(v) if not null else null for v in values]``, with
        values as ``Series`` iteration yields them (Python scalars for numpy
        dtypes).
    """
    series = values if isinstance(values, pd.Series) else pd.Series(values)
    series = series.reset_index(drop=True)
    n = len(series)
    out = np.empty(n, dtype=object)
    out.fill(null)  # fill() stores a tuple as one element; slice assignment would unpack it
    if n == 0:
        return out
    if series.dtype == object and pd.api.types.infer_dtype(series, skipna=True) not in (
        "string", "empty"
    ):
        # mixed Python objects: 1, 1.0 and True hash alike, so no factorising
        for pos in np.flatnonzero(series.notna().to_numpy()):
            out[pos] = func(series.iloc[pos])
        return out
    codes, uniques = pd.factorize(series, use_na_sentinel=True)
    if len(uniques):
        mapped = np.empty(len(uniques), dtype=object)
        for k, v in enumerate(pd.Series(uniques, dtype=series.dtype)):
            mapped[k] = func(v)
        has = codes >= 0
        out[has] = mapped[codes[has]]
    return out


def _json_value(value: Any) -> str:
    scalar = value if isinstance(value, str | int | float | bool) else str(value)
    return json.dumps(scalar, ensure_ascii=False, default=str)


def _json_strings(values: pd.Series, key: str) -> np.ndarray:
    """``key + json.dumps(value)`` for a text column, vectorised where nothing needs escaping.

    With ``ensure_ascii=False`` JSON escapes only quotes, backslashes and
    control characters; other strings are just quoted (ids are unique, so
    one ``json.dumps`` per distinct value would be one per row).
    """
    text = values.astype("str")
    nulls = text.isna().to_numpy()
    plain = ~text.str.contains(r'["\\\x00-\x1f]', regex=True).fillna(False).to_numpy(bool)
    out = np.full(len(text), None, dtype=object)
    quick = plain & ~nulls
    out[quick] = (key + '"' + text[quick] + '"').to_numpy(dtype=object)
    for i in np.flatnonzero(~plain & ~nulls):
        out[i] = key + json.dumps(text.iloc[i], ensure_ascii=False)
    return out


def records_json(frame: pd.DataFrame) -> np.ndarray:
    """Each row's non-null attributes as a JSON object, in column order.

    Parameters
    ----------
    frame : DataFrame
        Attribute columns (no geometry).

    Returns
    -------
    ndarray of str
        ``json.dumps({column: value, ...}, ensure_ascii=False)`` per row;
        nulls are left out, values other than str, int, float and bool are
        written as their text.
    """
    n = len(frame)
    body = np.full(n, "", dtype=object)
    for pos, column in enumerate(frame.columns):
        key = json.dumps(str(column), ensure_ascii=False) + ": "
        values = frame.iloc[:, pos]
        if pd.api.types.is_string_dtype(values) and pd.api.types.infer_dtype(
                values, skipna=True) in ("string", "empty"):
            encoded = _json_strings(values.reset_index(drop=True), key)
        else:
            encoded = map_unique(values, lambda v, k=key: k + _json_value(v))
        has = ~pd.isna(encoded)
        first = has & (body == "")
        later = has & ~first
        body[first] = encoded[first]
        body[later] = body[later] + ", " + encoded[later]
    return np.asarray("{" + body + "}", dtype=object) if n else np.empty(0, dtype=object)
