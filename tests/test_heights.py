"""Heights: raster median with windowed reads, attributes, storeys, default."""

from __future__ import annotations

import geopandas as gpd
import numpy as np
import pytest
import shapely
from pydantic import ValidationError
from shapely.geometry import box

from pipeline.errors import InputError
from pipeline.heights import (
    HeightsConfig,
    RasterHeightConfig,
    _group_median,
    building_heights,
    raster_index,
)


@pytest.fixture
def tile(tmp_path):
    """A 100 x 100 px EPSG:3857 tile at 1 m: patch 30 m, patch 12 m, ground 0, nodata."""
    import rasterio
    from affine import Affine

    data = np.zeros((100, 100), dtype="uint16")
    data[10:40, 10:40] = 30
    data[10:40, 60:90] = 12
    data[60:100, :] = 65535
    left, top = 13_527_200.0, 3_651_500.0
    path = tmp_path / "h.tif"
    with rasterio.open(path, "w", driver="GTiff", width=100, height=100, count=1,
                       dtype="uint16", crs="EPSG:3857", nodata=65535,
                       transform=Affine(1.0, 0.0, left, 0.0, -1.0, top)) as ds:
        ds.write(data, 1)
    return path, left, top


def frame(geoms_3857, height_attr=None, levels=None):
    n = len(geoms_3857)
    g = gpd.GeoDataFrame({"building_id": [f"b{i}" for i in range(n)],
                          "height_attr_m": height_attr or [np.nan] * n,
                          "levels_attr": levels or [np.nan] * n},
                         geometry=geoms_3857, crs="EPSG:3857")
    return g.to_crs("EPSG:32651")  # the working CRS differs from the raster's


def cfg(path, **kw):
    return HeightsConfig(rasters=[RasterHeightConfig(path=str(path))], **kw)


def test_raster_height_of_a_footprint_inside_one_patch(tile, tmp_path):
    path, left, top = tile
    c = cfg(path)
    geoms = [box(left + 15, top - 35, left + 35, top - 15),  # inside the 30 m patch
             box(left + 62, top - 38, left + 88, top - 12),  # inside the 12 m patch
             box(left + 2, top - 98, left + 40, top - 70)]  # over nodata only
    out = building_heights(frame(geoms, levels=[None, None, 4.0]), c, raster_index(c, tmp_path))
    assert out.raster_height_m.iloc[0] == pytest.approx(30.0)
    assert out.raster_height_m.iloc[1] == pytest.approx(12.0)
    assert np.isnan(out.raster_height_m.iloc[2])
    assert out.height_source.tolist() == ["raster", "raster", "levels"]
    assert out.height_m.iloc[2] == pytest.approx(4 * 3.0)


def test_ground_pixels_and_coverage(tile, tmp_path):
    path, left, top = tile
    c = cfg(path)
    # 30 x 30 m over the 30 m patch and 10 m of ground to its east: ground is not roof,
    # the patch pixels cover 30 * 20 / 900 = 2/3 of the footprint (>= 0.5)
    half = box(left + 10, top - 40, left + 50, top - 10)
    # 30 x 30 m over 10 m of the 30 m patch and 20 m of ground: 1/3 covered, below 0.5
    small = box(left + 30, top - 40, left + 60, top - 10)
    out = building_heights(frame([half, small], height_attr=[None, 18.0]), c,
                           raster_index(c, tmp_path))
    assert out.raster_height_m.tolist() == pytest.approx([30.0, 30.0])
    assert out.height_source.tolist() == ["raster", "attribute"]
    assert out.height_m.iloc[1] == 18.0


def test_precedence_plausibility_and_default(tmp_path):
    c = HeightsConfig(source_order=["attribute", "levels"], default_height_m=12.0)
    geoms = [box(0, 0, 10, 10)] * 4
    out = building_heights(frame(geoms, height_attr=[20.0, 900.0, None, None],
                                 levels=[3.0, 5.0, 400.0, None]),
                           c, raster_index(c, tmp_path))
    assert out.height_source.tolist() == ["attribute", "levels", "default", "default"]
    assert out.height_m.tolist() == [20.0, 15.0, 12.0, 12.0]


def test_real_sample_tile_patch(sample, tmp_path):
    """A footprint drawn inside one traced patch of a real tile gets the patch height."""
    import rasterio
    import rasterio.features

    path = sample / "height_tiles" / "height_5_5.tif"
    with rasterio.open(path) as ds:
        band = ds.read(1)
        shapes = [(shapely.geometry.shape(g), v) for g, v in rasterio.features.shapes(
            band, mask=(band != ds.nodata) & (band >= 1), transform=ds.transform,
            connectivity=4)]
    geom, value = max(shapes, key=lambda s: s[0].area)
    inner = geom.buffer(-3.0)
    assert inner.area > 50
    c = cfg(path)
    out = building_heights(frame([inner]), c, raster_index(c, tmp_path))
    assert out.raster_height_m.iloc[0] == value
    assert out.height_source.iloc[0] == "raster"


def test_missing_raster_is_a_clear_error(tmp_path):
    with pytest.raises(InputError, match=r"heights.rasters\[0\].path"):
        raster_index(cfg(tmp_path / "none*.tif"), tmp_path)


def test_group_median_and_config_checks():
    med = _group_median(np.array([0, 0, 0, 2, 2]), np.array([5.0, 1.0, 3.0, 4.0, 2.0]), 3)
    np.testing.assert_allclose(med, [3.0, np.nan, 3.0])
    with pytest.raises(ValidationError):
        HeightsConfig(source_order=["raster", "raster"])
    with pytest.raises(ValidationError):
        HeightsConfig(storey_heigth_m=3.0)


def test_overlapping_footprints_are_burnt_in_separate_layers():
    """Overlapping footprints must not steal each other's pixels (partition-independent)."""
    import numpy as np
    from shapely.geometry import box

    from pipeline.heights import _overlap_free_layers

    geoms = np.array([box(0, 0, 10, 10), box(5, 0, 15, 10), box(20, 0, 30, 10),
                      box(10, 0, 20, 10)], dtype=object)
    layers = _overlap_free_layers(geoms)
    # A and D only touch (no shared area): same layer; B overlaps both: its own layer
    assert [x.tolist() for x in layers] == [[0, 2, 3], [1]]
    assert [x.tolist() for x in _overlap_free_layers(geoms[[0, 2]])] == [[0, 1]]


def test_only_footprints_near_a_raster_are_reprojected(tile, tmp_path, monkeypatch):
    """The prefilter keeps every footprint the raster can reach: same heights as without it."""
    import pipeline.heights as heights

    path, left, top = tile
    c = cfg(path)
    index = raster_index(c, tmp_path)
    geoms = [box(left + 15, top - 35, left + 35, top - 15),  # inside the 30 m patch
             box(left - 5, top - 30, left + 20, top - 20),  # across the raster's west edge
             box(left + 62, top - 38, left + 88, top - 12),
             box(left + 5_000, top - 40, left + 5_030, top - 10)]  # 5 km away
    g = frame(geoms)
    near = heights._near_rasters(g.geometry, index, index.crs.iloc[0])
    assert near.tolist() == [True, True, True, False]
    fast = heights.raster_heights(g.geometry, index)
    monkeypatch.setattr(heights, "_near_rasters", lambda geometry, *a: np.ones(len(geometry), bool))
    slow = heights.raster_heights(g.geometry, index)
    for a, b in zip(fast, slow, strict=True):
        np.testing.assert_array_equal(a, b)
    assert np.isfinite(fast[0][:3]).all() and np.isnan(fast[0][3])
