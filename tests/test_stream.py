"""Streaming over GeoParquet row groups, chunked ingest and the vectorised column helpers."""

from __future__ import annotations

import json

import geopandas as gpd
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import shapely
from shapely.geometry import box

from pipeline import ingest
from pipeline.columns import map_unique, records_json
from pipeline.parallel import scheduler_context
from pipeline.stream import (
    map_file,
    partitions,
    read_partition,
    spatial_keys,
    to_arrow,
    write_tables,
)
from tests.conftest import ROOT, ingest_config

BAD = ROOT / "tests/data/bad"


def test_map_unique_calls_the_function_once_per_distinct_value():
    calls = []

    def f(v):
        calls.append(v)
        return v.upper()

    out = map_unique(pd.Series(["a", "b", "a", None, np.nan, "b"], dtype=object), f, null="-")
    assert list(out) == ["A", "B", "A", "-", "-", "B"]
    assert sorted(calls) == ["a", "b"]


def test_map_unique_keeps_mixed_python_types_apart():
    # 1, 1.0 and True hash alike; each must still get its own result
    out = map_unique(pd.Series([1, 1.0, True, "1"], dtype=object), lambda v: type(v).__name__)
    assert list(out) == ["int", "float", "bool", "str"]


def test_records_json_is_json_dumps_of_the_non_null_values():
    frame = pd.DataFrame({"id": ["w/1", "w/2"], "height": [12.5, np.nan],
                          "levels": [3, 4], "名": [None, "学校"], "ok": [True, False]})
    assert list(records_json(frame)) == [
        '{"id": "w/1", "height": 12.5, "levels": 3, "ok": true}',
        '{"id": "w/2", "levels": 4, "名": "学校", "ok": false}',
    ]
    assert json.loads(records_json(frame)[1])["名"] == "学校"


def buildings(n=30, seed=3):
    rng = np.random.default_rng(seed)
    x, y = rng.uniform(350_000, 351_000, n), rng.uniform(3_450_000, 3_451_000, n)
    return gpd.GeoDataFrame(
        {"building_id": [f"b{i}" for i in range(n)], "kind": rng.choice(["a", "b", None], n)},
        geometry=[box(a, b, a + 10 + i, b + 20) for i, (a, b) in enumerate(zip(x, y,
                                                                                strict=True))],
        crs="EPSG:32651")


def write_row_groups(gdf, path, size):
    return write_tables((to_arrow(gdf.iloc[i:i + size]) for i in range(0, len(gdf), size)),
                        path)


def doubled_area(part):
    out = part.copy()
    out["area_x2_m2"] = 2 * part.geometry.area
    return out


def test_row_groups_become_partitions_and_geo_metadata_covers_all(tmp_path):
    gdf = buildings()
    rows, _ = write_row_groups(gdf, tmp_path / "in.parquet", 10)
    assert rows == 30 and pq.ParquetFile(tmp_path / "in.parquet").metadata.num_row_groups == 3
    assert partitions(tmp_path / "in.parquet", 10) == [[0], [1], [2]]
    assert partitions(tmp_path / "in.parquet", 25) == [[0, 1], [2]]
    geo = json.loads(pq.ParquetFile(tmp_path / "in.parquet").metadata.metadata[b"geo"])
    assert geo["columns"]["geometry"]["bbox"] == pytest.approx(list(gdf.total_bounds))
    back = gpd.read_parquet(tmp_path / "in.parquet")
    assert back.crs == gdf.crs and back.geom_equals_exact(gdf.geometry, 0).all()


@pytest.mark.parametrize("scheduler", ["synchronous", "threads", "processes"])
def test_map_file_equals_the_kernel_on_the_whole_frame(tmp_path, scheduler):
    gdf = buildings()
    write_row_groups(gdf, tmp_path / "in.parquet", 7)
    with scheduler_context(scheduler, n_workers=2, rows_per_partition=7):
        rows_in, rows_out, kept = map_file(tmp_path / "in.parquet", tmp_path / "out.parquet",
                                           doubled_area, keep=("area_x2_m2",))
    assert rows_in == rows_out == 30
    expected = doubled_area(gdf)
    got = gpd.read_parquet(tmp_path / "out.parquet")
    pd.testing.assert_series_equal(got["area_x2_m2"], expected["area_x2_m2"])
    assert kept["area_x2_m2"].tolist() == expected["area_x2_m2"].tolist()
    assert got.geom_equals_exact(gdf.geometry, 0).all()
    assert list(got["building_id"]) == list(gdf["building_id"])
    # process workers hand their partitions over as files: none is left behind
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.parquet", "out.parquet"]


def test_spatial_keys_are_comparable_across_chunks():
    bounds = (0.0, 0.0, 100.0, 100.0)
    a = spatial_keys(np.array([box(1, 1, 2, 2), box(90, 90, 91, 91)]), bounds)
    b = spatial_keys(np.array([box(1, 1, 2, 2), None]), bounds)
    assert a[0] == b[0] and a[1] != a[0] and b[1] == np.iinfo(np.int64).max


@pytest.fixture
def chunked_source(tmp_path):
    """A GeoParquet source of 25 buildings in 3 row groups; the last duplicates the first."""
    districts = gpd.read_file(BAD / "districts.geojson").to_crs("EPSG:32651")
    x0, y0 = shapely.get_coordinates(districts.geometry.iloc[0].representative_point())[0]
    geoms = [box(x0 + 40 * (i % 5), y0 + 40 * (i // 5), x0 + 40 * (i % 5) + 20,
                 y0 + 40 * (i // 5) + 15) for i in range(24)]
    src = gpd.GeoDataFrame({"fid": np.arange(25), "building": ["yes"] * 25},
                           geometry=[*geoms, geoms[0]], crs="EPSG:32651")
    src.loc[3, "geometry"] = box(x0 + 120, y0, x0 + 122, y0 + 2)  # 4 m2: too small
    write_row_groups(src, tmp_path / "src.parquet", 10)
    return ingest_config(tmp_path, [{
        "name": "t", "kind": "vector", "path": str(tmp_path / "src.parquet"), "id_field": "fid",
        "columns": {"tag_building": "building"}}]), tmp_path


@pytest.mark.parametrize("scheduler", ["threads", "processes"])
def test_chunked_ingest_accounts_for_every_row_and_sorts_spatially(chunked_source, scheduler):
    cfg, tmp = chunked_source
    with scheduler_context(scheduler, n_workers=2, rows_per_partition=10):
        acc = ingest.run(cfg, tmp)
    # process workers hand the merged partitions over as files: none is left behind
    assert sorted(p.name for p in (tmp / "processed").iterdir() if p.name.startswith(".")) == []
    assert acc["t"]["read"] == 25 and acc["t"]["kept"] == 23 and acc["t"]["rejected"] == 2
    kept = gpd.read_parquet(tmp / "processed/ingest_buildings.parquet")
    rejected = gpd.read_parquet(tmp / "processed/ingest_rejected.parquet")
    assert sorted(rejected["source_id"]) == ["24", "3"]
    dup = rejected.set_index("source_id").loc["24"]
    assert dup["reason"].startswith("duplicate of t:0")
    assert json.loads(dup["original_attributes"]) == {"fid": 24, "building": "yes"}
    assert "min_footprint_area_m2" in rejected.set_index("source_id").loc["3", "reason"]
    assert set(kept["building_id"]) == {f"t:{i}" for i in range(24) if i != 3}
    # one row group per partition, rows along the Hilbert curve
    assert pq.ParquetFile(tmp / "processed/ingest_buildings.parquet").metadata.num_row_groups == 3
    districts = ingest.load_districts(cfg.districts, cfg.working_crs, tmp)
    keys = spatial_keys(kept.geometry.to_numpy(), tuple(districts.total_bounds))
    assert (np.diff(keys) >= 0).all()


def test_chunked_ingest_equals_a_single_chunk(chunked_source):
    cfg, tmp = chunked_source
    outs = []
    for size in (4, 7, 1000):  # 4: each 10-row source row group is read in two slices
        with scheduler_context("synchronous", rows_per_partition=size):
            ingest.run(cfg, tmp)
        frame = read_partition(tmp / "processed/ingest_buildings.parquet",
                               range(pq.ParquetFile(tmp / "processed/ingest_buildings.parquet")
                                     .metadata.num_row_groups))
        outs.append(frame.sort_values("building_id").reset_index(drop=True))
    # all-null text columns read back as NaN (str) from several row groups, None from one
    plain = [pd.DataFrame(o.drop(columns="geometry")).astype(object) for o in outs]
    plain = [p.where(p.notna(), None) for p in plain]
    with scheduler_context("synchronous", rows_per_partition=4):
        chunks = ingest.source_chunks(cfg.sources[0], tmp)
    assert [c[0][3] for c in chunks] == [(0, 5), (5, 10), (0, 5), (5, 10), None]
    assert [len(ids) for _, ids in chunks] == [5, 5, 5, 5, 5]
    for k in (1, 2):
        pd.testing.assert_frame_equal(plain[0], plain[k])
        assert outs[0].geom_equals_exact(outs[k].geometry, 0).all()


@pytest.mark.slow
def test_map_file_on_a_local_cluster_equals_threads(tmp_path):
    gdf = buildings(60)
    write_row_groups(gdf, tmp_path / "in.parquet", 15)
    out = {}
    for sched in ("threads", "local-cluster"):
        with scheduler_context(sched, n_workers=2, rows_per_partition=15):
            map_file(tmp_path / "in.parquet", tmp_path / f"{sched}.parquet", doubled_area)
        out[sched] = gpd.read_parquet(tmp_path / f"{sched}.parquet")
    pd.testing.assert_frame_equal(out["threads"], out["local-cluster"])


def test_stage_files_store_the_geometry_uncompressed_and_without_statistics(tmp_path):
    path = tmp_path / "b.parquet"
    write_row_groups(buildings(), path, 10)
    meta = pq.ParquetFile(path).metadata
    names = [meta.schema.column(i).name for i in range(meta.num_columns)]
    for rg in range(meta.num_row_groups):
        for i, name in enumerate(names):
            chunk = meta.row_group(rg).column(i)
            if name == "geometry":
                assert chunk.compression == "UNCOMPRESSED" and not chunk.is_stats_set
            else:
                assert chunk.compression == "SNAPPY" and chunk.is_stats_set
    back = gpd.read_parquet(path)  # still GeoParquet that geopandas reads back
    assert back.geometry.equals(buildings().geometry) and back.crs == "EPSG:32651"


@pytest.mark.parametrize("layout", ["stage file", "named index", "no crs", "two geometries",
                                    "empty"])
def test_from_arrow_equals_geopandas_reader(tmp_path, layout):
    """The stage files' reader builds the frame geopandas builds, in every layout."""
    from geopandas.io.arrow import _arrow_to_geopandas, _geopandas_to_arrow

    from pipeline.stream import _from_arrow

    n = 0 if layout == "empty" else 5
    frame = gpd.GeoDataFrame(
        {"building_id": [f"b{i}" for i in range(n)], "area_m2": np.arange(n, dtype=float),
         "note": [None] * n},
        geometry=[box(i, 0, i + 1, 1) for i in range(n)],
        crs=None if layout == "no crs" else "EPSG:32651")
    frame = frame[["building_id", "geometry", "area_m2", "note"]]  # geometry not last
    if layout == "named index":
        frame.index = pd.Index([f"k{i}" for i in range(n)], name="key")
    if layout == "two geometries":
        frame["centre"] = frame.geometry.centroid
    table = _geopandas_to_arrow(frame, index=layout == "named index")
    got = _from_arrow(table)
    expect = _arrow_to_geopandas(table, json.loads(table.schema.metadata[b"geo"]))
    assert isinstance(got, gpd.GeoDataFrame)
    pd.testing.assert_frame_equal(got, expect)
    assert got.crs == expect.crs and got.geometry.name == "geometry"
    assert list(got.columns)[:2] == ["building_id", "geometry"]


def test_footprints_on_disk_summarise_and_read_back_the_file(tmp_path):
    """Keys, bounds and centroids per row group; footprints read back by position and window."""
    from shapely.geometry import Polygon

    from pipeline.changes import geometry_keys
    from pipeline.footprints import Footprints

    gdf = buildings(40)
    gdf.loc[5, "geometry"] = None  # a missing and an empty footprint are kept as such
    gdf.loc[9, "geometry"] = Polygon()
    gdf.loc[12, "geometry"] = shapely.MultiPolygon([box(350_100, 3_450_100, 350_110, 3_450_110),
                                                    box(350_200, 3_450_100, 350_210, 3_450_130)])
    write_row_groups(gdf, tmp_path / "in.parquet", 7)
    fp = Footprints.scan(tmp_path / "in.parquet")
    assert len(fp) == 40 and fp.starts.tolist() == [0, 7, 14, 21, 28, 35, 40]
    assert fp.crs == gdf.crs
    assert list(fp.keys) == list(geometry_keys(gdf.geometry))
    np.testing.assert_allclose(fp.bounds, gdf.geometry.bounds.to_numpy())
    cent = np.array([[g.centroid.x, g.centroid.y] if g is not None and not g.is_empty
                     else [np.nan, np.nan] for g in gdf.geometry])
    np.testing.assert_allclose(fp.centroids, cent)
    # by hand: area-weighted, (100 * 3450105 + 300 * 3450115) / 400
    assert fp.centroids[12] == pytest.approx([350_180.0, 3_450_112.5], abs=1e-6)
    rows = np.array([33, 2, 12, 2, 5, 39, 0])  # any order, repeats, a missing footprint
    got = fp.take(rows)
    assert got.crs == gdf.crs and list(got.index) == list(range(len(rows)))
    for g, r in zip(got, rows, strict=True):
        assert (g is None) if r == 5 else g.equals(gdf.geometry.iloc[r])
    assert len(fp.take(np.array([], dtype=int))) == 0
    with pytest.raises(IndexError, match="outside 0..39"):
        fp.take(np.array([40]))
    xmin, ymin = 350_300.0, 3_450_200.0
    expect = gdf.cx[xmin:xmin + 400, ymin:ymin + 500].index.to_numpy()
    assert 0 < len(expect) < 40
    assert fp.window(xmin, ymin, xmin + 400, ymin + 500).tolist() == expect.tolist()
    assert fp.window(0, 0, 1, 1).tolist() == []


def test_footprints_scan_reads_the_roof_stage_summaries_and_checks_them(tmp_path, monkeypatch,
                                                                      caplog):
    """A file with the summary columns is scanned from them, with only its first row group
    decoded; summaries that do not match its footprints are recomputed, with a warning."""
    from shapely.geometry import Polygon

    from pipeline import footprints as fpm
    from pipeline.footprints import FOOTPRINT_SUMMARY_COLUMNS, Footprints, summary_columns

    gdf = buildings(40)
    gdf.loc[5, "geometry"] = None
    gdf.loc[9, "geometry"] = Polygon()
    write_row_groups(gdf, tmp_path / "plain.parquet", 7)
    plain = Footprints.scan(tmp_path / "plain.parquet")
    summary = summary_columns(gdf.geometry.to_numpy())
    assert summary["footprint_key"][5] == "none" and summary["footprint_key"][9] == "empty"
    assert np.isnan(summary["footprint_minx_m"][[5, 9]]).all()
    # by hand: building 0 is box(x, y, x + 10, y + 20)
    x0, y0 = gdf.geometry.iloc[0].bounds[:2]
    assert [summary[c][0] for c in FOOTPRINT_SUMMARY_COLUMNS[1:]] == [x0, y0, x0 + 10, y0 + 20]
    with_cols = gdf.assign(**summary)
    write_row_groups(with_cols, tmp_path / "roof.parquet", 7)
    decoded = []
    real = fpm._decode
    monkeypatch.setattr(fpm, "_decode", lambda wkb: decoded.append(len(wkb)) or real(wkb))
    fp = Footprints.scan(tmp_path / "roof.parquet")
    assert decoded == [7]  # the check of the first row group only
    assert list(fp.keys) == list(plain.keys)
    np.testing.assert_array_equal(fp.bounds, plain.bounds)
    # summaries of other footprints (a file written by another version): recomputed
    stale = with_cols.copy()
    stale.loc[3, "footprint_key"] = "0123456789abcdef"
    write_row_groups(stale, tmp_path / "stale.parquet", 7)
    decoded.clear()
    with caplog.at_level("WARNING", logger="pipeline.footprints"):
        fp = Footprints.scan(tmp_path / "stale.parquet")
    assert "do not match its footprints" in caplog.text
    assert decoded == [7] + [7, 7, 7, 7, 7, 5]
    assert list(fp.keys) == list(plain.keys)
    np.testing.assert_array_equal(fp.bounds, plain.bounds)
