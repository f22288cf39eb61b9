"""Ingest: readers, repair, reprojection, districts and accounting."""

from __future__ import annotations

import json

import geopandas as gpd
import numpy as np
import pandas as pd
import pytest
from shapely.geometry import LineString, Point, Polygon, box

from pipeline.config import SourceConfig
from pipeline.errors import InputError
from pipeline.glossary import ATTRIBUTE_COLUMNS
from pipeline.ingest import (
    assign_districts,
    normalise_footprints,
    read_source,
    trace_raster_footprints,
)


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
