"""Attribute defects at ingest: numbers written as text, absurd values, bad text.

Sources carry storeys and heights as free text (OpenStreetMap
``building:levels`` = ``"5;6"``, ``"3-4"``, ``"五"``, ``"12F"``) and names in
the wrong encoding. Nothing here turns a value into a number silently: every
value that is not a plain number in range is either parsed by the rule below
and noted, or set to null and noted, in the column ``attribute_issues``; the
source's value stays in ``original_attributes``.

Parsing rule for ``levels_attr`` [-] and ``height_attr_m`` [m]
    1. A number (or text that is one) is taken as is. Text is NFKC-normalised
       first, so full-width digits (``１２``) read as ASCII ones.
    2. A unit after the number is dropped: storeys ``F``, ``floor(s)``,
       ``level(s)``, ``storey(s)``, ``层``, ``楼``; heights ``m``, ``metre(s)``,
       ``米``. Heights in feet (``ft``, ``feet``, ``'``) are converted
       (x 0.3048). Noted.
    3. Chinese numerals up to 999 (``五`` = 5, ``十二`` = 12, ``二十三`` = 23)
       are read as integers. Noted.
    4. Several values (``5;6``, ``5,6``, ``5/6``) or a range (``3-4``,
       ``3~4``, ``3至4``): the largest (the roof sits on the highest part).
       Noted.
    5. Anything else: null. Noted as unparseable.

Range checks (:func:`check_attribute_ranges`, kernel)
    ``height_attr_m`` <= 0 or > ``ingest.max_height_attr_m``, and
    ``levels_attr`` < 0 or > ``ingest.max_levels_attr``: null, noted.

Text (:func:`clean_text`)
    ``text_repair: none`` keeps text as read but notes values that hold the
    Unicode replacement character (bytes the reader could not decode: set to
    null) or that look like CJK text mis-read as Latin-1 (kept, noted with the
    fix). ``gbk_read_as_latin1`` repairs GBK bytes read as Latin-1;
    ``utf8_or_gbk_read_as_latin1`` repairs files that mix UTF-8 and GBK
    records when read as Latin-1 (``encoding: latin1``): each value is
    decoded as UTF-8, else GBK, else set to null and noted.
"""

from __future__ import annotations

import re
import unicodedata

import numpy as np
import pandas as pd

#: separator of the notes of one row in ``attribute_issues``
NOTE_SEPARATOR = "; "

_NUMBER = r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)"
_LEVEL_UNITS = r"(?:f|fl|floors?|levels?|storeys?|stories|层|楼|層)"
_HEIGHT_M_UNITS = r"(?:m|metres?|meters?|米)"
_HEIGHT_FT_UNITS = r"(?:ft|feet|foot|')"
_CN_DIGITS = {"零": 0, "〇": 0, "一": 1, "二": 2, "两": 2, "兩": 2, "三": 3, "四": 4, "五": 5,
              "六": 6, "七": 7, "八": 8, "九": 9}
_CN_UNITS = {"十": 10, "百": 100}
FEET_TO_M = 0.3048
_CJK = re.compile(r"[\u3400-\u9fff\uf900-\ufaff]")


def _is_missing(v: object) -> bool:
    return v is None or v is pd.NA or (isinstance(v, float | np.floating) and np.isnan(v))


def chinese_numeral(text: str) -> int | None:
    """Integer value of a Chinese numeral below 1000 (None if it is not one).

    Parameters
    ----------
    text : str
        E.g. ``五``, ``十二``, ``二十三``, ``一百零五``.

    Returns
    -------
    int or None
        The value, or None.
    """
    if not text or any(c not in _CN_DIGITS and c not in _CN_UNITS for c in text):
        return None
    total, digit = 0, None
    for c in text:
        if c in _CN_DIGITS:
            if digit is not None and _CN_DIGITS[c] != 0:
                return None  # two digits in a row ("二三")
            digit = _CN_DIGITS[c] if _CN_DIGITS[c] != 0 else None
        else:
            total += (1 if digit is None else digit) * _CN_UNITS[c]
            digit = None
    return total + (digit or 0)


def _parse_one(text: str, kind: str) -> tuple[float | None, str | None]:
    """One value without separators: (number or None, note or None)."""
    t = text.strip().lower()
    m = re.fullmatch(_NUMBER, t)
    if m:
        return float(t), None
    if kind == "levels":
        m = re.fullmatch(rf"({_NUMBER})\s*{_LEVEL_UNITS}\.?", t) or re.fullmatch(
            rf"{_LEVEL_UNITS}\s*({_NUMBER})", t)
        if m:
            return float(m.group(1)), "unit dropped"
        cn = chinese_numeral(re.sub(rf"{_LEVEL_UNITS}$", "", t))
        if cn is not None:
            return float(cn), "Chinese numeral"
    else:
        m = re.fullmatch(rf"({_NUMBER})\s*{_HEIGHT_M_UNITS}\.?", t)
        if m:
            return float(m.group(1)), "unit dropped"
        m = re.fullmatch(rf"({_NUMBER})\s*{_HEIGHT_FT_UNITS}\.?", t)
        if m:
            return float(m.group(1)) * FEET_TO_M, "feet converted to metres"
        cn = chinese_numeral(re.sub(rf"{_HEIGHT_M_UNITS}$", "", t))
        if cn is not None:
            return float(cn), "Chinese numeral"
    return None, None


def parse_number(value: object, kind: str) -> tuple[float, str | None]:
    """Parse one storey count or height by the module's rule.

    Parameters
    ----------
    value : object
        The source's value (number, text or missing).
    kind : {'levels', 'height'}
        Which units are understood.

    Returns
    -------
    value : float
        The number (NaN when missing or unparseable) [- or m].
    note : str or None
        How it was read, when not a plain number; None otherwise.
    """
    if _is_missing(value):
        return np.nan, None
    if isinstance(value, bool | np.bool_):
        return np.nan, f"{value!r} is not a number: set to null"
    if isinstance(value, int | float | np.integer | np.floating):
        return float(value), None
    raw = str(value)
    text = unicodedata.normalize("NFKC", raw).strip()
    if not text:
        return np.nan, None
    number, how = _parse_one(text, kind)
    if how is None and text != raw.strip():
        how = "full-width characters read as ASCII"
    if number is not None:
        return number, (None if how is None else f"{raw!r} read as {number:g} ({how})")
    pieces = [p for p in re.split(r"\s*[;,/]\s*", text) if p]
    multi = "several values"
    if len(pieces) == 1:
        rng = re.fullmatch(r"(.+?)\s*(?:-|~|–|—|至|到)\s*(.+)", text)
        if rng and not text.startswith("-"):
            pieces, multi = [rng.group(1), rng.group(2)], "a range"
    if len(pieces) > 1:
        parsed = [_parse_one(p, kind)[0] for p in pieces]
        if all(p is not None for p in parsed):
            best = max(parsed)
            return best, f"{raw!r} read as {best:g} ({multi}: took the largest)"
    return np.nan, f"{raw!r} is not a number: set to null"


def parse_numbers(values: pd.Series, kind: str, column: str) -> tuple[np.ndarray, np.ndarray]:
    """Parse a column of storey counts or heights.

    Parameters
    ----------
    values : Series
        The source's values.
    kind : {'levels', 'height'}
        Which units are understood.
    column : str
        Canonical column name, used in the notes.

    Returns
    -------
    numbers : ndarray
        float64 values (NaN: missing or unparseable) [- or m].
    notes : ndarray
        object array of ``"<column>: <note>"`` or None.
    """
    n = len(values)
    numbers = np.full(n, np.nan)
    notes = np.full(n, None, dtype=object)
    arr = values.to_numpy(dtype=object)
    numeric = pd.to_numeric(values, errors="coerce").to_numpy(dtype=float, na_value=np.nan)
    is_text = np.array([isinstance(v, str) for v in arr], dtype=bool)
    plain = ~is_text
    numbers[plain] = numeric[plain]
    odd = plain & np.isnan(numeric) & ~pd.isna(values).to_numpy()
    for i in np.flatnonzero(is_text | odd):
        value, note = parse_number(arr[i], kind)
        numbers[i] = value
        if note:
            notes[i] = f"{column}: {note}"
    return numbers, notes


def _mis_read(s: str) -> str | None:
    """The text that a Latin-1 mis-read of UTF-8 or GBK bytes hides, if CJK."""
    try:
        b = s.encode("latin-1")
    except UnicodeEncodeError:
        return None
    if b.isascii():
        return None
    for enc in ("utf-8", "gbk"):
        try:
            fixed = b.decode(enc)
        except UnicodeDecodeError:
            continue
        if _CJK.search(fixed):
            return fixed
    return None


def clean_text(values: pd.Series, repair: str, column: str) -> tuple[pd.Series, np.ndarray]:
    """Strings (or NA), with the configured mis-encoding repaired and doubts noted.

    Parameters
    ----------
    values : Series
        The source's values.
    repair : {'none', 'gbk_read_as_latin1', 'utf8_or_gbk_read_as_latin1'}
        ``sources[].text_repair`` (see the module docstring).
    column : str
        Canonical column name, used in the notes.

    Returns
    -------
    text : Series
        object dtype, stripped strings or NA.
    notes : ndarray
        object array of ``"<column>: <note>"`` or None.
    """
    arr = values.to_numpy(dtype=object)
    out = np.full(len(arr), pd.NA, dtype=object)
    notes = np.full(len(arr), None, dtype=object)
    for i, v in enumerate(arr):
        if _is_missing(v):
            continue
        s = str(v).strip()
        if not s:
            continue
        if repair == "gbk_read_as_latin1":
            try:
                s = s.encode("latin-1").decode("gbk")
            except (UnicodeEncodeError, UnicodeDecodeError):
                pass  # already proper text
        elif repair == "utf8_or_gbk_read_as_latin1":
            try:
                b = s.encode("latin-1")
            except UnicodeEncodeError:
                b = None  # already proper text
            if b is not None:
                for enc in ("utf-8", "gbk"):
                    try:
                        s = b.decode(enc)
                        break
                    except UnicodeDecodeError:
                        continue
                else:
                    notes[i] = f"{column}: bytes are neither UTF-8 nor GBK: set to null"
                    continue
        if "\ufffd" in s:
            notes[i] = (f"{column}: undecodable text (replacement characters) set to null; "
                        "set sources[].encoding to the file's encoding")
            continue
        if repair == "none" and (hidden := _mis_read(s)) is not None:
            notes[i] = (f"{column}: {s!r} looks like {hidden!r} read with the wrong encoding; "
                        "set sources[].text_repair")
        out[i] = s
    return pd.Series(out, index=values.index, dtype="object"), notes


def join_notes(*notes: np.ndarray) -> np.ndarray:
    """Join per-row notes (None = no note) into one text per row.

    Parameters
    ----------
    *notes : ndarray
        object arrays of equal length.

    Returns
    -------
    ndarray
        object array: the notes joined by ``"; "``, or None.
    """
    if not notes:
        return np.empty(0, dtype=object)
    n = len(notes[0])
    out = np.full(n, None, dtype=object)
    stacked = [a for a in notes if any(x is not None for x in a)]
    if not stacked:
        return out
    for i in range(n):
        parts = [a[i] for a in stacked if a[i] is not None]
        if parts:
            out[i] = NOTE_SEPARATOR.join(parts)
    return out


def check_attribute_ranges(part: pd.DataFrame, max_height_attr_m: float,
                           max_levels_attr: float) -> pd.DataFrame:
    """Kernel: null absurd heights and storey counts, noting why.

    Parameters
    ----------
    part : DataFrame
        With ``height_attr_m`` [m], ``levels_attr`` [-] and
        ``attribute_issues`` (text or null).
    max_height_attr_m : float
        Largest plausible building height [m].
    max_levels_attr : float
        Largest plausible number of storeys [-].

    Returns
    -------
    DataFrame
        ``part`` with out-of-range values set to NaN and noted.
    """
    out = part.copy()
    h = out["height_attr_m"].to_numpy(dtype=float, na_value=np.nan)
    lv = out["levels_attr"].to_numpy(dtype=float, na_value=np.nan)
    bad_h = (h <= 0) | (h > max_height_attr_m)
    bad_l = (lv < 0) | (lv > max_levels_attr)
    h_note = np.full(len(out), None, dtype=object)
    l_note = np.full(len(out), None, dtype=object)
    h_note[bad_h] = [f"height_attr_m: {v:g} m is not in (0, ingest.max_height_attr_m = "
                     f"{max_height_attr_m:g}]: set to null" for v in h[bad_h]]
    l_note[bad_l] = [f"levels_attr: {v:g} is not in [0, ingest.max_levels_attr = "
                     f"{max_levels_attr:g}]: set to null" for v in lv[bad_l]]
    out["height_attr_m"] = np.where(bad_h, np.nan, h)
    out["levels_attr"] = np.where(bad_l, np.nan, lv)
    prev = out["attribute_issues"].to_numpy(dtype=object)
    prev = np.array([None if _is_missing(v) else v for v in prev], dtype=object)
    out["attribute_issues"] = pd.Series(join_notes(prev, h_note, l_note), index=out.index,
                                        dtype="object")
    return out
