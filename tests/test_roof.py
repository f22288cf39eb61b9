"""Roof kernel: hand-computable cases."""

from __future__ import annotations

import geopandas as gpd
import numpy as np
import pytest
import yaml
from shapely.geometry import box

from pipeline.config import PolicyConfig, RoofConfig
from pipeline.roof import capacity_kwp, roof_potential, setback_area

ROOF = dict(
    module_power_density_w_per_m2=200.0, setback_flat_m=1.0, setback_pitched_m=0.5,
    utilisation_flat_by_type={"default": 0.7, "factory": 0.8},
    utilisation_pitched_by_type={"default": 0.5}, min_array_area_m2=10.0,
    flat_tilt_deg=20.0, flat_azimuth_deg=180.0, flat_gcr=0.6,
    pitched_tilt_deg=25.0, pitched_azimuth_deg=180.0, pitched_gcr=1.0,
    roof_kind_default="flat", roof_kind_by_roof_shape={"gabled": "pitched", "flat": "flat"},
    roof_kind_by_tag_building={"house": "pitched"},
)
POLICY = dict(coverage_share_by_type={"government": 0.5, "factory": 0.5, "other_public": 0.3},
              coverage_rule_types=["government", "school", "factory"], coverage_rule_share=0.5,
              coverage_rule_name="test")


def frame(geoms, types, roof_shape=None, building=None):
    n = len(geoms)
    gdf = gpd.GeoDataFrame({
        "building_id": [f"t:{i}" for i in range(n)],
        "building_type": types,
        "tag_roof_shape": roof_shape or [None] * n,
        "tag_building": building or [None] * n,
    }, geometry=geoms, crs="EPSG:32651")
    gdf["footprint_area_m2"] = gdf.area
    return gdf


def test_setback_of_a_rectangle_keeps_the_inner_rectangle():
    g = gpd.GeoSeries([box(0, 0, 40, 25)], crs="EPSG:32651")
    assert setback_area(g, 1.0)[0] == pytest.approx(38 * 23)


def test_flat_roof_capacity_is_area_times_density_times_gcr():
    out = roof_potential(frame([box(0, 0, 40, 25)], ["government"]), RoofConfig(**ROOF),
                         PolicyConfig(**POLICY))
    r = out.iloc[0]
    assert r.roof_kind == "flat" and r.roof_kind_source == "default"
    assert r.setback_area_m2 == pytest.approx(874.0)
    assert r.usable_area_m2 == pytest.approx(874.0 * 0.7)
    assert r.capacity_kwp == pytest.approx(874.0 * 0.7 * 0.6 * 200 / 1000)  # 73.416 kWp
    # policy: 50% of the 1000 m2 footprint = 500 m2, below the usable 611.8 m2
    assert r.policy_area_m2 == pytest.approx(500.0)
    assert r.capacity_policy_kwp == pytest.approx(500 * 0.6 * 200 / 1000)
    assert r.tilt_deg == 20.0 and r.azimuth_deg == 180.0 and r.gcr == 0.6


def test_type_and_roof_kind_pick_the_utilisation():
    geoms = [box(0, 0, 40, 25)] * 3
    out = roof_potential(frame(geoms, ["factory", "other", "other"], roof_shape=[None, "gabled",
                         None], building=[None, None, "house"]), RoofConfig(**ROOF),
                         PolicyConfig(**POLICY))
    assert out.usable_area_m2.iloc[0] == pytest.approx(874 * 0.8)
    pitched_area = 39 * 24 * 0.5
    assert out.usable_area_m2.iloc[1] == pytest.approx(pitched_area)
    assert out.roof_kind_source.tolist() == ["default", "tag_roof_shape", "tag_building"]
    assert out.capacity_kwp.iloc[2] == pytest.approx(pitched_area * 1.0 * 200 / 1000)
    assert out.capacity_policy_kwp.iloc[1] == 0.0  # 'other' has no coverage mandate


def test_small_roofs_are_unsuitable_with_a_reason():
    out = roof_potential(frame([box(0, 0, 5, 5), box(0, 0, 1.5, 30)], ["school", "school"]),
                         RoofConfig(**ROOF), PolicyConfig(**POLICY))
    assert (out.usable_area_m2 == 0).all() and (~out.suitable).all()
    assert "min_array_area_m2" in out.unsuitable_reason.iloc[0]
    assert out.unsuitable_reason.iloc[1] == "nothing left inside the edge setback"


def test_empty_frame_gives_the_columns():
    out = roof_potential(frame([], []), RoofConfig(**ROOF), PolicyConfig(**POLICY))
    assert len(out) == 0 and "capacity_kwp" in out.columns


def test_capacity_kwp_units():
    np.testing.assert_allclose(capacity_kwp(np.array([5.0, 0.0]), 200.0), [1.0, 0.0])


def test_default_config_roof_section_validates(root):
    raw = yaml.safe_load((root / "configs/shanghai.yaml").read_text(encoding="utf-8"))
    RoofConfig(**raw["roof"])
    PolicyConfig(**raw["policy"])
