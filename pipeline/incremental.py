"""Partition cache: a kernel runs only on the buildings whose inputs changed.

While a :func:`partition_cache` is active (the command line opens one per
run), :func:`pipeline.parallel.map_partitions` hands every call to
:meth:`PartitionCache.map_partitions`, which

1. splits the rows by a stable spatial key: the district (``district_adcode``,
   else ``district_name``) and, with ``runs.partition_grid_m``, the grid cell
   of the row's representative point in the frame's CRS (cells of
   ``partition_grid_m / 111,320`` degrees for sources in lon/lat, before
   ingest reprojects them);
2. keys each partition by the sha256 of its rows' content (every column,
   geometry as WKB; not the index), of the kernel's other arguments (frames
   by content; a frame with a ``path`` column also by the content of those
   files, e.g. the height rasters), of the package's code and of the package
   versions;
3. loads the partitions whose key it has stored and runs the kernel, through
   Dask as before, only on the rest, stores their results, and returns the
   rows in input order with the input index.

Kernels are row-wise (a building's result depends on its own row and the
broadcast arguments only; the serial = parallel tests check it), so a cached
partition equals a recomputed one. A kernel whose rows also depend on nearby
rows of a broadcast table (shading: the neighbours within ``radius_m``)
declares it with an attribute ``partition_context = (argument index,
function)``; the function returns, for each partition, the table rows its
result can depend on, and only those enter the partition's key, so a new
building invalidates the partitions within its reach and no others. New
buildings in one district change that district's partitions only (and, for
shading, those within ``radius_m`` across a district border); the others are
reused. Stored results are pickled
frames (exact dtypes); after each kernel call, the partitions of that kernel
not used in the call are deleted, so the cache holds one result per
partition.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import pickle
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import geopandas as gpd
import numpy as np
import pandas as pd
import shapely

log = logging.getLogger(__name__)

_ACTIVE: list[PartitionCache] = []
#: Length of a degree of latitude, to size grid cells of frames in lon/lat [m/deg].
METRES_PER_DEGREE = 111_320.0
ALL = "all"


def active() -> PartitionCache | None:
    """The partition cache in force (None when results are not cached)."""
    return _ACTIVE[-1] if _ACTIVE else None


@contextlib.contextmanager
def partition_cache(cache_dir: Path, grid_m: float | None = None) -> Iterator[PartitionCache]:
    """Cache kernel results per spatial partition while the context is open.

    Parameters
    ----------
    cache_dir : Path
        Where results are stored (``<processed_dir>/cache``).
    grid_m : float, optional
        Grid cell size within districts [m]; None: one partition per district.

    Yields
    ------
    PartitionCache
        The cache, with its statistics.
    """
    cache = PartitionCache(Path(cache_dir), grid_m)
    _ACTIVE.append(cache)
    try:
        yield cache
        cache.sweep()
    finally:
        _ACTIVE.remove(cache)


def partition_keys(gdf: gpd.GeoDataFrame, grid_m: float | None) -> np.ndarray:
    """Stable spatial partition key of each row.

    Parameters
    ----------
    gdf : GeoDataFrame
        Rows; ``district_adcode`` or ``district_name`` used where present.
    grid_m : float, optional
        Grid cell size [m] (degrees: divided by :data:`METRES_PER_DEGREE`).

    Returns
    -------
    ndarray of str
        ``<district>``, ``<district>/<ix>_<iy>`` or ``<ix>_<iy>``; ``all``
        for a frame with neither districts nor a grid.
    """
    n = len(gdf)
    district = None
    for col in ("district_adcode", "district_name"):
        if col in gdf.columns:
            district = gdf[col].astype(object).where(gdf[col].notna(), "none").astype(str)
            break
    projected = gdf.crs is not None and gdf.crs.is_projected
    if grid_m and gdf.crs is not None:
        if not projected:  # raw sources in lon/lat before ingest reprojects them
            grid_m = grid_m / METRES_PER_DEGREE
        geoms = gdf.geometry.array
        ok = ~(shapely.is_missing(geoms) | shapely.is_empty(geoms))
        x = np.zeros(n)
        y = np.zeros(n)
        if ok.any():
            pts = shapely.point_on_surface(geoms[ok])
            x[ok], y[ok] = shapely.get_x(pts), shapely.get_y(pts)
        ix = np.floor(x / grid_m).astype("int64")
        iy = np.floor(y / grid_m).astype("int64")
        cell = np.where(ok, np.char.add(np.char.add(ix.astype(str), "_"), iy.astype(str)),
                        "nogeom")
        if district is None:
            return cell.astype(object)
        return np.char.add(np.char.add(district.to_numpy().astype(str), "/"), cell).astype(object)
    if district is not None:
        return district.to_numpy().astype(object)
    return np.full(n, ALL, dtype=object)


def row_hashes(frame: pd.DataFrame) -> np.ndarray:
    """A 64-bit hash of each row's content: all columns, geometry as WKB.

    The index is left out, so the same rows at other positions hash alike.

    Parameters
    ----------
    frame : DataFrame or GeoDataFrame
        The rows.

    Returns
    -------
    ndarray of uint64
        One hash per row.
    """
    cols = {}
    for c in frame.columns:
        values = frame[c]
        if isinstance(values.dtype, gpd.array.GeometryDtype):
            wkb = shapely.to_wkb(values.array, hex=True)
            values = pd.Series(wkb, index=frame.index, dtype=object)
        elif values.dtype == object and values.map(
                lambda v: isinstance(v, list | dict | set | np.ndarray)).any():
            values = values.map(repr)
        cols[str(c)] = values
    plain = pd.DataFrame(cols, index=frame.index)
    if not len(plain.columns):
        return np.zeros(len(frame), dtype="uint64")
    return pd.util.hash_pandas_object(plain, index=False).to_numpy(dtype="uint64")


def frame_digest(frame: pd.DataFrame) -> str:
    """sha256 of a frame's content: column names, dtypes, CRS and row hashes."""
    h = hashlib.sha256(_schema(frame).encode())
    h.update(row_hashes(frame).tobytes())
    return h.hexdigest()


def _schema(frame: pd.DataFrame) -> str:
    crs = frame.crs.to_string() if isinstance(frame, gpd.GeoDataFrame) and frame.crs else ""
    return repr([(str(c), str(t)) for c, t in frame.dtypes.items()]) + crs


def argument_digest(value: Any) -> str:
    """sha256 of a kernel argument (frames by content, models by their JSON)."""
    from pydantic import BaseModel

    h = hashlib.sha256()
    if isinstance(value, pd.DataFrame):
        h.update(b"frame" + frame_digest(value).encode())
        if "path" in value.columns:  # an index of files (height rasters): their content too
            from pipeline.runs import sha256_file

            for p in sorted({str(v) for v in value["path"].dropna()}):
                if Path(p).is_file():
                    h.update(sha256_file(Path(p)).encode())
    elif isinstance(value, pd.Series):
        h.update(b"series" + frame_digest(value.to_frame()).encode())
    elif isinstance(value, BaseModel):
        h.update(type(value).__qualname__.encode() + value.model_dump_json().encode())
    elif isinstance(value, np.ndarray):
        h.update(str(value.dtype).encode() + value.tobytes())
    elif isinstance(value, str | int | float | bool | type(None)):
        h.update(repr(value).encode())
    elif isinstance(value, list | tuple):
        for v in value:
            h.update(argument_digest(v).encode())
    elif isinstance(value, dict):
        for k in sorted(value, key=repr):
            h.update(repr(k).encode() + argument_digest(value[k]).encode())
    else:
        h.update(pickle.dumps(value, protocol=5))
    return h.hexdigest()


def kernel_digest(kernel: Callable) -> str:
    """sha256 of the kernel's name, the package's code and the package versions.

    The whole package's code, not only the kernel's module: kernels call
    helpers in other modules.
    """
    from pipeline.runs import code_hash, package_versions

    h = hashlib.sha256(f"{kernel.__module__}.{kernel.__qualname__}".encode())
    h.update(code_hash().encode())
    h.update(repr(sorted(package_versions().items())).encode())
    return h.hexdigest()


def _safe(key: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "-", key) or "-"


class PartitionCache:
    """Kernel results stored per spatial partition and content key.

    Parameters
    ----------
    cache_dir : Path
        Root folder of the stored results.
    grid_m : float, optional
        Grid cell size within districts [m].
    """

    def __init__(self, cache_dir: Path, grid_m: float | None = None):
        self.cache_dir = cache_dir
        self.grid_m = grid_m
        self.stats: dict[str, dict[str, Any]] = {}
        self._kernel_digests: dict[str, str] = {}
        self._used: dict[str, set[Path]] = {}

    def take_stats(self) -> dict[str, dict[str, Any]]:
        """Partition statistics per kernel since the last call, and reset them."""
        out, self.stats = self.stats, {}
        return out

    def map_partitions(self, gdf: gpd.GeoDataFrame, kernel: Callable[..., pd.DataFrame],
                       args: tuple, kwargs: dict,
                       compute: Callable[..., pd.DataFrame]) -> pd.DataFrame:
        """Run ``compute(rows, kernel, *args, **kwargs)`` on uncached partitions only.

        Parameters
        ----------
        gdf : GeoDataFrame
            All rows (unique index).
        kernel : callable
            The row-wise kernel.
        args, kwargs
            Its broadcast arguments.
        compute : callable
            The uncached parallel driver (:func:`pipeline.parallel.compute_partitions`).

        Returns
        -------
        DataFrame or GeoDataFrame
            The kernel output for all rows, in input order, with the input index.
        """
        if len(gdf) == 0:
            return compute(gdf, kernel, *args, **kwargs)
        name = f"{kernel.__module__}.{kernel.__qualname__}"
        if name not in self._kernel_digests:
            self._kernel_digests[name] = kernel_digest(kernel)
        context = getattr(kernel, "partition_context", None)
        ctx_index = context[0] if context is not None else None
        call = hashlib.sha256(self._kernel_digests[name].encode())
        for i, a in enumerate(args):
            if i != ctx_index:
                call.update(argument_digest(a).encode())
        for k in sorted(kwargs):
            call.update(k.encode() + argument_digest(kwargs[k]).encode())
        call_digest = call.hexdigest()
        kdir = self.cache_dir / _safe(name)
        keys = partition_keys(gdf, self.grid_m)
        groups = pd.Series(np.arange(len(gdf))).groupby(keys, sort=True).indices
        hashes = row_hashes(gdf)
        head = (call_digest + _schema(gdf)).encode()
        if context is not None:  # only the rows of the context table each partition can see
            ctx = args[ctx_index]
            seen = context[1](gdf, list(groups.values()), *args, **kwargs)
            ctx_hashes, ctx_head = row_hashes(ctx), _schema(ctx).encode()
            extra = [ctx_head + ctx_hashes[np.sort(rows)].tobytes() for rows in seen]
        else:
            extra = [b""] * len(groups)
        plan = []
        for (pkey, pos), more in zip(groups.items(), extra, strict=True):
            digest = hashlib.sha256(head + hashes[pos].tobytes() + more).hexdigest()
            plan.append((pkey, pos, kdir / _safe(pkey) / f"{digest[:32]}.pkl"))
        results: dict[str, pd.DataFrame] = {}
        layout: dict[str, Any] | None = None
        missing = []
        for pkey, pos, path in plan:
            try:
                with open(path, "rb") as f:
                    part, layout = pickle.load(f)
                part.index = gdf.index[pos]
                results[pkey] = part
            except (FileNotFoundError, EOFError, pickle.UnpicklingError, ValueError):
                missing.append((pkey, pos, path))
        if missing:
            pos_all = np.concatenate([pos for _, pos, _ in missing])
            computed, layout = _plain(compute(gdf.iloc[np.sort(pos_all)], kernel, *args,
                                              **kwargs))
            for pkey, pos, path in missing:
                part = computed.loc[gdf.index[pos]]
                results[pkey] = part
                _store(part, layout, path)
        self._used.setdefault(name, set()).update(path for _, _, path in plan)
        stat = self.stats.setdefault(name, {"partitions": 0, "reused": 0, "computed": 0,
                                            "rows_computed": 0, "computed_keys": []})
        stat["partitions"] += len(plan)
        stat["computed"] += len(missing)
        stat["reused"] += len(plan) - len(missing)
        stat["rows_computed"] += int(sum(len(pos) for _, pos, _ in missing))
        stat["computed_keys"] = sorted({*stat["computed_keys"], *(k for k, _, _ in missing)})
        log.info("%s: %d partitions, %d reused, %d computed (%d rows)", kernel.__name__,
                 len(plan), len(plan) - len(missing), len(missing),
                 sum(len(pos) for _, pos, _ in missing))
        return _assemble([results[pkey] for pkey, _, _ in plan], layout).loc[gdf.index]

    def sweep(self) -> list[Path]:
        """Delete the stored results of the kernels used here that were not used.

        Called when the context closes without error: each kernel belongs to
        one stage, so what its calls did not use is stale.
        """
        removed = []
        for name, used in self._used.items():
            kdir = self.cache_dir / _safe(name)
            for p in kdir.rglob("*"):
                if p.is_file() and p not in used:
                    p.unlink(missing_ok=True)
                    removed.append(p)
        return removed


def _plain(frame: pd.DataFrame) -> tuple[pd.DataFrame, dict[str, Any]]:
    """A frame as a plain DataFrame (geometry as shapely objects) and its layout.

    Plain frames concatenate fast; GeoDataFrames compare their CRS objects
    pairwise on concatenation, which costs ~20 ms per piece.
    """
    geom_cols = [c for c in frame.columns if isinstance(frame[c].dtype, gpd.array.GeometryDtype)]
    layout = {
        "columns": list(frame.columns),
        "geometry": {c: (frame[c].crs.to_wkt() if frame[c].crs else None) for c in geom_cols},
        "active": frame.geometry.name if isinstance(frame, gpd.GeoDataFrame) else None,
    }
    plain = pd.DataFrame({c: (pd.Series(np.asarray(frame[c].array, dtype=object),
                                        index=frame.index) if c in geom_cols else frame[c])
                          for c in frame.columns}, index=frame.index)
    return plain, layout


def _assemble(pieces: list[pd.DataFrame], layout: dict[str, Any]) -> pd.DataFrame:
    """Concatenate plain pieces and restore the geometry columns and their CRS."""
    from pyproj import CRS

    out = pd.concat(pieces) if len(pieces) > 1 else pieces[0].copy()
    crs_cache: dict[str, CRS] = {}
    for c, wkt in layout["geometry"].items():
        crs = None if wkt is None else crs_cache.setdefault(wkt, CRS.from_wkt(wkt))
        out[c] = gpd.GeoSeries(out[c].to_numpy(dtype=object), index=out.index, crs=crs)
    out = out[layout["columns"]]
    if layout["active"] is not None:
        return gpd.GeoDataFrame(out, geometry=layout["active"])
    return out


def _store(part: pd.DataFrame, layout: dict[str, Any], path: Path) -> None:
    """Pickle a plain partition result and its layout atomically (index dropped)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        pickle.dump((part.reset_index(drop=True), layout), f, protocol=5)
    os.replace(tmp, path)
