"""Typical-year weather: read an EPW or PVGIS TMY file, fill gaps, check it.

Inputs and outputs
------------------

=====================  ==========  ===================================================
column                 unit        meaning
=====================  ==========  ===================================================
*input file*           --          EPW (e.g. IWEC/TMY3 ``.epw``) or PVGIS TMY
                                   (``.csv``/``.json``) with one non-leap year of
                                   hourly records (8,760)
``ghi``                W/m2        global horizontal irradiance, hourly mean
``dni``                W/m2        direct normal irradiance, hourly mean
``dhi``                W/m2        diffuse horizontal irradiance, hourly mean
``temp_air``           degC        dry-bulb air temperature
``wind_speed``         m/s         wind speed at 10 m
``albedo``             [-]         ground (here: roof surface) reflectance
=====================  ==========  ===================================================

The output is a :class:`Weather`: the frame above on a tz-aware hourly index
in the site's local standard time (fixed UTC offset, no daylight saving),
forced to one year (``coerce_year``) because typical-year files stitch
months of different years, plus the site metadata and the list of warnings.

Index convention
    pvlib labels an EPW record with the *start* of the hour it integrates
    (EPW hour 1 = 00:00-01:00 -> index 00:00). Hourly irradiance is thus
    represented best by the sun position in the middle of the hour, so
    :attr:`Weather.solar_position_offset_min` is 30 for EPW. PVGIS TMY files
    are labelled in UTC with the time of the satellite irradiance estimate;
    the CSV header states that as ``Irradiance Time Offset (h)`` (used when
    present, else 0). ``WeatherConfig.solar_position_offset_min`` overrides.
    The GHI closure check below is sensitive to this offset: on the Shanghai
    IWEC file it passes at +30 min with a median error of 0.2 W/m2 and fails
    for a shift of one hour.

Missing values
    EPW marks missing values with sentinels (EnergyPlus Auxiliary Programs,
    "Weather Data Format", field descriptions): 9999 for the irradiances,
    99.9 for the dry-bulb temperature, 999 for wind speed and albedo.
    Decision taken here:

    * ``albedo``: any value outside (0, 1) is missing -- this includes 999
      and the 0.000 that IWEC files (such as Shanghai's) carry in every hour.
      Missing hours get ``albedo_default`` (warning with the hour count).
    * ``temp_air``, ``wind_speed``: missing hours get the configured default
      (warning with the hour count).
    * ``ghi``, ``dni``, ``dhi``: negative values and values above the
      extraterrestrial irradiance of the day (pvlib ``get_extra_radiation``,
      about 1,320-1,410 W/m2) are missing too. Up to
      ``max_missing_irradiance_hours`` hours
      (counted over the three columns) are filled by linear interpolation in
      time (warning); more is an error, since the annual yield would be
      biased by the gap.

Checks (each failure raises :class:`WeatherError` naming the file, the
check, the failing hours and the fix)
    1. 8,760 (``expected_hours``) continuous hourly records.
    2. The file's UTC offset equals ``expected_utc_offset_h`` (skip: null).
    3. GHI closure: over daylight hours (zenith < 85 deg at the representative
       time) an hour fails when ``|GHI - (DNI cos(zenith) + DHI)|`` exceeds both
       ``max_ghi_closure_error_w_per_m2`` and ``max_ghi_closure_rel_error * GHI``.
    4. Night irradiance: over hours with the sun below the horizon for the
       whole hour, an hour fails when GHI, DNI or DHI exceeds
       ``max_night_ghi_w_per_m2``.

    Checks 3 and 4 tolerate ``max_failing_hours_share`` of the tested hours.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
from pydantic import BaseModel, ConfigDict, Field, field_validator

from pipeline.errors import PipelineError

log = logging.getLogger(__name__)

#: Columns of :attr:`Weather.data`, in order.
WEATHER_COLUMNS: tuple[str, ...] = ("ghi", "dni", "dhi", "temp_air", "wind_speed", "albedo")

#: EPW missing-value sentinels (EnergyPlus Auxiliary Programs, Weather Data
#: Format): a value at or above the sentinel is missing.
EPW_SENTINELS: dict[str, float] = {
    "ghi": 9999.0,
    "dni": 9999.0,
    "dhi": 9999.0,
    "temp_air": 99.9,
    "wind_speed": 999.0,
    "albedo": 999.0,
}

#: Hours with a zenith below this angle count as daylight for the closure check [deg].
DAYLIGHT_MAX_ZENITH_DEG = 85.0

IRRADIANCE_COLUMNS = ("ghi", "dni", "dhi")


class WeatherError(PipelineError, ValueError):
    """A weather file that cannot be read or fails a check (one-line CLI error)."""


class WeatherConfig(BaseModel):
    """Weather file and its checks (config section ``weather:``).

    Attributes
    ----------
    path : Path
        EPW or PVGIS TMY file; relative paths are resolved against the
        ``base_dir`` given to :func:`read_weather` (the project root).
    format : {'auto', 'epw', 'pvgis_tmy_csv', 'pvgis_tmy_json'}
        File format; ``auto`` decides by suffix (``.epw``, ``.csv``, ``.json``).
    coerce_year : int
        Non-leap year all timestamps are forced to.
    solar_position_offset_min : float or None
        Minutes added to the index to get the time the hourly irradiance
        represents [min]; None: 30 for EPW, the file's offset (or 0) for PVGIS.
    albedo_default : float
        Albedo for hours where the file has none [-].
    wind_speed_default_m_per_s : float
        Wind speed for hours where the file has none [m/s].
    temp_air_default_c : float
        Air temperature for hours where the file has none [degC].
    expected_hours : int
        Number of hourly records required [h].
    expected_utc_offset_h : float or None
        UTC offset the file must be in [h]; None skips the check (PVGIS files
        are then converted to UTC+0).
    max_missing_irradiance_hours : int
        Missing irradiance hours that are interpolated rather than refused [h].
    max_ghi_closure_error_w_per_m2 : float
        Absolute GHI closure tolerance [W/m2].
    max_ghi_closure_rel_error : float
        Relative GHI closure tolerance, share of GHI [-].
    max_night_ghi_w_per_m2 : float
        Largest irradiance accepted while the sun is down [W/m2].
    max_failing_hours_share : float
        Share of tested hours allowed to fail the closure or night check [-].
    """

    model_config = ConfigDict(extra="forbid")

    path: Path
    format: Literal["auto", "epw", "pvgis_tmy_csv", "pvgis_tmy_json"] = "auto"
    coerce_year: int = 1990
    solar_position_offset_min: float | None = Field(default=None, ge=-60, le=60)
    albedo_default: float = Field(default=0.2, gt=0, lt=1)
    wind_speed_default_m_per_s: float = Field(default=1.0, ge=0)
    temp_air_default_c: float = Field(default=16.3, ge=-60, le=60)
    expected_hours: int = Field(default=8760, gt=0)
    expected_utc_offset_h: float | None = Field(default=8.0, ge=-12, le=14)
    max_missing_irradiance_hours: int = Field(default=12, ge=0)
    max_ghi_closure_error_w_per_m2: float = Field(default=25.0, ge=0)
    max_ghi_closure_rel_error: float = Field(default=0.10, ge=0)
    max_night_ghi_w_per_m2: float = Field(default=5.0, ge=0)
    max_failing_hours_share: float = Field(default=0.01, ge=0, le=1)

    @field_validator("coerce_year")
    @classmethod
    def _non_leap(cls, year: int) -> int:
        if pd.Timestamp(year=year, month=1, day=1).is_leap_year:
            raise ValueError(
                f"coerce_year {year} is a leap year; typical-year files have no 29 February, "
                "use a non-leap year such as 1990"
            )
        return year


@dataclass
class Weather:
    """Checked hourly weather of one site.

    Attributes
    ----------
    data : DataFrame
        Columns ``ghi``, ``dni``, ``dhi`` [W/m2], ``temp_air`` [degC],
        ``wind_speed`` [m/s], ``albedo`` [-] on a tz-aware hourly index in
        local standard time, one year.
    latitude, longitude : float
        Site position [deg].
    altitude_m : float
        Site elevation [m].
    utc_offset_h : float
        UTC offset of the index [h].
    source_path : Path
        The file read.
    solar_position_offset_min : float
        Minutes to add to the index to get the time the irradiance represents [min].
    warnings : list of str
        What was filled or doubtful.
    """

    data: pd.DataFrame
    latitude: float
    longitude: float
    altitude_m: float
    utc_offset_h: float
    source_path: Path
    solar_position_offset_min: float = 30.0
    warnings: list[str] = field(default_factory=list)

    def solar_times(self) -> pd.DatetimeIndex:
        """Return the times the hourly irradiance values represent.

        Returns
        -------
        DatetimeIndex
            ``data.index`` shifted by ``solar_position_offset_min``.
        """
        return self.data.index + pd.Timedelta(minutes=self.solar_position_offset_min)


def resolve_path(path: Path | str, base_dir: Path | str) -> Path:
    """Resolve a possibly relative path against a base directory.

    Parameters
    ----------
    path : Path or str
        Path from the config.
    base_dir : Path or str
        Directory relative paths are taken from.

    Returns
    -------
    Path
        The absolute or base-relative path.
    """
    path = Path(path)
    return path if path.is_absolute() else Path(base_dir) / path


def detect_format(path: Path) -> str:
    """Guess the weather file format from the file suffix.

    Parameters
    ----------
    path : Path
        Weather file.

    Returns
    -------
    str
        ``epw``, ``pvgis_tmy_csv`` or ``pvgis_tmy_json``.
    """
    suffix = path.suffix.lower()
    formats = {".epw": "epw", ".csv": "pvgis_tmy_csv", ".json": "pvgis_tmy_json"}
    if suffix not in formats:
        raise WeatherError(
            f"weather file {path}: cannot tell the format from the suffix {suffix!r}; "
            "set weather.format to epw, pvgis_tmy_csv or pvgis_tmy_json"
        )
    return formats[suffix]


def read_weather(cfg: WeatherConfig, base_dir: Path | str) -> Weather:
    """Read, fill and check a typical-year weather file.

    Parameters
    ----------
    cfg : WeatherConfig
        File, defaults and check thresholds.
    base_dir : Path or str
        Directory that a relative ``cfg.path`` is resolved against.

    Returns
    -------
    Weather
        Hourly data in local standard time, one year, no missing values.

    Raises
    ------
    WeatherError
        If the file is missing, unreadable or fails a check.
    """
    path = resolve_path(cfg.path, base_dir)
    if not path.is_file():
        raise WeatherError(
            f"weather file {path} not found; fix: run `make data` (it fetches the Shanghai "
            "IWEC EPW) or set weather.path to an EPW or PVGIS TMY file"
        )
    key = (str(path.resolve()), hashlib.sha256(path.read_bytes()).hexdigest(),
           cfg.model_dump_json())
    if key in _READ:  # the shading and yield stages of one run read the same file
        log.info("weather file %s: unchanged since it was read and checked in this process; "
                 "reused", path.name)
        hit = _READ[key]
        return replace(hit, data=hit.data.copy(), warnings=list(hit.warnings))
    fmt = detect_format(path) if cfg.format == "auto" else cfg.format
    if fmt == "epw":
        raw, meta = _read_epw(path, cfg)
    else:
        raw, meta = _read_pvgis(path, fmt, cfg)
    weather = check_weather(raw, meta, cfg, path)
    _READ.clear()
    _READ[key] = weather
    return replace(weather, data=weather.data.copy(), warnings=list(weather.warnings))


#: The last weather file read and checked in this process: (path, sha256, config) -> it.
_READ: dict[tuple, Weather] = {}


def _read_epw(path: Path, cfg: WeatherConfig) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Read an EPW with pvlib, forcing one year; return raw columns and metadata."""
    from pvlib.iotools import read_epw

    try:
        data, meta = read_epw(str(path), coerce_year=cfg.coerce_year)
    except Exception as exc:  # pvlib/pandas raise many types on malformed files
        raise WeatherError(
            f"weather file {path}: cannot be read as EPW ({type(exc).__name__}: {exc}); "
            "fix: check that it is a complete EPW file (8 header lines, 8,760 data rows) "
            "or set weather.format"
        ) from exc
    frame = pd.DataFrame(index=data.index)
    for col in WEATHER_COLUMNS:
        values = pd.to_numeric(data[col], errors="coerce").astype(float)
        frame[col] = values.where(values < EPW_SENTINELS[col])
    info = {
        "latitude": float(meta["latitude"]),
        "longitude": float(meta["longitude"]),
        "altitude_m": float(meta["altitude"]),
        "utc_offset_h": float(meta["TZ"]),
        "solar_position_offset_min": 30.0,
        "format": "epw",
    }
    return frame, info


def _read_pvgis(path: Path, fmt: str, cfg: WeatherConfig) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Read a PVGIS TMY CSV/JSON with pvlib, move it from UTC to local time."""
    from pvlib.iotools import read_pvgis_tmy

    pvgis_format = {"pvgis_tmy_csv": "csv", "pvgis_tmy_json": "json"}[fmt]
    try:
        data, meta = read_pvgis_tmy(str(path), pvgis_format=pvgis_format, map_variables=True)
    except Exception as exc:
        raise WeatherError(
            f"weather file {path}: cannot be read as PVGIS TMY {pvgis_format} "
            f"({type(exc).__name__}: {exc}); fix: download it again "
            "(pipeline.data.fetch_pvgis_tmy) or set weather.format"
        ) from exc
    inputs = meta.get("inputs", {})
    location = inputs.get("location", inputs)
    offset_h = cfg.expected_utc_offset_h if cfg.expected_utc_offset_h is not None else 0.0
    frame = pd.DataFrame(index=data.index)
    for col in WEATHER_COLUMNS:
        frame[col] = (
            pd.to_numeric(data[col], errors="coerce").astype(float)
            if col in data
            else np.nan
        )
    frame = utc_to_local_year(frame, offset_h, cfg.coerce_year)
    info = {
        "latitude": float(location["latitude"]),
        "longitude": float(location["longitude"]),
        "altitude_m": float(location.get("elevation", 0.0)),
        "utc_offset_h": offset_h,
        "solar_position_offset_min": 60.0 * float(inputs.get("irradiance time offset", 0.0)),
        "format": fmt,
    }
    return frame, info


def utc_to_local_year(frame: pd.DataFrame, utc_offset_h: float, year: int) -> pd.DataFrame:
    """Move a UTC typical-year frame to local standard time within one year.

    The year is forced in UTC first (so no 29 February can appear), the index
    is converted to the fixed offset, and the hours that spill into the next
    year (the last hours of 31 December UTC east of Greenwich, the first of
    1 January west of it) wrap round to the same year, as pvlib's
    ``coerce_year``/``roll_utc_offset`` do for PVGIS downloads.

    Parameters
    ----------
    frame : DataFrame
        Hourly rows on a tz-aware (UTC) index.
    utc_offset_h : float
        Target UTC offset [h].
    year : int
        Year to force [-].

    Returns
    -------
    DataFrame
        Same rows, sorted, on a local-time index within ``year``.
    """
    idx = frame.index.tz_convert("UTC")
    forced = pd.DatetimeIndex(
        [ts.replace(year=year) for ts in idx], name=None
    ).tz_convert(_fixed_tz(utc_offset_h))
    one_year = pd.DateOffset(years=1)
    local = pd.DatetimeIndex(
        [ts - one_year if ts.year > year else ts + one_year if ts.year < year else ts
         for ts in forced]
    )
    out = frame.copy()
    out.index = local
    return out.sort_index()


def _fixed_tz(utc_offset_h: float) -> Any:
    """Return a fixed-offset tzinfo for a UTC offset in hours."""
    import datetime as dt

    return dt.timezone(dt.timedelta(hours=utc_offset_h))


def _fail(path: Path, check: str, detail: str, fix: str) -> WeatherError:
    return WeatherError(f"weather file {path}: check '{check}' failed: {detail}; fix: {fix}")


def check_weather(
    raw: pd.DataFrame, meta: dict[str, Any], cfg: WeatherConfig, path: Path
) -> Weather:
    """Fill sentinel-missing values and run the checks on parsed weather.

    Parameters
    ----------
    raw : DataFrame
        Columns of :data:`WEATHER_COLUMNS` (NaN = missing) on a tz-aware
        hourly index.
    meta : dict
        ``latitude``, ``longitude`` [deg], ``altitude_m`` [m],
        ``utc_offset_h`` [h], ``solar_position_offset_min`` [min].
    cfg : WeatherConfig
        Defaults and thresholds.
    path : Path
        File the data came from (for messages).

    Returns
    -------
    Weather
        Filled and checked weather.

    Raises
    ------
    WeatherError
        On the first failing check.
    """
    warnings_: list[str] = []

    def warn(msg: str) -> None:
        warnings_.append(msg)
        log.warning("weather file %s: %s", path.name, msg)

    n = len(raw)
    if n != cfg.expected_hours:
        raise _fail(
            path, "length", f"{n} hourly records, expected {cfg.expected_hours}",
            "use a complete typical-year file (EPW/PVGIS TMY: 8,760 hours, no 29 February) "
            "or set weather.expected_hours",
        )
    idx = raw.index
    if not isinstance(idx, pd.DatetimeIndex) or idx.tz is None:
        raise _fail(path, "hourly series", "the index is not tz-aware timestamps",
                    "read the file with pvlib.iotools (read_epw / read_pvgis_tmy)")
    bad_steps = int(np.count_nonzero((idx[1:] - idx[:-1]) != pd.Timedelta(hours=1)))
    if bad_steps:
        raise _fail(
            path, "hourly series", f"{bad_steps} of {max(n - 1, 0)} steps between records are "
            "not one hour (duplicated, missing or unsorted timestamps)",
            "use a file with one record per hour of one year",
        )
    offset_h = float(meta["utc_offset_h"])
    if cfg.expected_utc_offset_h is not None and not np.isclose(
        offset_h, cfg.expected_utc_offset_h
    ):
        raise _fail(
            path, "time zone", f"the file is in UTC{offset_h:+g}, expected "
            f"UTC{cfg.expected_utc_offset_h:+g} (all {n} hours affected)",
            "use a file in the site's local standard time, or set "
            "weather.expected_utc_offset_h to the file's offset (null skips this check)",
        )

    data = raw.loc[:, list(WEATHER_COLUMNS)].astype(float).copy()
    # irradiance: negative values, and hourly values above the extraterrestrial
    # irradiance (no hour at the ground exceeds the top of the atmosphere), are invalid too
    from pvlib.irradiance import get_extra_radiation

    irr = data[list(IRRADIANCE_COLUMNS)]
    dni_extra = np.asarray(get_extra_radiation(idx.day_of_year.to_numpy()), dtype=float)
    irr = irr.where((irr >= 0) & irr.le(dni_extra, axis=0))
    n_missing_irr = int(irr.isna().any(axis=1).sum())
    if n_missing_irr > cfg.max_missing_irradiance_hours:
        raise _fail(
            path, "missing irradiance", f"{n_missing_irr} of {n} hours have no valid GHI, "
            f"DNI or DHI (more than max_missing_irradiance_hours="
            f"{cfg.max_missing_irradiance_hours})",
            "use a gap-free typical-year file (EPW/PVGIS TMY)",
        )
    if n_missing_irr:
        irr = irr.interpolate(method="time", limit_area="inside").fillna(0.0)
        warn(f"{n_missing_irr} hours with missing irradiance filled by linear interpolation")
    data[list(IRRADIANCE_COLUMNS)] = irr

    albedo = data["albedo"]
    bad_albedo = ~((albedo > 0) & (albedo < 1))
    if bad_albedo.any():
        warn(
            f"albedo missing or outside (0, 1) in {int(bad_albedo.sum())} of {n} hours "
            f"(EPW sentinel 999; IWEC files carry 0); used albedo_default={cfg.albedo_default}"
        )
        data["albedo"] = albedo.where(~bad_albedo, cfg.albedo_default)
    for col, default, unit in (
        ("temp_air", cfg.temp_air_default_c, "degC"),
        ("wind_speed", cfg.wind_speed_default_m_per_s, "m/s"),
    ):
        values = data[col]
        bad = values.isna()
        if col == "wind_speed":
            bad |= values < 0
        if bad.any():
            warn(f"{col} missing in {int(bad.sum())} of {n} hours; used {default} {unit}")
            data[col] = values.where(~bad, default)

    lat, lon = float(meta["latitude"]), float(meta["longitude"])
    if not (-90 <= lat <= 90 and -180 <= lon <= 180):
        raise _fail(path, "location", f"latitude {lat}, longitude {lon} out of range",
                    "fix the file header")
    offset_min = (
        cfg.solar_position_offset_min
        if cfg.solar_position_offset_min is not None
        else float(meta.get("solar_position_offset_min", 0.0))
    )
    weather = Weather(
        data=data,
        latitude=lat,
        longitude=lon,
        altitude_m=float(meta.get("altitude_m", 0.0)),
        utc_offset_h=offset_h,
        source_path=path,
        solar_position_offset_min=offset_min,
        warnings=warnings_,
    )
    _check_sun(weather, cfg, path)
    return weather


def _check_sun(weather: Weather, cfg: WeatherConfig, path: Path) -> None:
    """GHI closure and night-time irradiance checks against the sun position."""
    from pvlib.solarposition import get_solarposition

    data = weather.data
    index = data.index
    zenith = get_solarposition(
        weather.solar_times(), weather.latitude, weather.longitude, weather.altitude_m
    )["zenith"].to_numpy()
    ghi, dni, dhi = (data[c].to_numpy() for c in IRRADIANCE_COLUMNS)

    day = zenith < DAYLIGHT_MAX_ZENITH_DEG
    closure = dni * np.cos(np.radians(zenith)) + dhi
    err = np.abs(ghi - closure)
    closure_fail = (
        day
        & (err > cfg.max_ghi_closure_error_w_per_m2)
        & (err > cfg.max_ghi_closure_rel_error * ghi)
    )
    n_day, n_fail = int(day.sum()), int(closure_fail.sum())
    if n_day and n_fail > cfg.max_failing_hours_share * n_day:
        worst = int(np.argmax(np.where(closure_fail, err, -1)))
        raise _fail(
            path, "GHI closure", f"{n_fail} of {n_day} daylight hours have |GHI - (DNI cos(zenith)"
            f" + DHI)| > {cfg.max_ghi_closure_error_w_per_m2:g} W/m2 and > "
            f"{cfg.max_ghi_closure_rel_error:.0%} of GHI (worst {index[worst]}: GHI "
            f"{ghi[worst]:.0f}, DNI {dni[worst]:.0f}, DHI {dhi[worst]:.0f}, zenith "
            f"{zenith[worst]:.1f} deg)",
            "check the time zone and time stamps (an hour's shift breaks closure), the "
            "site coordinates, and weather.solar_position_offset_min; or use a consistent "
            "file",
        )

    start = index
    elev = [
        get_solarposition(t, weather.latitude, weather.longitude, weather.altitude_m)[
            "apparent_elevation"
        ].to_numpy()
        for t in (start, start + pd.Timedelta(hours=1))
    ]
    night = (elev[0] <= 0) & (elev[1] <= 0) & (zenith > 90)
    night_irr = np.maximum(np.maximum(ghi, dni), dhi)
    night_fail = night & (night_irr > cfg.max_night_ghi_w_per_m2)
    n_night, n_nfail = int(night.sum()), int(night_fail.sum())
    if n_night and n_nfail > cfg.max_failing_hours_share * n_night:
        first = int(np.argmax(night_fail))
        raise _fail(
            path, "night irradiance", f"{n_nfail} of {n_night} night hours (sun below the "
            f"horizon all hour) have irradiance > {cfg.max_night_ghi_w_per_m2:g} W/m2 "
            f"(first {index[first]}: GHI {ghi[first]:.0f} W/m2)",
            "check the time zone and time stamps of the file, and the site coordinates",
        )
    log.info(
        "weather file %s: %d hours, annual GHI %.0f kWh/m2, closure failures %d/%d, "
        "night irradiance hours %d/%d",
        path.name, len(data), ghi.sum() / 1000.0, n_fail, n_day, n_nfail, n_night,
    )
