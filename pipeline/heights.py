"""Building heights: raster median, height attribute, storeys x storey height, default.

Run inside the roof stage (:func:`pipeline.roof.run`), before the roof kind
and the setbacks, which both depend on the height.

Inputs and outputs

=====================  ======  ====================================================
column                 unit    meaning
=====================  ======  ====================================================
in: ``height_attr_m``  m       height from the source attributes (OSM ``height``,
                               CBDC ``Height``, traced raster patches)
in: ``levels_attr``    -       storeys from the source attributes (OSM
                               ``building:levels``, CBDC ``Fnum``)
in: geometry           m       footprint in the metric working CRS
out: ``height_m``      m       building height used downstream
out: ``height_source`` -       ``raster``, ``attribute``, ``levels`` or ``default``
out: ``raster_height_m`` m     median of the height rasters within the footprint
                               (NaN where no raster covers it)
=====================  ======  ====================================================

Raster heights
    Each configured raster (a building-height GeoTIFF or an nDSM, any CRS) is
    indexed once by the driver (:func:`raster_index`: path, CRS, bounds). In a
    partition the footprints are reprojected to each raster's CRS, grouped
    into blocks of ``raster_block_px`` pixels, and each block is read with a
    rasterio *window* around its footprints only, never the whole raster.
    Footprints are burnt into the window (pixel centres inside the polygon;
    where footprints overlap the later one wins) and the pixels that are not
    nodata and at least ``min_height_m`` high are collected. A building's
    raster height is the median of its pixels over all rasters (so a
    footprint across a tile edge uses both tiles). It is used only where those
    pixels cover at least ``raster_min_valid_share`` of the footprint.

Precedence
    ``source_order`` (default: raster, attribute, levels); the first source
    with a plausible value (within ``[min_height_m, max_height_m]``, storeys in
    ``[1, max_levels]``) wins, otherwise ``default_height_m``.
"""

from __future__ import annotations

import glob
import logging
import threading
import warnings
from pathlib import Path
from typing import Literal

import geopandas as gpd
import numpy as np
import pandas as pd
import shapely
from pydantic import BaseModel, ConfigDict, Field, model_validator

from pipeline.errors import InputError

log = logging.getLogger(__name__)

HeightSource = Literal["raster", "attribute", "levels"]


class RasterHeightConfig(BaseModel):
    """One set of building-height rasters (a file or a glob).

    Attributes
    ----------
    path : str
        File or glob pattern (``**`` allowed), relative to the project root.
    height_scale_m_per_unit : float
        Metres per pixel unit [m].
    nodata : float or None
        Nodata value where the files declare none.
    min_height_m : float
        Pixels lower than this are ground, not roof [m].
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    path: str
    height_scale_m_per_unit: float = Field(default=1.0, gt=0)
    nodata: float | None = None
    min_height_m: float = Field(default=1.0, ge=0)


class HeightsConfig(BaseModel):
    """Building height assumptions (config section ``heights:``).

    Attributes
    ----------
    source_order : list of {'raster', 'attribute', 'levels'}
        Precedence of the height sources.
    storey_height_m : float
        Height of one storey for ``levels_attr`` [m].
    default_height_m : float
        Height where no source has a plausible value [m].
    min_height_m, max_height_m : float
        Plausible range of a building height [m].
    max_levels : int
        Largest plausible storey count [-].
    rasters : list of RasterHeightConfig
        Building-height rasters.
    raster_min_valid_share : float
        Share of the footprint that valid raster pixels must cover [-].
    raster_block_px : int
        Side of the pixel blocks read as one window [px].
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    source_order: list[HeightSource] = Field(
        default_factory=lambda: ["raster", "attribute", "levels"], min_length=1)
    storey_height_m: float = Field(default=3.0, gt=0)
    default_height_m: float = Field(default=12.0, gt=0)
    min_height_m: float = Field(default=2.0, ge=0)
    max_height_m: float = Field(default=650.0, gt=0)
    max_levels: int = Field(default=130, ge=1)
    rasters: list[RasterHeightConfig] = Field(default_factory=list)
    raster_min_valid_share: float = Field(default=0.5, gt=0, le=1)
    raster_block_px: int = Field(default=2048, ge=64)

    @model_validator(mode="after")
    def _check(self) -> HeightsConfig:
        if len(set(self.source_order)) != len(self.source_order):
            raise ValueError("heights.source_order lists a source twice")
        if self.min_height_m >= self.max_height_m:
            raise ValueError("heights.min_height_m must be below heights.max_height_m")
        return self


def raster_index(cfg: HeightsConfig, base_dir: Path) -> pd.DataFrame:
    """List the height rasters with their CRS and bounds (opened, not read).

    Parameters
    ----------
    cfg : HeightsConfig
        The ``rasters`` entries.
    base_dir : Path
        Project root that relative paths resolve against.

    Returns
    -------
    DataFrame
        One row per file: ``path``, ``crs`` (WKT), ``left``, ``bottom``,
        ``right``, ``top`` (raster CRS units), ``nodata``,
        ``height_scale_m_per_unit``, ``min_height_m``.

    Raises
    ------
    InputError
        A pattern that matches no file, a file rasterio cannot open, or a
        raster without a CRS.
    """
    import rasterio

    rows = []
    for i, entry in enumerate(cfg.rasters):
        pattern = entry.path if Path(entry.path).is_absolute() else str(base_dir / entry.path)
        files = sorted(glob.glob(pattern, recursive=True))
        if not files:
            raise InputError(pattern, "no height raster matches this path",
                             field=f"heights.rasters[{i}].path",
                             fix="correct the path or glob, run `make data`, or remove the entry")
        for f in files:
            try:
                ds_ctx = rasterio.open(f)
            except rasterio.errors.RasterioIOError as exc:
                raise InputError(f, f"cannot open raster: {exc}", field="heights.rasters",
                                 fix="replace the file with a readable GeoTIFF") from exc
            with ds_ctx as ds:
                if ds.crs is None:
                    raise InputError(f, "raster has no CRS", field="crs",
                                     fix="georeference it (e.g. gdal_edit.py -a_srs EPSG:...)")
                nodata = ds.nodata if ds.nodata is not None else entry.nodata
                rows.append({"path": f, "crs": ds.crs.to_wkt(), **ds.bounds._asdict(),
                             "nodata": np.nan if nodata is None else float(nodata),
                             "height_scale_m_per_unit": entry.height_scale_m_per_unit,
                             "min_height_m": entry.min_height_m})
    return pd.DataFrame(rows, columns=["path", "crs", "left", "bottom", "right", "top", "nodata",
                                       "height_scale_m_per_unit", "min_height_m"])


def _group_median(labels: np.ndarray, values: np.ndarray, n: int) -> np.ndarray:
    """Median of ``values`` per integer label in ``[0, n)`` (NaN for empty labels)."""
    out = np.full(n, np.nan)
    if len(labels) == 0:
        return out
    order = np.lexsort((values, labels))
    labs, vals = labels[order], values[order]
    counts = np.bincount(labs, minlength=n)
    starts = np.cumsum(counts) - counts
    has = counts > 0
    lo = starts[has] + (counts[has] - 1) // 2
    hi = starts[has] + counts[has] // 2
    out[has] = (vals[lo] + vals[hi]) / 2.0
    return out


def _window_transform(t, win):  # noqa: ANN001, ANN202
    """Affine transform of a window (rasterio's uses the deprecated ``Affine *``)."""
    from affine import Affine

    c0, r0 = float(win.col_off), float(win.row_off)
    return Affine(t.a, t.b, t.c + t.a * c0 + t.b * r0, t.d, t.e, t.f + t.d * c0 + t.e * r0)


def raster_heights(geometry: gpd.GeoSeries, index: pd.DataFrame, block_px: int = 2048
                   ) -> tuple[np.ndarray, np.ndarray]:
    """Median raster height within each footprint, with windowed reads.

    Parameters
    ----------
    geometry : GeoSeries
        Footprints with a CRS.
    index : DataFrame
        Output of :func:`raster_index`.
    block_px : int
        Footprints are grouped into blocks of this many pixels a side; each
        block is one window read [px].

    Returns
    -------
    median_m, valid_share : ndarray, ndarray
        Median height of the valid pixels inside each footprint [m] (NaN if
        none) and the share of the footprint those pixels cover [-].
    """
    import rasterio
    import rasterio.features
    import rasterio.windows

    n = len(geometry)
    share = np.zeros(n)
    labels_all: list[np.ndarray] = []
    values_all: list[np.ndarray] = []
    if n == 0 or index.empty:
        return np.full(n, np.nan), share
    valid_geom = ~(geometry.isna() | geometry.is_empty).to_numpy()
    for crs, files in index.groupby("crs", sort=False):
        # only footprints near these rasters are reprojected; the others get NaN bounds,
        # which the hit test below rejects as it would reject their true bounds
        near = np.flatnonzero(valid_geom & _near_rasters(geometry, files, crs))
        bounds = np.full((n, 4), np.nan)
        areas = np.full(n, np.nan)
        garr = np.full(n, None, dtype=object)
        if len(near):
            sub = geometry.iloc[near].to_crs(crs)
            bounds[near] = sub.bounds.to_numpy()
            areas[near] = sub.area.to_numpy()
            garr[near] = np.asarray(sub.array, dtype=object)
        for f in files.itertuples(index=False):
            hit = (valid_geom & (bounds[:, 0] < f.right) & (bounds[:, 2] > f.left)
                   & (bounds[:, 1] < f.top) & (bounds[:, 3] > f.bottom))
            if not hit.any():
                continue
            pos = np.flatnonzero(hit)
            with rasterio.open(f.path) as ds:
                px_area = abs(ds.transform.a * ds.transform.e - ds.transform.b * ds.transform.d)
                inv = ~ds.transform
                x0, y0 = bounds[pos, 0], bounds[pos, 3]
                col = inv.a * x0 + inv.b * y0 + inv.c
                row = inv.d * x0 + inv.e * y0 + inv.f
                block = (np.floor(np.asarray(row) / block_px).astype(np.int64) * 1_000_003
                         + np.floor(np.asarray(col) / block_px).astype(np.int64))
                full = rasterio.windows.Window(0, 0, ds.width, ds.height)
                for key in np.unique(block):
                    sel = pos[block == key]
                    b = bounds[sel]
                    win = rasterio.windows.from_bounds(
                        b[:, 0].min(), b[:, 1].min(), b[:, 2].max(), b[:, 3].max(),
                        transform=ds.transform)
                    win = win.round_offsets(op="floor").round_lengths(op="ceil")
                    try:
                        win = win.intersection(full)
                    except rasterio.errors.WindowError:
                        continue
                    h, w = int(win.height), int(win.width)
                    if h <= 0 or w <= 0:
                        continue
                    data = ds.read(1, window=win)
                    heights = data.astype("float64") * f.height_scale_m_per_unit
                    valid = heights >= f.min_height_m
                    if np.isfinite(f.nodata):
                        valid &= data != f.nodata
                    # overlapping footprints are burnt in separate layers, so that each
                    # building gets all of its pixels whatever else is in the block
                    for layer in _overlap_free_layers(garr[sel]):
                        lsel = sel[layer]
                        burnt = _burn(garr[lsel], (h, w),
                                      _window_transform(ds.transform, win))
                        ok = (burnt > 0) & valid
                        lab = lsel[burnt[ok] - 1]
                        labels_all.append(lab)
                        values_all.append(heights[ok])
                        counts = np.bincount(lab, minlength=n)[lsel]
                        with np.errstate(divide="ignore", invalid="ignore"):
                            share[lsel] += np.where(areas[lsel] > 0,
                                                    counts * px_area / areas[lsel], 0)
    labels = np.concatenate(labels_all) if labels_all else np.zeros(0, dtype=np.int64)
    values = np.concatenate(values_all) if values_all else np.zeros(0)
    return _group_median(labels, values, n), np.minimum(share, 1.0)


#: Margin around a raster's extent, reprojected to the footprints' CRS, within
#: which footprints are reprojected to the raster's CRS [footprint CRS units].
_NEAR_RASTER_MARGIN = 1000.0


def _near_rasters(geometry: gpd.GeoSeries, files: pd.DataFrame, crs: str) -> np.ndarray:
    """Footprints that may overlap one of ``files`` (a superset), without reprojecting them.

    Each raster extent is reprojected to the footprints' CRS (densified
    edges) and widened by :data:`_NEAR_RASTER_MARGIN` plus each footprint's
    own diagonal, so that a footprint whose bounds in the raster CRS meet the
    raster is always kept. Where a reprojection fails, every footprint is kept.

    Parameters
    ----------
    geometry : GeoSeries
        Footprints with a CRS.
    files : DataFrame
        Rows of :func:`raster_index` sharing ``crs``.
    crs : str
        The rasters' CRS (WKT).

    Returns
    -------
    ndarray of bool
        Per footprint: may overlap a raster.
    """
    from pyproj import Transformer

    n = len(geometry)
    if geometry.crs is None:
        return np.ones(n, dtype=bool)
    b = shapely.bounds(np.asarray(geometry.array, dtype=object))
    pad = np.hypot(b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]) + _NEAR_RASTER_MARGIN
    near = np.zeros(n, dtype=bool)
    try:
        to_geom = Transformer.from_crs(crs, geometry.crs, always_xy=True)
        for f in files.itertuples(index=False):
            left, bottom, right, top = to_geom.transform_bounds(
                f.left, f.bottom, f.right, f.top, densify_pts=21)
            if not np.all(np.isfinite([left, bottom, right, top])):
                return np.ones(n, dtype=bool)
            near |= ((b[:, 0] - pad < right) & (b[:, 2] + pad > left)
                     & (b[:, 1] - pad < top) & (b[:, 3] + pad > bottom))
    except Exception:  # noqa: BLE001 - any reprojection trouble: keep all, as before
        return np.ones(n, dtype=bool)
    return near | ~np.isfinite(pad)


_BURN_LOCK = threading.Lock()


def _burn(geoms: np.ndarray, shape: tuple[int, int], transform: object) -> np.ndarray:
    """Rasterize footprints as labels 1..n (0 = none) on a window grid.

    ``rasterio.features.rasterize`` builds an in-memory GDAL dataset and, for
    some windows, rasterio warns ``NotGeoreferencedWarning`` while creating it
    although the explicit ``transform`` is used for the burn (a known rasterio
    quirk, cf. cogeotiff/rio-tiler#627; seen here only with concurrent burns
    from several threads). Burns are serialised per process, and that one
    warning is ignored for this call only; every other warning still surfaces.

    Parameters
    ----------
    geoms : ndarray of shapely geometries
        Footprints in the raster's CRS, none overlapping another.
    shape : tuple of int
        Window height and width [px].
    transform : Affine
        The window's transform.

    Returns
    -------
    ndarray
        int32 labels: position in ``geoms`` + 1, 0 outside every footprint.
    """
    import rasterio.errors
    import rasterio.features

    # one burn at a time per process: GDAL's in-memory dataset creation is not safe to race
    # from several threads, and warnings.catch_warnings is process-wide
    with _BURN_LOCK, warnings.catch_warnings():
        warnings.simplefilter("ignore", rasterio.errors.NotGeoreferencedWarning)
        return rasterio.features.rasterize(
            zip(geoms, range(1, len(geoms) + 1), strict=True), out_shape=shape,
            transform=transform, fill=0, dtype="int32")


def _overlap_free_layers(geoms: np.ndarray) -> list[np.ndarray]:
    """Split geometries into groups in which no two overlap (by area).

    Parameters
    ----------
    geoms : ndarray of shapely geometries
        Footprints in one raster block.

    Returns
    -------
    list of ndarray
        Positions into ``geoms``, one array per layer; usually a single layer.
    """
    n = len(geoms)
    tree = shapely.STRtree(geoms)
    a, b = tree.query(geoms, predicate="intersects")
    keep = a < b
    a, b = a[keep], b[keep]
    if len(a):
        real = shapely.area(shapely.intersection(geoms[a], geoms[b])) > 0
        a, b = a[real], b[real]
    layer = np.zeros(n, dtype=np.int64)
    if len(a):
        neighbours: dict[int, list[int]] = {}
        for i, j in zip(a.tolist(), b.tolist(), strict=True):
            neighbours.setdefault(j, []).append(i)
        for j in sorted(neighbours):  # greedy colouring in input order
            used = {int(layer[i]) for i in neighbours[j]}
            layer[j] = next(k for k in range(len(used) + 1) if k not in used)
    return [np.flatnonzero(layer == k) for k in range(int(layer.max()) + 1 if n else 0)]


def building_heights(part: gpd.GeoDataFrame, cfg: HeightsConfig, index: pd.DataFrame
                     ) -> gpd.GeoDataFrame:
    """Kernel: ``height_m`` and ``height_source`` of each building.

    Parameters
    ----------
    part : GeoDataFrame
        Buildings with ``height_attr_m`` [m] and ``levels_attr`` [-] (NaN
        where unknown), in a projected CRS.
    cfg : HeightsConfig
        Precedence, storey height, plausible ranges and default.
    index : DataFrame
        Height rasters (:func:`raster_index`); may be empty.

    Returns
    -------
    GeoDataFrame
        ``part`` with ``raster_height_m`` [m], ``height_m`` [m] and
        ``height_source``.
    """
    out = part.copy()
    n = len(out)
    raster_h, share = raster_heights(out.geometry, index, cfg.raster_block_px)

    def plausible(h: np.ndarray) -> np.ndarray:
        return np.isfinite(h) & (h >= cfg.min_height_m) & (h <= cfg.max_height_m)

    attr = pd.to_numeric(out["height_attr_m"], errors="coerce").to_numpy(dtype=float)
    levels = pd.to_numeric(out["levels_attr"], errors="coerce").to_numpy(dtype=float)
    levels_ok = np.isfinite(levels) & (levels >= 1) & (levels <= cfg.max_levels)
    levels_h = levels * cfg.storey_height_m
    candidates = {
        "raster": (raster_h, plausible(raster_h) & (share >= cfg.raster_min_valid_share)),
        "attribute": (attr, plausible(attr)),
        "levels": (levels_h, levels_ok & plausible(levels_h)),
    }
    height = np.full(n, cfg.default_height_m)
    source = np.full(n, "default", dtype=object)
    for name in reversed(cfg.source_order):
        value, ok = candidates[name]
        height = np.where(ok, value, height)
        source = np.where(ok, name, source)
    out["raster_height_m"] = raster_h
    out["height_m"] = height
    out["height_source"] = pd.Series(source, index=out.index, dtype="object")
    return out
