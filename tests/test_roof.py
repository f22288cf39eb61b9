"""Roof kernel: hand-computable cases."""

from __future__ import annotations

import geopandas as gpd
import numpy as np
import pytest
import shapely
import yaml
from shapely import affinity
from shapely.geometry import box

from pipeline.config import PolicyConfig, RoofConfig
from pipeline.roof import (
    _latitude,
    _opened_area,
    band_lookup,
    capacity_kwp,
    inset_areas,
    ridge_planes,
    roof_potential,
    setback_and_opened_area,
    setback_area,
    solstice_row_gcr,
)

ROOF = dict(
    module_power_density_w_per_m2=200.0,
    setback_flat_m_by_min_height_m={0: 1.0, 24: 1.5},
    setback_pitched_m_by_min_height_m={0: 0.5},
    utilisation_flat_by_type={"default": 0.7, "factory": 0.8},
    utilisation_pitched_by_type={"default": 0.8}, min_array_area_m2=10.0,
    min_array_width_m=1.8, flat_tilt_deg=20.0, flat_azimuth_deg=180.0,
    flat_row_rule_declination_deg=-23.44, flat_row_rule_start_solar_h=9.0,
    flat_row_rule_end_solar_h=15.0, pitched_tilt_deg=25.0, pitched_gcr=1.0,
    pitched_min_azimuth_from_north_deg=67.5,
    roof_kind_default="flat", roof_kind_by_roof_shape={"gabled": "pitched", "flat": "flat"},
    roof_kind_by_tag_building={"house": "pitched"},
    roof_kind_rules=[{"name": "small_low_homes", "roof_kind": "pitched",
                      "building_types": ["residential"], "max_footprint_area_m2": 300.0,
                      "max_height_m": 12.0}],
)
POLICY = dict(coverage_share_by_type={"government": 0.5, "factory": 0.5, "other_public": 0.3},
              coverage_rule_types=["government", "school", "factory"], coverage_rule_share=0.5,
              coverage_rule_name="test")
X0, Y0 = 350_000.0, 3_452_000.0  # UTM 51N near Shanghai (about 31.19 N)


def frame(geoms, types, roof_shape=None, building=None, height=None):
    n = len(geoms)
    gdf = gpd.GeoDataFrame({
        "building_id": [f"t:{i}" for i in range(n)],
        "building_type": types,
        "tag_roof_shape": roof_shape or [None] * n,
        "tag_building": building or [None] * n,
        "height_m": height or [10.0] * n,
    }, geometry=[affinity.translate(g, X0, Y0) for g in geoms], crs="EPSG:32651")
    gdf["footprint_area_m2"] = gdf.area
    return gdf


def run(*args, **kwargs):
    return roof_potential(frame(*args, **kwargs), RoofConfig(**ROOF), PolicyConfig(**POLICY))


def test_setback_of_a_rectangle_keeps_the_inner_rectangle():
    g = gpd.GeoSeries([box(0, 0, 40, 25)], crs="EPSG:32651")
    assert setback_area(g, 1.0)[0] == pytest.approx(38 * 23)


def test_solstice_gcr_at_31_2n_matches_hand_calculation():
    # 09:00 solar time on 21 Dec at 31.2 N: hour angle -45 deg, declination -23.44 deg
    # sin(alt) = sin 31.2 sin -23.44 + cos 31.2 cos -23.44 cos 45 = -0.20606 + 0.55493
    #          = 0.34887 -> alt 20.42 deg, tan(alt) = 0.37225
    # cos(azimuth from south) = (sin alt sin lat - sin dec) / (cos alt cos lat) = 0.72166
    # shadow reach per unit height behind the row: 0.72166 / 0.37225 = 1.9386
    # GCR = 1 / (cos 20 + sin 20 * 1.9386) = 1 / (0.93969 + 0.66304) = 0.62393
    assert solstice_row_gcr(31.2, 20.0)[0] == pytest.approx(0.62393, abs=2e-4)
    # flat modules need no spacing; steeper rows and higher latitudes need more
    assert solstice_row_gcr(31.2, 0.0)[0] == 1.0
    assert solstice_row_gcr(31.2, 30.0)[0] < 0.62393 < solstice_row_gcr(25.0, 20.0)[0]


def test_flat_roof_capacity_uses_the_solstice_gcr():
    out = run([box(0, 0, 40, 25)], ["government"])
    r = out.iloc[0]
    assert r.roof_kind == "flat" and r.roof_kind_source == "default"
    assert r.setback_area_m2 == pytest.approx(874.0)
    assert r.usable_area_m2 == pytest.approx(874.0 * 0.7)
    assert r.gcr == pytest.approx(0.624, abs=0.002)  # latitude ~31.19 N
    assert r.capacity_kwp == pytest.approx(874.0 * 0.7 * r.gcr * 200 / 1000)
    # policy: 50% of the 1000 m2 footprint = 500 m2, below the usable 611.8 m2
    assert r.policy_area_m2 == pytest.approx(500.0)
    assert r.capacity_policy_kwp == pytest.approx(500 * r.gcr * 200 / 1000)
    assert r.tilt_deg == 20.0 and r.azimuth_deg == 180.0 and np.isnan(r.azimuth_2_deg)
    assert r.capacity_2_kwp == 0.0


def test_taller_buildings_get_the_wider_setback():
    out = run([box(0, 0, 40, 25)] * 2, ["government"] * 2, height=[23.9, 30.0])
    assert out.setback_m.tolist() == [1.0, 1.5]
    assert out.usable_area_m2.iloc[1] == pytest.approx(37 * 22 * 0.7)
    np.testing.assert_allclose(band_lookup(np.array([0, 24, 100, np.nan]), {0: 1, 24: 2}),
                               [1, 2, 2, 1])


def test_pitched_roof_planes_get_the_right_azimuths():
    ew = box(0, 0, 40, 10)  # ridge east-west: planes face south and north
    ns = box(0, 0, 10, 40)  # ridge north-south: planes face east and west
    diag = affinity.rotate(ew, 45, origin="centroid")  # ridge NE-SW: planes SE and NW
    _, _, az_a, az_b = ridge_planes(gpd.GeoSeries([ew, ns, diag], crs="EPSG:32651"))
    assert sorted(np.round([az_a[0], az_b[0]], 6)) == [0, 180]
    assert sorted(np.round([az_a[1], az_b[1]], 6)) == [90, 270]
    assert sorted(np.round([az_a[2], az_b[2]], 6)) == [135, 315]
    out = run([ew, ns, diag], ["other"] * 3, roof_shape=["gabled"] * 3)
    # east-west ridge: only the south plane (the north one is excluded)
    assert out.azimuth_deg.iloc[0] == pytest.approx(180) and np.isnan(out.azimuth_2_deg.iloc[0])
    plane = 39 * 4 / np.cos(np.radians(25)) * 0.8  # 40 x 5 half, 0.5 m setback, on the slope
    assert out.usable_area_m2.iloc[0] == pytest.approx(plane)
    assert out.capacity_kwp.iloc[0] == pytest.approx(plane * 200 / 1000)
    # north-south ridge: east and west planes, both kept
    assert sorted([out.azimuth_deg.iloc[1], out.azimuth_2_deg.iloc[1]]) == pytest.approx([90, 270])
    assert out.usable_area_m2.iloc[1] == pytest.approx(2 * plane)
    assert out.capacity_2_kwp.iloc[1] == pytest.approx(plane * 200 / 1000)
    # diagonal ridge: the south-east plane only (north-west is within 67.5 deg of north)
    assert out.azimuth_deg.iloc[2] == pytest.approx(135) and np.isnan(out.azimuth_2_deg.iloc[2])
    assert (out.tilt_deg == 25).all() and (out.gcr == 1).all()


def test_type_tags_and_rules_pick_the_roof_kind():
    geoms = [box(0, 0, 40, 25), box(0, 0, 40, 25), box(0, 0, 40, 25), box(0, 0, 15, 10),
             box(0, 0, 15, 10)]
    out = run(geoms, ["factory", "other", "other", "residential", "residential"],
              roof_shape=[None, "gabled", None, None, None],
              building=[None, None, "house", None, None],
              height=[10.0, 10.0, 10.0, 9.0, 30.0])
    assert out.roof_kind.tolist() == ["flat", "pitched", "pitched", "pitched", "flat"]
    assert out.roof_kind_source.tolist() == ["default", "tag_roof_shape", "tag_building",
                                             "rule:small_low_homes", "default"]
    assert out.usable_area_m2.iloc[0] == pytest.approx(874 * 0.8)
    assert out.capacity_policy_kwp.iloc[1] == 0.0  # 'other' has no coverage mandate


def test_small_and_slender_roofs_are_unsuitable_with_a_reason():
    out = run([box(0, 0, 5, 5), box(0, 0, 1.5, 30), box(0, 0, 3.5, 30)], ["school"] * 3)
    assert (out.usable_area_m2 == 0).all() and (~out.suitable).all()
    assert "min_array_area_m2" in out.unsuitable_reason.iloc[0]
    assert out.unsuitable_reason.iloc[1] == "nothing left inside the edge setback"
    # 1.5 m left inside the 1 m setback: narrower than a row of modules (1.8 m)
    assert "min_array_width_m" in out.unsuitable_reason.iloc[2]


def test_empty_frame_gives_the_columns():
    out = run([], [])
    assert len(out) == 0 and {"capacity_kwp", "azimuth_2_deg", "gcr"} <= set(out.columns)


def test_capacity_kwp_units():
    np.testing.assert_allclose(capacity_kwp(np.array([5.0, 0.0]), 200.0), [1.0, 0.0])


def test_default_config_roof_section_validates(root):
    raw = yaml.safe_load((root / "configs/shanghai.yaml").read_text(encoding="utf-8"))
    RoofConfig(**raw["roof"])
    PolicyConfig(**raw["policy"])


# --- fast paths against the exact (slow) paths ---------------------------------------------

def _geos_inside_opened(geoms, setback, width):
    """The GEOS path: a mitred inward buffer, and the opening of :func:`_opened_area`."""
    setback = np.broadcast_to(np.asarray(setback, dtype=float), (len(geoms),))
    inside = shapely.area(shapely.buffer(geoms, -setback, join_style="mitre", mitre_limit=5.0))
    return inside, _opened_area(geoms, setback, width)


X0, Y0 = 350_000.0, 3_452_000.0  # working-CRS magnitudes: the closed form must not cancel


def _hand_made():
    sq = box(0, 0, 40, 25)
    shallow = shapely.Polygon([(0, 0), (20, 0.001), (40, 0), (40, 25), (0, 25)])
    geoms = {
        "rectangle": sq,
        "rotated rectangle": affinity.rotate(sq, 33, origin=(0, 0)),
        "convex quadrilateral": shapely.Polygon([(0, 0), (40, 3), (35, 25), (2, 20)]),
        "clockwise pentagon": shapely.Polygon([(0, 0), (0, 20), (15, 30), (30, 20), (30, 0)]),
        "triangle": shapely.Polygon([(0, 0), (30, 0), (10, 25)]),
        "sliver (mitre limit)": shapely.Polygon([(0, 0), (60, 0), (60, 8)]),
        "shallow vertex": shallow,
        "L-shape": shapely.Polygon([(0, 0), (30, 0), (30, 10), (10, 10), (10, 30), (0, 30)]),
        # two 20 m squares joined by a 3 m wide corridor: the moved ring collides in it
        "dumbbell": shapely.Polygon([(0, 0), (20, 0), (20, 8.5), (40, 8.5), (40, 0), (60, 0),
                                     (60, 20), (40, 20), (40, 11.5), (20, 11.5), (20, 20),
                                     (0, 20)]),
        "comb (many vertices)": shapely.Polygon(
            [(0, 0), (60, 0), (60, 30)] + [(60 - 6 * k - dx, 30 - dy) for k in range(9)
                                           for dx, dy in ((0, 0), (0, 10), (3, 10), (3, 0))]
            + [(0, 30)]),
        "hole": sq.difference(box(10, 10, 20, 15)),
        "eroded completely": box(0, 0, 3, 3),
        "small triangle": shapely.Polygon([(0, 0), (4, 0), (1, 3)]),
        "multipolygon": shapely.MultiPolygon([box(0, 0, 10, 10), box(20, 0, 30, 10)]),
        "empty": shapely.Polygon(),
    }
    names = list(geoms)
    return names, np.array([affinity.translate(geoms[k], X0, Y0) for k in names], dtype=object)


@pytest.mark.parametrize("width", [0.0, 1.8])
@pytest.mark.parametrize("setback", [0.0, 0.5, 1.0, 2.5])
def test_closed_form_setback_equals_geos_on_hand_made(setback, width):
    names, geoms = _hand_made()
    setback_m = np.full(len(geoms), setback)
    _, _, exact = inset_areas(geoms, setback_m, width)
    got = dict(zip(names, exact, strict=True))
    assert all(got[k] for k in names[:5]), got  # convex: the closed form
    assert got["L-shape"] or setback + width / 2 >= 2.5, got  # reflex corner, no collision
    assert not any(got[k] for k in ("hole", "multipolygon", "empty", "comb (many vertices)"))
    if setback + width / 2 > 1.5:
        assert not got["dumbbell"]  # the corridor closes: GEOS decides
    # GEOS drops the nearly straight corner from its input; the closed form keeps it exactly
    assert got["shallow vertex"], got
    if width > 0:
        assert not got["sliver (mitre limit)"]  # GEOS bevels the dilation there
    inside, opened = setback_and_opened_area(geoms, setback_m, width)
    ref_inside, ref_opened = _geos_inside_opened(geoms, setback_m, width)
    np.testing.assert_allclose(inside, ref_inside, rtol=1e-9, atol=1e-6)
    np.testing.assert_allclose(opened, ref_opened, rtol=1e-9, atol=1e-6)


def test_closed_form_setback_equals_geos_on_sample_footprints(sample):
    """Within 1e-6 of the area: GEOS simplifies nearly straight corners of its input."""
    from bench.generate import load_templates

    rng = np.random.default_rng(3)
    templates = load_templates(sample)[0]
    geoms = np.array([affinity.translate(affinity.rotate(g, a, origin=(0, 0)), X0, Y0)
                      for g, a in zip(templates, rng.uniform(0, 360, len(templates)),
                                      strict=True)], dtype=object)
    for setback, width in ((1.0, 1.8), (1.5, 1.8), (0.5, 0.0), (2.0, 3.0)):
        s = rng.uniform(0.5, 1.5, len(geoms)) * setback
        _, _, exact = inset_areas(geoms, s, width)
        assert exact.mean() > 0.5  # the fast path is really taken
        inside, opened = setback_and_opened_area(geoms, s, width)
        ref_inside, ref_opened = _geos_inside_opened(geoms, s, width)
        np.testing.assert_allclose(inside, ref_inside, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(opened, ref_opened, rtol=1e-6, atol=1e-6)
    # the pitched planes (halves of the footprints) too
    pa, pb, _, _ = ridge_planes(gpd.GeoSeries(geoms[:300], crs="EPSG:32651"))
    planes = np.concatenate([pa, pb])
    inside, opened = setback_and_opened_area(planes, 0.5, 1.8)
    ref_inside, ref_opened = _geos_inside_opened(planes, 0.5, 1.8)
    np.testing.assert_allclose(inside, ref_inside, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(opened, ref_opened, rtol=1e-6, atol=1e-6)


def test_closed_form_setback_agrees_with_geos_at_nearly_straight_corners(sample):
    """GEOS simplifies nearly straight corners of its input; the areas still agree within 1e-6."""
    from bench.generate import load_templates

    rng = np.random.default_rng(0)
    rings = []
    for g in load_templates(sample)[0]:
        c = np.asarray(g.exterior.coords)[:-1]
        out = []
        for a, b in zip(c, np.roll(c, -1, axis=0), strict=True):
            out.append(a)
            normal = np.array([a[1] - b[1], b[0] - a[0]])
            if rng.random() < 0.5 and np.hypot(*normal) > 0:  # a vertex up to 8 cm off the edge
                off = rng.choice([-1.0, 1.0]) * rng.uniform(0.0, 0.08)
                out.append(a + rng.uniform(0.2, 0.8) * (b - a) + off * normal / np.hypot(*normal))
        p = shapely.Polygon(out)
        if p.is_valid:
            rings.append(affinity.translate(affinity.rotate(p, rng.uniform(0, 360),
                                                            origin=(0, 0)), X0, Y0))
    geoms = np.array(rings, dtype=object)
    for setback, width in ((0.5, 0.0), (1.0, 1.8), (3.0, 3.0)):
        s = rng.uniform(0.7, 1.3, len(geoms)) * setback
        inside, opened, exact = inset_areas(geoms, s, width)
        assert exact.mean() > 0.3  # the fast path is really taken
        ref_inside, ref_opened = _geos_inside_opened(geoms[exact], s[exact], width)
        np.testing.assert_allclose(inside[exact], ref_inside, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(opened[exact], ref_opened, rtol=1e-6, atol=1e-6)


def _gcr_reference(latitude_deg, tilt_deg, row_azimuth_deg=180.0, declination_deg=-23.44,
                   start_solar_h=9.0, end_solar_h=15.0):
    """The row rule with the sun azimuth through arctan2 (the former implementation)."""
    lat = np.radians(np.atleast_1d(np.asarray(latitude_deg, dtype=float)))[:, None]
    tilt = np.radians(np.asarray(tilt_deg, dtype=float))
    omega = np.radians(15.0 * (np.linspace(start_solar_h, end_solar_h, 25)[None, :] - 12.0))
    dec = np.radians(declination_deg)
    sin_alt = np.sin(lat) * np.sin(dec) + np.cos(lat) * np.cos(dec) * np.cos(omega)
    az = np.degrees(np.arctan2(np.sin(omega), np.cos(omega) * np.sin(lat)
                               - np.tan(dec) * np.cos(lat))) + 180.0
    with np.errstate(divide="ignore", invalid="ignore"):
        tan_alt = sin_alt / np.sqrt(1.0 - sin_alt ** 2)
        reach = np.maximum(np.cos(np.radians(az - row_azimuth_deg)), 0.0) / tan_alt
    reach = np.where(sin_alt > 0, reach, np.inf).max(axis=1)
    with np.errstate(invalid="ignore"):
        gcr = 1.0 / (np.cos(tilt) + np.sin(tilt) * reach)
    gcr = np.where(np.isinf(reach) & (np.broadcast_to(tilt, reach.shape) > 0), np.nan, gcr)
    return np.where(np.broadcast_to(tilt, reach.shape) == 0, 1.0, gcr)


def test_solstice_gcr_equals_the_arctan2_form_in_blocks():
    rng = np.random.default_rng(5)
    lat = rng.uniform(-10, 75, 9000)  # more than one block; NaN above ~66 N
    tilt = rng.uniform(0, 40, 9000)
    tilt[:50] = 0.0
    for row_az, start, end in ((180.0, 9.0, 15.0), (150.0, 8.0, 15.5)):
        got = solstice_row_gcr(lat, tilt, row_az, -23.44, start, end)
        ref = _gcr_reference(lat, tilt, row_az, -23.44, start, end)
        assert np.isnan(got).sum() > 0
        np.testing.assert_allclose(got, ref, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(solstice_row_gcr(lat, 20.0), _gcr_reference(lat, 20.0),
                               rtol=1e-12, atol=1e-14)


def test_latitude_equals_to_crs():
    g = gpd.GeoSeries([box(X0, Y0, X0 + 30, Y0 + 20), box(300_000, 3_500_000, 300_050, 3_500_010)],
                      crs="EPSG:32651")
    ref = gpd.GeoSeries(shapely.centroid(g.array), crs=g.crs).to_crs("EPSG:4326").y.to_numpy()
    np.testing.assert_allclose(_latitude(g), ref, rtol=0, atol=1e-12)
    assert len(_latitude(g.iloc[:0])) == 0


def test_roof_writes_the_obstacle_columns_of_its_footprints():
    from pipeline.shading import OBSTACLE_COLUMNS, obstacle_columns

    # a flat and a pitched roof: both take the shared envelope and centroid
    b = frame([box(0, 0, 40, 25), box(100, 0, 130, 12)], ["factory", "factory"],
              roof_shape=["flat", "gabled"])
    out = roof_potential(b, RoofConfig(**ROOF), PolicyConfig(**POLICY))
    ref = obstacle_columns(np.asarray(b.geometry.array, dtype=object))
    for col in OBSTACLE_COLUMNS:
        np.testing.assert_array_equal(out[col].to_numpy(), ref[col])
    np.testing.assert_allclose(out["centroid_x_m"], [X0 + 20, X0 + 115])
    np.testing.assert_allclose(out["centroid_y_m"], [Y0 + 12.5, Y0 + 6])
    # and the footprints' summaries, which the report reads instead of decoding them
    from pipeline.changes import geometry_keys

    assert out["footprint_key"].tolist() == list(geometry_keys(b.geometry))
    np.testing.assert_array_equal(out[["footprint_minx_m", "footprint_miny_m",
                                       "footprint_maxx_m", "footprint_maxy_m"]].to_numpy(),
                                  [[X0, Y0, X0 + 40, Y0 + 25], [X0 + 100, Y0, X0 + 130, Y0 + 12]])
