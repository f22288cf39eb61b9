"""Tests for pipeline.weather on the real Shanghai IWEC file and modified copies."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from pydantic import ValidationError

from pipeline.weather import (
    WeatherConfig,
    WeatherError,
    check_weather,
    read_weather,
    utc_to_local_year,
)

ROOT = Path(__file__).resolve().parents[1]

# EPW data-row field positions (EnergyPlus weather format; pvlib read_epw order)
F_HOUR, F_TEMP, F_GHI, F_DNI, F_DHI, F_WIND, F_ALBEDO = 3, 6, 13, 14, 15, 21, 32


def write_epw(
    src: Path,
    dest: Path,
    mutate: Callable[[list[list[str]]], None] | None = None,
    header: Callable[[list[str]], None] | None = None,
) -> Path:
    """Copy an EPW, letting ``mutate`` edit the split data rows and ``header`` the 8 lines."""
    lines = src.read_text(encoding="utf-8", errors="surrogateescape").splitlines()
    head, rows = lines[:8], [line.split(",") for line in lines[8:]]
    if header:
        header(head)
    if mutate:
        mutate(rows)
    text = "\n".join(head + [",".join(r) for r in rows]) + "\n"
    dest.write_text(text, encoding="utf-8", errors="surrogateescape")
    return dest


def test_reads_real_iwec(iwec) -> None:
    data = iwec.data
    assert list(data.columns) == ["ghi", "dni", "dhi", "temp_air", "wind_speed", "albedo"]
    assert len(data) == 8760
    assert data.index.is_monotonic_increasing and data.index.is_unique
    assert (data.index.year == 1990).all()
    assert data.index[0] == pd.Timestamp("1990-01-01 00:00", tz="Etc/GMT-8")
    assert data.index.tz.utcoffset(None) == pd.Timedelta(hours=8)
    assert iwec.utc_offset_h == 8.0
    assert (iwec.latitude, iwec.longitude, iwec.altitude_m) == (31.17, 121.43, 7.0)
    assert iwec.solar_position_offset_min == 30.0
    assert not data.isna().any().any()
    # IWEC carries albedo 0.000 in every hour: treated as missing, default used
    assert (data["albedo"] == 0.2).all()
    assert any("albedo" in w and "8760 of 8760" in w for w in iwec.warnings)
    assert data["ghi"].sum() / 1000 == pytest.approx(1242.0, abs=1)


def test_relative_path_resolved_against_base_dir(iwec_epw: Path) -> None:
    weather = read_weather(WeatherConfig(path=iwec_epw.name), iwec_epw.parent)
    assert weather.source_path == iwec_epw.parent / iwec_epw.name


def test_missing_file_names_the_fix(tmp_path: Path) -> None:
    with pytest.raises(WeatherError, match=r"nope\.epw not found.*make data"):
        read_weather(WeatherConfig(path="nope.epw"), tmp_path)


def test_config_forbids_extra_keys_and_leap_year() -> None:
    with pytest.raises(ValidationError, match="extra"):
        WeatherConfig(path="x.epw", albedo=0.3)
    with pytest.raises(ValidationError, match="leap year"):
        WeatherConfig(path="x.epw", coerce_year=2000)


def test_truncated_file_is_refused(iwec_epw: Path, tmp_path: Path) -> None:
    def truncate(rows: list[list[str]]) -> None:
        del rows[-24:]

    path = write_epw(iwec_epw, tmp_path / "short.epw", truncate)
    with pytest.raises(WeatherError) as err:
        read_weather(WeatherConfig(path=path), tmp_path)
    msg = str(err.value)
    assert "short.epw" in msg and "'length'" in msg and "8736" in msg and "fix:" in msg


def test_wrong_time_zone_is_refused(iwec_epw: Path, tmp_path: Path) -> None:
    def utc(head: list[str]) -> None:
        fields = head[0].split(",")
        fields[8] = "0.0"
        head[0] = ",".join(fields)

    path = write_epw(iwec_epw, tmp_path / "utc.epw", header=utc)
    with pytest.raises(WeatherError, match=r"utc\.epw.*'time zone'.*UTC\+0, expected UTC\+8"):
        read_weather(WeatherConfig(path=path), tmp_path)
    # without the expected offset the sun checks catch it: the data are 8 h off
    with pytest.raises(WeatherError, match=r"utc\.epw: check 'GHI closure' failed: \d+ of \d+"):
        read_weather(WeatherConfig(path=path, expected_utc_offset_h=None), tmp_path)


def test_data_shifted_by_one_hour_fails_closure(iwec_epw: Path, tmp_path: Path) -> None:
    def shift(rows: list[list[str]]) -> None:
        values = [r[6:] for r in rows]
        values = values[-1:] + values[:-1]
        for r, v in zip(rows, values, strict=True):
            r[6:] = v

    path = write_epw(iwec_epw, tmp_path / "shifted.epw", shift)
    with pytest.raises(WeatherError) as err:
        read_weather(WeatherConfig(path=path), tmp_path)
    msg = str(err.value)
    assert "'GHI closure'" in msg and "daylight hours" in msg and "time zone" in msg


def test_inconsistent_components_fail_closure(iwec_epw: Path, tmp_path: Path) -> None:
    def inflate_dhi(rows: list[list[str]]) -> None:
        for r in rows:
            r[F_DHI] = str(int(r[F_DHI]) * 2)

    path = write_epw(iwec_epw, tmp_path / "dhi.epw", inflate_dhi)
    with pytest.raises(WeatherError, match=r"dhi\.epw: check 'GHI closure' failed"):
        read_weather(WeatherConfig(path=path), tmp_path)


def test_night_irradiance_is_refused(iwec_epw: Path, tmp_path: Path) -> None:
    def night_sun(rows: list[list[str]]) -> None:
        for r in rows:
            if r[F_HOUR] == "3":  # 02:00-03:00 local: dark all year in Shanghai
                r[F_GHI] = r[F_DHI] = "40"

    path = write_epw(iwec_epw, tmp_path / "night.epw", night_sun)
    with pytest.raises(WeatherError) as err:
        read_weather(WeatherConfig(path=path), tmp_path)
    msg = str(err.value)
    assert "night.epw" in msg and "'night irradiance'" in msg and "365 of" in msg


def test_sentinels_fall_back_to_defaults(iwec_epw: Path, tmp_path: Path, iwec) -> None:
    def gaps(rows: list[list[str]]) -> None:
        for r in rows[4000:4010]:
            r[F_TEMP] = "99.9"
        for r in rows[5000:5007]:
            r[F_WIND] = "999"
        for r in rows[4500:4503]:  # 3 irradiance hours at midday
            r[F_GHI] = r[F_DNI] = r[F_DHI] = "9999"

    path = write_epw(iwec_epw, tmp_path / "gaps.epw", gaps)
    cfg = WeatherConfig(path=path, temp_air_default_c=11.0, wind_speed_default_m_per_s=1.5)
    weather = read_weather(cfg, tmp_path)
    data = weather.data
    assert (data["temp_air"].iloc[4000:4010] == 11.0).all()
    assert (data["wind_speed"].iloc[5000:5007] == 1.5).all()
    assert any("temp_air missing in 10 of 8760" in w for w in weather.warnings)
    assert any("wind_speed missing in 7 of 8760" in w for w in weather.warnings)
    assert any("3 hours with missing irradiance" in w for w in weather.warnings)
    gap = data["ghi"].iloc[4499:4504].to_numpy()
    assert np.all(gap >= 0) and np.all(gap < 1100)
    np.testing.assert_allclose(gap[1:4], np.linspace(gap[0], gap[4], 5)[1:4])
    # the untouched hours are unchanged
    pd.testing.assert_frame_equal(data.iloc[:4000], iwec.data.iloc[:4000])


def test_too_many_missing_irradiance_hours(iwec_epw: Path, tmp_path: Path) -> None:
    def gaps(rows: list[list[str]]) -> None:
        for r in rows[3000:3020]:
            r[F_GHI] = "9999"

    path = write_epw(iwec_epw, tmp_path / "holes.epw", gaps)
    with pytest.raises(WeatherError, match=r"'missing irradiance' failed: 20 of 8760 hours"):
        read_weather(WeatherConfig(path=path), tmp_path)
    weather = read_weather(WeatherConfig(path=path, max_missing_irradiance_hours=24), tmp_path)
    assert any("20 hours with missing irradiance" in w for w in weather.warnings)


def test_albedo_999_and_valid_albedo(iwec_epw: Path, tmp_path: Path) -> None:
    def albedo(value: str) -> Callable[[list[list[str]]], None]:
        def set_(rows: list[list[str]]) -> None:
            for r in rows:
                r[F_ALBEDO] = value

        return set_

    missing = read_weather(
        WeatherConfig(path=write_epw(iwec_epw, tmp_path / "a999.epw", albedo("999"))), tmp_path
    )
    assert (missing.data["albedo"] == 0.2).all()
    given = read_weather(
        WeatherConfig(path=write_epw(iwec_epw, tmp_path / "a03.epw", albedo("0.3"))), tmp_path
    )
    assert (given.data["albedo"] == 0.3).all()
    assert not any("albedo" in w for w in given.warnings)


def pvgis_csv_from_epw(weather, dest: Path, time_offset_h: float = 0.5) -> Path:
    """Write the EPW data as a PVGIS TMY CSV (UTC, PVGIS column names)."""
    utc = weather.data.copy()
    utc.index = utc.index.tz_convert("UTC")
    years = {1: 2007, 2: 2011, 3: 2013, 4: 2009, 5: 2006, 6: 2012,
             7: 2010, 8: 2008, 9: 2014, 10: 2005, 11: 2015, 12: 2016}
    # wrap round to one UTC year and give each month its "selected" year, as PVGIS does
    stamps = [ts.replace(year=1990) if ts.year == 1989 else ts for ts in utc.index]
    stamps = [ts.replace(year=years[ts.month]) for ts in stamps]
    utc.index = pd.DatetimeIndex(stamps)
    utc = utc.sort_index(key=lambda idx: idx.month * 10_000 + idx.day * 100 + idx.hour)
    lines = [
        f"Latitude (decimal degrees): {weather.latitude:.3f}",
        f"Longitude (decimal degrees): {weather.longitude:.3f}",
        f"Elevation (m): {weather.altitude_m:.1f}",
        f"Irradiance Time Offset (h): {time_offset_h:.4f}",
        "month,year",
        *[f"{m},{y}" for m, y in years.items()],
        "time(UTC),T2m,RH,G(h),Gb(n),Gd(h),IR(h),WS10m,WD10m,SP",
    ]
    for ts, row in utc.iterrows():
        lines.append(
            f"{ts:%Y%m%d:%H%M},{row.temp_air:.2f},50.0,{row.ghi:.2f},{row.dni:.2f},"
            f"{row.dhi:.2f},300.0,{row.wind_speed:.2f},180.0,101000.0"
        )
    lines += ["", "T2m: 2-m air temperature (degree Celsius)", "G(h): Global irradiance"]
    dest.write_text("\r\n".join(lines) + "\r\n")
    return dest


def test_pvgis_csv_matches_epw(iwec, tmp_path: Path) -> None:
    path = pvgis_csv_from_epw(iwec, tmp_path / "tmy_31.170_121.430.csv")
    weather = read_weather(WeatherConfig(path=path), tmp_path)
    assert weather.solar_position_offset_min == pytest.approx(30.0)
    assert weather.utc_offset_h == 8.0
    # same data, site and sun timing as the EPW, hence the same yield
    assert (weather.latitude, weather.longitude, weather.altitude_m) == (31.17, 121.43, 7.0)
    pd.testing.assert_frame_equal(weather.data, iwec.data, check_freq=False)
    assert any("albedo" in w for w in weather.warnings)


def test_utc_to_local_year_wraps_round() -> None:
    idx = pd.date_range("2010-01-01", periods=8760, freq="h", tz="UTC")
    frame = pd.DataFrame({"v": np.arange(8760)}, index=idx)
    out = utc_to_local_year(frame, 8.0, 1990)
    # local 1 Jan 00:00-07:00 are 16:00-23:00 UTC on 31 Dec, wrapped round to the start
    assert list(out["v"].iloc[:9]) == [8752, 8753, 8754, 8755, 8756, 8757, 8758, 8759, 0]
    assert out.index[0] == pd.Timestamp("1990-01-01 00:00", tz="Etc/GMT-8")
    assert out.index[-1] == pd.Timestamp("1990-12-31 23:00", tz="Etc/GMT-8")
    assert (np.diff(out.index) == pd.Timedelta(hours=1)).all()


def test_check_weather_on_a_hand_made_frame(tmp_path: Path) -> None:
    # two days of clear-ish synthetic data at the equator, UTC: all checks run
    from pvlib.solarposition import get_solarposition

    idx = pd.date_range("1990-03-20", periods=48, freq="h", tz="UTC")
    zenith = get_solarposition(idx + pd.Timedelta("30min"), 0.0, 0.0)["zenith"].to_numpy()
    up = zenith < 90
    cosz = np.where(up, np.cos(np.radians(zenith)), 0.0)
    raw = pd.DataFrame(
        {"ghi": 800 * cosz + 100 * up, "dni": 800.0 * up, "dhi": 100.0 * up,
         "temp_air": 25.0, "wind_speed": 2.0, "albedo": 0.25},
        index=idx,
    )
    meta = {"latitude": 0.0, "longitude": 0.0, "altitude_m": 0.0, "utc_offset_h": 0.0,
            "solar_position_offset_min": 30.0}
    cfg = WeatherConfig(path=tmp_path / "x.epw", expected_hours=48, expected_utc_offset_h=0)
    weather = check_weather(raw, meta, cfg, tmp_path / "x.epw")
    assert weather.warnings == []
    bad = raw.copy()
    bad["dhi"] = bad["dhi"] * 3
    with pytest.raises(WeatherError, match="GHI closure"):
        check_weather(bad, meta, cfg, tmp_path / "x.epw")
    dup = raw.copy()
    dup.index = idx.delete(5).insert(5, idx[4])
    with pytest.raises(WeatherError, match=r"'hourly series' failed: 2 of 47 steps"):
        check_weather(dup, meta, cfg, tmp_path / "x.epw")


def test_an_unchanged_file_is_read_once_per_process(iwec_epw: Path, tmp_path: Path,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "w.epw"
    path.write_bytes(iwec_epw.read_bytes())
    first = read_weather(WeatherConfig(path=path), tmp_path)
    first.data.iloc[0, 0] = -1.0  # a caller's change does not reach the next reader
    with caplog.at_level("INFO", logger="pipeline.weather"):
        again = read_weather(WeatherConfig(path=path), tmp_path)
    assert "reused" in caplog.text
    assert again.data.iloc[0, 0] != -1.0 and again.latitude == first.latitude
    fresh = read_weather(WeatherConfig(path=iwec_epw), tmp_path)  # another file: read
    pd.testing.assert_frame_equal(again.data, fresh.data)
    # same path, other content: read and checked again (here: refused)
    lines = iwec_epw.read_text(encoding="latin-1").splitlines(keepends=True)
    path.write_text("".join(lines[:-24]), encoding="latin-1")
    with pytest.raises(WeatherError):
        read_weather(WeatherConfig(path=path), tmp_path)
