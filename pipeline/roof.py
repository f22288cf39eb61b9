"""Stage 3, roof: usable roof area and installable capacity per building.

The footprint is shrunk by an edge setback (fire access and wind margin),
multiplied by a utilisation factor by roof kind and building type (plant
rooms, skylights, equipment), and set to zero below a minimum array area.
Flat roofs carry tilted rows at a ground-coverage ratio (module area per roof
area); pitched roofs carry flush modules. The policy capacity puts PV on the
coverage share of the roof that the district rule asks for, capped at what is
usable.

Inputs (classify stage): ``footprint_area_m2`` [m2], ``building_type``,
``tag_roof_shape``, ``tag_building``, geometry [m].

Outputs (added columns)

=======================  ======  ===============================================
column                   unit    meaning
=======================  ======  ===============================================
roof_kind                -       flat or pitched
roof_kind_source         -       tag (roof:shape / building tag) or default
setback_area_m2          m2      footprint area inside the edge setback
utilisation_factor       -       share of setback area free of obstructions
usable_area_m2           m2      area that can carry arrays
tilt_deg                 deg     module tilt
azimuth_deg              deg     module azimuth (180 = south)
gcr                      -       module area / usable area
module_area_m2           m2      usable_area_m2 * gcr
capacity_kwp             kWp     module_area_m2 * power density
coverage_share           -       policy share of roof area for the type
policy_area_m2           m2      min(coverage_share * footprint, usable)
capacity_policy_kwp      kWp     capacity on policy_area_m2
suitable                 -       usable_area_m2 > 0
unsuitable_reason        -       why not
=======================  ======  ===============================================
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import geopandas as gpd
import numpy as np
import pandas as pd
import shapely

from pipeline.config import PipelineConfig, PolicyConfig, RoofConfig
from pipeline.stream import map_file

log = logging.getLogger(__name__)


def setback_area(geometry: gpd.GeoSeries, setback_m: np.ndarray | float) -> np.ndarray:
    """Area left inside an edge setback.

    Parameters
    ----------
    geometry : GeoSeries
        Footprints in a metric CRS [m].
    setback_m : array or float
        Setback from every roof edge [m].

    Returns
    -------
    ndarray
        Area of the footprint shrunk inward by ``setback_m`` [m2]
        (mitred corners, so a 40 m x 25 m rectangle with a 1 m setback keeps
        38 m x 23 m = 874 m2).
    """
    inner = shapely.buffer(geometry.array, -np.asarray(setback_m, dtype=float),
                           join_style="mitre", mitre_limit=5.0)
    return np.asarray(shapely.area(inner), dtype=float)


def capacity_kwp(module_area_m2: np.ndarray | float, power_density_w_per_m2: float
                 ) -> np.ndarray:
    """Installable DC capacity.

    Parameters
    ----------
    module_area_m2 : array or float
        Module area [m2].
    power_density_w_per_m2 : float
        Module rated power per module area at STC [W/m2].

    Returns
    -------
    ndarray
        Capacity [kWp].
    """
    return np.asarray(module_area_m2, dtype=float) * power_density_w_per_m2 / 1000.0


def roof_kind(buildings: pd.DataFrame, cfg: RoofConfig) -> tuple[np.ndarray, np.ndarray]:
    """Flat or pitched, from the roof:shape tag, the building tag, or the default.

    Parameters
    ----------
    buildings : DataFrame
        With ``tag_roof_shape`` and ``tag_building``.
    cfg : RoofConfig
        The lookup tables and the default.

    Returns
    -------
    kind, source : ndarray, ndarray
        ``flat``/``pitched`` and ``tag_roof_shape``/``tag_building``/``default``.
    """
    n = len(buildings)
    kind = np.full(n, cfg.roof_kind_default, dtype=object)
    source = np.full(n, "default", dtype=object)
    by_building = buildings["tag_building"].map(cfg.roof_kind_by_tag_building)
    has = by_building.notna().to_numpy()
    kind[has] = by_building.to_numpy()[has]
    source[has] = "tag_building"
    by_shape = buildings["tag_roof_shape"].map(cfg.roof_kind_by_roof_shape)
    has = by_shape.notna().to_numpy()
    kind[has] = by_shape.to_numpy()[has]
    source[has] = "tag_roof_shape"
    return kind, source


def roof_potential(part: gpd.GeoDataFrame, roof: RoofConfig, policy: PolicyConfig
                   ) -> gpd.GeoDataFrame:
    """Kernel: usable area, layout and capacity of each roof.

    Parameters
    ----------
    part : GeoDataFrame
        Classified buildings in a metric CRS.
    roof : RoofConfig
        Setbacks, utilisation, layout and module density.
    policy : PolicyConfig
        Coverage share by building type.

    Returns
    -------
    GeoDataFrame
        ``part`` with the columns in the module table.
    """
    out = part.copy()
    kind, kind_source = roof_kind(out, roof)
    flat = kind == "flat"
    setback = np.where(flat, roof.setback_flat_m, roof.setback_pitched_m)
    area_in = setback_area(out.geometry, setback) if len(out) else np.zeros(0)
    btype = out["building_type"].astype(object)
    util_flat = btype.map(roof.utilisation_flat_by_type).fillna(
        roof.utilisation_flat_by_type["default"]).to_numpy(dtype=float)
    util_pitched = btype.map(roof.utilisation_pitched_by_type).fillna(
        roof.utilisation_pitched_by_type["default"]).to_numpy(dtype=float)
    util = np.where(flat, util_flat, util_pitched)
    usable = area_in * util
    too_small = usable < roof.min_array_area_m2
    usable = np.where(too_small, 0.0, usable)
    gcr = np.where(flat, roof.flat_gcr, roof.pitched_gcr)
    module_area = usable * gcr
    share = btype.map(policy.coverage_share_by_type).fillna(0.0).to_numpy(dtype=float)
    policy_area = np.minimum(share * out["footprint_area_m2"].to_numpy(dtype=float), usable)

    out["roof_kind"] = kind
    out["roof_kind_source"] = kind_source
    out["setback_area_m2"] = area_in
    out["utilisation_factor"] = util
    out["usable_area_m2"] = usable
    out["tilt_deg"] = np.where(flat, roof.flat_tilt_deg, roof.pitched_tilt_deg)
    out["azimuth_deg"] = np.where(flat, roof.flat_azimuth_deg, roof.pitched_azimuth_deg)
    out["gcr"] = gcr
    out["module_area_m2"] = module_area
    out["capacity_kwp"] = capacity_kwp(module_area, roof.module_power_density_w_per_m2)
    out["coverage_share"] = share
    out["policy_area_m2"] = policy_area
    out["capacity_policy_kwp"] = capacity_kwp(policy_area * gcr,
                                              roof.module_power_density_w_per_m2)
    out["suitable"] = usable > 0
    reason = np.where(area_in <= 0, "nothing left inside the edge setback",
                      f"usable area below roof.min_array_area_m2 = {roof.min_array_area_m2:g} m2")
    out["unsuitable_reason"] = pd.Series(np.where(usable > 0, None, reason), index=out.index,
                                         dtype="object")
    return out


def run(cfg: PipelineConfig, base_dir: Path) -> dict:
    """Roof stage runner: classified buildings in, roof potential out.

    Parameters
    ----------
    cfg : PipelineConfig
        The run's configuration.
    base_dir : Path
        Project root.

    Returns
    -------
    dict
        Rows in and out, suitable roofs, total capacity [kWp].
    """
    t0 = time.perf_counter()
    d = base_dir / cfg.paths.processed_dir
    rows_in, rows_out, out = map_file(
        d / "classify_buildings.parquet", d / "roof_buildings.parquet", roof_potential,
        cfg.roof, cfg.policy, keep=("suitable", "capacity_kwp"), label="roof")
    stats = {"rows_in": rows_in, "rows_out": rows_out,
             "suitable": int(out["suitable"].sum()),
             "capacity_kwp": float(out["capacity_kwp"].sum())}
    log.info("roof: %d buildings in, %d out, %d suitable, %.1f MWp, %.1f s",
             stats["rows_in"], stats["rows_out"], stats["suitable"],
             stats["capacity_kwp"] / 1000, time.perf_counter() - t0)
    return stats
