"""Stage 5, report: district summaries, target verdicts, GeoPackage and Markdown.

Inputs: the yield stage's buildings (``capacity_kwp`` [kWp],
``capacity_policy_kwp`` [kWp], ``energy_mwh_per_year`` [MWh/yr],
``usable_area_m2`` [m2], ``footprint_area_m2`` [m2], ``building_type``,
``district_name``), the ingest stage's rejected features and accounting, the
district boundaries and the targets in the config.

Outputs

==============================  ========  ==========================================
column (layer)                  unit      meaning
==============================  ========  ==========================================
n_buildings (districts)         -         buildings in the input in the district
footprint_area_m2               m2        their footprint area
usable_area_m2                  m2        their usable roof area
capacity_mw                     MW        capacity on the whole usable area (DC)
capacity_policy_mw              MW        capacity at the policy coverage shares
energy_gwh_per_year             GWh/yr    AC energy of capacity_mw
rule_footprint_area_m2          m2        roof area of the rule's building types
rule_usable_share               -         their usable / footprint area
rule_n_below_share              -         rule buildings that cannot reach the share
rule_verdict                    -         reachable / not reachable / no buildings
target_required_mw              MW        the district's MW target
target_achievable_mw            MW        capacity of the target's eligible types
target_margin_mw                MW        achievable - required
target_share_needed             -         required / achievable
target_verdict                  -         reachable / not reachable from the input
==============================  ========  ==========================================

The ``targets`` table has one row per configured target with the same
``target_*`` fields; ``district_types`` one row per district and type.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import geopandas as gpd
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import shapely

from pipeline import changes, parallel
from pipeline.config import PipelineConfig, PolicyConfig, TargetConfig
from pipeline.footprints import FOOTPRINT_SUMMARY_COLUMNS
from pipeline.ingest import load_districts
from pipeline.io import atomic_path
from pipeline.roof_report import roof_sections
from pipeline.runs import check_geopackage, current, sha256_soon

log = logging.getLogger(__name__)

REACHABLE = "reachable"
NOT_REACHABLE = "not reachable from the buildings in the input"
NO_BUILDINGS = "no eligible buildings in the input"

SUMMARY_COLUMNS = {
    "n_buildings": ("building_id", "count"),
    "footprint_area_m2": ("footprint_area_m2", "sum"),
    "usable_area_m2": ("usable_area_m2", "sum"),
    "capacity_mw": ("capacity_kwp", "sum"),
    "capacity_policy_mw": ("capacity_policy_kwp", "sum"),
    "energy_gwh_per_year": ("energy_mwh_per_year", "sum"),
}


def summarise(buildings: pd.DataFrame, by: list[str]) -> pd.DataFrame:
    """Counts, areas, capacity and energy per group.

    Parameters
    ----------
    buildings : DataFrame
        Buildings with the yield-stage columns.
    by : list of str
        Grouping columns (e.g. ``["district_name", "building_type"]``).

    Returns
    -------
    DataFrame
        ``n_buildings``, ``footprint_area_m2`` [m2], ``usable_area_m2`` [m2],
        ``capacity_mw`` [MW], ``capacity_policy_mw`` [MW],
        ``energy_gwh_per_year`` [GWh/yr] per group.
    """
    g = buildings.groupby(by, dropna=False, observed=True).agg(**SUMMARY_COLUMNS)
    for col in ("capacity_mw", "capacity_policy_mw", "energy_gwh_per_year"):
        g[col] = g[col] / 1000.0
    g["n_buildings"] = g["n_buildings"].astype("int64")
    return g.reset_index()


def coverage_rule(buildings: pd.DataFrame, policy: PolicyConfig) -> pd.DataFrame:
    """Whether the roofs of the rule's building types can carry the rule's share.

    The district-level rule (e.g. Qingpu: government, school and factory roofs
    reach 50% PV coverage) is reachable where the usable roof area of those
    types is at least the share of their footprint area. Buildings whose own
    usable area is below the share are counted too.

    Parameters
    ----------
    buildings : DataFrame
        ``district_name``, ``building_type``, ``footprint_area_m2`` [m2],
        ``usable_area_m2`` [m2].
    policy : PolicyConfig
        ``coverage_rule_types`` and ``coverage_rule_share`` [-].

    Returns
    -------
    DataFrame
        Per district: ``rule_n_buildings``, ``rule_footprint_area_m2`` [m2],
        ``rule_required_area_m2`` [m2], ``rule_usable_area_m2`` [m2],
        ``rule_usable_share`` [-], ``rule_n_below_share``, ``rule_verdict``.
    """
    sel = buildings[buildings["building_type"].isin(policy.coverage_rule_types)].copy()
    share = policy.coverage_rule_share
    sel["required"] = share * sel["footprint_area_m2"]
    sel["below"] = sel["usable_area_m2"] < sel["required"] - 1e-9
    g = sel.groupby("district_name", observed=True).agg(
        rule_n_buildings=("building_id", "count"),
        rule_footprint_area_m2=("footprint_area_m2", "sum"),
        rule_required_area_m2=("required", "sum"),
        rule_usable_area_m2=("usable_area_m2", "sum"),
        rule_n_below_share=("below", "sum"),
    )
    g["rule_usable_share"] = g["rule_usable_area_m2"] / g["rule_footprint_area_m2"]
    g["rule_verdict"] = np.where(
        g["rule_usable_area_m2"] >= g["rule_required_area_m2"] - 1e-9, REACHABLE,
        "not reachable: usable roof area below the required share")
    g["rule_n_below_share"] = g["rule_n_below_share"].astype("int64")
    return g.reset_index()


def target_table(buildings: pd.DataFrame, targets: list[TargetConfig]) -> pd.DataFrame:
    """One row per MW target: required versus achievable capacity.

    Parameters
    ----------
    buildings : DataFrame
        ``district_name``, ``building_type``, ``capacity_kwp`` [kWp],
        ``capacity_policy_kwp`` [kWp], ``energy_mwh_per_year`` [MWh/yr].
    targets : list of TargetConfig
        The configured targets.

    Returns
    -------
    DataFrame
        ``target_id``, ``district_name``, ``period``, ``eligible_types``,
        ``target_required_mw`` [MW], ``n_eligible_buildings``,
        ``target_achievable_mw`` [MW], ``target_achievable_policy_mw`` [MW],
        ``target_margin_mw`` [MW], ``target_share_needed`` [-],
        ``target_energy_gwh_per_year`` [GWh/yr], ``target_verdict``, ``source``.
    """
    rows = []
    for t in targets:
        sel = buildings[(buildings["district_name"] == t.district_name)
                        & buildings["building_type"].isin(t.eligible_types)]
        achievable = float(sel["capacity_kwp"].sum()) / 1000.0
        n = int((sel["capacity_kwp"] > 0).sum())
        if n == 0:
            verdict = NO_BUILDINGS
        else:
            verdict = REACHABLE if achievable >= t.required_mw else NOT_REACHABLE
        rows.append({
            "target_id": t.id,
            "district_name": t.district_name,
            "period": t.period,
            "eligible_types": ",".join(t.eligible_types),
            "target_required_mw": t.required_mw,
            "n_eligible_buildings": n,
            "target_achievable_mw": achievable,
            "target_achievable_policy_mw": float(sel["capacity_policy_kwp"].sum()) / 1000.0,
            "target_margin_mw": achievable - t.required_mw,
            "target_share_needed": (t.required_mw / achievable) if achievable > 0 else np.inf,
            "target_energy_gwh_per_year": float(sel["energy_mwh_per_year"].sum()) / 1000.0,
            "target_verdict": verdict,
            "source": t.source,
        })
    return pd.DataFrame(rows)


def district_layer(districts: gpd.GeoDataFrame, buildings: pd.DataFrame,
                   policy: PolicyConfig, targets: pd.DataFrame) -> gpd.GeoDataFrame:
    """District polygons with their summary, coverage-rule and target verdicts.

    Parameters
    ----------
    districts : GeoDataFrame
        ``district_name``, ``district_adcode``, polygons.
    buildings : DataFrame
        The yield-stage buildings.
    policy : PolicyConfig
        The coverage rule.
    targets : DataFrame
        Output of :func:`target_table`.

    Returns
    -------
    GeoDataFrame
        One row per district; districts without buildings carry zeros and
        the verdict ``no eligible buildings in the input``.
    """
    summ = summarise(buildings, ["district_name"])
    rule = coverage_rule(buildings, policy)
    out = districts.merge(summ, on="district_name", how="left").merge(
        rule, on="district_name", how="left")
    for col in [*SUMMARY_COLUMNS, "rule_n_buildings", "rule_footprint_area_m2",
                "rule_required_area_m2", "rule_usable_area_m2", "rule_n_below_share"]:
        out[col] = out[col].fillna(0)
    for col in ("n_buildings", "rule_n_buildings", "rule_n_below_share"):
        out[col] = out[col].astype("int64")
    out["rule_name"] = policy.coverage_rule_name
    out["rule_verdict"] = out["rule_verdict"].fillna(NO_BUILDINGS)
    first = targets.drop_duplicates("district_name")[
        ["district_name", "target_id", "target_required_mw", "target_achievable_mw",
         "target_margin_mw", "target_share_needed", "target_verdict"]]
    out = out.merge(first, on="district_name", how="left")
    return gpd.GeoDataFrame(out, geometry="geometry", crs=districts.crs)


def assumptions(config_path: Path, sections: tuple[str, ...]) -> pd.DataFrame:
    """The assumptions of the named config sections with their cited sources.

    Sources are the comments written beside each key in the YAML file, so
    the value and its citation stay on one line.

    Parameters
    ----------
    config_path : Path
        The YAML config.
    sections : tuple of str
        Top-level sections to list.

    Returns
    -------
    DataFrame
        ``key`` (dotted path), ``value`` and ``source`` (the comment).
    """
    rows, stack = [], []
    pattern = re.compile(r"^(\s*)(-\s+)?([A-Za-z0-9_]+):\s*([^#]*?)\s*(?:#\s*(.*))?$")
    for line in config_path.read_text(encoding="utf-8").splitlines():
        m = pattern.match(line)
        if not m:
            continue
        indent, _, key, value, comment = m.groups()
        level = len(indent) // 2
        stack = stack[:level] + [key]
        if stack[0] in sections and value not in ("", "|", ">"):
            rows.append({"key": ".".join(stack), "value": value, "source": comment or ""})
    return pd.DataFrame(rows, columns=["key", "value", "source"])


def _md_table(frame: pd.DataFrame, floatfmt: str = "{:,.1f}") -> str:
    """A DataFrame as a GitHub Markdown table."""
    def fmt(v: object) -> str:
        if isinstance(v, float | np.floating):
            if np.isinf(v):
                return "∞"
            if np.isnan(v):
                return "–"
            return floatfmt.format(v)
        return str(v).replace("|", "\\|")

    head = "| " + " | ".join(map(str, frame.columns)) + " |"
    sep = "|" + "|".join("---" for _ in frame.columns) + "|"
    body = ["| " + " | ".join(fmt(v) for v in row) + " |"
            for row in frame.itertuples(index=False, name=None)]
    return "\n".join([head, sep, *body])


def write_geopackage(path: Path, layers: dict[str, pd.DataFrame],
                     layer_options: dict[str, dict] | None = None,
                     dataset_metadata: dict[str, str] | None = None) -> None:
    """Write layers to a GeoPackage atomically (all layers, or nothing).

    Parameters
    ----------
    path : Path
        The GeoPackage.
    layers : dict
        Layer name to (Geo)DataFrame; plain DataFrames become attribute tables.
    layer_options : dict, optional
        Layer name to GDAL GPKG layer creation options (``DESCRIPTION``, ``FID``).
    dataset_metadata : dict, optional
        GDAL dataset metadata, stored in ``gpkg_metadata``.
    """
    with atomic_path(path) as tmp:
        write_layers(tmp, layers, layer_options, dataset_metadata)
        check_geopackage(tmp)  # PRAGMA quick_check before it replaces the old one


def write_layers(path: Path, layers: dict[str, pd.DataFrame],
                 layer_options: dict[str, dict] | None = None,
                 dataset_metadata: dict[str, str] | None = None) -> None:
    """Write layers into a GeoPackage file, creating it or adding to it (not atomic).

    Parameters
    ----------
    path : Path
        The GeoPackage; when it exists (the buildings layer streamed by
        :func:`write_buildings_layer`) the layers are added to it.
    layers, layer_options, dataset_metadata
        As :func:`write_geopackage`; the dataset options and metadata apply
        only when the file is created here.
    """
    import pyogrio

    layer_options = layer_options or {}
    new_file = not Path(path).exists()
    for i, (name, frame) in enumerate(layers.items()):
        kwargs: dict = {"layer": name, "driver": "GPKG"}
        if name in layer_options:
            kwargs["layer_options"] = layer_options[name]
        if i == 0 and new_file:
            kwargs.update(_dataset_kwargs(dataset_metadata))
        if isinstance(frame, gpd.GeoDataFrame):
            type_ids = shapely.get_type_id(np.asarray(frame.geometry.array))
            types = set(np.unique(type_ids[type_ids >= 0]).tolist())  # -1: missing
            polygonal = types <= {shapely.GeometryType.POLYGON, shapely.GeometryType.MULTIPOLYGON}
            frame, geometry_kwargs = _layer_geometry(frame, polygonal if types else None)
            kwargs.update(geometry_kwargs)
        with sqlite_unsynced():
            pyogrio.write_dataframe(frame, path, use_arrow=True, **kwargs)  # arrow: ~2x faster


def _layer_geometry(frame: gpd.GeoDataFrame, polygonal: bool | None
                    ) -> tuple[gpd.GeoDataFrame, dict]:
    """A layer's frame and geometry options: polygons as MultiPolygon, else Unknown.

    ``polygonal`` None (no geometry at all) leaves the type to GDAL.
    """
    kwargs: dict = {"promote_to_multi": False}
    if polygonal is False:
        kwargs["geometry_type"] = "Unknown"
    elif polygonal:
        kwargs["geometry_type"] = "MultiPolygon"
        frame = frame.copy(deep=False)  # the columns are shared, not copied
        frame["geometry"] = _to_multi(frame.geometry)
    return frame, kwargs


def _dataset_kwargs(dataset_metadata: dict[str, str] | None) -> dict:
    # GeoPackage 1.2: read without warnings by older GDAL/QGIS (Debian 12: 3.6/3.22)
    kwargs: dict = {"dataset_options": {"VERSION": "1.2"}}
    if dataset_metadata:
        kwargs["dataset_metadata"] = dataset_metadata
    return kwargs


def write_buildings_layer(src: str, dst: str, plan_args: tuple, layer_options: dict,
                          dataset_metadata: dict[str, str] | None) -> int:
    """Stream the yield stage's buildings into a new GeoPackage, a row group at a time.

    Runs in a second process (:func:`pipeline.parallel.submit_background`)
    while the report stage computes the plan and writes the other outputs;
    the layer equals what :func:`write_layers` writes from the whole frame.

    Parameters
    ----------
    src : str
        ``yield_buildings.parquet``.
    dst : str
        The GeoPackage to create (the report's temporary file).
    plan_args : tuple
        :func:`pipeline.deliverables.building_plan_args`: the report's
        per-building columns are added batch by batch, with the existing PV
        systems' roof totals taken over all row groups first.
    layer_options : dict
        GDAL layer creation options of the ``buildings`` layer.
    dataset_metadata : dict, optional
        GDAL dataset metadata (provenance).

    Returns
    -------
    int
        Rows written.
    """
    import pyogrio

    from pipeline.deliverables import plan_buildings
    from pipeline.stream import _nulls_as_strings, read_partition
    from pipeline.targets import system_roof_totals

    pf = pq.ParquetFile(src)
    geo = json.loads(pf.metadata.metadata[b"geo"])
    name = geo["primary_column"]
    columns = _layer_columns(src)
    if plan_args[0] is not None:  # existing PV: a pass over all footprints first
        footprints = (read_partition(Path(src), [i], columns=["building_id", name])
                      for i in range(pf.metadata.num_row_groups))
        plan_args = (system_roof_totals(plan_args[0], footprints), *plan_args[1:])
    types = set(geo["columns"][name].get("geometry_types") or [])
    polygonal = bool(types) and types <= {"Polygon", "MultiPolygon"}
    # without existing PV or towns the plan's columns need no geometry: the stored WKB is
    # written as it is (polygons wrapped as one-part multipolygons), never decoded
    attributes_only = polygonal and plan_args[0] is None and plan_args[1] is None
    groups = [[i] for i in range(pf.metadata.num_row_groups)] or [[]]
    rows = 0

    def batches() -> Iterator[pa.RecordBatch]:
        nonlocal rows
        for group in groups:
            table = pf.read_row_groups(group, columns=columns) if attributes_only else None
            multi = multipolygon_wkb(table.column(name)) if table is not None else None
            if multi is not None:
                part = table.drop_columns([name]).to_pandas()
                part.index = pd.RangeIndex(rows, rows + len(part))
                part = plan_buildings(part, *plan_args)
            else:
                part = read_partition(Path(src), group, columns=columns)
                part.index = pd.RangeIndex(rows, rows + len(part))
                part, _ = _layer_geometry(plan_buildings(part, *plan_args), polygonal)
                multi = pa.array(shapely.to_wkb(np.asarray(part.geometry.array)), pa.binary())
                part = pd.DataFrame(part.drop(columns=part.geometry.name))
            out = pa.Table.from_pandas(part, preserve_index=False)
            out = out.cast(_nulls_as_strings(out.schema))  # GDAL has no null type
            rows += len(part)
            out = out.append_column(name, multi)
            yield from out.to_batches() or [pa.RecordBatch.from_pylist([], schema=out.schema)]

    # one stream, one layer creation: GDAL builds the spatial index once at the end (appending
    # batch by batch updated it row by row: 5.7 of 12.8 s at 1M buildings)
    stream = batches()
    first = next(stream)
    schema = first.schema

    def conformed() -> Iterator[pa.RecordBatch]:
        yield first
        for batch in stream:  # a later row group's all-null column is typed like the first's
            yield batch if batch.schema.equals(schema) else batch.cast(schema)

    with sqlite_unsynced():
        pyogrio.write_arrow(pa.RecordBatchReader.from_batches(schema, conformed()), dst,
                            layer="buildings", driver="GPKG", geometry_name=name,
                            geometry_type="MultiPolygon" if polygonal else "Unknown",
                            crs=_gdal_crs(geo["columns"][name]), layer_options=layer_options,
                            **_dataset_kwargs(dataset_metadata))
    return rows


class SecondProcesses:
    """The report's second processes: the buildings layer, the change list, the workbook.

    Attributes
    ----------
    streamed : Future or None
        :func:`write_buildings_layer` (None: the driver writes the layer).
    compared : Future or None
        The change list, started: :func:`pipeline.changes.building_changes_from_file`
        beside the layer, or :func:`pipeline.changes.building_changes_from_snapshot`
        after it.
    waiting : bool
        With fewer than ``report.changes_process_min_cores`` cores, or with
        existing PV, the change list waits for the driver's snapshot
        (:meth:`provide`) and for the buildings layer, then runs in the same
        second process.
    workbook : Future or None
        :func:`pipeline.workbook.write_workbook`, in a worker of the run's
        process pool once the driver has the sheets (None: the driver writes it).
    """

    def __init__(self) -> None:
        self.streamed: Any = None
        self.compared: Any = None
        self.workbook: Any = None
        self.waiting = False
        self._args: tuple | None = None
        self._lock = threading.RLock()

    def defer(self) -> None:
        """Compare the buildings once the driver's snapshot and the buildings layer are written.

        The layer's future starts it from the thread that completes it if the
        snapshot is there; :meth:`provide` if the layer is; :meth:`poll` and
        :meth:`change_list` if neither could.
        """
        self.waiting = True
        self.streamed.add_done_callback(lambda _: self.poll())

    def provide(self, args: tuple) -> None:
        """The arguments of :func:`pipeline.changes.building_changes_from_snapshot`."""
        with self._lock:
            self._args = args
            self.poll()

    @property
    def compares(self) -> bool:
        """Whether a second process compares the buildings (else the driver does)."""
        return self.compared is not None or self.waiting

    def poll(self) -> None:
        """Start the waiting change list if its snapshot and the buildings layer are written."""
        with self._lock:
            if (self.waiting and self._args is not None and self.streamed.done()
                    and self.streamed.exception() is None):
                self.compared = parallel.submit_background(
                    changes.building_changes_from_snapshot, *self._args)
                self.waiting = False

    def change_list(self) -> changes.BuildingChanges:
        """Wait for the change list (starting it after the layer if it waits for it)."""
        if self.compared is None:
            self.streamed.result()  # raises what the layer's writer raised
            self.poll()
        return self.compared.result()

    def stop(self) -> None:
        """Cancel what has not started and wait for what has (errors are not raised)."""
        with self._lock:
            self.waiting = False
        for future in (self.streamed, self.compared, self.workbook):
            if future is not None:
                future.cancel()
                with contextlib.suppress(Exception):
                    future.result()


#: GDAL configuration of writes into the report's temporary GeoPackage: no rollback journal and
#: no fsync per transaction. A failed run removes the temporary file, so a journal could never
#: be used to recover it; the finished file is checked (:func:`pipeline.runs.check_geopackage`)
#: before it replaces the old one. At 1M buildings: 9.7 s instead of 11.0 s.
SQLITE_WRITE_OPTIONS = {"OGR_SQLITE_JOURNAL": "OFF", "OGR_SQLITE_SYNCHRONOUS": "OFF"}


@contextlib.contextmanager
def sqlite_unsynced() -> Iterator[None]:
    """GDAL writes GeoPackages without journal or fsync inside (:data:`SQLITE_WRITE_OPTIONS`)."""
    import pyogrio

    old = {k: pyogrio.get_gdal_config_option(k) for k in SQLITE_WRITE_OPTIONS}
    pyogrio.set_gdal_config_options(SQLITE_WRITE_OPTIONS)
    try:
        yield
    finally:
        pyogrio.set_gdal_config_options(old)


#: little-endian 2D WKB headers (byte order 1, then the type as uint32)
_WKB_POLYGON = b"\x01\x03\x00\x00\x00"
_WKB_MULTIPOLYGON = b"\x01\x06\x00\x00\x00"


def multipolygon_wkb(wkb: pa.ChunkedArray) -> pa.Array | None:
    """2D little-endian Polygon WKB as one-part MultiPolygon WKB, in Arrow.

    A one-part MultiPolygon is the MultiPolygon header, the part count 1 and
    the polygon's own WKB, which is what ``shapely.to_wkb`` gives for
    ``shapely.multipolygons([polygon])``; MultiPolygons are kept as they are.

    Parameters
    ----------
    wkb : pyarrow.ChunkedArray
        WKB geometries.

    Returns
    -------
    pyarrow.Array or None
        The MultiPolygon WKB; None if any geometry is not a 2D
        little-endian Polygon or MultiPolygon (the caller decodes those).
    """
    import pyarrow.compute as pc

    arr = wkb.combine_chunks() if isinstance(wkb, pa.ChunkedArray) else wkb
    arr = arr.cast(pa.binary())
    head = pc.binary_slice(arr, 0, 5)
    is_poly = pc.fill_null(pc.equal(head, pa.scalar(_WKB_POLYGON, pa.binary())), False)
    is_multi = pc.fill_null(pc.equal(head, pa.scalar(_WKB_MULTIPOLYGON, pa.binary())), False)
    if not pc.all(pc.or_(is_poly, is_multi)).as_py():
        return None
    wrapped = pc.binary_join_element_wise(
        pa.scalar(_WKB_MULTIPOLYGON + (1).to_bytes(4, "little"), pa.binary()), arr,
        pa.scalar(b"", pa.binary()))
    return pc.if_else(is_poly, wrapped, arr)


def _gdal_crs(column: dict) -> str | None:
    """The CRS of a GeoParquet geometry column as pyogrio's GeoDataFrame writer gives it."""
    from pipeline.stream import cached_crs

    if column.get("crs") is None:
        return None
    crs = cached_crs(column["crs"])
    epsg = crs.to_epsg()
    return f"EPSG:{epsg}" if epsg else crs.to_wkt("WKT1_GDAL")


def _to_multi(geoms: gpd.GeoSeries) -> gpd.GeoSeries:
    out = np.array(geoms.array, dtype=object)
    is_poly = shapely.get_type_id(out) == shapely.GeometryType.POLYGON
    out[is_poly] = shapely.multipolygons(out[is_poly], indices=np.arange(int(is_poly.sum())))
    return gpd.GeoSeries(out, index=geoms.index, crs=geoms.crs)


def run(cfg: PipelineConfig, base_dir: Path, config_path: Path) -> dict:
    """Report stage runner: GeoPackage, Markdown and HTML reports, workbook.

    Writes ``rooftop_pv.gpkg`` (styled for QGIS, with provenance),
    ``report.md``, ``report.html`` and ``rooftop_pv.xlsx``; the plan
    (existing PV, ranked roofs, town split, CO2) is :mod:`pipeline.deliverables`.

    Parameters
    ----------
    cfg : PipelineConfig
        The run's configuration.
    base_dir : Path
        Project root.
    config_path : Path
        The config file (its comments carry the assumptions' sources).

    Returns
    -------
    dict
        The targets table as records.
    """
    from pipeline import deliverables as dv
    from pipeline.html_report import register_cjk_font
    from pipeline.provenance import metadata_items, provenance

    t0 = time.perf_counter()
    steps: dict[str, float] = {}

    def step(name: str, since: list[float] = [t0]) -> None:  # noqa: B006  (the lap clock)
        now = time.perf_counter()
        steps[name] = now - since[0]
        since[0] = now

    font = register_cjk_font(cfg.report.cjk_font_files)  # fail before writing anything
    proc = base_dir / cfg.paths.processed_dir
    outdir = base_dir / cfg.paths.outputs_dir
    src = proc / "yield_buildings.parquet"
    districts = load_districts(cfg.districts, cfg.working_crs, base_dir, cfg.targets)
    prov = provenance(cfg, config_path, base_dir)
    prov.update(changes.run_provenance())  # run id of pipeline.runs, when in a run
    inputs = dv.plan_inputs(cfg, base_dir, districts)
    n_rows = pq.ParquetFile(src).metadata.num_rows
    background = (n_rows >= cfg.report.geopackage_process_min_buildings
                  and parallel.n_workers() > 1)
    with contextlib.ExitStack() as outputs:
        # every output is written to a temporary file; all four replace the old ones together
        # at the end, and none does if anything fails
        tmp = {name: outputs.enter_context(atomic_path(outdir / name)) for name in
               ("rooftop_pv.gpkg", "report.md", "report.html", "rooftop_pv.xlsx")}
        second = SecondProcesses()
        if background:  # the buildings layer, the largest, is written meanwhile
            second.streamed = parallel.submit_background(
                write_buildings_layer, str(src), str(tmp["rooftop_pv.gpkg"]),
                dv.building_plan_args(cfg, *inputs), dv.layer_options(["buildings"])["buildings"],
                metadata_items(prov))
        # and the buildings are compared with the previous run's in a second process too
        if (background and inputs[0] is None
                and parallel.available_cores() >= cfg.report.changes_process_min_cores):
            # beside the layer, from the yield file; not with existing PV, whose roofs'
            # capacities the plan changes (towns change no compared column)
            second.compared = parallel.submit_background(
                changes.building_changes_from_file, *changes.building_changes_args(cfg, src))
        elif background and changes.run_dirs()[1] is not None:
            # few cores, or existing PV: the driver writes the snapshot into the run's folder
            # (with existing PV after the plan), the second process compares it once the
            # buildings layer is written
            second.defer()
        try:
            result = _report(cfg, base_dir, config_path, src, districts, prov, inputs, font,
                             tmp, second, step)
        except BaseException:
            second.stop()  # let them stop writing before their files are removed
            raise
    step("replace")
    log.info("report: %d buildings, %d districts, %d targets, %d ranked roofs, %d rejected "
             "in %.1f s", *result["counts"], time.perf_counter() - t0)
    log.info("report steps [s]: %s", ", ".join(f"{k} {v:.1f}" for k, v in steps.items()))
    return {"targets": result["targets"]}


def _report(cfg: PipelineConfig, base_dir: Path, config_path: Path, src: Path,
            districts: gpd.GeoDataFrame, prov: dict, inputs: tuple, font: str,
            tmp: dict[str, Path], second: SecondProcesses, step: Any) -> dict:
    """The report stage's work, into the temporary output files of :func:`run`.

    ``second`` holds the second processes' futures; where one is None the
    driver does that work itself.
    """
    from pipeline import deliverables as dv
    from pipeline.footprints import Footprints
    from pipeline.provenance import metadata_items
    from pipeline.stream import read_columns
    from pipeline.targets import district_extras
    from pipeline.workbook import write_workbook

    proc = base_dir / cfg.paths.processed_dir
    streamed = second.streamed
    # the footprints stay on disk: the driver reads the columns the report uses, and the
    # footprints a row group at a time (their keys and bounds kept; the ranked roofs' and the
    # map's read back, all of them again where existing PV or towns join them), and the
    # buildings layer is streamed from the yield file, here or in a second process
    buildings = read_columns(src, [c for c in report_columns(src) if c != "geometry"])
    footprints = Footprints.scan(src)
    rejected = gpd.read_parquet(proc / "ingest_rejected.parquet")
    accounting = json.loads((proc / "ingest_accounting.json").read_text(encoding="utf-8"))
    kept = sum(a["kept"] for a in accounting.values())
    if kept != len(buildings):
        raise RuntimeError(f"accounting broken: ingest kept {kept} buildings but the yield "
                           f"stage has {len(buildings)}")
    step("read")
    if second.waiting and inputs[0] is None:
        second.provide(changes.snapshot_for_comparison(buildings, cfg, src, footprints))
        step("snapshot")
    plan = dv.prepare_plan(cfg, base_dir, buildings, districts, inputs, footprints)
    buildings, targets = plan.buildings, plan.targets
    dlayer = district_extras(district_layer(districts, buildings, cfg.policy, targets), targets,
                             cfg.plan.grid_emission_factor_t_co2_per_mwh)
    by_type = summarise(buildings, ["district_name", "building_type"])
    step("plan")
    if second.waiting and inputs[0] is not None:  # the capacities net of existing PV
        second.provide(changes.snapshot_for_comparison(buildings, cfg, src, footprints))
        step("snapshot")
    table = assumptions(config_path, ASSUMPTION_SECTIONS)
    sheets = dv.workbook_sheets(plan, dlayer, by_type, table, prov)
    if streamed is not None and parallel.local_processes():
        # another worker of the pool writes the workbook while the driver writes the reports
        # and the GeoPackage's other layers (the sheets are sent without geometry)
        second.workbook = parallel.submit_background(
            write_workbook, tmp["rooftop_pv.xlsx"],
            {k: pd.DataFrame(v.drop(columns="geometry", errors="ignore"))
             for k, v in sheets.items()})
    else:
        write_workbook(tmp["rooftop_pv.xlsx"], sheets)
    step("workbook")
    second.poll()
    monthly = monthly_energy(buildings)
    md = render_markdown(cfg, config_path, buildings, dlayer, targets, by_type, accounting,
                         base_dir)
    md += "\n" + dv.plan_markdown(cfg, plan, monthly, prov)
    step("markdown")
    second.poll()
    dv.write_html(tmp["report.html"], cfg, plan, dlayer, by_type, monthly, accounting,
                  table, rule_view(cfg, dlayer), prov, font)
    step("html")
    second.poll()
    if not second.compares:
        part = changes.building_changes(
            changes.snapshot(buildings, changes.sources_without_id(cfg), footprints.keys),
            *changes.run_dirs(), src, footprints.crs)
        step("changes")
    layers = {
        "buildings": buildings,
        "districts": dlayer,
        "targets": pd.DataFrame(targets),
        "district_types": by_type,
        "target_plan": plan.plan,
        "rejected": rejected,
    }
    if plan.towns is not None:
        layers["towns"] = plan.towns
        layers["town_targets"] = plan.split
    if plan.systems is not None:
        layers["existing_pv"] = plan.systems
    # the styles name the fields of the whole buildings layer, as it is written
    fields = {"buildings": layer_fields(src, buildings)}
    gpkg = tmp["rooftop_pv.gpkg"]
    written = dict(layers)
    if streamed is not None:
        rows = streamed.result()
    else:  # in this process, a row group at a time
        rows = write_buildings_layer(
            str(src), str(gpkg), dv.building_plan_args(cfg, *inputs),
            dv.layer_options(["buildings"])["buildings"], metadata_items(prov))
    if rows != len(buildings):
        raise RuntimeError(f"{gpkg}: the buildings layer has {rows} rows, the report "
                           f"{len(buildings)}")
    step("geopackage buildings" + (" (wait)" if streamed is not None else ""))
    second.poll()  # the change list starts now, if it waited for the layer
    written.pop("buildings")
    # the plan's layers are written while the buildings are compared; the change layers and
    # the styles of all layers follow
    write_layers(gpkg, written, dv.layer_options(written), metadata_items(prov))
    step("geopackage")
    if second.compares:
        part = second.change_list()
        step("changes (wait)")
    change_layers, change_md = changes.report_changes(dlayer, part)
    tmp["report.md"].write_text(md + "\n" + change_md, encoding="utf-8")
    layers.update(change_layers)
    layers, options = dv.geopackage_layers(layers, cfg.plan.report_top_n, fields)
    write_layers(gpkg, {k: v for k, v in layers.items()
                        if k not in written and k != "buildings"}, options, metadata_items(prov))
    if current() is not None:  # for the run record, hashed beside the check (the file is final)
        sha256_soon(gpkg)
    check_geopackage(gpkg)  # PRAGMA quick_check before it replaces the old one
    step("geopackage changes")
    if second.workbook is not None:
        second.workbook.result()
        step("workbook (wait)")
    return {"targets": targets.to_dict("records"),
            "counts": (len(buildings), len(dlayer), len(targets), len(plan.plan),
                       len(rejected))}


#: Yield-stage columns that only the ``buildings`` layer shows: no summary, table, chart or
#: other layer of the report reads them, so the driver does not read them: the layer is
#: streamed from the file (:func:`write_buildings_layer`; at 1M buildings 39 of 74 columns,
#: read in ~2 s instead of 4-5 s, and ~0.3 GB less memory). ``tests/test_end_to_end.py`` checks
#: that the outputs stay the same.
BUILDINGS_LAYER_ONLY_COLUMNS = (
    "source_id", "district_adcode", "name_en", "tag_building", "tag_amenity", "tag_office",
    "tag_landuse", "tag_government", "tag_industrial", "tag_building_use", "tag_shop",
    "tag_tourism", "tag_roof_shape", "land_use_code", "class_field", "subtype_field",
    "addr_street", "height_attr_m", "levels_attr", "attribute_issues", "geometry_repaired",
    "type_confidence", "type_evidence", "type_conflict", "raster_height_m", "setback_m",
    "setback_area_m2", "utilisation_factor", "tilt_deg", "azimuth_deg", "azimuth_2_deg",
    "usable_area_2_m2", "capacity_2_kwp", "capacity_policy_2_kwp", "unshaded_share_2")


def report_columns(src: Path) -> list[str]:
    """The columns of the yield stage's file that the report reads besides the buildings layer.

    Parameters
    ----------
    src : Path
        ``yield_buildings.parquet``.

    Returns
    -------
    list of str
        Its columns in file order (with the geometry), without
        :data:`BUILDINGS_LAYER_ONLY_COLUMNS` and the footprints' summaries
        (:data:`pipeline.footprints.FOOTPRINT_SUMMARY_COLUMNS`, read by the scan).
    """
    return [c for c in _layer_columns(src) if c not in BUILDINGS_LAYER_ONLY_COLUMNS]


def _layer_columns(src: Path) -> list[str]:
    """The yield file's columns but the footprints' summaries (the geometry included).

    :data:`pipeline.footprints.FOOTPRINT_SUMMARY_COLUMNS` are read by the footprint scan.
    """
    return [c for c in pq.read_schema(src).names if c not in FOOTPRINT_SUMMARY_COLUMNS]


def layer_fields(src: Path, buildings: pd.DataFrame) -> list[str]:
    """The fields of the buildings layer written from ``src`` (the plan's columns appended).

    Parameters
    ----------
    src : Path
        ``yield_buildings.parquet``.
    buildings : DataFrame
        The plan's buildings read with :func:`report_columns`.

    Returns
    -------
    list of str
        The file's columns, then the ones the plan adds, without the geometry
        and the footprints' summaries.
    """
    names = _layer_columns(src)
    return [c for c in [*names, *(c for c in buildings.columns if c not in names)]
            if c != "geometry"]


#: Config sections whose keys the reports list as assumptions.
ASSUMPTION_SECTIONS = ("ingest", "heights", "roof", "shading", "policy", "weather", "yield",
                       "plan")


def monthly_energy(buildings: pd.DataFrame) -> pd.DataFrame:
    """Monthly AC energy per district, shading and existing PV included.

    Parameters
    ----------
    buildings : DataFrame
        Yield-stage buildings with ``energy_m01_mwh`` ... ``energy_m12_mwh`` [MWh].

    Returns
    -------
    DataFrame
        Index ``district_name``; the twelve monthly columns and
        ``energy_mwh_per_year`` [MWh].
    """
    cols = [f"energy_m{m:02d}_mwh" for m in range(1, 13)]
    out = buildings.groupby("district_name", observed=True)[cols].sum()
    out["energy_mwh_per_year"] = out[cols].sum(axis=1)
    return out


def rule_view(cfg: PipelineConfig, dlayer: gpd.GeoDataFrame) -> pd.DataFrame:
    """The coverage-rule rows worth showing: districts with rule buildings or a target.

    Parameters
    ----------
    cfg : PipelineConfig
        The run's configuration.
    dlayer : GeoDataFrame
        Output of :func:`district_layer`.

    Returns
    -------
    DataFrame
        ``district_name`` and the ``rule_*`` columns.
    """
    rule_cols = ["district_name", "rule_n_buildings", "rule_footprint_area_m2",
                 "rule_usable_area_m2", "rule_usable_share", "rule_n_below_share", "rule_verdict"]
    view = dlayer[dlayer["rule_n_buildings"] > 0][rule_cols]
    named = dlayer[dlayer["district_name"].isin([t.district_name for t in cfg.targets])][rule_cols]
    return pd.DataFrame(pd.concat([view, named]).drop_duplicates("district_name"))


def render_markdown(cfg: PipelineConfig, config_path: Path, buildings: pd.DataFrame,
                    dlayer: gpd.GeoDataFrame, targets: pd.DataFrame, by_type: pd.DataFrame,
                    accounting: dict, base_dir: Path) -> str:
    """The Markdown report.

    Parameters
    ----------
    cfg : PipelineConfig
        The run's configuration.
    config_path : Path
        The config file, for the assumptions and their sources.
    buildings, dlayer, targets, by_type : DataFrame
        The report tables.
    accounting : dict
        Ingest accounting per source.
    base_dir : Path
        Project root (for the classifier evaluation written by the classify stage).

    Returns
    -------
    str
        The report text.
    """
    now = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        f"# Rooftop PV potential: {cfg.name}",
        "",
        f"Generated {now} from `{config_path.as_posix()}`.",
        "",
        "> **Data coverage.** " + cfg.report.coverage_caveat.strip(),
        "",
        "## Targets",
        "",
        _md_table(targets[["target_id", "district_name", "period", "target_required_mw",
                           "n_eligible_buildings", "target_achievable_mw",
                           "target_achievable_policy_mw", "target_margin_mw",
                           "target_share_needed", "target_verdict"]],
                  floatfmt="{:,.2f}"),
        "",
        f"## Roof-coverage rule: {cfg.policy.coverage_rule_name}",
        "",
        f"Building types: {', '.join(cfg.policy.coverage_rule_types)}; required share of roof "
        f"area under PV: {cfg.policy.coverage_rule_share:.0%}.",
        "",
    ]
    active = dlayer[dlayer["n_buildings"] > 0]
    lines += [_md_table(rule_view(cfg, dlayer), floatfmt="{:,.2f}"), ""]
    lines += ["## Districts", "",
              _md_table(pd.DataFrame(active[["district_name", *SUMMARY_COLUMNS]])), "",
              "## By district and building type", "", _md_table(by_type), ""]
    counts = (buildings.groupby(["building_type", "type_source"], observed=True)
              .size().rename("n_buildings").reset_index())
    lines += ["## Classification evidence", "", _md_table(counts), ""]
    evaluation = base_dir / cfg.paths.processed_dir / "classify_evaluation.md"
    if evaluation.is_file():
        lines += ["## Classifier evaluation on labelled sets", "",
                  "Per-class precision and recall of the rules on labelled buildings "
                  "(`python -m pipeline.classify_eval`).", "",
                  evaluation.read_text(encoding="utf-8"), ""]
    acc_rows = [{"source": k, "read": v["read"], "kept": v["kept"], "rejected": v["rejected"]}
                for k, v in accounting.items()]
    total = {"source": "total", **{c: sum(r[c] for r in acc_rows)
                                   for c in ("read", "kept", "rejected")}}
    lines += ["## Input accounting", "",
              "Every feature read is kept as a building or listed in the `rejected` layer "
              "with its reason (read = kept + rejected).", "",
              _md_table(pd.DataFrame([*acc_rows, total])), ""]
    reasons = [{"source": k, "reason": r, "n": n}
               for k, v in accounting.items() for r, n in v["rejected_by_reason"].items()]
    if reasons:
        lines += ["Rejections by reason:", "", _md_table(pd.DataFrame(reasons)), ""]
    lines += roof_sections(buildings, _md_table, cfg.shading.min_unshaded_share)
    lines += ["## Assumptions", "",
              "Each value is a key of the config; its source is the comment beside it.", "",
              _md_table(assumptions(config_path, ASSUMPTION_SECTIONS)),
              ""]
    return "\n".join(lines)
