"""Stage 3, roof: height, roof kind, usable area, layout and capacity per building.

Steps (each assumption is a key of the ``roof:``/``heights:`` config sections)

1. Height (:mod:`pipeline.heights`): raster median, attribute, storeys x
   storey height, or the default.
2. Roof kind: ``roof:shape`` tag, then the OSM ``building`` tag, then the
   first matching ``roof_kind_rules`` entry (building type, footprint area,
   height), then ``roof_kind_default``.
3. Usable area: edge setback by roof kind and building height
   (``setback_*_m_by_min_height_m``: the band with the largest lower bound at
   or below the height); morphological opening with ``min_array_width_m`` so
   that strips too slender for a row of modules are dropped; utilisation
   (obstruction) factor by building type; zero below ``min_array_area_m2``.
4. Layout. Flat roofs: rows facing ``flat_azimuth_deg`` at ``flat_tilt_deg``,
   row pitch from the GB 50797-2012 rule (no mutual shading between
   ``flat_row_rule_start_solar_h`` and ``..._end_solar_h`` solar time on the
   winter solstice) at the building's latitude, so ``gcr`` is computed
   (:func:`solstice_row_gcr`). Pitched roofs: the ridge runs along the long
   side of the footprint's minimum rotated rectangle; the two planes either
   side get flush modules at ``pitched_tilt_deg`` facing away from the ridge;
   planes within ``pitched_min_azimuth_from_north_deg`` of north are excluded.
   Plane 1 is the usable plane facing closest to south (its orientation is
   ``tilt_deg``/``azimuth_deg``); the other usable plane, if any, is plane 2
   (``azimuth_2_deg``, same tilt). The yield stage computes energy per plane.

Inputs (classify stage): ``footprint_area_m2`` [m2], ``building_type``,
``tag_roof_shape``, ``tag_building``, ``height_attr_m`` [m], ``levels_attr``,
geometry [m].

Outputs (added columns)

=======================  ======  ===============================================
column                   unit    meaning
=======================  ======  ===============================================
raster_height_m          m       median of the height rasters in the footprint
height_m                 m       building height used here and for shading
height_source            -       raster, attribute, levels or default
roof_kind                -       flat or pitched
roof_kind_source         -       tag_roof_shape, tag_building, rule:<name>, default
setback_m                m       edge setback applied
setback_area_m2          m2      horizontal area inside the setbacks (pitched:
                                 both planes, ridge margin included)
utilisation_factor       -       share of the area free of obstructions
usable_area_m2           m2      area that carries modules (pitched: on the
                                 roof slope, planes 1 and 2)
tilt_deg                 deg     module tilt (plane 1)
azimuth_deg              deg     module azimuth, 180 = south (plane 1)
gcr                      -       module area / usable area (flat: solstice rule;
                                 pitched: packing factor)
module_area_m2           m2      usable_area_m2 * gcr
capacity_kwp             kWp     module_area_m2 * power density (all planes)
azimuth_2_deg            deg     azimuth of plane 2 (NaN: none)
usable_area_2_m2         m2      usable area of plane 2 (included above)
capacity_2_kwp           kWp     capacity on plane 2 (included above)
coverage_share           -       policy share of roof area for the type
policy_area_m2           m2      min(coverage_share * footprint, usable),
                                 plane 1 filled first
capacity_policy_kwp      kWp     capacity on policy_area_m2
capacity_policy_2_kwp    kWp     the part of it on plane 2
suitable                 -       usable_area_m2 > 0
unsuitable_reason        -       why not
centroid_x_m,            m       footprint centroid, for the shading stage
centroid_y_m
rect_c0x_m ...           m       corners of the minimum rotated rectangle, the
rect_c3y_m                       shading stage's obstacle (it drops the centroid
                                 and corner columns from its output)
footprint_key            -       change-detection key of the footprint, and ...
footprint_minx_m ...     m       ... its bounds: what the report keeps of every
footprint_maxy_m                 footprint (:mod:`pipeline.footprints`), computed
                                 here where the footprints are decoded; not in
                                 the final outputs
=======================  ======  ===============================================
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

import geopandas as gpd
import numpy as np
import pandas as pd
import shapely

from pipeline.config import PipelineConfig, PolicyConfig, RoofConfig
from pipeline.footprints import summary_columns
from pipeline.heights import HeightsConfig, building_heights, raster_index
from pipeline.shading import obstacle_columns
from pipeline.stream import map_file

log = logging.getLogger(__name__)

#: Solar-time steps sampled in the no-shading window (every 15 min for 09-15 h).
ROW_RULE_STEPS = 25
#: Rows per block in :func:`solstice_row_gcr`.
_GCR_BLOCK = 4096
_MITRE = {"join_style": "mitre", "mitre_limit": 5.0}
#: Largest turn [deg] at a vertex for which the closed form of
#: :func:`inset_areas` may stand for a mitred offset: GEOS mitres a corner
#: only while the mitre stays within ``mitre_limit`` x the distance, i.e. up
#: to a turn of 2 acos(1 / 5) = 156.9 deg; a margin is kept.
_MITRE_SAFE_TURN_DEG = 150.0
#: Rings with reflex corners and more vertices than this take the GEOS buffers
#: (the self-crossing test of :func:`inset_areas` is quadratic in the vertices).
_MAX_REFLEX_RING_VERTICES = 32


def setback_area(geometry: gpd.GeoSeries, setback_m: np.ndarray | float) -> np.ndarray:
    """Area left inside an edge setback.

    Parameters
    ----------
    geometry : GeoSeries
        Footprints in a metric CRS [m].
    setback_m : array or float
        Setback from every roof edge [m].

    Returns
    -------
    ndarray
        Area of the footprint shrunk inward by ``setback_m`` [m2]
        (mitred corners, so a 40 m x 25 m rectangle with a 1 m setback keeps
        38 m x 23 m = 874 m2).
    """
    inner = shapely.buffer(geometry.array, -np.asarray(setback_m, dtype=float),
                           join_style="mitre", mitre_limit=5.0)
    return np.asarray(shapely.area(inner), dtype=float)


def capacity_kwp(module_area_m2: np.ndarray | float, power_density_w_per_m2: float
                 ) -> np.ndarray:
    """Installable DC capacity.

    Parameters
    ----------
    module_area_m2 : array or float
        Module area [m2].
    power_density_w_per_m2 : float
        Module rated power per module area at STC [W/m2].

    Returns
    -------
    ndarray
        Capacity [kWp].
    """
    return np.asarray(module_area_m2, dtype=float) * power_density_w_per_m2 / 1000.0


def solstice_row_gcr(latitude_deg: np.ndarray | float, tilt_deg: np.ndarray | float,
                     row_azimuth_deg: float = 180.0, declination_deg: float = -23.44,
                     start_solar_h: float = 9.0, end_solar_h: float = 15.0) -> np.ndarray:
    """Ground coverage ratio of rows that do not shade each other in a solar-time window.

    A row of slant length ``L`` at tilt ``b`` casts, with the sun at
    elevation ``a`` and azimuth ``g``, a shadow reaching
    ``L sin(b) cos(g - row_azimuth) / tan(a)`` behind it (along the row
    normal). The row pitch is ``L cos(b)`` plus the longest such reach in
    the window, so ``GCR = L / pitch = 1 / (cos b + sin b max(cos(g - az) / tan a))``
    (GB 50797-2012, 6.8: no shading 09:00-15:00 solar time on the winter
    solstice). Sun position from the declination and the hour angle
    ``15 deg/h * (t - 12)``.

    Parameters
    ----------
    latitude_deg : array or float
        Site latitude [deg], north positive.
    tilt_deg : array or float
        Module tilt [deg].
    row_azimuth_deg : float
        Azimuth the rows face, clockwise from north [deg].
    declination_deg : float
        Solar declination on the design day [deg] (winter solstice -23.44).
    start_solar_h, end_solar_h : float
        No-shading window [h solar time].

    Returns
    -------
    ndarray
        GCR [-]; 1 at tilt 0; NaN where the sun is below the horizon at some
        time of the window.
    """
    lat_all = np.atleast_1d(np.asarray(latitude_deg, dtype=float))
    if len(lat_all) > _GCR_BLOCK:  # blocks of rows: the (rows, steps) temporaries stay small
        tilt_all = np.broadcast_to(np.asarray(tilt_deg, dtype=float), lat_all.shape)
        return np.concatenate([solstice_row_gcr(
            lat_all[k:k + _GCR_BLOCK], tilt_all[k:k + _GCR_BLOCK], row_azimuth_deg,
            declination_deg, start_solar_h, end_solar_h)
            for k in range(0, len(lat_all), _GCR_BLOCK)])
    lat = np.radians(lat_all)[:, None]
    tilt = np.radians(np.asarray(tilt_deg, dtype=float))
    hours = np.linspace(start_solar_h, end_solar_h, ROW_RULE_STEPS)[None, :]
    omega = np.radians(15.0 * (hours - 12.0))
    dec = np.radians(declination_deg)
    sin_lat, cos_lat = np.sin(lat), np.cos(lat)
    sin_alt = sin_lat * np.sin(dec) + cos_lat * (np.cos(dec) * np.cos(omega))
    # sun azimuth g = atan2(sy, sx) + 180 deg, so cos(g - row) = -(sx cos row + sy sin row) / |s|
    sy = np.sin(omega)
    sx = np.cos(omega) * sin_lat - np.tan(dec) * cos_lat
    row = np.radians(row_azimuth_deg)
    with np.errstate(divide="ignore", invalid="ignore"):
        cos_rel = -(sx * np.cos(row) + sy * np.sin(row)) / np.hypot(sx, sy)
        tan_alt = sin_alt / np.sqrt(1.0 - sin_alt ** 2)
        reach = np.maximum(cos_rel, 0.0) / tan_alt
    reach = np.where(sin_alt > 0, reach, np.inf).max(axis=1)
    with np.errstate(invalid="ignore"):  # 0 tilt x inf reach: replaced by 1 below
        gcr = 1.0 / (np.cos(tilt) + np.sin(tilt) * reach)
    gcr = np.where(np.isinf(reach) & (np.broadcast_to(tilt, reach.shape) > 0), np.nan, gcr)
    return np.where(np.broadcast_to(tilt, reach.shape) == 0, 1.0, gcr)


def azimuth_of(dx: np.ndarray, dy: np.ndarray) -> np.ndarray:
    """Azimuth of a direction, clockwise from north [deg] in [0, 360)."""
    return np.mod(np.degrees(np.arctan2(dx, dy)), 360.0)


def angle_between(a_deg: np.ndarray | float, b_deg: np.ndarray | float) -> np.ndarray:
    """Smallest angle between two azimuths [deg] in [0, 180]."""
    d = np.mod(np.asarray(a_deg, dtype=float) - np.asarray(b_deg, dtype=float), 360.0)
    return np.minimum(d, 360.0 - d)


def ridge_planes(geometry: gpd.GeoSeries, envelope: np.ndarray | None = None
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Split footprints into the two planes either side of a ridge.

    The ridge is the centre line of the minimum rotated rectangle parallel to
    its long side; each plane faces away from the ridge.

    Parameters
    ----------
    geometry : GeoSeries
        Footprints in a metric CRS [m].
    envelope : ndarray of shapely geometries, optional
        ``shapely.oriented_envelope`` of the footprints, if already computed.

    Returns
    -------
    plane_a, plane_b : ndarray of shapely geometries
        The footprint parts either side of the ridge.
    azimuth_a, azimuth_b : ndarray
        Azimuths the planes face, clockwise from north [deg].
    """
    geoms = np.asarray(geometry.array, dtype=object)
    n = len(geoms)
    corners = np.zeros((n, 4, 2))
    if n:
        rect = shapely.oriented_envelope(geoms) if envelope is None else envelope
        coords, idx = shapely.get_coordinates(rect, return_index=True)
        counts = np.bincount(idx, minlength=n)
        starts = np.cumsum(counts) - counts
        ok = counts == 5
        corners[ok] = coords[starts[ok][:, None] + np.arange(4)[None, :]]
        b = shapely.bounds(geoms)[~ok]  # degenerate: axis-aligned box
        corners[~ok] = np.stack([b[:, [0, 1]], b[:, [2, 1]], b[:, [2, 3]], b[:, [0, 3]]], 1)
    p0 = corners[:, 0]
    u = corners[:, 1] - p0
    v = corners[:, 3] - p0
    swap = np.hypot(*u.T) < np.hypot(*v.T)
    u, v = np.where(swap[:, None], v, u), np.where(swap[:, None], u, v)
    half = v / 2.0
    ring_a = np.stack([p0, p0 + u, p0 + u + half, p0 + half, p0], 1)
    ring_b = np.stack([p0 + half, p0 + u + half, p0 + u + v, p0 + v, p0 + half], 1)
    plane_a = shapely.intersection(geoms, shapely.polygons(ring_a))
    plane_b = shapely.intersection(geoms, shapely.polygons(ring_b))
    return plane_a, plane_b, azimuth_of(-v[:, 0], -v[:, 1]), azimuth_of(v[:, 0], v[:, 1])


def _opened_area(geoms: np.ndarray, setback_m: np.ndarray, width_m: float) -> np.ndarray:
    """Area inside the setback that a ``width_m`` wide strip can reach [m2]."""
    inner = shapely.buffer(geoms, -(setback_m + width_m / 2.0), **_MITRE)
    if width_m > 0:
        inner = shapely.buffer(inner, width_m / 2.0, **_MITRE)
    return np.asarray(shapely.area(inner), dtype=float)


def _segments_cross(ax: np.ndarray, ay: np.ndarray, bx: np.ndarray, by: np.ndarray,
                    cx: np.ndarray, cy: np.ndarray, dx: np.ndarray, dy: np.ndarray
                    ) -> np.ndarray:
    """Segments a-b and c-d intersect or touch (collinear pairs count as touching)."""
    o1 = (bx - ax) * (cy - ay) - (by - ay) * (cx - ax)
    o2 = (bx - ax) * (dy - ay) - (by - ay) * (dx - ax)
    o3 = (dx - cx) * (ay - cy) - (dy - cy) * (ax - cx)
    o4 = (dx - cx) * (by - cy) - (dy - cy) * (bx - cx)
    return (o1 * o2 <= 0) & (o3 * o4 <= 0)


def _rings_simple(x: np.ndarray, y: np.ndarray, start: np.ndarray, m: np.ndarray
                  ) -> np.ndarray:
    """Whether each ring (vertices ``start .. start + m - 1``, not closed) is simple.

    Every pair of non-adjacent edges is tested, rings grouped by vertex count.
    """
    simple = np.ones(len(start), dtype=bool)
    for k in np.unique(m):
        if k <= 3:
            continue
        a, b = np.triu_indices(int(k), 2)
        sel = ~((a == 0) & (b == k - 1))
        a, b = a[sel], b[sel]
        rings = np.flatnonzero(m == k)
        step = max(1, 2_000_000 // len(a))
        for lo in range(0, len(rings), step):
            r = rings[lo:lo + step]
            v = start[r][:, None] + np.arange(k)[None, :]
            px, py = x[v], y[v]
            qx, qy = np.roll(px, -1, axis=1), np.roll(py, -1, axis=1)
            hit = _segments_cross(px[:, a], py[:, a], qx[:, a], qy[:, a],
                                  px[:, b], py[:, b], qx[:, b], qy[:, b])
            simple[r] = ~hit.any(axis=1)
    return simple


def inset_areas(geoms: np.ndarray, setback_m: np.ndarray, width_m: float
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Area inside a mitred setback and its opening, in closed form where that is exact.

    Moving every edge of a polygon inward by ``d`` (mitred corners) gives,
    while no edge vanishes and the moved ring does not cross itself, the
    area ``A - P d + d^2 sum(tan(t_i / 2))`` (``A`` area, ``P`` perimeter,
    ``t_i`` the signed turn at vertex ``i``, positive at convex corners).
    That is what ``shapely.buffer(g, -d, join_style="mitre",
    mitre_limit=5)`` computes where GEOS does nothing else, and the closed
    form is used only where that holds:

    - a polygon without holes whose turns sum to 360 deg;
    - no reflex turn sharper than :data:`_MITRE_SAFE_TURN_DEG` (mitre
      limit of the inward offset), and with ``w > 0`` no convex one either
      (mitre limit of the dilation);
    - every edge keeps a length above 1% of ``e = d + w / 2`` at ``e``;
    - rings with a reflex corner: at most
      :data:`_MAX_REFLEX_RING_VERTICES` vertices, and the moved rings at
      ``d`` and ``e`` are simple (no two non-adjacent edges meet).

    GEOS also drops nearly straight corners of its input (within 1% of the
    distance of their neighbours' chord) and joins them with a single
    point; the closed form keeps them exactly. The two agree within 1e-6 of
    the area: on the sample footprints with a vertex pushed up to 8 cm off
    every other edge (3,480 rings, 15 setback and width pairs) the largest
    difference was 1.6e-7 (``tests/test_roof.py``).

    The footprints must be valid (ingest repairs invalid ones; overlay
    results such as the roof planes are valid).

    The opening of :func:`_opened_area` (shrink by ``e``, dilate by
    ``w / 2``) then moves the same edges back out to ``d``: its area is that
    of the setback.

    Parameters
    ----------
    geoms : ndarray of shapely geometries
        Footprints or planes in a metric CRS [m].
    setback_m : ndarray
        Edge setback ``d`` [m], >= 0.
    width_m : float
        Minimum array width ``w`` [m], >= 0.

    Returns
    -------
    inside, opened : ndarray
        Area inside the setback and its opened area [m2]; NaN where not exact.
    exact : ndarray of bool
        The closed form applies.
    """
    geoms = np.asarray(geoms, dtype=object)
    n = len(geoms)
    setback_m = np.broadcast_to(np.asarray(setback_m, dtype=float), (n,))
    r = width_m / 2.0
    inside = np.full(n, np.nan)
    exact = np.zeros(n, dtype=bool)
    cand = ((shapely.get_type_id(geoms) == 3) & (shapely.get_num_interior_rings(geoms) == 0)
            & (shapely.get_num_coordinates(geoms) >= 4) & (setback_m >= 0) & (r >= 0))
    pos = np.flatnonzero(cand)
    if len(pos) == 0:
        return inside, inside.copy(), exact
    xy, idx = shapely.get_coordinates(geoms[pos], return_index=True)
    counts = np.bincount(idx, minlength=len(pos))
    ends = np.cumsum(counts)
    m = counts - 1  # vertices without the closing one
    keep = np.ones(len(xy), dtype=bool)
    keep[ends - 1] = False
    # coordinates relative to each ring's first vertex: no cancellation at 1e6 m
    x = xy[keep, 0] - np.repeat(xy[ends - counts, 0], m)
    y = xy[keep, 1] - np.repeat(xy[ends - counts, 1], m)
    idx = idx[keep]
    vend = np.cumsum(m)
    vstart = vend - m
    nxt = np.arange(1, len(x) + 1)
    nxt[vend - 1] = vstart
    prv = np.arange(-1, len(x) - 1)
    prv[vstart] = vend - 1
    ex, ey = x[nxt] - x, y[nxt] - y  # edge i: vertex i -> i + 1
    ix, iy = ex[prv], ey[prv]  # edge into vertex i
    twice_area = np.bincount(idx, x * y[nxt] - x[nxt] * y, minlength=len(pos))
    sign = np.where(twice_area < 0, -1.0, 1.0)[idx]  # interior on the left, turns signed
    cross = sign * (ix * ey - iy * ex)
    dot = ix * ex + iy * ey
    length = np.hypot(ex, ey)
    turn = np.arctan2(cross, dot)
    d = setback_m[pos]
    e = d + r
    ev = e[idx]
    limit = np.radians(_MITRE_SAFE_TURN_DEG)
    with np.errstate(divide="ignore", invalid="ignore"):
        half_tan = cross / (length[prv] * length + dot)  # tan(turn / 2)
        bad = (turn < -limit) | ~(length - ev * (half_tan + half_tan[nxt]) > 0.01 * ev)
    if r > 0:
        bad |= turn > limit
    ok = (np.bincount(idx, bad, minlength=len(pos)) == 0) & (m >= 3)
    ok &= np.abs(np.bincount(idx, turn, minlength=len(pos)) - 2.0 * np.pi) < 1e-6
    perimeter = np.bincount(idx, length, minlength=len(pos))
    tan_sum = np.bincount(idx, half_tan, minlength=len(pos))
    area0 = np.abs(twice_area) / 2.0
    area_d = area0 - perimeter * d + tan_sum * d ** 2
    area_e = area0 - perimeter * e + tan_sum * e ** 2
    ok &= (area_d > 0) & (area_e > 0)
    reflex = ok & (np.bincount(idx, turn < 0, minlength=len(pos)) > 0)
    ok &= ~reflex | (m <= _MAX_REFLEX_RING_VERTICES)  # the pair test grows with m^2
    reflex &= ok
    if reflex.any():
        # rings with reflex corners: the moved rings must stay simple (no collisions)
        rv = reflex[idx]
        sub = np.flatnonzero(reflex)
        sub_m = m[sub]
        sub_start = np.cumsum(sub_m) - sub_m
        # inward unit normals of the edges, and the mitre point of each corner at distance 1
        with np.errstate(divide="ignore", invalid="ignore"):
            nx, ny = -sign * ey / length, sign * ex / length
            cos_t = dot / (length[prv] * length)
            mx, my = (nx[prv] + nx) / (1.0 + cos_t), (ny[prv] + ny) / (1.0 + cos_t)
        simple = np.ones(len(sub), dtype=bool)
        for dist in (d, e):
            dv = dist[idx][rv]
            simple &= _rings_simple(x[rv] + dv * mx[rv], y[rv] + dv * my[rv], sub_start, sub_m)
        ok[sub[~simple]] = False
    inside[pos[ok]] = area_d[ok]
    exact[pos[ok]] = True
    return inside, inside.copy(), exact


def setback_and_opened_area(geoms: np.ndarray, setback_m: np.ndarray, width_m: float
                            ) -> tuple[np.ndarray, np.ndarray]:
    """Area inside the setback, and the part of it a ``width_m`` wide strip can reach.

    The second is the morphological opening of :func:`_opened_area`. Where
    :func:`inset_areas` is exact (equal to the GEOS buffers up to float
    noise) its closed form is used, elsewhere the buffers.

    Parameters
    ----------
    geoms : ndarray of shapely geometries
        Footprints or roof planes in a metric CRS [m].
    setback_m : ndarray
        Edge setback [m].
    width_m : float
        Minimum array width [m].

    Returns
    -------
    inside, opened : ndarray, ndarray
        Area inside the setback [m2] and its opened area [m2].
    """
    geoms = np.asarray(geoms, dtype=object)
    setback_m = np.broadcast_to(np.asarray(setback_m, dtype=float), (len(geoms),))
    inside, opened, exact = inset_areas(geoms, setback_m, width_m)
    slow = ~exact
    if slow.any():
        inside[slow] = shapely.area(shapely.buffer(geoms[slow], -setback_m[slow], **_MITRE))
        opened[slow] = _opened_area(geoms[slow], setback_m[slow], width_m)
    return inside, opened


def band_lookup(values: np.ndarray, bands: dict[float, float]) -> np.ndarray:
    """Value of the band with the largest lower bound at or below each value.

    Parameters
    ----------
    values : ndarray
        E.g. building heights [m].
    bands : dict
        Lower bound -> value; must contain 0.

    Returns
    -------
    ndarray
        The band value per entry (the 0 band for NaN or negative values).
    """
    bounds = np.array(sorted(bands), dtype=float)
    out = np.array([bands[b] for b in sorted(bands)], dtype=float)
    pos = np.searchsorted(bounds, np.nan_to_num(np.asarray(values, float), nan=0.0),
                          side="right") - 1
    return out[np.clip(pos, 0, len(out) - 1)]


def roof_kind(buildings: pd.DataFrame, cfg: RoofConfig) -> tuple[np.ndarray, np.ndarray]:
    """Flat or pitched: roof:shape tag, building tag, the first matching rule, or the default.

    Parameters
    ----------
    buildings : DataFrame
        With ``tag_roof_shape``, ``tag_building``, ``building_type``,
        ``footprint_area_m2`` [m2] and ``height_m`` [m].
    cfg : RoofConfig
        The lookup tables, rules and the default.

    Returns
    -------
    kind, source : ndarray, ndarray
        ``flat``/``pitched`` and ``tag_roof_shape``/``tag_building``/
        ``rule:<name>``/``default``.
    """
    n = len(buildings)
    kind = np.full(n, cfg.roof_kind_default, dtype=object)
    source = np.full(n, "default", dtype=object)
    area = buildings["footprint_area_m2"].to_numpy(dtype=float)
    height = buildings["height_m"].to_numpy(dtype=float)
    btype = buildings["building_type"].astype(object).to_numpy()
    for rule in reversed(cfg.roof_kind_rules):
        hit = np.ones(n, dtype=bool)
        if rule.building_types is not None:
            hit &= np.isin(btype, rule.building_types)
        for col, lo, hi in ((area, rule.min_footprint_area_m2, rule.max_footprint_area_m2),
                            (height, rule.min_height_m, rule.max_height_m)):
            if lo is not None:
                hit &= col >= lo
            if hi is not None:
                hit &= col < hi
        kind[hit] = rule.roof_kind
        source[hit] = f"rule:{rule.name}"
    for col, table in (("tag_building", cfg.roof_kind_by_tag_building),
                       ("tag_roof_shape", cfg.roof_kind_by_roof_shape)):
        mapped = buildings[col].map(table)
        has = mapped.notna().to_numpy()
        kind[has] = mapped.to_numpy()[has]
        source[has] = col
    return kind, source


_TRANSFORMERS = threading.local()


def _latitude(geometry: gpd.GeoSeries, centroid: np.ndarray | None = None) -> np.ndarray:
    """Latitude of the footprint centroids [deg] (``centroid``: if already computed).

    The centroids go through pyproj directly (the transformer that
    ``GeoSeries.to_crs`` builds, cached per thread: pyproj transformers are
    not shared between threads), without building point geometries.
    """
    if len(geometry) == 0:
        return np.zeros(0)
    from pyproj import Transformer

    cent = (shapely.centroid(np.asarray(geometry.array, dtype=object)) if centroid is None
            else centroid)
    cache = _TRANSFORMERS.__dict__.setdefault("to_wgs84", {})
    key = geometry.crs.to_wkt()
    if key not in cache:
        cache[key] = Transformer.from_crs(geometry.crs, "EPSG:4326", always_xy=True)
    _, lat = cache[key].transform(shapely.get_x(cent), shapely.get_y(cent))
    return np.asarray(lat, dtype=float)


def roof_potential(part: gpd.GeoDataFrame, roof: RoofConfig, policy: PolicyConfig
                   ) -> gpd.GeoDataFrame:
    """Kernel: roof kind, usable area, layout and capacity of each roof.

    Parameters
    ----------
    part : GeoDataFrame
        Classified buildings with ``height_m`` [m], in a metric CRS.
    roof : RoofConfig
        Setbacks, utilisation, layout and module density.
    policy : PolicyConfig
        Coverage share by building type.

    Returns
    -------
    GeoDataFrame
        ``part`` with the columns in the module table.
    """
    out = part.copy()
    n = len(out)
    geoms = np.asarray(out.geometry.array, dtype=object)
    # computed once: the ridges, the latitudes and the shading stage's obstacle columns
    rect = shapely.oriented_envelope(geoms) if n else np.zeros(0, dtype=object)
    cent = shapely.centroid(geoms) if n else np.zeros(0, dtype=object)
    kind, kind_source = roof_kind(out, roof)
    flat = kind == "flat"
    height = out["height_m"].to_numpy(dtype=float)
    setback = np.where(flat, band_lookup(height, roof.setback_flat_m_by_min_height_m),
                       band_lookup(height, roof.setback_pitched_m_by_min_height_m))
    btype = out["building_type"].astype(object)
    util_flat = btype.map(roof.utilisation_flat_by_type).fillna(
        roof.utilisation_flat_by_type["default"]).to_numpy(dtype=float)
    util_pitched = btype.map(roof.utilisation_pitched_by_type).fillna(
        roof.utilisation_pitched_by_type["default"]).to_numpy(dtype=float)
    util = np.where(flat, util_flat, util_pitched)
    min_area, width = roof.min_array_area_m2, roof.min_array_width_m
    reason_setback = "nothing left inside the edge setback"
    reason_narrow = (f"roof narrower than roof.min_array_width_m = {width:g} m inside the "
                     "setback")
    reason_small = f"usable area below roof.min_array_area_m2 = {min_area:g} m2"

    # flat roofs: rows facing flat_azimuth_deg at the solstice-rule GCR
    area_in = np.zeros(n)
    opened = np.zeros(n)
    if flat.any():
        area_in[flat], opened[flat] = setback_and_opened_area(geoms[flat], setback[flat], width)
    usable_1 = np.where(flat, opened * util, 0.0)
    az_1 = np.full(n, roof.flat_azimuth_deg)
    az_2 = np.full(n, np.nan)
    usable_2 = np.zeros(n)
    gcr = np.full(n, roof.pitched_gcr)
    gcr[flat] = solstice_row_gcr(
        _latitude(out.geometry[flat], cent[flat]), roof.flat_tilt_deg, roof.flat_azimuth_deg,
        roof.flat_row_rule_declination_deg, roof.flat_row_rule_start_solar_h,
        roof.flat_row_rule_end_solar_h) if flat.any() else np.zeros(0)
    reason = np.where(area_in <= 0, reason_setback,
                      np.where(opened <= 0, reason_narrow, reason_small)).astype(object)
    reason[flat & ~np.isfinite(gcr)] = ("sun below the horizon in the no-shading window "
                                        "of roof.flat_row_rule_*")

    # pitched roofs: two planes either side of the ridge
    pit = ~flat
    if pit.any():
        cos_t = np.cos(np.radians(roof.pitched_tilt_deg))
        pa, pb, aza, azb = ridge_planes(out.geometry[pit], rect[pit])
        s = setback[pit]
        planes = []
        for plane, az in ((pa, aza), (pb, azb)):
            inside, op = setback_and_opened_area(plane, s, width)
            use = op / cos_t * util[pit]
            north = angle_between(az, 0.0) < roof.pitched_min_azimuth_from_north_deg
            ok = ~north & (use >= min_area)
            planes.append((inside, op, use, az, north, ok))
        (ia, oa, ua, aza, na, oka), (ib, ob, ub, azb, nb, okb) = planes
        # usable planes first, then the one facing closest to south
        score_a = np.where(oka, 1000.0, 0.0) - angle_between(aza, 180.0)
        score_b = np.where(okb, 1000.0, 0.0) - angle_between(azb, 180.0)
        a_first = score_a >= score_b
        u1 = np.where(a_first, np.where(oka, ua, 0.0), np.where(okb, ub, 0.0))
        u2 = np.where(a_first, np.where(okb, ub, 0.0), np.where(oka, ua, 0.0))
        second_ok = np.where(a_first, okb, oka)
        area_in[pit] = ia + ib
        usable_1[pit] = u1
        usable_2[pit] = u2
        az_1[pit] = np.where(a_first, aza, azb)
        az_2[pit] = np.where(second_ok, np.where(a_first, azb, aza), np.nan)
        south_area = np.where(na, 0.0, ua) + np.where(nb, 0.0, ub)
        reason[pit] = np.where(
            ia + ib <= 0, reason_setback,
            np.where(oa + ob <= 0, reason_narrow,
                     np.where((south_area <= 0) & (ua + ub > 0),
                              "only north-facing planes (roof.pitched_min_azimuth_from_north_deg)",
                              reason_small)))
    usable_1 = np.where(flat & ((usable_1 < min_area) | ~np.isfinite(gcr)), 0.0, usable_1)
    usable = usable_1 + usable_2
    gcr_ok = np.nan_to_num(gcr)
    density = roof.module_power_density_w_per_m2
    share = btype.map(policy.coverage_share_by_type).fillna(0.0).to_numpy(dtype=float)
    policy_area = np.minimum(share * out["footprint_area_m2"].to_numpy(dtype=float), usable)
    policy_2 = np.maximum(policy_area - usable_1, 0.0)

    out["setback_m"] = setback
    out["roof_kind"] = kind
    out["roof_kind_source"] = kind_source
    out["setback_area_m2"] = area_in
    out["utilisation_factor"] = util
    out["usable_area_m2"] = usable
    out["tilt_deg"] = np.where(flat, roof.flat_tilt_deg, roof.pitched_tilt_deg)
    out["azimuth_deg"] = az_1
    out["gcr"] = gcr
    out["module_area_m2"] = usable * gcr_ok
    out["capacity_kwp"] = capacity_kwp(usable * gcr_ok, density)
    out["azimuth_2_deg"] = az_2
    out["usable_area_2_m2"] = usable_2
    out["capacity_2_kwp"] = capacity_kwp(usable_2 * gcr_ok, density)
    out["coverage_share"] = share
    out["policy_area_m2"] = policy_area
    out["capacity_policy_kwp"] = capacity_kwp(policy_area * gcr_ok, density)
    out["capacity_policy_2_kwp"] = capacity_kwp(policy_2 * gcr_ok, density)
    out["suitable"] = usable > 0
    out["unsuitable_reason"] = pd.Series(np.where(usable > 0, None, reason), index=out.index,
                                         dtype="object")
    for col, values in obstacle_columns(geoms, rect, cent).items():
        out[col] = values
    for col, values in summary_columns(geoms).items():
        out[col] = values
    return out


def roof_kernel(part: gpd.GeoDataFrame, roof: RoofConfig, policy: PolicyConfig,
                heights: HeightsConfig, rasters: pd.DataFrame) -> gpd.GeoDataFrame:
    """Kernel of the stage: heights (:func:`pipeline.heights.building_heights`), then roofs.

    Parameters
    ----------
    part : GeoDataFrame
        Classified buildings in a metric CRS.
    roof : RoofConfig
        Roof assumptions.
    policy : PolicyConfig
        Coverage share by building type.
    heights : HeightsConfig
        Height assumptions.
    rasters : DataFrame
        Height raster index (:func:`pipeline.heights.raster_index`).

    Returns
    -------
    GeoDataFrame
        ``part`` with the height and roof columns.
    """
    return roof_potential(building_heights(part, heights, rasters), roof, policy)


def run(cfg: PipelineConfig, base_dir: Path) -> dict:
    """Roof stage runner: classified buildings in, heights and roof potential out.

    Parameters
    ----------
    cfg : PipelineConfig
        The run's configuration.
    base_dir : Path
        Project root.

    Returns
    -------
    dict
        Rows in and out, suitable roofs, total capacity [kWp], counts by
        height source and roof kind source.
    """
    t0 = time.perf_counter()
    d = base_dir / cfg.paths.processed_dir
    rasters = raster_index(cfg.heights, base_dir)
    rows_in, rows_out, out = map_file(
        d / "classify_buildings.parquet", d / "roof_buildings.parquet", roof_kernel,
        cfg.roof, cfg.policy, cfg.heights, rasters, label="roof",
        keep=("suitable", "capacity_kwp", "height_source", "roof_kind_source"))
    stats = {"rows_in": rows_in, "rows_out": rows_out,
             "suitable": int(out["suitable"].sum()),
             "capacity_kwp": float(out["capacity_kwp"].sum()),
             "height_source": out["height_source"].value_counts().to_dict(),
             "roof_kind_source": out["roof_kind_source"].value_counts().to_dict()}
    log.info("roof: %d buildings in, %d out, %d suitable, %.1f MWp, %d height rasters, "
             "heights %s, %.1f s", stats["rows_in"], stats["rows_out"], stats["suitable"],
             stats["capacity_kwp"] / 1000, len(rasters), stats["height_source"],
             time.perf_counter() - t0)
    return stats
