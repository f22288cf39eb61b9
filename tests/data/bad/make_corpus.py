"""Write the corpus of bad inputs (one small file per defect) described in manifest.yaml.

Run from the project root: ``.venv/bin/python tests/data/bad/make_corpus.py``. The vector and
config files are committed (they are small); weather files (8,760 rows each, ~1 MB) are written
by :func:`write_weather` into a temporary directory at test time.

Every source file holds a control building (``fid`` 0, kept) and the defective features
(``fid`` >= 1); properties ``fid``, ``building``, ``name``, ``levels``, ``height``. Two
hand-made square districts: 甲区 (121.40-121.43 E) and 乙区 (121.43-121.46 E), 31.20-31.23 N.
"""

from __future__ import annotations

import json
import math
import sqlite3
import sys
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

HERE = Path(__file__).resolve().parent
LAT0 = 31.21
M_PER_DEG_LAT = 111_320.0
M_PER_DEG_LON = 111_320.0 * math.cos(math.radians(LAT0))
PROPS = ("fid", "building", "name", "levels", "height")


def rect(cx: float, cy: float, w_m: float, h_m: float) -> list:
    """Closed lon/lat ring of a w x h metre rectangle centred on (cx, cy)."""
    dx, dy = w_m / 2 / M_PER_DEG_LON, h_m / 2 / M_PER_DEG_LAT
    return [[cx - dx, cy - dy], [cx + dx, cy - dy], [cx + dx, cy + dy], [cx - dx, cy + dy],
            [cx - dx, cy - dy]]


def poly(ring: list) -> dict:
    return {"type": "Polygon", "coordinates": [ring]}


def feature(fid: int, geometry: dict | None, building: str | None = "yes", name=None,
            levels=None, height=None) -> dict:
    props = dict(zip(PROPS, (fid, building, name, levels, height), strict=True))
    return {"type": "Feature", "properties": props, "geometry": geometry}


def control(cx: float = 121.41, cy: float = 31.21) -> dict:
    return feature(0, poly(rect(cx, cy, 30, 20)), "school", "对照小学", "4", "15")


def write_geojson(name: str, features: list, crs: str | None = None) -> None:
    fc: dict = {"type": "FeatureCollection"}
    if crs:
        fc["crs"] = {"type": "name", "properties": {"name": crs}}
    fc["features"] = features
    (HERE / name).write_text(json.dumps(fc, ensure_ascii=False, indent=None) + "\n",
                             encoding="utf-8")


def main() -> None:
    sys.path.insert(0, str(HERE.parents[2]))
    import geopandas as gpd
    import pyogrio
    from pyproj import Transformer
    from shapely.geometry import box

    from pipeline.coords import wgs84_to_gcj02

    # districts
    write_geojson("districts.geojson", [
        {"type": "Feature", "properties": {"district_name": "甲区", "district_adcode": "1"},
         "geometry": poly([[121.40, 31.20], [121.43, 31.20], [121.43, 31.23], [121.40, 31.23],
                           [121.40, 31.20]])},
        {"type": "Feature", "properties": {"district_name": "乙区", "district_adcode": "2"},
         "geometry": poly([[121.43, 31.20], [121.46, 31.20], [121.46, 31.23], [121.43, 31.23],
                           [121.43, 31.20]])},
    ])
    c = (121.415, 31.215)
    # ---- geometry defects
    write_geojson("null_geometry.geojson", [control(), feature(1, None)])
    write_geojson("empty_geometry.geojson", [control(), feature(1, {"type": "Polygon",
                                                                    "coordinates": []})])
    write_geojson("point.geojson", [control(), feature(1, {"type": "Point", "coordinates": c})])
    write_geojson("line.geojson", [control(), feature(1, {
        "type": "LineString", "coordinates": rect(*c, 30, 20)[:3]})])
    write_geojson("polygon_3d.geojson", [control(), feature(1, poly(
        [[x, y, 12.0] for x, y in rect(*c, 30, 20)]))])
    r = rect(*c, 40, 40)
    loop = [r[0], r[1], r[2], [c[0], c[1] - 30 / M_PER_DEG_LAT], r[3], r[0]]
    write_geojson("self_intersecting.geojson", [control(), feature(1, poly(loop))])
    write_geojson("bowtie.geojson", [control(), feature(1, poly([r[0], r[2], r[1], r[3], r[0]]))])
    write_geojson("zero_area.geojson", [control(), feature(1, poly(
        [r[0], r[1], [(r[0][0] + r[1][0]) / 2, r[0][1]], r[0]]))])
    a, b = rect(*c, 40, 30), rect(c[0] + 39.5 / M_PER_DEG_LON, c[1], 40, 30)
    write_geojson("multipolygon_sliver.geojson", [control(), feature(1, {
        "type": "MultiPolygon", "coordinates": [[a], [b]]})])
    rp = [r[0], r[1], r[1], r[1], r[2], r[3], r[3], r[0]]
    write_geojson("repeated_points.geojson", [control(), feature(1, poly(rp))])
    write_geojson("too_few_points.geojson", [control(), feature(1, poly([r[0], r[1], r[0]]))])
    write_geojson("too_large.geojson", [control(), feature(1, poly(rect(121.415, 31.215, 1200,
                                                                        1000)))])
    write_geojson("too_small.geojson", [control(), feature(1, poly(rect(*c, 3, 3)))])
    write_geojson("outside_districts.geojson", [control(), feature(1, poly(rect(121.47, 31.21,
                                                                                30, 20)))])
    rich = dict(building="school", name="某某中学", levels="5")
    write_geojson("duplicate_exact.geojson", [control(), feature(1, poly(r)),
                                              feature(2, poly(r), **rich)])
    shifted = [[x + 2 / M_PER_DEG_LON, y + 1 / M_PER_DEG_LAT] for x, y in r]
    write_geojson("duplicate_near.geojson", [control(), feature(1, poly(shifted)),
                                             feature(2, poly(r), **rich)])
    write_geojson("duplicate_cross_rich.geojson", [feature(1, poly(r), **rich)])
    write_geojson("duplicate_cross_poor.geojson", [control(), feature(1, poly(shifted))])
    # ---- coordinate defects
    no_crs = gpd.GeoDataFrame({"fid": [0], "building": ["yes"]},
                              geometry=[box(351000, 3454000, 351030, 3454020)], crs=None)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="'crs' was not provided")  # the defect
        pyogrio.write_dataframe(no_crs, HERE / "no_crs.shp")
    write_geojson("swapped_lonlat.geojson", [
        {**f, "geometry": poly([[y, x] for x, y in f["geometry"]["coordinates"][0]])}
        for f in (control(), feature(1, poly(r)))])
    to_utm = Transformer.from_crs("EPSG:4326", "EPSG:32651", always_xy=True)
    write_geojson("metres_as_degrees.geojson", [
        {**f, "geometry": poly([list(to_utm.transform(x, y))
                                for x, y in f["geometry"]["coordinates"][0]])}
        for f in (control(), feature(1, poly(r)))])
    write_geojson("degrees_as_metres.geojson", [control(), feature(1, poly(r))],
                  crs="urn:ogc:def:crs:EPSG::32651")
    write_geojson("out_of_range.geojson", [control(), feature(1, poly(rect(121.41, 95.0,
                                                                           30, 20)))])

    def gcj(ring: list) -> list:
        lon, lat = wgs84_to_gcj02(np.array([p[0] for p in ring]), np.array([p[1] for p in ring]))
        return [[float(x), float(y)] for x, y in zip(lon, lat, strict=True)]

    near_border = rect(121.428, 31.21, 30, 20)  # WGS84: 甲区; shifted to GCJ-02 it lies in 乙区
    write_geojson("gcj02.geojson", [control(121.405, 31.21), feature(1, poly(gcj(near_border)))])
    row = [rect(121.405 + k * 150 / M_PER_DEG_LON, 31.222, 30, 20) for k in range(12)]
    write_geojson("gcj02_reference_wgs84.geojson",
                  [feature(k, poly(ring), name=f"楼{k}") for k, ring in enumerate(row)])
    write_geojson("gcj02_undeclared.geojson",
                  [feature(k, poly(gcj(ring))) for k, ring in enumerate(row)])
    # ---- attribute defects
    write_geojson("missing_mapped_column.geojson", [
        {"type": "Feature", "properties": {"fid": 0, "bldg": "yes"},
         "geometry": poly(rect(*c, 30, 20))}])
    levels = ["5;6", "3-4", "五", "12F", "２０", "abc", "-2", "400"]
    write_geojson("levels_text.geojson", [control()] + [
        feature(k + 1, poly(rect(121.405 + k * 0.001, 31.205, 30, 20)), levels=v)
        for k, v in enumerate(levels)])
    heights = ["30 m", "100 ft", "-5", "5000", "0", "12,5", "tall"]
    write_geojson("height_absurd.geojson", [control()] + [
        feature(k + 1, poly(rect(121.405 + k * 0.001, 31.205, 30, 20)), height=v)
        for k, v in enumerate(heights)])
    mojibake = "武宁中学".encode("gbk").decode("latin-1")
    write_geojson("mojibake_text.geojson", [control(), feature(1, poly(r), name=mojibake)])
    write_geojson("replacement_chars.geojson", [control(), feature(1, poly(r),
                                                                   name="上海\ufffd\ufffd中学")])
    gdf = gpd.GeoDataFrame({"fid": [0, 1], "building": ["yes", "yes"], "name": ["武宁中学", "ab"]},
                           geometry=[box(121.41, 31.21, 121.4103, 31.2102),
                                     box(121.42, 31.21, 121.4203, 31.2102)], crs="EPSG:4326")
    pyogrio.write_dataframe(gdf, HERE / "undecodable.shp", encoding="gbk")
    (HERE / "undecodable.cpg").write_text("UTF-8")
    mixed = ["武宁中学".encode().decode("latin-1"), "上海中学".encode("gbk").decode("latin-1")]
    gdf = gpd.GeoDataFrame({"fid": [0, 1], "building": ["yes", "yes"], "name": mixed},
                           geometry=[box(121.41, 31.21, 121.4103, 31.2102),
                                     box(121.42, 31.21, 121.4203, 31.2102)], crs="EPSG:4326")
    pyogrio.write_dataframe(gdf, HERE / "mixed_encodings.shp", encoding="latin1")
    # ---- file defects
    (HERE / "empty.geojson").write_bytes(b"")
    text = (HERE / "levels_text.geojson").read_text(encoding="utf-8")
    (HERE / "truncated.geojson").write_text(text[: len(text) // 2], encoding="utf-8")
    (HERE / "corrupt.gpkg").write_bytes(bytes(range(256)) * 8)
    nft = HERE / "no_feature_table.gpkg"
    nft.unlink(missing_ok=True)
    pyogrio.write_dataframe(pd.DataFrame({"fid_": [0], "building": ["yes"]}), nft,
                            layer="attributes_only", driver="GPKG")
    con = sqlite3.connect(nft)
    con.execute("pragma page_size=512")
    con.execute("vacuum")
    con.close()
    pq = HERE / "truncated.parquet"
    gpd.GeoDataFrame({"fid": [0]}, geometry=[box(121.41, 31.21, 121.4103, 31.2102)],
                     crs="EPSG:4326").to_parquet(pq)
    pq.write_bytes(pq.read_bytes()[:300])
    write_geojson("no_features.geojson", [])


# --------------------------------------------------------------------------- weather
EPW_HEADER = (
    "LOCATION,Synthetic clear sky,SH,CHN,rooftop-pv tests,583670,31.17,121.43,{tz},7.0\n"
    "DESIGN CONDITIONS,0\nTYPICAL/EXTREME PERIODS,0\nGROUND TEMPERATURES,0\n"
    "HOLIDAYS/DAYLIGHT SAVINGS,No,0,0,0\nCOMMENTS 1,synthetic clear-sky year for tests\n"
    "COMMENTS 2,\nDATA PERIODS,1,1,Data,Sunday, 1/ 1,12/31\n"
)


def clear_sky_year(year: int = 1990) -> pd.DataFrame:
    """A consistent synthetic year at Longhua (31.17 N 121.43 E, UTC+8): GHI, DNI, DHI [W/m2].

    GHI from the Haurwitz clear-sky model at mid-hour, DHI = 15% of GHI, DNI from closure
    (GHI = DNI cos(zenith) + DHI), zero with the sun below the horizon.
    """
    from pvlib.solarposition import get_solarposition

    idx = pd.date_range(f"{year}-01-01 00:00", periods=8760, freq="h", tz="Etc/GMT-8")
    zen = get_solarposition(idx + pd.Timedelta(minutes=30), 31.17, 121.43)["zenith"].to_numpy()
    cosz = np.cos(np.radians(zen))
    ghi = np.where(cosz > 0, 1098.0 * cosz * np.exp(-0.057 / np.maximum(cosz, 1e-3)), 0.0)
    ghi = np.round(ghi)
    dhi = np.round(0.15 * ghi)
    dni = np.where(cosz > 0.02, np.round((ghi - dhi) / np.maximum(cosz, 0.02)), 0.0)
    dhi = np.where(cosz > 0.02, dhi, ghi)
    return pd.DataFrame({"ghi": ghi, "dni": dni, "dhi": dhi, "cosz": cosz}, index=idx)


def write_weather(name: str, out_dir: Path, base: pd.DataFrame | None = None) -> Path:
    """Write the weather file of one defect (see manifest.yaml) into ``out_dir``."""
    d = (clear_sky_year() if base is None else base).copy()
    tz = 8.0
    if name == "weather_short.epw":
        d = d.iloc[:-1]
    elif name == "weather_gap.epw":  # 5 May 10:00 missing, 11:00 twice
        d = d.copy()
        pos = d.index.get_loc(pd.Timestamp("1990-05-05 10:00", tz="Etc/GMT-8"))
        d = pd.concat([d.iloc[:pos], d.iloc[pos + 1:pos + 2], d.iloc[pos + 1:]])
    elif name == "weather_utc.epw":
        tz = 0.0
    elif name in ("weather_sentinels_few.epw", "weather_sentinels_many.epw"):
        n = 3 if name.endswith("few.epw") else 40
        noon = np.flatnonzero(d.index.hour == 12)[:n]
        d.iloc[noon, d.columns.get_loc("ghi")] = 9999
    elif name == "weather_above_extraterrestrial.epw":
        noon = np.flatnonzero(d.index.hour == 12)[:2]
        d.iloc[noon, d.columns.get_loc("ghi")] = 2500
    elif name == "weather_closure.epw":
        d["dni"] = np.round(d["dni"] * 1.3)
    elif name == "weather_night.epw":
        night = d["cosz"].to_numpy() < -0.3
        d.loc[night, "ghi"] = 60.0
        d.loc[night, "dhi"] = 60.0
    elif name != "weather_ok.epw":
        raise ValueError(f"unknown weather defect file {name}")
    ghi, dni, dhi = (d[c].round().astype(int).to_numpy() for c in ("ghi", "dni", "dhi"))
    lines = "".join(
        f"1990,{m},{dd},{h + 1},60,?,15.0,10.0,70,101325,0,0,300,{g},{n},{f},0,0,0,0,90,2.0,"
        "5,5,20,77777,9,999999999,20,0.1,0,88,0.2,0,1\n"
        for m, dd, h, g, n, f in zip(d.index.month, d.index.day, d.index.hour, ghi, dni, dhi,
                                     strict=True))
    path = out_dir / name
    path.write_text(EPW_HEADER.format(tz=tz) + lines, encoding="utf-8")
    return path


if __name__ == "__main__":
    main()
