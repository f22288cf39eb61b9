"""Footprints of a stage file, kept on disk: the report's driver reads them by row group.

The report summarises every building, but needs the footprints of only a few:
the ranked roofs, the buildings in the map window, the change list's. Holding
all of them (about 2 GB per million buildings as shapely geometries) made the
report's driver the one process whose memory grew with the whole stock. A
:class:`Footprints` scans the file once, a row group at a time, and keeps per
building only what the report uses of every footprint: its change-detection
key and bounds (about 100 bytes); footprints, and centroids when a map
needs them, are read back when asked for, and all of them again a row
group at a time where existing PV or towns join them
(:func:`pipeline.deliverables.plan_row_groups`).

Outputs (per building, in file order)

==============  ====  =====================================================
attribute       unit  meaning
==============  ====  =====================================================
keys            -     :func:`pipeline.changes.geometry_keys` of the footprint
bounds          m     minx, miny, maxx, maxy
centroids       m     x, y of the centroid (read on first use)
==============  ====  =====================================================

The roof stage, which has the footprints decoded, writes the keys and bounds
as :data:`FOOTPRINT_SUMMARY_COLUMNS`; a file with them is scanned by reading those five
columns (checked against its first row group's footprints) instead of
decoding every footprint.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import geopandas as gpd
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import shapely

log = logging.getLogger(__name__)

#: Per-building columns of a footprint's summary (:func:`summary_columns`): the roof stage
#: writes them, the report's scan reads them; not in the final outputs.
FOOTPRINT_SUMMARY_COLUMNS = ("footprint_key", "footprint_minx_m", "footprint_miny_m",
                             "footprint_maxx_m", "footprint_maxy_m")


def summary_columns(geoms: np.ndarray) -> dict[str, np.ndarray]:
    """What :meth:`Footprints.scan` keeps of each footprint, as :data:`FOOTPRINT_SUMMARY_COLUMNS`.

    Parameters
    ----------
    geoms : ndarray of shapely geometries
        Footprints in a metric CRS [m].

    Returns
    -------
    dict
        ``footprint_key`` (:func:`pipeline.changes.geometry_keys`) and the
        bounds ``footprint_minx_m`` ... ``footprint_maxy_m`` [m] (NaN where
        missing or empty).
    """
    keys, bounds = _keys_and_bounds(np.asarray(geoms, dtype=object))
    return {FOOTPRINT_SUMMARY_COLUMNS[0]: keys,
            **{name: bounds[:, k] for k, name in enumerate(FOOTPRINT_SUMMARY_COLUMNS[1:])}}


def _keys_and_bounds(geoms: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Change-detection keys and bounds, shape (n, 4) [m], of decoded footprints."""
    from pipeline.changes import geometry_keys

    return geometry_keys(gpd.GeoSeries(geoms)), shapely.bounds(geoms).reshape(len(geoms), 4)


@dataclass(frozen=True)
class Footprints:
    """The footprints of a GeoParquet file's rows, read back by position.

    Attributes
    ----------
    path : Path
        The file (one WKB geometry column).
    column : str
        Its geometry column.
    crs : pyproj.CRS
        The footprints' CRS (metric).
    starts : ndarray of int64
        First row of each row group, then the number of rows.
    keys : ndarray of str
        Change-detection key of each footprint (:func:`pipeline.changes.geometry_keys`).
    bounds : ndarray, shape (n, 4) [m]
        Bounds of each footprint (NaN where missing).
    """

    path: Path
    column: str
    crs: Any
    starts: np.ndarray
    keys: np.ndarray
    bounds: np.ndarray

    @classmethod
    def scan(cls, path: Path) -> Footprints:
        """Read a GeoParquet file's footprints a row group at a time, keeping their summaries.

        Parameters
        ----------
        path : Path
            The file (``geo`` metadata, one WKB geometry column).

        Returns
        -------
        Footprints
        """
        from pipeline.stream import cached_crs

        pf = pq.ParquetFile(path)
        geo = json.loads(pf.metadata.metadata[b"geo"])
        name = geo["primary_column"]
        crs = cached_crs(geo["columns"][name]["crs"])
        sizes = [pf.metadata.row_group(i).num_rows for i in range(pf.metadata.num_row_groups)]
        starts = np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)]).astype(np.int64)
        n = int(starts[-1])
        out = cls(Path(path), name, crs, starts, np.empty(n, dtype=object), np.empty((n, 4)))
        # written by the roof stage
        if set(FOOTPRINT_SUMMARY_COLUMNS) <= set(pf.schema_arrow.names):
            table = pf.read(columns=list(FOOTPRINT_SUMMARY_COLUMNS))
            out.keys[:] = table.column(FOOTPRINT_SUMMARY_COLUMNS[0]).to_numpy(zero_copy_only=False)
            for k, col in enumerate(FOOTPRINT_SUMMARY_COLUMNS[1:]):
                out.bounds[:, k] = table.column(col).to_numpy(zero_copy_only=False)
            if out._summary_matches_first_group():
                return out
            log.warning("%s: its columns %s do not match its footprints (written by another "
                        "version?); computed from the footprints", path,
                        ", ".join(FOOTPRINT_SUMMARY_COLUMNS))
        for rows, geoms in out.row_groups():
            out.keys[rows], out.bounds[rows] = _keys_and_bounds(geoms)
        return out

    def _summary_matches_first_group(self) -> bool:
        """Whether the first row group's stored keys and bounds are its footprints'."""
        for rows, geoms in self.row_groups():
            keys, bounds = _keys_and_bounds(geoms)
            return bool(np.array_equal(keys, self.keys[rows])
                        and np.array_equal(bounds, self.bounds[rows], equal_nan=True))
        return True  # no row groups

    @cached_property
    def centroids(self) -> np.ndarray:
        """Centroid of each footprint, shape (n, 2) [m] (NaN where missing or empty).

        Read on first use, a row group at a time: the report needs them only
        for a map of few buildings (at 1M buildings computing them in
        :meth:`scan` took 1.4 of its 5.5 s).
        """
        out = np.empty((len(self), 2))
        for rows, geoms in self.row_groups():
            out[rows] = _centroids(geoms)
        return out

    def __len__(self) -> int:
        return int(self.starts[-1])

    def row_groups(self) -> Iterator[tuple[slice, np.ndarray]]:
        """Each row group's rows in the file and its footprints, decoded one group at a time."""
        pf = pq.ParquetFile(self.path)
        for i in range(len(self.starts) - 1):
            wkb = pf.read_row_group(i, columns=[self.column]).column(self.column)
            yield slice(self.starts[i], self.starts[i + 1]), _decode(wkb)

    def take(self, rows: np.ndarray) -> gpd.GeoSeries:
        """The footprints of some rows, read from the row groups that hold them.

        Parameters
        ----------
        rows : array of int
            Positions in the file, in any order, repeats allowed.

        Returns
        -------
        GeoSeries
            One footprint per position, in the order given (default index).
        """
        rows = np.asarray(rows, dtype=np.int64)
        if len(rows) and (rows.min() < 0 or rows.max() >= len(self)):
            raise IndexError(f"{self.path}: row positions outside 0..{len(self) - 1}")
        out = np.empty(len(rows), dtype=object)
        group = np.searchsorted(self.starts, rows, side="right") - 1
        pf = pq.ParquetFile(self.path)
        for g in np.unique(group):
            here = np.flatnonzero(group == g)
            wkb = pf.read_row_group(int(g), columns=[self.column]).column(self.column)
            local = rows[here] - self.starts[g]
            out[here] = _decode(wkb.take(pa.array(local)))
        return gpd.GeoSeries(out, crs=self.crs)

    def window(self, xmin: float, ymin: float, xmax: float, ymax: float) -> np.ndarray:
        """Positions of the footprints that intersect a rectangle, as ``GeoDataFrame.cx``.

        Parameters
        ----------
        xmin, ymin, xmax, ymax : float
            The rectangle [m].

        Returns
        -------
        ndarray of int64
            Sorted positions.
        """
        b = self.bounds
        near = np.flatnonzero((b[:, 0] <= xmax) & (b[:, 2] >= xmin)
                              & (b[:, 1] <= ymax) & (b[:, 3] >= ymin))
        if not len(near):
            return near.astype(np.int64)
        hit = shapely.intersects(self.take(near).to_numpy(), shapely.box(xmin, ymin, xmax, ymax))
        return near[hit].astype(np.int64)


def _decode(wkb: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """Shapely geometries of a WKB column (None where null)."""
    return shapely.from_wkb(np.asarray(wkb.to_numpy(zero_copy_only=False), dtype=object))


def _centroids(geoms: np.ndarray) -> np.ndarray:
    """Centroid coordinates, NaN for missing and empty geometries."""
    out = np.full((len(geoms), 2), np.nan)
    present = ~shapely.is_missing(geoms) & ~shapely.is_empty(geoms)
    out[present] = shapely.get_coordinates(shapely.centroid(geoms[present]))
    return out
