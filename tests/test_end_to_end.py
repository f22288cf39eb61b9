"""End to end on the real Shanghai sample: layers, verdicts, accounting, serial = parallel."""

from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path

import geopandas as gpd
import pandas as pd
import pyarrow.parquet as pq
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
    # the footprints' summaries are in the yield file for the report, not in the outputs
    from pipeline.footprints import FOOTPRINT_SUMMARY_COLUMNS

    assert set(FOOTPRINT_SUMMARY_COLUMNS) <= set(
        pq.read_schema(threaded / "data/processed/yield_buildings.parquet").names)
    assert not set(FOOTPRINT_SUMMARY_COLUMNS) & set(b.columns)
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


# --------------------------------------------------------------------------- report processes
#: Times that differ between two runs of the same inputs (manifest, provenance, styles).
TIMES = re.compile(r"\d{4}-\d\d-\d\d[T ]\d\d:\d\d(:\d\d(\.\d+)?)?(Z|[+-]\d\d:\d\d| UTC)?")


def report_project(base: Path, sample: Path, epw: Path, processed: Path) -> Path:
    """A project whose yield stage is done (the sample's), for report-stage runs."""
    make_base(base, sample, epw)
    shutil.copytree(processed, base / "data/processed", ignore=shutil.ignore_patterns("cache"))
    return base


def report_config(base: Path, name: str, plan: dict | None = None) -> str:
    """The sample config with two workers, the second processes always started when they run.

    The ``cbdc`` buildings are keyed by their footprints across runs (as
    sources without ids are).
    """
    import yaml

    raw = yaml.safe_load(CONFIG.read_text(encoding="utf-8"))
    for source in raw["sources"]:
        if source["name"] == "cbdc":
            source["id_field"] = None
    raw["dask"]["n_workers"] = 2
    raw["report"]["geopackage_process_min_buildings"] = 0
    raw["report"]["changes_process_min_cores"] = 3
    raw["plan"].update(plan or {})
    (base / name).write_text(yaml.safe_dump(raw, allow_unicode=True), encoding="utf-8")
    return name


def edit_buildings(proc: Path) -> None:
    """Buildings removed, added and changed (type, capacity, footprint) since the last run."""
    import numpy as np
    import shapely

    b = gpd.read_parquet(proc / "yield_buildings.parquet")
    acc = json.loads((proc / "ingest_accounting.json").read_text(encoding="utf-8"))
    for src in b["source"].iloc[:3]:  # removed
        acc[src]["read"] -= 1
        acc[src]["kept"] -= 1
    b = b.iloc[3:].reset_index(drop=True)
    b.loc[[0, 1], "building_type"] = ["school" if t != "school" else "factory"
                                      for t in b.loc[[0, 1], "building_type"]]
    roofs = b.index[b["capacity_kwp"] > 0][:2]
    b.loc[roofs, "capacity_kwp"] = b.loc[roofs, "capacity_kwp"] * 1.5
    b.loc[[4], "geometry"] = shapely.transform(b.geometry.iloc[[4]].to_numpy(), lambda c: c + 5)
    cbdc = b.index[b["source"] == "cbdc"]  # keyed by footprint: removed and added
    b.loc[cbdc[:1], "geometry"] = shapely.transform(b.geometry[cbdc[:1]].to_numpy(),
                                                    lambda c: c + 7)
    new = b.loc[[5, cbdc[1]]].copy()  # a new id, and a repeated footprint
    new["building_id"] = new["building_id"] + "-new"
    new.loc[[5], "geometry"] = shapely.transform(new.geometry[[5]].to_numpy(), lambda c: c + 30)
    for src in new["source"]:
        acc[src]["read"] += 1
        acc[src]["kept"] += 1
    b = gpd.GeoDataFrame(pd.concat([b, new], ignore_index=True), crs=b.crs)
    assert np.isfinite(b["capacity_kwp"]).all()
    b.to_parquet(proc / "yield_buildings.parquet", index=False)
    (proc / "ingest_accounting.json").write_text(json.dumps(acc), encoding="utf-8")


def plan_files(proc: Path, out: Path, district: str) -> dict:
    """Existing PV on three roofs and two towns in ``district``; the ``plan`` config keys.

    The files are written to ``out``, to be copied to ``data/raw/plan`` of a project.
    """
    from shapely.geometry import box

    b = gpd.read_parquet(proc / "yield_buildings.parquet")
    sel = b[(b["district_name"] == district) & (b["capacity_kwp"] > 0)].iloc[:3]
    c = sel.geometry.centroid
    out.mkdir(parents=True)
    gpd.GeoDataFrame({"id": ["p1", "p2", "p3"], "kwp": [20.0, 15.0, 30.0],
                      "year": [2024, 2024, 2023]},
                     geometry=[c.iloc[0].buffer(3.0, cap_style="square"), c.iloc[1],
                               sel.geometry.iloc[2]], crs=b.crs).to_file(out / "pv.gpkg")
    x0, y0, x1, y1 = b[b["district_name"] == district].total_bounds
    xm = float(c.x.median())
    gpd.GeoDataFrame({"name": ["west", "east"], "district": [district, district]},
                     geometry=[box(x0 - 1, y0 - 1, xm, y1 + 1), box(xm, y0 - 1, x1 + 1, y1 + 1)],
                     crs=b.crs).to_file(out / "towns.gpkg")
    return {"existing_pv": {"path": "data/raw/plan/pv.gpkg", "id_field": "id",
                            "capacity_field_kwp": "kwp", "year_field": "year"},
            "towns": {"path": "data/raw/plan/towns.gpkg", "name_field": "name",
                      "district_field": "district"}}


def report_run(base: Path, config: str, run_id: str, background: bool, cores: int = 3) -> None:
    """The report stage in ``base``: with its second processes, or in the driver alone.

    ``cores`` is what the report sees of the machine: with 3 the change list
    runs beside the buildings layer, with 2 after it in the same process.
    """
    from pipeline import parallel, runs

    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(base)
        mp.setattr(runs, "new_run_id", lambda now=None: run_id)
        mp.setattr(parallel, "available_cores", lambda: cores)
        if not background:  # one worker: no second process
            mp.setattr(parallel, "n_workers", lambda: 1)
        run_stages(Path(config), ("report",),
                   scheduler="processes" if background else "synchronous")


def report_outputs(base: Path, run_id: str) -> dict:
    """Everything a report run wrote, times masked, geometries as WKB."""
    from openpyxl import load_workbook

    def plain(v: object) -> object:
        return TIMES.sub("<time>", v) if isinstance(v, str) else v

    out = base / "outputs"
    gpkg = out / "rooftop_pv.gpkg"
    got: dict = {"metadata": {k: plain(v) for k, v in
                              pyogrio.read_info(gpkg, layer="buildings")["dataset_metadata"]
                              .items()}}
    for name, _ in pyogrio.list_layers(gpkg):
        frame = pyogrio.read_dataframe(gpkg, layer=name)
        if isinstance(frame, gpd.GeoDataFrame):
            frame = frame.to_wkb()
        got[f"layer {name}"] = frame.drop(columns=["update_time", "started"], errors="ignore")
    for name in ("report.md", "report.html"):
        got[name] = plain((out / name).read_text(encoding="utf-8"))
    wb = load_workbook(out / "rooftop_pv.xlsx", read_only=True)
    got["rooftop_pv.xlsx"] = {ws.title: [tuple(map(plain, r)) for r in ws.values]
                              for ws in wb.worksheets}
    wb.close()
    run_dir = out / "runs" / run_id
    for name in ("snapshot_buildings.parquet", "snapshot_districts.parquet"):
        got[name] = pd.read_parquet(run_dir / name)
    got["manifest changes"] = json.loads((run_dir / "manifest.json").read_text())["changes"]
    return got


@pytest.mark.slow
def test_report_with_second_processes_equals_report_in_driver(threaded, sample, iwec_epw,
                                                              tmp_path, caplog):
    """Streamed buildings layer, change list in a second process, fewer columns read: the same.

    Three runs each way: a first run, a second one after buildings were
    removed, added and changed, a third with existing PV and towns. The
    change list runs beside the buildings layer (``background``; with
    existing PV after it, from the driver's snapshot of the plan's
    capacities) or after it in the same process (``chained``, as on a
    2-core machine); the workbook is written by a worker of the pool.
    """
    from pipeline.report import BUILDINGS_LAYER_ONLY_COLUMNS

    caplog.set_level(logging.INFO, logger="pipeline")
    proc = threaded / "data/processed"
    assert set(BUILDINGS_LAYER_ONLY_COLUMNS) <= set(
        pd.read_parquet(proc / "yield_buildings.parquet").columns)  # each one is left out
    modes = {"driver": 3, "background": 3, "chained": 2}  # the cores the report sees
    bases = {mode: report_project(tmp_path / mode, sample, iwec_epw, proc) for mode in modes}
    configs = {mode: report_config(base, "report.yaml") for mode, base in bases.items()}
    edited = tmp_path / "edited"
    shutil.copytree(proc, edited, ignore=shutil.ignore_patterns("cache"))
    edit_buildings(edited)
    plan = plan_files(edited, tmp_path / "plan", "浦东新区")
    for run, run_id in enumerate(("20000101T000001Z-aaaaaa", "20000101T000002Z-bbbbbb",
                                  "20000101T000003Z-cccccc")):
        outputs = {}
        for mode, base in bases.items():
            if run == 1:
                for name in ("yield_buildings.parquet", "ingest_accounting.json"):
                    shutil.copy2(edited / name, base / "data/processed" / name)
            if run == 2:
                shutil.copytree(tmp_path / "plan", base / "data/raw/plan")
                configs[mode] = report_config(base, "report_plan.yaml", plan)
            caplog.clear()
            report_run(base, configs[mode], run_id, mode != "driver", modes[mode])
            steps = [r.getMessage() for r in caplog.records if "report steps" in r.getMessage()]
            assert len(steps) == 1
            assert ("geopackage buildings (wait)" in steps[0]) == (mode != "driver")
            assert ("changes (wait)" in steps[0]) == (mode != "driver")
            assert ("workbook (wait)" in steps[0]) == (mode != "driver")
            assert ("snapshot" in steps[0]) == (mode == "chained" or mode != "driver" and run == 2)
            outputs[mode] = report_outputs(base, run_id)
        a = outputs["driver"]
        for mode in ("background", "chained"):
            b = outputs[mode]
            assert list(a) == list(b)
            for key in a:
                if isinstance(a[key], pd.DataFrame):
                    pd.testing.assert_frame_equal(a[key], b[key],
                                                  obj=f"run {run + 1}, {mode}: {key}")
                else:
                    assert a[key] == b[key], f"run {run + 1}, {mode}: {key}"
        kinds = set(a["layer changes"]["change"])
        assert kinds == [set(), {"added", "removed", "changed"}, {"changed"}][run]
        if run == 1:
            fields = ",".join(a["layer changes"]["changed_fields"]).split(",")
            assert {"type", "capacity", "geometry"} <= set(fields)
        if run == 2:
            assert "layer existing_pv" in a and "layer towns" in a


@pytest.mark.parametrize("case", ["none", "existing pv and towns"])
def test_plan_with_footprints_on_disk_equals_plan_holding_them(threaded, sample, iwec_epw,
                                                              tmp_path, case):
    """The report's driver reading footprints by row group plans what it planned holding them.

    The sample's yield file in row groups of 37 buildings, so that the PV
    systems and towns join footprints of several row groups: the plan's
    buildings, targets, ranked roofs (with their footprints), existing PV,
    towns and town split, and both maps, against the whole frame's in
    partitions.
    """
    from pipeline import deliverables as dv
    from pipeline import html_report as hr
    from pipeline.config import load_config
    from pipeline.footprints import Footprints
    from pipeline.ingest import load_districts
    from pipeline.parallel import scheduler_context
    from pipeline.report import report_columns
    from pipeline.stream import read_columns

    proc = threaded / "data/processed"
    base = report_project(tmp_path / "project", sample, iwec_epw, proc)
    plan = None
    if case != "none":
        plan = plan_files(proc, tmp_path / "plan", "浦东新区")
        shutil.copytree(tmp_path / "plan", base / "data/raw/plan")
    cfg = load_config(base / report_config(base, "report.yaml", plan))
    src = base / "data/processed/yield_buildings.parquet"
    whole = gpd.read_parquet(src, columns=report_columns(src))
    whole.to_parquet(src, index=False, row_group_size=37)
    assert pq.ParquetFile(src).metadata.num_row_groups > 10
    districts = load_districts(cfg.districts, cfg.working_crs, base, cfg.targets)
    inputs = dv.plan_inputs(cfg, base, districts)
    assert (inputs[0] is not None) == (case != "none")
    with scheduler_context("synchronous", n_workers=1, npartitions=3):
        held = dv.prepare_plan(cfg, base, whole, districts, inputs)
    footprints = Footprints.scan(src)
    lean = dv.prepare_plan(cfg, base, read_columns(src, [c for c in whole.columns
                                                         if c != "geometry"]),
                           districts, inputs, footprints)
    pd.testing.assert_frame_equal(pd.DataFrame(held.buildings.drop(columns="geometry")),
                                  lean.buildings, check_exact=True)
    for name in ("targets", "plan", "systems", "towns", "split"):
        h, n = getattr(held, name), getattr(lean, name)
        assert (h is None) == (n is None) == (case == "none" and name != "targets"
                                              and name != "plan"), name
        if h is not None:
            pd.testing.assert_frame_equal(h, n, check_exact=True, obj=name)
    if case != "none":
        assert lean.buildings["existing_pv_kwp"].sum() > 0
        assert set(lean.buildings["town_name"]) >= {"west", "east"}
        assert lean.systems["building_id"].notna().all()
    assert len(lean.plan) and lean.plan.geometry.notna().all()
    family = hr.register_cjk_font(cfg.report.cjk_font_files)
    dlayer = districts.assign(target_verdict="reachable")
    target = cfg.targets[0].id
    assert hr.districts_map_png(dlayer, held.buildings, family) == hr.districts_map_png(
        dlayer, lean.buildings, family, footprints=footprints)
    assert hr.buildings_map_png(held.buildings, held.plan, target, family) == \
        hr.buildings_map_png(lean.buildings, lean.plan, target, family, footprints=footprints)


@pytest.mark.slow
@pytest.mark.parametrize("cores", [3, 2], ids=["beside", "chained"])
def test_report_failing_beside_its_second_processes_leaves_the_outputs(threaded, sample, iwec_epw,
                                                                       tmp_path, cores):
    """The driver fails while the second processes work: awaited, nothing half-written."""
    from pipeline import report, runs

    base = report_project(tmp_path / "project", sample, iwec_epw, threaded / "data/processed")
    config = report_config(base, "report.yaml")
    report_run(base, config, "20000101T000001Z-aaaaaa", True, cores)
    out = base / "outputs"
    before = {name: runs.sha256_file(out / name) for name in runs.KEPT_OUTPUTS}

    def broken(*args: object) -> str:
        raise RuntimeError("broken markdown")

    with pytest.MonkeyPatch.context() as mp, pytest.raises(RuntimeError, match="broken"):
        mp.setattr(report, "render_markdown", broken)
        report_run(base, config, "20000101T000002Z-bbbbbb", True, cores)
    assert {name: runs.sha256_file(out / name) for name in runs.KEPT_OUTPUTS} == before
    failed = out / "runs/20000101T000002Z-bbbbbb"
    assert json.loads((failed / "manifest.json").read_text())["status"] == "failed"
    assert not [p for d in (out, failed) for p in d.iterdir() if ".part" in p.name]
    # the next run compares with the last successful one
    assert [p.name for p in runs.output_runs(out / "runs")] == ["20000101T000001Z-aaaaaa"]
