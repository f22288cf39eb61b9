"""The path to each target: existing PV, ranked roofs, town split and CO2.

Runs inside the report stage, after the yield stage, on the yield-stage
buildings. Existing and planned PV systems (an optional layer) take their
roof area off the free roof and count toward the targets whose period holds
their year; a system over several footprints splits by its roof area on each
out of its roof area on all of them, computed once over all buildings
(:func:`system_roof_totals`), so the partitions' results add up to the whole
frame's however the buildings are split. The remaining MW of each target are
reached by ranking the eligible roofs in the configured order; where a layer
of sub-district units (towns, streets, development zones) is given, each
district target is split across them in proportion to their potential.

Inputs and outputs
------------------

===================================  ========  ==============================================
column                               unit      meaning
===================================  ========  ==============================================
in: ``usable_area_m2``               m2        usable roof area (roof stage)
in: ``gcr``, ``coverage_share``      -         ground coverage ratio, policy share
in: ``specific_yield_kwh_per_kwp``   kWh/kWp   annual AC yield (yield stage)
in (existing PV): capacity, year     kWp, -    ``plan.existing_pv`` field mapping
out: ``existing_pv_area_m2``         m2        roof area taken by existing or planned PV
out: ``existing_pv_kwp``             kWp       their capacity on the roof
out: ``usable_area_m2`` ...          m2, kWp   reduced by ``existing_pv_area_m2``: usable
                                               area, module area, capacity, policy area,
                                               policy capacity and the energy columns
out: ``co2_avoided_t_per_year``      t/yr      ``energy_mwh_per_year`` x grid factor
out (plan): ``priority_rank``        -         1 = first roof to build for the target
out (plan): ``cumulative_mw``        MW        capacity of this roof and all ranked above
out (plan): ``in_target_list``       -         the roof belongs to the shortest ranked
                                               prefix that reaches the remaining MW
out (towns): ``town_potential_mw``   MW        capacity of the target's eligible types
out (towns): ``town_target_mw``      MW        the town's share of the district target
===================================  ========  ==============================================
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import geopandas as gpd
import numpy as np
import pandas as pd
import shapely
from pydantic import BaseModel, ConfigDict, Field, model_validator

from pipeline.classify import BUILDING_TYPES
from pipeline.errors import InputError
from pipeline.io import read_vector

if TYPE_CHECKING:
    from pipeline.config import TargetConfig

log = logging.getLogger(__name__)

#: Town name given to the buildings of a district outside every town polygon.
OUTSIDE_TOWNS = "(outside the towns layer)"


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ExistingPvConfig(_Model):
    """Optional layer of installed or planned PV systems (polygons or points)."""

    path: Path
    layer: str | None = None
    id_field: str
    capacity_field_kwp: str
    year_field: str
    status_field: str | None = None
    crs_if_missing: str | None = None


class TownsConfig(_Model):
    """Optional layer of sub-district units (towns, streets, development zones)."""

    path: Path
    layer: str | None = None
    name_field: str
    district_field: str | None = None
    crs_if_missing: str | None = None


class PlanConfig(_Model):
    """How roofs are ranked toward a target, and the optional plan inputs.

    Attributes
    ----------
    ranking_order : {"capacity", "specific_yield", "type_priority"}
        ``capacity``: largest roofs first (reaches a target with the fewest
        buildings); ``specific_yield``: best kWh/kWp first, then capacity;
        ``type_priority``: by ``type_priority`` order, then capacity.
    type_priority : list of str
        Building types in priority order for ``type_priority``.
    grid_emission_factor_t_co2_per_mwh : float
        CO2 avoided per MWh of PV generation [t/MWh].
    report_top_n : int
        Ranked roofs listed per target in the report.
    existing_pv, towns : optional
        The optional input layers.
    """

    ranking_order: Literal["capacity", "specific_yield", "type_priority"]
    type_priority: list[str]
    grid_emission_factor_t_co2_per_mwh: float = Field(gt=0, le=2)
    report_top_n: int = Field(ge=1)
    existing_pv: ExistingPvConfig | None = None
    towns: TownsConfig | None = None

    @model_validator(mode="after")
    def _check(self) -> PlanConfig:
        unknown = [t for t in self.type_priority if t not in BUILDING_TYPES]
        if unknown:
            raise ValueError(f"plan.type_priority: unknown building type(s) {unknown}")
        if len(set(self.type_priority)) != len(self.type_priority):
            raise ValueError("plan.type_priority: a type is listed twice")
        return self


# --------------------------------------------------------------------------- periods


def parse_period(period: str) -> tuple[int, int]:
    """First and last year of a target period.

    Parameters
    ----------
    period : str
        ``"2024"`` or ``"2021-2025"``.

    Returns
    -------
    tuple of int
        ``(first_year, last_year)``.

    Raises
    ------
    ValueError
        If the period is not a year or a year range.
    """
    m = re.fullmatch(r"\s*(\d{4})\s*(?:[-–]\s*(\d{4}))?\s*", str(period))
    if not m:
        raise ValueError(f"target period {period!r} is not a year (2024) or a range (2021-2025)")
    first = int(m.group(1))
    last = int(m.group(2) or first)
    if last < first:
        raise ValueError(f"target period {period!r} ends before it starts")
    return first, last


# --------------------------------------------------------------------------- existing PV


def read_existing_pv(cfg: ExistingPvConfig, working_crs: str, base_dir: Path
                     ) -> gpd.GeoDataFrame:
    """Read the installed or planned PV systems into the working CRS.

    Parameters
    ----------
    cfg : ExistingPvConfig
        Path and field mapping.
    working_crs : str
        The metric working CRS.
    base_dir : Path
        Directory relative paths resolve against.

    Returns
    -------
    GeoDataFrame
        ``pv_id``, ``pv_capacity_kwp`` [kWp], ``pv_year``, ``pv_status`` and
        point or polygon geometry.

    Raises
    ------
    InputError
        Missing field, missing CRS, or a capacity or year that is missing or
        not positive (naming the system).
    """
    path = cfg.path if cfg.path.is_absolute() else base_dir / cfg.path
    raw = read_vector(path, layer=cfg.layer)
    for key in ("id_field", "capacity_field_kwp", "year_field", "status_field"):
        field = getattr(cfg, key)
        if field is not None and field not in raw.columns:
            raise InputError(path, f"field {field!r} not in the existing-PV layer", field=field,
                             fix=f"set plan.existing_pv.{key} to one of {list(raw.columns)}")
    if raw.crs is None:
        if cfg.crs_if_missing is None:
            raise InputError(path, "the existing-PV layer has no CRS", field="crs",
                             fix="set plan.existing_pv.crs_if_missing to its CRS")
        raw = raw.set_crs(cfg.crs_if_missing)
    kwp = pd.to_numeric(raw[cfg.capacity_field_kwp], errors="coerce")
    year = pd.to_numeric(raw[cfg.year_field], errors="coerce")
    ids = raw[cfg.id_field].astype(str)
    for values, field, what in ((kwp, cfg.capacity_field_kwp, "capacity in kWp"),
                                (year, cfg.year_field, "year")):
        bad = ~(values > 0)
        if bad.any():
            raise InputError(path, f"{int(bad.sum())} system(s) without a positive {what} "
                             f"(e.g. {cfg.id_field}={ids[bad].iloc[0]})", field=field,
                             fix="fill the field for every system or remove those systems")
    kinds = set(raw.geometry.dropna().geom_type)
    if raw.geometry.isna().any() or not kinds <= {"Point", "Polygon", "MultiPolygon"}:
        raise InputError(path, f"geometries must be points or polygons (found {sorted(kinds)} "
                         "or empty ones)", field="geometry",
                         fix="give each system a point or its array outline")
    status = (raw[cfg.status_field].astype(str) if cfg.status_field
              else pd.Series("installed", index=raw.index))
    return gpd.GeoDataFrame(
        {"pv_id": ids.to_numpy(), "pv_capacity_kwp": kwp.to_numpy(dtype=float),
         "pv_year": year.to_numpy(dtype="int64"), "pv_status": status.to_numpy()},
        geometry=raw.geometry.to_numpy(), crs=raw.crs).to_crs(working_crs)


#: Columns :func:`system_roof_totals` adds to the systems; :func:`pv_roof_pairs` needs them.
ROOF_TOTAL_COLUMNS = ("roof_area_total_m2", "roof_building_id")


def roof_cover_m2(system_geoms: np.ndarray, footprints: np.ndarray) -> np.ndarray:
    """Roof area each polygon system covers on its paired footprint [m2].

    One expression for the totals and the per-partition pairs, so that both
    give the same floats for a pair.

    Parameters
    ----------
    system_geoms, footprints : ndarray of shapely geometries
        Pairs, element by element, metric CRS.

    Returns
    -------
    ndarray
        Area of each intersection [m2].
    """
    return shapely.area(shapely.intersection(system_geoms, footprints))


def system_roof_totals(systems: gpd.GeoDataFrame, buildings: Iterable[gpd.GeoDataFrame]
                       ) -> gpd.GeoDataFrame:
    """Each system's footprints over all buildings: its total roof area, its point's roof.

    :func:`subtract_existing_pv` runs on one partition or row group at a
    time; with these totals, computed once over all buildings, what it gives
    a building does not depend on how the buildings are split, and the parts
    add up to the whole frame's.

    Parameters
    ----------
    systems : GeoDataFrame
        Output of :func:`read_existing_pv`.
    buildings : iterable of GeoDataFrame
        All buildings, as one frame or in parts (partitions or row groups in
        file order), in the systems' CRS; only ``building_id`` and the
        geometry are read.

    Returns
    -------
    GeoDataFrame
        ``systems`` with ``roof_area_total_m2`` [m2], the roof area a
        polygon system covers on all footprints (0 for points), and
        ``roof_building_id``, the footprint a point system counts on: the
        first in file order of those it touches (a point on a shared wall
        counts once); null for polygons and for points off every footprint.
    """
    sys_geom = systems.geometry.to_numpy()
    is_point = shapely.get_type_id(sys_geom) == shapely.GeometryType.POINT
    total = np.zeros(len(systems))
    owner = np.full(len(systems), None, dtype=object)
    if len(systems):
        tree = shapely.STRtree(sys_geom)
        for part in buildings:
            b_geom = part.geometry.to_numpy()
            ib, isys = tree.query(b_geom, predicate="intersects")
            order = np.lexsort((isys, ib))  # file order: the same sums however split
            ib, isys = ib[order], isys[order]
            poly = ~is_point[isys]
            # ufunc.at adds pair by pair in this order, so the floats do not depend on the parts
            np.add.at(total, isys[poly], roof_cover_m2(sys_geom[isys[poly]], b_geom[ib[poly]]))
            pts, first = np.unique(isys[~poly], return_index=True)  # first footprint each
            new = pd.isna(owner[pts])
            owner[pts[new]] = part["building_id"].to_numpy(dtype=object)[
                ib[~poly][first[new]]]
    out = systems.copy()
    out["roof_area_total_m2"] = total
    out["roof_building_id"] = pd.Series(owner, index=out.index, dtype="object")
    return out


def pv_roof_pairs(buildings: gpd.GeoDataFrame, systems: gpd.GeoDataFrame,
                  power_density_w_per_m2: float) -> pd.DataFrame:
    """Which roof each PV system sits on, with its roof area and capacity there.

    A polygon system takes the area it covers on each footprint and splits
    its capacity in proportion to that area out of its area on all
    footprints (``roof_area_total_m2``); a point system sits on the footprint
    ``roof_building_id`` names and takes the roof area its capacity needs,
    ``kWp / power density / gcr``. Row-wise given the systems: the pairs of
    the parts of ``buildings`` are the pairs of the whole.

    Parameters
    ----------
    buildings : GeoDataFrame
        Footprints with ``building_id`` and ``gcr`` [-], metric CRS: all
        buildings or a part of them.
    systems : GeoDataFrame
        Output of :func:`system_roof_totals` over all buildings, same CRS.
    power_density_w_per_m2 : float
        Module power density [W/m2].

    Returns
    -------
    DataFrame
        ``building`` (index label in ``buildings``), ``system`` (position in
        ``systems``), ``area_m2`` [m2], ``kwp`` [kWp].

    Raises
    ------
    ValueError
        ``systems`` without the columns of :func:`system_roof_totals`.
    """
    missing = [c for c in ROOF_TOTAL_COLUMNS if c not in systems.columns]
    if missing:
        raise ValueError(f"the PV systems lack {missing}: add them with system_roof_totals "
                         "over all buildings before splitting them by partition")
    empty = pd.DataFrame({"building": pd.Series(dtype=buildings.index.dtype),
                          "system": pd.Series(dtype="int64"),
                          "area_m2": pd.Series(dtype=float), "kwp": pd.Series(dtype=float)})
    if len(buildings) == 0 or len(systems) == 0:
        return empty
    sys_geom = systems.geometry.to_numpy()
    b_geom = buildings.geometry.to_numpy()
    ib, isys = buildings.sindex.query(sys_geom, predicate="intersects")[::-1]
    is_point = shapely.get_type_id(sys_geom[isys]) == shapely.GeometryType.POINT
    # a point on a shared wall counts once, on the footprint system_roof_totals gave it
    owner = systems["roof_building_id"].to_numpy(dtype=object)[isys]
    keep = ~is_point | np.asarray(
        owner == buildings["building_id"].to_numpy(dtype=object)[ib], dtype=bool)
    ib, isys, is_point = ib[keep], isys[keep], is_point[keep]
    if len(ib) == 0:
        return empty
    kwp_sys = systems["pv_capacity_kwp"].to_numpy(dtype=float)[isys]
    area = np.zeros(len(ib))
    poly = ~is_point
    if poly.any():
        area[poly] = roof_cover_m2(sys_geom[isys[poly]], b_geom[ib[poly]])
    gcr = buildings["gcr"].to_numpy(dtype=float)[ib]
    area[is_point] = kwp_sys[is_point] * 1000.0 / power_density_w_per_m2 / gcr[is_point]
    total = systems["roof_area_total_m2"].to_numpy(dtype=float)[isys]
    share = np.where(is_point, 1.0, np.divide(area, total, out=np.zeros(len(ib)),
                                              where=total > 0))
    pairs = pd.DataFrame({"building": buildings.index.to_numpy()[ib], "system": isys,
                          "area_m2": area, "kwp": kwp_sys * share})
    return pairs[pairs["area_m2"] > 0].reset_index(drop=True)


def subtract_existing_pv(part: gpd.GeoDataFrame, systems: gpd.GeoDataFrame,
                         power_density_w_per_m2: float, min_array_area_m2: float,
                         pairs: pd.DataFrame | None = None) -> gpd.GeoDataFrame:
    """Kernel: take the roof area of existing or planned PV off the free roof.

    Parameters
    ----------
    part : GeoDataFrame
        Yield-stage buildings (``usable_area_m2``, ``gcr``, ``coverage_share``,
        ``footprint_area_m2``, ``specific_yield_kwh_per_kwp``): all
        buildings or one partition of them.
    systems : GeoDataFrame
        Output of :func:`system_roof_totals` over all buildings.
    power_density_w_per_m2 : float
        Module power density [W/m2] (``roof.module_power_density_w_per_m2``).
    min_array_area_m2 : float
        Free area below this carries no new array [m2].
    pairs : DataFrame, optional
        :func:`pv_roof_pairs` of ``part``, when already computed.

    Returns
    -------
    GeoDataFrame
        ``part`` with ``existing_pv_area_m2`` [m2] and ``existing_pv_kwp``
        [kWp], and the usable and policy areas, module area, capacities and
        annual energies of the remaining free roof. The policy area is what
        the coverage share still asks beyond the existing PV.
    """
    from pipeline.roof import capacity_kwp

    out = part.copy()
    if pairs is None:
        pairs = pv_roof_pairs(out, systems, power_density_w_per_m2)
    per = pairs.groupby("building")[["area_m2", "kwp"]].sum()
    taken = per["area_m2"].reindex(out.index, fill_value=0.0).to_numpy(dtype=float)
    out["existing_pv_area_m2"] = taken
    out["existing_pv_kwp"] = per["kwp"].reindex(out.index, fill_value=0.0).to_numpy(dtype=float)
    usable_before = out["usable_area_m2"].to_numpy(dtype=float)
    usable = np.maximum(usable_before - taken, 0.0)
    usable = np.where(usable < min_array_area_m2, 0.0, usable)
    gcr = out["gcr"].to_numpy(dtype=float)
    share = out["coverage_share"].to_numpy(dtype=float)
    footprint = out["footprint_area_m2"].to_numpy(dtype=float)
    policy = np.minimum(np.maximum(share * footprint - taken, 0.0), usable)
    out["usable_area_m2"] = usable
    out["module_area_m2"] = usable * gcr
    out["capacity_kwp"] = capacity_kwp(usable * gcr, power_density_w_per_m2)
    out["policy_area_m2"] = policy
    out["capacity_policy_kwp"] = capacity_kwp(policy * gcr, power_density_w_per_m2)
    specific = out["specific_yield_kwh_per_kwp"].to_numpy(dtype=float)
    ok = np.isfinite(specific)
    energy_before = out["energy_mwh_per_year"].to_numpy(dtype=float)
    for cap, energy in (("capacity_kwp", "energy_mwh_per_year"),
                        ("capacity_policy_kwp", "energy_policy_mwh_per_year")):
        out[energy] = np.where(ok, out[cap].to_numpy(dtype=float) * np.where(ok, specific, 0)
                               / 1000.0, 0.0)
    # monthly energy (shading included) scales with the annual energy left
    ratio = np.divide(out["energy_mwh_per_year"].to_numpy(dtype=float), energy_before,
                      out=np.zeros(len(out)), where=energy_before > 0)
    for col in [c for c in out.columns if re.fullmatch(r"energy_m\d\d_mwh", str(c))]:
        out[col] = out[col].to_numpy(dtype=float) * ratio
    newly_full = (usable_before > 0) & (usable == 0)
    out["suitable"] = usable > 0
    reason = out["unsuitable_reason"].astype(object).to_numpy(copy=True)
    reason[newly_full] = "the free roof left beside existing or planned PV is below " \
        f"roof.min_array_area_m2 = {min_array_area_m2:g} m2"
    out["unsuitable_reason"] = pd.Series(reason, index=out.index, dtype="object")
    return out


def locate_existing_pv(systems: gpd.GeoDataFrame, buildings: pd.DataFrame,
                       districts: gpd.GeoDataFrame, power_density_w_per_m2: float,
                       pairs: pd.DataFrame | None = None) -> gpd.GeoDataFrame:
    """Each PV system with the roof it sits on and its district.

    Parameters
    ----------
    systems : GeoDataFrame
        Output of :func:`system_roof_totals` over ``buildings``.
    buildings : DataFrame
        All buildings: ``building_id``, ``building_type``, ``district_name``,
        and, unless ``pairs`` are given, ``gcr`` and the footprints.
    districts : GeoDataFrame
        ``district_name`` polygons.
    power_density_w_per_m2 : float
        Module power density [W/m2].
    pairs : DataFrame, optional
        :func:`pv_roof_pairs` of all buildings, in any order and from any
        split of them, with ``building`` the row position in ``buildings``
        (when the footprints were read a part at a time); else computed here.

    Returns
    -------
    GeoDataFrame
        ``systems`` with ``building_id`` (the roof with most of its area;
        null off the input's roofs), ``building_type``, ``district_name``
        (of that roof, else of the district holding the system) and
        ``pv_roof_area_m2`` [m2]; without the columns of
        :func:`system_roof_totals`.
    """
    out = systems.drop(columns=list(ROOF_TOTAL_COLUMNS))
    b = buildings.reset_index(drop=True)
    if pairs is None:
        pairs = pv_roof_pairs(b, systems, power_density_w_per_m2)
    # by system, then building: the sums and the ties of the largest area (the first roof in
    # file order) do not depend on how the buildings were split
    pairs = pairs.iloc[np.lexsort((pairs["building"].to_numpy(), pairs["system"].to_numpy()))]
    main = pairs.sort_values(["system", "area_m2"], ascending=[True, False], kind="stable") \
        .drop_duplicates("system").set_index("system")
    pos = main["building"].reindex(range(len(out)))
    has = pos.notna().to_numpy()
    idx = pos.fillna(-1).to_numpy(dtype="int64")
    out["building_id"] = pd.Series(np.where(has, b["building_id"].to_numpy(dtype=object)[idx],
                                            None), index=out.index, dtype="object")
    out["building_type"] = pd.Series(
        np.where(has, b["building_type"].astype(object).to_numpy()[idx], None),
        index=out.index, dtype="object")
    by_roof = np.where(has, b["district_name"].astype(object).to_numpy()[idx], None)
    pts = gpd.GeoDataFrame(geometry=out.geometry.representative_point(), crs=out.crs)
    joined = gpd.sjoin(pts, districts[["district_name", "geometry"]], how="left",
                       predicate="within")
    joined = joined[~joined.index.duplicated(keep="first")]
    by_place = joined["district_name"].reindex(out.index).astype(object).to_numpy()
    out["district_name"] = pd.Series(np.where(has, by_roof, by_place), index=out.index,
                                     dtype="object")
    out["pv_roof_area_m2"] = pairs.groupby("system")["area_m2"].sum().reindex(
        range(len(out)), fill_value=0.0).to_numpy()
    return out


def existing_toward_targets(systems: pd.DataFrame, targets: list[TargetConfig]) -> pd.DataFrame:
    """Existing and planned capacity that counts toward each target.

    A system counts toward a target when it lies in the target's district,
    its year falls in the target's period, and it sits on a roof of one of
    the target's eligible types or on no roof of the input.

    Parameters
    ----------
    systems : DataFrame
        Output of :func:`locate_existing_pv`.
    targets : list of TargetConfig
        The configured targets.

    Returns
    -------
    DataFrame
        ``target_id``, ``target_existing_mw`` [MW], ``n_existing_systems``.
    """
    rows = []
    for t in targets:
        first, last = parse_period(t.period)
        sel = systems[(systems["district_name"] == t.district_name)
                      & systems["pv_year"].between(first, last)
                      & (systems["building_type"].isna()
                         | systems["building_type"].isin(t.eligible_types))]
        rows.append({"target_id": t.id,
                     "target_existing_mw": float(sel["pv_capacity_kwp"].sum()) / 1000.0,
                     "n_existing_systems": len(sel)})
    return pd.DataFrame(rows, columns=["target_id", "target_existing_mw", "n_existing_systems"])


# --------------------------------------------------------------------------- ranking


def rank_roofs(buildings: pd.DataFrame, order: str, type_priority: list[str]) -> pd.DataFrame:
    """Roofs with capacity, in the order they should be built.

    Parameters
    ----------
    buildings : DataFrame
        ``building_id``, ``building_type``, ``capacity_kwp`` [kWp],
        ``specific_yield_kwh_per_kwp`` [kWh/kWp].
    order : {"capacity", "specific_yield", "type_priority"}
        Ranking order (ties: larger capacity, then ``building_id``).
    type_priority : list of str
        Type order for ``type_priority``; unlisted types come last.

    Returns
    -------
    DataFrame
        The rows with ``capacity_kwp > 0``, sorted, with ``priority_rank``
        (1, 2, ...) and ``cumulative_mw`` [MW].
    """
    sel = buildings[buildings["capacity_kwp"] > 0].copy()
    cap = sel["capacity_kwp"].to_numpy(dtype=float)
    ids = np.asarray(sel["building_id"].astype(str), dtype=str)
    if order == "capacity":
        keys = (ids, -cap)
    elif order == "specific_yield":
        sy = np.nan_to_num(sel["specific_yield_kwh_per_kwp"].to_numpy(dtype=float), nan=0.0)
        keys = (ids, -cap, -sy)
    elif order == "type_priority":
        rank = {t: i for i, t in enumerate(type_priority)}
        tp = sel["building_type"].astype(object).map(rank).fillna(len(rank)).to_numpy()
        keys = (ids, -cap, tp)
    else:
        raise ValueError(f"unknown ranking order {order!r}: capacity, specific_yield or "
                         "type_priority")
    sel = sel.iloc[np.lexsort(keys)]
    sel["priority_rank"] = np.arange(1, len(sel) + 1, dtype="int64")
    sel["cumulative_mw"] = np.cumsum(sel["capacity_kwp"].to_numpy(dtype=float)) / 1000.0
    return sel


def roofs_to_target(ranked: pd.DataFrame, required_mw: float) -> np.ndarray:
    """Which ranked roofs make up the shortest prefix that reaches a capacity.

    Parameters
    ----------
    ranked : DataFrame
        Output of :func:`rank_roofs` (``cumulative_mw`` [MW]).
    required_mw : float
        Capacity to reach [MW]; zero or less needs no roof.

    Returns
    -------
    ndarray of bool
        True for the roofs up to and including the first whose cumulative
        capacity reaches ``required_mw``; all roofs when none does.
    """
    cum = ranked["cumulative_mw"].to_numpy(dtype=float)
    if required_mw <= 0:
        return np.zeros(len(cum), dtype=bool)
    n = int(np.searchsorted(cum, required_mw - 1e-12, side="left")) + 1
    return np.arange(len(cum)) < n


def target_plan(buildings: pd.DataFrame, remaining_mw: dict[str, float],
                target_cfgs: list[TargetConfig], order: str, type_priority: list[str]
                ) -> pd.DataFrame:
    """The ranked roofs of every target, and which of them reach it.

    Parameters
    ----------
    buildings : DataFrame
        The buildings (after existing PV), with ``district_name`` and the
        columns of :func:`rank_roofs`.
    remaining_mw : dict
        Target id to the MW still to build (required less existing PV) [MW].
    target_cfgs : list of TargetConfig
        District and eligible types of each target.
    order, type_priority
        As in :func:`rank_roofs`.

    Returns
    -------
    DataFrame
        ``target_id``, the building's columns, ``priority_rank``,
        ``cumulative_mw`` [MW] and ``in_target_list``.
    """
    frames = []
    for t in target_cfgs:
        sel = buildings[(buildings["district_name"] == t.district_name)
                        & buildings["building_type"].isin(t.eligible_types)]
        ranked = rank_roofs(sel, order, type_priority)
        ranked.insert(0, "target_id", t.id)
        ranked["in_target_list"] = roofs_to_target(ranked, float(remaining_mw[t.id]))
        frames.append(ranked)
    if not frames:
        empty = rank_roofs(buildings.iloc[:0], order, type_priority)
        empty.insert(0, "target_id", pd.Series(dtype=object))
        empty["in_target_list"] = pd.Series(dtype=bool)
        return empty
    return pd.concat(frames, ignore_index=True)


def remaining_mw(target_cfgs: list[TargetConfig], existing: pd.DataFrame) -> dict[str, float]:
    """MW each target still needs once existing and planned PV is counted.

    Parameters
    ----------
    target_cfgs : list of TargetConfig
        The targets.
    existing : DataFrame
        Output of :func:`existing_toward_targets`.

    Returns
    -------
    dict
        Target id to ``max(required - existing, 0)`` [MW].
    """
    have = existing.set_index("target_id")["target_existing_mw"] if len(existing) else {}
    return {t.id: max(t.required_mw - float(have.get(t.id, 0.0)), 0.0) for t in target_cfgs}


def plan_targets(targets: pd.DataFrame, existing: pd.DataFrame, plan: pd.DataFrame,
                 buildings: pd.DataFrame, target_cfgs: list[TargetConfig],
                 priority_types: list[str], factor_t_co2_per_mwh: float) -> pd.DataFrame:
    """Add existing PV, the roofs to reach each target and CO2 to the targets table.

    Parameters
    ----------
    targets : DataFrame
        Output of ``report.target_table`` on the buildings after existing PV
        (with ``target_energy_gwh_per_year`` [GWh/yr]).
    existing : DataFrame
        Output of :func:`existing_toward_targets` (may be empty).
    plan : DataFrame
        Output of :func:`target_plan`.
    buildings : DataFrame
        The buildings, for the share of the priority types.
    target_cfgs : list of TargetConfig
        The configured targets.
    priority_types : list of str
        Types the public-institution plan puts first (the head of
        ``plan.type_priority`` up to the first non-public type).
    factor_t_co2_per_mwh : float
        Grid emission factor [t/MWh].

    Returns
    -------
    DataFrame
        ``targets`` with ``target_existing_mw``, ``target_remaining_mw``,
        ``n_roofs_to_target``, ``mw_roofs_to_target``,
        ``target_share_reachable`` (existing + achievable over required,
        at most 1), ``priority_types`` and ``target_share_priority_types``
        (the priority types' capacity over the remaining MW, at most 1),
        ``target_co2_avoided_kt_per_year`` [kt/yr]; margin, share needed and
        verdict count the existing PV.
    """
    from pipeline.report import NO_BUILDINGS, NOT_REACHABLE, REACHABLE

    out = targets.drop(columns=["target_existing_mw", "n_existing_systems",
                                "target_remaining_mw"], errors="ignore")
    out = out.merge(existing, on="target_id", how="left")
    out["target_existing_mw"] = out["target_existing_mw"].fillna(0.0)
    out["n_existing_systems"] = out["n_existing_systems"].fillna(0).astype("int64")
    req = out["target_required_mw"].to_numpy(dtype=float)
    have = out["target_existing_mw"].to_numpy(dtype=float)
    ach = out["target_achievable_mw"].to_numpy(dtype=float)
    remaining = np.maximum(req - have, 0.0)
    out["target_remaining_mw"] = remaining
    out["target_margin_mw"] = have + ach - req
    with np.errstate(divide="ignore", invalid="ignore"):
        out["target_share_needed"] = np.where(ach > 0, remaining / np.where(ach > 0, ach, 1),
                                              np.where(remaining > 0, np.inf, 0.0))
    out["target_share_reachable"] = np.minimum((have + ach) / req, 1.0)
    prio = []
    for t in target_cfgs:
        types = [x for x in priority_types if x in t.eligible_types]
        sel = buildings[(buildings["district_name"] == t.district_name)
                        & buildings["building_type"].isin(types)]
        prio.append({"target_id": t.id, "priority_mw": float(sel["capacity_kwp"].sum()) / 1000,
                     "priority_types": ",".join(types)})
    prio_df = pd.DataFrame(prio, columns=["target_id", "priority_mw", "priority_types"]) \
        .set_index("target_id")
    out["priority_types"] = prio_df["priority_types"].reindex(out["target_id"]).fillna("") \
        .to_numpy()
    pmw = prio_df["priority_mw"].reindex(out["target_id"]).fillna(0.0).to_numpy()
    out["target_share_priority_types"] = np.where(
        remaining > 0, np.minimum(pmw / np.where(remaining > 0, remaining, 1), 1.0), 1.0)
    chosen = plan[plan["in_target_list"]] if len(plan) else plan
    n = chosen.groupby("target_id").size() if len(chosen) else pd.Series(dtype="int64")
    mw = (chosen.groupby("target_id")["capacity_kwp"].sum() / 1000.0 if len(chosen)
          else pd.Series(dtype=float))
    out["n_roofs_to_target"] = n.reindex(out["target_id"]).fillna(0).astype("int64").to_numpy()
    out["mw_roofs_to_target"] = mw.reindex(out["target_id"]).fillna(0.0).to_numpy()
    out["target_co2_avoided_kt_per_year"] = (
        out["target_energy_gwh_per_year"].to_numpy(dtype=float) * factor_t_co2_per_mwh)
    verdict = np.where(have + ach >= req - 1e-9, REACHABLE,
                       np.where((out["n_eligible_buildings"] == 0) & (have == 0),
                                NO_BUILDINGS, NOT_REACHABLE))
    out["target_verdict"] = verdict
    return out


def priority_types(type_priority: list[str], public: tuple[str, ...] = (
        "government", "school", "hospital", "other_public")) -> list[str]:
    """The head of the type priority that the public-institution plan puts first.

    Parameters
    ----------
    type_priority : list of str
        ``plan.type_priority``.
    public : tuple of str
        Types of public institutions.

    Returns
    -------
    list of str
        The leading public types of ``type_priority``.
    """
    head = []
    for t in type_priority:
        if t not in public:
            break
        head.append(t)
    return head


# --------------------------------------------------------------------------- carbon


def co2_avoided_t(energy_mwh: np.ndarray | pd.Series | float, factor_t_co2_per_mwh: float
                  ) -> np.ndarray | pd.Series | float:
    """CO2 avoided by PV generation that displaces grid power.

    Parameters
    ----------
    energy_mwh : array-like [MWh]
        Energy generated.
    factor_t_co2_per_mwh : float
        Grid emission factor [t/MWh].

    Returns
    -------
    array-like [t]
        ``energy_mwh * factor_t_co2_per_mwh``.
    """
    return energy_mwh * factor_t_co2_per_mwh


# --------------------------------------------------------------------------- towns


def read_towns(cfg: TownsConfig, districts: gpd.GeoDataFrame, working_crs: str,
               base_dir: Path) -> gpd.GeoDataFrame:
    """Read the sub-district units and give each its district.

    Parameters
    ----------
    cfg : TownsConfig
        Path and fields.
    districts : GeoDataFrame
        ``district_name`` polygons in the working CRS.
    working_crs : str
        The working CRS.
    base_dir : Path
        Directory relative paths resolve against.

    Returns
    -------
    GeoDataFrame
        ``town_name``, ``district_name`` (the field, else the district that
        holds the town's representative point), polygons.
    """
    path = cfg.path if cfg.path.is_absolute() else base_dir / cfg.path
    raw = read_vector(path, layer=cfg.layer)
    for key in ("name_field", "district_field"):
        field = getattr(cfg, key)
        if field is not None and field not in raw.columns:
            raise InputError(path, f"field {field!r} not in the towns layer", field=field,
                             fix=f"set plan.towns.{key} to one of {list(raw.columns)}")
    if raw.crs is None:
        if cfg.crs_if_missing is None:
            raise InputError(path, "the towns layer has no CRS", field="crs",
                             fix="set plan.towns.crs_if_missing to its CRS")
        raw = raw.set_crs(cfg.crs_if_missing)
    names = raw[cfg.name_field].astype(str)
    if names.duplicated().any():
        raise InputError(path, f"town name {names[names.duplicated()].iloc[0]!r} occurs twice",
                         field=cfg.name_field, fix="give every town a unique name")
    towns = gpd.GeoDataFrame({"town_name": names.to_numpy()},
                             geometry=shapely.make_valid(raw.geometry.array),
                             crs=raw.crs).to_crs(working_crs)
    if cfg.district_field:
        towns["district_name"] = raw[cfg.district_field].astype(str).to_numpy()
    else:
        pts = gpd.GeoDataFrame(geometry=towns.geometry.representative_point(), crs=towns.crs)
        j = gpd.sjoin(pts, districts[["district_name", "geometry"]], how="left",
                      predicate="within")
        j = j[~j.index.duplicated(keep="first")]
        towns["district_name"] = j["district_name"].reindex(towns.index).astype(object)
    return towns[["town_name", "district_name", "geometry"]]


def assign_towns(part: gpd.GeoDataFrame, towns: gpd.GeoDataFrame) -> gpd.GeoDataFrame:
    """Kernel: the town that holds each footprint's centroid, within its district.

    Parameters
    ----------
    part : GeoDataFrame
        Buildings with ``district_name``, metric CRS.
    towns : GeoDataFrame
        Output of :func:`read_towns`, same CRS.

    Returns
    -------
    GeoDataFrame
        ``part`` with ``town_name`` (``OUTSIDE_TOWNS`` where no town of the
        building's district holds the centroid).
    """
    out = part.copy()
    cent = gpd.GeoDataFrame({"district_name": out["district_name"].to_numpy()},
                            geometry=out.geometry.centroid.to_numpy(), index=out.index,
                            crs=out.crs)
    j = gpd.sjoin(cent, towns.rename(columns={"district_name": "town_district"}),
                  how="left", predicate="within")
    j = j[j["town_district"].isna() | (j["district_name"] == j["town_district"])]
    j = j[~j.index.duplicated(keep="first")]
    out["town_name"] = j["town_name"].reindex(out.index).fillna(OUTSIDE_TOWNS) \
        .astype(object).to_numpy()
    return out


def town_split(buildings: pd.DataFrame, towns: pd.DataFrame, target_cfgs: list[TargetConfig]
               ) -> pd.DataFrame:
    """Split each district target across its towns in proportion to potential.

    The potential of a town is the capacity of the target's eligible types on
    its roofs. Buildings of the district outside every town form one more
    row (``OUTSIDE_TOWNS``), so the split always sums to the target. Where the
    district has no potential at all, the target is split by town area.

    Parameters
    ----------
    buildings : DataFrame
        ``district_name``, ``town_name``, ``building_type``,
        ``capacity_kwp`` [kWp], ``energy_mwh_per_year`` [MWh/yr].
    towns : DataFrame
        ``town_name``, ``district_name`` and (for the area fallback) geometry.
    target_cfgs : list of TargetConfig
        The targets.

    Returns
    -------
    DataFrame
        ``target_id``, ``district_name``, ``town_name``, ``n_buildings``,
        ``town_potential_mw`` [MW], ``town_share`` [-], ``town_target_mw``
        [MW], ``town_margin_mw`` [MW], ``split_basis``.
    """
    cols = ["target_id", "district_name", "town_name", "n_buildings", "town_potential_mw",
            "town_share", "town_target_mw", "town_margin_mw", "split_basis"]
    rows = []
    for t in target_cfgs:
        names = towns.loc[towns["district_name"] == t.district_name, "town_name"].tolist()
        if not names:
            continue
        sel = buildings[(buildings["district_name"] == t.district_name)
                        & buildings["building_type"].isin(t.eligible_types)]
        g = sel.groupby("town_name")["capacity_kwp"].agg(["sum", "size"])
        if OUTSIDE_TOWNS in g.index and OUTSIDE_TOWNS not in names:
            names.append(OUTSIDE_TOWNS)
        pot = g["sum"].reindex(names, fill_value=0.0).to_numpy(dtype=float) / 1000.0
        n = g["size"].reindex(names, fill_value=0).to_numpy(dtype="int64")
        if pot.sum() > 0:
            share, basis = pot / pot.sum(), "potential"
        else:
            area = np.array([float(towns.loc[towns["town_name"] == nm].geometry.area.sum())
                             if nm != OUTSIDE_TOWNS else 0.0 for nm in names])
            share = area / area.sum() if area.sum() > 0 else np.full(len(names), 1 / len(names))
            basis = "town area (no potential in the input)"
        for i, nm in enumerate(names):
            rows.append({"target_id": t.id, "district_name": t.district_name, "town_name": nm,
                         "n_buildings": int(n[i]), "town_potential_mw": float(pot[i]),
                         "town_share": float(share[i]),
                         "town_target_mw": float(share[i] * t.required_mw),
                         "town_margin_mw": float(pot[i] - share[i] * t.required_mw),
                         "split_basis": basis})
    return pd.DataFrame(rows, columns=cols)


def town_layer(towns: gpd.GeoDataFrame, buildings: pd.DataFrame, split: pd.DataFrame
               ) -> gpd.GeoDataFrame:
    """Town polygons with their summary and their share of the first district target.

    Parameters
    ----------
    towns : GeoDataFrame
        Output of :func:`read_towns`.
    buildings : DataFrame
        Buildings with ``town_name``.
    split : DataFrame
        Output of :func:`town_split`.

    Returns
    -------
    GeoDataFrame
        ``town_name``, ``district_name``, ``n_buildings``, ``capacity_mw``
        [MW], ``energy_gwh_per_year`` [GWh/yr], ``target_id``,
        ``town_target_mw`` [MW], ``town_share`` [-], polygons.
    """
    g = buildings.groupby(["district_name", "town_name"]).agg(
        n_buildings=("building_id", "count"), capacity_mw=("capacity_kwp", "sum"),
        energy_gwh_per_year=("energy_mwh_per_year", "sum")).reset_index()
    g["capacity_mw"] /= 1000.0
    g["energy_gwh_per_year"] /= 1000.0
    out = towns.merge(g, on=["district_name", "town_name"], how="left")
    for col in ("n_buildings", "capacity_mw", "energy_gwh_per_year"):
        out[col] = out[col].fillna(0)
    out["n_buildings"] = out["n_buildings"].astype("int64")
    first = split.drop_duplicates(["district_name", "town_name"])[
        ["district_name", "town_name", "target_id", "town_target_mw", "town_share"]]
    out = out.merge(first, on=["district_name", "town_name"], how="left")
    return gpd.GeoDataFrame(out, geometry="geometry", crs=towns.crs)


def district_extras(dlayer: gpd.GeoDataFrame, targets: pd.DataFrame,
                    factor_t_co2_per_mwh: float) -> gpd.GeoDataFrame:
    """Add CO2 and the plan columns of each district's first target.

    Parameters
    ----------
    dlayer : GeoDataFrame
        Output of ``report.district_layer``.
    targets : DataFrame
        Output of :func:`plan_targets`.
    factor_t_co2_per_mwh : float
        Grid emission factor [t/MWh].

    Returns
    -------
    GeoDataFrame
        ``dlayer`` with ``co2_avoided_kt_per_year`` [kt/yr],
        ``target_existing_mw``, ``target_remaining_mw`` [MW],
        ``n_roofs_to_target`` and ``target_share_reachable`` [-].
    """
    out = dlayer.copy()
    out["co2_avoided_kt_per_year"] = co2_avoided_t(
        out["energy_gwh_per_year"].to_numpy(dtype=float), factor_t_co2_per_mwh)
    cols = ["target_existing_mw", "target_remaining_mw", "n_roofs_to_target",
            "target_share_reachable"]
    first = targets.drop_duplicates("district_name").set_index("district_name")[cols]
    for col in cols:
        out[col] = out["district_name"].map(first[col]).to_numpy()
    return gpd.GeoDataFrame(out, geometry="geometry", crs=dlayer.crs)
