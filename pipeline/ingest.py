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

import json
import logging
import re
import time
from pathlib import Path

import geopandas as gpd
import numpy as np
import pandas as pd
import shapely

from pipeline.columns import map_unique, records_json
from pipeline.config import DistrictsConfig, PipelineConfig, SourceConfig
from pipeline.errors import InputError
from pipeline.glossary import ATTRIBUTE_COLUMNS
from pipeline.io import read_vector, write_parquet_atomic
from pipeline.parallel import map_partitions

log = logging.getLogger(__name__)

NUMERIC_ATTRIBUTES = ("height_attr_m", "levels_attr")
POLYGONAL = ("Polygon", "MultiPolygon")
#: shapely type ids to the geometry type names GEOS reports
_GEOM_TYPE_NAMES = {0: "Point", 1: "LineString", 2: "LinearRing", 3: "Polygon", 4: "MultiPoint",
                    5: "MultiLineString", 6: "MultiPolygon", 7: "GeometryCollection"}
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


def _canonical(raw: gpd.GeoDataFrame, src: SourceConfig, path: Path) -> gpd.GeoDataFrame:
    """Map a source's fields to the canonical attribute columns."""
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
    out["original_attributes"] = _records_json(raw[attr_cols])
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
    districts = load_districts(cfg.districts, cfg.working_crs, base_dir)
    parts, accounting = [], {}
    for src in cfg.sources:
        ts = time.perf_counter()
        raw = read_source(src, base_dir)
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

    kept = allf[allf["role"].eq("building")].drop(columns=["role", "reason",
                                                           "original_attributes"])
    cols = ["building_id", "source", "source_id", "district_name", "district_adcode",
            *ATTRIBUTE_COLUMNS, "footprint_area_m2", "geometry_repaired", "geometry"]
    kept = kept[cols].reset_index(drop=True)
    areas = allf[allf["role"].eq("area")][["building_id", "source", "source_id",
                                           *ATTRIBUTE_COLUMNS, "geometry"]]
    pois = allf[allf["role"].eq("poi")][["building_id", "source", "source_id",
                                         *ATTRIBUTE_COLUMNS, "geometry"]].copy()
    pois["poi_category"] = (pois["tag_amenity"].fillna(pois["tag_office"])
                            .fillna(pois["tag_shop"]).fillna(pois["tag_tourism"])
                            .fillna(pois["class_field"]))
    rejected = allf[allf["reason"].notna()][
        ["building_id", "source", "source_id", "name", "reason", "original_attributes",
         "geometry"]].copy()
    rejected.insert(4, "stage", "ingest")

    for src in cfg.sources:
        sel = allf["source"].eq(src.name)
        by_reason = allf.loc[sel & allf["reason"].notna(), "reason"].value_counts()
        accounting[src.name] = {
            "read": int(sel.sum()),
            "kept": int((sel & allf["role"].eq("building")).sum()),
            "rejected": int((sel & allf["reason"].notna()).sum()),
            "rejected_by_reason": {str(k): int(v) for k, v in by_reason.items()},
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
