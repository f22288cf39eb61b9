"""Stage 4, shading: horizon of taller neighbours, annual irradiation loss, the 80% rule.

Inputs and outputs

===========================  ======  ==============================================
column                       unit    meaning
===========================  ======  ==============================================
in: ``height_m``             m       building heights (roof stage)
in: ``centroid_x_m``,        m       footprint centroid and the corners of its
``centroid_y_m``,                    minimum rotated rectangle (roof stage,
``rect_c0x_m`` ...                   :func:`obstacle_columns`); dropped from the
``rect_c3y_m``                       output. Without them (an older roof file)
                                     they are computed from the footprints
in: ``tilt_deg``,            deg     plane 1 and plane 2 orientations
``azimuth_deg``,
``azimuth_2_deg``
in: capacities, areas        kWp,m2  roof-stage capacity and area columns
in: weather                  --      typical year (:mod:`pipeline.weather`)
out: ``horizon_max_deg``     deg     highest horizon elevation seen from the roof
out: ``beam_loss_share``     -       share of the annual beam irradiation on
                                     plane 1 blocked by neighbours
out: ``unshaded_share``      -       annual irradiation on plane 1 with the
                                     neighbours / without them
out: ``unshaded_share_2``    -       the same for plane 2 (NaN: no plane 2)
out: (updated) capacities,   --      planes below ``min_unshaded_share`` are
``suitable``,                        dropped; a roof with no plane left is
``unsuitable_reason``                unsuitable with the reason
===========================  ======  ==============================================

Method
    *Horizon.* Every building is a potential obstacle, represented by its
    minimum rotated rectangle and its height (the neighbour table is built
    once by the driver from all buildings and broadcast, so neighbours in
    other partitions count; it is read from the roof stage's obstacle
    columns, so no footprint is decoded in this stage). For each roof, seen
    from its centroid at roof height, the neighbours within ``radius_m``
    that are at least ``min_height_difference_m`` taller are found by their
    envelopes
    (:func:`envelope_pairs`, sorted strips, no geometry built); each one
    raises the horizon to ``atan(dh / d)`` (``d``: distance to its rectangle)
    over the azimuth sectors (``horizon_sector_deg`` wide) that its
    rectangle spans. Using the nearest distance for the whole span is
    conservative for long oblique neighbours.

    *Loss.* For each (tilt, azimuth) class (computed once per class, never
    per building) the beam irradiance on the plane of every hour of the
    weather file (``DNI cos(AOI)``, sun position at the time the hourly
    values represent) is binned by sun azimuth sector and 1 deg of
    elevation into cumulative tables. A roof's blocked beam is the sum over
    sectors of the beam with the sun below that sector's horizon (linear in
    the elevation within a bin). Sky diffuse (Perez, as in the yield stage)
    is reduced by the isotropic share of the sky the horizon hides,
    ``mean(sin^2(h))`` over the sectors; ground-reflected irradiance is
    unchanged. ``unshaded_share = (B (1 - beam loss) + D (1 - sky loss) +
    R) / (B + D + R)`` with the class's annual B, D, R on the plane.

    *Suitability.* NREL (Gagnon et al. 2016) keeps roof planes that receive
    at least 80% of the irradiation of an unshaded plane of the same
    orientation (``min_unshaded_share``). A plane below it carries no PV;
    if plane 1 fails and plane 2 passes, plane 2 becomes plane 1.

    *Energy.* The yield stage multiplies each plane's class yield by its
    ``unshaded_share``. The PVWatts ``shading_pct`` loss in the ``yield``
    section therefore stands only for shading within the array (row to row
    outside the solstice window, parapets), not for neighbouring buildings:
    there is no double counting.
"""

from __future__ import annotations

import logging
import threading
import time
import weakref
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import geopandas as gpd
import numpy as np
import pandas as pd
import shapely
from pydantic import BaseModel, ConfigDict, Field, field_validator

if TYPE_CHECKING:
    from pipeline.config import PipelineConfig
    from pipeline.pvyield import YieldConfig
    from pipeline.weather import Weather

log = logging.getLogger(__name__)

#: Columns of the broadcast neighbour table.
NEIGHBOUR_COLUMNS = ("building_id", "x", "y", "height_m",
                     "c0x", "c0y", "c1x", "c1y", "c2x", "c2y", "c3x", "c3y")
#: Obstacle columns the roof stage writes per building (:func:`obstacle_columns`);
#: the shading stage reads them instead of the footprints and drops them.
OBSTACLE_COLUMNS = ("centroid_x_m", "centroid_y_m",
                    "rect_c0x_m", "rect_c0y_m", "rect_c1x_m", "rect_c1y_m",
                    "rect_c2x_m", "rect_c2y_m", "rect_c3x_m", "rect_c3y_m")
#: Elevation resolution of the cumulative beam tables [deg].
ELEVATION_STEP_DEG = 1.0


class ShadingConfig(BaseModel):
    """Shading by neighbouring buildings (config section ``shading:``).

    Attributes
    ----------
    radius_m : float
        Neighbours farther than this from the roof centroid are ignored [m].
    horizon_sector_deg : float
        Width of the azimuth sectors of the horizon profile [deg]; divides 360.
    min_height_difference_m : float
        A neighbour counts if it is at least this much taller [m].
    min_unshaded_share : float
        Planes with a smaller share of their unshaded annual irradiation
        carry no PV [-].
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    radius_m: float = Field(default=150.0, gt=0)
    horizon_sector_deg: float = Field(default=10.0, gt=0, le=90)
    min_height_difference_m: float = Field(default=1.0, ge=0)
    min_unshaded_share: float = Field(default=0.8, ge=0, le=1)

    @field_validator("horizon_sector_deg")
    @classmethod
    def _divides_360(cls, step: float) -> float:
        n = 360.0 / step
        if abs(n - round(n)) > 1e-9:
            raise ValueError(f"horizon_sector_deg {step} must divide 360 (e.g. 5, 10, 15)")
        return step


@dataclass(frozen=True)
class HorizonTable:
    """Per-class irradiation tables for the horizon loss.

    Attributes
    ----------
    keys : ndarray
        Orientation class keys (``pipeline.pvyield._class_key``).
    step_deg : float
        Orientation class width [deg].
    sector_deg : float
        Horizon sector width [deg].
    cum_beam : ndarray
        Shape (classes, sectors, 92): annual beam on the plane with the sun
        in the sector below ``j`` deg of elevation [kWh/m2].
    beam, sky, ground : ndarray
        Annual beam, sky-diffuse and ground-reflected irradiation on the
        plane [kWh/m2].
    """

    keys: np.ndarray
    step_deg: float
    sector_deg: float
    cum_beam: np.ndarray
    beam: np.ndarray
    sky: np.ndarray
    ground: np.ndarray


def plane_orientations(buildings: pd.DataFrame) -> pd.DataFrame:
    """Tilt and azimuth of every plane (plane 1 and, where present, plane 2).

    Parameters
    ----------
    buildings : DataFrame
        ``tilt_deg``, ``azimuth_deg``, ``azimuth_2_deg`` [deg].

    Returns
    -------
    DataFrame
        ``tilt_deg``, ``azimuth_deg`` [deg], one row per plane.
    """
    p1 = buildings[["tilt_deg", "azimuth_deg"]]
    p2 = buildings.loc[buildings["azimuth_2_deg"].notna(), ["tilt_deg", "azimuth_2_deg"]]
    p2 = p2.rename(columns={"azimuth_2_deg": "azimuth_deg"})
    return pd.concat([p1, p2], ignore_index=True).astype(float)


def horizon_table(classes: pd.DataFrame, weather: Weather, yield_cfg: YieldConfig,
                  sector_deg: float) -> HorizonTable:
    """Bin each class's hourly beam irradiance by sun azimuth sector and elevation.

    Parameters
    ----------
    classes : DataFrame
        Rounded ``tilt_deg``, ``azimuth_deg`` [deg]
        (:func:`pipeline.pvyield.orientation_classes`).
    weather : Weather
        Checked typical-year weather.
    yield_cfg : YieldConfig
        Transposition model, albedo and ``orientation_step_deg``.
    sector_deg : float
        Horizon sector width [deg].

    Returns
    -------
    HorizonTable
        The cumulative tables and annual components per class.
    """
    from pvlib import irradiance

    from pipeline.pvyield import _class_key, solar_geometry

    step = yield_cfg.orientation_step_deg
    tilt = classes["tilt_deg"].to_numpy(dtype=float)
    az = classes["azimuth_deg"].to_numpy(dtype=float)
    n_sec = int(round(360.0 / sector_deg))
    n_el = int(round(90.0 / ELEVATION_STEP_DEG))
    cum = np.zeros((len(tilt), n_sec, n_el + 2))
    beam = np.zeros(len(tilt))
    sky = np.zeros(len(tilt))
    ground = np.zeros(len(tilt))
    if len(tilt):
        geom = solar_geometry(weather)
        data = weather.data
        zen = geom["apparent_zenith"].to_numpy()[:, None]
        sun_az = geom["azimuth"].to_numpy()[:, None]
        up = zen[:, 0] < 90.0
        elev = 90.0 - zen[up, 0]
        sector = np.floor(np.mod(sun_az[up, 0], 360.0) / sector_deg).astype(int) % n_sec
        ebin = np.clip(np.floor(elev / ELEVATION_STEP_DEG).astype(int), 0, n_el - 1)
        albedo = (yield_cfg.albedo if yield_cfg.albedo is not None
                  else data["albedo"].to_numpy()[:, None])
        col = lambda s: data[s].to_numpy(dtype=float)[:, None]  # noqa: E731
        for start in range(0, len(tilt), 128):
            sl = slice(start, start + 128)
            irr = irradiance.get_total_irradiance(
                tilt[None, sl], az[None, sl], zen, sun_az, dni=col("dni"), ghi=col("ghi"),
                dhi=col("dhi"), dni_extra=geom["dni_extra"].to_numpy()[:, None],
                airmass=geom["airmass"].to_numpy()[:, None], albedo=albedo,
                model=yield_cfg.transposition_model)
            direct = np.nan_to_num(np.asarray(irr["poa_direct"], dtype=float))
            beam[sl] = direct.sum(axis=0) / 1000.0
            sky[sl] = np.nan_to_num(np.asarray(irr["poa_sky_diffuse"], float)).sum(0) / 1000.0
            ground[sl] = np.nan_to_num(np.asarray(irr["poa_ground_diffuse"], float)).sum(0) / 1000
            hist = np.zeros((direct.shape[1], n_sec, n_el))
            for c in range(direct.shape[1]):
                np.add.at(hist[c], (sector, ebin), direct[up, c] / 1000.0)
            cum[sl, :, 1:n_el + 1] = np.cumsum(hist, axis=2)
        cum[:, :, n_el + 1] = cum[:, :, n_el]
    return HorizonTable(keys=_class_key(tilt, az, step), step_deg=step, sector_deg=sector_deg,
                        cum_beam=cum, beam=beam, sky=sky, ground=ground)


def rectangle_corners(rect: np.ndarray) -> np.ndarray:
    """Corners of minimum rotated rectangles as an array.

    Parameters
    ----------
    rect : ndarray of shapely geometries
        ``shapely.oriented_envelope`` of footprints [m] (polygons; a
        degenerate footprint gives a line or a point).

    Returns
    -------
    ndarray
        Shape (n, 4, 2): the first four ring vertices [m]; a line or point
        repeats its last vertex; NaN for a missing or empty geometry.
    """
    n = len(rect)
    corners = np.full((n, 4, 2), np.nan)
    if n:
        coords, idx = shapely.get_coordinates(rect, return_index=True)
        counts = np.bincount(idx, minlength=n)
        starts = np.cumsum(counts) - counts
        take = np.minimum(np.arange(4)[None, :], np.maximum(counts[:, None] - 1, 0))
        has = counts > 0
        corners[has] = coords[(starts[:, None] + take)[has]]
    return corners


def obstacle_columns(geoms: np.ndarray, rect: np.ndarray | None = None,
                     centroid: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """The per-building obstacle columns (:data:`OBSTACLE_COLUMNS`) of footprints.

    The roof stage writes them (it has the footprints decoded already), so
    that this stage builds its neighbour table and roof positions from a
    few numeric columns instead of decoding every footprint again.

    Parameters
    ----------
    geoms : ndarray of shapely geometries
        Footprints in a metric CRS [m].
    rect, centroid : ndarray of shapely geometries, optional
        ``shapely.oriented_envelope(geoms)`` and ``shapely.centroid(geoms)``
        if already computed.

    Returns
    -------
    dict
        ``centroid_x_m``, ``centroid_y_m`` [m] and the rectangle corners
        ``rect_c0x_m`` ... ``rect_c3y_m`` [m] (:func:`rectangle_corners`).
    """
    geoms = np.asarray(geoms, dtype=object)
    if rect is None:
        rect = shapely.oriented_envelope(geoms) if len(geoms) else np.zeros(0, dtype=object)
    if centroid is None:
        centroid = shapely.centroid(geoms) if len(geoms) else np.zeros(0, dtype=object)
    corners = rectangle_corners(np.asarray(rect, dtype=object))
    out = {"centroid_x_m": np.asarray(shapely.get_x(centroid), dtype=float),
           "centroid_y_m": np.asarray(shapely.get_y(centroid), dtype=float)}
    for k in range(4):
        out[f"rect_c{k}x_m"] = corners[:, k, 0]
        out[f"rect_c{k}y_m"] = corners[:, k, 1]
    return out


def has_obstacle_columns(columns: object) -> bool:
    """Whether a frame's or a file's columns include all :data:`OBSTACLE_COLUMNS`."""
    return set(OBSTACLE_COLUMNS) <= set(columns)


def neighbour_table(buildings: pd.DataFrame) -> pd.DataFrame:
    """Compact obstacle description of every building, broadcast to all partitions.

    Parameters
    ----------
    buildings : DataFrame
        ``building_id``, ``height_m`` [m] and either the
        :data:`OBSTACLE_COLUMNS` (roof stage) or footprints in a metric CRS
        (a GeoDataFrame).

    Returns
    -------
    DataFrame
        ``building_id``, centroid ``x``, ``y`` [m], ``height_m`` [m] and the
        corners ``c0x`` ... ``c3y`` [m] of the minimum rotated rectangle.
    """
    if has_obstacle_columns(buildings.columns):
        cols = {c: buildings[c].to_numpy(dtype=float) for c in OBSTACLE_COLUMNS}
    else:
        cols = obstacle_columns(np.asarray(buildings.geometry.array, dtype=object))
    out = pd.DataFrame({"building_id": buildings["building_id"].to_numpy(),
                        "x": cols["centroid_x_m"], "y": cols["centroid_y_m"],
                        "height_m": buildings["height_m"].to_numpy(dtype=float)})
    for k in range(4):
        out[f"c{k}x"] = cols[f"rect_c{k}x_m"]
        out[f"c{k}y"] = cols[f"rect_c{k}y_m"]
    return out


def roof_centroids(buildings: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """Footprint centroids of roofs: the roof stage's columns, else from the geometry.

    Parameters
    ----------
    buildings : DataFrame
        With ``centroid_x_m``, ``centroid_y_m`` [m], or a GeoDataFrame.

    Returns
    -------
    x, y : ndarray, ndarray
        Centroid coordinates [m].
    """
    if {"centroid_x_m", "centroid_y_m"} <= set(buildings.columns):
        return (buildings["centroid_x_m"].to_numpy(dtype=float),
                buildings["centroid_y_m"].to_numpy(dtype=float))
    if len(buildings) == 0:
        return np.zeros(0), np.zeros(0)
    cent = shapely.centroid(np.asarray(buildings.geometry.array, dtype=object))
    return shapely.get_x(cent), shapely.get_y(cent)


def _neighbour_partition(path: str, row_groups: list[int]) -> pd.DataFrame:
    """:func:`neighbour_table` of one partition of a GeoParquet file (a task)."""
    from pipeline.stream import read_partition

    return neighbour_table(read_partition(Path(path), row_groups,
                                          ["building_id", "height_m", "geometry"]))


@dataclass(frozen=True)
class ObstacleIndex:
    """A neighbour table as arrays sorted by the west edge of the rectangle envelopes.

    Attributes
    ----------
    lo_x, lo_y, hi_x, hi_y : ndarray
        Envelope bounds [m], ``lo_x`` ascending (NaN rows last).
    max_width_m : float
        Widest envelope [m] (0 if none).
    corners : ndarray
        Shape (n, 4, 2): rectangle corners [m].
    x, y, height_m : ndarray
        Centroids and heights [m].
    building_id : ndarray
        Ids.
    """

    lo_x: np.ndarray
    lo_y: np.ndarray
    hi_x: np.ndarray
    hi_y: np.ndarray
    max_width_m: float
    corners: np.ndarray
    x: np.ndarray
    y: np.ndarray
    height_m: np.ndarray
    building_id: np.ndarray


_OBSTACLE_INDEX: dict[int, ObstacleIndex] = {}
#: The last table indexed and its index: a process worker receives the broadcast table
#: as a new object with every task, found here by equal content.
_OBSTACLE_LAST: list[tuple[pd.DataFrame, ObstacleIndex]] = []
_OBSTACLE_LOCK = threading.Lock()


def obstacle_index(neighbours: pd.DataFrame) -> ObstacleIndex:
    """The :class:`ObstacleIndex` of a neighbour table, built once per table object.

    The table is broadcast to every partition; converting and sorting it in
    each would cost O(buildings) per partition, so O(buildings^2 /
    partition size) for the stage. The index is cached for the lifetime of
    the table object (threads share it), and the last table indexed is kept
    with its index, so that a process worker, which unpickles a new copy of
    the table for every task, finds the index of an equal table (an exact
    comparison, some 30 ms for a million buildings, instead of about 1 s to
    build it again).

    Parameters
    ----------
    neighbours : DataFrame
        :func:`neighbour_table` rows (all buildings, or a subset).

    Returns
    -------
    ObstacleIndex
        The arrays.
    """
    key = id(neighbours)
    with _OBSTACLE_LOCK:
        hit = _OBSTACLE_INDEX.get(key)
        if hit is not None and len(hit.x) == len(neighbours):
            return hit
        for frame, index in _OBSTACLE_LAST:
            if frame is not neighbours and len(frame) == len(neighbours) and frame.equals(
                    neighbours):
                _OBSTACLE_INDEX[key] = index
                weakref.finalize(neighbours, _OBSTACLE_INDEX.pop, key, None)
                return index
        c = neighbours[["c0x", "c0y", "c1x", "c1y", "c2x", "c2y", "c3x", "c3y"]].to_numpy(
            dtype=float).reshape(-1, 4, 2)
        lo_x = c[:, :, 0].min(axis=1)
        order = np.argsort(lo_x, kind="stable")  # NaN last
        c = c[order]
        lo_x = lo_x[order]
        hi_x = c[:, :, 0].max(axis=1)
        width = hi_x - lo_x
        index = ObstacleIndex(
            lo_x=lo_x, lo_y=c[:, :, 1].min(axis=1), hi_x=hi_x, hi_y=c[:, :, 1].max(axis=1),
            max_width_m=float(np.nanmax(width)) if np.isfinite(width).any() else 0.0,
            corners=c, x=neighbours["x"].to_numpy(dtype=float)[order],
            y=neighbours["y"].to_numpy(dtype=float)[order],
            height_m=neighbours["height_m"].to_numpy(dtype=float)[order],
            building_id=neighbours["building_id"].to_numpy()[order])
        _OBSTACLE_INDEX[key] = index
        weakref.finalize(neighbours, _OBSTACLE_INDEX.pop, key, None)
        _OBSTACLE_LAST[:] = [(neighbours, index)]
        return index


def point_rectangle_distance(px: np.ndarray, py: np.ndarray, corners: np.ndarray
                             ) -> np.ndarray:
    """Distance from points to convex quadrilaterals (0 inside).

    Parameters
    ----------
    px, py : ndarray
        Points [m], shape (m,).
    corners : ndarray
        Corners in ring order [m], shape (m, 4, 2).

    Returns
    -------
    ndarray
        Distance [m].
    """
    # edge by edge on 1-d arrays (the same arithmetic as on (m, 4, 2) arrays, less memory)
    dist = np.full(len(px), np.inf)
    pos = np.ones(len(px), dtype=bool)
    neg = np.ones(len(px), dtype=bool)
    for k in range(4):
        ax, ay = corners[:, k, 0], corners[:, k, 1]
        abx = corners[:, (k + 1) % 4, 0] - ax
        aby = corners[:, (k + 1) % 4, 1] - ay
        apx, apy = px - ax, py - ay
        len2 = abx ** 2 + aby ** 2
        with np.errstate(invalid="ignore", divide="ignore"):
            t = np.clip(np.where(len2 > 0, (apx * abx + apy * aby) / len2, 0.0), 0.0, 1.0)
        np.minimum(dist, np.hypot(apx - t * abx, apy - t * aby), out=dist)
        cross = abx * apy - aby * apx
        pos &= cross >= 0
        neg &= cross <= 0
    inside = pos | neg
    return np.where(inside, 0.0, dist)


def envelope_pairs(x: np.ndarray, y: np.ndarray, half_side_m: float, lo_x: np.ndarray,
                   lo_y: np.ndarray, hi_x: np.ndarray, hi_y: np.ndarray
                   ) -> tuple[np.ndarray, np.ndarray]:
    """Pairs (point, box) where the square around the point meets the box.

    The same pairs as ``shapely.STRtree(boxes).query(squares)`` (envelopes
    that intersect, edges included), found without building geometries: the
    points are sorted into vertical strips ``half_side_m`` wide and by ``y``
    within a strip; each box takes, in every strip its widened extent
    covers, the run of points in its widened ``y`` range (two binary
    searches), and the candidates are then tested exactly. Numpy only.

    Parameters
    ----------
    x, y : ndarray
        Points [m] (NaN: none).
    half_side_m : float
        Half the side of the square around each point [m].
    lo_x, lo_y, hi_x, hi_y : ndarray
        Box bounds [m] (NaN: none).

    Returns
    -------
    i, j : ndarray of int64
        Positions of the points and of the boxes.
    """
    r = float(half_side_m)
    pts = np.flatnonzero(np.isfinite(x) & np.isfinite(y))
    boxes = np.flatnonzero(np.isfinite(lo_x) & np.isfinite(lo_y) & np.isfinite(hi_x)
                           & np.isfinite(hi_y))
    empty = np.zeros(0, dtype=np.int64)
    if len(pts) == 0 or len(boxes) == 0:
        return empty, empty
    px, py = x[pts], y[pts]
    ox, oy = px.min(), py.min()
    width = max(r, 1.0, (px.max() - ox) / 4096.0)  # at most 4097 strips
    strip = np.floor((px - ox) / width)
    n_strips = int(strip.max()) + 1
    span = py.max() - oy + 1.0  # strip k holds keys [k span, k span + span)
    key = strip * span + (py - oy)
    order = np.argsort(key, kind="stable")
    skey = key[order]
    slack = r + 1.0  # 1 m beyond the exact test against rounding
    s0 = np.clip(np.floor((lo_x[boxes] - slack - ox) / width), 0, n_strips)
    s1 = np.clip(np.floor((hi_x[boxes] + slack - ox) / width), -1, n_strips - 1)
    count = np.maximum(s1 - s0 + 1, 0).astype(np.int64)
    rep = np.repeat(np.arange(len(boxes)), count)
    k = s0[rep] + (np.arange(len(rep)) - np.repeat(np.cumsum(count) - count, count))
    y_lo = np.clip(lo_y[boxes][rep] - slack - oy, 0.0, span - 1.0)
    y_hi = np.clip(hi_y[boxes][rep] + slack - oy, -0.5, span - 0.5)
    first = np.searchsorted(skey, k * span + y_lo, side="left")
    n_in = np.maximum(np.searchsorted(skey, k * span + y_hi, side="right") - first, 0)
    rep2 = np.repeat(np.arange(len(rep)), n_in)
    i = pts[order[np.repeat(first, n_in) + np.arange(len(rep2))
                  - np.repeat(np.cumsum(n_in) - n_in, n_in)]]
    j = boxes[rep[rep2]]
    # the exact test of the tree query: box and square envelopes intersect
    hit = ((lo_x[j] <= x[i] + r) & (hi_x[j] >= x[i] - r)
           & (lo_y[j] <= y[i] + r) & (hi_y[j] >= y[i] - r))
    return i[hit].astype(np.int64), j[hit].astype(np.int64)


def horizon_profile(x: np.ndarray, y: np.ndarray, height_m: np.ndarray, ids: np.ndarray,
                    neighbours: pd.DataFrame, cfg: ShadingConfig) -> np.ndarray:
    """Horizon elevation per azimuth sector seen from each roof.

    Parameters
    ----------
    x, y : ndarray
        Roof centroids [m].
    height_m : ndarray
        Roof heights [m].
    ids : ndarray
        ``building_id`` of the roofs (a roof does not shade itself).
    neighbours : DataFrame
        :func:`neighbour_table` of all buildings.
    cfg : ShadingConfig
        Radius, sector width and height threshold.

    Returns
    -------
    ndarray
        Shape (roofs, sectors): horizon elevation [deg], sector ``k`` covering
        azimuths ``[k w, (k + 1) w)`` clockwise from north; 0 where open.
    """
    n_sec = int(round(360.0 / cfg.horizon_sector_deg))
    horizon = np.zeros((len(x), n_sec))
    if len(x) == 0 or neighbours.empty:
        return horizon
    r = cfg.radius_m
    ob = obstacle_index(neighbours)
    # only rectangles whose envelope meets the roofs' query squares can be found below:
    # a slice of the table sorted by envelope west edge, then the exact test
    x0, x1 = np.nanmin(x) - r, np.nanmax(x) + r
    a = int(np.searchsorted(ob.lo_x, x0 - ob.max_width_m, side="left"))
    b = int(np.searchsorted(ob.lo_x, x1, side="right"))
    lo_x, hi_x, lo_y, hi_y = ob.lo_x[a:b], ob.hi_x[a:b], ob.lo_y[a:b], ob.hi_y[a:b]
    nb_h = ob.height_m[a:b]
    near = a + np.flatnonzero((hi_x >= x0) & (lo_x <= x1)
                              & (hi_y >= np.nanmin(y) - r) & (lo_y <= np.nanmax(y) + r)
                              & (nb_h >= np.nanmin(height_m) + cfg.min_height_difference_m))
    if len(near) == 0:
        return horizon
    lo_x, hi_x, lo_y, hi_y = ob.lo_x[near], ob.hi_x[near], ob.lo_y[near], ob.hi_y[near]
    c, nb_h, nb_id = ob.corners[near], ob.height_m[near], ob.building_id[near]
    nb_x, nb_y = ob.x[near], ob.y[near]
    # envelope query (cheap), the exact distance filter follows on the taller pairs only
    i, j = envelope_pairs(x, y, r, lo_x, lo_y, hi_x, hi_y)
    dh = nb_h[j] - height_m[i]
    keep = dh >= cfg.min_height_difference_m
    if cfg.min_height_difference_m <= 0:
        # a roof is in the table too; with a positive threshold it never passes (dh = 0)
        keep &= nb_id[j] != ids[i]
    # the distance to a rectangle is at least the distance to its envelope: pairs whose
    # envelope lies beyond the radius are dropped before the exact distance (1 um of slack)
    gap_x = np.maximum(np.maximum(lo_x[j] - x[i], x[i] - hi_x[j]), 0.0)
    gap_y = np.maximum(np.maximum(lo_y[j] - y[i], y[i] - hi_y[j]), 0.0)
    keep &= np.hypot(gap_x, gap_y) <= r + 1e-6
    i, j, dh = i[keep], j[keep], dh[keep]
    if len(i) == 0:
        return horizon
    d = point_rectangle_distance(x[i], y[i], c[j])
    nx, ny = nb_x[j], nb_y[j]
    inside = d <= 1e-9
    within = d <= r
    d = np.where(inside, np.hypot(nx - x[i], ny - y[i]), d)
    ok = within & (d > 1e-9)
    i, j, dh, d, c_ij, inside = i[ok], j[ok], dh[ok], d[ok], c[j[ok]], inside[ok]
    nx, ny = nx[ok], ny[ok]
    elev = np.degrees(np.arctan2(dh, d))
    az0 = np.degrees(np.arctan2(nx - x[i], ny - y[i]))
    az_c = np.degrees(np.arctan2(c_ij[:, :, 0] - x[i, None], c_ij[:, :, 1] - y[i, None]))
    rel = np.mod(az_c - az0[:, None] + 180.0, 360.0) - 180.0
    lo = np.where(inside, 0.0, az0 + rel.min(axis=1))
    hi = np.where(inside, 360.0 - 1e-9, az0 + rel.max(axis=1))
    w = cfg.horizon_sector_deg
    first = np.floor(lo / w).astype(np.int64)
    count = np.minimum(np.floor(hi / w).astype(np.int64) - first + 1, n_sec)
    rep = np.repeat(np.arange(len(i)), count)
    offset = np.arange(len(rep)) - np.repeat(np.cumsum(count) - count, count)
    sector = np.mod(first[rep] + offset, n_sec)
    # on the flat array: numpy's 1-d ufunc.at is about 2.5x faster than the 2-d one
    np.maximum.at(horizon.reshape(-1), i[rep] * n_sec + sector, elev[rep])
    return horizon


def unshaded_share(horizon: np.ndarray, tilt_deg: np.ndarray, azimuth_deg: np.ndarray,
                   table: HorizonTable) -> tuple[np.ndarray, np.ndarray]:
    """Annual irradiation share a plane keeps under its horizon.

    Parameters
    ----------
    horizon : ndarray
        (roofs, sectors) horizon elevations [deg] (:func:`horizon_profile`).
    tilt_deg, azimuth_deg : ndarray
        Plane orientation per roof [deg]; NaN = no plane.
    table : HorizonTable
        Class tables covering these orientations.

    Returns
    -------
    share, beam_loss : ndarray, ndarray
        Irradiation with the horizon / without [-], and the blocked share of
        the beam [-]; NaN where the plane is missing.
    """
    from pipeline.pvyield import _class_key

    n = len(horizon)
    share = np.full(n, np.nan)
    beam_loss = np.full(n, np.nan)
    key = _class_key(tilt_deg, azimuth_deg, table.step_deg)
    pos = pd.Index(table.keys).get_indexer(key) if n else np.zeros(0, dtype=int)
    has = (key >= 0) & (pos >= 0)
    if (key >= 0).sum() != has.sum():
        raise ValueError("unshaded_share: an orientation class is missing from the table")
    if not has.any():
        return share, beam_loss
    # only roofs with some horizon lose anything: elsewhere blocked beam and sky loss are 0
    hz = horizon[has]
    open_sky = ~(hz > 0).any(axis=1)
    blocked = np.zeros(len(hz))
    sky_loss = np.zeros(len(hz))
    if not open_sky.all():
        hz = np.clip(hz[~open_sky], 0.0, 90.0)
        h = hz / ELEVATION_STEP_DEG
        j0 = np.floor(h).astype(np.int64)
        frac = h - j0
        n_sec, n_el = table.cum_beam.shape[1:]
        flat = (pos[has][~open_sky][:, None] * n_sec
                + np.arange(horizon.shape[1])[None, :]) * n_el + j0
        cum = table.cum_beam.reshape(-1)
        c0 = cum[flat]
        blocked[~open_sky] = (c0 + frac * (cum[flat + 1] - c0)).sum(axis=1)
        sky_loss[~open_sky] = np.mean(np.sin(np.radians(hz)) ** 2, axis=1)
    b, d, g = table.beam[pos[has]], table.sky[pos[has]], table.ground[pos[has]]
    with np.errstate(invalid="ignore", divide="ignore"):
        bl = np.where(b > 0, blocked / b, 0.0)
        total = b + d + g
        sh = np.where(total > 0, (b - blocked + d * (1 - sky_loss) + g) / total, 1.0)
    beam_loss[has] = np.clip(bl, 0.0, 1.0)
    share[has] = np.clip(sh, 0.0, 1.0)
    return share, beam_loss


@dataclass(frozen=True)
class ObstacleFile:
    """Handle of an obstacle table written once to a file for a streamed stage.

    Sent to the workers instead of the table itself (some 100 MB at a million
    buildings, pickled once per partition otherwise); each worker process
    reads the file once (:func:`resolve_neighbours`).

    Attributes
    ----------
    path : str
        Arrow IPC (Feather) file with the :func:`neighbour_table` columns.
    token : str
        Size and modification time of the file: a rewritten file is read again.
    """

    path: str
    token: str


def write_obstacle_file(neighbours: pd.DataFrame, path: Path) -> ObstacleFile:
    """Write a neighbour table for the workers; return its handle.

    Parameters
    ----------
    neighbours : DataFrame
        :func:`neighbour_table`.
    path : Path
        The file (in the processed directory, which workers reach).

    Returns
    -------
    ObstacleFile
    """
    import os

    import pyarrow.feather as feather

    feather.write_feather(neighbours.reset_index(drop=True), str(path),
                          compression="uncompressed")
    st = os.stat(path)
    return ObstacleFile(str(path), f"{st.st_size}-{st.st_mtime_ns}")


#: The obstacle table last read from a file in this process: ((path, token), table).
_OBSTACLE_FILE: list[tuple[tuple[str, str], pd.DataFrame]] = []


def resolve_neighbours(neighbours: pd.DataFrame | ObstacleFile) -> pd.DataFrame:
    """The neighbour table itself, read once per process from an :class:`ObstacleFile`.

    Parameters
    ----------
    neighbours : DataFrame or ObstacleFile

    Returns
    -------
    DataFrame
        The same table object for every task of a process, so that its
        :func:`obstacle_index` is built once.
    """
    if not isinstance(neighbours, ObstacleFile):
        return neighbours
    import pyarrow.feather as feather

    key = (neighbours.path, neighbours.token)
    with _OBSTACLE_LOCK:
        if _OBSTACLE_FILE and _OBSTACLE_FILE[0][0] == key:
            return _OBSTACLE_FILE[0][1]
        frame = feather.read_table(neighbours.path).to_pandas()
        _OBSTACLE_FILE[:] = [(key, frame)]
        return frame


def shading_kernel(part: pd.DataFrame, neighbours: pd.DataFrame | ObstacleFile,
                   table: HorizonTable, cfg: ShadingConfig) -> pd.DataFrame:
    """Kernel: horizon, irradiation loss and the minimum-share rule per roof.

    Parameters
    ----------
    part : DataFrame
        Roof-stage buildings: with the roof stage's ``centroid_x_m``,
        ``centroid_y_m`` [m] (then no geometry is needed), or a
        GeoDataFrame whose footprint centroids are computed.
    neighbours : DataFrame or ObstacleFile
        :func:`neighbour_table` of all buildings (not only this partition),
        or the handle of its file.
    table : HorizonTable
        :func:`horizon_table` of all plane orientations.
    cfg : ShadingConfig
        Radius, sectors, thresholds.

    Returns
    -------
    DataFrame
        ``part`` with the shading columns and the capacities, areas and
        suitability updated by the rule, without the :data:`OBSTACLE_COLUMNS`
        (same type as ``part``).
    """
    neighbours = resolve_neighbours(neighbours)
    x, y = roof_centroids(part)
    out = part.drop(columns=list(OBSTACLE_COLUMNS), errors="ignore")
    n = len(out)
    height = out["height_m"].to_numpy(dtype=float)
    horizon = horizon_profile(x, y, height, out["building_id"].to_numpy(), neighbours, cfg)
    tilt = out["tilt_deg"].to_numpy(dtype=float)
    az1 = out["azimuth_deg"].to_numpy(dtype=float)
    az2 = out["azimuth_2_deg"].to_numpy(dtype=float)
    s1, bl1 = unshaded_share(horizon, tilt, az1, table)
    s2, bl2 = unshaded_share(horizon, np.where(np.isfinite(az2), tilt, np.nan), az2, table)

    cols = {c: out[c].to_numpy(dtype=float).copy() for c in (
        "usable_area_m2", "module_area_m2", "capacity_kwp", "usable_area_2_m2",
        "capacity_2_kwp", "policy_area_m2", "capacity_policy_kwp", "capacity_policy_2_kwp")}
    usable = cols["usable_area_m2"]
    with np.errstate(invalid="ignore", divide="ignore"):
        kwp_per_m2 = np.where(usable > 0, cols["capacity_kwp"] / usable, 0.0)
        module_per_m2 = np.where(usable > 0, cols["module_area_m2"] / usable, 0.0)
    limit = cfg.min_unshaded_share
    has2 = np.isfinite(az2) & (cols["usable_area_2_m2"] > 0)
    ok1 = (usable - cols["usable_area_2_m2"] > 0) & (s1 >= limit)
    ok2 = has2 & (s2 >= limit)
    u1 = np.where(ok1, usable - cols["usable_area_2_m2"], 0.0)
    u2 = np.where(ok2, cols["usable_area_2_m2"], 0.0)
    swap = ~ok1 & ok2  # plane 2 becomes plane 1
    new_u1 = np.where(swap, u2, u1)
    new_u2 = np.where(swap, 0.0, u2)
    new_usable = new_u1 + new_u2
    policy = np.minimum(cols["policy_area_m2"], new_usable)
    policy_2 = np.maximum(policy - new_u1, 0.0)
    shaded_out = (usable > 0) & (new_usable <= 0)

    out["horizon_max_deg"] = horizon.max(axis=1) if n else np.zeros(0)
    out["beam_loss_share"] = np.where(swap, bl2, bl1)
    out["unshaded_share"] = np.where(swap, s2, s1)
    out["unshaded_share_2"] = np.where(ok2 & ~swap, s2, np.nan)
    out["azimuth_deg"] = np.where(swap, az2, az1)
    out["azimuth_2_deg"] = np.where(ok2 & ~swap, az2, np.nan)
    out["usable_area_m2"] = new_usable
    out["module_area_m2"] = new_usable * module_per_m2
    out["capacity_kwp"] = new_usable * kwp_per_m2
    out["usable_area_2_m2"] = new_u2
    out["capacity_2_kwp"] = new_u2 * kwp_per_m2
    out["policy_area_m2"] = policy
    out["capacity_policy_kwp"] = policy * kwp_per_m2
    out["capacity_policy_2_kwp"] = policy_2 * kwp_per_m2
    out["suitable"] = new_usable > 0
    reason = out["unsuitable_reason"].astype(object).to_numpy().copy()
    worst = np.where(has2, np.fmax(s1, s2), s1)
    reason[shaded_out] = [
        f"shaded by neighbours: {v:.0%} of the unshaded irradiation, below "
        f"shading.min_unshaded_share = {limit:.0%}" for v in worst[shaded_out]]
    out["unsuitable_reason"] = pd.Series(reason, index=out.index, dtype="object")
    return out


def neighbours_in_reach(buildings: gpd.GeoDataFrame, groups: list[np.ndarray],
                        neighbours: pd.DataFrame, table: HorizonTable, cfg: ShadingConfig
                        ) -> list[np.ndarray]:
    """Rows of the neighbour table that can shade each group of roofs.

    For the partition cache (``pipeline.incremental``): a roof's horizon
    depends only on the neighbours whose rectangle envelope meets the square
    of half-side ``radius_m`` around its centroid (the query in
    :func:`horizon_profile`); this returns a superset of those per group.

    Parameters
    ----------
    buildings : GeoDataFrame
        All roofs of the call.
    groups : list of ndarray
        Positions of the roofs of each partition.
    neighbours : DataFrame
        :func:`neighbour_table` of all buildings.
    table : HorizonTable
        Unused (same signature as :func:`shading_kernel`).
    cfg : ShadingConfig
        ``radius_m`` [m].

    Returns
    -------
    list of ndarray
        Row positions in ``neighbours``, one array per group.
    """
    x, y = roof_centroids(buildings)
    c = neighbours[["c0x", "c0y", "c1x", "c1y", "c2x", "c2y", "c3x", "c3y"]].to_numpy()
    env = shapely.box(c[:, 0::2].min(axis=1), c[:, 1::2].min(axis=1),
                      c[:, 0::2].max(axis=1), c[:, 1::2].max(axis=1))
    tree = shapely.STRtree(env)
    r = cfg.radius_m
    out = []
    for pos in groups:
        gx, gy = x[pos], y[pos]
        if len(pos) == 0 or np.isnan(gx).all():
            out.append(np.zeros(0, dtype=np.int64))
            continue
        box = shapely.box(np.nanmin(gx) - r, np.nanmin(gy) - r, np.nanmax(gx) + r,
                          np.nanmax(gy) + r)
        out.append(np.sort(tree.query(box)))
    return out


#: the partition cache keys a partition by the neighbours within reach only
shading_kernel.partition_context = (0, neighbours_in_reach)


def run(cfg: PipelineConfig, base_dir: Path) -> dict:
    """Shading stage runner: roof buildings in, shaded roof buildings out.

    Parameters
    ----------
    cfg : PipelineConfig
        The run's configuration (``shading``, ``weather``, ``yield``).
    base_dir : Path
        Project root.

    Returns
    -------
    dict
        Rows in and out, roofs made unsuitable by shading, capacity
        before and after [kWp], duration [s].
    """
    import pyarrow.parquet as pq

    from pipeline import incremental
    from pipeline.parallel import map_tasks
    from pipeline.pvyield import orientation_classes
    from pipeline.stream import map_file, partitions, read_columns
    from pipeline.weather import read_weather

    t0 = time.perf_counter()
    d = base_dir / cfg.paths.processed_dir
    src = d / "roof_buildings.parquet"
    before = read_columns(src, ["tilt_deg", "azimuth_deg", "azimuth_2_deg", "suitable",
                                "capacity_kwp"])
    step = cfg.yield_.orientation_step_deg
    classes = orientation_classes(plane_orientations(before), step)

    def class_table() -> HorizonTable:
        weather = read_weather(cfg.weather, base_dir)
        return horizon_table(classes, weather, cfg.yield_, cfg.shading.horizon_sector_deg)

    # the roof stage wrote each building's centroid and rectangle: the obstacle table and
    # the roof positions come from those columns and no footprint is decoded here (a roof
    # file without them, e.g. written by an older version, takes the geometry path)
    precomputed = has_obstacle_columns(pq.ParquetFile(src).schema_arrow.names)
    # the weather and class tables (a fixed cost) are read while the compact obstacle
    # table of all buildings is built
    with ThreadPoolExecutor(1) as pool:
        table_job = pool.submit(class_table)
        if precomputed:
            neighbours = neighbour_table(read_columns(
                src, ["building_id", "height_m", *OBSTACLE_COLUMNS]))
        else:
            neighbours = pd.concat(list(map_tasks(
                _neighbour_partition, [(str(src), p) for p in partitions(src)],
                label="shading obstacles")), ignore_index=True)
        table = table_job.result()
    obstacles_path = d / ".shading_obstacles.arrow"
    try:
        # streamed partitions get the table's file, written once, rather than the table
        # pickled for each of them (the rerun cache digests the table itself)
        arg = neighbours if incremental.active() is not None else write_obstacle_file(
            neighbours, obstacles_path)
        rows_in, rows_out, out = map_file(
            src, d / "shading_buildings.parquet", shading_kernel, arg, table,
            cfg.shading, label="shading", keep=("suitable", "capacity_kwp"),
            geometry="skip" if precomputed else "read")
    finally:
        obstacles_path.unlink(missing_ok=True)
        with _OBSTACLE_LOCK:  # the driver's copy (threads, synchronous) is not kept
            _OBSTACLE_LAST.clear()
            _OBSTACLE_FILE.clear()
    newly = int((before["suitable"].to_numpy(dtype=bool)
                 & ~out["suitable"].to_numpy(dtype=bool)).sum())
    stats = {"rows_in": rows_in, "rows_out": rows_out, "shaded_out": newly,
             "capacity_before_kwp": float(before["capacity_kwp"].sum()),
             "capacity_after_kwp": float(out["capacity_kwp"].sum()),
             "duration_s": time.perf_counter() - t0}
    log.info("shading: %d buildings in, %d out, %d classes, %d roofs below %.0f%% unshaded, "
             "%.1f -> %.1f MWp, %.1f s", stats["rows_in"], stats["rows_out"], len(classes),
             newly, 100 * cfg.shading.min_unshaded_share, stats["capacity_before_kwp"] / 1000,
             stats["capacity_after_kwp"] / 1000, stats["duration_s"])
    return stats
