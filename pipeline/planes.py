"""Roof planes: one row per PV plane, for the per-class yield join.

A building carries at most two planes (roof stage): plane 1 with
``tilt_deg``/``azimuth_deg`` and plane 2 with the same tilt and
``azimuth_2_deg``. Its capacities are totals with the plane-2 part in
``capacity_2_kwp``/``capacity_policy_2_kwp``; the shading stage adds each
plane's ``unshaded_share``/``unshaded_share_2`` (1 where absent). Yield is
computed once per (tilt, azimuth) class; here each plane gets its class
yield (``pipeline.pvyield.join_yield``, unchanged) times its unshaded share,
and the planes are summed back per building.

Outputs added to the buildings

===============================  ========  ========================================
column                           unit      meaning
===============================  ========  ========================================
``specific_yield_kwh_per_kwp``   kWh/kWp   energy / capacity (capacity-weighted over
                                           the planes, shading included); for roofs
                                           without capacity: plane 1's class yield x
                                           its unshaded share (NaN: no orientation)
``energy_mwh_per_year``          MWh/yr    sum over planes of capacity x class yield
                                           x unshaded share
``energy_policy_mwh_per_year``   MWh/yr    same for the policy capacity
``energy_m01_mwh`` ... ``m12``   MWh       monthly energy of ``capacity_kwp``
===============================  ========  ========================================
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from pipeline.pvyield import ENERGY_MONTH_COLUMNS, MONTH_COLUMNS, _lookup, join_yield


def plane_rows(buildings: pd.DataFrame) -> pd.DataFrame:
    """Explode buildings into one row per plane.

    Parameters
    ----------
    buildings : DataFrame
        ``tilt_deg``, ``azimuth_deg`` [deg], ``capacity_kwp``,
        ``capacity_policy_kwp`` [kWp] and optionally ``azimuth_2_deg`` [deg],
        ``capacity_2_kwp``, ``capacity_policy_2_kwp`` [kWp],
        ``unshaded_share``, ``unshaded_share_2`` [-].

    Returns
    -------
    DataFrame
        ``row`` (position in ``buildings``), ``plane`` (1 or 2), ``tilt_deg``,
        ``azimuth_deg`` [deg], ``capacity_kwp``, ``capacity_policy_kwp``
        [kWp], ``unshaded_share`` [-]; plane 2 only where ``azimuth_2_deg``
        is set.
    """
    n = len(buildings)

    def col(name: str, default: float) -> np.ndarray:
        if name not in buildings:
            return np.full(n, default)
        return pd.to_numeric(buildings[name], errors="coerce").to_numpy(dtype=float)

    cap, cap_pol = col("capacity_kwp", 0.0), col("capacity_policy_kwp", 0.0)
    cap2 = np.nan_to_num(col("capacity_2_kwp", 0.0))
    pol2 = np.nan_to_num(col("capacity_policy_2_kwp", 0.0))
    az2 = col("azimuth_2_deg", np.nan)
    s1 = np.nan_to_num(col("unshaded_share", 1.0), nan=1.0)
    s2 = np.nan_to_num(col("unshaded_share_2", 1.0), nan=1.0)
    tilt = col("tilt_deg", np.nan)
    two = np.isfinite(az2)
    p1 = pd.DataFrame({"row": np.arange(n), "plane": 1, "tilt_deg": tilt,
                       "azimuth_deg": col("azimuth_deg", np.nan),
                       "capacity_kwp": cap - cap2, "capacity_policy_kwp": cap_pol - pol2,
                       "unshaded_share": s1})
    p2 = pd.DataFrame({"row": np.flatnonzero(two), "plane": 2, "tilt_deg": tilt[two],
                       "azimuth_deg": az2[two], "capacity_kwp": cap2[two],
                       "capacity_policy_kwp": pol2[two], "unshaded_share": s2[two]})
    return pd.concat([p1, p2], ignore_index=True)


def join_plane_yield(buildings: pd.DataFrame, table: pd.DataFrame, step_deg: float
                     ) -> pd.DataFrame:
    """Kernel: energy per building as the sum over its planes (shading included).

    Parameters
    ----------
    buildings : DataFrame
        Roof/shading-stage buildings (see :func:`plane_rows`).
    table : DataFrame
        :func:`pipeline.pvyield.class_yield` of all plane orientations.
    step_deg : float
        Orientation class width [deg].

    Returns
    -------
    DataFrame
        A copy of ``buildings`` with the columns in the module table.
    """
    out = buildings.copy()
    n = len(out)
    planes = plane_rows(out)
    joined = join_yield(planes, table, step_deg)
    share = planes["unshaded_share"].to_numpy()
    rows = planes["row"].to_numpy()
    energy = np.bincount(rows, joined["energy_mwh_per_year"].to_numpy() * share, minlength=n)
    energy_pol = np.bincount(rows, joined["energy_policy_mwh_per_year"].to_numpy() * share,
                             minlength=n)
    first = planes["plane"].to_numpy() == 1
    fallback = np.full(n, np.nan)
    fallback[rows[first]] = (joined["specific_yield_kwh_per_kwp"].to_numpy() * share)[first]
    cap = pd.to_numeric(out["capacity_kwp"], errors="coerce").to_numpy(dtype=float)
    with np.errstate(invalid="ignore", divide="ignore"):
        specific = np.where(cap > 0, energy * 1000.0 / cap, fallback)
    out["specific_yield_kwh_per_kwp"] = specific
    out["energy_mwh_per_year"] = energy
    out["energy_policy_mwh_per_year"] = energy_pol
    pos = _lookup(planes, table, step_deg)
    has = pos >= 0
    monthly = table.loc[:, list(MONTH_COLUMNS)].to_numpy(dtype=float)
    pcap = planes["capacity_kwp"].to_numpy(dtype=float)
    ok = has & np.isfinite(pcap)
    per_plane = np.zeros((len(planes), 12))
    per_plane[ok] = monthly[pos[ok]] * (pcap[ok] * share[ok])[:, None] / 1000.0
    for m, name in enumerate(ENERGY_MONTH_COLUMNS):
        out[name] = np.bincount(rows, per_plane[:, m], minlength=n)
    return out
