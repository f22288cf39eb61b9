"""Report sections on roof geometry, shading, unsuitable roofs and monthly energy.

Called by :func:`pipeline.report.render_markdown`; reads only columns of the
yield-stage buildings (``height_source``, ``height_m`` [m], ``roof_kind``,
``roof_kind_source``, ``unshaded_share`` [-], ``beam_loss_share`` [-],
``suitable``, ``unsuitable_reason``, ``footprint_area_m2`` [m2],
``capacity_kwp`` [kWp], ``energy_m01_mwh`` ... ``energy_m12_mwh`` [MWh]).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pandas as pd

from pipeline.pvyield import ENERGY_MONTH_COLUMNS

MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")


def roof_sections(buildings: pd.DataFrame, md_table: Callable[..., str],
                  min_unshaded_share: float) -> list[str]:
    """Markdown lines: height and roof-kind sources, shading, unsuitable roofs, months.

    Parameters
    ----------
    buildings : DataFrame
        The yield-stage buildings.
    md_table : callable
        ``md_table(frame, floatfmt=...)`` rendering a DataFrame as Markdown.
    min_unshaded_share : float
        The shading rule's threshold [-], for the text.

    Returns
    -------
    list of str
        Report lines (empty if the roof/shading columns are absent).
    """
    b = buildings
    if not {"height_source", "roof_kind_source", "unshaded_share"} <= set(b.columns):
        return []
    lines = ["## Heights and roof kinds", "",
             "Where each building's height and roof kind came from (config sections "
             "`heights` and `roof`).", ""]
    hs = (b.groupby("height_source", observed=True)
          .agg(n_buildings=("building_id", "count"), median_height_m=("height_m", "median"))
          .reset_index())
    lines += [md_table(hs), ""]
    rk = (b.groupby(["roof_kind", "roof_kind_source"], observed=True)
          .agg(n_buildings=("building_id", "count"),
               footprint_area_m2=("footprint_area_m2", "sum"),
               capacity_mw=("capacity_kwp", "sum"))
          .reset_index())
    rk["capacity_mw"] = rk["capacity_mw"] / 1000.0
    lines += [md_table(rk, floatfmt="{:,.2f}"), ""]

    share = pd.to_numeric(b["unshaded_share"], errors="coerce")
    cap = b["capacity_kwp"].to_numpy(dtype=float)
    shaded = (b["horizon_max_deg"] > 0) if "horizon_max_deg" in b else share < 1
    g = b.assign(shaded=shaded, share=share, w=cap * share.fillna(1.0),
                 out=b["unsuitable_reason"].astype(str).str.startswith("shaded by neighbours"))
    sh = g.groupby("district_name", observed=True).agg(
        n_buildings=("building_id", "count"), n_with_taller_neighbours=("shaded", "sum"),
        median_unshaded_share=("share", "median"),
        n_below_threshold=("out", "sum"), capacity_kwp=("capacity_kwp", "sum"),
        w=("w", "sum")).reset_index()
    with np.errstate(invalid="ignore", divide="ignore"):
        sh["capacity_weighted_loss_pct"] = np.where(
            sh["capacity_kwp"] > 0, 100.0 * (1.0 - sh["w"] / sh["capacity_kwp"]), 0.0)
    sh = sh.drop(columns=["w", "capacity_kwp"])
    lines += ["## Shading by neighbouring buildings", "",
              "Horizon of taller buildings within `shading.radius_m` of each roof; loss of "
              "annual irradiation on the PV planes (beam blocked per sun position of the "
              "weather file, sky diffuse reduced by the hidden sky). Planes below "
              f"{min_unshaded_share:.0%} of their unshaded irradiation carry no PV "
              "(NREL rule). The yield's PVWatts `shading_pct` covers only shading within "
              "the array.", "", md_table(sh, floatfmt="{:,.3f}"), ""]

    un = b[~b["suitable"].astype(bool)]
    lines += ["## Unsuitable roofs", "",
              f"{len(un)} of {len(b)} roofs carry no PV, by reason:", ""]
    if len(un):
        reason = un["unsuitable_reason"].astype(str).str.replace(
            r"shaded by neighbours: \d+% of the unshaded irradiation, below",
            "shaded by neighbours: below", regex=True)
        ur = (un.assign(reason=reason).groupby("reason", observed=True)
              .agg(n_buildings=("building_id", "count"),
                   footprint_area_m2=("footprint_area_m2", "sum"))
              .reset_index().sort_values("n_buildings", ascending=False))
        lines += [md_table(ur), ""]

    if set(ENERGY_MONTH_COLUMNS) <= set(b.columns):
        m = b.groupby("district_name", observed=True)[list(ENERGY_MONTH_COLUMNS)].sum()
        m = m[m.sum(axis=1) > 0]
        m.columns = list(MONTHS)
        m["year"] = m.sum(axis=1)
        lines += ["## Monthly energy by district", "",
                  "AC energy of the full usable capacity per month [MWh] (typical year, "
                  "shading included).", "", md_table(m.reset_index(), floatfmt="{:,.1f}"), ""]
    return lines
