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
    envelope_pairs,
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


# --- fast paths against the former (slow) implementations -----------------------------------

def _horizon_reference(x, y, height_m, ids, nb, cfg):
    """Former horizon_profile: rotated-rectangle polygons in the tree, centroid prefilter."""
    import shapely

    from pipeline.shading import point_rectangle_distance

    n_sec = int(round(360.0 / cfg.horizon_sector_deg))
    horizon = np.zeros((len(x), n_sec))
    r = cfg.radius_m
    near = ((nb["x"] > np.nanmin(x) - r - 1e3) & (nb["x"] < np.nanmax(x) + r + 1e3)
            & (nb["y"] > np.nanmin(y) - r - 1e3) & (nb["y"] < np.nanmax(y) + r + 1e3)
            & (nb["height_m"] >= np.nanmin(height_m) + cfg.min_height_difference_m))
    nb = nb[near.to_numpy()]
    c = nb[["c0x", "c0y", "c1x", "c1y", "c2x", "c2y", "c3x", "c3y"]].to_numpy().reshape(-1, 4, 2)
    rects = shapely.polygons(np.concatenate([c, c[:, :1]], axis=1))
    i, j = shapely.STRtree(rects).query(shapely.box(x - r, y - r, x + r, y + r))
    dh = nb["height_m"].to_numpy(dtype=float)[j] - height_m[i]
    keep = (dh >= cfg.min_height_difference_m) & (nb["building_id"].to_numpy()[j] != ids[i])
    i, j, dh = i[keep], j[keep], dh[keep]
    d = point_rectangle_distance(x[i], y[i], c[j])
    nx, ny = nb["x"].to_numpy()[j], nb["y"].to_numpy()[j]
    inside = d <= 1e-9
    d = np.where(inside, np.hypot(nx - x[i], ny - y[i]), d)
    ok = (d <= r) & (d > 1e-9)
    i, dh, d, c_ij, inside, nx, ny = i[ok], dh[ok], d[ok], c[j[ok]], inside[ok], nx[ok], ny[ok]
    elev = np.degrees(np.arctan2(dh, d))
    az0 = np.degrees(np.arctan2(nx - x[i], ny - y[i]))
    az_c = np.degrees(np.arctan2(c_ij[:, :, 0] - x[i, None], c_ij[:, :, 1] - y[i, None]))
    rel = np.mod(az_c - az0[:, None] + 180.0, 360.0) - 180.0
    lo = np.where(inside, 0.0, az0 + rel.min(axis=1))
    hi = np.where(inside, 360.0 - 1e-9, az0 + rel.max(axis=1))
    w = cfg.horizon_sector_deg
    for k in range(len(i)):
        first, last = int(np.floor(lo[k] / w)), int(np.floor(hi[k] / w))
        for s in range(first, first + min(last - first + 1, n_sec)):
            horizon[i[k], s % n_sec] = max(horizon[i[k], s % n_sec], elev[k])
    return horizon


@pytest.mark.parametrize("min_dh", [1.0, 0.0])  # 0: a roof must still not shade itself
def test_horizon_profile_equals_the_polygon_tree_on_a_dense_town(min_dh):
    from shapely import affinity

    cfg = CFG.model_copy(update={"min_height_difference_m": min_dh})

    rng = np.random.default_rng(11)
    n = 400
    cx, cy = rng.uniform(0, 900, n), rng.uniform(0, 900, n)
    geoms = [affinity.rotate(box(X0 + a - w, Y0 + b - d, X0 + a + w, Y0 + b + d), ang)
             for a, b, w, d, ang in zip(cx, cy, rng.uniform(4, 30, n), rng.uniform(4, 15, n),
                                        rng.uniform(0, 180, n), strict=True)]
    b = gpd.GeoDataFrame({"building_id": [f"b{i}" for i in range(n)],
                          "height_m": rng.choice([6.0, 12.0, 24.0, 60.0, 100.0], n)},
                         geometry=geoms, crs="EPSG:32651")
    nb = neighbour_table(b)
    roofs_ = slice(0, 250)  # a partition: the others are neighbours only
    x, y = nb["x"].to_numpy()[roofs_], nb["y"].to_numpy()[roofs_]
    h, ids = nb["height_m"].to_numpy()[roofs_], nb["building_id"].to_numpy()[roofs_]
    got = horizon_profile(x, y, h, ids, nb, cfg)
    ref = _horizon_reference(x, y, h, ids, nb, cfg)
    assert (got > 0).any(axis=1).mean() > 0.3
    np.testing.assert_array_equal(got, ref)


def test_unshaded_share_equals_the_full_gather(south_table):
    from pipeline.shading import ELEVATION_STEP_DEG

    rng = np.random.default_rng(2)
    n = 300
    horizon = np.where(rng.uniform(size=(n, 36)) < 0.2, rng.uniform(0, 60, (n, 36)), 0.0)
    horizon[:120] = 0.0  # open sky
    tilt = rng.choice([20.0, 25.0], n)
    az = np.where(tilt == 20.0, 180.0, rng.choice([90.0, 270.0], n))
    az[:5] = np.nan  # no plane
    share, loss = unshaded_share(horizon, tilt, az, south_table)
    # the former per-row gather over every roof
    from pipeline.pvyield import _class_key

    pos = pd.Index(south_table.keys).get_indexer(_class_key(tilt, az, south_table.step_deg))
    has = pos >= 0
    hh = np.clip(horizon[has], 0.0, 90.0) / ELEVATION_STEP_DEG
    j0 = np.floor(hh).astype(int)
    frac = hh - j0
    p, k, cum = pos[has][:, None], np.arange(36)[None, :], south_table.cum_beam
    blocked = (cum[p, k, j0] + frac * (cum[p, k, j0 + 1] - cum[p, k, j0])).sum(axis=1)
    b, d, g = (south_table.beam[pos[has]], south_table.sky[pos[has]],
               south_table.ground[pos[has]])
    sky = np.mean(np.sin(np.radians(np.clip(horizon[has], 0, 90))) ** 2, axis=1)
    np.testing.assert_array_equal(share[has], np.clip((b - blocked + d * (1 - sky) + g)
                                                      / (b + d + g), 0, 1))
    np.testing.assert_array_equal(loss[has], np.clip(blocked / b, 0, 1))
    assert np.isnan(share[:5]).all() and (loss[5:120] == 0).all()
    assert (share[120:][has[120:]] < 1).any()


@pytest.mark.parametrize("r", [150.0, 10.0, 0.3])
def test_envelope_pairs_equal_the_tree_query(r):
    import shapely

    rng = np.random.default_rng(int(r * 10))
    n, m = 3000, 6000
    x, y = rng.uniform(0, 5000, n), rng.uniform(0, 5000, n)
    x[:5] = np.nan
    cx, cy = rng.uniform(-300, 5300, m), rng.uniform(-300, 5300, m)
    w, h = rng.exponential(15, m), rng.exponential(15, m)
    w[:3] = 2500.0  # boxes across many strips
    lo_x, hi_x, lo_y, hi_y = cx - w, cx + w, cy - h, cy + h
    lo_x[-3:] = np.nan  # an empty footprint
    # boxes touching a square exactly at its edge or corner count, as in the tree
    lo_x[10], lo_y[10], hi_x[10], hi_y[10] = x[10] + r, y[10] - 1, x[10] + r + 5, y[10] + 1
    lo_x[11], lo_y[11], hi_x[11], hi_y[11] = x[11] - r - 5, y[11] + r, x[11] - r, y[11] + r + 3
    i, j = envelope_pairs(x, y, r, lo_x, lo_y, hi_x, hi_y)
    tree = shapely.STRtree(shapely.box(lo_x, lo_y, hi_x, hi_y))
    ti, tj = tree.query(shapely.box(x - r, y - r, x + r, y + r))
    got = set(zip(i.tolist(), j.tolist(), strict=True))
    assert len(got) == len(i)  # no pair twice
    assert got == set(zip(ti.tolist(), tj.tolist(), strict=True))
    assert (10, 10) in got and (11, 11) in got


def test_point_rectangle_distance_equals_the_array_form():
    from pipeline.shading import point_rectangle_distance

    def array_form(px, py, corners):  # the former (m, 4, 2) implementation
        ab = np.roll(corners, -1, axis=1) - corners
        ap = np.stack([px, py], axis=-1)[:, None, :] - corners
        len2 = (ab ** 2).sum(axis=2)
        with np.errstate(invalid="ignore", divide="ignore"):
            t = np.clip(np.where(len2 > 0, (ap * ab).sum(axis=2) / len2, 0.0), 0.0, 1.0)
        dist = np.hypot(ap[..., 0] - t * ab[..., 0], ap[..., 1] - t * ab[..., 1]).min(axis=1)
        cross = ab[..., 0] * ap[..., 1] - ab[..., 1] * ap[..., 0]
        inside = (cross >= 0).all(axis=1) | (cross <= 0).all(axis=1)
        return np.where(inside, 0.0, dist)

    rng = np.random.default_rng(4)
    m = 20_000
    corners = rng.uniform(0, 100, (m, 4, 2)) + [X0, Y0]
    corners[:10] = corners[:10, :1]  # degenerate: a point
    px, py = rng.uniform(0, 100, m) + X0, rng.uniform(0, 100, m) + Y0
    got = point_rectangle_distance(px, py, corners)
    np.testing.assert_array_equal(got, array_form(px, py, corners))
    # by hand: a 10 x 10 square, points outside, on an edge, inside
    sq = np.array([[[0, 0], [10, 0], [10, 10], [0, 10]]] * 3, dtype=float)
    assert point_rectangle_distance(np.array([13.0, 10.0, 5.0]), np.array([14.0, 5.0, 5.0]),
                                    sq).tolist() == [5.0, 0.0, 0.0]


def _obstacle_roofs(geoms, rng):
    """Roof-stage-like frame of footprints with random heights and orientations."""
    n = len(geoms)
    az = rng.choice([180.0, 90.0, 270.0], n)
    b = roofs([(0, 0, 1, 1)] * n, rng.choice([6.0, 12.0, 24.0, 60.0], n), az=az,
              tilt=np.where(az == 180.0, 20.0, 25.0))
    return b.set_geometry(gpd.GeoSeries(geoms, crs="EPSG:32651"))


def _town_and_sample_footprints(sample):
    """Rotated boxes of a dense town and the real sample footprint templates."""
    from shapely import affinity

    from bench.generate import load_templates

    rng = np.random.default_rng(11)
    n = 600
    town = [affinity.rotate(box(X0 + a - w, Y0 + b - d, X0 + a + w, Y0 + b + d), ang)
            for a, b, w, d, ang in zip(rng.uniform(0, 700, n), rng.uniform(0, 700, n),
                                       rng.uniform(4, 30, n), rng.uniform(4, 15, n),
                                       rng.uniform(0, 180, n), strict=True)]
    templates = load_templates(sample)[0][:600]
    placed = [affinity.translate(g, X0 + x, Y0 + y) for g, x, y in zip(
        templates, rng.uniform(0, 700, len(templates)), rng.uniform(0, 700, len(templates)),
        strict=True)]
    return town + placed


def test_obstacle_columns_give_the_same_table_and_kernel(sample, south_table):
    from pipeline.shading import OBSTACLE_COLUMNS, obstacle_columns

    rng = np.random.default_rng(12)
    b = _obstacle_roofs(_town_and_sample_footprints(sample), rng)
    cols = obstacle_columns(np.asarray(b.geometry.array, dtype=object))
    assert set(cols) == set(OBSTACLE_COLUMNS)
    fast_in = pd.DataFrame(b.drop(columns="geometry")).assign(**cols)  # no geometry at all
    nb_slow, nb_fast = neighbour_table(b), neighbour_table(fast_in)
    pd.testing.assert_frame_equal(nb_fast, nb_slow, check_exact=True)
    slow = shading_kernel(b, nb_slow, south_table, CFG)
    fast = shading_kernel(fast_in, nb_fast, south_table, CFG)
    assert not isinstance(fast, gpd.GeoDataFrame)
    assert not set(OBSTACLE_COLUMNS) & set(fast.columns)
    assert (slow["horizon_max_deg"] > 0).mean() > 0.3  # neighbours really shade
    pd.testing.assert_frame_equal(fast, pd.DataFrame(slow.drop(columns="geometry")),
                                  check_exact=True)


def test_obstacle_file_gives_the_same_kernel_output(sample, south_table, tmp_path):
    import pickle

    from pipeline.shading import (
        OBSTACLE_COLUMNS,
        obstacle_columns,
        resolve_neighbours,
        write_obstacle_file,
    )

    rng = np.random.default_rng(3)
    b = _obstacle_roofs(_town_and_sample_footprints(sample), rng)
    b = pd.DataFrame(b.drop(columns="geometry")).assign(
        **obstacle_columns(np.asarray(b.geometry.array, dtype=object)))
    nb = neighbour_table(b)
    handle = write_obstacle_file(nb, tmp_path / "obstacles.arrow")
    assert len(pickle.dumps(handle)) < 500  # what each partition is sent
    first = resolve_neighbours(pickle.loads(pickle.dumps(handle)))
    pd.testing.assert_frame_equal(first, nb.reset_index(drop=True), check_exact=True)
    assert resolve_neighbours(pickle.loads(pickle.dumps(handle))) is first  # read once
    via_file = shading_kernel(b, handle, south_table, CFG)
    pd.testing.assert_frame_equal(via_file, shading_kernel(b, nb, south_table, CFG),
                                  check_exact=True)
    assert not set(OBSTACLE_COLUMNS) & set(via_file.columns)
    # a rewritten file is read again
    again = write_obstacle_file(nb.iloc[:10], tmp_path / "obstacles.arrow")
    assert len(resolve_neighbours(again)) == 10


def test_rectangle_corners_of_degenerate_and_missing_footprints():
    import shapely

    from pipeline.shading import rectangle_corners

    geoms = np.array([box(0, 0, 4, 2), shapely.Point(1, 2), None,
                      shapely.LineString([(0, 0), (3, 0)])], dtype=object)
    c = rectangle_corners(shapely.oriented_envelope(geoms))
    np.testing.assert_array_equal(np.sort(c[0, :, 0]), [0, 0, 4, 4])
    np.testing.assert_array_equal(c[1], [[1, 2]] * 4)
    assert np.isnan(c[2]).all()
    assert set(c[3, :, 0]) == {0.0, 3.0} and (c[3, :, 1] == 0).all()


def test_obstacle_index_is_found_again_for_an_equal_copy_only():
    import pickle

    from pipeline import shading

    rng = np.random.default_rng(5)
    b = roofs([(a, c, a + 10, c + 8) for a, c in rng.uniform(0, 500, (40, 2))],
              rng.uniform(5, 50, 40))
    nb = neighbour_table(b)
    first = shading.obstacle_index(nb)
    same = pickle.loads(pickle.dumps(nb))  # what a process worker gets with every task
    assert same is not nb and shading.obstacle_index(same) is first
    changed = same.copy()
    changed.loc[3, "height_m"] += 1.0
    other = shading.obstacle_index(changed)
    assert other is not first
    assert other.height_m.sum() == pytest.approx(first.height_m.sum() + 1.0)
    x, y = nb["x"].to_numpy(), nb["y"].to_numpy()
    h, ids = nb["height_m"].to_numpy(), nb["building_id"].to_numpy()
    np.testing.assert_array_equal(horizon_profile(x, y, h, ids, same, CFG),
                                  horizon_profile(x, y, h, ids, nb, CFG))
