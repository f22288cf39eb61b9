"""Stage 1, ingest: footprints from every source into one metric frame.

Reads each configured source (any GDAL vector format or GeoParquet, an
OpenStreetMap extract through GDAL's OSM driver, or footprints traced from
building-height rasters), maps its fields to the canonical attribute columns,
repairs what ``make_valid`` can turn into a polygon, reprojects to the one
metric working CRS and assigns each footprint to the district its centroid
lies in. Every feature read is either kept or rejected with a reason.

Outputs (GeoParquet under ``paths.processed_dir``)

=========================  =======  ==============================================
column                     unit     meaning
=========================  =======  ==============================================
building_id                -        ``<source>:<source_id>``, unique
source, source_id          -        where the footprint came from
district_name              -        district containing the centroid
district_adcode            -        its administrative code
name ... levels_attr       -        canonical attributes (see ``glossary``)
footprint_area_m2          m2       area in the working CRS
geometry_repaired          -        True where ``make_valid`` repaired it
geometry                   m        (Multi)Polygon in ``working_crs``
=========================  =======  ==============================================

``ingest_buildings.parquet`` holds kept footprints; ``ingest_areas.parquet``
polygons without a building tag (campuses, land-use parcels) that the
classifier uses; ``ingest_pois.parquet`` point features; and
``ingest_rejected.parquet`` every feature not kept, with ``reason``, ``stage``
and its original attributes as JSON. ``ingest_accounting.json`` counts read,
kept and rejected features per source.
"""

from __future__ import annotations

import itertools
import json
import logging
import re
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import geopandas as gpd
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import shapely

from pipeline.columns import map_unique, records_json
from pipeline.config import DistrictsConfig, PipelineConfig, SourceConfig
from pipeline.errors import InputError
from pipeline.glossary import ATTRIBUTE_COLUMNS
from pipeline.io import PARQUET_SUFFIXES, read_vector, write_parquet_atomic
from pipeline.parallel import map_tasks, rows_per_partition

log = logging.getLogger(__name__)

NUMERIC_ATTRIBUTES = ("height_attr_m", "levels_attr")
POLYGONAL = ("Polygon", "MultiPolygon")
#: shapely type ids to the geometry type names GEOS reports
_GEOM_TYPE_NAMES = {0: "Point", 1: "LineString", 2: "LinearRing", 3: "Polygon", 4: "MultiPoint",
                    5: "MultiLineString", 6: "MultiPolygon", 7: "GeometryCollection"}
#: columns of ingest_buildings.parquet, in order
KEPT_COLUMNS = ["building_id", "source", "source_id", "district_name", "district_adcode",
                *ATTRIBUTE_COLUMNS, "footprint_area_m2", "geometry_repaired", "geometry"]
#: canonical columns whose value makes a non-building polygon a classification area
AREA_TAGS = ("tag_amenity", "tag_landuse", "tag_office", "tag_government", "tag_industrial",
             "land_use_code", "class_field")


# --------------------------------------------------------------------------- readers
def read_source(src: SourceConfig, base_dir: Path) -> gpd.GeoDataFrame:
    """Read one source into canonical columns, in its own CRS.

    Parameters
    ----------
    src : SourceConfig
        The source's config (path, kind, column mapping, encoding, ...).
    base_dir : Path
        Directory that relative paths are resolved against.

    Returns
    -------
    GeoDataFrame
        Columns ``source``, ``source_id``, the canonical attributes,
        ``original_attributes`` (JSON text) and ``geometry``, in the source's
        CRS, one row per feature read.

    Raises
    ------
    InputError
        Missing file, missing CRS (without ``crs_if_missing``), or a mapped
        field that the file does not have.
    """
    path = (base_dir / src.path) if not src.path.is_absolute() else src.path
    if src.kind == "raster_footprints":
        raw = trace_raster_footprints(path, src)
    elif src.kind == "osm":
        raw = read_osm(path)
    else:
        raw = read_vector(path, layer=src.layer, encoding=src.encoding)
    if raw.crs is None:
        if src.crs_if_missing is None:
            raise InputError(
                path, "the file has no CRS", field="crs",
                fix=f"add a .prj / CRS to the file, or set sources[{src.name}].crs_if_missing "
                "to the CRS its coordinates are in (e.g. EPSG:4326)",
            )
        raw = raw.set_crs(src.crs_if_missing)
    return _canonical(raw, src, path)


def _canonical(raw: gpd.GeoDataFrame, src: SourceConfig, path: Path,
               with_json: bool = True) -> gpd.GeoDataFrame:
    """Map a source's fields to the canonical attribute columns.

    ``original_attributes`` is null when ``with_json`` is False (chunked
    ingest fills it for rejected rows only).
    """
    missing = sorted(v for v in src.columns.values() if v not in raw.columns)
    if missing:
        raise InputError(
            path, f"mapped field(s) {missing} not in the file (it has: "
            f"{sorted(c for c in raw.columns if c != 'geometry')[:40]})",
            field=", ".join(missing),
            fix=f"correct sources[{src.name}].columns in the config to the file's field names",
        )
    out = pd.DataFrame(index=pd.RangeIndex(len(raw)))
    out["source"] = src.name
    if src.id_field:
        if src.id_field not in raw.columns:
            raise InputError(path, f"id field {src.id_field!r} not in the file",
                             field=src.id_field,
                             fix=f"set sources[{src.name}].id_field to an existing field or null")
        out["source_id"] = _id_text(raw[src.id_field].to_numpy())
    else:
        out["source_id"] = np.char.mod("%d", np.arange(len(raw)))
    for col in ATTRIBUTE_COLUMNS:
        field = src.columns.get(col)
        if field is None:
            values = pd.Series(pd.NA, index=out.index, dtype="object")
        else:
            values = pd.Series(raw[field].to_numpy(), index=out.index)
        if col in NUMERIC_ATTRIBUTES:
            out[col] = pd.to_numeric(values, errors="coerce").astype("float64")
        else:
            out[col] = _text(values, src.text_repair)
    attr_cols = [c for c in raw.columns if c != raw.geometry.name]
    out["original_attributes"] = (_records_json(raw[attr_cols]) if with_json
                                  else pd.Series(None, index=out.index, dtype="object"))
    return gpd.GeoDataFrame(out, geometry=raw.geometry.to_numpy(), crs=raw.crs)


def _id_text(values: np.ndarray) -> list[str | None]:
    """Ids as text; integral floats lose their '.0'."""
    if pd.api.types.infer_dtype(values, skipna=True) == "string":
        return list(np.where(pd.isna(values), None, values))
    def text(v: object) -> str:
        if isinstance(v, float | np.floating) and float(v).is_integer():
            return str(int(v))
        return str(v)

    return list(map_unique(values, text))


def _text(values: pd.Series, repair: str) -> pd.Series:
    """Strings (or NA), with the configured mis-encoding repaired."""
    def fix(v: object) -> object:
        s = str(v).strip()
        if not s:
            return pd.NA
        if repair == "gbk_read_as_latin1":
            try:
                return s.encode("latin-1").decode("gbk")
            except (UnicodeEncodeError, UnicodeDecodeError):
                return s  # already proper text
        return s

    return pd.Series(map_unique(values, fix, null=pd.NA), index=values.index, dtype="object")


def _records_json(frame: pd.DataFrame) -> list[str]:
    """Each row's non-null attributes as a JSON object."""
    return list(records_json(frame))


_HSTORE = re.compile(r'"((?:[^"\\]|\\.)*)"=>"((?:[^"\\]|\\.)*)"')


def read_osm(path: Path) -> gpd.GeoDataFrame:
    """Read an OpenStreetMap ``.osm.pbf`` or ``.osm`` file with GDAL's OSM driver.

    Polygons come from the ``multipolygons`` layer (closed ways and
    multipolygon relations) and points from the ``points`` layer; tags that
    GDAL keeps in ``other_tags`` become columns with their OSM key as name
    (``building:levels``, ``height``, ``roof:shape``, ...). ``id`` is
    ``way/<id>``, ``relation/<id>`` or ``node/<id>`` as in Overpass exports.

    Parameters
    ----------
    path : Path
        The OSM file.

    Returns
    -------
    GeoDataFrame
        One row per OSM feature, EPSG:4326.
    """
    import pyogrio

    if not path.is_file():
        raise InputError(path, "file not found", fix="check sources[].path in the config")
    frames = []
    for layer in ("multipolygons", "points"):
        try:
            gdf = pyogrio.read_dataframe(path, layer=layer)
        except Exception as exc:  # pyogrio raises DataSourceError and friends
            raise InputError(path, f"GDAL's OSM driver cannot read layer {layer}: {exc}",
                             fix="check that the file is a complete .osm.pbf or .osm "
                             "extract") from exc
        if layer == "multipolygons":
            way = gdf["osm_way_id"] if "osm_way_id" in gdf else pd.Series(None, index=gdf.index)
            gdf["id"] = np.where(way.notna(), "way/" + way.astype(str),
                                 "relation/" + gdf["osm_id"].astype(str))
        else:
            gdf["id"] = "node/" + gdf["osm_id"].astype(str)
        if "other_tags" in gdf:
            tags = gdf.pop("other_tags").map(
                lambda s: dict(_HSTORE.findall(s)) if isinstance(s, str) else {}
            )
            extra = pd.DataFrame(list(tags), index=gdf.index)
            for col in extra.columns:
                if col not in gdf.columns:
                    gdf[col] = extra[col]
        frames.append(gdf)
    out = pd.concat(frames, ignore_index=True)
    return gpd.GeoDataFrame(out, geometry="geometry", crs=frames[0].crs or "EPSG:4326")


def trace_raster_footprints(path: Path, src: SourceConfig) -> gpd.GeoDataFrame:
    """Trace building footprints from building-height rasters.

    Each connected patch of one height value (4-connectivity) becomes a
    polygon carrying that height. Pixels at nodata or below
    ``raster_min_height_m`` are background.

    Parameters
    ----------
    path : Path
        A GeoTIFF, or a directory searched with ``raster_glob``.
    src : SourceConfig
        Supplies ``raster_glob``, ``raster_height_scale_m_per_unit`` and
        ``raster_min_height_m``.

    Returns
    -------
    GeoDataFrame
        Columns ``patch_id`` (``<tile>:<n>``), ``height_m`` [m], ``tile``,
        geometry in the rasters' CRS (all tiles must share one CRS).
    """
    import rasterio
    import rasterio.features

    files = sorted(path.glob(src.raster_glob)) if path.is_dir() else [path]
    if not files or not all(f.is_file() for f in files):
        raise InputError(path, f"no raster files matching {src.raster_glob!r}",
                         fix=f"check sources[{src.name}].path and raster_glob")
    records: list[tuple[str, float, str, object]] = []
    crs = None
    for f in files:
        try:
            ds_ctx = rasterio.open(f)
        except rasterio.errors.RasterioIOError as exc:
            raise InputError(f, f"cannot open raster: {exc}",
                             fix="replace the file with a readable GeoTIFF") from exc
        with ds_ctx as ds:
            if ds.crs is None:
                raise InputError(f, "raster has no CRS", field="crs",
                                 fix="georeference the raster (e.g. gdal_edit.py -a_srs)")
            if crs is None:
                crs = ds.crs
            elif ds.crs != crs:
                raise InputError(f, f"raster CRS {ds.crs} differs from {crs} of the other tiles",
                                 fix="reproject the tiles to one CRS")
            band = ds.read(1)
            heights = band.astype("float64") * src.raster_height_scale_m_per_unit
            mask = heights >= src.raster_min_height_m
            if ds.nodata is not None:
                mask &= band != ds.nodata
            n = 0
            for geom, value in rasterio.features.shapes(
                band, mask=mask, transform=ds.transform, connectivity=4
            ):
                records.append((f"{f.stem}:{n}", float(value) * src.raster_height_scale_m_per_unit,
                                f.name, shapely.geometry.shape(geom)))
                n += 1
    frame = pd.DataFrame(records, columns=["patch_id", "height_m", "tile", "geometry"])
    return gpd.GeoDataFrame(frame, geometry="geometry", crs=crs)


# --------------------------------------------------------------------------- kernels
def normalise_footprints(
    part: gpd.GeoDataFrame,
    working_crs: str,
    min_area_m2: float,
    max_area_m2: float,
    building_filter: str,
) -> gpd.GeoDataFrame:
    """Repair, reproject and measure footprints; mark what is not kept.

    Parameters
    ----------
    part : GeoDataFrame
        Canonical features of one source, in the source CRS.
    working_crs : str
        Projected metric CRS to reproject to.
    min_area_m2, max_area_m2 : float
        Plausible footprint area range [m2].
    building_filter : str
        ``all`` or ``tag_building_not_null`` (OSM: polygons without a
        building tag are areas, not buildings).

    Returns
    -------
    GeoDataFrame
        ``part`` in ``working_crs`` with ``footprint_area_m2`` [m2],
        ``geometry_repaired``, ``role`` (building, area, poi or rejected) and
        ``reason`` (null for kept buildings).
    """
    out = part.copy()
    geom = out.geometry.array
    reason = np.full(len(out), None, dtype=object)
    role = np.full(len(out), "building", dtype=object)
    missing = shapely.is_missing(geom) | shapely.is_empty(geom)
    reason[missing] = "null or empty geometry"
    geom = np.where(missing, None, geom)
    geom = shapely.force_2d(geom)
    gtype = pd.Series(shapely.get_type_id(geom)).map(_GEOM_TYPE_NAMES).fillna("")
    gtype = gtype.to_numpy(dtype=object)
    is_point = np.isin(gtype, ("Point", "MultiPoint"))
    other = ~missing & ~np.isin(gtype, POLYGONAL)
    reason[other] = ["not polygonal: " + t for t in gtype[other]]
    role[other] = "rejected"
    role[is_point] = "poi"
    polygonal = ~missing & np.isin(gtype, POLYGONAL)
    invalid = polygonal & ~shapely.is_valid(geom)
    repaired = np.zeros(len(out), dtype=bool)
    for i in np.flatnonzero(invalid):
        fixed = _polygonal_part(shapely.make_valid(geom[i]))
        if fixed is None:
            reason[i] = "invalid geometry that make_valid cannot turn into a polygon"
            role[i] = "rejected"
        else:
            geom[i] = fixed
            repaired[i] = True
    if building_filter == "tag_building_not_null":
        not_building = polygonal & out["tag_building"].isna().to_numpy() & (role == "building")
        reason[not_building] = "not a building: polygon without a building tag"
        has_area_tag = out[list(AREA_TAGS)].notna().any(axis=1).to_numpy()
        role[not_building] = np.where(has_area_tag[not_building], "area", "rejected")
    series = gpd.GeoSeries(geom, index=out.index, crs=out.crs)
    if out.crs is not None:
        series = series.to_crs(working_crs)
    out = out.set_geometry(series)
    area = np.where(polygonal, shapely.area(series.array), np.nan)
    out["footprint_area_m2"] = area
    is_bldg = (role == "building") & polygonal
    small = is_bldg & (area < min_area_m2)
    large = is_bldg & (area > max_area_m2)
    reason[small] = f"footprint smaller than ingest.min_footprint_area_m2 = {min_area_m2:g} m2"
    reason[large] = f"footprint larger than ingest.max_footprint_area_m2 = {max_area_m2:g} m2"
    role[missing | small | large] = "rejected"
    out["geometry_repaired"] = repaired
    out["role"] = role
    out["reason"] = pd.Series(reason, index=out.index, dtype="object")
    return out


def _polygonal_part(geom: shapely.Geometry) -> shapely.Geometry | None:
    """The polygonal part of a geometry (None when it has no area)."""
    if geom is None or geom.is_empty:
        return None
    if geom.geom_type in POLYGONAL:
        return geom if geom.area > 0 else None
    parts = [g for g in shapely.get_parts(geom) if g.geom_type in POLYGONAL]
    polys = [p for g in parts for p in shapely.get_parts(g)]
    if not polys:
        return None
    merged = shapely.union_all(polys)
    return merged if merged.area > 0 else None


def assign_districts(part: gpd.GeoDataFrame, districts: gpd.GeoDataFrame) -> gpd.GeoDataFrame:
    """Assign each footprint to the district that contains its centroid.

    Parameters
    ----------
    part : GeoDataFrame
        Footprints in the working CRS.
    districts : GeoDataFrame
        ``district_name``, ``district_adcode`` and polygons, same CRS.

    Returns
    -------
    GeoDataFrame
        ``part`` with ``district_name`` and ``district_adcode`` (null where
        the centroid is outside every district).
    """
    out = part.copy()
    cent = gpd.GeoDataFrame(geometry=out.geometry.centroid, index=out.index, crs=out.crs)
    joined = gpd.sjoin(cent, districts[["district_name", "district_adcode", "geometry"]],
                       how="left", predicate="within")
    joined = joined[~joined.index.duplicated(keep="first")]
    out["district_name"] = joined["district_name"].astype("object")
    out["district_adcode"] = joined["district_adcode"].astype("object")
    return out


# --------------------------------------------------------------------------- runner
def load_districts(cfg: DistrictsConfig, working_crs: str, base_dir: Path) -> gpd.GeoDataFrame:
    """Read district boundaries into the working CRS.

    Parameters
    ----------
    cfg : DistrictsConfig
        Path and field names.
    working_crs : str
        Target CRS.
    base_dir : Path
        Directory that relative paths are resolved against.

    Returns
    -------
    GeoDataFrame
        ``district_name``, ``district_adcode`` (text), geometry.
    """
    path = cfg.path if cfg.path.is_absolute() else base_dir / cfg.path
    raw = read_vector(path, layer=cfg.layer)
    for field in (cfg.name_field, cfg.code_field):
        if field not in raw.columns:
            raise InputError(path, f"field {field!r} not in the district boundaries", field=field,
                             fix="set districts.name_field / districts.code_field in the config")
    if raw.crs is None:
        if cfg.crs_if_missing is None:
            raise InputError(path, "the district boundaries have no CRS", field="crs",
                             fix="set districts.crs_if_missing to the CRS of the coordinates")
        raw = raw.set_crs(cfg.crs_if_missing)
    out = gpd.GeoDataFrame(
        {"district_name": raw[cfg.name_field].astype(str).to_numpy(),
         "district_adcode": _id_text(raw[cfg.code_field].to_numpy())},
        geometry=shapely.make_valid(raw.geometry.array), crs=raw.crs,
    ).to_crs(working_crs)
    return out


def run(cfg: PipelineConfig, base_dir: Path) -> dict:
    """Ingest every source; write the stage's GeoParquet files.

    Sources are read in chunks (GeoParquet row groups, slices of large GDAL
    layers) by the workers; each chunk is normalised, assigned to districts
    and its kept buildings sorted along a Hilbert curve over the districts'
    extent and spilled to disk. The spills are then merged into
    ``ingest_buildings.parquet``, spatially sorted, one row group per
    partition, so that later stages stream compact patches of the map.

    Parameters
    ----------
    cfg : PipelineConfig
        The run's configuration.
    base_dir : Path
        Project root that relative paths are resolved against.

    Returns
    -------
    dict
        The accounting: per source, features read, kept and rejected, and
        rejections by reason.
    """
    t0 = time.perf_counter()
    out_dir = base_dir / cfg.paths.processed_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    districts = load_districts(cfg.districts, cfg.working_crs, base_dir)
    bounds = tuple(float(v) for v in districts.total_bounds)
    spill_dir = Path(tempfile.mkdtemp(prefix=".ingest_spill_", dir=out_dir))
    try:
        tasks = []
        for src in cfg.sources:
            for n, (chunk, ids) in enumerate(source_chunks(src, base_dir)):
                tasks.append((src, chunk, ids, districts, cfg.working_crs,
                              cfg.ingest.min_footprint_area_m2,
                              cfg.ingest.max_footprint_area_m2, bounds,
                              str(spill_dir / f"{src.name}_{n:06d}.arrow")))
        sizes = [len(t[2]) for t in tasks]
        results = list(map_tasks(ingest_chunk, tasks, label="ingest", sizes=sizes))
        rows_kept, _ = merge_spills(results, out_dir / "ingest_buildings.parquet")
    finally:
        shutil.rmtree(spill_dir, ignore_errors=True)

    def gather(key: str) -> gpd.GeoDataFrame:
        frames = [r[key] for r in results]
        return gpd.GeoDataFrame(pd.concat(frames, ignore_index=True), geometry="geometry",
                                crs=cfg.working_crs)

    areas, pois, rejected = gather("areas"), gather("pois"), gather("rejected")
    accounting = {}
    for src in cfg.sources:
        mine = [r for r in results if r["source"] == src.name]
        by_reason: dict[str, int] = {}
        for r in mine:
            for reason, count in r["rejected_by_reason"].items():
                by_reason[reason] = by_reason.get(reason, 0) + count
        accounting[src.name] = {
            "read": sum(r["read"] for r in mine),
            "kept": sum(r["kept"] for r in mine),
            "rejected": sum(by_reason.values()),
            "rejected_by_reason": dict(sorted(by_reason.items(), key=lambda kv: -kv[1])),
        }
        acc = accounting[src.name]
        assert acc["read"] == acc["kept"] + acc["rejected"], acc
    assert rows_kept == sum(a["kept"] for a in accounting.values())

    write_parquet_atomic(areas, out_dir / "ingest_areas.parquet")
    write_parquet_atomic(pois, out_dir / "ingest_pois.parquet")
    write_parquet_atomic(rejected, out_dir / "ingest_rejected.parquet")
    _write_json_atomic(accounting, out_dir / "ingest_accounting.json")
    log.info("ingest: %d features read, %d buildings kept, %d rejected, %d areas, %d POIs "
             "in %.1f s", sum(a["read"] for a in accounting.values()), rows_kept,
             len(rejected), len(areas), len(pois), time.perf_counter() - t0)
    return accounting


# --------------------------------------------------------------------------- chunks
def source_chunks(src: SourceConfig, base_dir: Path) -> list[tuple[tuple, np.ndarray]]:
    """Split a source into chunks that workers read themselves.

    GeoParquet files are split by row groups and large GDAL layers into
    slices of about ``dask.rows_per_partition`` features; OSM extracts,
    height rasters and small files are read here, whole. Building ids are
    made here, over the whole source, so that repeated source ids get the
    same ``#n`` suffix however the source is chunked.

    Parameters
    ----------
    src : SourceConfig
        The source.
    base_dir : Path
        Project root.

    Returns
    -------
    list of (chunk, building_ids)
        ``chunk`` is ``("frame", gdf, offset)``, ``("parquet", path,
        row_groups, offset)`` or ``("gdal", path, skip, count, offset)``
        for :func:`read_chunk`; ``building_ids`` the ids of its rows.
    """
    import pyogrio

    from pipeline.stream import partitions

    path = (base_dir / src.path) if not src.path.is_absolute() else src.path
    size = rows_per_partition()
    chunks: list[tuple] = []
    ids_field: np.ndarray | None = None
    if src.kind == "vector" and path.suffix.lower() in PARQUET_SUFFIXES and path.is_file():
        try:
            meta = pq.ParquetFile(path).metadata
        except Exception as exc:  # pyarrow raises several types
            raise InputError(path, f"not a readable GeoParquet file ({exc})",
                             fix="replace it with a complete GeoParquet file") from exc
        offset = 0
        for rgs in partitions(path, size):
            chunks.append(("parquet", path, rgs, offset))
            offset += sum(meta.row_group(i).num_rows for i in rgs)
        n = meta.num_rows
        if src.id_field and src.id_field in pq.ParquetFile(path).schema_arrow.names:
            ids_field = pq.read_table(path, columns=[src.id_field])[src.id_field].to_numpy(
                zero_copy_only=False)
    elif src.kind == "vector" and path.is_file() and (
            n := _feature_count(path, src.layer)) > size:
        chunks = [("gdal", path, skip, min(size, n - skip), skip) for skip in range(0, n, size)]
        if src.id_field:
            try:
                ids_frame = pyogrio.read_dataframe(path, layer=src.layer, columns=[src.id_field],
                                                   read_geometry=False, encoding=src.encoding)
                ids_field = ids_frame[src.id_field].to_numpy()
            except Exception:  # noqa: BLE001 - a missing field is reported by the chunk reader
                ids_field = None
    else:
        raw = read_source(src, base_dir)
        n = len(raw)
        chunks = [("frame", raw.iloc[a:a + size], a) for a in range(0, max(n, 1), size)]
        ids_field = None
        source_ids = raw["source_id"]
        return _with_ids(src, chunks, source_ids)
    if ids_field is not None and len(ids_field) == n:
        source_ids = pd.Series(_id_text(ids_field))
    else:
        source_ids = pd.Series(np.char.mod("%d", np.arange(n)), dtype=object)
    return _with_ids(src, chunks, source_ids)


def _with_ids(src: SourceConfig, chunks: list[tuple], source_ids: pd.Series
              ) -> list[tuple[tuple, np.ndarray]]:
    ids = _unique_ids(src.name, source_ids.reset_index(drop=True))
    out = []
    for chunk in chunks:
        offset = chunk[-1]
        rows = (len(chunk[1]) if chunk[0] == "frame" else chunk[3] if chunk[0] == "gdal"
                else None)
        if rows is None:
            nxt = [c[-1] for c in chunks if c[-1] > offset]
            rows = (min(nxt) if nxt else len(ids)) - offset
        out.append((chunk, ids[offset:offset + rows]))
    return out


def _feature_count(path: Path, layer: str | None) -> int:
    import pyogrio

    try:
        return int(pyogrio.read_info(path, layer=layer)["features"])
    except Exception:  # noqa: BLE001 - read_vector reports unreadable files with a fix
        return -1


def read_chunk(src: SourceConfig, chunk: tuple
               ) -> tuple[gpd.GeoDataFrame, pd.DataFrame | None]:
    """Read one chunk of a source into canonical columns (in its own CRS).

    Parameters
    ----------
    src : SourceConfig
        The source.
    chunk : tuple
        From :func:`source_chunks`.

    Returns
    -------
    tuple of (GeoDataFrame, DataFrame or None)
        As :func:`read_source`, for the chunk's rows (``source_id`` counts
        rows over the whole source when the source has no id field), but
        ``original_attributes`` left null; and the raw attributes to fill it
        from for the rows that are rejected (None when already filled).
    """
    kind = chunk[0]
    if kind == "frame":
        return chunk[1], None
    path = chunk[1]
    if kind == "parquet":
        from pipeline.stream import read_partition

        raw = read_partition(path, chunk[2])
    else:
        import pyogrio

        raw = pyogrio.read_dataframe(path, layer=src.layer, skip_features=chunk[2],
                                     max_features=chunk[3],
                                     **({"encoding": src.encoding} if src.encoding else {}))
    if raw.crs is None:
        if src.crs_if_missing is None:
            raise InputError(
                path, "the file has no CRS", field="crs",
                fix=f"add a .prj / CRS to the file, or set sources[{src.name}].crs_if_missing "
                "to the CRS its coordinates are in (e.g. EPSG:4326)",
            )
        raw = raw.set_crs(src.crs_if_missing)
    raw = raw.reset_index(drop=True)
    out = _canonical(raw, src, path, with_json=False)
    if not src.id_field:
        out["source_id"] = np.char.mod("%d", np.arange(chunk[-1], chunk[-1] + len(out)))
    return out, raw.drop(columns=raw.geometry.name)


def ingest_chunk(src: SourceConfig, chunk: tuple, building_ids: np.ndarray,
                 districts: gpd.GeoDataFrame, working_crs: str, min_area_m2: float,
                 max_area_m2: float, bounds: tuple[float, float, float, float],
                 spill_path: str) -> dict:
    """Read, normalise and locate one chunk; spill its kept buildings (a task).

    Parameters
    ----------
    src : SourceConfig
        The source.
    chunk : tuple
        From :func:`source_chunks`.
    building_ids : ndarray of str
        The ids of the chunk's rows.
    districts : GeoDataFrame
        District boundaries in ``working_crs``.
    working_crs : str
        Metric working CRS.
    min_area_m2, max_area_m2 : float
        Plausible footprint area range [m2].
    bounds : tuple of float
        Extent of the districts [m], for the Hilbert keys.
    spill_path : str
        Arrow IPC file for the kept buildings, sorted by Hilbert key.

    Returns
    -------
    dict
        ``source``, ``read``, ``kept``, ``rejected_by_reason``, ``keys``
        (sorted Hilbert keys of the spilled rows), ``spill``, and the
        ``areas``, ``pois`` and ``rejected`` rows as GeoDataFrames.
    """
    from pipeline.stream import spatial_keys, to_arrow

    canonical, attributes = read_chunk(src, chunk)
    norm = normalise_footprints(canonical.reset_index(drop=True), working_crs, min_area_m2,
                                max_area_m2, src.building_filter)
    norm["building_id"] = np.asarray(building_ids, dtype=object)
    bmask = norm["role"].eq("building").to_numpy()
    located = assign_districts(norm[bmask], districts)
    norm["district_name"] = pd.Series(pd.NA, index=norm.index, dtype="object")
    norm["district_adcode"] = pd.Series(pd.NA, index=norm.index, dtype="object")
    norm.loc[located.index, "district_name"] = located["district_name"]
    norm.loc[located.index, "district_adcode"] = located["district_adcode"]
    outside = bmask & norm["district_name"].isna().to_numpy()
    norm.loc[outside, "reason"] = "centroid outside every district boundary"
    norm.loc[outside, "role"] = "rejected"

    kept = norm[norm["role"].eq("building")]
    kept = gpd.GeoDataFrame(kept[KEPT_COLUMNS], geometry="geometry", crs=working_crs)
    keys = spatial_keys(kept.geometry.to_numpy(), bounds)
    order = np.argsort(keys, kind="stable")
    table = to_arrow(kept.iloc[order].reset_index(drop=True))
    with pa.OSFile(spill_path, "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table)
    areas = norm[norm["role"].eq("area")][["building_id", "source", "source_id",
                                           *ATTRIBUTE_COLUMNS, "geometry"]]
    pois = norm[norm["role"].eq("poi")][["building_id", "source", "source_id",
                                         *ATTRIBUTE_COLUMNS, "geometry"]].copy()
    pois["poi_category"] = (pois["tag_amenity"].fillna(pois["tag_office"])
                            .fillna(pois["tag_shop"]).fillna(pois["tag_tourism"])
                            .fillna(pois["class_field"]))
    rejected = norm[norm["reason"].notna()][
        ["building_id", "source", "source_id", "name", "reason", "original_attributes",
         "geometry"]].copy()
    if attributes is not None:
        rejected["original_attributes"] = _records_json(attributes.loc[rejected.index])
    rejected.insert(4, "stage", "ingest")
    return {
        "source": src.name, "read": len(norm), "kept": len(kept),
        "rejected_by_reason": {str(k): int(v) for k, v in
                               rejected["reason"].value_counts().items()},
        "keys": keys[order], "spill": spill_path,
        "areas": areas, "pois": pois, "rejected": rejected,
    }


def merge_spills(results: list[dict], out: Path) -> tuple[int, int]:
    """Merge the chunks' sorted spills into one spatially sorted GeoParquet.

    Partition boundaries are quantiles of all Hilbert keys, so partitions
    hold about ``dask.rows_per_partition`` rows each; each partition reads
    only its key range from every spill (memory-mapped) and becomes one row
    group.

    Parameters
    ----------
    results : list of dict
        From :func:`ingest_chunk`.
    out : Path
        ``ingest_buildings.parquet``.

    Returns
    -------
    tuple of int
        Rows and row groups written.
    """
    from pipeline.stream import write_tables

    keys = [r["keys"] for r in results]
    all_keys = np.sort(np.concatenate(keys)) if keys else np.empty(0, np.int64)
    size = rows_per_partition()
    edges = [None, *all_keys[size::size].tolist(), None]

    def tables() -> Iterator[pa.Table]:
        wrote = False
        for lo, hi in itertools.pairwise(edges):
            parts, part_keys = [], []
            for r, k in zip(results, keys, strict=True):
                a = 0 if lo is None else int(np.searchsorted(k, lo, "left"))
                b = len(k) if hi is None else int(np.searchsorted(k, hi, "left"))
                if b > a or (not wrote and not parts):
                    # memory-mapped: only the slice's pages are read; take() below copies
                    spill = pa.ipc.open_file(pa.memory_map(r["spill"], "r")).read_all()
                    parts.append(spill.slice(a, b - a))
                    part_keys.append(k[a:b])
            table = pa.concat_tables(parts, promote_options="permissive")
            if table.num_rows == 0 and wrote:
                continue
            order = np.argsort(np.concatenate(part_keys), kind="stable")
            yield table.take(pa.array(order)).combine_chunks()
            wrote = True

    rows, _ = write_tables(tables(), out)
    return rows, max(len(edges) - 1, 1)


def _unique_ids(source: str, source_id: pd.Series) -> np.ndarray:
    """``<source>:<source_id>``, with ``#n`` appended to repeated ids."""
    base = (source + ":" + source_id.fillna("row").astype(str)).to_numpy(dtype=object)
    dup_rank = pd.Series(base).groupby(base).cumcount().to_numpy()
    return np.where(dup_rank > 0, base + "#" + dup_rank.astype(str), base)


def _write_json_atomic(obj: object, path: Path) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp.write_text(json.dumps(obj, ensure_ascii=False, indent=2), encoding="utf-8")
    tmp.replace(path)
