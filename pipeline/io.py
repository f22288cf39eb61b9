"""Reading and writing files, with clear errors and atomic writes.

Inputs are read through pyogrio (any GDAL vector format) or pyarrow
(GeoParquet); a failure names the file and what is wrong. Outputs are written
to a temporary file beside the target and moved into place only when
complete, so a failed run never leaves a half-written file.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import geopandas as gpd
import pandas as pd

from pipeline.errors import InputError

PARQUET_SUFFIXES = (".parquet", ".geoparquet", ".pq")


def read_vector(path: Path, layer: str | None = None, encoding: str | None = None
                ) -> gpd.GeoDataFrame:
    """Read a vector file (GDAL format or GeoParquet).

    Parameters
    ----------
    path : Path
        The file (or a directory a GDAL driver understands).
    layer : str, optional
        Layer name for multi-layer formats (GeoPackage, OSM, ...).
    encoding : str, optional
        Text encoding for formats without a reliable one (Shapefile).

    Returns
    -------
    GeoDataFrame
        The features, with the file's CRS (may be None).

    Raises
    ------
    InputError
        File missing, empty, unreadable or without the layer.
    """
    path = Path(path)
    if not path.exists():
        raise InputError(path, "file not found", fix="check the path in the config, or run "
                         "`make data` to put the sample inputs in data/raw/")
    if path.is_file() and path.stat().st_size == 0:
        raise InputError(path, "file is empty", fix="replace it with a complete copy")
    if path.suffix.lower() in PARQUET_SUFFIXES:
        try:
            return gpd.read_parquet(path)
        except Exception as exc:  # pyarrow raises several types
            raise InputError(path, f"not a readable GeoParquet file ({exc})",
                             fix="replace it with a complete GeoParquet file") from exc
    import pyogrio

    kwargs = {}
    if encoding:
        kwargs["encoding"] = encoding
    try:
        listed = [(str(name), gtype) for name, gtype in pyogrio.list_layers(path)]
        layers = [name for name, _ in listed]
        if layer is not None and layer not in layers:
            raise InputError(path, f"no layer {layer!r} (layers: {layers})", field="layer",
                             fix="set the layer name in the config to one of these")
        features = [name for name, gtype in listed if gtype is not None]
        if not features:
            raise InputError(path, "no feature table (no layer has geometries; layers: "
                             f"{layers})", field="layer",
                             fix="export the footprints with their geometry into the file")
        if layer is not None and layer not in features:
            raise InputError(path, f"layer {layer!r} has no geometries (feature layers: "
                             f"{features})", field="layer",
                             fix="set the layer name in the config to a feature layer")
        return pyogrio.read_dataframe(path, layer=layer if layer is not None else features[0],
                                      **kwargs)
    except InputError:
        raise
    except UnicodeDecodeError as exc:
        raise InputError(path, f"text cannot be decoded as {exc.encoding} ({exc.reason} at "
                         f"byte {exc.start})", field="encoding",
                         fix="set sources[].encoding to the file's encoding (e.g. gbk); for a "
                         "file that mixes UTF-8 and GBK records set encoding: latin1 and "
                         "text_repair: utf8_or_gbk_read_as_latin1") from exc
    except Exception as exc:  # DataSourceError, DataLayerError, ...
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise InputError(path, f"GDAL cannot read it: {msg}",
                         fix="check that the file is complete and in a vector format GDAL "
                         "reads (GeoPackage, GeoJSON, Shapefile, FlatGeobuf, OSM, ...)") from exc


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path that replaces ``path`` only on success.

    Parameters
    ----------
    path : Path
        The final file.

    Yields
    ------
    Path
        A temporary file in the same directory (so the rename is atomic).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part" + path.suffix,
                               dir=path.parent)
    os.close(fd)
    os.unlink(tmp)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def write_parquet_atomic(frame: pd.DataFrame, path: Path) -> None:
    """Write a (Geo)DataFrame to (Geo)Parquet atomically.

    Parameters
    ----------
    frame : DataFrame or GeoDataFrame
        What to write.
    path : Path
        The target file.
    """
    with atomic_path(path) as tmp:
        frame.to_parquet(tmp, index=False)
