"""Stage 1, ingest: footprints from every source into one metric frame.

Reads each configured source (any GDAL vector format or GeoParquet, an
OpenStreetMap extract through GDAL's OSM driver, or footprints traced from
building-height rasters), maps its fields to the canonical attribute columns,
repairs what ``make_valid`` can turn into a polygon, reprojects to the one
metric working CRS and assigns each footprint to the district its centroid
lies in. Every feature read is either kept or rejected with a reason.

Sources are read in chunks by the workers and the kept buildings merged,
sorted along a Hilbert curve, one partition of ``dask.rows_per_partition``
rows per task (:func:`run`, :func:`merge_spills`). Duplicates are dropped
within each merged partition, after every group of footprints that could be
linked by duplicate pairs (their bounding boxes overlap enough,
:func:`pipeline.dedup.candidate_groups`) has been moved into one partition:
the buildings kept and rejected are the same for any partition size.

Defects handled here (README "When the data is bad"): attribute parsing and
ranges (:mod:`pipeline.attributes`), a declared CRS that does not fit the
coordinates and GCJ-02 sources (:mod:`pipeline.coords`), duplicates within
and across sources (:mod:`pipeline.dedup`), targets for districts missing
from the boundaries (:func:`check_target_districts`).

Outputs (GeoParquet under ``paths.processed_dir``)

=========================  =======  ==============================================
column                     unit     meaning
=========================  =======  ==============================================
building_id                -        ``<source>:<source_id>``, unique
source, source_id          -        where the footprint came from
district_name              -        district containing the centroid
district_adcode            -        its administrative code
name ... levels_attr       -        canonical attributes (see ``glossary``)
attribute_issues           -        how doubtful attribute values were read or
                                    why they were set to null (``attributes``)
footprint_area_m2          m2       area in the working CRS
geometry_repaired          -        True where ``make_valid`` repaired it or Z
                                    coordinates were dropped
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
import time
from collections.abc import Iterator
from pathlib import Path

import geopandas as gpd
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import shapely

from pipeline import parallel
from pipeline.attributes import check_attribute_ranges, clean_text, join_notes, parse_numbers
from pipeline.columns import map_unique, records_json
from pipeline.config import (
    DistrictsConfig,
    IngestConfig,
    PipelineConfig,
    SourceConfig,
    TargetConfig,
)
from pipeline.coords import check_extent, convert_gcj02_frame, gcj02_evidence
from pipeline.dedup import find_duplicates
from pipeline.errors import ConfigError, InputError
from pipeline.glossary import ATTRIBUTE_COLUMNS
from pipeline.io import PARQUET_SUFFIXES, read_vector, write_parquet_atomic
from pipeline.parallel import map_partitions, map_tasks, rows_per_partition

log = logging.getLogger(__name__)

NUMERIC_ATTRIBUTES = ("height_attr_m", "levels_attr")
POLYGONAL = ("Polygon", "MultiPolygon")
#: shapely type ids to the geometry type names GEOS reports
_GEOM_TYPE_NAMES = {0: "Point", 1: "LineString", 2: "LinearRing", 3: "Polygon", 4: "MultiPoint",
                    5: "MultiLineString", 6: "MultiPolygon", 7: "GeometryCollection"}
#: columns of ingest_buildings.parquet, in order
KEPT_COLUMNS = ["building_id", "source", "source_id", "district_name", "district_adcode",
                *ATTRIBUTE_COLUMNS, "attribute_issues", "footprint_area_m2",
                "geometry_repaired", "geometry"]
#: columns of ingest_rejected.parquet (``stage`` is inserted after ``name``)
REJECTED_COLUMNS = ["building_id", "source", "source_id", "name", "reason", "attribute_issues",
                    "original_attributes", "geometry"]
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
    if src.gcj02_to_wgs84:
        raw = convert_gcj02_frame(raw)
    return _canonical(raw, src, path)


def _canonical(raw: gpd.GeoDataFrame, src: SourceConfig, path: Path,
               with_json: bool = True) -> gpd.GeoDataFrame:
    """Map a source's fields to the canonical attribute columns.

    ``original_attributes`` is null when ``with_json`` is False (chunked
    ingest fills it for rejected rows only).
    """
    missing = sorted({*src.columns.values(), *([src.id_field] if src.id_field else [])}
                     - set(raw.columns)) if len(raw) == 0 else sorted(
        v for v in src.columns.values() if v not in raw.columns)
    if missing and len(raw) == 0:
        log.warning("ingest: source %s (%s) has no features", src.name, path)
        raw = raw.assign(**{m: pd.Series(dtype=object) for m in missing})
    elif missing:
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
    notes = []
    for col in ATTRIBUTE_COLUMNS:
        field = src.columns.get(col)
        if field is None:
            values = pd.Series(pd.NA, index=out.index, dtype="object")
        else:
            values = pd.Series(raw[field].to_numpy(), index=out.index)
        if col in NUMERIC_ATTRIBUTES:
            kind = "levels" if col == "levels_attr" else "height"
            out[col], note = parse_numbers(values, kind, col)
        else:
            out[col], note = clean_text(values, src.text_repair, col)
        notes.append(note)
    out["attribute_issues"] = pd.Series(join_notes(*notes), index=out.index, dtype="object")
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
        ``geometry_repaired`` (``make_valid`` repaired it or Z was dropped),
        ``role`` (building, area, poi or rejected) and
        ``reason`` (null for kept buildings).
    """
    out = part.copy()
    geom = out.geometry.array
    reason = np.full(len(out), None, dtype=object)
    role = np.full(len(out), "building", dtype=object)
    missing = shapely.is_missing(geom) | shapely.is_empty(geom)
    reason[missing] = "null or empty geometry"
    geom = np.where(missing, None, geom)
    had_z = ~missing & shapely.has_z(geom)
    if had_z.any():
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
    repaired = had_z.copy()  # 3D coordinates: Z dropped
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
    with np.errstate(invalid="ignore"):
        unprojectable = polygonal & ~np.isfinite(shapely.bounds(series.array)).all(axis=1)
    reason[unprojectable] = (f"coordinates outside the valid range of the source CRS {part.crs} "
                             "(cannot be projected to the working CRS)")
    role[unprojectable] = "rejected"
    polygonal = polygonal & ~unprojectable
    area = np.full(len(out), np.nan)
    area[polygonal] = shapely.area(series.array[polygonal])
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
def load_districts(cfg: DistrictsConfig, working_crs: str, base_dir: Path,
                   targets: list[TargetConfig] | tuple = ()) -> gpd.GeoDataFrame:
    """Read district boundaries into the working CRS; check the targets' districts.

    Parameters
    ----------
    cfg : DistrictsConfig
        Path and field names.
    working_crs : str
        Target CRS.
    base_dir : Path
        Directory that relative paths are resolved against.
    targets : list of TargetConfig, optional
        Targets whose ``district_name`` must be a district in the file.

    Returns
    -------
    GeoDataFrame
        ``district_name``, ``district_adcode`` (text), geometry.

    Raises
    ------
    InputError
        Missing file, field or CRS.
    ConfigError
        A target names a district that is not in the boundaries.
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
    check_target_districts(targets, out["district_name"], path)
    return out


def check_target_districts(targets: list[TargetConfig] | tuple, names: pd.Series,
                           path: Path) -> None:
    """Raise if a target names a district that the boundaries do not have.

    Parameters
    ----------
    targets : list of TargetConfig
        The configured targets.
    names : Series
        District names in the boundaries file.
    path : Path
        The boundaries file, for the message.

    Raises
    ------
    ConfigError
        Naming the target id, its district and the known district names.
    """
    known = sorted(set(names.astype(str)))
    for t in targets:
        if t.district_name not in known:
            raise ConfigError(
                f"targets[{t.id}].district_name: district {t.district_name!r} is not in the "
                f"district boundaries {path} (districts: {', '.join(known)}). Fix: spell it as "
                "in the boundaries file, or point districts.path at boundaries that have it")


def run(cfg: PipelineConfig, base_dir: Path) -> dict:
    """Ingest every source; write the stage's GeoParquet files.

    Sources are read in chunks (GeoParquet row groups, slices of large GDAL
    layers) by the workers; each chunk is checked, normalised and assigned to
    districts, and its kept buildings are sorted along a Hilbert curve over
    the districts' extent and spilled to disk. The spills are then merged,
    one partition per task, into ``ingest_buildings.parquet``, spatially
    sorted, one row group per partition, so that later stages stream compact
    patches of the map. Duplicates (:mod:`pipeline.dedup`) and the GCJ-02
    evidence are found within each merged partition; footprints that could be
    duplicates across a partition edge are first moved into one partition
    (:func:`merge_spills`), so the duplicates found do not depend on the
    partition size.

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
    from pipeline import incremental
    from pipeline.stream import spill_folder

    if incremental.active() is not None:
        # scheduled reruns: the partition cache works on whole frames (pipeline.incremental)
        return _run_whole(cfg, base_dir)
    t0 = time.perf_counter()
    out_dir = base_dir / cfg.paths.processed_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    districts = load_districts(cfg.districts, cfg.working_crs, base_dir, cfg.targets)
    bounds = tuple(float(v) for v in districts.total_bounds)
    with spill_folder(out_dir, ".ingest_spill_") as spill_dir:
        tasks, first_chunk = [], {}
        for src in cfg.sources:
            for n, (chunk, ids) in enumerate(source_chunks(src, base_dir)):
                first_chunk.setdefault(src.name, chunk)
                tasks.append((src, chunk, ids, districts, cfg.working_crs, cfg.ingest, bounds,
                              str(spill_dir / f"{src.name}_{n:06d}.arrow")))
        sizes = [len(t[2]) for t in tasks]
        results = list(map_tasks(ingest_chunk, tasks, label="ingest", sizes=sizes))
        for src in cfg.sources:
            mine = [r for r in results if r["source"] == src.name]
            if sum(r["read"] for r in mine) and not sum(r["near"] for r in mine):
                # no feature near the districts: the first chunk tells what is wrong
                raw, _ = read_chunk(src, first_chunk[src.name], canonical=False)
                check_extent(raw, src.path if src.path.is_absolute() else base_dir / src.path,
                             src.name, districts, cfg.ingest.crs_check_margin_m)
        rows_kept, dup_rejected, counts = merge_spills(
            results, out_dir / "ingest_buildings.parquet", cfg.ingest,
            [s.name for s in cfg.sources], spill_dir)

    def gather(frames: list[pd.DataFrame]) -> gpd.GeoDataFrame:
        return concat_frames(frames, cfg.working_crs)

    areas = gather([r["areas"] for r in results])
    pois = gather([r["pois"] for r in results])
    rejected = gather([r["rejected"] for r in results] + [dup_rejected])
    warnings = gcj02_verdicts(counts, cfg)
    accounting = {}
    for src in cfg.sources:
        mine = [r for r in results if r["source"] == src.name]
        reasons = rejected.loc[rejected["source"].eq(src.name), "reason"]
        by_reason = reason_kind(reasons).value_counts()
        n_dups = int((dup_rejected["source"] == src.name).sum())
        accounting[src.name] = {
            "read": sum(r["read"] for r in mine),
            "kept": sum(r["kept"] for r in mine) - n_dups,
            "rejected": int(len(reasons)),
            "rejected_by_reason": {str(k): int(v) for k, v in by_reason.items()},
            "attribute_issues": sum(r["attribute_issues"] for r in mine),
            "warnings": warnings.get(src.name, []),
        }
        acc = accounting[src.name]
        assert acc["read"] == acc["kept"] + acc["rejected"], acc
    assert rows_kept == sum(a["kept"] for a in accounting.values())
    _log_duplicates(dup_rejected)

    write_parquet_atomic(areas, out_dir / "ingest_areas.parquet")
    write_parquet_atomic(pois, out_dir / "ingest_pois.parquet")
    write_parquet_atomic(rejected, out_dir / "ingest_rejected.parquet")
    _write_json_atomic(accounting, out_dir / "ingest_accounting.json")
    log.info("ingest: %d features read, %d buildings kept, %d rejected, %d areas, %d POIs "
             "in %.1f s", sum(a["read"] for a in accounting.values()), rows_kept,
             len(rejected), len(areas), len(pois), time.perf_counter() - t0)
    return accounting


def _run_whole(cfg: PipelineConfig, base_dir: Path) -> dict:
    """Ingest every source as whole frames through the partition cache of scheduled reruns.

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
    districts = load_districts(cfg.districts, cfg.working_crs, base_dir, cfg.targets)
    parts, accounting = [], {}
    for src in cfg.sources:
        ts = time.perf_counter()
        raw = read_source(src, base_dir)
        check_extent(raw, src.path if src.path.is_absolute() else base_dir / src.path, src.name,
                     districts, cfg.ingest.crs_check_margin_m)
        raw = map_partitions(raw, check_attribute_ranges, cfg.ingest.max_height_attr_m,
                             cfg.ingest.max_levels_attr)
        norm = map_partitions(
            raw, normalise_footprints, cfg.working_crs, cfg.ingest.min_footprint_area_m2,
            cfg.ingest.max_footprint_area_m2, src.building_filter,
        )
        norm["building_id"] = _unique_ids(src.name, norm["source_id"])
        parts.append(norm)
        log.info("ingest %s: %d features read in %.1f s", src.name, len(raw),
                 time.perf_counter() - ts)
    allf = pd.concat(parts, ignore_index=True)
    allf = gpd.GeoDataFrame(allf, geometry="geometry", crs=cfg.working_crs)
    bmask = allf["role"].eq("building").to_numpy()
    located = map_partitions(allf[bmask], assign_districts, districts)
    allf["district_name"] = pd.Series(pd.NA, index=allf.index, dtype="object")
    allf["district_adcode"] = pd.Series(pd.NA, index=allf.index, dtype="object")
    allf.loc[located.index, "district_name"] = located["district_name"]
    allf.loc[located.index, "district_adcode"] = located["district_adcode"]
    outside = bmask & allf["district_name"].isna().to_numpy()
    allf.loc[outside, "reason"] = "centroid outside every district boundary"
    allf.loc[outside, "role"] = "rejected"
    warnings = gcj02_warnings(allf[allf["role"].eq("building")], cfg)
    dups = find_duplicates(allf[allf["role"].eq("building")], cfg.ingest.dedup_min_overlap_share,
                           cfg.ingest.dedup_min_area_ratio, [s.name for s in cfg.sources])
    allf.loc[dups.index, "reason"] = duplicate_reasons(dups)
    allf.loc[dups.index, "role"] = "rejected"

    kept = allf[allf["role"].eq("building")].drop(columns=["role", "reason",
                                                           "original_attributes"])
    cols = ["building_id", "source", "source_id", "district_name", "district_adcode",
            *ATTRIBUTE_COLUMNS, "attribute_issues", "footprint_area_m2", "geometry_repaired",
            "geometry"]
    kept = kept[cols].reset_index(drop=True)
    areas = allf[allf["role"].eq("area")][["building_id", "source", "source_id",
                                           *ATTRIBUTE_COLUMNS, "geometry"]]
    pois = allf[allf["role"].eq("poi")][["building_id", "source", "source_id",
                                         *ATTRIBUTE_COLUMNS, "geometry"]].copy()
    pois["poi_category"] = (pois["tag_amenity"].fillna(pois["tag_office"])
                            .fillna(pois["tag_shop"]).fillna(pois["tag_tourism"])
                            .fillna(pois["class_field"]))
    rejected = allf[allf["reason"].notna()][
        ["building_id", "source", "source_id", "name", "reason", "attribute_issues",
         "original_attributes", "geometry"]].copy()
    rejected.insert(4, "stage", "ingest")
    _log_duplicates(rejected.loc[dups.index])

    for src in cfg.sources:
        sel = allf["source"].eq(src.name)
        by_reason = reason_kind(allf.loc[sel & allf["reason"].notna(), "reason"]).value_counts()
        accounting[src.name] = {
            "read": int(sel.sum()),
            "kept": int((sel & allf["role"].eq("building")).sum()),
            "rejected": int((sel & allf["reason"].notna()).sum()),
            "rejected_by_reason": {str(k): int(v) for k, v in by_reason.items()},
            "attribute_issues": int((sel & allf["attribute_issues"].notna()).sum()),
            "warnings": warnings.get(src.name, []),
        }
        acc = accounting[src.name]
        assert acc["read"] == acc["kept"] + acc["rejected"], acc

    write_parquet_atomic(areas.reset_index(drop=True), out_dir / "ingest_areas.parquet")
    write_parquet_atomic(pois.reset_index(drop=True), out_dir / "ingest_pois.parquet")
    write_parquet_atomic(rejected.reset_index(drop=True), out_dir / "ingest_rejected.parquet")
    _write_json_atomic(accounting, out_dir / "ingest_accounting.json")
    write_parquet_atomic(kept, out_dir / "ingest_buildings.parquet")
    log.info("ingest: %d features read, %d buildings kept, %d rejected, %d areas, %d POIs "
             "in %.1f s", len(allf), len(kept), len(rejected), len(areas), len(pois),
             time.perf_counter() - t0)
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
        row_groups, rows, offset)`` (``rows`` a ``(start, stop)`` slice of
        those row groups' rows, or None for all; a row group larger than
        the partition size is read in slices so that the workers share
        even tasks) or ``("gdal", path, skip, count, offset)``
        for :func:`read_chunk`; ``building_ids`` the ids of its rows.
    """
    import pyogrio

    from pipeline.stream import partitions

    path = (base_dir / src.path) if not src.path.is_absolute() else src.path
    size = rows_per_partition()
    chunks: list[tuple] = []
    ids_field: np.ndarray | None = None
    if src.kind == "vector" and path.suffix.lower() in PARQUET_SUFFIXES and path.is_file() \
            and path.stat().st_size > 0:
        try:
            pf = pq.ParquetFile(path)
        except Exception as exc:  # pyarrow raises several types
            raise InputError(path, f"not a readable GeoParquet file ({exc})",
                             fix="replace it with a complete GeoParquet file") from exc
        offset = 0
        for rgs in partitions(path, size):
            rows = sum(pf.metadata.row_group(i).num_rows for i in rgs)
            n_slices = max(1, round(rows / size))
            cuts = np.linspace(0, rows, n_slices + 1).round().astype(int)
            for a, b in zip(cuts[:-1], cuts[1:], strict=True):
                chunks.append(("parquet", path, rgs, (int(a), int(b)) if n_slices > 1 else None,
                               offset + int(a)))
            offset += rows
        n = pf.metadata.num_rows
        if not chunks:
            chunks = [("parquet", path, [], None, 0)]
        if src.id_field and src.id_field in pf.schema_arrow.names:
            ids_field = pq.read_table(path, columns=[src.id_field])[src.id_field].to_numpy(
                zero_copy_only=False)
    elif src.kind == "vector" and path.is_file() and (
            n := _feature_count(path, src.layer)) > size:
        chunks = [("gdal", path, skip, min(size, n - skip), skip) for skip in range(0, n, size)]
        if src.id_field:
            try:
                ids_frame = pyogrio.read_dataframe(path, layer=src.layer, columns=[src.id_field],
                                                   read_geometry=False,
                                                   **({"encoding": src.encoding}
                                                      if src.encoding else {}))
                ids_field = ids_frame[src.id_field].to_numpy()
            except Exception:  # noqa: BLE001 - a missing field is reported by the chunk reader
                ids_field = None
    else:
        raw = read_source(src, base_dir)
        n = len(raw)
        chunks = [("frame", raw.iloc[a:a + size], a) for a in range(0, max(n, 1), size)]
        return _with_ids(src, chunks, raw["source_id"])
    if ids_field is not None and len(ids_field) == n:
        source_ids = pd.Series(_id_text(ids_field), dtype=object)
    else:
        source_ids = pd.Series(np.char.mod("%d", np.arange(n)), dtype=object)
    return _with_ids(src, chunks, source_ids)


def _with_ids(src: SourceConfig, chunks: list[tuple], source_ids: pd.Series
              ) -> list[tuple[tuple, np.ndarray]]:
    ids = _unique_ids(src.name, source_ids.reset_index(drop=True))
    starts = [c[-1] for c in chunks] + [len(ids)]
    return [(chunk, ids[starts[k]:starts[k + 1]]) for k, chunk in enumerate(chunks)]


def _feature_count(path: Path, layer: str | None) -> int:
    import pyogrio

    try:
        return int(pyogrio.read_info(path, layer=layer)["features"])
    except Exception:  # noqa: BLE001 - read_vector reports unreadable files with a fix
        return -1


def read_chunk(src: SourceConfig, chunk: tuple, canonical: bool = True
               ) -> tuple[gpd.GeoDataFrame, pd.DataFrame | None]:
    """Read one chunk of a source into canonical columns (in its own CRS).

    Parameters
    ----------
    src : SourceConfig
        The source.
    chunk : tuple
        From :func:`source_chunks`.
    canonical : bool
        False returns the features as read (CRS set, GCJ-02 converted).

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

        raw = read_partition(path, chunk[2], rows=chunk[3])
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
    if src.gcj02_to_wgs84:
        raw = convert_gcj02_frame(raw)
    raw = raw.reset_index(drop=True)
    if not canonical:
        return raw, None
    out = _canonical(raw, src, path, with_json=False)
    if not src.id_field:
        out["source_id"] = np.char.mod("%d", np.arange(chunk[-1], chunk[-1] + len(out)))
    return out, raw.drop(columns=raw.geometry.name)


def ingest_chunk(src: SourceConfig, chunk: tuple, building_ids: np.ndarray,
                 districts: gpd.GeoDataFrame, working_crs: str, icfg: IngestConfig,
                 bounds: tuple[float, float, float, float], spill_path: str) -> dict:
    """Read, check, normalise and locate one chunk; spill its kept buildings (a task).

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
    icfg : IngestConfig
        Area and attribute ranges, CRS-check margin.
    bounds : tuple of float
        Extent of the districts [m], for the Hilbert keys.
    spill_path : str
        Arrow IPC file for the kept buildings, sorted by Hilbert key.

    Returns
    -------
    dict
        ``source``, ``read``, ``kept``, ``near`` (features within the
        CRS-check margin of the districts), ``attribute_issues``, ``keys``
        (sorted Hilbert keys of the spilled rows), ``bounds_m`` (their
        bounding boxes, shape (kept, 4) [m]) and ``area_m2`` (their areas
        [m2]) in the same order, ``spill``, and the ``areas``, ``pois`` and
        ``rejected`` rows as GeoDataFrames.
    """
    from pipeline.coords import _points, _share_near
    from pipeline.stream import spatial_keys, to_arrow, write_arrow_file

    canonical, attributes = read_chunk(src, chunk)
    canonical = canonical.reset_index(drop=True)
    near = 0
    if len(canonical) and canonical.crs is not None:
        x, y = _points(canonical)
        m = icfg.crs_check_margin_m
        box = (bounds[0] - m, bounds[1] - m, bounds[2] + m, bounds[3] + m)
        near = round(_share_near(x, y, canonical.crs, box, districts.crs) * len(x))
    canonical = check_attribute_ranges(canonical, icfg.max_height_attr_m, icfg.max_levels_attr)
    norm = normalise_footprints(canonical, working_crs, icfg.min_footprint_area_m2,
                                icfg.max_footprint_area_m2, src.building_filter)
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

    kept = norm[norm["role"].eq("building")].copy()
    if attributes is not None:  # a duplicate found at the merge is rejected with them
        kept["original_attributes"] = _records_json(attributes.loc[kept.index])
    kept = gpd.GeoDataFrame(kept[[*KEPT_COLUMNS[:-1], "original_attributes", "geometry"]],
                            geometry="geometry", crs=working_crs)
    keys = spatial_keys(kept.geometry.to_numpy(), bounds)
    order = np.argsort(keys, kind="stable")
    spilled = np.asarray(kept.geometry.array)[order]
    table = to_arrow(kept.iloc[order].reset_index(drop=True))
    write_arrow_file(table, spill_path)
    areas = norm[norm["role"].eq("area")][["building_id", "source", "source_id",
                                           *ATTRIBUTE_COLUMNS, "geometry"]]
    pois = norm[norm["role"].eq("poi")][["building_id", "source", "source_id",
                                         *ATTRIBUTE_COLUMNS, "geometry"]].copy()
    pois["poi_category"] = (pois["tag_amenity"].fillna(pois["tag_office"])
                            .fillna(pois["tag_shop"]).fillna(pois["tag_tourism"])
                            .fillna(pois["class_field"]))
    rejected = norm[norm["reason"].notna()][REJECTED_COLUMNS].copy()
    if attributes is not None:
        rejected["original_attributes"] = _records_json(attributes.loc[rejected.index])
    rejected.insert(4, "stage", "ingest")
    return {
        "source": src.name, "read": len(norm), "kept": len(kept), "near": near,
        "attribute_issues": int(norm["attribute_issues"].notna().sum()),
        "keys": keys[order], "bounds_m": shapely.bounds(spilled),
        "area_m2": shapely.area(spilled), "spill": spill_path,
        "areas": areas, "pois": pois, "rejected": rejected,
    }


def merge_spills(results: list[dict], out: Path, icfg: IngestConfig, source_order: list[str],
                 spill_dir: Path | None = None) -> tuple[int, gpd.GeoDataFrame, dict]:
    """Merge the chunks' sorted spills into one spatially sorted GeoParquet.

    Partition boundaries are quantiles of all Hilbert keys, so partitions
    hold about ``dask.rows_per_partition`` rows each. Each partition is a
    task (:func:`merge_partition`) that reads its rows from every spill,
    drops duplicates and counts the GCJ-02 evidence; it becomes one row
    group, sorted by key.

    Duplicates are only compared within a partition, so before the tasks are
    made every group of footprints that could hold a chain of duplicates
    (:func:`pipeline.dedup.candidate_groups`, from the chunks' bounding boxes
    and areas: no geometry is read here) and that straddles a partition edge
    is moved wholly into the partition of its smallest key
    (:func:`merge_plan`). The duplicates found are then those of one
    run over all footprints, whatever the partition size; the few moved rows
    are sorted in by key, so a row group's key range may reach a little into
    its neighbour's.

    Parameters
    ----------
    results : list of dict
        From :func:`ingest_chunk`.
    out : Path
        ``ingest_buildings.parquet``.
    icfg : IngestConfig
        Duplicate thresholds.
    source_order : list of str
        Source names, most trusted first.
    spill_dir : Path, optional
        With process workers, the merged partitions are handed over as
        Arrow files in this folder (:func:`pipeline.stream.unspill`).

    Returns
    -------
    tuple
        Rows written, the rejected duplicates (GeoDataFrame) and the GCJ-02
        counts ``{(a, b): (as_read, converted)}``.
    """
    from pipeline.stream import unspill, write_tables

    t0 = time.perf_counter()
    plan = merge_plan([r["keys"] for r in results], [r["bounds_m"] for r in results],
                      [r["area_m2"] for r in results], rows_per_partition(),
                      icfg.dedup_min_overlap_share, icfg.dedup_min_area_ratio)
    n_rows = sum(len(r["keys"]) for r in results)
    log.info("ingest merge: %d rows in %d partitions planned in %.2f s", n_rows, len(plan),
             time.perf_counter() - t0)
    tasks = []
    for part in plan:
        slices = [(results[n]["spill"], a, b, take, k) for n, a, b, take, k in part]
        if not slices and results:  # no building at all: an empty table with the schema
            slices = [(results[0]["spill"], 0, 0, None, results[0]["keys"][:0])]
        spill = (str(spill_dir / f"merged_{len(tasks):06d}.arrow")
                 if spill_dir is not None and parallel.local_processes() else None)
        tasks.append((slices, icfg.dedup_min_overlap_share, icfg.dedup_min_area_ratio,
                      source_order, spill))
    dups: list[gpd.GeoDataFrame] = []
    counts: dict[tuple[str, str], tuple[int, int]] = {}

    def tables() -> Iterator[pa.Table]:
        for table, dup, gcj in map_tasks(merge_partition, tasks, label="ingest merge",
                                         sizes=[sum(len(s[4]) for s in t[0]) for t in tasks]):
            dups.append(dup)
            for pair, (x, y) in gcj.items():
                old = counts.get(pair, (0, 0))
                counts[pair] = (old[0] + x, old[1] + y)
            yield unspill(table)

    rows, _ = write_tables(tables(), out)
    dup_frame = (concat_frames(dups, None) if dups else
                 pd.DataFrame(columns=["stage", *REJECTED_COLUMNS]))
    log.info("ingest merge: %d rows in, %d kept, %d duplicates rejected, in %d partitions",
             n_rows, rows, len(dup_frame), len(tasks))
    return rows, dup_frame, counts


def merge_plan(keys: list[np.ndarray], bounds_m: list[np.ndarray], area_m2: list[np.ndarray],
               rows_per_part: int, min_overlap_share: float, min_area_ratio: float
               ) -> list[list[tuple[int, int, int, np.ndarray | None, np.ndarray]]]:
    """Which rows of which spill each merge partition reads (see :func:`merge_spills`).

    Partitions are ranges of the Hilbert key between quantiles of all keys;
    then every group of possible duplicates
    (:func:`pipeline.dedup.candidate_groups`) that spans partitions is moved
    into the first of them (:func:`group_partitions`).

    Parameters
    ----------
    keys : list of ndarray of int64
        Each spill's sorted Hilbert keys.
    bounds_m : list of ndarray, shape (rows, 4)
        Each spill's bounding boxes [m], in the order of ``keys``.
    area_m2 : list of ndarray
        Each spill's footprint areas [m2], in the order of ``keys``.
    rows_per_part : int
        Target rows per partition [rows].
    min_overlap_share, min_area_ratio : float
        Duplicate thresholds [-] (:func:`pipeline.dedup.find_duplicates`).

    Returns
    -------
    list of list of (spill, start, stop, take, keys)
        Per partition, in key order (partitions left empty are dropped, but
        at least one is returned): the spill's number, the row range to
        read, the positions within it to take (None: all) and the keys of
        the rows taken.
    """
    from pipeline.dedup import candidate_groups

    starts = np.cumsum([0, *map(len, keys)])
    all_keys = np.concatenate(keys) if keys else np.empty(0, np.int64)
    edges = np.sort(all_keys)[rows_per_part::rows_per_part]
    by_key = np.searchsorted(edges, all_keys, "right")  # partition of each row's key range
    group = candidate_groups(np.concatenate([np.empty((0, 4)), *bounds_m]),
                             np.concatenate([np.empty(0), *area_m2]), min_overlap_share,
                             min_area_ratio, rows_per_part)
    home = group_partitions(by_key, group)
    moved = np.flatnonzero(home != by_key)
    log.info("ingest merge: %d of %d rows moved to keep %d groups of possible duplicates in one "
             "partition", len(moved), len(all_keys), len(np.unique(group[moved])))
    largest = int(np.bincount(group).max(initial=0))
    if largest > rows_per_part:
        log.warning("ingest merge: %d footprints form one group of possible duplicates, more "
                    "than a partition (dask.rows_per_partition = %d): their bounding boxes "
                    "overlap in a chain, or one footprint's box is far larger than the footprint "
                    "(a spike); its partition is merged as one larger task", largest,
                    rows_per_part)
    # per spill: where each partition's key range starts, and the spill's moved rows
    cuts = [np.searchsorted(by_key[a:b], np.arange(len(edges) + 2))
            for a, b in itertools.pairwise(starts)]
    moved_by_spill = [moved[(moved >= a) & (moved < b)] for a, b in itertools.pairwise(starts)]
    plan = []
    for part in range(len(edges) + 1):
        slices = []
        for n, k in enumerate(keys):
            a, b = int(cuts[n][part]), int(cuts[n][part + 1])
            mine = moved_by_spill[n]
            away, back = mine[by_key[mine] == part], mine[home[mine] == part]
            if len(away) or len(back):
                stay = np.ones(b - a, dtype=bool)
                stay[away - starts[n] - a] = False  # rows moved away lie in the key range
                rows = np.sort(np.r_[np.arange(a, b)[stay], back - starts[n]])
                if len(rows):
                    slices.append((n, int(rows[0]), int(rows[-1]) + 1, rows - rows[0], k[rows]))
            elif b > a:
                slices.append((n, a, b, None, k[a:b]))
        if slices or not plan:
            plan.append(slices)
    return plan


def group_partitions(partition: np.ndarray, group: np.ndarray) -> np.ndarray:
    """The partition each row is merged in: a group's rows all go to its first partition.

    Parameters
    ----------
    partition : ndarray of int
        Each row's partition by key range (partitions numbered in key order).
    group : ndarray of int
        Each row's group, as the position of a row of the group
        (:func:`pipeline.dedup.candidate_groups`).

    Returns
    -------
    ndarray of int
        ``partition``, with the rows of every group that spans several
        partitions moved to the smallest of them (the partition of the
        group's smallest key).
    """
    home = np.array(partition, copy=True)
    grouped = np.flatnonzero(group != np.arange(len(group)))
    in_group = np.zeros(len(group), dtype=bool)
    in_group[grouped] = in_group[group[grouped]] = True
    rows = np.flatnonzero(in_group)  # every row of a group of two or more
    np.minimum.at(home, group[rows], partition[rows])
    home[rows] = home[group[rows]]
    return home


def merge_partition(slices: list[tuple[str, int, int, np.ndarray | None, np.ndarray]],
                    min_overlap_share: float, min_area_ratio: float, source_order: list[str],
                    spill: str | None = None) -> tuple[pa.Table | str, gpd.GeoDataFrame, dict]:
    """One partition of ``ingest_buildings``: gather, sort, drop duplicates (a task).

    Parameters
    ----------
    slices : list of (spill, start, stop, take, keys)
        Row ranges of the spills (Arrow IPC, memory-mapped); ``take`` the
        positions within the range of the rows to read (None: all of them);
        ``keys`` the Hilbert keys of the rows read.
    min_overlap_share, min_area_ratio : float
        Duplicate thresholds [-] (:func:`pipeline.dedup.find_duplicates`).
    source_order : list of str
        Source names, most trusted first.
    spill : str, optional
        Write the table to this Arrow file and return its path instead.

    Returns
    -------
    tuple
        The partition as an Arrow table sorted by Hilbert key, without
        duplicates (or the file it was written to); the duplicates as
        rejected rows; GCJ-02 evidence counts by ordered pair of sources.
    """
    from pipeline.stream import _from_arrow, hand_over

    parts = []
    for path, a, b, take, _ in slices:
        # memory-mapped: only the slice's pages are read; take() below copies
        part = pa.ipc.open_file(pa.memory_map(path, "r")).read_all().slice(a, b - a)
        parts.append(part if take is None else part.take(pa.array(take, type=pa.int64())))
    table = pa.concat_tables(parts, promote_options="permissive")
    order = np.argsort(np.concatenate([s[4] for s in slices]), kind="stable")
    table = table.take(pa.array(order, type=pa.int64())).combine_chunks()
    frame = _from_arrow(table)
    dups = find_duplicates(frame, min_overlap_share, min_area_ratio, source_order)
    counts = {}
    names = [s for s in source_order if (frame["source"] == s).any()]
    for sa in names:
        for sb in names:
            if sa != sb:
                counts[(sa, sb)] = gcj02_evidence(frame[frame["source"].eq(sa)],
                                                  frame[frame["source"].eq(sb)])
    rejected = frame.loc[dups.index].copy()
    rejected["reason"] = duplicate_reasons(dups)
    rejected = rejected[REJECTED_COLUMNS]
    rejected.insert(4, "stage", "ingest")
    table = table.drop_columns(["original_attributes"])
    if len(dups):
        keep = np.ones(len(frame), dtype=bool)
        keep[frame.index.get_indexer(dups.index)] = False
        table = table.filter(pa.array(keep))
    return hand_over(table, spill), rejected, counts


def gcj02_warnings(buildings: gpd.GeoDataFrame, cfg: PipelineConfig) -> dict[str, list[str]]:
    """Warn about sources that look like GCJ-02 against another source.

    For every ordered pair of sources (A, B) counts A's footprints whose
    centre lies in one of B's as read and after converting A from GCJ-02 to
    WGS84 (:func:`pipeline.coords.gcj02_evidence`); when conversion gives at
    least ``ingest.gcj02_detect_min_matches`` and ``ingest.gcj02_detect_gain``
    times as many, A is logged as probably GCJ-02.

    Parameters
    ----------
    buildings : GeoDataFrame
        Kept footprints of all sources, working CRS.
    cfg : PipelineConfig
        Sources and thresholds.

    Returns
    -------
    dict
        Warning texts by source name.
    """
    by_src = {s.name: buildings[buildings["source"].eq(s.name)] for s in cfg.sources}
    counts = {(a.name, b.name): gcj02_evidence(by_src[a.name], by_src[b.name])
              for a in cfg.sources for b in cfg.sources
              if a.name != b.name and len(by_src[a.name]) and len(by_src[b.name])}
    return gcj02_verdicts(counts, cfg)


def gcj02_verdicts(counts: dict[tuple[str, str], tuple[int, int]], cfg: PipelineConfig
                   ) -> dict[str, list[str]]:
    """Warnings from GCJ-02 evidence counts (see :func:`gcj02_warnings`).

    Parameters
    ----------
    counts : dict
        ``{(a, b): (as_read, converted)}`` for ordered pairs of sources.
    cfg : PipelineConfig
        Sources and thresholds.

    Returns
    -------
    dict
        Warning texts by source name.
    """
    out: dict[str, list[str]] = {}
    for a in cfg.sources:
        for b in cfg.sources:
            if (a.name, b.name) not in counts:
                continue
            as_read, converted = counts[(a.name, b.name)]
            log.info("ingest: %s footprints inside %s footprints: %d as read, %d if %s were "
                     "GCJ-02", a.name, b.name, as_read, converted, a.name)
            if (converted >= cfg.ingest.gcj02_detect_min_matches
                    and converted >= cfg.ingest.gcj02_detect_gain * as_read):
                msg = (f"source {a.name} looks like GCJ-02 (Chinese map-service) coordinates: "
                       f"{converted} of its footprints fall inside {b.name} footprints after "
                       f"GCJ-02 -> WGS84 conversion, {as_read} as read; if {b.name} is WGS84, "
                       f"set sources[{a.name}].gcj02_to_wgs84: true")
                log.warning("ingest: %s", msg)
                out.setdefault(a.name, []).append(msg)
    return out


def duplicate_reasons(dups: pd.DataFrame) -> pd.Series:
    """Rejection reasons of duplicate footprints, naming the record kept.

    Parameters
    ----------
    dups : DataFrame
        Output of :func:`pipeline.dedup.find_duplicates`.

    Returns
    -------
    Series
        One reason per dropped footprint.
    """
    return pd.Series(
        [f"duplicate of {k} ({share:.0%} of the smaller footprint overlaps, area ratio "
         f"{ratio:.2f}; kept the richer record: richness {rk} vs {rd})"
         for k, share, ratio, rk, rd in zip(dups["kept_id"], dups["overlap_share"],
                                            dups["area_ratio"], dups["richness_kept"],
                                            dups["richness_dropped"], strict=True)],
        index=dups.index, dtype="object")


def reason_kind(reasons: pd.Series) -> pd.Series:
    """Reasons with record-specific parts removed, for counting by reason."""
    return reasons.str.replace(r"^duplicate of .*$", "duplicate of a richer footprint "
                               "(ingest.dedup_min_overlap_share, dedup_min_area_ratio)",
                               regex=True)


def _log_duplicates(dups: pd.DataFrame) -> None:
    if dups.empty:
        log.info("ingest: no duplicate footprints")
        return
    kept_src = dups["reason"].str.extract(r"^duplicate of ([^:]+):", expand=False)
    pairs = kept_src.fillna("?") + " kept over " + dups["source"].astype(str)
    log.info("ingest: %d duplicate footprints rejected (%s)", len(dups),
             ", ".join(f"{k}: {v}" for k, v in pairs.value_counts().items()))


def _unique_ids(source: str, source_id: pd.Series) -> np.ndarray:
    """``<source>:<source_id>``, with ``#n`` appended to repeated ids."""
    base = (source + ":" + source_id.fillna("row").astype(str)).to_numpy(dtype=object)
    repeated = pd.Series(base).duplicated(keep=False).to_numpy()
    if not repeated.any():  # the usual case; ranking 1M ids takes seconds
        return base
    dup_rank = np.zeros(len(base), dtype=np.int64)
    dup_rank[repeated] = pd.Series(base[repeated]).groupby(base[repeated]).cumcount().to_numpy()
    return np.where(dup_rank > 0, base + "#" + dup_rank.astype(str), base)


def concat_frames(frames: list[pd.DataFrame], crs: str | None) -> gpd.GeoDataFrame:
    """Stack the partitions' GeoDataFrames (one ``geometry`` column) into one.

    The geometries are stacked as plain arrays and the CRS set once: pandas
    would compare the CRS of every pair of partitions (~15 ms each).

    Parameters
    ----------
    frames : list of GeoDataFrame
        Partitions with the same columns.
    crs : str, optional
        CRS of the result (default: the first frame's).

    Returns
    -------
    GeoDataFrame
    """
    crs = crs if crs is not None else getattr(frames[0], "crs", None)
    plain = [pd.DataFrame(f).assign(geometry=np.asarray(f["geometry"].array, dtype=object))
             for f in frames]
    return gpd.GeoDataFrame(pd.concat(plain, ignore_index=True), geometry="geometry", crs=crs)


def _write_json_atomic(obj: object, path: Path) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp.write_text(json.dumps(obj, ensure_ascii=False, indent=2), encoding="utf-8")
    tmp.replace(path)
