"""Stage 1, ingest: footprints from every source into one metric frame.

Reads each configured source (any GDAL vector format or GeoParquet, an
OpenStreetMap extract through GDAL's OSM driver, or footprints traced from
building-height rasters), maps its fields to the canonical attribute columns,
repairs what ``make_valid`` can turn into a polygon, reprojects to the one
metric working CRS and assigns each footprint to the district its centroid
lies in. Every feature read is either kept or rejected with a reason.

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

import json
import logging
import re
import time
from pathlib import Path

import geopandas as gpd
import numpy as np
import pandas as pd
import shapely

from pipeline.attributes import check_attribute_ranges, clean_text, join_notes, parse_numbers
from pipeline.config import DistrictsConfig, PipelineConfig, SourceConfig, TargetConfig
from pipeline.coords import check_extent, convert_gcj02_frame, gcj02_evidence
from pipeline.dedup import find_duplicates
from pipeline.errors import ConfigError, InputError
from pipeline.glossary import ATTRIBUTE_COLUMNS
from pipeline.io import read_vector, write_parquet_atomic
from pipeline.parallel import map_partitions

log = logging.getLogger(__name__)

NUMERIC_ATTRIBUTES = ("height_attr_m", "levels_attr")
POLYGONAL = ("Polygon", "MultiPolygon")
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


def _canonical(raw: gpd.GeoDataFrame, src: SourceConfig, path: Path) -> gpd.GeoDataFrame:
    """Map a source's fields to the canonical attribute columns."""
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
    out["original_attributes"] = _records_json(raw[attr_cols])
    return gpd.GeoDataFrame(out, geometry=raw.geometry.to_numpy(), crs=raw.crs)


def _id_text(values: np.ndarray) -> list[str | None]:
    """Ids as text; integral floats lose their '.0'."""
    out: list[str | None] = []
    for v in values:
        if v is None or (isinstance(v, float) and np.isnan(v)):
            out.append(None)
        elif isinstance(v, float | np.floating) and float(v).is_integer():
            out.append(str(int(v)))
        else:
            out.append(str(v))
    return out


def _records_json(frame: pd.DataFrame) -> list[str]:
    """Each row's non-null attributes as a JSON object."""
    cols = list(frame.columns)
    out = []
    for row in frame.itertuples(index=False, name=None):
        rec = {}
        for c, v in zip(cols, row, strict=True):
            if v is None or (isinstance(v, float) and np.isnan(v)) or v is pd.NA:
                continue
            rec[c] = v if isinstance(v, str | int | float | bool) else str(v)
        out.append(json.dumps(rec, ensure_ascii=False, default=str))
    return out


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
    geom = shapely.force_2d(geom)
    gtype = np.array([g.geom_type if g is not None else "" for g in geom], dtype=object)
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
    _log_duplicates(allf, dups)

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
    out: dict[str, list[str]] = {}
    by_src = {s.name: buildings[buildings["source"].eq(s.name)] for s in cfg.sources}
    for a in cfg.sources:
        for b in cfg.sources:
            if a.name == b.name or len(by_src[a.name]) == 0 or len(by_src[b.name]) == 0:
                continue
            as_read, converted = gcj02_evidence(by_src[a.name], by_src[b.name])
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


def _log_duplicates(allf: pd.DataFrame, dups: pd.DataFrame) -> None:
    if dups.empty:
        log.info("ingest: no duplicate footprints")
        return
    src_of = dict(zip(allf["building_id"], allf["source"], strict=True))
    pairs = pd.Series([f"{src_of[k]} kept over {s}" for k, s in
                       zip(dups["kept_id"], allf.loc[dups.index, "source"], strict=True)])
    log.info("ingest: %d duplicate footprints rejected (%s)", len(dups),
             ", ".join(f"{k}: {v}" for k, v in pairs.value_counts().items()))


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
