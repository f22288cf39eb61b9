"""Shading by neighbours: horizon geometry, loss by orientation, the 80% rule, partitions."""

from __future__ import annotations

import geopandas as gpd
import numpy as np
import pandas as pd
import pytest
from shapely.geometry import box

from pipeline.parallel import map_partitions, scheduler_context
from pipeline.planes import join_plane_yield, plane_rows
from pipeline.pvyield import MONTH_COLUMNS, YieldConfig, orientation_classes
from pipeline.shading import (
    ShadingConfig,
    horizon_profile,
    horizon_table,
    neighbour_table,
    plane_orientations,
    shading_kernel,
    unshaded_share,
)

X0, Y0 = 350_000.0, 3_452_000.0
CFG = ShadingConfig(radius_m=150.0, horizon_sector_deg=10.0, min_height_difference_m=1.0,
                    min_unshaded_share=0.8)


def roofs(geoms, heights, **cols):
    n = len(geoms)
    g = gpd.GeoDataFrame({
        "building_id": [f"b{i}" for i in range(n)], "height_m": heights,
        "tilt_deg": cols.get("tilt", [20.0] * n), "azimuth_deg": cols.get("az", [180.0] * n),
        "azimuth_2_deg": cols.get("az2", [np.nan] * n),
        "usable_area_m2": 100.0, "module_area_m2": 60.0, "capacity_kwp": 12.0,
        "usable_area_2_m2": 0.0, "capacity_2_kwp": 0.0, "policy_area_m2": 50.0,
        "capacity_policy_kwp": 6.0, "capacity_policy_2_kwp": 0.0, "suitable": True,
        "unsuitable_reason": pd.Series([None] * n, dtype=object),
    }, geometry=[box(X0 + a, Y0 + b, X0 + c, Y0 + d) for a, b, c, d in geoms],
        crs="EPSG:32651")
    return g


def test_horizon_of_a_tall_neighbour_due_south():
    # roof 20 x 20 m centred at (10, 10), 10 m high; neighbour 50 m high from y = -50 to -30
    b = roofs([(0, 0, 20, 20), (-10, -50, 30, -30)], [10.0, 50.0])
    nb = neighbour_table(b)
    x, y = np.array([X0 + 10]), np.array([Y0 + 10])
    h = horizon_profile(x, y, np.array([10.0]), np.array(["b0"]), nb, CFG)[0]
    # nearest distance 40 m, 40 m taller: 45 deg; the rectangle spans azimuths
    # 180 +- atan(20 / 40) = 153.4 .. 206.6 deg -> sectors 150-160 ... 200-210
    assert h[18] == pytest.approx(45.0) and h[15] == pytest.approx(45.0)
    assert h[20] == pytest.approx(45.0) and h[14] == 0.0 and h[21] == 0.0
    assert h[:14].max() == 0.0
    # the tall building sees nothing above itself
    assert horizon_profile(np.array([X0 + 10]), np.array([Y0 - 40]), np.array([50.0]),
                           np.array(["b1"]), nb, CFG).max() == 0.0


@pytest.fixture(scope="module")
def south_table(iwec):
    classes = pd.DataFrame({"tilt_deg": [20.0, 25.0, 25.0], "azimuth_deg": [180.0, 90.0, 270.0]})
    return horizon_table(classes, iwec, YieldConfig(), 10.0)


def test_low_building_loses_more_with_the_tall_one_to_its_south(south_table):
    # low roof (10 m) with a 60 m tower 15 m to its south, and one with it 15 m to its north
    south = roofs([(0, 0, 20, 20), (-10, -45, 30, -15)], [10.0, 60.0])
    north = roofs([(0, 0, 20, 20), (-10, 35, 30, 65)], [10.0, 60.0])
    nbs, nbn = neighbour_table(south), neighbour_table(north)
    res = {}
    for name, b, nb in (("south", south, nbs), ("north", north, nbn)):
        out = shading_kernel(b, nb, south_table, CFG)
        res[name] = out.iloc[0]
    assert res["south"].beam_loss_share > 0.3
    assert res["north"].beam_loss_share < 0.05
    assert res["south"].unshaded_share < res["north"].unshaded_share < 1.0
    # the tower south of the roof makes it unsuitable, with the reason
    assert not res["south"].suitable and res["south"].capacity_kwp == 0
    assert res["south"].unsuitable_reason.startswith("shaded by neighbours")
    assert res["north"].suitable and res["north"].capacity_kwp == 12.0


def test_open_roof_keeps_everything(south_table):
    b = roofs([(0, 0, 20, 20)], [10.0])
    out = shading_kernel(b, neighbour_table(b), south_table, CFG)
    assert out.unshaded_share.iloc[0] == 1.0 and out.beam_loss_share.iloc[0] == 0.0
    share, loss = unshaded_share(np.full((1, 36), 90.0), np.array([20.0]), np.array([180.0]),
                                 south_table)
    assert share[0] == pytest.approx(south_table.ground[0] / (south_table.beam[0]
                                     + south_table.sky[0] + south_table.ground[0]))
    assert loss[0] == pytest.approx(1.0)


def test_shaded_plane_gives_way_to_the_other(south_table):
    # east/west planes; a tower close to the east blocks the east plane's morning sun
    b = roofs([(0, 0, 20, 20), (30, -20, 50, 40)], [8.0, 30.0], tilt=[25.0, 25.0],
              az=[90.0, 90.0], az2=[270.0, 270.0])
    b.loc[:, "usable_area_2_m2"] = 50.0
    b.loc[:, "capacity_2_kwp"] = 6.0
    out = shading_kernel(b, neighbour_table(b), south_table, CFG).iloc[0]
    assert out.suitable and out.azimuth_deg == 270.0 and np.isnan(out.azimuth_2_deg)
    assert out.capacity_kwp == pytest.approx(6.0) and out.capacity_2_kwp == 0.0
    assert out.unshaded_share >= 0.8


def test_neighbours_in_other_partitions_count(south_table):
    rng = np.random.default_rng(3)
    geoms, heights = [], []
    for _ in range(40):
        x, y = rng.uniform(0, 400, 2)
        geoms.append((x, y, x + 20, y + 15))
        heights.append(float(rng.choice([6.0, 30.0, 80.0])))
    b = roofs(geoms, heights)
    nb = neighbour_table(b)
    serial = shading_kernel(b, nb, south_table, CFG)
    with scheduler_context("synchronous", npartitions=4):
        parted = map_partitions(b, shading_kernel, nb, south_table, CFG)
    pd.testing.assert_frame_equal(serial, parted)
    assert (serial.horizon_max_deg > 0).sum() > 10


def test_plane_yield_sums_the_planes_with_their_shading():
    table = pd.DataFrame({"tilt_deg": [25.0, 25.0], "azimuth_deg": [90.0, 270.0],
                          "specific_yield_kwh_per_kwp": [1000.0, 800.0]})
    for name in MONTH_COLUMNS:
        table[name] = table["specific_yield_kwh_per_kwp"] / 12
    b = pd.DataFrame({"tilt_deg": [25.0], "azimuth_deg": [90.0], "azimuth_2_deg": [270.0],
                      "capacity_kwp": [10.0], "capacity_2_kwp": [4.0],
                      "capacity_policy_kwp": [7.0], "capacity_policy_2_kwp": [1.0],
                      "unshaded_share": [0.5], "unshaded_share_2": [np.nan]})
    assert len(plane_rows(b)) == 2 and len(orientation_classes(plane_orientations(b))) == 2
    out = join_plane_yield(b, table, 1.0).iloc[0]
    # plane 1: 6 kWp x 1000 x 0.5 = 3 MWh; plane 2: 4 kWp x 800 = 3.2 MWh
    assert out.energy_mwh_per_year == pytest.approx(6.2)
    assert out.specific_yield_kwh_per_kwp == pytest.approx(620.0)
    # policy: 6 kWp on plane 1 x 1000 x 0.5 + 1 kWp on plane 2 x 800
    assert out.energy_policy_mwh_per_year == pytest.approx(3.8)
    months = [out[f"energy_m{m:02d}_mwh"] for m in range(1, 13)]
    assert sum(months) == pytest.approx(6.2)


def test_config_rejects_bad_sector():
    with pytest.raises(ValueError, match="divide 360"):
        ShadingConfig(horizon_sector_deg=7.0)
