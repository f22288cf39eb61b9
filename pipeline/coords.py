"""Coordinate defects: GCJ-02 ("Mars") coordinates and wrongly declared CRSs.

Chinese map services (Amap, Tencent, Baidu before its own BD-09 step) publish
coordinates in GCJ-02, WGS84 shifted by a published obfuscation formula (a few
hundred metres in Shanghai). :func:`wgs84_to_gcj02` is that forward formula,
:func:`gcj02_to_wgs84` its inverse by fixed-point iteration (the forward
shift varies slowly, so the iteration converges to < 1e-9 deg in a few
steps). A source is converted when its config says ``gcj02_to_wgs84: true``;
:func:`gcj02_evidence` compares a source with another one and the ingest
runner logs a warning when the source matches much better after conversion.

:func:`check_extent` catches a declared CRS that does not fit the coordinates
(longitude and latitude swapped, projected metres declared as degrees, or
degrees declared as metres): no feature lies near the district boundaries
as declared, and the error says which reading would put them there.
"""

from __future__ import annotations

from pathlib import Path

import geopandas as gpd
import numpy as np
import shapely
from pyproj import CRS, Transformer

from pipeline.errors import InputError

#: Krasovsky 1940 ellipsoid, as in the published GCJ-02 formula
_GCJ_A_M = 6378245.0
_GCJ_EE = 0.00669342162296594323
#: GCJ-02 leaves coordinates outside this box (China) unshifted [deg]
_CHINA_LON_DEG = (72.004, 137.8347)
_CHINA_LAT_DEG = (0.8293, 55.8271)


def _in_china(lon: np.ndarray, lat: np.ndarray) -> np.ndarray:
    return ((lon >= _CHINA_LON_DEG[0]) & (lon <= _CHINA_LON_DEG[1])
            & (lat >= _CHINA_LAT_DEG[0]) & (lat <= _CHINA_LAT_DEG[1]))


def _gcj_delta(lon: np.ndarray, lat: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """GCJ-02 shift (dlon, dlat) at WGS84 positions [deg]."""
    x, y = lon - 105.0, lat - 35.0
    pi = np.pi
    common = (20.0 * np.sin(6.0 * x * pi) + 20.0 * np.sin(2.0 * x * pi)) * 2.0 / 3.0
    dlat = (-100.0 + 2.0 * x + 3.0 * y + 0.2 * y * y + 0.1 * x * y
            + 0.2 * np.sqrt(np.abs(x)) + common
            + (20.0 * np.sin(y * pi) + 40.0 * np.sin(y / 3.0 * pi)) * 2.0 / 3.0
            + (160.0 * np.sin(y / 12.0 * pi) + 320.0 * np.sin(y * pi / 30.0)) * 2.0 / 3.0)
    dlon = (300.0 + x + 2.0 * y + 0.1 * x * x + 0.1 * x * y
            + 0.1 * np.sqrt(np.abs(x)) + common
            + (20.0 * np.sin(x * pi) + 40.0 * np.sin(x / 3.0 * pi)) * 2.0 / 3.0
            + (150.0 * np.sin(x / 12.0 * pi) + 300.0 * np.sin(x / 30.0 * pi)) * 2.0 / 3.0)
    radlat = np.radians(lat)
    magic = 1.0 - _GCJ_EE * np.sin(radlat) ** 2
    sqrtmagic = np.sqrt(magic)
    dlat = dlat * 180.0 / ((_GCJ_A_M * (1.0 - _GCJ_EE)) / (magic * sqrtmagic) * pi)
    dlon = dlon * 180.0 / (_GCJ_A_M / sqrtmagic * np.cos(radlat) * pi)
    inside = _in_china(lon, lat)
    return np.where(inside, dlon, 0.0), np.where(inside, dlat, 0.0)


def wgs84_to_gcj02(lon: np.ndarray, lat: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Shift WGS84 positions to GCJ-02 (the published forward formula).

    Parameters
    ----------
    lon, lat : array
        WGS84 longitude and latitude [deg].

    Returns
    -------
    lon, lat : ndarray
        GCJ-02 longitude and latitude [deg]; unchanged outside China.
    """
    lon, lat = np.asarray(lon, dtype=float), np.asarray(lat, dtype=float)
    dlon, dlat = _gcj_delta(lon, lat)
    return lon + dlon, lat + dlat


def gcj02_to_wgs84(lon: np.ndarray, lat: np.ndarray, tol_deg: float = 1e-10,
                   max_iter: int = 20) -> tuple[np.ndarray, np.ndarray]:
    """Invert the GCJ-02 shift by fixed-point iteration.

    Parameters
    ----------
    lon, lat : array
        GCJ-02 longitude and latitude [deg].
    tol_deg : float
        Stop when the forward transform of the estimate is within this of
        the input [deg] (1e-10 deg ~ 0.01 mm).
    max_iter : int
        Iteration limit.

    Returns
    -------
    lon, lat : ndarray
        WGS84 longitude and latitude [deg].
    """
    glon, glat = np.asarray(lon, dtype=float), np.asarray(lat, dtype=float)
    wlon, wlat = glon.copy(), glat.copy()
    for _ in range(max_iter):
        flon, flat = wgs84_to_gcj02(wlon, wlat)
        elon, elat = flon - glon, flat - glat
        wlon, wlat = wlon - elon, wlat - elat
        if np.all(np.abs(elon) < tol_deg) and np.all(np.abs(elat) < tol_deg):
            break
    return wlon, wlat


def _transform_geoms(geoms: np.ndarray, fn) -> np.ndarray:
    return shapely.transform(geoms, lambda xy: np.column_stack(fn(xy[:, 0], xy[:, 1])))


def convert_gcj02_frame(frame: gpd.GeoDataFrame) -> gpd.GeoDataFrame:
    """Convert a frame's GCJ-02 geometries to WGS84 (EPSG:4326).

    Parameters
    ----------
    frame : GeoDataFrame
        Geometries whose longitude/latitude are GCJ-02 (any declared CRS; it
        is taken to EPSG:4326 first).

    Returns
    -------
    GeoDataFrame
        Same rows, geometries in WGS84, CRS EPSG:4326.
    """
    out = frame.to_crs("EPSG:4326") if frame.crs != "EPSG:4326" else frame.copy()
    geoms = shapely.force_2d(out.geometry.array)
    out = out.set_geometry(gpd.GeoSeries(_transform_geoms(np.asarray(geoms), gcj02_to_wgs84),
                                         index=out.index, crs="EPSG:4326"))
    return out


def _points(frame: gpd.GeoDataFrame) -> tuple[np.ndarray, np.ndarray]:
    """Bounding-box centres of the non-empty geometries."""
    geoms = frame.geometry.array
    ok = ~(shapely.is_missing(geoms) | shapely.is_empty(geoms))
    b = shapely.bounds(np.asarray(geoms)[ok])
    return (b[:, 0] + b[:, 2]) / 2.0, (b[:, 1] + b[:, 3]) / 2.0


def _share_near(x: np.ndarray, y: np.ndarray, crs: CRS, box: tuple[float, ...],
                working_crs: str) -> float:
    """Share of points that land in ``box`` (working CRS) when read in ``crs``."""
    if len(x) == 0:
        return 1.0
    with np.errstate(all="ignore"):
        tx, ty = Transformer.from_crs(crs, working_crs, always_xy=True).transform(x, y)
    tx, ty = np.asarray(tx, dtype=float), np.asarray(ty, dtype=float)
    inside = (np.isfinite(tx) & np.isfinite(ty) & (tx >= box[0]) & (tx <= box[2])
              & (ty >= box[1]) & (ty <= box[3]))
    return float(inside.mean())


def check_extent(frame: gpd.GeoDataFrame, path: Path | str, source: str,
                 districts: gpd.GeoDataFrame, margin_m: float) -> None:
    """Raise if the declared CRS puts no feature near the district boundaries.

    Parameters
    ----------
    frame : GeoDataFrame
        One source's features in their declared CRS.
    path : Path or str
        The source file, for the message.
    source : str
        The source's config name, for the message.
    districts : GeoDataFrame
        District boundaries in the projected working CRS.
    margin_m : float
        Distance around the boundaries' bounding box that still counts as
        near [m].

    Raises
    ------
    InputError
        Naming the file, the declared CRS, where the features are, and the
        reading of the coordinates (swapped axes, metres, degrees) that fits.
    """
    x, y = _points(frame)
    if len(x) == 0 or frame.crs is None:
        return
    working = districts.crs
    b = districts.total_bounds
    box = (b[0] - margin_m, b[1] - margin_m, b[2] + margin_m, b[3] + margin_m)
    crs = CRS.from_user_input(frame.crs)
    if _share_near(x, y, crs, box, working) > 0:
        return
    extent = f"x {np.nanmin(x):.6g}..{np.nanmax(x):.6g}, y {np.nanmin(y):.6g}..{np.nanmax(y):.6g}"
    problem = (f"with the declared CRS {crs.to_string()} none of the {len(x)} features lies "
               f"within {margin_m:g} m of the district boundaries (coordinates: {extent})")
    wgs84 = CRS.from_epsg(4326)
    if crs.is_geographic and _share_near(y, x, crs, box, working) > 0.5:
        raise InputError(path, problem + "; with x and y swapped they do: longitude and "
                         "latitude are swapped", field="geometry",
                         fix="re-export the file with x = longitude and y = latitude")
    if crs.is_geographic and _share_near(x, y, CRS.from_user_input(working), box,
                                         working) > 0.5:
        raise InputError(path, problem + f"; they are projected metres that fit {working}, "
                         "declared as degrees", field="crs",
                         fix=f"declare the file's real projected CRS (e.g. ogr2ogr -a_srs "
                         f"{working}); set sources[{source}].crs_if_missing only for files "
                         "without a CRS")
    if crs.is_projected and _share_near(x, y, wgs84, box, working) > 0.5:
        raise InputError(path, problem + "; they are longitude/latitude degrees declared as "
                         "projected coordinates", field="crs",
                         fix="declare EPSG:4326 for the file (e.g. ogr2ogr -a_srs EPSG:4326)")
    if crs.is_projected and _share_near(y, x, wgs84, box, working) > 0.5:
        raise InputError(path, problem + "; they are latitude/longitude degrees (swapped) "
                         "declared as projected coordinates", field="crs",
                         fix="re-export the file with x = longitude, y = latitude and "
                         "declare EPSG:4326")
    raise InputError(path, problem, field="crs",
                     fix="check the file's CRS and that the source and districts.path cover "
                     "the same area")


def gcj02_evidence(a: gpd.GeoDataFrame, b: gpd.GeoDataFrame) -> tuple[int, int]:
    """How many footprints of ``a`` land in ``b``'s, as read and if ``a`` were GCJ-02.

    Parameters
    ----------
    a, b : GeoDataFrame
        Polygons of two sources in the same projected CRS.

    Returns
    -------
    as_read, if_converted : int
        Footprints of ``a`` whose bounding-box centre lies inside a footprint
        of ``b``: as read, and after converting ``a`` from GCJ-02 to WGS84.
    """
    if len(a) == 0 or len(b) == 0:
        return 0, 0
    x, y = _points(a)
    crs = a.crs
    to_ll = Transformer.from_crs(crs, "EPSG:4326", always_xy=True)
    from_ll = Transformer.from_crs("EPSG:4326", crs, always_xy=True)
    lon, lat = to_ll.transform(x, y)
    cx, cy = from_ll.transform(*gcj02_to_wgs84(lon, lat))
    tree = shapely.STRtree(np.asarray(b.geometry.array))
    counts = []
    for px, py in ((x, y), (cx, cy)):
        hits = tree.query(shapely.points(px, py), predicate="within")
        counts.append(int(len(np.unique(hits[0]))))
    return counts[0], counts[1]
