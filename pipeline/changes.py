"""Change report: what changed since the previous run that wrote outputs.

Each run that writes the GeoPackage also keeps a snapshot of its buildings
and district verdicts in its run folder (``outputs/runs/<run_id>/``); the next
run compares against it.

Building identity across runs is ``building_key``: the ``building_id``
(``<source>:<source_id>``) for sources with an id field, and
``<source>:geom:<hash>`` of the footprint (coordinates on a 1 cm grid,
normalised ring order) for sources without one, whose row numbers are not
stable.

Outputs

==================================  ========  ==========================================
column (layer ``changes``)          unit      meaning
==================================  ========  ==========================================
building_key                        -         identity across runs (see above)
building_id                         -         id in this run (previous run if removed)
change                              -         added, removed or changed
changed_fields                      -         geometry, type and/or capacity
district_name                       -         district (previous run's if removed)
building_type_previous              -         type in the previous run
building_type                       -         type in this run
capacity_previous_kwp               kWp       capacity in the previous run (0 if added)
capacity_kwp                        kWp       capacity in this run (0 if removed)
capacity_delta_kwp                  kWp       this run - previous run
energy_delta_mwh_per_year           MWh/yr    this run - previous run
geometry                            m         footprint (previous one if removed)
==================================  ========  ==========================================

===================================  ======  ===========================================
column (table ``changes_districts``)  unit    meaning
===================================  ======  ===========================================
district_name                        -       district
n_added, n_removed, n_changed        -       buildings added, removed, changed
capacity_previous_kwp                kWp     district capacity in the previous run
capacity_kwp                         kWp     in this run
capacity_delta_kwp                   kWp     this run - previous run
energy_delta_mwh_per_year            MWh/yr  this run - previous run
target_verdict_previous              -       target verdict in the previous run
rule_verdict_previous                -       coverage-rule verdict in the previous run
verdict_flipped                      -       a target or rule verdict changed
===================================  ======  ===========================================
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import geopandas as gpd
import numpy as np
import pandas as pd
import shapely

from pipeline.config import PipelineConfig

log = logging.getLogger(__name__)

#: Grid the footprint coordinates are snapped to for the geometry key [m].
GEOMETRY_KEY_GRID_M = 0.01
#: Capacity differences below this are float noise, not changes [kWp].
CAPACITY_TOLERANCE_KWP = 1e-6
SNAPSHOT_COLUMNS = ("building_key", "building_id", "source", "district_name", "building_type",
                    "capacity_kwp", "energy_mwh_per_year", "geometry_key")
CHANGE_COLUMNS = ("building_key", "building_id", "change", "changed_fields", "district_name",
                  "building_type_previous", "building_type", "capacity_previous_kwp",
                  "capacity_kwp", "capacity_delta_kwp", "energy_delta_mwh_per_year")
DISTRICT_COLUMNS = ("district_name", "n_added", "n_removed", "n_changed",
                    "capacity_previous_kwp", "capacity_kwp", "capacity_delta_kwp",
                    "energy_delta_mwh_per_year", "target_verdict_previous", "target_verdict",
                    "rule_verdict_previous", "rule_verdict", "verdict_flipped")


def geometry_keys(geometry: gpd.GeoSeries, grid_m: float = GEOMETRY_KEY_GRID_M) -> np.ndarray:
    """A hash of each footprint that survives rewriting the same shape.

    Parameters
    ----------
    geometry : GeoSeries
        Footprints in a metric CRS [m].
    grid_m : float
        Coordinates are snapped to this grid first [m].

    Returns
    -------
    ndarray of str
        16 hex digits per footprint (``"none"`` for a missing one); the same
        polygon with another start vertex or ring direction hashes alike.
    """
    geoms = shapely.normalize(shapely.set_precision(geometry.array, grid_m))
    wkb = shapely.to_wkb(geoms, hex=False)
    return np.array(["none" if b is None else hashlib.sha1(b).hexdigest()[:16] for b in wkb],
                    dtype=object)


def building_keys(buildings: gpd.GeoDataFrame, sources_without_id: set[str]) -> np.ndarray:
    """Identity of each building across runs.

    Parameters
    ----------
    buildings : GeoDataFrame
        ``building_id``, ``source`` and footprints.
    sources_without_id : set of str
        Sources whose ids are row numbers (no ``id_field``).

    Returns
    -------
    ndarray of str
        ``building_id``, or ``<source>:geom:<geometry key>`` (with ``#n``
        appended to repeated footprints) for the sources without ids.
    """
    keys = buildings["building_id"].astype(str).to_numpy(dtype=object)
    no_id = buildings["source"].isin(sources_without_id).to_numpy()
    if no_id.any():
        gk = geometry_keys(buildings.geometry[no_id])
        base = (buildings["source"].to_numpy(dtype=object)[no_id] + ":geom:" + gk).astype(str)
        rank = pd.Series(base).groupby(base).cumcount().to_numpy()
        keys[no_id] = np.where(rank > 0, np.char.add(np.char.add(base, "#"), rank.astype(str)),
                               base)
    return keys


def snapshot(buildings: gpd.GeoDataFrame, cfg: PipelineConfig) -> gpd.GeoDataFrame:
    """What the next run compares against: identity, type, capacity, footprint.

    Parameters
    ----------
    buildings : GeoDataFrame
        The yield stage's buildings.
    cfg : PipelineConfig
        The configuration (which sources have ids).

    Returns
    -------
    GeoDataFrame
        :data:`SNAPSHOT_COLUMNS` and the geometry.
    """
    no_id = {s.name for s in cfg.sources if s.id_field is None}
    out = gpd.GeoDataFrame({
        "building_key": building_keys(buildings, no_id),
        "building_id": buildings["building_id"].astype(str).to_numpy(),
        "source": buildings["source"].astype(str).to_numpy(),
        "district_name": buildings["district_name"].astype(object).to_numpy(),
        "building_type": buildings["building_type"].astype(object).to_numpy(),
        "capacity_kwp": buildings["capacity_kwp"].to_numpy(dtype=float),
        "energy_mwh_per_year": np.nan_to_num(
            buildings["energy_mwh_per_year"].to_numpy(dtype=float)),
        "geometry_key": geometry_keys(buildings.geometry),
    }, geometry=buildings.geometry.to_numpy(), crs=buildings.crs)
    return out


def district_snapshot(dlayer: pd.DataFrame) -> pd.DataFrame:
    """District verdicts of a run: ``district_name``, ``target_verdict``, ``rule_verdict``."""
    out = pd.DataFrame({"district_name": dlayer["district_name"].astype(str).to_numpy()})
    for col in ("target_verdict", "rule_verdict"):
        out[col] = (dlayer[col].astype(object).where(dlayer[col].notna(), None).to_numpy()
                    if col in dlayer else None)
    return out


def compare(previous: gpd.GeoDataFrame, current: gpd.GeoDataFrame) -> gpd.GeoDataFrame:
    """Buildings added, removed and changed between two snapshots.

    Parameters
    ----------
    previous, current : GeoDataFrame
        Outputs of :func:`snapshot`.

    Returns
    -------
    GeoDataFrame
        One row per added, removed or changed building (:data:`CHANGE_COLUMNS`
        and the geometry), sorted by change and key.
    """
    p = previous.set_index("building_key")
    c = current.set_index("building_key")
    added = c.index.difference(p.index)
    removed = p.index.difference(c.index)
    both = c.index.intersection(p.index)
    pb, cb = p.loc[both], c.loc[both]
    geom_changed = (pb["geometry_key"] != cb["geometry_key"]).to_numpy()
    type_changed = (pb["building_type"].astype(str) != cb["building_type"].astype(str)).to_numpy()
    cap_changed = np.abs(cb["capacity_kwp"].to_numpy() - pb["capacity_kwp"].to_numpy()) \
        > CAPACITY_TOLERANCE_KWP
    fields = np.array([",".join(n for n, f in zip(("geometry", "type", "capacity"), flags,
                                                   strict=True) if f)
                       for flags in zip(geom_changed, type_changed, cap_changed, strict=True)],
                      dtype=object)
    changed = both[fields != ""]
    fields = fields[fields != ""]

    def rows(keys: pd.Index, kind: str, changed_fields: np.ndarray | None = None) -> pd.DataFrame:
        new = c.reindex(keys)
        old = p.reindex(keys)
        here = old if kind == "removed" else new
        return pd.DataFrame({
            "building_key": keys.to_numpy(dtype=object),
            "building_id": here["building_id"].to_numpy(dtype=object),
            "change": kind,
            "changed_fields": (changed_fields if changed_fields is not None
                               else np.full(len(keys), "", dtype=object)),
            "district_name": here["district_name"].to_numpy(dtype=object),
            "building_type_previous": old["building_type"].to_numpy(dtype=object),
            "building_type": new["building_type"].to_numpy(dtype=object),
            "capacity_previous_kwp": old["capacity_kwp"].fillna(0.0).to_numpy(dtype=float),
            "capacity_kwp": new["capacity_kwp"].fillna(0.0).to_numpy(dtype=float),
            "energy_delta_mwh_per_year": (new["energy_mwh_per_year"].fillna(0.0).to_numpy()
                                          - old["energy_mwh_per_year"].fillna(0.0).to_numpy()),
            "geometry": here.geometry.to_numpy(),
        })

    frames = [rows(added, "added"), rows(removed, "removed"), rows(changed, "changed", fields)]
    out = pd.concat(frames, ignore_index=True)
    out["capacity_delta_kwp"] = out["capacity_kwp"] - out["capacity_previous_kwp"]
    out = out[[*CHANGE_COLUMNS, "geometry"]]
    order = {"added": 0, "removed": 1, "changed": 2}
    out = out.sort_values(["change", "building_key"], key=lambda s: s.map(order)
                          if s.name == "change" else s, kind="stable").reset_index(drop=True)
    return gpd.GeoDataFrame(out, geometry="geometry", crs=current.crs)


def district_deltas(previous: pd.DataFrame, current: pd.DataFrame, changes: pd.DataFrame,
                    previous_districts: pd.DataFrame, current_districts: pd.DataFrame
                    ) -> pd.DataFrame:
    """Per-district counts, capacity and energy deltas, and flipped verdicts.

    Parameters
    ----------
    previous, current : DataFrame
        Building snapshots (:func:`snapshot`).
    changes : DataFrame
        Output of :func:`compare`.
    previous_districts, current_districts : DataFrame
        District snapshots (:func:`district_snapshot`).

    Returns
    -------
    DataFrame
        :data:`DISTRICT_COLUMNS`, one row per district of either run that has
        buildings or changes; capacity deltas are [kWp], energy [MWh/yr].
    """
    def sums(snap: pd.DataFrame) -> pd.DataFrame:
        return snap.groupby("district_name", dropna=False).agg(
            capacity_kwp=("capacity_kwp", "sum"), energy=("energy_mwh_per_year", "sum"))

    ps, cs = sums(previous), sums(current)
    names = sorted({*ps.index.dropna(), *cs.index.dropna(),
                    *changes["district_name"].dropna()}, key=str)
    counts = changes.groupby(["district_name", "change"]).size().unstack(fill_value=0)
    for kind in ("added", "removed", "changed"):
        if kind not in counts:
            counts[kind] = 0
    pdist = previous_districts.set_index("district_name")
    cdist = current_districts.set_index("district_name")
    out = pd.DataFrame({"district_name": names})
    idx = pd.Index(names)
    out["n_added"] = counts["added"].reindex(idx, fill_value=0).to_numpy(dtype="int64")
    out["n_removed"] = counts["removed"].reindex(idx, fill_value=0).to_numpy(dtype="int64")
    out["n_changed"] = counts["changed"].reindex(idx, fill_value=0).to_numpy(dtype="int64")
    out["capacity_previous_kwp"] = ps["capacity_kwp"].reindex(idx, fill_value=0.0).to_numpy()
    out["capacity_kwp"] = cs["capacity_kwp"].reindex(idx, fill_value=0.0).to_numpy()
    out["capacity_delta_kwp"] = out["capacity_kwp"] - out["capacity_previous_kwp"]
    out["energy_delta_mwh_per_year"] = (cs["energy"].reindex(idx, fill_value=0.0).to_numpy()
                                        - ps["energy"].reindex(idx, fill_value=0.0).to_numpy())
    for col in ("target_verdict", "rule_verdict"):
        prev = pdist[col].reindex(idx) if col in pdist else pd.Series(None, index=idx)
        cur = cdist[col].reindex(idx) if col in cdist else pd.Series(None, index=idx)
        out[f"{col}_previous"] = prev.astype(object).where(prev.notna(), None).to_numpy()
        out[col] = cur.astype(object).where(cur.notna(), None).to_numpy()
    flipped = np.zeros(len(out), dtype=bool)
    for col in ("target_verdict", "rule_verdict"):
        a, b = out[f"{col}_previous"], out[col]
        flipped |= (a.notna() & b.notna() & (a != b)).to_numpy()
    out["verdict_flipped"] = flipped
    return out[list(DISTRICT_COLUMNS)]


def load_previous(run_dir: Path | None) -> tuple[gpd.GeoDataFrame, pd.DataFrame] | None:
    """The building and district snapshots of a previous run folder (None if absent)."""
    from pipeline.runs import SNAPSHOT_BUILDINGS, SNAPSHOT_DISTRICTS

    if run_dir is None or not (run_dir / SNAPSHOT_BUILDINGS).is_file():
        return None
    return (gpd.read_parquet(run_dir / SNAPSHOT_BUILDINGS),
            pd.read_parquet(run_dir / SNAPSHOT_DISTRICTS))


def markdown(changes: pd.DataFrame, deltas: pd.DataFrame, previous_run: str | None,
             run_id: str | None) -> str:
    """The report section "Changes since the previous run".

    Parameters
    ----------
    changes : DataFrame
        Output of :func:`compare`.
    deltas : DataFrame
        Output of :func:`district_deltas`.
    previous_run : str or None
        Id of the run compared against (None: first run).
    run_id : str or None
        This run's id.

    Returns
    -------
    str
        Markdown.
    """
    from pipeline.report import _md_table

    lines = ["## Changes since the previous run", ""]
    if run_id:
        lines += [f"Run `{run_id}`; its record is `outputs/runs/{run_id}/manifest.json`.", ""]
    if previous_run is None:
        lines += ["No previous run to compare with: this is the first run that wrote outputs "
                  "(or the earlier ones were pruned).", ""]
        return "\n".join(lines)
    n = changes["change"].value_counts()
    lines += [f"Compared with run `{previous_run}`: {int(n.get('added', 0))} buildings added, "
              f"{int(n.get('removed', 0))} removed, {int(n.get('changed', 0))} changed "
              "(geometry, type or capacity); the `changes` layer lists them and "
              "`changes_districts` the table below.", ""]
    active = deltas[(deltas[["n_added", "n_removed", "n_changed"]].sum(axis=1) > 0)
                    | (deltas["capacity_delta_kwp"].abs() > CAPACITY_TOLERANCE_KWP)
                    | deltas["verdict_flipped"]]
    if len(active):
        view = active[["district_name", "n_added", "n_removed", "n_changed",
                       "capacity_previous_kwp", "capacity_kwp", "capacity_delta_kwp",
                       "energy_delta_mwh_per_year"]]
        lines += [_md_table(pd.DataFrame(view), floatfmt="{:,.2f}"), ""]
    else:
        lines += ["Nothing changed.", ""]
    flips = deltas[deltas["verdict_flipped"]]
    if len(flips):
        lines += ["Verdicts that flipped:", "",
                  _md_table(pd.DataFrame(flips[["district_name", "target_verdict_previous",
                                                "target_verdict", "rule_verdict_previous",
                                                "rule_verdict"]])), ""]
    else:
        lines += ["No target or coverage-rule verdict flipped.", ""]
    return "\n".join(lines)


def run_provenance() -> dict[str, str]:
    """``run_id`` and ``previous_run_id`` of the run in progress (empty outside a run)."""
    from pipeline import runs

    record = runs.current()
    if record is None:
        return {}
    return {"run_id": record.run_id,
            "previous_run_id": record.previous_dir.name if record.previous_dir else ""}


def report_changes(cfg: PipelineConfig, buildings: gpd.GeoDataFrame, dlayer: pd.DataFrame
                   ) -> tuple[dict[str, pd.DataFrame], str]:
    """The report stage's hook: layers ``changes``, ``changes_districts``, ``run``.

    Compares with the previous run that wrote outputs and stores this run's
    snapshot in its run folder (only inside a run, see :mod:`pipeline.runs`).

    Parameters
    ----------
    cfg : PipelineConfig
        The configuration.
    buildings : GeoDataFrame
        The yield stage's buildings.
    dlayer : DataFrame
        The district layer with its verdicts.

    Returns
    -------
    layers : dict
        Layer name to frame, for the GeoPackage.
    markdown : str
        The report section.
    """
    from pipeline import runs

    record = runs.current()
    current = snapshot(buildings, cfg)
    cur_d = district_snapshot(dlayer)
    prev = load_previous(record.previous_dir if record else None)
    if prev is None:
        previous, prev_d, prev_id = current.iloc[:0], cur_d.iloc[:0], None
    else:
        previous, prev_d = prev
        prev_id = record.previous_dir.name
    changes = compare(previous, current) if prev is not None else compare(current, current)
    deltas = district_deltas(previous if prev is not None else current, current, changes,
                             prev_d if prev is not None else cur_d, cur_d)
    layers: dict[str, pd.DataFrame] = {"changes": changes, "changes_districts": deltas}
    run_id = record.run_id if record else None
    if record is not None:
        from pipeline.io import write_parquet_atomic

        record.dir.mkdir(parents=True, exist_ok=True)
        write_parquet_atomic(current, record.dir / runs.SNAPSHOT_BUILDINGS)
        write_parquet_atomic(cur_d, record.dir / runs.SNAPSHOT_DISTRICTS)
        m = record.manifest
        layers["run"] = pd.DataFrame([{
            "run_id": record.run_id, "started": m["started"],
            "previous_run_id": prev_id or "", "config_path": m["config"]["path"],
            "config_sha256": m["config"]["sha256"], "config_hash": m["config"]["hash"],
            "rooftop_pv_version": m["packages"].get("rooftop-pv", ""),
            "host": m["host"]["hostname"],
        }])
        m["changes"] = {"previous_run": prev_id,
                        **{k: int(v) for k, v in changes["change"].value_counts().items()},
                        "capacity_delta_kwp": float(deltas["capacity_delta_kwp"].sum()),
                        "verdicts_flipped": deltas.loc[deltas["verdict_flipped"],
                                                       "district_name"].tolist()}
    log.info("changes since %s: %s", prev_id or "no previous run",
             {k: int(v) for k, v in changes["change"].value_counts().items()} or "none")
    return layers, markdown(changes, deltas, prev_id, run_id)
