"""Stream a stage over a GeoParquet file, one partition of row groups at a time.

Ingest writes ``ingest_buildings.parquet`` sorted along a Hilbert curve, one
row group per partition, so each row group is a compact patch of the map.
Every later stage reads its input the same way: each partition (one or more
consecutive row groups, about ``dask.rows_per_partition`` rows) is read *in
the worker*, run through the stage's kernel and encoded to Arrow there; the
driver only appends the finished Arrow tables, in order, to one output
GeoParquet (one row group per partition) and keeps the few attribute columns
the stage summarises. At most a few partitions are in flight, so memory is
bounded by the partition size, not by the number of buildings.

The GeoParquet ``geo`` metadata (bounding box, geometry types) is written when
the file is complete; the file is written to a temporary path and moved into
place only then (:func:`pipeline.io.atomic_path`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import geopandas as gpd
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import shapely

from pipeline import parallel
from pipeline.io import atomic_path

log = logging.getLogger(__name__)


def partitions(path: Path, rows_per_partition: int | None = None) -> list[list[int]]:
    """Group a Parquet file's consecutive row groups into partitions.

    Parameters
    ----------
    path : Path
        The GeoParquet file.
    rows_per_partition : int, optional
        Target rows per partition [rows] (default: the run's
        ``dask.rows_per_partition``); a row group is never split.

    Returns
    -------
    list of list of int
        Row-group numbers of each partition, in file order.
    """
    meta = pq.ParquetFile(path).metadata
    target = rows_per_partition or parallel.rows_per_partition()
    out: list[list[int]] = []
    rows = 0
    for i in range(meta.num_row_groups):
        n = meta.row_group(i).num_rows
        if out and rows + n <= target:
            out[-1].append(i)
            rows += n
        else:
            out.append([i])
            rows = n
    return out


def read_partition(path: Path, row_groups: Sequence[int],
                   columns: Sequence[str] | None = None, rows: tuple[int, int] | None = None,
                   keep: Callable[[pa.Table], np.ndarray] | None = None,
                   ) -> gpd.GeoDataFrame | pd.DataFrame:
    """Read some row groups of a GeoParquet file.

    Parameters
    ----------
    path : Path
        The file.
    row_groups : sequence of int
        Row groups to read.
    columns : sequence of str, optional
        Columns to read (default all); without the geometry column the
        result is a plain DataFrame.
    rows : tuple of int, optional
        ``(start, stop)``: only these rows of the row groups read.
    keep : callable, optional
        ``keep(table)`` gives a boolean mask of the rows to keep, applied to
        the Arrow table before anything is converted (geometries of dropped
        rows are never decoded).

    Returns
    -------
    GeoDataFrame or DataFrame
    """
    pf = pq.ParquetFile(path)
    table = pf.read_row_groups(list(row_groups), columns=list(columns) if columns else None)
    if rows is not None:
        table = table.slice(rows[0], rows[1] - rows[0])
    if keep is not None:
        table = table.filter(pa.array(np.asarray(keep(table), dtype=bool)))
    return _from_arrow(table)


#: PROJJSON text -> pyproj CRS, per process: parsing a CRS takes ~0.2 s, once per partition
#: read it was ~5 % of a city run's CPU
_CRS_CACHE: dict[str, Any] = {}


def cached_crs(crs: dict | str) -> Any:
    """The pyproj CRS of a GeoParquet ``crs`` entry (PROJJSON or text), parsed once per process."""
    from geopandas.io.arrow import _remove_id_from_member_of_ensembles
    from pyproj import CRS

    key = json.dumps(crs, sort_keys=True)
    if key not in _CRS_CACHE:
        if isinstance(crs, dict):  # what geopandas does before parsing GeoParquet PROJJSON
            _remove_id_from_member_of_ensembles(crs)
        _CRS_CACHE[key] = CRS.from_user_input(crs)
    return _CRS_CACHE[key]


def _from_arrow(table: pa.Table) -> gpd.GeoDataFrame | pd.DataFrame:
    """A GeoParquet table (``geo`` metadata) as a GeoDataFrame; without it, a DataFrame.

    One WKB geometry column, the stage files' layout, is decoded here and the
    frame built without the copy that ``geopandas.io.arrow._arrow_to_geopandas``
    makes of every attribute column (``GeoDataFrame(df)`` copies by default;
    at 1M buildings of the report's 39 columns that copy was 0.3-1.4 s). Other
    layouts (several geometry columns, GeoArrow encodings) go to geopandas.
    """
    from geopandas.array import from_wkb
    from geopandas.io.arrow import _arrow_to_geopandas

    geo = (table.schema.metadata or {}).get(b"geo")
    if geo is None or json.loads(geo)["primary_column"] not in table.column_names:
        return table.to_pandas()
    meta = json.loads(geo)
    for col in meta.get("columns", {}).values():
        if col.get("crs") is not None:
            col["crs"] = cached_crs(col["crs"])
    name = meta["primary_column"]
    present = [c for c in meta.get("columns", {}) if c in table.column_names]
    column = meta["columns"][name]
    if present != [name] or column.get("encoding") != "WKB" or column.get("crs") is None:
        return _arrow_to_geopandas(table, meta)
    frame = table.drop_columns([name]).to_pandas()
    position = list(table.slice(0, 0).to_pandas().columns).index(name)  # index columns apart
    frame.insert(position, name,
                 from_wkb(np.array(table.column(name)), crs=column["crs"]))
    return gpd.GeoDataFrame(frame, geometry=name, copy=False)


def to_arrow(frame: pd.DataFrame) -> pa.Table:
    """A (Geo)DataFrame as an Arrow table in GeoParquet layout (WKB geometry).

    Parameters
    ----------
    frame : DataFrame or GeoDataFrame

    Returns
    -------
    pyarrow.Table
        With GeoParquet ``geo`` metadata for a GeoDataFrame. All-null
        object columns have Arrow's null type (see :func:`write_tables`).
    """
    if isinstance(frame, gpd.GeoDataFrame):
        from geopandas.io.arrow import _geopandas_to_arrow

        return _geopandas_to_arrow(frame, index=False)
    return pa.Table.from_pandas(frame, preserve_index=False)


def _nulls_as_strings(schema: pa.Schema) -> pa.Schema:
    """All-null columns typed as strings, so that partitions agree on the schema."""
    fields = [f.with_type(pa.string()) if pa.types.is_null(f.type) else f for f in schema]
    return pa.schema(fields, metadata=schema.metadata)


def _run_partition(path: str, row_groups: list[int], kernel: Callable, args: tuple,
                   kwargs: dict, columns: Sequence[str] | None, geometry: str,
                   spill: str | None = None) -> pa.Table | str:
    """Worker side: read, run the kernel, encode.

    The kernels leave geometry unchanged, so the input's WKB column is put
    back on the output instead of encoding the geometry again; with
    ``geometry="skip"`` the kernel gets a plain DataFrame and the geometry
    is never decoded. With ``spill`` (a path) the table is written there as
    an Arrow IPC file and the path returned instead (:func:`unspill`).
    """
    return hand_over(_partition_table(path, row_groups, kernel, args, kwargs, columns,
                                      geometry), spill)


def write_arrow_file(table: pa.Table, path: str | Path) -> None:
    """Write a table as an Arrow IPC file (uncompressed: to be memory-mapped)."""
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table)


def hand_over(table: pa.Table, spill: str | None) -> pa.Table | str:
    """Worker side of a task's result: the table, or with ``spill`` its file (:func:`unspill`)."""
    if spill is None:
        return table
    write_arrow_file(table, spill)
    return spill


@contextlib.contextmanager
def spill_folder(parent: Path, prefix: str) -> Iterator[Path]:
    """A hidden folder in ``parent`` for tasks' hand-over files, removed at the end.

    Parameters
    ----------
    parent : Path
        Where (beside the stage's output, so the files stay on its disk).
    prefix : str
        Start of the folder's name (e.g. ``.ingest_spill_``).

    Yields
    ------
    Path
        The folder; it and its files are removed when the block ends, also
        on failure.
    """
    parent.mkdir(parents=True, exist_ok=True)
    path = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def unspill(result: pa.Table | str) -> pa.Table:
    """A partition's table from :func:`_run_partition`: memory-mapped if it was spilled.

    The file is removed at once; the mapping keeps its pages until the table
    is released.
    """
    if isinstance(result, pa.Table):
        return result
    table = pa.ipc.open_file(pa.memory_map(result, "r")).read_all()
    Path(result).unlink()
    return table


def _partition_table(path: str, row_groups: list[int], kernel: Callable, args: tuple,
                     kwargs: dict, columns: Sequence[str] | None, geometry: str) -> pa.Table:
    pf = pq.ParquetFile(path)
    table = pf.read_row_groups(list(row_groups), columns=list(columns) if columns else None)
    geo = json.loads((table.schema.metadata or {}).get(b"geo", b"null"))
    name = geo["primary_column"] if geo else None
    if name is None or name not in table.column_names:
        return to_arrow(kernel(_from_arrow(table), *args, **kwargs))
    wkb = table.column(name)
    if geometry == "skip":
        part = table.drop_columns([name]).to_pandas()
    else:
        part = _from_arrow(table)
    out = kernel(part, *args, **kwargs)
    if len(out) != table.num_rows or not out.index.equals(part.index):
        raise ValueError(f"{getattr(kernel, '__name__', kernel)} must keep the partition's rows")
    if isinstance(out, gpd.GeoDataFrame) and isinstance(part, gpd.GeoDataFrame) and (
            out.crs != part.crs):
        return to_arrow(out)  # reprojected: the input WKB no longer applies
    attrs = to_arrow(pd.DataFrame(out.drop(columns=[name], errors="ignore")))
    return attrs.append_column(table.schema.field(name), wkb).replace_schema_metadata(
        {**(attrs.schema.metadata or {}), b"geo": json.dumps(geo).encode()})


def column_options(schema: pa.Schema, geo: dict | None) -> dict[str, Any]:
    """Compression and statistics of the stage files' columns.

    The attributes are snappy-compressed with min/max statistics. The WKB
    geometry columns are written uncompressed and without statistics:
    footprints' coordinates barely compress (snappy: 182 MB to 150 MB at 1M
    buildings) and min/max of WKB bytes select nothing. Measured on the
    yield stage's file of 1M buildings (74 columns): 1.46 s to write instead
    of 1.87 s (best of three), 406 MB instead of 375 MB.

    Parameters
    ----------
    schema : pyarrow.Schema
        The file's columns.
    geo : dict or None
        The GeoParquet ``geo`` metadata (its ``columns`` are the geometries).

    Returns
    -------
    dict
        ``compression`` and ``write_statistics`` for ``pyarrow.parquet.ParquetWriter``.
    """
    geoms = set((geo or {}).get("columns", {})) & set(schema.names)
    if not geoms:
        return {"compression": "snappy", "write_statistics": True}
    return {"compression": {n: "none" if n in geoms else "snappy" for n in schema.names},
            "write_statistics": [n for n in schema.names if n not in geoms]}


class GeoParquetWriter:
    """Append Arrow tables (one row group each) to one GeoParquet file.

    The ``geo`` metadata is merged over all tables (bounding box, geometry
    types) and written at :meth:`close`. Use as a context manager inside
    :func:`pipeline.io.atomic_path`.

    Parameters
    ----------
    path : Path
        The file to write.
    """

    def __init__(self, path: Path):
        self.path = Path(path)
        self.writer: pq.ParquetWriter | None = None
        self.schema: pa.Schema | None = None
        self.geo: dict | None = None
        self.rows = 0

    def write(self, table: pa.Table, more: bool = True) -> None:
        """Append one table as one row group.

        ``more=False`` on the first table says that it is the only one: its
        all-null columns then keep Arrow's null type (they read back as
        None), as a whole-frame write would give; otherwise they are typed
        as strings so that later partitions with values fit the schema.
        """
        meta = dict(table.schema.metadata or {})
        geo = json.loads(meta.pop(b"geo")) if b"geo" in meta else None
        if self.writer is None:
            schema = table.schema if not more else _nulls_as_strings(table.schema)
            self.schema = schema.with_metadata(meta)
            if not schema.equals(table.schema, check_metadata=False):
                table = table.cast(self.schema)
            # no dictionary pages: footprints, ids and measures are nearly all distinct, and
            # dictionary encoding halved the driver's write speed (bench/run.py, 1M buildings)
            self.writer = pq.ParquetWriter(self.path, self.schema, use_dictionary=False,
                                           **column_options(self.schema, geo))
            self.geo = geo
        else:
            self._merge_geo(geo)
            if not table.schema.equals(self.schema, check_metadata=False):
                try:
                    table = table.cast(self.schema)
                except (pa.ArrowInvalid, pa.ArrowNotImplementedError, ValueError) as exc:
                    raise ValueError(f"{self.path}: a partition's columns differ from the "
                                     f"first partition's ({exc})") from exc
        table = table.replace_schema_metadata(self.schema.metadata)
        if table.num_rows or self.rows == 0:
            self.writer.write_table(table, row_group_size=max(table.num_rows, 1))
        self.rows += table.num_rows

    def _merge_geo(self, geo: dict | None) -> None:
        if geo is None or self.geo is None or not geo.get("columns"):
            return
        for name, col in geo["columns"].items():
            mine = self.geo["columns"].setdefault(name, col)
            if mine is col:
                continue
            types = sorted(set(mine.get("geometry_types", [])) | set(col.get("geometry_types",
                                                                              [])))
            mine["geometry_types"] = types
            boxes = [b for b in (mine.get("bbox"), col.get("bbox")) if b and np.all(
                np.isfinite(b))]
            if boxes:
                arr = np.array(boxes, dtype=float)
                mine["bbox"] = [*arr[:, :2].min(axis=0), *arr[:, 2:].max(axis=0)]

    def close(self) -> None:
        """Write the merged ``geo`` metadata and close the file."""
        if self.writer is None:
            return
        if self.geo is not None:
            self.writer.add_key_value_metadata({"geo": json.dumps(self.geo)})
        self.writer.close()

    def __enter__(self) -> GeoParquetWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def write_tables(tables: Iterable[pa.Table], path: Path,
                 keep: Sequence[str] = ()) -> tuple[int, pd.DataFrame]:
    """Write Arrow tables to one GeoParquet file atomically.

    Parameters
    ----------
    tables : iterable of pyarrow.Table
        The partitions, in order (at least one, possibly empty).
    path : Path
        The file.
    keep : sequence of str
        Attribute columns to return for the stage's summary.

    Returns
    -------
    tuple of (int, DataFrame)
        Rows written and the ``keep`` columns of all rows.
    """
    kept: list[pd.DataFrame] = []
    stream = iter(tables)
    with atomic_path(path) as tmp, GeoParquetWriter(tmp) as writer:
        table = next(stream, None)
        while table is not None:
            following = next(stream, None)  # one table of look-ahead: is this the only one?
            writer.write(table, more=writer.writer is not None or following is not None)
            if keep:
                kept.append(table.select(list(keep)).to_pandas())
            table = following
    summary = pd.concat(kept, ignore_index=True) if kept else pd.DataFrame(columns=list(keep))
    return writer.rows, summary


def map_file(
    in_path: Path, out_path: Path, kernel: Callable[..., pd.DataFrame], *args: Any,
    columns: Sequence[str] | None = None, keep: Sequence[str] = (), label: str = "",
    geometry: str = "read", **kwargs: Any,
) -> tuple[int, int, pd.DataFrame]:
    """Run a stage's kernel over a GeoParquet file, partition by partition.

    Parameters
    ----------
    in_path, out_path : Path
        Input and output GeoParquet files. Paths must be reachable from the
        workers (a shared file system on a cluster).
    kernel : callable
        Module-level ``kernel(partition, *args, **kwargs)``.
    *args, **kwargs
        Passed to the kernel (small frames and configs are sent to every
        partition).
    columns : sequence of str, optional
        Input columns to read (default all).
    keep : sequence of str
        Output attribute columns returned for the stage's summary.
    label : str
        Name of the progress bar.
    geometry : str
        ``read`` gives the kernel a GeoDataFrame; ``skip`` a DataFrame
        without the geometry (for kernels that only use attributes). Either
        way the kernel must keep the rows and leave the geometry unchanged:
        the output carries the input's geometry.

    Returns
    -------
    tuple of (int, int, DataFrame)
        Rows read, rows written and the ``keep`` columns.
    """
    from pipeline import incremental

    in_path, out_path = Path(in_path).resolve(), Path(out_path)
    rows_in = pq.ParquetFile(in_path).metadata.num_rows
    if incremental.active() is not None:
        # the partition cache of scheduled reruns keys whole-frame partitions by district
        # and grid cell (pipeline.incremental): run the stage on the whole frame through it
        whole = read_all(in_path, columns)
        result = parallel.map_partitions(whole, kernel, *args, **kwargs)
        rows_out, summary = write_tables([to_arrow(result)], out_path, keep)
        return rows_in, rows_out, summary
    parts = partitions(in_path)
    if not parts:  # a file without row groups: run the kernel on the empty frame
        empty = read_partition(in_path, [], columns)
        rows_out, summary = write_tables([to_arrow(kernel(empty, *args, **kwargs))], out_path,
                                         keep)
    else:
        sizes = _partition_rows(in_path, parts)
        with contextlib.ExitStack() as stack:
            # process workers hand their tables over as files the driver memory-maps: a
            # pipe copies and pickles every byte twice (~10 s of a city run's driver time)
            spill_dir = (stack.enter_context(spill_folder(out_path.parent,
                                                          f".{out_path.stem}_spill_"))
                         if parallel.local_processes() else None)
            results = parallel.map_tasks(
                _run_partition,
                [(str(in_path), p, kernel, args, kwargs, columns, geometry,
                  None if spill_dir is None else str(spill_dir / f"{k:06d}.arrow"))
                 for k, p in enumerate(parts)],
                label=label, sizes=sizes)
            rows_out, summary = write_tables(map(unspill, results), out_path, keep)
    return rows_in, rows_out, summary


def read_all(path: Path, columns: Sequence[str] | None = None
             ) -> gpd.GeoDataFrame | pd.DataFrame:
    """Read every row group of a GeoParquet file into one frame.

    Parameters
    ----------
    path : Path
        The file.
    columns : sequence of str, optional
        Columns to read (default all).

    Returns
    -------
    GeoDataFrame or DataFrame
    """
    return read_partition(path, range(pq.ParquetFile(path).metadata.num_row_groups), columns)


def _partition_rows(path: Path, parts: list[list[int]]) -> list[int]:
    meta = pq.ParquetFile(path).metadata
    return [sum(meta.row_group(i).num_rows for i in p) for p in parts]


def read_columns(path: Path, columns: Sequence[str]) -> pd.DataFrame:
    """Read some attribute columns of a (Geo)Parquet file, without geometry.

    Parameters
    ----------
    path : Path
        The file.
    columns : sequence of str
        Columns to read.

    Returns
    -------
    DataFrame
    """
    return pq.read_table(path, columns=list(columns)).to_pandas()


def spatial_keys(geoms: np.ndarray, bounds: Sequence[float], level: int = 16) -> np.ndarray:
    """Hilbert-curve distance of geometry centres over fixed bounds.

    With the same ``bounds`` for every chunk the keys of different chunks are
    comparable, so chunks can be sorted independently and merged.

    Parameters
    ----------
    geoms : ndarray of shapely geometries
    bounds : sequence of float
        ``(xmin, ymin, xmax, ymax)`` of the study area (the districts) [m].
    level : int
        Curve level (the grid has ``2**level`` cells a side).

    Returns
    -------
    ndarray of int64
        Keys; rows without geometry get the largest key.
    """
    geoms = np.asarray(geoms, dtype=object)
    ok = ~(shapely.is_missing(geoms) | shapely.is_empty(geoms))
    keys = np.full(len(geoms), np.iinfo(np.int64).max, dtype=np.int64)
    if ok.any():
        b = shapely.bounds(geoms[ok])
        x, y = (b[:, 0] + b[:, 2]) / 2, (b[:, 1] + b[:, 3]) / 2
        xmin, ymin, xmax, ymax = bounds
        centres = gpd.GeoSeries(shapely.points(np.clip(x, xmin, xmax), np.clip(y, ymin, ymax)))
        keys[ok] = centres.hilbert_distance(total_bounds=bounds, level=level).to_numpy()
    return keys
