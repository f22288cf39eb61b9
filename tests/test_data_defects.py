"""Kernels for bad data: attribute parsing, GCJ-02, CRS extent, dedup; property tests."""

from __future__ import annotations

import geopandas as gpd
import numpy as np
import pandas as pd
import pytest
import shapely
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from shapely.geometry import LineString, Point, Polygon, box

from pipeline.attributes import (
    check_attribute_ranges,
    chinese_numeral,
    clean_text,
    parse_number,
    parse_numbers,
)
from pipeline.config import PolicyConfig, RoofConfig
from pipeline.coords import check_extent, gcj02_evidence, gcj02_to_wgs84, wgs84_to_gcj02
from pipeline.dedup import find_duplicates, richness
from pipeline.errors import InputError
from pipeline.glossary import ATTRIBUTE_COLUMNS
from pipeline.ingest import assign_districts, normalise_footprints
from pipeline.pvyield import join_yield, orientation_classes
from pipeline.roof import roof_potential

FAST = settings(max_examples=15, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


# --------------------------------------------------------------------------- attributes
@pytest.mark.parametrize("value, expected, note", [
    (5, 5.0, None), ("5", 5.0, None), ("5;6", 6.0, "several values"), ("3-4", 4.0, "a range"),
    ("3~4", 4.0, "a range"), ("五", 5.0, "Chinese numeral"), ("十二层", 12.0, "Chinese numeral"),
    ("12F", 12.0, "unit dropped"), ("12 floors", 12.0, "unit dropped"), ("１２", 12.0,
                                                                          "full-width"),
    ("abc", np.nan, "not a number"), ("", np.nan, None), (None, np.nan, None),
])
def test_parse_levels(value, expected, note):
    got, how = parse_number(value, "levels")
    assert (np.isnan(got) and np.isnan(expected)) or got == expected
    assert (how is None) if note is None else (note in how)


@pytest.mark.parametrize("value, expected", [
    ("30 m", 30.0), ("30m", 30.0), ("100 ft", 30.48), ("45米", 45.0), ("12.5", 12.5),
])
def test_parse_heights(value, expected):
    assert parse_number(value, "height")[0] == pytest.approx(expected)


def test_chinese_numerals():
    texts = ("一", "十", "十二", "二十三", "一百零五", "二三", "x")
    assert [chinese_numeral(t) for t in texts] == [1, 10, 12, 23, 105, None, None]


def test_parse_numbers_notes_only_what_is_not_a_plain_number():
    values, notes = parse_numbers(pd.Series([3, "4", "5;6", None, "x"], dtype=object), "levels",
                                  "levels_attr")
    assert values[:3].tolist() == [3.0, 4.0, 6.0] and np.isnan(values[3:]).all()
    assert notes[:2].tolist() == [None, None] and notes[3] is None
    assert notes[2].startswith("levels_attr: '5;6' read as 6") and "null" in notes[4]


def test_range_check_nulls_absurd_values_with_a_note():
    part = pd.DataFrame({"height_attr_m": [632.0, 5000.0, -3.0, np.nan],
                         "levels_attr": [128.0, 2.0, 500.0, 0.0],
                         "attribute_issues": [None, "x", None, None]})
    out = check_attribute_ranges(part, 700.0, 150.0)
    assert out.height_attr_m.tolist()[:1] == [632.0] and out.height_attr_m[1:].isna().all()
    assert out.levels_attr.tolist()[:2] == [128.0, 2.0] and np.isnan(out.levels_attr[2])
    assert out.levels_attr[3] == 0.0
    assert out.attribute_issues[0] is None and out.attribute_issues[3] is None
    assert out.attribute_issues[1].startswith("x; height_attr_m: 5000 m")
    assert "height_attr_m: -3" in out.attribute_issues[2] and "levels_attr: 500" in \
        out.attribute_issues[2]


def test_text_repairs_and_notes():
    gbk = "武宁中学".encode("gbk").decode("latin-1")
    utf = "上海中学".encode().decode("latin-1")
    text, notes = clean_text(pd.Series([gbk, "Café", "a\ufffdb", None]), "none", "name")
    assert text[:2].tolist() == [gbk, "Café"] and text[2:].isna().all()
    assert "looks like '武宁中学'" in notes[0] and notes[1] is None
    assert "undecodable" in notes[2]
    text, notes = clean_text(pd.Series([gbk, utf, "ok"]), "utf8_or_gbk_read_as_latin1", "name")
    assert text.tolist() == ["武宁中学", "上海中学", "ok"] and list(notes) == [None] * 3


# --------------------------------------------------------------------------- coordinates
def test_gcj02_round_trip_and_size_of_the_shift():
    lon, lat = np.array([121.4737, 121.5]), np.array([31.2304, 31.1])
    glon, glat = wgs84_to_gcj02(lon, lat)
    # in Shanghai the shift is a few hundred metres (east ~ +0.0045 deg, south ~ -0.002 deg)
    dx = (glon - lon) * 111_320 * np.cos(np.radians(lat))
    dy = (glat - lat) * 111_320
    assert ((np.hypot(dx, dy) > 300) & (np.hypot(dx, dy) < 800)).all()
    wlon, wlat = gcj02_to_wgs84(glon, glat)
    assert np.abs(wlon - lon).max() < 1e-9 and np.abs(wlat - lat).max() < 1e-9
    # outside China nothing moves
    assert wgs84_to_gcj02(np.array([2.35]), np.array([48.85]))[0][0] == 2.35


def districts_utm():
    d = gpd.GeoDataFrame({"district_name": ["甲区"], "district_adcode": ["1"]},
                         geometry=[box(121.40, 31.20, 121.43, 31.23)], crs="EPSG:4326")
    return d.to_crs("EPSG:32651")


def test_extent_check_names_the_fitting_reading():
    good = gpd.GeoDataFrame(geometry=[box(121.41, 31.21, 121.4103, 31.2102)], crs="EPSG:4326")
    check_extent(good, "f.geojson", "s", districts_utm(), 1000.0)
    swapped = good.set_geometry(good.geometry.map(
        lambda g: shapely.transform(g, lambda c: c[:, ::-1])))
    with pytest.raises(InputError, match="swapped"):
        check_extent(swapped, "f.geojson", "s", districts_utm(), 1000.0)
    metres = good.to_crs("EPSG:32651").set_crs("EPSG:4326", allow_override=True)
    with pytest.raises(InputError, match="projected metres"):
        check_extent(metres, "f.geojson", "s", districts_utm(), 1000.0)
    degrees = good.set_crs("EPSG:32651", allow_override=True)
    with pytest.raises(InputError, match=r"f.geojson \[crs\].*degrees declared"):
        check_extent(degrees, "f.geojson", "s", districts_utm(), 1000.0)


def test_gcj02_evidence_counts_matches():
    pts = [(121.405 + k * 0.0015, 31.222) for k in range(5)]
    wgs = gpd.GeoDataFrame(geometry=[box(x, y, x + 0.0003, y + 0.0002) for x, y in pts],
                           crs="EPSG:4326")

    def to_gcj(g):
        return shapely.transform(g, lambda c: np.column_stack(wgs84_to_gcj02(c[:, 0], c[:, 1])))

    gcj = wgs.set_geometry(wgs.geometry.map(to_gcj))
    a, b = gcj.to_crs("EPSG:32651"), wgs.to_crs("EPSG:32651")
    assert gcj02_evidence(a, b) == (0, 5)
    assert gcj02_evidence(b, b)[0] == 5


# --------------------------------------------------------------------------- dedup
def frame(geoms, **cols):
    n = len(geoms)
    data = {c: pd.Series([pd.NA] * n, dtype="object") for c in ATTRIBUTE_COLUMNS}
    data.update({k: pd.Series(v, dtype="object") for k, v in cols.items()})
    gdf = gpd.GeoDataFrame(data, geometry=list(geoms), crs="EPSG:32651")
    gdf["footprint_area_m2"] = gdf.area
    gdf["building_id"] = [f"{s}:{i}" for i, s in enumerate(gdf["source"])]
    return gdf


def test_dedup_keeps_the_richer_record_and_names_it():
    geoms = [box(0, 0, 30, 20), box(1, 0, 31, 20), box(100, 0, 130, 20), box(0, 0, 1000, 1000)]
    f = frame(geoms, source=["a", "b", "a", "b"], tag_building=["yes", "school", "yes", "yes"],
              name=[None, "某中学", None, None])
    assert richness(f).tolist() == [0, 2, 0, 0]
    d = find_duplicates(f, 0.5, 0.25, ["a", "b"])
    # box 1 overlaps box 0 by 29/30; box 3 contains all but is > 4x larger: not a duplicate
    assert d.index.tolist() == [0] and d.kept_id.tolist() == ["b:1"]
    assert d.overlap_share.iloc[0] == pytest.approx(29 / 30)


def test_dedup_chain_keeps_non_overlapping_ends():
    # a - b - c in a row: a overlaps b, b overlaps c, a and c do not; b is poorest
    geoms = [box(0, 0, 10, 10), box(4, 0, 14, 10), box(8, 0, 18, 10)]
    f = frame(geoms, source=["s"] * 3, name=["A", None, "C"])
    d = find_duplicates(f, 0.5, 0.25, ["s"])
    assert d.index.tolist() == [1]


# --------------------------------------------------------------------------- properties
def rect_strategy():
    return st.builds(lambda x, y, w, h: box(x, y, x + w, y + h),
                     st.floats(0, 500), st.floats(0, 500), st.floats(0.5, 200), st.floats(0.5, 200))


def roof_cfg(density: float) -> RoofConfig:
    from tests.test_roof import ROOF

    return RoofConfig(**{**ROOF, "module_power_density_w_per_m2": density})


POLICY = PolicyConfig(coverage_share_by_type={"school": 0.5}, coverage_rule_types=["school"],
                      coverage_rule_share=0.5, coverage_rule_name="test")


@FAST
@given(st.lists(st.tuples(rect_strategy(), st.sampled_from([None, "gabled", "flat"]),
                          st.sampled_from(["school", "unknown"])), min_size=1, max_size=8),
       st.floats(50, 300), st.floats(1.0, 2.0), st.floats(0, 2000))
def test_roof_and_energy_properties(rows, density, factor, specific_yield):
    geoms, shapes, types = zip(*rows, strict=True)
    part = gpd.GeoDataFrame({"tag_roof_shape": list(shapes), "tag_building": ["yes"] * len(rows),
                             "building_type": list(types)}, geometry=list(geoms),
                            crs="EPSG:32651")
    part["footprint_area_m2"] = part.area
    part["height_m"] = 10.0
    lo = roof_potential(part, roof_cfg(density), POLICY)
    hi = roof_potential(part, roof_cfg(min(density * factor, 400)), POLICY)
    assert (lo.usable_area_m2 <= lo.footprint_area_m2 + 1e-9).all()
    assert (lo.policy_area_m2 <= lo.usable_area_m2 + 1e-9).all()
    assert (lo.capacity_kwp >= 0).all() and (lo.capacity_policy_kwp >= 0).all()
    assert (hi.capacity_kwp >= lo.capacity_kwp - 1e-9).all()
    table = orientation_classes(lo, 1.0).assign(specific_yield_kwh_per_kwp=specific_yield)
    e_lo, e_hi = join_yield(lo, table, 1.0), join_yield(hi, table, 1.0)
    assert (e_lo.energy_mwh_per_year >= 0).all()
    assert (e_hi.energy_mwh_per_year >= e_lo.energy_mwh_per_year - 1e-9).all()


def feature_strategy():
    x = st.floats(-300, 300)
    ok = st.builds(lambda x, y, w: box(x, y, x + w, y + w * 0.7), x, x, st.floats(1, 80))
    bowtie = st.builds(lambda x, y: Polygon([(x, y), (x + 20, y + 20), (x + 20, y), (x, y + 20)]),
                       x, x)
    flat = st.builds(lambda x, y: Polygon([(x, y), (x + 5, y), (x + 10, y)]), x, x)
    line = st.builds(lambda x, y: LineString([(x, y), (x + 10, y + 5)]), x, x)
    point = st.builds(Point, x, x)
    far = st.builds(lambda x: box(x + 5000, 0, x + 5030, 20), x)
    huge = st.builds(lambda x: box(x, 0, x + 3000, 3000), x)
    z = st.builds(lambda x, y: Polygon([(x, y, 3), (x + 20, y, 3), (x + 20, y + 20, 3)]), x, x)
    return st.one_of(ok, ok, bowtie, flat, line, point, far, huge, z, st.none(),
                     st.just(Polygon()))


@FAST
@given(st.lists(st.tuples(feature_strategy(), st.sampled_from([None, "yes", "school"])),
                max_size=25))
def test_accounting_holds_for_any_mix_of_features(rows):
    geoms = [g for g, _ in rows]
    n = len(rows)
    data = {c: pd.Series([pd.NA] * n, dtype="object") for c in ATTRIBUTE_COLUMNS}
    data["tag_building"] = pd.Series([b for _, b in rows], dtype="object")
    data["source"] = "t"
    data["source_id"] = pd.Series([str(i) for i in range(n)], dtype="object")
    part = gpd.GeoDataFrame(data, geometry=geoms, crs="EPSG:32651")
    out = normalise_footprints(part, "EPSG:32651", 20.0, 1e6, "tag_building_not_null")
    assert len(out) == n and out.index.equals(part.index)
    assert set(out.role) <= {"building", "area", "poi", "rejected"}
    # a building has no reason; everything else has one
    assert (out.reason.isna() == out.role.eq("building")).all()
    b = out[out.role.eq("building")].copy()
    b["building_id"] = "t:" + b["source_id"]
    assert b.geometry.is_valid.all() and not b.geometry.has_z.any()
    assert ((b.footprint_area_m2 >= 20.0) & (b.footprint_area_m2 <= 1e6)).all()
    districts = gpd.GeoDataFrame({"district_name": ["d"], "district_adcode": ["1"]},
                                 geometry=[box(-400, -400, 400, 400)], crs="EPSG:32651")
    located = assign_districts(b, districts)
    dups = find_duplicates(located[located.district_name.notna()], 0.5, 0.25, ["t"])
    kept = located.district_name.notna() & ~located.index.isin(dups.index)
    rejected_later = (~kept).sum()
    assert kept.sum() + rejected_later + (~out.role.eq("building")).sum() == n
    assert set(dups.kept_id) <= set(located.loc[kept[kept].index, "building_id"])
