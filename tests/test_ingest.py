"""Ingest: readers, repair, reprojection, districts and accounting."""

from __future__ import annotations

import json

import geopandas as gpd
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import shapely
import shapely.affinity
from shapely.geometry import LineString, Point, Polygon, box

from pipeline import ingest
from pipeline.config import SourceConfig
from pipeline.dedup import box_pairs, candidate_groups, find_duplicates, overlapping_pairs
from pipeline.errors import InputError
from pipeline.glossary import ATTRIBUTE_COLUMNS
from pipeline.ingest import (
    assign_districts,
    group_partitions,
    normalise_footprints,
    read_source,
    trace_raster_footprints,
)
from pipeline.parallel import scheduler_context
from pipeline.stream import read_partition, spatial_keys
from tests.conftest import ROOT, ingest_config

BAD = ROOT / "tests/data/bad"


def canonical(geoms, crs="EPSG:32651", building=None):
    n = len(geoms)
    data = {c: pd.Series([pd.NA] * n, dtype="object") for c in ATTRIBUTE_COLUMNS}
    data["tag_building"] = pd.Series(building or ["yes"] * n, dtype="object")
    data["source"] = "t"
    data["source_id"] = [str(i) for i in range(n)]
    return gpd.GeoDataFrame(data, geometry=list(geoms), crs=crs)


def test_normalise_repairs_rejects_and_measures():
    bowtie = Polygon([(0, 0), (10, 10), (10, 0), (0, 10), (0, 0)])
    gdf = canonical([box(0, 0, 40, 25), bowtie, None, LineString([(0, 0), (1, 1)]),
                     Point(0, 0), box(0, 0, 2, 2), Polygon([(0, 0), (1, 0), (2, 0), (0, 0)])])
    out = normalise_footprints(gdf, "EPSG:32651", 20.0, 1e6, "all")
    assert out.role.tolist() == ["building", "building", "rejected", "rejected", "poi",
                                 "rejected", "rejected"]
    assert out.footprint_area_m2.iloc[0] == pytest.approx(1000.0)
    assert out.geometry_repaired.iloc[1] and out.footprint_area_m2.iloc[1] == pytest.approx(50.0)
    assert out.reason.iloc[2] == "null or empty geometry"
    assert out.reason.iloc[3] == "not polygonal: LineString"
    assert "min_footprint_area_m2" in out.reason.iloc[5]
    assert "make_valid cannot" in out.reason.iloc[6]
    assert out.reason.iloc[0] is None


def test_polygons_without_building_tag_become_areas():
    gdf = canonical([box(0, 0, 100, 100), box(0, 0, 50, 50)], building=[None, None])
    gdf.loc[0, "tag_amenity"] = "school"
    out = normalise_footprints(gdf, "EPSG:32651", 20.0, 1e6, "tag_building_not_null")
    assert out.role.tolist() == ["area", "rejected"]
    assert (out.reason.str.startswith("not a building")).all()


def test_areas_are_measured_in_the_metric_crs():
    # a 0.001 deg square at 31 N is ~95 m x 111 m; measured after reprojection, not in degrees
    gdf = canonical([box(121.0, 31.0, 121.001, 31.001)], crs="EPSG:4326")
    out = normalise_footprints(gdf, "EPSG:32651", 20.0, 1e6, "all")
    assert out.crs == "EPSG:32651"
    assert 10_000 < out.footprint_area_m2.iloc[0] < 11_000


def test_assign_districts_by_centroid():
    districts = gpd.GeoDataFrame({"district_name": ["A", "B"], "district_adcode": ["1", "2"]},
                                 geometry=[box(0, 0, 100, 100), box(100, 0, 200, 100)],
                                 crs="EPSG:32651")
    b = canonical([box(90, 10, 130, 20), box(10, 10, 20, 20), box(500, 500, 510, 510)])
    out = assign_districts(b, districts)
    assert out.district_name.tolist()[:2] == ["B", "A"]
    assert pd.isna(out.district_name.iloc[2])


def test_missing_crs_is_an_error_naming_the_file(tmp_path):
    p = tmp_path / "nocrs.geojson"
    p.write_text(json.dumps({"type": "FeatureCollection", "features": [
        {"type": "Feature", "properties": {"b": "yes"},
         "geometry": {"type": "Polygon", "coordinates": [[[0, 0], [0, 10], [10, 10], [0, 0]]]}}]}))
    # GeoJSON defaults to WGS84 in GDAL; write a shapefile without .prj instead
    with pytest.warns(UserWarning, match="crs"):
        gpd.read_file(p).set_crs(None, allow_override=True).to_file(tmp_path / "nocrs.shp")
    (tmp_path / "nocrs.prj").unlink(missing_ok=True)
    src = SourceConfig(name="x", path=tmp_path / "nocrs.shp", columns={"tag_building": "b"})
    with pytest.raises(InputError, match=r"nocrs.shp \[crs\]: the file has no CRS"):
        read_source(src, tmp_path)
    src2 = SourceConfig(name="x", path=tmp_path / "nocrs.shp", columns={"tag_building": "b"},
                        crs_if_missing="EPSG:32651")
    assert read_source(src2, tmp_path).crs == "EPSG:32651"


def test_missing_mapped_field_names_field_and_fix(tmp_path):
    gdf = gpd.GeoDataFrame({"b": ["yes"]}, geometry=[box(0, 0, 10, 10)], crs="EPSG:32651")
    gdf.to_file(tmp_path / "f.gpkg")
    src = SourceConfig(name="x", path=tmp_path / "f.gpkg", columns={"tag_building": "building"})
    with pytest.raises(InputError) as err:
        read_source(src, tmp_path)
    msg = str(err.value)
    assert "f.gpkg" in msg and "[building]" in msg and "sources[x].columns" in msg


def test_geoparquet_source(tmp_path):
    gdf = gpd.GeoDataFrame({"id": [7], "use": ["school"]}, geometry=[box(0, 0, 10, 10)],
                           crs="EPSG:32651")
    gdf.to_parquet(tmp_path / "b.parquet")
    src = SourceConfig(name="pq", path=tmp_path / "b.parquet", id_field="id",
                       columns={"tag_building": "use"})
    out = read_source(src, tmp_path)
    assert out.source_id.tolist() == ["7"] and out.tag_building.tolist() == ["school"]


OSM_XML = """<?xml version='1.0' encoding='UTF-8'?>
<osm version="0.6" generator="hand">
  <node id="1" lat="31.2000" lon="121.4000" version="1"/>
  <node id="2" lat="31.2000" lon="121.4005" version="1"/>
  <node id="3" lat="31.2004" lon="121.4005" version="1"/>
  <node id="4" lat="31.2004" lon="121.4000" version="1"/>
  <node id="5" lat="31.2002" lon="121.4002" version="1">
    <tag k="amenity" v="school"/><tag k="name" v="某某小学"/>
  </node>
  <way id="10" version="1">
    <nd ref="1"/><nd ref="2"/><nd ref="3"/><nd ref="4"/><nd ref="1"/>
    <tag k="building" v="school"/><tag k="building:levels" v="4"/>
    <tag k="roof:shape" v="flat"/><tag k="name" v="某某小学教学楼"/>
  </way>
</osm>
"""


def test_osm_driver_reads_polygons_points_and_other_tags(tmp_path):
    p = tmp_path / "tiny.osm"
    p.write_text(OSM_XML, encoding="utf-8")
    src = SourceConfig(name="osm", kind="osm", path=p, id_field="id", columns={
        "name": "name", "tag_building": "building", "tag_amenity": "amenity",
        "tag_roof_shape": "roof:shape", "levels_attr": "building:levels"})
    out = read_source(src, tmp_path)
    poly = out[out.geometry.geom_type.isin(["Polygon", "MultiPolygon"])].iloc[0]
    assert poly.source_id == "way/10" and poly.tag_building == "school"
    assert poly.levels_attr == 4.0 and poly.tag_roof_shape == "flat"
    pt = out[out.geometry.geom_type == "Point"]
    assert "node/5" in pt.source_id.tolist()
    assert pt.set_index("source_id").loc["node/5", "tag_amenity"] == "school"


def test_cbdc_names_are_repaired(sample):
    src = SourceConfig(name="cbdc", path=sample / "cbdc_prototype/310000SHANGHAISHI.shp",
                       encoding="utf-8", text_repair="gbk_read_as_latin1", id_field="BuildingID",
                       columns={"name": "BDName", "land_use_code": "landUseTyp"})
    out = read_source(src, sample)
    names = set(out.name.dropna())
    assert {"上海市应急管理局", "武宁中学", "上海中心大厦"} <= names
    assert len(out) == 113 and out.source_id.str.fullmatch(r"\d+").all()


def test_raster_footprints_carry_the_tile_height(sample):
    src = SourceConfig(name="h", kind="raster_footprints", path=sample / "height_tiles",
                       raster_glob="height_2_7.tif")
    out = trace_raster_footprints(sample / "height_tiles/height_2_7.tif", src)
    import rasterio

    with rasterio.open(sample / "height_tiles/height_2_7.tif") as ds:
        band = ds.read(1)
        values = set(np.unique(band[band != ds.nodata]).astype(float))
        # every traced patch carries a height seen in the tile, at the pixel under it
        row, col = ds.index(*out.geometry.iloc[0].representative_point().coords[0])
        assert out.height_m.iloc[0] == float(band[row, col])
    assert set(out.height_m) <= values
    assert out.crs == "EPSG:3857"


# ------------------------------------------------------------------ dedup across partitions
def test_box_pairs_equal_an_strtree_query():
    rng = np.random.default_rng(7)
    n = 600
    x, y = rng.uniform(0, 500, n), rng.uniform(0, 500, n)
    w, h = rng.lognormal(2, 1, n), rng.lognormal(2, 1, n)
    bounds = np.c_[x, y, x + w, y + h]
    bounds[::40, 2] = bounds[::40, 0]  # zero width
    bounds[1::40] = bounds[0::40]  # identical boxes
    bounds[2::40] = np.tile(bounds[0::40, 2:], 2) + [0, 0, 5, 5]  # touching at a corner
    bounds[3] = (-50, -50, 600, 600)  # over everything
    bounds[5:9] = [(0, 200, 500, 201), (200, 0, 201, 500), (100, 100, 300, 300),
                   (250, 250, 450, 450)]  # over more grid cells than are listed one by one
    bounds[4] = np.nan  # no geometry: in no pair
    geoms = shapely.box(*bounds.T)
    ti, tj = shapely.STRtree(geoms).query(geoms)
    expected = {(a, b) for a, b in zip(ti.tolist(), tj.tolist(), strict=True) if a < b}
    for block_rows in (1, 37, 10_000):
        i, j = box_pairs(bounds, block_rows)
        got = list(zip(i.tolist(), j.tolist(), strict=True))
        assert len(got) == len(set(got)) and set(got) == expected


def rotated_footprints(n, seed):
    """Rectangles of random size and angle, a third of them copied with a small shift."""
    rng = np.random.default_rng(seed)
    x, y = rng.uniform(0, 300, n), rng.uniform(0, 300, n)
    geoms = [shapely.affinity.rotate(box(a, b, a + rng.uniform(5, 30), b + rng.uniform(5, 30)),
                                     rng.uniform(0, 90)) for a, b in zip(x, y, strict=True)]
    copies = [shapely.affinity.translate(g, *rng.normal(0, 3, 2)) for g in geoms[: n // 3]]
    return np.array(geoms + copies, dtype=object)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_candidate_groups_hold_every_duplicate_chain(seed):
    geoms = rotated_footprints(150, seed)
    frame = canonical(geoms)
    frame["building_id"] = [f"t:{k}" for k in range(len(frame))]
    frame["footprint_area_m2"] = shapely.area(geoms)
    frame.loc[::3, "name"] = "named"  # richer records
    group = candidate_groups(shapely.bounds(geoms), shapely.area(geoms), 0.5, 0.25, 50)
    i, j, _, _ = overlapping_pairs(geoms, 0.5, 0.25)
    assert len(i) > 20 and (group[i] == group[j]).all()
    assert (group <= np.arange(len(group))).all() and (group[group] == group).all()
    # find_duplicates over whole groups, one set of groups at a time, equals one run over all
    whole = find_duplicates(frame, 0.5, 0.25, ["t"])
    parts = [find_duplicates(frame[group % 3 == k], 0.5, 0.25, ["t"]) for k in range(3)]
    pd.testing.assert_frame_equal(pd.concat(parts).sort_index(), whole.sort_index())


def test_group_partitions_moves_straddling_groups_to_their_first_partition():
    partition = np.array([0, 0, 1, 1, 2, 2, 3])
    group = np.array([0, 1, 1, 3, 1, 5, 5])  # {1, 2, 4} spans 0-2, {5, 6} spans 2-3
    assert group_partitions(partition, group).tolist() == [0, 0, 0, 1, 0, 2, 2]
    assert group_partitions(partition, np.arange(7)).tolist() == partition.tolist()


@pytest.mark.parametrize("size", [1, 3, 40, 1000])
def test_merge_plan_reads_every_row_once_and_keeps_groups_whole(size, caplog):
    geoms = rotated_footprints(120, 5)
    geoms[7] = Polygon([(50, 50), (70, 50), (70, 70), (300, 300), (69, 70), (50, 70)])  # spike
    keys = spatial_keys(geoms, (0.0, 0.0, 1000.0, 1000.0))
    spills = np.array_split(np.arange(len(geoms)), 4)  # four chunks, each sorted by key
    spills = [s[np.argsort(keys[s], kind="stable")] for s in spills]
    plan = ingest.merge_plan([keys[s] for s in spills], [shapely.bounds(geoms[s]) for s in spills],
                             [shapely.area(geoms[s]) for s in spills], size, 0.5, 0.25)
    read = [np.concatenate([spills[n][a:b][take if take is not None else slice(None)]
                            for n, a, b, take, _ in part]) for part in plan]
    assert sorted(np.concatenate(read).tolist()) == list(range(len(geoms)))
    for part, rows in zip(plan, read, strict=True):
        assert (np.concatenate([k for *_, k in part]) == keys[rows]).all()
    group = candidate_groups(shapely.bounds(geoms), shapely.area(geoms), 0.5, 0.25, size)
    where = np.empty(len(geoms), dtype=int)
    for p, rows in enumerate(read):
        where[rows] = p
    assert all(len(set(where[group == g])) == 1 for g in np.unique(group))
    # the spike's box holds footprints of its size: they form one large group
    assert geoms[7].is_valid and np.bincount(group)[group[7]] > 20
    assert (np.bincount(group).max() > size) == ("more than a partition" in caplog.text)


@pytest.fixture
def straddling_duplicates(tmp_path):
    """Two sources whose duplicates are a few metres apart (so their Hilbert keys differ).

    ``osm`` has ten bare footprints in a row; ``survey`` has a richer copy of
    osm:2 (kept instead of it), an equally poor copy of osm:5 (osm is listed
    first, so osm:5 is kept), a chain around osm:8 (survey:102 overlaps osm:8
    and survey:103, which do not overlap each other; survey:103 is richest, so
    survey:102 goes as its duplicate and osm:8 stays) and a footprint that
    only touches osm:0.
    """
    districts = gpd.read_file(BAD / "districts.geojson").to_crs("EPSG:32651")
    x0, y0 = shapely.get_coordinates(districts.geometry.iloc[0].representative_point())[0]

    def footprint(k, dx=0.0, dy=0.0):
        return box(x0 + 40 * k + dx, y0 + dy, x0 + 40 * k + 20 + dx, y0 + 15 + dy)

    osm = gpd.GeoDataFrame({"fid": np.arange(10), "building": ["yes"] * 10},
                           geometry=[footprint(k) for k in range(10)], crs="EPSG:32651")
    survey = gpd.GeoDataFrame(
        {"fid": [100, 101, 102, 103, 104], "building": ["yes"] * 5,
         "height": [18.0, None, None, 24.0, None]},
        geometry=[footprint(2, 3, 1), footprint(5, 2, -1), footprint(8, 8), footprint(8, 16),
                  footprint(0, 0, 15)], crs="EPSG:32651")
    for name, gdf in (("osm", osm), ("survey", survey)):
        gdf.to_parquet(tmp_path / f"{name}.parquet", row_group_size=4)
    return ingest_config(tmp_path, [
        {"name": "osm", "kind": "vector", "path": str(tmp_path / "osm.parquet"),
         "id_field": "fid", "columns": {"tag_building": "building"}},
        {"name": "survey", "kind": "vector", "path": str(tmp_path / "survey.parquet"),
         "id_field": "fid", "columns": {"tag_building": "building", "height_attr_m": "height"}},
    ]), tmp_path


def run_ingest(cfg, tmp, scheduler="synchronous", **partitioning):
    with scheduler_context(scheduler, n_workers=2, **partitioning):
        acc = ingest.run(cfg, tmp)
    path = tmp / "processed/ingest_buildings.parquet"
    kept = read_partition(path, range(pq.ParquetFile(path).metadata.num_row_groups))
    rejected = gpd.read_parquet(tmp / "processed/ingest_rejected.parquet")
    written = json.loads((tmp / "processed/ingest_accounting.json").read_text(encoding="utf-8"))
    assert written == acc
    return acc, kept, rejected, path


def test_duplicates_across_a_partition_edge_do_not_depend_on_the_partitioning(
        straddling_duplicates):
    cfg, tmp = straddling_duplicates
    districts = ingest.load_districts(cfg.districts, cfg.working_crs, tmp)
    runs = {}
    for size in (1, 2, 3, 7, 1000):
        acc, kept, rejected, path = run_ingest(cfg, tmp, rows_per_partition=size)
        if size == 1:  # the premise: every partition holds one key, so each pair straddles one
            keys = spatial_keys(np.r_[kept.geometry.to_numpy(), rejected.geometry.to_numpy()],
                                tuple(districts.total_bounds))
            assert len(np.unique(keys)) == len(keys) == 15
        reasons = dict(zip(rejected["building_id"], rejected["reason"], strict=True))
        assert sorted(reasons) == ["osm:2", "survey:101", "survey:102"], (size, reasons)
        assert reasons["osm:2"].startswith("duplicate of survey:100 (")
        assert reasons["survey:101"].startswith("duplicate of osm:5 (84% of")
        assert reasons["survey:102"].startswith("duplicate of survey:103 (")
        assert "richness 3 vs 0" in reasons["osm:2"]
        assert (rejected["stage"] == "ingest").all()
        assert json.loads(reasons and rejected.set_index("building_id").loc[
            "survey:102", "original_attributes"])["fid"] == 102
        assert len(set(kept["building_id"])) == len(kept) == 12
        assert not set(kept["building_id"]) & set(reasons)
        # the accounting: every building read is kept or rejected with a reason
        for src, n_read, n_kept in (("osm", 10, 9), ("survey", 5, 3)):
            a = acc[src]
            assert (a["read"], a["kept"], a["rejected"]) == (n_read, n_kept, n_read - n_kept)
            assert a["kept"] == (kept["source"] == src).sum()
            assert a["rejected"] == (rejected["source"] == src).sum()
            assert sum(a["rejected_by_reason"].values()) == a["rejected"]
            assert list(a["rejected_by_reason"]) == [
                "duplicate of a richer footprint (ingest.dedup_min_overlap_share, "
                "dedup_min_area_ratio)"]
        # each row group is sorted along the Hilbert curve (moved rows are sorted in)
        pf = pq.ParquetFile(path)
        for rg in range(pf.metadata.num_row_groups):
            part = read_partition(path, [rg])
            assert (np.diff(spatial_keys(part.geometry.to_numpy(),
                                         tuple(districts.total_bounds))) >= 0).all()
        runs[size] = (kept.sort_values("building_id").reset_index(drop=True),
                      rejected.sort_values("building_id").reset_index(drop=True))
    first_kept, first_rejected = runs[1000]
    for size, (kept, rejected) in runs.items():
        assert kept["building_id"].tolist() == first_kept["building_id"].tolist(), size
        assert kept.geom_equals_exact(first_kept.geometry, 0).all()
        pd.testing.assert_frame_equal(rejected, first_rejected)


@pytest.mark.parametrize("scheduler", ["threads", "processes"])
def test_straddling_duplicates_with_workers(straddling_duplicates, scheduler):
    cfg, tmp = straddling_duplicates
    acc, kept, rejected, _ = run_ingest(cfg, tmp, scheduler, rows_per_partition=2)
    assert sorted(rejected["building_id"]) == ["osm:2", "survey:101", "survey:102"]
    assert acc["osm"]["kept"] + acc["survey"]["kept"] == len(kept) == 12
