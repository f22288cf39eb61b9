"""Tests for pipeline.data: sample copy, EPW fetch from a local archive, PVGIS file path."""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pipeline import data
from pipeline.data import (
    EPW_MEMBER,
    EPW_SHA256,
    DataError,
    copy_sample,
    extract_member,
    fetch_epw,
    fetch_pvgis_tmy,
    main,
)
from pipeline.weather import WeatherConfig, read_weather

ROOT = Path(__file__).resolve().parents[1]
FAKE_EPW = b"LOCATION,TEST,-,XXX,hand-made,000000,0.0,0.0,0.0,0.0\n"


def make_zip(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for name, content in members.items():
            zf.writestr(name, content)
    return path


def make_tar_gz(path: Path, members: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w:gz") as tf:
        for name, content in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(content)
            tf.addfile(info, io.BytesIO(content))
    return path


# --------------------------------------------------------------------------- fetch-epw


def test_wrong_hash_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    wheel = make_zip(tmp_path / "bifacialvf-0.2.0-py3-none-any.whl", {EPW_MEMBER: FAKE_EPW})
    out = tmp_path / "weather" / "shanghai.epw"
    with pytest.raises(DataError) as err:
        fetch_epw(out, from_file=wheel)
    msg = str(err.value)
    assert EPW_MEMBER in msg and hashlib.sha256(FAKE_EPW).hexdigest() in msg
    assert EPW_SHA256 in msg and "refusing to write" in msg
    assert not out.exists() and not list(tmp_path.glob("weather/.*"))
    # the command line reports it and exits 1
    assert main(["fetch-epw", "--from-file", str(wheel), "--out", str(out)]) == 1
    assert "expected " + EPW_SHA256 in capsys.readouterr().err


def test_right_hash_is_written_and_then_skipped(tmp_path: Path) -> None:
    wheel = make_zip(tmp_path / "pkg.whl", {"bifacialvf/__init__.py": b"", EPW_MEMBER: FAKE_EPW})
    out = tmp_path / "w" / "x.epw"
    digest = hashlib.sha256(FAKE_EPW).hexdigest()
    assert fetch_epw(out, from_file=wheel, expected_sha256=digest) == out
    assert out.read_bytes() == FAKE_EPW
    assert oct(out.stat().st_mode & 0o777) == "0o644"
    os.utime(out, ns=(1_000_000_000, 1_000_000_000))
    fetch_epw(out, from_file=tmp_path / "does-not-matter.whl", expected_sha256=digest)
    assert out.stat().st_mtime_ns == 1_000_000_000  # present with the right hash: untouched


def test_real_epw_through_hand_made_wheel_and_sdist(iwec_epw: Path, tmp_path: Path) -> None:
    content = iwec_epw.read_bytes()
    wheel = make_zip(tmp_path / "bifacialvf-0.2.0-py3-none-any.whl", {EPW_MEMBER: content})
    sdist = make_tar_gz(tmp_path / "bifacialvf-0.2.0.tar.gz",
                        {"bifacialvf-0.2.0/" + EPW_MEMBER: content,
                         "bifacialvf-0.2.0/setup.py": b""})
    for archive in (wheel, sdist, iwec_epw):
        out = tmp_path / f"out-{archive.name}" / "shanghai.epw"
        assert main(["fetch-epw", "--from-file", str(archive), "--out", str(out)]) == 0
        assert hashlib.sha256(out.read_bytes()).hexdigest() == EPW_SHA256


def test_archive_without_member(tmp_path: Path) -> None:
    wheel = make_zip(tmp_path / "other.whl", {"bifacialvf/data/other.epw": FAKE_EPW})
    with pytest.raises(DataError, match="has no member bifacialvf/data/CHN_Shanghai"):
        extract_member(wheel)
    with pytest.raises(DataError, match="not found"):
        fetch_epw(tmp_path / "x.epw", from_file=tmp_path / "missing.whl")


def test_pip_failure_is_reported(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    class Proc:
        returncode, stderr = 1, "ERROR: No matching distribution found for bifacialvf==0.2.0"

    monkeypatch.setattr(data.subprocess, "run", lambda *a, **k: Proc())
    with pytest.raises(DataError, match=r"pip download .* failed .*No matching.*--from-file"):
        fetch_epw(tmp_path / "x.epw")


# --------------------------------------------------------------------------- copy-sample


def make_sample(src: Path) -> Path:
    for rel, text in {
        "districts_wgs84.geojson": "{}",
        "osm_heritage_subset.geojson": "{}",
        "cbdc_prototype/310000SHANGHAISHI.shp": "shp",
        "cbdc_prototype/310000SHANGHAISHI.dbf": "dbf",
        "height_tiles/height_0_9.tif": "tif",
        "height_tiles/height_5_5.tif": "tif2",
        "README.md": "not copied",
    }.items():
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_text(text)
    return src


def test_copy_sample_is_incremental(tmp_path: Path) -> None:
    src = make_sample(tmp_path / "shared")
    dest = tmp_path / "data" / "raw" / "shanghai"
    assert copy_sample(src, dest) == {"copied": 6, "unchanged": 0}
    assert sorted(str(p.relative_to(dest)) for p in dest.rglob("*") if p.is_file()) == [
        "cbdc_prototype/310000SHANGHAISHI.dbf", "cbdc_prototype/310000SHANGHAISHI.shp",
        "districts_wgs84.geojson", "height_tiles/height_0_9.tif", "height_tiles/height_5_5.tif",
        "osm_heritage_subset.geojson",
    ]
    tif = dest / "height_tiles/height_0_9.tif"
    assert tif.stat().st_mtime_ns == (src / "height_tiles/height_0_9.tif").stat().st_mtime_ns
    stamp = {p: p.stat().st_mtime_ns for p in dest.rglob("*") if p.is_file()}

    assert copy_sample(src, dest) == {"copied": 0, "unchanged": 6}
    assert {p: p.stat().st_mtime_ns for p in stamp} == stamp

    (src / "height_tiles/height_5_5.tif").write_text("changed")
    os.utime(src / "height_tiles/height_5_5.tif", ns=(2_000_000_000, 2_000_000_000))
    assert copy_sample(src, dest) == {"copied": 1, "unchanged": 5}
    assert (dest / "height_tiles/height_5_5.tif").read_text() == "changed"
    assert tif.stat().st_mtime_ns == stamp[tif]
    assert [p.name for p in dest.parent.iterdir()] == ["shanghai"]  # no temp dirs left


def test_copy_sample_names_missing_file_and_make_variable(tmp_path: Path) -> None:
    src = make_sample(tmp_path / "shared")
    (src / "osm_heritage_subset.geojson").unlink()
    with pytest.raises(DataError, match=r"osm_heritage_subset\.geojson not found.*SAMPLE_DIR"):
        copy_sample(src, tmp_path / "dest")
    for tif in (src / "height_tiles").glob("*.tif"):
        tif.unlink()
    both = r"osm_heritage_subset\.geojson, .*height_tiles/\*\.tif not found"
    with pytest.raises(DataError, match=both):
        copy_sample(src, tmp_path / "dest")
    assert main(["copy-sample", "--src", str(tmp_path / "nowhere"),
                 "--dest", str(tmp_path / "dest")]) == 1
    assert not (tmp_path / "dest").exists()


# --------------------------------------------------------------------------- PVGIS


def fake_pvgis(hours: int = 8760, *, data_from=None):
    """A getter standing in for pvlib.iotools.get_pvgis_tmy (no network)."""
    calls: list[tuple] = []

    def getter(lat, lon, **kwargs):
        calls.append((lat, lon, kwargs))
        if data_from is None:
            idx = pd.date_range("2010-01-01", periods=hours, freq="h", tz="UTC")
            frame = pd.DataFrame(
                {"T2m": 20.0, "RH": 50.0, "G(h)": 0.0, "Gb(n)": 0.0, "Gd(h)": 0.0,
                 "IR(h)": 300.0, "WS10m": 2.0, "WD10m": 180.0, "SP": 101000.0}, index=idx)
        else:
            frame = data_from
        meta = {
            "inputs": {"location": {"latitude": lat, "longitude": lon, "elevation": 7.0},
                       "meteo_data": {"radiation_db": "PVGIS-ERA5"},
                       "descriptions": {"location": {"description": "Selected location"}}},
            "months_selected": [{"month": m, "year": 2010} for m in range(1, 13)],
            "outputs": {"tmy_hourly": {"type": "time series"}},
        }
        return frame, meta

    return getter, calls


def test_fetch_pvgis_writes_a_pvgis_json(tmp_path: Path) -> None:
    from pvlib.iotools import read_pvgis_tmy

    getter, calls = fake_pvgis(48)
    out = fetch_pvgis_tmy(31.17, 121.43, tmp_path / "tmy.json", getter=getter, usehorizon=False)
    assert calls == [(31.17, 121.43, {"outputformat": "json", "map_variables": False,
                                      "coerce_year": None, "usehorizon": False})]
    raw = json.loads(out.read_text())
    assert raw["outputs"]["tmy_hourly"][0]["time(UTC)"] == "20100101:0000"
    back, meta = read_pvgis_tmy(str(out), map_variables=True)
    assert len(back) == 48 and back.index[0] == pd.Timestamp("2010-01-01", tz="UTC")
    assert meta["inputs"]["location"]["latitude"] == 31.17
    assert meta["months_selected"][0] == {"month": 1, "year": 2010}
    assert (back["temp_air"] == 20.0).all() and (back["wind_speed"] == 2.0).all()


def test_fetched_pvgis_json_reads_like_the_epw(iwec_epw: Path, tmp_path: Path) -> None:
    epw = read_weather(WeatherConfig(path=iwec_epw), ROOT)
    utc = epw.data.copy()
    utc.index = utc.index.tz_convert("UTC")
    utc.index = pd.DatetimeIndex([t.replace(year=2010) if t.year == 1989 else
                                  t.replace(year=2009) for t in utc.index])
    utc = utc.sort_index(key=lambda i: i.month * 10_000 + i.day * 100 + i.hour)
    pvgis = utc.rename(columns={"ghi": "G(h)", "dni": "Gb(n)", "dhi": "Gd(h)",
                                "temp_air": "T2m", "wind_speed": "WS10m"}).drop(columns="albedo")
    getter, _ = fake_pvgis(data_from=pvgis)
    path = fetch_pvgis_tmy(31.17, 121.43, tmp_path / "tmy.json", getter=getter)
    # JSON has no irradiance time offset: state the mid-hour convention explicitly
    weather = read_weather(WeatherConfig(path=path, solar_position_offset_min=30), tmp_path)
    pd.testing.assert_frame_equal(weather.data, epw.data, check_freq=False)
    assert np.isclose(weather.altitude_m, 7.0)
