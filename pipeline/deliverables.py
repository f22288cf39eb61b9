"""The planner deliverables of the report stage, put together.

:func:`prepare_plan` applies existing PV, CO2, the town assignment and the
target ranking to the yield-stage buildings; :func:`geopackage_layers` adds
the default QGIS styles and layer descriptions; :func:`plan_markdown`,
:func:`write_html` and :func:`workbook_sheets` render the plan for people.
``pipeline.report.run`` calls them in that order.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import geopandas as gpd
import numpy as np
import pandas as pd

from pipeline import html_report as hr
from pipeline import styles
from pipeline import targets as tg
from pipeline.footprints import Footprints
from pipeline.parallel import map_partitions

log = logging.getLogger(__name__)

PLAN_COLUMNS = ["target_id", "priority_rank", "building_id", "name", "district_name",
                "town_name", "building_type", "type_source", "capacity_kwp",
                "specific_yield_kwh_per_kwp", "energy_mwh_per_year", "co2_avoided_t_per_year",
                "cumulative_mw", "in_target_list", "geometry"]

LAYER_DESCRIPTIONS = {
    "buildings": "Buildings of the input with type, usable roof, capacity, yield and CO2 "
                 "(rooftop-pv)",
    "districts": "Districts with summaries and target / coverage-rule verdicts",
    "rejected": "Input features not kept as buildings, with the reason",
    "target_plan": "Roofs ranked toward each target; in_target_list marks the roofs that "
                   "reach it",
    "towns": "Sub-district units with their share of the district target",
    "existing_pv": "Existing and planned PV systems, with the roof and district they count in",
    "targets": "One row per MW target: required, existing, achievable, roofs to reach it",
    "district_types": "Summary per district and building type",
    "town_targets": "District targets split across towns in proportion to potential",
    "changes": "Buildings added, removed or changed (geometry, type, capacity) since the "
               "previous run",
    "changes_districts": "Per district: buildings added, removed, changed; capacity and "
                         "energy deltas; verdicts that flipped since the previous run",
    "run": "The run that wrote this file (outputs/runs/<run_id>/manifest.json)",
}


#: Column of the ranked roofs (not written) holding each roof's row in the yield file.
FILE_ROW = "file_row"


@dataclass
class Plan:
    """Everything the planner deliverables show, computed once."""

    buildings: gpd.GeoDataFrame
    targets: pd.DataFrame
    plan: gpd.GeoDataFrame
    systems: gpd.GeoDataFrame | None
    towns: gpd.GeoDataFrame | None
    split: pd.DataFrame | None
    footprints: Footprints | None = None


def prepare_plan(cfg: object, base_dir: Path, buildings: gpd.GeoDataFrame,
                 districts: gpd.GeoDataFrame, inputs: tuple | None = None,
                 footprints: Footprints | None = None) -> Plan:
    """Existing PV, CO2, towns, targets and the ranked roofs.

    Parameters
    ----------
    cfg : PipelineConfig
        The run's configuration.
    base_dir : Path
        Directory relative paths resolve against.
    buildings : GeoDataFrame
        Yield-stage buildings.
    districts : GeoDataFrame
        District polygons (working CRS).
    inputs : tuple, optional
        :func:`plan_inputs`, when already read.
    footprints : Footprints, optional
        The buildings' footprints on disk (:mod:`pipeline.footprints`), when
        ``buildings`` holds none (a DataFrame in file order, default index):
        the ranked roofs' are read back, and with existing PV or towns, which
        join footprints, all of them a row group at a time.

    Returns
    -------
    Plan
        The adjusted buildings and the plan tables.
    """
    from pipeline.report import target_table

    plan_cfg = cfg.plan
    density = cfg.roof.module_power_density_w_per_m2
    raw, towns = inputs if inputs is not None else plan_inputs(cfg, base_dir, districts)
    pairs = None
    if raw is not None:  # over all buildings, before the partitions split them
        raw = tg.system_roof_totals(raw, [buildings] if footprints is None else
                                    with_footprints(buildings[["building_id"]], footprints))
    args = building_plan_args(cfg, raw, towns)
    if raw is None and towns is None:
        buildings = plan_buildings(buildings, *args)  # columns only: no partitions needed
    elif footprints is None:
        buildings = map_partitions(buildings, plan_buildings, *args)
    else:
        buildings, pairs = plan_row_groups(buildings, footprints, args)
    systems = split = None
    if raw is not None:
        systems = tg.locate_existing_pv(raw, buildings, districts, density, pairs)
        log.info("existing PV: %d systems, %.1f MW, %.0f m2 of roof taken", len(systems),
                 systems["pv_capacity_kwp"].sum() / 1000,
                 buildings["existing_pv_area_m2"].sum())
    if towns is not None:
        split = tg.town_split(buildings, towns, cfg.targets)
        towns = tg.town_layer(towns, buildings, split)
    existing = (tg.existing_toward_targets(systems, cfg.targets) if systems is not None
                else tg.existing_toward_targets(_no_systems(), cfg.targets))
    remaining = tg.remaining_mw(cfg.targets, existing)
    # with the footprints on disk each ranked roof carries its row in the file, to read its
    # footprint back (matching 2M building ids took 1.3 s)
    ranked = tg.target_plan(buildings if footprints is None else buildings.assign(
                                **{FILE_ROW: np.arange(len(buildings), dtype=np.int64)}),
                            remaining, cfg.targets, plan_cfg.ranking_order,
                            plan_cfg.type_priority)
    targets = tg.plan_targets(target_table(buildings, cfg.targets), existing, ranked, buildings,
                              cfg.targets, tg.priority_types(plan_cfg.type_priority),
                              plan_cfg.grid_emission_factor_t_co2_per_mwh)
    cols = [c for c in PLAN_COLUMNS if c in ranked.columns]
    if footprints is None:
        plan = gpd.GeoDataFrame(ranked[cols], geometry="geometry", crs=buildings.crs)
    else:  # the ranked roofs' footprints, by their rows in the file
        plan = gpd.GeoDataFrame(ranked[cols], crs=footprints.crs,
                                geometry=footprints.take(ranked[FILE_ROW].to_numpy()).to_numpy())
    return Plan(buildings=buildings, targets=targets, plan=plan, systems=systems, towns=towns,
                split=split, footprints=footprints)


def plan_inputs(cfg: object, base_dir: Path, districts: gpd.GeoDataFrame
                ) -> tuple[gpd.GeoDataFrame | None, gpd.GeoDataFrame | None]:
    """The existing-PV systems and the towns of the config, read (None when not set).

    Parameters
    ----------
    cfg : PipelineConfig
        The run's configuration.
    base_dir : Path
        Directory relative paths resolve against.
    districts : GeoDataFrame
        District polygons (working CRS).

    Returns
    -------
    tuple
        Output of :func:`pipeline.targets.read_existing_pv` and of
        :func:`pipeline.targets.read_towns`, or None for each.
    """
    plan_cfg = cfg.plan
    raw = (tg.read_existing_pv(plan_cfg.existing_pv, cfg.working_crs, base_dir)
           if plan_cfg.existing_pv is not None else None)
    towns = (tg.read_towns(plan_cfg.towns, districts, cfg.working_crs, base_dir)
             if plan_cfg.towns is not None else None)
    return raw, towns


def building_plan_args(cfg: object, raw: gpd.GeoDataFrame | None,
                       towns: gpd.GeoDataFrame | None) -> tuple:
    """Arguments of :func:`plan_buildings` after the partition, from the config.

    ``raw`` are the systems as read; the caller adds their roof totals over
    all buildings (:func:`pipeline.targets.system_roof_totals`).
    """
    return (raw, towns, cfg.roof.module_power_density_w_per_m2, cfg.roof.min_array_area_m2,
            cfg.plan.grid_emission_factor_t_co2_per_mwh)


def plan_buildings(part: gpd.GeoDataFrame, systems: gpd.GeoDataFrame | None,
                   towns: gpd.GeoDataFrame | None, power_density_w_per_m2: float,
                   min_array_area_m2: float, factor_t_co2_per_mwh: float,
                   pairs: pd.DataFrame | None = None) -> gpd.GeoDataFrame:
    """Kernel: the report's per-building columns (existing PV, CO2, town).

    The report's ``buildings`` layer is the yield stage's buildings with
    these columns; the same kernel serves the whole frame and the batches
    the GeoPackage writer streams.

    Parameters
    ----------
    part : GeoDataFrame
        Yield-stage buildings.
    systems : GeoDataFrame or None
        Existing or planned PV with their roof totals over all buildings
        (:func:`pipeline.targets.system_roof_totals`).
    towns : GeoDataFrame or None
        Towns (:func:`pipeline.targets.read_towns`).
    power_density_w_per_m2 : float
        Module power per module area [W/m2].
    min_array_area_m2 : float
        Smallest array left on a roof after existing PV [m2].
    factor_t_co2_per_mwh : float
        Grid emission factor [t/MWh].
    pairs : DataFrame, optional
        :func:`pipeline.targets.pv_roof_pairs` of ``part``, when already computed.

    Returns
    -------
    GeoDataFrame
        ``part`` with ``existing_pv_area_m2`` [m2], ``existing_pv_kwp``
        [kWp] (capacity and energy net of existing PV),
        ``co2_avoided_t_per_year`` [t/yr] and, with towns, ``town_name``.
    """
    if systems is not None:
        part = tg.subtract_existing_pv(part, systems, power_density_w_per_m2,
                                       min_array_area_m2, pairs)
    else:
        part = part.copy(deep=False)  # new columns only: the others are shared
        part["existing_pv_area_m2"] = 0.0
        part["existing_pv_kwp"] = 0.0
    part["co2_avoided_t_per_year"] = tg.co2_avoided_t(
        part["energy_mwh_per_year"].to_numpy(dtype=float), factor_t_co2_per_mwh)
    if towns is not None:
        part = tg.assign_towns(part, towns)
    return part


def with_footprints(buildings: pd.DataFrame, footprints: Footprints
                    ) -> Iterator[gpd.GeoDataFrame]:
    """The buildings a row group at a time, with their footprints read from disk.

    Parameters
    ----------
    buildings : DataFrame
        Rows of the footprints' file, in file order.
    footprints : Footprints
        Their footprints (:mod:`pipeline.footprints`).

    Yields
    ------
    GeoDataFrame
        The rows of one row group (labels kept) with their footprints; one
        empty frame for a file without rows.
    """
    if len(buildings) != len(footprints):
        raise ValueError(f"{footprints.path}: {len(footprints)} footprints for "
                         f"{len(buildings)} buildings")
    empty = True
    for rows, geoms in footprints.row_groups():
        empty = False
        yield gpd.GeoDataFrame(buildings.iloc[rows], geometry=geoms, crs=footprints.crs,
                               copy=False)
    if empty:
        yield gpd.GeoDataFrame(buildings.iloc[:0], geometry=np.empty(0, dtype=object),
                               crs=footprints.crs)


def plan_row_groups(buildings: pd.DataFrame, footprints: Footprints, args: tuple
                    ) -> tuple[pd.DataFrame, pd.DataFrame | None]:
    """:func:`plan_buildings` a row group at a time, the footprints read from disk.

    The same columns and values as over the whole frame: every building's
    existing PV comes from the systems' totals over all buildings, and towns
    are assigned building by building.

    Parameters
    ----------
    buildings : DataFrame
        Yield-stage buildings without footprints, in file order, default index.
    footprints : Footprints
        Their footprints.
    args : tuple
        :func:`building_plan_args`, the systems with their roof totals.

    Returns
    -------
    buildings : DataFrame
        ``buildings`` with the plan's columns.
    pairs : DataFrame or None
        :func:`pipeline.targets.pv_roof_pairs` of all buildings, ``building``
        the row position (None without existing PV).
    """
    systems, density = args[0], args[2]
    done, pairs = [], []
    for part in with_footprints(buildings, footprints):
        here = tg.pv_roof_pairs(part, systems, density) if systems is not None else None
        if here is not None:
            pairs.append(here)
        out = plan_buildings(part, *args, here)
        done.append(pd.DataFrame(out.drop(columns=out.geometry.name)))
    return pd.concat(done), (pd.concat(pairs, ignore_index=True) if pairs else None)


def _no_systems() -> pd.DataFrame:
    return pd.DataFrame({"district_name": pd.Series(dtype=object),
                         "pv_year": pd.Series(dtype="int64"),
                         "building_type": pd.Series(dtype=object),
                         "pv_capacity_kwp": pd.Series(dtype=float)})


def geopackage_layers(layers: dict[str, pd.DataFrame], label_top_n: int,
                      fields: dict[str, list[str]] | None = None) -> tuple[dict, dict]:
    """Add the ``layer_styles`` table and the layer descriptions.

    Parameters
    ----------
    layers : dict
        Layer name to (Geo)DataFrame, as written.
    label_top_n : int
        Ranked roofs labelled with their rank in QGIS.
    fields : dict, optional
        Layer name to the fields of the layer as written, for a frame that
        holds only some of them (the ``buildings`` layer that another process
        writes, :func:`pipeline.report.write_buildings_layer`).

    Returns
    -------
    tuple of dict
        The layers with ``layer_styles`` last, and the layer creation options.
    """
    qml = {"buildings": lambda c, f: styles.buildings_qml(
               c, float(np.nanpercentile(f["capacity_kwp"], 95)) if len(f) else 1.0),
           "districts": lambda c, f: styles.districts_qml(c),
           "rejected": lambda c, f: styles.rejected_qml(c),
           "target_plan": lambda c, f: styles.target_plan_qml(c, label_top_n),
           "towns": lambda c, f: styles.towns_qml(c),
           "existing_pv": lambda c, f: styles.existing_pv_qml(c)}
    entries = {}
    for name, frame in layers.items():
        cols = [c for c in frame.columns if c != "geometry"]
        if fields and name in fields:
            cols = list(fields[name])
        # the buildings layer has footprints also when the frame holds none (it is written
        # from the yield file, pipeline.report.write_buildings_layer)
        spatial = isinstance(frame, gpd.GeoDataFrame) or name == "buildings"
        make = qml.get(name, lambda c, f: styles.table_qml(c))
        entries[name] = ("geom" if spatial else "", make(cols, frame))
    out = dict(layers)
    out["layer_styles"] = styles.layer_styles_table(entries)
    options = layer_options(layers)
    options["layer_styles"] = {"FID": "id", "DESCRIPTION": "QGIS default layer styles"}
    return out, options


def layer_options(names: Iterable[str]) -> dict[str, dict[str, str]]:
    """GDAL layer creation options of the report's layers: their descriptions.

    Parameters
    ----------
    names : iterable of str
        Layer names.

    Returns
    -------
    dict
        Layer name to ``{"DESCRIPTION": ...}`` for the layers that have one.
    """
    return {name: {"DESCRIPTION": LAYER_DESCRIPTIONS[name]} for name in names
            if name in LAYER_DESCRIPTIONS}


def _target_lines(t: pd.Series) -> str:
    share = t["target_share_reachable"]
    txt = (f"{t['target_id']} ({t['district_name']}, {t['period']}): target "
           f"{t['target_required_mw']:,.1f} MW; existing or planned PV counted "
           f"{t['target_existing_mw']:,.2f} MW; still to build {t['target_remaining_mw']:,.2f} MW; "
           f"the eligible roofs of the input carry {t['target_achievable_mw']:,.2f} MW, so the "
           f"input reaches {share:.1%} of the target.")
    if t["target_remaining_mw"] > 0 and t["target_achievable_mw"] >= t["target_remaining_mw"]:
        txt += (f" The {t['n_roofs_to_target']:,} top-ranked roofs "
                f"({t['mw_roofs_to_target']:,.2f} MW) reach it.")
    elif t["target_remaining_mw"] > 0:
        txt += (f" All {t['n_roofs_to_target']:,} ranked roofs together fall short by "
                f"{-t['target_margin_mw']:,.2f} MW.")
    txt += (f" The priority types ({t['priority_types'] or 'none'}) alone reach "
            f"{t['target_share_priority_types']:.1%} of what is still to build.")
    return txt


PLAN_TABLE_COLUMNS = ["priority_rank", "building_id", "name", "building_type",
                      "capacity_kwp", "specific_yield_kwh_per_kwp", "cumulative_mw",
                      "in_target_list"]


def plan_markdown(cfg: object, p: Plan, monthly: pd.DataFrame, prov: dict) -> str:
    """The report sections on the path to each target, towns, existing PV and CO2.

    Parameters
    ----------
    cfg : PipelineConfig
        The run's configuration.
    p : Plan
        Output of :func:`prepare_plan`.
    monthly : DataFrame
        Monthly energy by district (``pvyield.monthly_profile``).
    prov : dict
        Provenance (``pipeline.provenance.provenance``).

    Returns
    -------
    str
        Markdown text (appended to ``report.render_markdown``).
    """
    from pipeline.report import _md_table

    pc = cfg.plan
    lines = ["## Path to each target", "",
             f"Roofs are ranked by `{pc.ranking_order}` (config `plan.ranking_order`; type "
             f"priority {', '.join(pc.type_priority)}). `in_target_list` marks the shortest "
             "ranked list of roofs that reaches what is still to build; the GeoPackage layer "
             "`target_plan` and the workbook list every ranked roof.", ""]
    for _, t in p.targets.iterrows():
        lines += [f"### {t['target_id']}", "", _target_lines(t), ""]
        ranked = p.plan[p.plan["target_id"] == t["target_id"]].head(pc.report_top_n)
        if len(ranked):
            view = pd.DataFrame(ranked[PLAN_TABLE_COLUMNS]).fillna({"name": ""})
            lines += [_md_table(view, floatfmt="{:,.2f}"), ""]
    if p.split is not None:
        lines += ["## Targets split across towns", "",
                  "Each district target is split across its towns in proportion to the capacity "
                  "of the target's eligible types on their roofs.", "",
                  _md_table(p.split, floatfmt="{:,.2f}"), ""]
    if p.systems is not None:
        s = pd.DataFrame(p.systems.drop(columns="geometry"))
        lines += ["## Existing and planned PV", "",
                  f"{len(s)} systems, {s['pv_capacity_kwp'].sum() / 1000:,.2f} MW; their roof "
                  "area is taken off the free roof, and they count toward the targets whose "
                  "period holds their year.", "", _md_table(s, floatfmt="{:,.1f}"), ""]
    energy = float(p.buildings["energy_mwh_per_year"].sum())
    lines += ["## Carbon", "",
              f"The capacity on all roofs of the input would generate {energy / 1000:,.1f} GWh "
              f"a year and avoid {energy * pc.grid_emission_factor_t_co2_per_mwh / 1000:,.1f} kt "
              f"CO2 a year at {pc.grid_emission_factor_t_co2_per_mwh} t CO2/MWh "
              "(`plan.grid_emission_factor_t_co2_per_mwh`).", ""]
    cols = [f"energy_m{m:02d}_mwh" for m in range(1, 13)]
    total = monthly[cols].sum()
    lines += ["## Monthly generation (all buildings, typical year)", "",
              _md_table(pd.DataFrame({"month": list(hr.MONTHS),
                                      "energy_mwh": total.to_numpy(dtype=float)})), ""]
    lines += ["## Provenance", "", f"rooftop-pv {prov['pipeline_version']}, run "
              f"{prov['run_time_utc']}, config `{prov['config_path']}` (sha256 "
              f"{str(prov['config_sha256'])[:16]}…).", "",
              _md_table(pd.DataFrame([{"input": k, "path": v["path"],
                                       "sha256": (v["sha256"] or "missing")[:16]}
                                      for k, v in prov["inputs"].items()])), ""]
    return "\n".join(lines)


def write_html(path: Path, cfg: object, p: Plan, dlayer: gpd.GeoDataFrame,
               by_type: pd.DataFrame, monthly: pd.DataFrame, accounting: dict,
               assumptions: pd.DataFrame, rule_view: pd.DataFrame, prov: dict, family: str
               ) -> None:
    """Write the self-contained HTML report atomically.

    Parameters
    ----------
    path : Path
        The HTML file.
    cfg : PipelineConfig
        The run's configuration.
    p : Plan
        Output of :func:`prepare_plan`.
    dlayer : GeoDataFrame
        The districts layer.
    by_type : DataFrame
        Summary per district and type.
    monthly : DataFrame
        Monthly energy by district [MWh].
    accounting : dict
        Ingest accounting per source.
    assumptions : DataFrame
        ``report.assumptions`` of the config.
    rule_view : DataFrame
        The coverage-rule rows shown.
    prov : dict
        Provenance.
    family : str
        CJK font family (``html_report.register_cjk_font``).
    """
    from pipeline.io import atomic_path

    t = p.targets
    first_target = cfg.targets[0].id if cfg.targets else None
    pc = cfg.plan
    energy = float(p.buildings["energy_mwh_per_year"].sum())
    kpis = [("buildings in the input 输入建筑", f"{len(p.buildings):,}"),
            ("capacity 装机潜力", f"{p.buildings['capacity_kwp'].sum() / 1000:,.1f} MW"),
            ("generation 年发电量", f"{energy / 1000:,.1f} GWh/yr"),
            ("CO2 avoided 年减排", f"{energy * pc.grid_emission_factor_t_co2_per_mwh / 1000:,.1f}"
             " kt/yr")]
    tcols = ["target_id", "district_name", "period", "target_required_mw", "target_existing_mw",
             "target_remaining_mw", "target_achievable_mw", "target_share_reachable",
             "n_roofs_to_target", "target_verdict"]
    sections = [
        ("目标 Targets", [hr.table(t[tcols]), hr.figure(hr.targets_chart_png(t, family),
                                                          "achievable versus target MW")]
         + [hr.paragraph(_target_lines(row)) for _, row in t.iterrows()]),
        ("地图 Maps", [hr.figure(hr.districts_map_png(dlayer, p.buildings, family,
                                                      footprints=p.footprints),
                                 "map of districts and buildings")]
         + ([hr.figure(hr.buildings_map_png(p.buildings, p.plan, first_target, family,
                                            footprints=p.footprints),
                       "map of buildings around the first roofs")] if first_target else [])),
    ]
    plan_frags = [hr.paragraph(
        f"Roofs ranked by {pc.ranking_order} (type priority: {', '.join(pc.type_priority)}). "
        f"The first {pc.report_top_n} of each target are listed; the GeoPackage layer "
        "target_plan and the workbook hold all of them.")]
    for _, row in t.iterrows():
        ranked = p.plan[p.plan["target_id"] == row["target_id"]].head(pc.report_top_n)
        plan_frags += [f"<h3>{row['target_id']} · {row['district_name']}</h3>",
                       hr.table(pd.DataFrame(ranked[PLAN_TABLE_COLUMNS]))]
    sections.append(("达标路径 Path to each target", plan_frags))
    if p.split is not None:
        sections.append(("街镇分解 Targets split across towns", [hr.table(p.split)]))
    if p.systems is not None:
        sections.append(("已建在建光伏 Existing and planned PV",
                         [hr.table(pd.DataFrame(p.systems.drop(columns="geometry")))]))
    g = by_type.groupby("building_type", observed=True)[
        ["n_buildings", "capacity_mw", "energy_gwh_per_year"]].sum().reset_index()
    sections += [
        ("按建筑类型 Capacity by building type",
         [hr.figure(hr.types_chart_png(by_type, family), "capacity by building type"),
          hr.table(g)]),
        ("月发电量 Monthly generation",
         [hr.figure(hr.monthly_chart_png(monthly, [x.district_name for x in cfg.targets],
                                         family), "monthly generation")]),
        (f"屋顶覆盖率规定 Roof-coverage rule: {cfg.policy.coverage_rule_name}",
         [hr.table(rule_view)]),
        ("区县汇总 Districts",
         [hr.table(pd.DataFrame(dlayer[dlayer["n_buildings"] > 0][
             ["district_name", "n_buildings", "usable_area_m2", "capacity_mw",
              "energy_gwh_per_year", "co2_avoided_kt_per_year"]]))]),
    ]
    acc = [{"source": k, "read": v["read"], "kept": v["kept"], "rejected": v["rejected"]}
           for k, v in accounting.items()]
    acc.append({"source": "total", **{c: sum(r[c] for r in acc)
                                      for c in ("read", "kept", "rejected")}})
    sections += [
        ("输入核算 Input accounting",
         [hr.paragraph("Every feature read is kept as a building or listed in the rejected "
                       "layer with its reason (read = kept + rejected)."),
          hr.table(pd.DataFrame(acc))]),
        ("假设 Assumptions", [hr.paragraph("Each value is a key of the config; its source is "
                                           "the comment beside it."), hr.table(assumptions)]),
        ("来源 Provenance", [hr.table(pd.DataFrame(
            [{"input": k, "path": v["path"], "sha256": v["sha256"] or "missing"}
             for k, v in prov["inputs"].items()]))]),
    ]
    page = hr.render_html(f"屋顶光伏潜力 Rooftop PV potential: {cfg.name}",
                          cfg.report.coverage_caveat.strip(), sections, kpis,
                          f"rooftop-pv {prov['pipeline_version']} · run {prov['run_time_utc']}"
                          f" · config {prov['config_path']} (sha256 {prov['config_sha256']})")
    with atomic_path(path) as tmp:
        tmp.write_text(page, encoding="utf-8")


def workbook_sheets(p: Plan, dlayer: gpd.GeoDataFrame, by_type: pd.DataFrame,
                    assumptions: pd.DataFrame, prov: dict) -> dict[str, pd.DataFrame]:
    """The workbook's sheets: the GeoPackage tables without geometry.

    Parameters
    ----------
    p : Plan
        Output of :func:`prepare_plan`.
    dlayer : GeoDataFrame
        The districts layer.
    by_type : DataFrame
        Summary per district and type.
    assumptions : DataFrame
        The config's assumptions with sources.
    prov : dict
        Provenance.

    Returns
    -------
    dict
        Sheet name to table.
    """
    sheets = {"targets": p.targets, "target_plan": p.plan, "districts": dlayer,
              "district_types": by_type}
    if p.towns is not None:
        sheets["towns"] = p.towns
        sheets["town_targets"] = p.split
    if p.systems is not None:
        sheets["existing_pv"] = p.systems
    sheets["assumptions"] = assumptions
    sheets["provenance"] = pd.DataFrame(
        [{"item": k, "value": v} for k, v in prov.items() if k != "inputs"]
        + [{"item": f"input {k}", "value": json.dumps(v, ensure_ascii=False)}
           for k, v in prov["inputs"].items()])
    return sheets
