"""Specific yield per orientation class, joined onto the buildings.

Inputs and outputs
------------------

==================================  =========  ==========================================
column                              unit       meaning
==================================  =========  ==========================================
in: ``tilt_deg``                    deg        module tilt from horizontal
in: ``azimuth_deg``                 deg        module azimuth, clockwise from north
in: ``capacity_kwp``                kWp        DC capacity on the whole usable roof
in: ``capacity_policy_kwp``         kWp        DC capacity at the policy coverage share
in: weather                         --         :class:`pipeline.weather.Weather`, 8,760 h
out: ``specific_yield_kwh_per_kwp`` kWh/kWp    annual AC energy per kWp DC (NaN without
                                               orientation)
out: ``energy_mwh_per_year``        MWh/yr     ``capacity_kwp * specific yield / 1000``
out: ``energy_policy_mwh_per_year`` MWh/yr     same for ``capacity_policy_kwp``
class table: ``tilt_deg``,          deg        the orientation class
``azimuth_deg``
class table: ``specific_yield_...`` kWh/kWp    as above
class table: ``poa_kwh_per_m2_...`` kWh/m2/yr  plane-of-array irradiation
class table: ``performance_ratio``  [-]        specific yield / (POA irradiation / 1 kW/m2)
class table: ``yield_mMM_...``      kWh/kWp    AC energy per kWp in month MM (01..12)
==================================  =========  ==========================================

Model chain (PVWatts v5, Dobos 2014, NREL/TP-6A20-62641, with pvlib)
    Orientations are rounded to ``orientation_step_deg`` classes (tilt 0 makes
    the azimuth irrelevant and is stored as 180). For all classes at once, on
    the hourly series: sun position at the time the hourly irradiance
    represents (mid-hour for EPW; computed once), extraterrestrial DNI,
    Kasten-Young relative air mass, Perez (1990) transposition with hourly
    albedo, physical (Fresnel/Snell glass cover, the PVWatts v5 choice)
    incidence-angle modifier on the beam component only, SAPM cell temperature
    (King et al. 2004, SAND2004-3535), PVWatts DC power with ``gamma_pdc``,
    PVWatts system losses, PVWatts inverter with its AC rating at
    ``1 kWp / dc_ac_ratio`` (clipping). Yield = sum of hourly AC power.

Mounting
    One thermal model for all classes: SAPM ``close_mount_glass_glass``
    (restricted rear ventilation), standing for both low ballasted racks on
    flat roofs and flush arrays on pitched roofs. On the Shanghai IWEC file
    (20 deg, south) ``open_rack_glass_polymer`` gives +4.4 % and
    ``insulated_back_glass_polymer`` -1.6 %. The class key is (tilt,
    azimuth) only, so distinct mounts per roof kind would need ``roof_kind``
    in the key.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
from pydantic import BaseModel, ConfigDict, Field, field_validator

from pipeline.weather import Weather, WeatherConfig, read_weather, resolve_path

log = logging.getLogger(__name__)

MONTH_COLUMNS: tuple[str, ...] = tuple(f"yield_m{m:02d}_kwh_per_kwp" for m in range(1, 13))
CLASS_COLUMNS: tuple[str, ...] = (
    "tilt_deg",
    "azimuth_deg",
    "specific_yield_kwh_per_kwp",
    "poa_kwh_per_m2_per_year",
    "performance_ratio",
    *MONTH_COLUMNS,
)
ENERGY_MONTH_COLUMNS: tuple[str, ...] = tuple(f"energy_m{m:02d}_mwh" for m in range(1, 13))

#: Orientation classes evaluated together (memory: 8,760 x batch floats per array).
BATCH_CLASSES = 128
#: Azimuth stored for horizontal (tilt 0) classes [deg].
FLAT_AZIMUTH_DEG = 180.0
#: DC rating the yield is computed for [W] (1 kWp).
PDC0_W = 1000.0


class PvwattsLosses(BaseModel):
    """PVWatts v5 system loss components, in percent (Dobos 2014, table 2 defaults).

    The defaults give a total of 14.08 % (combined multiplicatively,
    ``pvlib.pvsystem.pvwatts_losses``).
    """

    model_config = ConfigDict(extra="forbid")

    soiling_pct: float = Field(default=2.0, ge=0, le=100)
    shading_pct: float = Field(default=3.0, ge=0, le=100)
    snow_pct: float = Field(default=0.0, ge=0, le=100)
    mismatch_pct: float = Field(default=2.0, ge=0, le=100)
    wiring_pct: float = Field(default=2.0, ge=0, le=100)
    connections_pct: float = Field(default=0.5, ge=0, le=100)
    lid_pct: float = Field(default=1.5, ge=0, le=100)
    nameplate_rating_pct: float = Field(default=1.0, ge=0, le=100)
    age_pct: float = Field(default=0.0, ge=0, le=100)
    availability_pct: float = Field(default=3.0, ge=0, le=100)

    def total_pct(self) -> float:
        """Total system loss [%].

        Returns
        -------
        float
            ``pvlib.pvsystem.pvwatts_losses`` of the components.
        """
        from pvlib.pvsystem import pvwatts_losses

        return float(pvwatts_losses(**{k.removesuffix("_pct"): v for k, v in self}))


class YieldConfig(BaseModel):
    """Yield model settings (config section ``yield:``).

    Attributes
    ----------
    transposition_model : {'perez', 'haydavies', 'isotropic'}
        Sky-diffuse transposition (``pvlib.irradiance.get_total_irradiance``).
    albedo : float or None
        Fixed albedo [-]; None uses the hourly albedo of the weather file
        (missing hours filled with ``weather.albedo_default``).
    iam_model : {'physical', 'ashrae', 'none'}
        Incidence-angle modifier on the beam component.
    temperature_model : {'sapm', 'faiman'}
        Cell temperature model.
    sapm_mount : str
        Key of ``pvlib.temperature.TEMPERATURE_MODEL_PARAMETERS['sapm']``.
    faiman_u0_w_per_m2_k : float
        Faiman constant heat loss factor [W/(m2 K)].
    faiman_u1_w_s_per_m3_k : float
        Faiman wind heat loss factor [W s/(m3 K)].
    gamma_pdc_per_c : float
        Power temperature coefficient [1/degC].
    losses : PvwattsLosses
        System loss components [%].
    eta_inv_nom : float
        Nominal inverter efficiency [-].
    dc_ac_ratio : float
        DC rating / inverter AC rating [-].
    orientation_step_deg : float
        Rounding step of tilt and azimuth into classes [deg]; must divide 180.
    """

    model_config = ConfigDict(extra="forbid")

    transposition_model: Literal["perez", "haydavies", "isotropic"] = "perez"
    albedo: float | None = Field(default=None, gt=0, lt=1)
    iam_model: Literal["physical", "ashrae", "none"] = "physical"
    temperature_model: Literal["sapm", "faiman"] = "sapm"
    sapm_mount: Literal[
        "open_rack_glass_glass",
        "close_mount_glass_glass",
        "open_rack_glass_polymer",
        "insulated_back_glass_polymer",
    ] = "close_mount_glass_glass"
    faiman_u0_w_per_m2_k: float = Field(default=25.0, gt=0)
    faiman_u1_w_s_per_m3_k: float = Field(default=6.84, ge=0)
    gamma_pdc_per_c: float = Field(default=-0.0037, ge=-0.01, le=0)
    losses: PvwattsLosses = Field(default_factory=PvwattsLosses)
    eta_inv_nom: float = Field(default=0.96, gt=0, le=1)
    dc_ac_ratio: float = Field(default=1.2, gt=0)
    orientation_step_deg: float = Field(default=1.0, gt=0, le=90)

    @field_validator("orientation_step_deg")
    @classmethod
    def _divides_180(cls, step: float) -> float:
        n = 180.0 / step
        if abs(n - round(n)) > 1e-9:
            raise ValueError(f"orientation_step_deg {step} must divide 180 (e.g. 0.5, 1, 2, 5)")
        return step


# --------------------------------------------------------------------------- classes


def round_orientation(
    tilt_deg: Any, azimuth_deg: Any, step_deg: float
) -> tuple[np.ndarray, np.ndarray]:
    """Round tilt and azimuth to orientation classes.

    Parameters
    ----------
    tilt_deg, azimuth_deg : array_like
        Module tilt and azimuth (clockwise from north) [deg].
    step_deg : float
        Class width [deg].

    Returns
    -------
    tilt, azimuth : ndarray
        Rounded tilt in [0, 90] and azimuth in [0, 360) [deg]; azimuth is
        180 where the rounded tilt is 0; NaN where undefined.
    """
    tilt = np.asarray(tilt_deg, dtype=float)
    az = np.asarray(azimuth_deg, dtype=float)
    t_key, a_key = _keys(tilt, az, step_deg)
    ok = t_key >= 0
    t_out = np.where(ok, t_key * step_deg, np.nan)
    a_out = np.where(ok, a_key * step_deg, np.nan)
    return t_out, a_out


def _keys(tilt: np.ndarray, az: np.ndarray, step_deg: float) -> tuple[np.ndarray, np.ndarray]:
    """Integer class keys of tilt and azimuth (-1 where undefined)."""
    n_az = int(round(360.0 / step_deg))
    with np.errstate(invalid="ignore"):
        t_f = np.clip(np.round(tilt / step_deg), 0, round(90.0 / step_deg))
        a_f = np.mod(np.round(az / step_deg), n_az)
    flat = t_f == 0
    a_f = np.where(flat, round(FLAT_AZIMUTH_DEG / step_deg), a_f)
    ok = np.isfinite(t_f) & np.isfinite(a_f)
    t_key = np.where(ok, np.nan_to_num(t_f), -1).astype(np.int64)
    a_key = np.where(ok, np.nan_to_num(a_f), -1).astype(np.int64)
    return t_key, a_key


def _class_key(tilt: Any, az: Any, step_deg: float) -> np.ndarray:
    """One int64 key per row for the join (-1 where undefined)."""
    t_key, a_key = _keys(np.asarray(tilt, float), np.asarray(az, float), step_deg)
    n_az = int(round(360.0 / step_deg))
    return np.where(t_key >= 0, t_key * n_az + a_key, -1)


def orientation_classes(buildings: pd.DataFrame, step_deg: float = 1.0) -> pd.DataFrame:
    """List the unique rounded orientation classes of the buildings.

    Parameters
    ----------
    buildings : DataFrame
        Rows with ``tilt_deg`` and ``azimuth_deg`` [deg].
    step_deg : float
        Class width [deg].

    Returns
    -------
    DataFrame
        ``tilt_deg``, ``azimuth_deg`` [deg], one row per class, sorted;
        rows with undefined orientation are left out.
    """
    tilt, az = round_orientation(buildings["tilt_deg"], buildings["azimuth_deg"], step_deg)
    classes = pd.DataFrame({"tilt_deg": tilt, "azimuth_deg": az}).dropna()
    classes = classes.drop_duplicates().sort_values(["tilt_deg", "azimuth_deg"])
    return classes.reset_index(drop=True)


# --------------------------------------------------------------------------- model


def solar_geometry(weather: Weather) -> pd.DataFrame:
    """Sun position, extraterrestrial DNI and air mass for the weather hours.

    Computed once per run and shared by all orientation classes.

    Parameters
    ----------
    weather : Weather
        Checked hourly weather.

    Returns
    -------
    DataFrame
        ``apparent_zenith``, ``azimuth`` [deg], ``dni_extra`` [W/m2],
        ``airmass`` [-] on the weather index.
    """
    from pvlib import atmosphere, irradiance, solarposition

    times = weather.solar_times()
    pos = solarposition.get_solarposition(
        times,
        weather.latitude,
        weather.longitude,
        altitude=weather.altitude_m,
        pressure=atmosphere.alt2pres(weather.altitude_m),
        temperature=weather.data["temp_air"].to_numpy(),
    )
    # Pass day-of-year numbers: pvlib's DatetimeIndex path calls the
    # deprecated ``DatetimeIndex.dayofyear`` (Pandas4Warning under pandas 3).
    doy = times.tz_convert("UTC").day_of_year.to_numpy()
    dni_extra = np.asarray(irradiance.get_extra_radiation(doy), dtype=float)
    airmass = np.asarray(
        atmosphere.get_relative_airmass(pos["apparent_zenith"].to_numpy()), dtype=float
    )
    return pd.DataFrame(
        {
            "apparent_zenith": pos["apparent_zenith"].to_numpy(),
            "azimuth": pos["azimuth"].to_numpy(),
            "dni_extra": dni_extra,
            "airmass": airmass,
        },
        index=weather.data.index,
    )


def _batch_power(
    tilt: np.ndarray,
    azimuth: np.ndarray,
    weather: Weather,
    geom: pd.DataFrame,
    cfg: YieldConfig,
) -> tuple[np.ndarray, np.ndarray]:
    """Hourly AC power and POA irradiance for a batch of classes.

    Returns arrays of shape (hours, classes): AC power per kWp DC [W/kWp]
    and plane-of-array irradiance [W/m2].
    """
    from pvlib import iam, inverter, irradiance, pvsystem, temperature

    col = lambda s: np.asarray(s, dtype=float)[:, None]  # noqa: E731
    data = weather.data
    zen, sun_az = col(geom["apparent_zenith"]), col(geom["azimuth"])
    st, sa = tilt[None, :], azimuth[None, :]
    albedo = cfg.albedo if cfg.albedo is not None else col(data["albedo"])
    irr = irradiance.get_total_irradiance(
        st, sa, zen, sun_az,
        dni=col(data["dni"]), ghi=col(data["ghi"]), dhi=col(data["dhi"]),
        dni_extra=col(geom["dni_extra"]), airmass=col(geom["airmass"]),
        albedo=albedo, model=cfg.transposition_model,
    )
    poa_direct = np.nan_to_num(np.asarray(irr["poa_direct"], dtype=float))
    poa_diffuse = np.nan_to_num(np.asarray(irr["poa_diffuse"], dtype=float))
    poa_global = poa_direct + poa_diffuse
    if cfg.iam_model == "none":
        effective = poa_global
    else:
        aoi = irradiance.aoi(st, sa, zen, sun_az)
        modifier = iam.physical(aoi) if cfg.iam_model == "physical" else iam.ashrae(aoi)
        effective = poa_direct * np.nan_to_num(modifier) + poa_diffuse
    temp_air, wind = col(data["temp_air"]), col(data["wind_speed"])
    if cfg.temperature_model == "sapm":
        params = temperature.TEMPERATURE_MODEL_PARAMETERS["sapm"][cfg.sapm_mount]
        temp_cell = temperature.sapm_cell(poa_global, temp_air, wind, **params)
    else:
        temp_cell = temperature.faiman(
            poa_global, temp_air, wind,
            u0=cfg.faiman_u0_w_per_m2_k, u1=cfg.faiman_u1_w_s_per_m3_k,
        )
    pdc = pvsystem.pvwatts_dc(effective, temp_cell, PDC0_W, cfg.gamma_pdc_per_c)
    pdc = pdc * (1.0 - cfg.losses.total_pct() / 100.0)
    pdc_inverter = PDC0_W / cfg.dc_ac_ratio / cfg.eta_inv_nom
    pac = inverter.pvwatts(pdc, pdc_inverter, eta_inv_nom=cfg.eta_inv_nom)
    return np.asarray(pac, dtype=float), poa_global


def class_yield(classes: pd.DataFrame, weather: Weather, cfg: YieldConfig) -> pd.DataFrame:
    """Annual and monthly specific yield of each orientation class.

    Parameters
    ----------
    classes : DataFrame
        ``tilt_deg``, ``azimuth_deg`` [deg] (already rounded, see
        :func:`orientation_classes`).
    weather : Weather
        Checked hourly weather of one year.
    cfg : YieldConfig
        Model settings.

    Returns
    -------
    DataFrame
        One row per class: ``tilt_deg``, ``azimuth_deg`` [deg],
        ``specific_yield_kwh_per_kwp`` [kWh/kWp], ``poa_kwh_per_m2_per_year``
        [kWh/m2], ``performance_ratio`` [-], ``yield_m01_kwh_per_kwp`` ...
        ``yield_m12_kwh_per_kwp`` [kWh/kWp].
    """
    tilt = classes["tilt_deg"].to_numpy(dtype=float)
    az = classes["azimuth_deg"].to_numpy(dtype=float)
    n = len(tilt)
    if n and not (np.isfinite(tilt).all() and np.isfinite(az).all()):
        raise ValueError("class_yield: tilt_deg and azimuth_deg must be finite")
    out = pd.DataFrame({"tilt_deg": tilt, "azimuth_deg": az})
    if n == 0:
        for c in CLASS_COLUMNS[2:]:
            out[c] = pd.Series(dtype=float)
        return out
    t0 = time.perf_counter()
    geom = solar_geometry(weather)
    months = weather.data.index.month.to_numpy()
    annual = np.empty(n)
    poa = np.empty(n)
    monthly = np.empty((n, 12))
    for start in range(0, n, BATCH_CLASSES):
        sl = slice(start, start + BATCH_CLASSES)
        pac, poa_global = _batch_power(tilt[sl], az[sl], weather, geom, cfg)
        annual[sl] = pac.sum(axis=0) / 1000.0  # W/kWp over 1 h -> kWh/kWp
        poa[sl] = poa_global.sum(axis=0) / 1000.0
        for m in range(12):
            monthly[sl, m] = pac[months == m + 1].sum(axis=0) / 1000.0
    out["specific_yield_kwh_per_kwp"] = annual
    out["poa_kwh_per_m2_per_year"] = poa
    with np.errstate(invalid="ignore", divide="ignore"):
        out["performance_ratio"] = np.where(poa > 0, annual / poa, np.nan)
    for m, name in enumerate(MONTH_COLUMNS):
        out[name] = monthly[:, m]
    log.info("yield: %d orientation classes in %.2f s", n, time.perf_counter() - t0)
    return out


# --------------------------------------------------------------------------- join


def _lookup(buildings: pd.DataFrame, table: pd.DataFrame, step_deg: float) -> np.ndarray:
    """Row position in ``table`` of each building's class (-1: no orientation)."""
    key_b = _class_key(buildings["tilt_deg"], buildings["azimuth_deg"], step_deg)
    key_t = _class_key(table["tilt_deg"], table["azimuth_deg"], step_deg)
    index = pd.Index(key_t)
    if not index.is_unique:
        raise ValueError(
            f"yield table has duplicate orientation classes at step {step_deg} deg"
        )
    pos = index.get_indexer(key_b) if len(key_b) else np.empty(0, dtype=np.intp)
    missing = (key_b >= 0) & (pos < 0)
    if missing.any():
        sample = buildings.loc[missing, ["tilt_deg", "azimuth_deg"]].head(3).to_dict("records")
        raise ValueError(
            f"{int(missing.sum())} buildings have an orientation class missing from the yield "
            f"table (e.g. {sample}); build the table from the same buildings and step_deg"
        )
    return np.where(key_b >= 0, pos, -1)


def join_yield(buildings: pd.DataFrame, table: pd.DataFrame, step_deg: float) -> pd.DataFrame:
    """Add specific yield and annual energy by orientation class (a pure kernel).

    Parameters
    ----------
    buildings : GeoDataFrame
        Rows with ``tilt_deg``, ``azimuth_deg`` [deg], ``capacity_kwp`` and
        ``capacity_policy_kwp`` [kWp]; may be empty.
    table : DataFrame
        Output of :func:`class_yield`.
    step_deg : float
        Class width used for the table [deg].

    Returns
    -------
    GeoDataFrame
        A copy of ``buildings`` (same index and order) with
        ``specific_yield_kwh_per_kwp`` [kWh/kWp] (NaN without orientation),
        ``energy_mwh_per_year`` and ``energy_policy_mwh_per_year`` [MWh/yr]
        (0 without orientation or capacity).
    """
    out = buildings.copy()
    pos = _lookup(out, table, step_deg)
    has = pos >= 0
    yields = table["specific_yield_kwh_per_kwp"].to_numpy(dtype=float)
    specific = np.full(len(out), np.nan)
    specific[has] = yields[pos[has]]
    out["specific_yield_kwh_per_kwp"] = specific
    for cap_col, energy_col in (
        ("capacity_kwp", "energy_mwh_per_year"),
        ("capacity_policy_kwp", "energy_policy_mwh_per_year"),
    ):
        cap = pd.to_numeric(out[cap_col], errors="coerce").to_numpy(dtype=float)
        energy = np.zeros(len(out))
        ok = has & np.isfinite(cap)
        energy[ok] = cap[ok] * specific[ok] / 1000.0
        out[energy_col] = energy
    return out


def monthly_profile(
    buildings: pd.DataFrame,
    table: pd.DataFrame,
    by: str = "district_name",
    step_deg: float = 1.0,
    capacity_col: str = "capacity_kwp",
) -> pd.DataFrame:
    """Monthly AC energy per group of buildings.

    Parameters
    ----------
    buildings : DataFrame
        Rows with ``tilt_deg``, ``azimuth_deg`` [deg], the capacity column
        [kWp] and the grouping column.
    table : DataFrame
        Output of :func:`class_yield`.
    by : str
        Grouping column (missing values form their own group).
    step_deg : float
        Class width used for the table [deg].
    capacity_col : str
        ``capacity_kwp`` or ``capacity_policy_kwp``.

    Returns
    -------
    DataFrame
        Index: group; columns ``energy_m01_mwh`` ... ``energy_m12_mwh`` and
        ``energy_mwh_per_year`` [MWh].
    """
    pos = _lookup(buildings, table, step_deg)
    has = pos >= 0
    cap = pd.to_numeric(buildings[capacity_col], errors="coerce").to_numpy(dtype=float)
    ok = has & np.isfinite(cap)
    monthly = table.loc[:, list(MONTH_COLUMNS)].to_numpy(dtype=float)
    energy = np.zeros((len(buildings), 12))
    energy[ok] = monthly[pos[ok]] * cap[ok, None] / 1000.0
    frame = pd.DataFrame(energy, columns=list(ENERGY_MONTH_COLUMNS), index=buildings.index)
    frame[by] = buildings[by].to_numpy()
    result = frame.groupby(by, dropna=False, sort=True)[list(ENERGY_MONTH_COLUMNS)].sum()
    result["energy_mwh_per_year"] = result.sum(axis=1)
    return result


# --------------------------------------------------------------------------- runner


def run(
    weather_cfg: WeatherConfig,
    yield_cfg: YieldConfig,
    buildings_in: Path,
    out: Path,
    classes_out: Path,
    base_dir: Path,
) -> dict[str, Any]:
    """Yield stage: read roofs, compute the class table once, join, write.

    Parameters
    ----------
    weather_cfg : WeatherConfig
        Weather file and checks.
    yield_cfg : YieldConfig
        Model settings.
    buildings_in : Path
        Roof-stage GeoParquet (``tilt_deg``, ``azimuth_deg``, ``capacity_kwp``,
        ``capacity_policy_kwp``, ``district_name``, geometry, ...).
    out : Path
        Output GeoParquet (written to a temporary file and renamed).
    classes_out : Path
        Class table, CSV if the suffix is ``.csv``, else Parquet.
    base_dir : Path
        Directory relative paths are resolved against.

    Returns
    -------
    dict
        Row counts, class count, weather file and warnings, energy totals
        [MWh/yr] and duration [s].
    """
    import geopandas as gpd

    from pipeline.parallel import map_partitions
    from pipeline.planes import join_plane_yield, plane_rows

    t0 = time.perf_counter()
    buildings_in, out, classes_out = (
        resolve_path(p, base_dir) for p in (buildings_in, out, classes_out)
    )
    weather = read_weather(weather_cfg, base_dir)
    buildings = gpd.read_parquet(buildings_in)
    log.info("yield: %d buildings in from %s", len(buildings), buildings_in)
    step = yield_cfg.orientation_step_deg
    # one row per roof plane (plane 2 of pitched roofs, shading shares): pipeline.planes
    table = class_yield(orientation_classes(plane_rows(buildings), step), weather, yield_cfg)
    joined = map_partitions(buildings, join_plane_yield, table, step)
    _write_atomic(joined, out)
    _write_atomic(table, classes_out)
    duration = time.perf_counter() - t0
    summary = {
        "rows_in": len(buildings),
        "rows_out": len(joined),
        "orientation_classes": len(table),
        "weather_file": str(weather.source_path),
        "weather_warnings": list(weather.warnings),
        "annual_ghi_kwh_per_m2": float(weather.data["ghi"].sum() / 1000.0),
        "system_losses_pct": yield_cfg.losses.total_pct(),
        "energy_mwh_per_year": float(joined["energy_mwh_per_year"].sum()),
        "energy_policy_mwh_per_year": float(joined["energy_policy_mwh_per_year"].sum()),
        "duration_s": duration,
    }
    log.info(
        "yield: %d rows out to %s, %d classes to %s, %.0f MWh/yr, %.1f s",
        len(joined), out, len(table), classes_out, summary["energy_mwh_per_year"], duration,
    )
    return summary


def _write_atomic(frame: pd.DataFrame, path: Path) -> None:
    """Write a (Geo)DataFrame as GeoParquet/Parquet/CSV via a temp file and rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        if path.suffix.lower() == ".csv":
            frame.to_csv(tmp, index=False)
        else:
            frame.to_parquet(tmp, index=None if "geometry" in frame else False)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
