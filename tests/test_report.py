"""Report kernels: summaries, coverage rule and target verdicts by hand."""

from __future__ import annotations

import geopandas as gpd
import pandas as pd
import pytest
from shapely.geometry import box

from pipeline.config import PolicyConfig, TargetConfig
from pipeline.report import (
    NO_BUILDINGS,
    NOT_REACHABLE,
    REACHABLE,
    assumptions,
    coverage_rule,
    district_layer,
    summarise,
    target_table,
)

POLICY = PolicyConfig(coverage_share_by_type={"government": 0.5, "factory": 0.5},
                      coverage_rule_types=["government", "school", "factory"],
                      coverage_rule_share=0.5, coverage_rule_name="test rule")


def buildings():
    return pd.DataFrame({
        "building_id": ["a", "b", "c", "d"],
        "district_name": ["A", "A", "A", "B"],
        "building_type": ["government", "factory", "residential", "school"],
        "footprint_area_m2": [1000.0, 2000.0, 500.0, 800.0],
        "usable_area_m2": [600.0, 1600.0, 300.0, 100.0],
        "capacity_kwp": [70.0, 200.0, 30.0, 10.0],
        "capacity_policy_kwp": [60.0, 125.0, 0.0, 10.0],
        "energy_mwh_per_year": [77.0, 220.0, 33.0, 11.0],
    })


def test_summarise_converts_units():
    s = summarise(buildings(), ["district_name"]).set_index("district_name")
    assert s.loc["A", "n_buildings"] == 3
    assert s.loc["A", "capacity_mw"] == pytest.approx(0.300)
    assert s.loc["A", "energy_gwh_per_year"] == pytest.approx(0.330)
    assert s.loc["A", "usable_area_m2"] == pytest.approx(2500.0)


def test_coverage_rule_by_hand():
    r = coverage_rule(buildings(), POLICY).set_index("district_name")
    # A: gov + factory: usable 2200 of 3000 m2 >= 50% -> reachable
    assert r.loc["A", "rule_usable_share"] == pytest.approx(2200 / 3000)
    assert r.loc["A", "rule_verdict"] == REACHABLE and r.loc["A", "rule_n_below_share"] == 0
    # B: a school with 100 of 800 m2 usable cannot reach 50%
    assert r.loc["B", "rule_verdict"].startswith("not reachable")
    assert r.loc["B", "rule_n_below_share"] == 1


def test_targets_by_hand():
    targets = [
        TargetConfig(id="a_all", district_name="A", required_mw=0.25, period="2024", source="s"),
        TargetConfig(id="a_public", district_name="A", required_mw=0.25, period="2024",
                     eligible_types=["government", "school"], source="s"),
        TargetConfig(id="c", district_name="C", required_mw=1.0, period="2024", source="s"),
    ]
    t = target_table(buildings(), targets).set_index("target_id")
    assert t.loc["a_all", "target_achievable_mw"] == pytest.approx(0.300)
    assert t.loc["a_all", "target_margin_mw"] == pytest.approx(0.05)
    assert t.loc["a_all", "target_share_needed"] == pytest.approx(0.25 / 0.3)
    assert t.loc["a_all", "target_verdict"] == REACHABLE
    assert t.loc["a_public", "target_achievable_mw"] == pytest.approx(0.070)
    assert t.loc["a_public", "target_verdict"] == NOT_REACHABLE
    assert t.loc["c", "target_verdict"] == NO_BUILDINGS


def test_district_layer_covers_every_district():
    d = gpd.GeoDataFrame({"district_name": ["A", "B", "Z"], "district_adcode": ["1", "2", "3"]},
                         geometry=[box(0, 0, 1, 1)] * 3, crs="EPSG:32651")
    t = target_table(buildings(), [TargetConfig(id="a", district_name="A", required_mw=1.0,
                                                period="2024", source="s")])
    out = district_layer(d, buildings(), POLICY, t).set_index("district_name")
    assert out.loc["Z", "n_buildings"] == 0 and out.loc["Z", "rule_verdict"] == NO_BUILDINGS
    assert out.loc["A", "target_verdict"] == NOT_REACHABLE
    assert pd.isna(out.loc["B", "target_verdict"])


def test_assumptions_come_with_their_sources(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("roof:\n  density_w_per_m2: 210  # a datasheet\n  table:\n    a: 1  # src\n"
                 "other:\n  x: 1  # not listed\n", encoding="utf-8")
    a = assumptions(p, ("roof",))
    assert a.to_dict("records") == [
        {"key": "roof.density_w_per_m2", "value": "210", "source": "a datasheet"},
        {"key": "roof.table.a", "value": "1", "source": "src"}]
