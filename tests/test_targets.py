"""Path to each target: ranking, existing PV, town split, CO2, by hand."""

from __future__ import annotations

import itertools

import geopandas as gpd
import numpy as np
import pandas as pd
import pytest
from shapely.geometry import Point, box

from pipeline.config import TargetConfig
from pipeline.errors import InputError
from pipeline.report import NOT_REACHABLE, REACHABLE, target_table
from pipeline.targets import (
    OUTSIDE_TOWNS,
    ExistingPvConfig,
    PlanConfig,
    TownsConfig,
    assign_towns,
    co2_avoided_t,
    existing_toward_targets,
    locate_existing_pv,
    parse_period,
    plan_targets,
    priority_types,
    pv_roof_pairs,
    rank_roofs,
    read_existing_pv,
    read_towns,
    remaining_mw,
    roofs_to_target,
    subtract_existing_pv,
    system_roof_totals,
    target_plan,
    town_split,
)

CRS = "EPSG:32651"
PRIORITY = ["government", "school", "hospital", "factory", "commercial", "unknown"]


def roofs():
    return pd.DataFrame({
        "building_id": list("abcdefgh"),
        "district_name": ["A"] * 8,
        "building_type": ["factory", "school", "government", "commercial", "factory",
                          "unknown", "hospital", "school"],
        "capacity_kwp": [900.0, 300.0, 100.0, 500.0, 0.0, 700.0, 250.0, 300.0],
        "specific_yield_kwh_per_kwp": [1000.0, 1010.0, 990.0, 1005.0, np.nan, 1000.0,
                                       1020.0, 995.0],
    })


def test_parse_period():
    assert parse_period("2024") == (2024, 2024)
    assert parse_period("2021-2025") == (2021, 2025)
    with pytest.raises(ValueError, match="not a year"):
        parse_period("next year")


def test_rank_by_capacity_type_and_yield():
    r = rank_roofs(roofs(), "capacity", PRIORITY)
    # zero-capacity roof e is left out; ties (b, h at 300) broken by id
    assert r["building_id"].tolist() == ["a", "f", "d", "b", "h", "g", "c"]
    assert r["priority_rank"].tolist() == list(range(1, 8))
    assert r["cumulative_mw"].tolist() == pytest.approx(
        np.cumsum([900, 700, 500, 300, 300, 250, 100]) / 1000)
    t = rank_roofs(roofs(), "type_priority", PRIORITY)
    assert t["building_id"].tolist() == ["c", "b", "h", "g", "a", "d", "f"]
    y = rank_roofs(roofs(), "specific_yield", PRIORITY)
    assert y["building_id"].tolist() == ["g", "b", "d", "a", "f", "h", "c"]


@pytest.mark.parametrize("required_mw", [0.05, 0.9, 1.0, 1.6, 2.1, 3.0, 5.0])
def test_capacity_order_reaches_target_with_fewest_buildings(required_mw):
    """Brute force: no smaller set of roofs reaches the target."""
    r = rank_roofs(roofs(), "capacity", PRIORITY)
    chosen = roofs_to_target(r, required_mw)
    cap = r["capacity_kwp"].to_numpy() / 1000
    if cap.sum() < required_mw:
        assert chosen.all()  # cannot reach it: every roof, and the report says so
        return
    assert cap[chosen].sum() >= required_mw - 1e-12
    fewest = min(k for k in range(1, len(cap) + 1)
                 if any(sum(c) >= required_mw - 1e-12
                        for c in itertools.combinations(cap, k)))
    assert chosen.sum() == fewest


@pytest.mark.parametrize("order", ["type_priority", "specific_yield"])
def test_other_orders_take_the_shortest_prefix(order):
    r = rank_roofs(roofs(), order, PRIORITY)
    chosen = roofs_to_target(r, 1.0)
    cap = r["capacity_kwp"].to_numpy() / 1000
    n = int(chosen.sum())
    assert chosen[:n].all() and not chosen[n:].any()
    assert cap[:n].sum() >= 1.0 > cap[:n - 1].sum()
    assert not roofs_to_target(r, 0.0).any()


def test_priority_types_head():
    assert priority_types(PRIORITY) == ["government", "school", "hospital"]
    assert priority_types(["factory", "government"]) == []


def test_plan_config_rejects_unknown_types():
    with pytest.raises(ValueError, match="unknown building type"):
        PlanConfig(ranking_order="capacity", type_priority=["government", "church"],
                   grid_emission_factor_t_co2_per_mwh=0.57, report_top_n=5)


def test_co2_by_hand():
    assert co2_avoided_t(np.array([1000.0, 0.0]), 0.5703).tolist() == pytest.approx([570.3, 0])


# ----------------------------------------------------------------- existing PV


def yield_buildings():
    """Two 20 m x 20 m flat roofs (setback area 324 m2, usable 200 m2, gcr 0.5)."""
    return gpd.GeoDataFrame({
        "building_id": ["x", "y"], "district_name": ["A", "A"],
        "building_type": ["school", "factory"],
        "footprint_area_m2": [400.0, 400.0], "usable_area_m2": [200.0, 200.0],
        "gcr": [0.5, 0.5], "coverage_share": [0.5, 0.5],
        "module_area_m2": [100.0, 100.0], "capacity_kwp": [21.0, 21.0],
        "policy_area_m2": [200.0, 200.0], "capacity_policy_kwp": [21.0, 21.0],
        "specific_yield_kwh_per_kwp": [1000.0, 1000.0],
        "energy_mwh_per_year": [21.0, 21.0], "energy_policy_mwh_per_year": [21.0, 21.0],
        "suitable": [True, True], "unsuitable_reason": [None, None],
    }, geometry=[box(0, 0, 20, 20), box(100, 0, 120, 20)], crs=CRS)


def systems(buildings=None):
    """A 10 m x 10 m array on x (2024), a 10.5 kWp point on y (2019), one off-roof (2025).

    With their roof totals over ``buildings`` (default :func:`yield_buildings`).
    """
    raw = gpd.GeoDataFrame({
        "pv_id": ["p1", "p2", "p3"], "pv_capacity_kwp": [15.0, 10.5, 400.0],
        "pv_year": [2024, 2019, 2025], "pv_status": ["installed", "installed", "planned"]},
        geometry=[box(5, 5, 15, 15), Point(110, 10), Point(500, 500)], crs=CRS)
    return system_roof_totals(raw, [yield_buildings() if buildings is None else buildings])


def test_existing_pv_reduces_free_area():
    out = subtract_existing_pv(yield_buildings(), systems(), 210.0, 10.0).set_index(
        "building_id")
    # polygon: 100 m2 of roof; point: 10.5 kWp / 210 W/m2 / gcr 0.5 = 100 m2
    assert out["existing_pv_area_m2"].tolist() == pytest.approx([100.0, 100.0])
    assert out["existing_pv_kwp"].tolist() == pytest.approx([15.0, 10.5])
    assert out["usable_area_m2"].tolist() == pytest.approx([100.0, 100.0])
    # 100 m2 * gcr 0.5 * 210 W/m2 = 10.5 kWp; energy at 1000 kWh/kWp
    assert out["capacity_kwp"].tolist() == pytest.approx([10.5, 10.5])
    assert out["energy_mwh_per_year"].tolist() == pytest.approx([10.5, 10.5])
    # policy: 50% of 400 m2 = 200 m2 asked, 100 m2 already carry PV -> 100 m2 more
    assert out["policy_area_m2"].tolist() == pytest.approx([100.0, 100.0])


def test_existing_pv_filling_the_roof_leaves_it_unsuitable():
    big = systems().iloc[[0]].copy()
    big["geometry"] = [box(0, 0, 20, 15)]  # 300 m2 > 200 m2 usable
    big = system_roof_totals(big, [yield_buildings()])
    out = subtract_existing_pv(yield_buildings(), big, 210.0, 10.0).set_index("building_id")
    assert out.loc["x", "usable_area_m2"] == 0 and out.loc["x", "capacity_kwp"] == 0
    assert not out.loc["x", "suitable"]
    assert "existing or planned PV" in out.loc["x", "unsuitable_reason"]
    assert out.loc["y", "usable_area_m2"] == 200.0


def test_existing_pv_counts_toward_targets_by_year():
    b = subtract_existing_pv(yield_buildings(), systems(), 210.0, 10.0)
    districts = gpd.GeoDataFrame({"district_name": ["A"]}, geometry=[box(-10, -10, 1000, 1000)],
                                 crs=CRS)
    located = locate_existing_pv(systems(), b, districts, 210.0).set_index("pv_id")
    assert located["building_id"].tolist() == ["x", "y", None]
    assert located["district_name"].tolist() == ["A", "A", "A"]
    targets = [TargetConfig(id="t2024", district_name="A", required_mw=0.03, period="2024",
                            source="s"),
               TargetConfig(id="t2125", district_name="A", required_mw=0.5,
                            period="2021-2025", eligible_types=["school"], source="s")]
    ex = existing_toward_targets(located.reset_index(), targets).set_index("target_id")
    # 2024: only p1 (15 kWp); 2021-2025 school roofs or off-roof: p1 + p3 (the 2019 one is out)
    assert ex.loc["t2024", "target_existing_mw"] == pytest.approx(0.015)
    assert ex.loc["t2125", "target_existing_mw"] == pytest.approx(0.415)
    assert ex.loc["t2125", "n_existing_systems"] == 2
    rem = remaining_mw(targets, ex.reset_index())
    assert rem == pytest.approx({"t2024": 0.015, "t2125": 0.085})
    plan = target_plan(b, rem, targets, "capacity", PRIORITY)
    t = plan_targets(target_table(b, targets), ex.reset_index(), plan, b, targets,
                     ["government", "school"], 0.5).set_index("target_id")
    # t2024: existing 15 kW + 21 kW achievable >= 30 kW; two roofs of 10.5 kW reach 15 kW
    assert t.loc["t2024", "target_verdict"] == REACHABLE
    assert t.loc["t2024", "n_roofs_to_target"] == 2
    assert t.loc["t2024", "target_margin_mw"] == pytest.approx(0.015 + 0.021 - 0.03)
    # t2125: school roof x has 10.5 kW left; 415 + 10.5 < 500 kW
    assert t.loc["t2125", "target_verdict"] == NOT_REACHABLE
    assert t.loc["t2125", "target_share_reachable"] == pytest.approx(0.4255 / 0.5)
    assert t.loc["t2125", "target_share_priority_types"] == pytest.approx(0.0105 / 0.085)
    assert t.loc["t2125", "target_co2_avoided_kt_per_year"] == pytest.approx(0.0105 * 0.5)


def adjacent_buildings():
    """:func:`yield_buildings` as a and b = [0, 20] x [0, 20] and [20, 40] x [0, 20]: one wall."""
    b = yield_buildings()
    b["building_id"] = ["a", "b"]
    return b.set_geometry([box(0, 0, 20, 20), box(20, 0, 40, 20)], crs=CRS)


def straddling_systems():
    """s1: 10 kWp over 60 m2 of a and 40 m2 of b; s2: 4.2 kWp, a point on their wall."""
    return gpd.GeoDataFrame({
        "pv_id": ["s1", "s2"], "pv_capacity_kwp": [10.0, 4.2], "pv_year": [2024, 2024],
        "pv_status": ["installed", "installed"]},
        geometry=[box(14, 5, 24, 15), Point(20, 10)], crs=CRS)


def test_system_roof_totals_over_all_buildings():
    b = adjacent_buildings()
    whole = system_roof_totals(straddling_systems(), [b])
    assert whole["roof_area_total_m2"].tolist() == pytest.approx([100.0, 0.0])
    assert whole["roof_building_id"].tolist() == [None, "a"]  # the first footprint in order
    split = system_roof_totals(straddling_systems(), iter([b.iloc[[0]], b.iloc[[1]]]))
    pd.testing.assert_frame_equal(split, whole, check_exact=True)
    backwards = system_roof_totals(straddling_systems(), [b.iloc[[1]], b.iloc[[0]]])
    assert backwards["roof_building_id"].tolist() == [None, "b"]
    far = straddling_systems()
    off = system_roof_totals(far.set_geometry(far.translate(500, 500)), [b])
    assert off["roof_area_total_m2"].tolist() == [0.0, 0.0]
    assert off["roof_building_id"].tolist() == [None, None]
    with pytest.raises(ValueError, match="system_roof_totals"):
        pv_roof_pairs(b, straddling_systems(), 210.0)


def test_existing_pv_split_by_partition_adds_up_to_the_whole_frame():
    """A system over two partitions counts once: its parts add up to its capacity."""
    b = adjacent_buildings()
    s = system_roof_totals(straddling_systems(), [b])
    whole = subtract_existing_pv(b, s, 210.0, 10.0)
    parts = pd.concat([subtract_existing_pv(b.iloc[[i]], s, 210.0, 10.0) for i in (0, 1)])
    pd.testing.assert_frame_equal(parts, whole, check_exact=True)
    # a: 10 kWp x 60/100 and the point, 4.2 kWp / 210 W/m2 / gcr 0.5 = 40 m2; b: 10 x 40/100
    assert whole["existing_pv_area_m2"].tolist() == pytest.approx([100.0, 40.0])
    assert whole["existing_pv_kwp"].tolist() == pytest.approx([10.2, 4.0])
    assert whole["existing_pv_kwp"].sum() == pytest.approx(10.0 + 4.2)
    located = locate_existing_pv(s, whole, gpd.GeoDataFrame(
        {"district_name": ["A"]}, geometry=[box(-10, -10, 100, 100)], crs=CRS), 210.0)
    assert located["building_id"].tolist() == ["a", "a"]
    assert located["pv_roof_area_m2"].tolist() == pytest.approx([100.0, 40.0])
    assert "roof_area_total_m2" not in located.columns  # the layer keeps its columns


def test_read_existing_pv_errors_name_the_field(tmp_path):
    p = tmp_path / "pv.geojson"
    s = systems().rename(columns={"pv_id": "id", "pv_capacity_kwp": "kwp", "pv_year": "year"})
    s.to_file(p)
    cfg = ExistingPvConfig(path=p, id_field="id", capacity_field_kwp="kwp", year_field="yr")
    with pytest.raises(InputError, match=r"\[yr\].*plan.existing_pv.year_field"):
        read_existing_pv(cfg, CRS, tmp_path)
    s.loc[1, "kwp"] = None
    s.to_file(p)
    cfg = ExistingPvConfig(path=p, id_field="id", capacity_field_kwp="kwp", year_field="year")
    with pytest.raises(InputError, match=r"positive capacity in kWp \(e.g. id=p2\)"):
        read_existing_pv(cfg, CRS, tmp_path)


# ----------------------------------------------------------------------- towns


def test_town_split_sums_to_the_district_target(tmp_path):
    districts = gpd.GeoDataFrame({"district_name": ["A", "B"]},
                                 geometry=[box(0, 0, 100, 100), box(100, 0, 200, 100)], crs=CRS)
    gpd.GeoDataFrame({"name": ["north", "south", "east"]},
                     geometry=[box(0, 50, 100, 100), box(0, 0, 50, 50), box(100, 0, 200, 100)],
                     crs=CRS).to_file(tmp_path / "towns.geojson")
    towns = read_towns(TownsConfig(path=tmp_path / "towns.geojson", name_field="name"),
                       districts, CRS, tmp_path)
    assert towns.set_index("town_name")["district_name"].to_dict() == {
        "north": "A", "south": "A", "east": "B"}
    b = gpd.GeoDataFrame({
        "building_id": list("pqrst"), "district_name": ["A", "A", "A", "A", "B"],
        "building_type": ["school", "factory", "school", "residential", "school"],
        "capacity_kwp": [300.0, 100.0, 600.0, 1000.0, 50.0]},
        geometry=[box(10, 60, 20, 70), box(30, 80, 40, 90), box(10, 10, 20, 20),
                  box(60, 10, 70, 20), box(150, 50, 160, 60)], crs=CRS)
    b = assign_towns(b, towns)
    # t lies in district A but outside its towns
    assert b["town_name"].tolist() == ["north", "north", "south", OUTSIDE_TOWNS, "east"]
    target = TargetConfig(id="a", district_name="A", required_mw=9.0, period="2025",
                          eligible_types=["school", "factory"], source="s")
    s = town_split(b, towns, [target]).set_index("town_name")
    # potential: north 0.4 MW, south 0.6 MW (residential t is not eligible)
    assert s["town_potential_mw"].to_dict() == pytest.approx({"north": 0.4, "south": 0.6})
    assert s["town_target_mw"].to_dict() == pytest.approx({"north": 3.6, "south": 5.4})
    assert s["town_target_mw"].sum() == pytest.approx(9.0)
    everyone = TargetConfig(id="b", district_name="A", required_mw=10.0, period="2025",
                            source="s")
    s2 = town_split(b, towns, [everyone]).set_index("town_name")
    assert s2["town_target_mw"].to_dict() == pytest.approx(
        {"north": 2.0, "south": 3.0, OUTSIDE_TOWNS: 5.0})
    nothing = TargetConfig(id="c", district_name="A", required_mw=3.0, period="2025",
                           eligible_types=["hospital"], source="s")
    s3 = town_split(b, towns, [nothing]).set_index("town_name")
    # no potential: by town area, north 5000 m2, south 2500 m2
    assert s3["town_target_mw"].to_dict() == pytest.approx({"north": 2.0, "south": 1.0})
    assert s3["town_target_mw"].sum() == pytest.approx(3.0)
    assert (s3["split_basis"] != "potential").all()
