"""Styled GeoPackage (layer_styles, metadata), workbook, plan assembly, and QGIS itself."""

from __future__ import annotations

import contextlib
import json
import sqlite3
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path
from types import SimpleNamespace

import geopandas as gpd
import numpy as np
import pandas as pd
import pyogrio
import pytest
from openpyxl import load_workbook
from shapely.geometry import LineString, Point, box

from pipeline.config import TargetConfig
from pipeline.deliverables import geopackage_layers, prepare_plan
from pipeline.report import write_geopackage
from pipeline.styles import TYPE_STYLE
from pipeline.targets import ExistingPvConfig, PlanConfig, TownsConfig
from pipeline.workbook import write_workbook
from tests.conftest import ROOT
from tests.test_targets import CRS, adjacent_buildings, straddling_systems, yield_buildings

SYSTEM_PYTHON = "/usr/bin/python3"


def small_layers() -> dict:
    b = gpd.GeoDataFrame({
        "building_id": [f"b{i}" for i in range(9)], "building_type": list(TYPE_STYLE),
        "capacity_kwp": np.linspace(0, 800, 9), "district_name": ["浦东新区"] * 9},
        geometry=[box(i * 40, 0, i * 40 + 30, 30) for i in range(9)], crs=CRS)
    d = gpd.GeoDataFrame({
        "district_name": ["浦东新区", "青浦区"], "capacity_mw": [3.6, 0.0],
        "target_verdict": ["not reachable from the buildings in the input", None],
        "target_required_mw": [150.0, np.nan], "target_achievable_mw": [3.6, np.nan]},
        geometry=[box(-100, -100, 400, 200), box(400, -100, 800, 200)], crs=CRS)
    r = gpd.GeoDataFrame({"building_id": ["r1", "r2", "r3"], "reason": ["tiny", "line", "pt"]},
                         geometry=[box(500, 0, 502, 2), LineString([(600, 0), (650, 10)]),
                                   Point(700, 50)], crs=CRS)
    t = pd.DataFrame({"target_id": ["pudong_2024"], "target_required_mw": [150.0],
                      "target_achievable_mw": [3.6]})
    return {"buildings": b, "districts": d, "targets": t, "rejected": r}


@pytest.fixture(scope="module")
def styled_gpkg(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("gpkg") / "styled.gpkg"
    layers, options = geopackage_layers(small_layers(), label_top_n=5)
    write_geopackage(path, layers, options, {"ROOFTOP_PV_INPUTS": json.dumps(
        {"districts": {"path": "d.geojson", "sha256": "ab12"}})})
    return path


def test_layer_styles_are_what_qgis_reads(styled_gpkg):
    con = sqlite3.connect(styled_gpkg)
    rows = {r[0]: r[1:] for r in con.execute(
        "SELECT f_table_name, f_table_schema, f_geometry_column, useAsDefault, styleQML "
        "FROM layer_styles")}
    contents = dict(con.execute("SELECT table_name, data_type FROM gpkg_contents"))
    geom_cols = dict(con.execute("SELECT table_name, column_name FROM gpkg_geometry_columns"))
    con.close()
    assert set(rows) == {"buildings", "districts", "targets", "rejected"}
    assert contents["layer_styles"] == "attributes"  # a table OGR (so QGIS) lists
    for name, (schema, geom, default, _) in rows.items():
        assert schema == "" and default == 1
        assert geom == geom_cols.get(name, "")  # 'geom' for layers, '' for tables
    qml = ET.fromstring(rows["buildings"][3].split("\n", 1)[1])
    r = qml.find("renderer-v2")
    assert r.get("type") == "categorizedSymbol" and r.get("attr") == "building_type"
    assert [c.get("value") for c in r.iter("category")] == list(TYPE_STYLE)
    assert "capacity_kwp" in r.find(".//Option[@name='fillColor']/Option[@name='expression']") \
        .get("value")
    aliases = {a.get("field"): a.get("name") for a in qml.iter("alias")}
    assert aliases["capacity_kwp"].endswith("[kWp]")
    d = ET.fromstring(rows["districts"][3].split("\n", 1)[1])
    assert d.get("labelsEnabled") == "1"
    assert d.find(".//text-style").get("fieldName").startswith('"district_name"')
    rej = ET.fromstring(rows["rejected"][3].split("\n", 1)[1])
    assert [x.get("type") for x in rej.iter("symbol")] == ["fill", "line", "marker"]


def test_provenance_in_gpkg_metadata(styled_gpkg):
    con = sqlite3.connect(styled_gpkg)
    md = con.execute("SELECT m.metadata FROM gpkg_metadata m JOIN gpkg_metadata_reference r "
                     "ON r.md_file_id = m.id WHERE r.reference_scope = 'geopackage'").fetchall()
    con.close()
    assert any("ROOFTOP_PV_INPUTS" in m[0] and "ab12" in m[0] for m in md)
    assert pyogrio.read_info(styled_gpkg, layer="buildings")["features"] == 9


def test_workbook_matches_geopackage_tables(tmp_path, styled_gpkg):
    layers = small_layers()
    xlsx = tmp_path / "t.xlsx"
    write_workbook(xlsx, {"targets": layers["targets"], "districts": layers["districts"]})
    wb = load_workbook(xlsx, read_only=True)
    assert wb.sheetnames == ["targets", "districts", "columns"]
    for sheet in ("targets", "districts"):
        rows = list(wb[sheet].values)
        book = pd.DataFrame(rows[1:], columns=rows[0])
        gp = pyogrio.read_dataframe(styled_gpkg, layer=sheet, read_geometry=False)
        pd.testing.assert_frame_equal(plain(book), plain(gp))
    wb.close()


def awkward_table(n: int = 7) -> pd.DataFrame:
    """Every kind of cell the report writes, and the text that needs escaping."""
    rng = np.random.default_rng(1)
    return pd.DataFrame({
        "target_id": pd.Series(["a", "b"] * (n // 2) + ["a"] * (n % 2), dtype="str"),
        "rank": np.arange(1, n + 1),
        "name": ([None, "A & B <roof>", "  lead", "trail ", "浦东 学校", "", "x"] * n)[:n],
        "building_type": pd.Categorical((["school", "factory", None] * n)[:n]),
        "capacity_kwp": rng.random(n) * 1e3,
        "share": ([np.nan, np.inf, -np.inf, 1e20, 5.0, -0.0, 1e-7] * n)[:n],
        "in_target_list": rng.random(n) < 0.5,
        "mixed": ([1, 2.5, "t", None, True, np.int64(3), np.float64(0.1)] * n)[:n],
        "nullable_int": pd.array(([1, None, 3, 4, 5, 6, 7] * n)[:n], dtype="Int64"),
    })


def read_sheets(path: Path) -> dict[str, list[tuple]]:
    wb = load_workbook(path, read_only=True)
    out = {name: list(wb[name].values) for name in wb.sheetnames}
    wb.close()
    return out


def same_cells(a: list[tuple], b: list[tuple]) -> bool:
    """Equal cell by cell, floats to the last digit openpyxl keeps."""
    if len(a) != len(b):
        return False
    for ra, rb in zip(a, b, strict=True):
        for x, y in zip(ra, rb, strict=True):
            if isinstance(x, float) and isinstance(y, float | int) and not isinstance(y, bool):
                if x != pytest.approx(y, rel=1e-15):
                    return False
            elif x != y or type(x) is not type(y):
                return False
    return True


def test_workbook_fast_writer_matches_openpyxl(tmp_path):
    """The spliced SpreadsheetML reads back as pandas + openpyxl wrote the same table."""
    table = awkward_table(14)
    write_workbook(tmp_path / "new.xlsx", {"t": table})
    old = table.copy()
    for col in old.columns:  # what the openpyxl path (pipeline.workbook before) did
        s = old[col]
        if pd.api.types.is_bool_dtype(s):
            continue
        if pd.api.types.is_numeric_dtype(s):
            old[col] = s.replace([np.inf, -np.inf], np.nan)
        else:
            old[col] = s.astype(object).where(s.notna(), None)
    with pd.ExcelWriter(tmp_path / "old.xlsx", engine="openpyxl") as xw:
        old.to_excel(xw, sheet_name="t", index=False)
    new_rows, old_rows = read_sheets(tmp_path / "new.xlsx")["t"], read_sheets(
        tmp_path / "old.xlsx")["t"]
    # openpyxl wrote "" (an empty name) as an empty string cell; it is a blank cell now
    old_rows = [tuple(None if v == "" else v for v in r) for r in old_rows]
    assert same_cells(new_rows, old_rows)
    wb = load_workbook(tmp_path / "new.xlsx")
    ws = wb["t"]
    assert ws.freeze_panes == "A2" and ws["A1"].font.b
    assert ws.column_dimensions["E"].width == pytest.approx(len("capacity_kwp") + 2, abs=1)
    assert wb.sheetnames == ["t", "columns"]


def test_workbook_escapes_control_characters(tmp_path):
    write_workbook(tmp_path / "c.xlsx", {"t": pd.DataFrame({"name": ["a\x01b", "tab\tok"]})})
    assert [r[0] for r in read_sheets(tmp_path / "c.xlsx")["t"]] == ["name", "a_x0001_b",
                                                                    "tab\tok"]


def test_workbook_continues_a_table_longer_than_a_sheet(tmp_path):
    table = awkward_table(23)
    write_workbook(tmp_path / "s.xlsx", {"target_plan": table, "small": table.head(3)},
                   max_rows=10)  # 9 rows a sheet below the header
    sheets = read_sheets(tmp_path / "s.xlsx")
    assert list(sheets)[:4] == ["target_plan", "target_plan (2)", "target_plan (3)", "small"]
    parts = [sheets[n] for n in ("target_plan", "target_plan (2)", "target_plan (3)")]
    assert [len(p) for p in parts] == [10, 10, 6]
    assert all(p[0] == parts[0][0] for p in parts)
    whole = tmp_path / "whole.xlsx"
    write_workbook(whole, {"target_plan": table})
    assert same_cells([parts[0][0]] + [r for p in parts for r in p[1:]],
                      read_sheets(whole)["target_plan"])
    with pytest.raises(ValueError, match="repeat"):
        write_workbook(tmp_path / "x.xlsx", {"t": table, "t (2)": table}, max_rows=10)


def plain(frame: pd.DataFrame) -> pd.DataFrame:
    """Object columns with None for missing values (Excel has no NaN)."""
    out = frame.astype(object)
    return out.where(frame.notna(), None)


def plan_cfg(tmp_path: Path, existing: bool, towns: bool,
             pv: gpd.GeoDataFrame | None = None) -> SimpleNamespace:
    """A plan config; existing PV: ``pv`` (:func:`tests.test_targets.straddling_systems`), else
    one 15 kWp array."""
    ex = tw = None
    if existing:
        pv = (gpd.GeoDataFrame({"id": ["p1"], "kwp": [15.0], "year": [2024]},
                               geometry=[box(5, 5, 15, 15)], crs=CRS) if pv is None else
              pv.rename(columns={"pv_id": "id", "pv_capacity_kwp": "kwp", "pv_year": "year"}))
        pv.to_file(tmp_path / "pv.geojson")
        ex = ExistingPvConfig(path=Path("pv.geojson"), id_field="id", capacity_field_kwp="kwp",
                              year_field="year")
    if towns:
        gpd.GeoDataFrame({"name": ["w", "e"]}, geometry=[box(-10, -10, 50, 50),
                                                         box(50, -10, 200, 50)],
                         crs=CRS).to_file(tmp_path / "towns.geojson")
        tw = TownsConfig(path=Path("towns.geojson"), name_field="name")
    return SimpleNamespace(
        working_crs=CRS,
        roof=SimpleNamespace(module_power_density_w_per_m2=210.0, min_array_area_m2=10.0),
        plan=PlanConfig(ranking_order="capacity", type_priority=["government", "school"],
                        grid_emission_factor_t_co2_per_mwh=0.5, report_top_n=5,
                        existing_pv=ex, towns=tw),
        targets=[TargetConfig(id="a", district_name="A", required_mw=0.03, period="2024",
                              source="s")])


def test_prepare_plan_with_existing_pv_and_towns(tmp_path):
    districts = gpd.GeoDataFrame({"district_name": ["A"]}, geometry=[box(-50, -50, 300, 300)],
                                 crs=CRS)
    p = prepare_plan(plan_cfg(tmp_path, True, True), tmp_path, yield_buildings(), districts)
    assert len(p.buildings) == 2  # every building kept
    assert p.buildings["existing_pv_area_m2"].tolist() == pytest.approx([100.0, 0.0])
    assert p.buildings["co2_avoided_t_per_year"].tolist() == pytest.approx([5.25, 10.5])
    t = p.targets.iloc[0]
    assert t["target_existing_mw"] == pytest.approx(0.015)
    assert t["target_remaining_mw"] == pytest.approx(0.015)
    # y keeps 21 kW, x 10.5 kW beside its array: y alone reaches the remaining 15 kW
    assert p.plan["building_id"].tolist() == ["y", "x"]
    assert p.plan["in_target_list"].tolist() == [True, False]
    assert p.targets.iloc[0]["n_roofs_to_target"] == 1
    assert p.split["town_target_mw"].sum() == pytest.approx(0.03)
    assert set(p.towns["town_name"]) == {"w", "e"}
    assert p.systems["building_id"].tolist() == ["x"]
    bare = prepare_plan(plan_cfg(tmp_path, False, False), tmp_path, yield_buildings(),
                        districts)
    assert bare.systems is None and bare.towns is None
    assert bare.targets.iloc[0]["target_existing_mw"] == 0.0


def qgis_available() -> bool:
    try:
        return subprocess.run([SYSTEM_PYTHON, "-c", "import qgis.core"], capture_output=True,
                              timeout=60).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


@pytest.mark.slow
@pytest.mark.skipif(not qgis_available(), reason="PyQGIS not installed for /usr/bin/python3 "
                    "(`make qgis-check` installs Debian's python3-qgis)")
def test_qgis_opens_the_styled_geopackage(styled_gpkg, tmp_path):
    png = tmp_path / "check.png"
    res = subprocess.run([SYSTEM_PYTHON, "-m", "pipeline.qgis_check", str(styled_gpkg),
                          "--png", str(png)], capture_output=True, text=True, timeout=300,
                         cwd=ROOT, env={"QT_QPA_PLATFORM": "offscreen", "PATH": "/usr/bin:/bin",
                                        "HOME": str(tmp_path), "PYTHONPATH": str(ROOT)})
    assert res.returncode == 0, res.stdout + res.stderr
    assert 'buildings: {"features": 9, "renderer": "categorizedSymbol"' in res.stdout
    assert "districts:" in res.stdout and "qgis-check: passed" in res.stdout
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
@pytest.mark.skipif(not qgis_available(), reason="PyQGIS not installed for /usr/bin/python3")
def test_qgis_check_fails_without_the_styles(styled_gpkg, tmp_path):
    bare = tmp_path / "bare.gpkg"
    bare.write_bytes(styled_gpkg.read_bytes())
    con = sqlite3.connect(bare)
    con.execute("DELETE FROM layer_styles")
    con.commit()
    con.close()
    res = subprocess.run([SYSTEM_PYTHON, "-m", "pipeline.qgis_check", str(bare)],
                         capture_output=True, text=True, timeout=300, cwd=ROOT,
                         env={"QT_QPA_PLATFORM": "offscreen", "PATH": "/usr/bin:/bin",
                              "HOME": str(tmp_path), "PYTHONPATH": str(ROOT)})
    assert res.returncode == 1
    assert "buildings: renderer singleSymbol, expected categorizedSymbol" in res.stderr


def test_prepare_plan_splits_existing_pv_alike_over_partitions(tmp_path):
    """A system over footprints in two partitions counts once, as in one partition."""
    from pipeline.parallel import scheduler_context

    districts = gpd.GeoDataFrame({"district_name": ["A"]}, geometry=[box(-50, -50, 300, 300)],
                                 crs=CRS)
    cfg = plan_cfg(tmp_path, True, False, straddling_systems())
    plans = {}
    for n in (1, 2):
        with scheduler_context("synchronous", n_workers=1, npartitions=n):
            plans[n] = prepare_plan(cfg, tmp_path, adjacent_buildings(), districts)
    pd.testing.assert_frame_equal(plans[2].buildings, plans[1].buildings, check_exact=True)
    b = plans[2].buildings
    assert b["existing_pv_area_m2"].tolist() == pytest.approx([100.0, 40.0])
    assert b["existing_pv_kwp"].tolist() == pytest.approx([10.2, 4.0])  # 10 kWp + 4.2 kWp
    assert plans[2].systems["building_id"].tolist() == ["a", "a"]
    assert plans[2].targets.iloc[0]["target_existing_mw"] == pytest.approx(0.0142)


def test_prepare_plan_with_footprints_on_disk_equals_the_whole_frame(tmp_path):
    """Footprints read a row group (one building) at a time: the whole frame's plan.

    Three roofs in a row: s1 over a and b (60 / 40 m2), s2 a point on their
    wall, s3 over b and c with 50 m2 each (the tie goes to the first roof in
    file order, b); towns split the row between b and c.
    """
    from pipeline.deliverables import plan_inputs
    from pipeline.footprints import Footprints
    from pipeline.parallel import scheduler_context
    from pipeline.stream import GeoParquetWriter, read_columns, to_arrow

    b = pd.concat([adjacent_buildings(), adjacent_buildings().iloc[[1]]], ignore_index=True)
    b = b.set_geometry([box(0, 0, 20, 20), box(20, 0, 40, 20), box(40, 0, 70, 20)], crs=CRS)
    b["building_id"] = ["a", "b", "c"]
    b["district_name"] = "A"
    tie = gpd.GeoDataFrame({"pv_id": ["s3"], "pv_capacity_kwp": [5.0], "pv_year": [2024],
                            "pv_status": ["installed"]}, geometry=[box(35, 5, 45, 15)], crs=CRS)
    pv = pd.concat([straddling_systems(), tie], ignore_index=True)
    districts = gpd.GeoDataFrame({"district_name": ["A"]}, geometry=[box(-50, -50, 300, 300)],
                                 crs=CRS)
    cfg = plan_cfg(tmp_path, True, True, pv)
    src = tmp_path / "yield_buildings.parquet"
    with GeoParquetWriter(src) as w:
        for i in range(len(b)):
            w.write(to_arrow(b.iloc[[i]]))
    inputs = plan_inputs(cfg, tmp_path, districts)
    with scheduler_context("synchronous", n_workers=1, npartitions=2):
        whole = prepare_plan(cfg, tmp_path, gpd.read_parquet(src), districts, inputs)
    fp = Footprints.scan(src)
    lean = prepare_plan(cfg, tmp_path, read_columns(src, [c for c in b.columns
                                                          if c != "geometry"]),
                        districts, inputs, fp)
    pd.testing.assert_frame_equal(pd.DataFrame(whole.buildings.drop(columns="geometry")),
                                  lean.buildings, check_exact=True)
    for name in ("targets", "plan", "systems", "towns", "split"):
        pd.testing.assert_frame_equal(getattr(whole, name), getattr(lean, name),
                                      check_exact=True, obj=name)
    # s1: 10 kWp x 60/100 on a, x 40/100 on b; s2: 4.2 kWp on a; s3: 2.5 kWp each on b and c
    assert lean.buildings["existing_pv_kwp"].tolist() == pytest.approx([10.2, 6.5, 2.5])
    assert lean.systems["building_id"].tolist() == ["a", "a", "b"]
    assert lean.systems["pv_roof_area_m2"].tolist() == pytest.approx([100.0, 40.0, 100.0])
    assert lean.buildings["town_name"].tolist() == ["w", "w", "e"]
    with pytest.raises(ValueError, match="3 footprints for 2 buildings"):
        prepare_plan(cfg, tmp_path, read_columns(src, ["building_id"]).iloc[:2], districts,
                     inputs, fp)


@pytest.mark.parametrize("case", ["plan inputs", "none", "pv across row groups"])
def test_streamed_buildings_layer_equals_the_whole_frame_layer(tmp_path, case):
    """The report's second process writes the same buildings layer, one row group at a time.

    Without existing PV and towns it writes the stored WKB without decoding it;
    a PV system over footprints in two row groups (and two partitions of the
    whole frame) counts once.
    """
    import os

    from pipeline.deliverables import building_plan_args, plan_inputs
    from pipeline.parallel import scheduler_context, submit_background
    from pipeline.report import write_buildings_layer, write_layers
    from pipeline.stream import GeoParquetWriter, to_arrow

    districts = gpd.GeoDataFrame({"district_name": ["A"]}, geometry=[box(-50, -50, 300, 300)],
                                 crs=CRS)
    straddle = case == "pv across row groups"
    cfg = plan_cfg(tmp_path, case != "none", case == "plan inputs",
                   straddling_systems() if straddle else None)
    b = adjacent_buildings() if straddle else yield_buildings()
    b.loc[1, "geometry"] = b.geometry.iloc[1].union(box(130, 0, 140, 10))  # a MultiPolygon
    b["note"] = None  # all null: GDAL has no null type
    src = tmp_path / "yield_buildings.parquet"
    with GeoParquetWriter(src) as w:  # one row per row group, as partitions are written
        for i in range(len(b)):
            w.write(to_arrow(b.iloc[[i]]))
    inputs = plan_inputs(cfg, tmp_path, districts)
    with scheduler_context("synchronous", n_workers=1, npartitions=2):
        whole = prepare_plan(cfg, tmp_path, gpd.read_parquet(src), districts, inputs).buildings
    write_layers(tmp_path / "whole.gpkg", {"buildings": whole},
                 {"buildings": {"DESCRIPTION": "d"}}, {"K": "v"})
    rows = write_buildings_layer(str(src), str(tmp_path / "streamed.gpkg"),
                                 building_plan_args(cfg, *inputs), {"DESCRIPTION": "d"},
                                 {"K": "v"})
    assert rows == 2
    a = pyogrio.read_dataframe(tmp_path / "whole.gpkg", layer="buildings")
    s = pyogrio.read_dataframe(tmp_path / "streamed.gpkg", layer="buildings")
    pd.testing.assert_frame_equal(pd.DataFrame(a.drop(columns="geometry")),
                                  pd.DataFrame(s.drop(columns="geometry")), check_exact=True)
    assert a.geom_equals_exact(s.geometry, 0).all() and set(s.geom_type) == {"MultiPolygon"}
    assert s["existing_pv_area_m2"].tolist() == pytest.approx(
        {"plan inputs": [100.0, 0.0], "none": [0.0, 0.0], "pv across row groups": [100.0, 40.0]}[
            case])
    if straddle:
        assert s["existing_pv_kwp"].tolist() == pytest.approx([10.2, 4.0])
    info_a, info_s = (pyogrio.read_info(tmp_path / f, layer="buildings")
                      for f in ("whole.gpkg", "streamed.gpkg"))
    assert info_s["dataset_metadata"]["K"] == "v"
    for key in ("fields", "dtypes", "geometry_type", "crs", "features"):
        assert list(np.atleast_1d(info_a[key])) == list(np.atleast_1d(info_s[key])), key
    # both with a complete spatial index (the stream builds it once, at the end)
    for f in ("whole.gpkg", "streamed.gpkg"):
        with contextlib.closing(sqlite3.connect(tmp_path / f)) as con:
            assert con.execute("SELECT count(*) FROM rtree_buildings_geom").fetchone()[0] == 2
    # and it runs in another process
    assert submit_background(os.getpid).result() != os.getpid()


def test_sqlite_unsynced_restores_the_gdal_options():
    """The journal and fsync are off only inside the block; earlier values come back."""
    from pipeline.report import SQLITE_WRITE_OPTIONS, sqlite_unsynced

    pyogrio.set_gdal_config_options({"OGR_SQLITE_JOURNAL": "WAL", "OGR_SQLITE_SYNCHRONOUS": None})
    try:
        with sqlite_unsynced():
            for key in SQLITE_WRITE_OPTIONS:  # pyogrio reads "OFF" back as False
                assert pyogrio.get_gdal_config_option(key) is False
        assert pyogrio.get_gdal_config_option("OGR_SQLITE_JOURNAL") == "WAL"
        assert pyogrio.get_gdal_config_option("OGR_SQLITE_SYNCHRONOUS") is None
    finally:
        pyogrio.set_gdal_config_options({"OGR_SQLITE_JOURNAL": None})
