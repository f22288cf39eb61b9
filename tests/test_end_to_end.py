"""End to end on the real Shanghai sample: layers, verdicts, accounting, serial = parallel."""

from __future__ import annotations

import json

import geopandas as gpd
import pandas as pd
import pyogrio
import pytest

from pipeline.cli import run_stages
from tests.conftest import ROOT, make_base

CONFIG = ROOT / "configs/shanghai.yaml"


@pytest.fixture(scope="module")
def threaded(sample, iwec_epw, tmp_path_factory):
    base = make_base(tmp_path_factory.mktemp("threads"), sample, iwec_epw)
    run_stages(CONFIG, scheduler="threads", base_dir=base)
    return base


@pytest.mark.slow
def test_geopackage_has_the_layers(threaded):
    layers = dict(pyogrio.list_layers(threaded / "outputs/rooftop_pv.gpkg"))
    assert {"buildings", "districts", "targets", "rejected"} <= set(layers)
    assert layers["targets"] is None  # attribute table
    b = gpd.read_file(threaded / "outputs/rooftop_pv.gpkg", layer="buildings")
    for col in ("building_id", "source_id", "district_name", "building_type", "type_source",
                "footprint_area_m2", "usable_area_m2", "capacity_kwp",
                "specific_yield_kwh_per_kwp", "energy_mwh_per_year"):
        assert col in b.columns
    assert b.crs == "EPSG:32651"
    assert (b.usable_area_m2 <= b.footprint_area_m2 + 1e-6).all()


@pytest.mark.slow
def test_target_districts_carry_verdicts(threaded):
    d = gpd.read_file(threaded / "outputs/rooftop_pv.gpkg", layer="districts")
    d = d.set_index("district_name")
    assert len(d) == 16
    for name, target in (("浦东新区", 150.0), ("青浦区", 294.0)):
        assert d.loc[name, "target_required_mw"] == target
        assert d.loc[name, "target_verdict"].startswith(("reachable", "not reachable", "no "))
        assert d.loc[name, "rule_verdict"]
    # the sample is a few hundred buildings: Pudong's 150 MW is not reachable from them
    assert d.loc["浦东新区", "target_verdict"] == "not reachable from the buildings in the input"
    t = pyogrio.read_dataframe(threaded / "outputs/rooftop_pv.gpkg", layer="targets")
    assert set(t.target_id) == {"pudong_2024", "qingpu_2021_2025"}


@pytest.mark.slow
def test_accounting_read_equals_kept_plus_rejected(threaded):
    acc = json.loads((threaded / "data/processed/ingest_accounting.json").read_text())
    assert set(acc) == {"osm", "cbdc", "height_tiles"}
    assert acc["osm"]["read"] == 1408 and acc["cbdc"]["read"] == 113
    for a in acc.values():
        assert a["read"] == a["kept"] + a["rejected"]
    gpkg = threaded / "outputs/rooftop_pv.gpkg"
    b = pyogrio.read_dataframe(gpkg, layer="buildings", read_geometry=False)
    r = pyogrio.read_dataframe(gpkg, layer="rejected", read_geometry=False)
    for src, a in acc.items():
        assert (b.source == src).sum() == a["kept"]
        assert (r.source == src).sum() == a["rejected"]
    assert r.reason.notna().all()
    report = (threaded / "outputs/report.md").read_text(encoding="utf-8")
    assert "covers only part of each district's buildings" in report
    assert "| total | " in report and "## Assumptions" in report


@pytest.mark.slow
def test_serial_run_equals_threaded_run(threaded, sample, iwec_epw, tmp_path_factory):
    base = make_base(tmp_path_factory.mktemp("serial"), sample, iwec_epw)
    run_stages(CONFIG, scheduler="synchronous", base_dir=base)
    for name in ("yield_buildings.parquet", "ingest_rejected.parquet"):
        a = gpd.read_parquet(threaded / "data/processed" / name)
        s = gpd.read_parquet(base / "data/processed" / name)
        pd.testing.assert_frame_equal(a, s)


@pytest.mark.slow
def test_streaming_run_equals_cached_run(threaded, sample, iwec_epw, tmp_path_factory):
    """runs.partition_cache: false streams row groups; the numbers are the same."""
    import yaml

    base = make_base(tmp_path_factory.mktemp("stream"), sample, iwec_epw)
    raw = yaml.safe_load(CONFIG.read_text(encoding="utf-8"))
    raw["runs"]["partition_cache"] = False
    config = base / "stream.yaml"
    config.write_text(yaml.safe_dump(raw, allow_unicode=True), encoding="utf-8")
    run_stages(config, scheduler="threads", base_dir=base)
    assert not (base / "data/processed/cache").exists()
    cols = ["building_id", "building_type", "height_m", "usable_area_m2", "capacity_kwp",
            "specific_yield_kwh_per_kwp", "energy_mwh_per_year"]
    a = pd.read_parquet(threaded / "data/processed/yield_buildings.parquet", columns=cols)
    s = pd.read_parquet(base / "data/processed/yield_buildings.parquet", columns=cols)
    a, s = (f.sort_values("building_id").reset_index(drop=True) for f in (a, s))
    pd.testing.assert_frame_equal(a, s, check_dtype=False)


@pytest.mark.slow
def test_planner_deliverables(threaded):
    """Styled GeoPackage, workbook equal to its tables, self-contained HTML, plan in Markdown."""
    import sqlite3

    from openpyxl import load_workbook

    out = threaded / "outputs"
    gpkg = out / "rooftop_pv.gpkg"
    with sqlite3.connect(gpkg) as con:
        styled = {r[0] for r in con.execute("SELECT f_table_name FROM layer_styles "
                                            "WHERE useAsDefault")}
        md = con.execute("SELECT metadata FROM gpkg_metadata").fetchall()
    assert {"buildings", "districts", "rejected", "target_plan", "targets"} <= styled
    assert any("ROOFTOP_PV_INPUTS" in m[0] and "districts_wgs84.geojson" in m[0] for m in md)
    wb = load_workbook(out / "rooftop_pv.xlsx", read_only=True)
    for sheet in ("targets", "district_types", "districts"):
        rows = list(wb[sheet].values)
        book = pd.DataFrame(rows[1:], columns=rows[0])
        gp = pyogrio.read_dataframe(gpkg, layer=sheet, read_geometry=False)
        assert list(book.columns) == list(gp.columns)
        for col in gp.columns:
            if pd.api.types.is_float_dtype(gp[col]):
                exp = gp[col].replace([float("inf")], float("nan")).to_numpy(dtype=float)
                got = pd.to_numeric(book[col]).to_numpy(dtype=float)
                assert got == pytest.approx(exp, nan_ok=True), (sheet, col)
            else:
                assert ([None if pd.isna(v) else v for v in gp[col]]
                        == [None if pd.isna(v) else v for v in book[col]]), (sheet, col)
    wb.close()
    plan = pyogrio.read_dataframe(gpkg, layer="target_plan", read_geometry=False)
    for _, g in plan.groupby("target_id"):
        assert g["priority_rank"].tolist() == list(range(1, len(g) + 1))
    page = (out / "report.html").read_text(encoding="utf-8")
    assert page.count('src="data:image/png;base64,') == 5
    assert "http://" not in page.replace("http://mrcc", "") and "src=\"http" not in page
    assert "浦东新区" in page and "covers only part of each district" in page
    report = (out / "report.md").read_text(encoding="utf-8")
    assert "## Path to each target" in report and "plan.grid_emission_factor" in report
