"""Change report: what changed since the previous run that wrote outputs.

Each run that writes the GeoPackage also keeps a snapshot of its buildings
and district verdicts in its run folder (``outputs/runs/<run_id>/``); the next
run compares against it.

Building identity across runs is ``building_key``: the ``building_id``
(``<source>:<source_id>``) for sources with an id field, and
``<source>:geom:<hash>`` of the footprint (its edges, vertices on a 1 cm
grid, whatever the start vertex and ring direction) for sources without one,
whose row numbers are not stable. A previous run's snapshot is re-keyed from
its stored footprints, so a change of the key's definition between versions
reads as no change.

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

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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
#: Definition of :func:`geometry_keys`, stored with each snapshot (1: hash of the
#: normalised WKB after ``shapely.set_precision``, snapshots without the column;
#: 2: hash of the snapped edges).
GEOMETRY_KEY_VERSION = 2
#: Columns of the yield stage's buildings that :func:`snapshot` reads.
SNAPSHOT_INPUT_COLUMNS = ("building_id", "source", "district_name", "building_type",
                          "capacity_kwp", "energy_mwh_per_year", "geometry")
SNAPSHOT_COLUMNS = ("building_key", "building_id", "source", "district_name", "building_type",
                    "capacity_kwp", "energy_mwh_per_year", "geometry_key", "geometry_key_version")
CHANGE_COLUMNS = ("building_key", "building_id", "change", "changed_fields", "district_name",
                  "building_type_previous", "building_type", "capacity_previous_kwp",
                  "capacity_kwp", "capacity_delta_kwp", "energy_delta_mwh_per_year")
DISTRICT_COLUMNS = ("district_name", "n_added", "n_removed", "n_changed",
                    "capacity_previous_kwp", "capacity_kwp", "capacity_delta_kwp",
                    "energy_delta_mwh_per_year", "target_verdict_previous", "target_verdict",
                    "rule_verdict_previous", "rule_verdict", "verdict_flipped")


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser, in place: a bijective scramble of 64-bit integers."""
    x ^= x >> np.uint64(30)
    x *= np.uint64(0xBF58476D1CE4E5B9)
    x ^= x >> np.uint64(27)
    x *= np.uint64(0x94D049BB133111EB)
    x ^= x >> np.uint64(31)
    return x


def _rings(geoms: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The rings (and lines) of each geometry, and the geometry each belongs to.

    Polygons without holes, nearly all footprints, are their own one ring
    (their coordinates are the exterior's); the others are split into parts
    and rings.
    """
    type_id = shapely.get_type_id(geoms)
    simple = (type_id == shapely.GeometryType.POLYGON) & (shapely.get_num_interior_rings(geoms)
                                                          == 0)
    pieces, owner = [geoms[simple]], [np.flatnonzero(simple)]
    rest = np.flatnonzero(~simple & (type_id >= 0))
    if len(rest):
        parts, p_idx = shapely.get_parts(geoms[rest], return_index=True)
        poly = shapely.get_type_id(parts) == shapely.GeometryType.POLYGON
        rings, r_idx = shapely.get_rings(parts[poly], return_index=True)
        pieces += [rings, parts[~poly]]
        owner += [rest[p_idx[poly][r_idx]], rest[p_idx[~poly]]]
    return np.concatenate(pieces), np.concatenate(owner)


def geometry_keys(geometry: gpd.GeoSeries, grid_m: float = GEOMETRY_KEY_GRID_M) -> np.ndarray:
    """A hash of each footprint that survives rewriting the same shape.

    The key hashes the multiset of the footprint's edges, vertices snapped to
    a grid, each edge taken without direction and zero-length edges (repeated
    vertices) dropped. It therefore ignores the start vertex and direction of
    each ring and the order of rings and parts, as hashing
    ``normalize(set_precision(geometry, grid_m))`` did, but it is computed on
    the coordinate arrays (20x faster; ``tests/test_runs.py`` compares the
    two): splitmix64 hashes of the vertices, of each edge's (smaller, larger)
    vertex hash pair, summed per footprint in two 32-bit lanes.

    Parameters
    ----------
    geometry : GeoSeries
        Footprints in a metric CRS [m].
    grid_m : float
        Coordinates are snapped to this grid first [m].

    Returns
    -------
    ndarray of str
        16 hex digits per footprint (``"none"`` for a missing one, ``"empty"``
        for one without edges).
    """
    geoms = np.asarray(geometry.array, dtype=object)
    n = len(geoms)
    keys = np.full(n, "none", dtype=object)
    present = ~shapely.is_missing(geoms)
    if not present.any():
        return keys
    # in chunks: the vertex arrays of one stay in cache (2x faster at 1M footprints)
    digest, count = np.empty(n, dtype=np.uint64), np.empty(n, dtype=np.uint64)
    for start in range(0, n, KEY_CHUNK):
        part = slice(start, min(start + KEY_CHUNK, n))
        digest[part], count[part] = _edge_digest(geoms[part], grid_m)
    hexed = np.frombuffer(digest.astype(">u8").tobytes().hex().encode("ascii"), dtype="S16")
    keys[present] = np.where(count[present] > 0, hexed[present].astype(str).astype(object),
                             "empty")
    return keys


#: Footprints hashed at a time by :func:`geometry_keys`.
KEY_CHUNK = 50_000


def _edge_digest(geoms: np.ndarray, grid_m: float) -> tuple[np.ndarray, np.ndarray]:
    """64-bit digest of each geometry's snapped edge multiset, and its edge count."""
    n = len(geoms)
    rings, ring_owner = _rings(geoms)
    coords, idx = shapely.get_coordinates(rings, return_index=True)
    coords *= 1.0 / grid_m
    np.rint(coords, out=coords)
    grid = coords.astype(np.int64).view(np.uint64)  # grid units
    vertex = _mix64(grid[:, 1].copy())
    vertex ^= grid[:, 0]
    _mix64(vertex)
    # edges: consecutive vertices of one ring, not repeated points
    edge = (idx[1:] == idx[:-1]) & (vertex[1:] != vertex[:-1])
    a, b = vertex[:-1][edge], vertex[1:][edge]
    h = _mix64(np.maximum(a, b))
    h ^= np.minimum(a, b)
    _mix64(h)
    owner = ring_owner[idx[:-1][edge]]
    # order-free sum per footprint, exact in float64 (< 2**21 edges of < 2**32 each)
    lo = np.bincount(owner, weights=(h & np.uint64(0xFFFFFFFF)).astype(float), minlength=n)
    hi = np.bincount(owner, weights=(h >> np.uint64(32)).astype(float), minlength=n)
    count = np.bincount(owner, minlength=n).astype(np.uint64)
    total = ((hi.astype(np.uint64) & np.uint64(0xFFFFFFFF)) << np.uint64(32)) \
        | (lo.astype(np.uint64) & np.uint64(0xFFFFFFFF))
    total ^= _mix64(count.copy())
    return _mix64(total), count


def building_keys(buildings: gpd.GeoDataFrame, sources_without_id: set[str],
                  geometry_key: np.ndarray | None = None) -> np.ndarray:
    """Identity of each building across runs.

    Parameters
    ----------
    buildings : GeoDataFrame
        ``building_id``, ``source`` and footprints.
    sources_without_id : set of str
        Sources whose ids are row numbers (no ``id_field``).
    geometry_key : ndarray of str, optional
        :func:`geometry_keys` of the footprints, if already computed.

    Returns
    -------
    ndarray of str
        ``building_id``, or ``<source>:geom:<geometry key>`` (with ``#n``
        appended to repeated footprints) for the sources without ids.
    """
    keys = buildings["building_id"].astype(str).to_numpy(dtype=object)
    no_id = buildings["source"].isin(sources_without_id).to_numpy()
    if no_id.any():
        gk = (geometry_key[no_id] if geometry_key is not None
              else geometry_keys(buildings.geometry[no_id]))
        base = (buildings["source"].astype(str).to_numpy(dtype=object)[no_id] + ":geom:"
                + gk).astype(str)
        rank = pd.Series(base).groupby(base).cumcount().to_numpy()
        keys[no_id] = np.where(rank > 0, np.char.add(np.char.add(base, "#"), rank.astype(str)),
                               base)
    return keys


def rekey(snap: pd.DataFrame) -> pd.DataFrame:
    """A snapshot with its keys of this version's definition.

    A previous run's snapshot may hold keys of another definition
    (:data:`GEOMETRY_KEY_VERSION`); keys of both runs must come from one, or
    every building would read as changed (and, for sources without ids, as
    removed and added again). Such keys are recomputed from the stored
    footprints; the sources keyed by geometry are those whose stored keys say
    so (``<source>:geom:...``). A snapshot of this version is returned as is.

    Parameters
    ----------
    snap : DataFrame
        Output of :func:`snapshot` (of any version), footprints as geometries
        or WKB (:func:`load_previous`).

    Returns
    -------
    DataFrame
        The same rows with ``geometry_key`` and ``building_key`` of this version.
    """
    version = snap.get("geometry_key_version")
    if version is not None and (version == GEOMETRY_KEY_VERSION).all():
        return snap
    out = snap.copy()
    gk = geometry_keys(gpd.GeoSeries(_footprints(out)))
    source, key = out["source"].astype(str), out["building_key"].astype(str)
    by_geom = {src for src in source.unique()
               if key[source == src].str.startswith(f"{src}:geom:").any()}
    out["geometry_key"] = gk
    out["building_key"] = building_keys(out, by_geom, gk)
    out["geometry_key_version"] = np.full(len(out), GEOMETRY_KEY_VERSION, dtype="int16")
    log.info("previous run's snapshot re-keyed (geometry key version %d)",
             GEOMETRY_KEY_VERSION)
    return out


def snapshot(buildings: pd.DataFrame, no_id: set[str], keys: np.ndarray) -> pd.DataFrame:
    """What the next run compares against: identity, type, capacity, footprint key.

    Parameters
    ----------
    buildings : DataFrame
        The yield stage's buildings, without footprints (at least
        :data:`SNAPSHOT_INPUT_COLUMNS` but the geometry), the rows of the
        yield file in its order.
    no_id : set of str
        The sources without ids (:func:`sources_without_id`).
    keys : ndarray of str
        :func:`geometry_keys` of the footprints, computed where they are read
        (:class:`pipeline.footprints.Footprints`).

    Returns
    -------
    DataFrame
        :data:`SNAPSHOT_COLUMNS`; :func:`write_snapshot` adds the footprints
        from the yield file.
    """
    return pd.DataFrame({
        "building_key": building_keys(buildings, no_id, keys),
        "building_id": buildings["building_id"].astype(str).to_numpy(),
        "source": buildings["source"].astype(str).to_numpy(),
        "district_name": buildings["district_name"].astype(object).to_numpy(),
        "building_type": buildings["building_type"].astype(object).to_numpy(),
        "capacity_kwp": buildings["capacity_kwp"].to_numpy(dtype=float),
        "energy_mwh_per_year": np.nan_to_num(
            buildings["energy_mwh_per_year"].to_numpy(dtype=float)),
        "geometry_key": keys,
        "geometry_key_version": np.full(len(buildings), GEOMETRY_KEY_VERSION, dtype="int16"),
    })


def sources_without_id(cfg: PipelineConfig) -> set[str]:
    """Sources whose ids are row numbers (no ``id_field``): keyed by their footprints."""
    return {s.name for s in cfg.sources if s.id_field is None}


def district_snapshot(dlayer: pd.DataFrame) -> pd.DataFrame:
    """District verdicts of a run: ``district_name``, ``target_verdict``, ``rule_verdict``."""
    out = pd.DataFrame({"district_name": dlayer["district_name"].astype(str).to_numpy()})
    for col in ("target_verdict", "rule_verdict"):
        out[col] = (dlayer[col].astype(object).where(dlayer[col].notna(), None).to_numpy()
                    if col in dlayer else None)
    return out


def compare(previous: gpd.GeoDataFrame, current: gpd.GeoDataFrame, crs: Any = None
            ) -> gpd.GeoDataFrame:
    """Buildings added, removed and changed between two snapshots.

    Parameters
    ----------
    previous, current : GeoDataFrame
        Outputs of :func:`snapshot`; either may hold WKB footprints
        (:func:`load_previous`).
    crs : optional
        CRS of the footprints when ``current`` is not a GeoDataFrame.

    Returns
    -------
    GeoDataFrame
        One row per added, removed or changed building (:data:`CHANGE_COLUMNS`
        and the geometry), sorted by change and key.
    """
    # positions, not labels: one hash lookup of this run's keys in the previous run's (at 1M
    # buildings 0.4 s instead of 1.2-1.5 s for indexing, difference, intersection and .loc of
    # both frames); only the rows that changed are indexed by key, and only their footprints
    # decoded
    pkeys, ckeys = pd.Index(previous["building_key"]), pd.Index(current["building_key"])
    for name, keys in (("previous", pkeys), ("current", ckeys)):
        if not keys.is_unique:
            dup = keys[keys.duplicated()][:3].tolist()
            raise ValueError(f"{name} building snapshot: building_key is not unique ({dup})")
    pos = pkeys.get_indexer(ckeys)  # previous row of each current row, -1 if added
    hit = pos >= 0
    seen = np.zeros(len(pkeys), dtype=bool)
    seen[pos[hit]] = True
    both_c, both_p = np.flatnonzero(hit), pos[hit]

    def values(frame: pd.DataFrame, col: str, rows: np.ndarray, **kw: Any) -> np.ndarray:
        return frame[col].take(rows).to_numpy(**kw)

    geom_changed = (values(previous, "geometry_key", both_p, dtype=object)
                    != values(current, "geometry_key", both_c, dtype=object))
    type_changed = (previous["building_type"].take(both_p).astype(str).to_numpy(dtype=object)
                    != current["building_type"].take(both_c).astype(str).to_numpy(dtype=object))
    cap_changed = np.abs(values(current, "capacity_kwp", both_c, dtype=float)
                         - values(previous, "capacity_kwp", both_p, dtype=float)) \
        > CAPACITY_TOLERANCE_KWP
    # the 8 combinations of the three flags, by code geometry + 2 type + 4 capacity
    names = np.array([",".join(n for n, bit in (("geometry", 1), ("type", 2), ("capacity", 4))
                               if code & bit) for code in range(8)], dtype=object)
    codes = geom_changed.astype(int) + 2 * type_changed + 4 * cap_changed
    moved = codes > 0
    fields = names[codes[moved]]
    c_rows = np.concatenate([np.flatnonzero(~hit), both_c[moved]])
    p_rows = np.concatenate([np.flatnonzero(~seen), both_p[moved]])
    c = current.iloc[np.sort(c_rows)].set_index("building_key")
    p = previous.iloc[np.sort(p_rows)].set_index("building_key")
    added = pd.Index(ckeys[~hit])
    removed = pd.Index(pkeys[~seen])
    changed = pd.Index(ckeys[both_c[moved]])

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
            "geometry": _footprints(here),
        })

    frames = [rows(added, "added"), rows(removed, "removed"), rows(changed, "changed", fields)]
    out = pd.concat(frames, ignore_index=True)
    out["capacity_delta_kwp"] = out["capacity_kwp"] - out["capacity_previous_kwp"]
    out = out[[*CHANGE_COLUMNS, "geometry"]]
    order = {"added": 0, "removed": 1, "changed": 2}
    out = out.sort_values(["change", "building_key"], key=lambda s: s.map(order)
                          if s.name == "change" else s, kind="stable").reset_index(drop=True)
    return gpd.GeoDataFrame(out, geometry="geometry", crs=getattr(current, "crs", None) or crs)


def district_sums(snap: pd.DataFrame) -> pd.DataFrame:
    """Capacity [kWp] and energy [MWh/yr] of a building snapshot per district.

    Parameters
    ----------
    snap : DataFrame
        Output of :func:`snapshot`.

    Returns
    -------
    DataFrame
        Index ``district_name`` (missing names kept); ``capacity_kwp`` [kWp],
        ``energy`` [MWh/yr].
    """
    return snap.groupby("district_name", dropna=False).agg(
        capacity_kwp=("capacity_kwp", "sum"), energy=("energy_mwh_per_year", "sum"))


def district_deltas(ps: pd.DataFrame, cs: pd.DataFrame, changes: pd.DataFrame,
                    previous_districts: pd.DataFrame, current_districts: pd.DataFrame
                    ) -> pd.DataFrame:
    """Per-district counts, capacity and energy deltas, and flipped verdicts.

    Parameters
    ----------
    ps, cs : DataFrame
        :func:`district_sums` of the previous and of this run's building
        snapshot (:func:`snapshot`).
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


def load_previous(run_dir: Path | None) -> tuple[pd.DataFrame, pd.DataFrame] | None:
    """The building and district snapshots of a previous run folder (None if absent).

    The footprints stay WKB (``geometry`` holds bytes): only the removed
    buildings' are needed, and decoding them all took 1.5 s at 1M buildings.
    """
    from pipeline.runs import SNAPSHOT_BUILDINGS, SNAPSHOT_DISTRICTS

    if run_dir is None or not (run_dir / SNAPSHOT_BUILDINGS).is_file():
        return None
    return (read_snapshot(run_dir / SNAPSHOT_BUILDINGS),
            pd.read_parquet(run_dir / SNAPSHOT_DISTRICTS))


def read_snapshot(path: Path) -> pd.DataFrame:
    """A building snapshot file (:func:`write_snapshot`), its footprints as WKB.

    The WKB stays in Arrow memory (``geometry`` of dtype ``binary[pyarrow]``)
    instead of one Python ``bytes`` per building: at 1M buildings 0.5-0.6 s
    instead of 1.1-2.1 s to read; :func:`compare` decodes only the footprints
    of the buildings that changed.
    """
    import pyarrow.parquet as pq

    return _wkb_frame(pq.read_table(path))


def _wkb_frame(table: Any) -> pd.DataFrame:
    """A snapshot's Arrow table as a DataFrame, its WKB left in Arrow memory."""
    import pyarrow as pa

    binary = {pa.binary(): pd.ArrowDtype(pa.binary()),
              pa.large_binary(): pd.ArrowDtype(pa.large_binary())}
    return table.to_pandas(types_mapper=binary.get)


def _footprints(frame: pd.DataFrame) -> np.ndarray:
    """Footprints of a snapshot's rows, whether geometries or WKB (:func:`load_previous`)."""
    if isinstance(frame, gpd.GeoDataFrame):
        return np.asarray(frame.geometry.array, dtype=object)
    if len(frame) == 0:  # also a snapshot made without footprints
        return np.empty(0, dtype=object)
    return shapely.from_wkb(frame["geometry"].to_numpy(dtype=object, na_value=None))


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


@dataclass
class BuildingChanges:
    """The building part of the change report: what :func:`report_changes` needs of it.

    Attributes
    ----------
    changes : GeoDataFrame
        Output of :func:`compare` (the empty table on a first run).
    sums_previous, sums_current : DataFrame
        :func:`district_sums` of the previous run's and of this run's building
        snapshot (this run's for both on a first run).
    previous_districts : DataFrame or None
        The previous run's :func:`district_snapshot`; None on a first run.
    """

    changes: gpd.GeoDataFrame
    sums_previous: pd.DataFrame
    sums_current: pd.DataFrame
    previous_districts: pd.DataFrame | None


def building_changes(current: pd.DataFrame, previous_dir: Path | None,
                     run_dir: Path | None, src: Path, crs: Any) -> BuildingChanges:
    """Compare this run's building snapshot with the previous run's and store it.

    Parameters
    ----------
    current : DataFrame
        This run's :func:`snapshot` (no footprints).
    previous_dir : Path or None
        Folder of the previous run that wrote outputs (None: first run).
    run_dir : Path or None
        This run's folder, where the snapshot is written (atomically; None:
        not in a run, nothing written, and nothing to compare with).
    src : Path
        ``yield_buildings.parquet``, whose rows ``current`` are: the snapshot
        stores its footprints as they are stored there (:func:`write_snapshot`).
    crs : pyproj.CRS
        CRS of the footprints.

    Returns
    -------
    BuildingChanges
    """
    from pipeline.runs import SNAPSHOT_BUILDINGS

    if run_dir is not None:  # compared with its footprints as just written, the file's WKB
        current = _wkb_frame(write_snapshot(current, run_dir / SNAPSHOT_BUILDINGS, src))
    elif previous_dir is not None:
        raise ValueError("building_changes: a snapshot without footprints is compared "
                         "only once written (run_dir)")
    return compare_snapshots(current, previous_dir, crs)


def compare_snapshots(current: pd.DataFrame, previous_dir: Path | None,
                      crs: Any = None) -> BuildingChanges:
    """Compare a building snapshot with the previous run's.

    Parameters
    ----------
    current : DataFrame
        This run's :func:`snapshot`, or the file it was written to read
        back, with WKB footprints (``crs`` then gives their CRS).
    previous_dir : Path or None
        Folder of the previous run that wrote outputs (None: first run).
    crs : optional
        CRS of the footprints, if ``current`` has none.

    Returns
    -------
    BuildingChanges
    """
    prev = load_previous(previous_dir)
    if prev is None:
        # a first run has nothing to compare: the empty table of the same columns and types
        previous, prev_d = current, None
        changes = compare(current.iloc[:0], current.iloc[:0], crs)
    else:
        previous, prev_d = prev
        previous = rekey(previous)  # keys of this version, whatever wrote the snapshot
        changes = compare(previous, current, crs)
    return BuildingChanges(changes, district_sums(previous), district_sums(current), prev_d)


def write_snapshot(snap: gpd.GeoDataFrame, path: Path, src: Path | None = None) -> Any:
    """Write a building snapshot as GeoParquet, atomically.

    Parameters
    ----------
    snap : GeoDataFrame
        :func:`snapshot` (a DataFrame when made without footprints: ``src``
        must then hold its rows).
    path : Path
        The file.
    src : Path, optional
        The GeoParquet the snapshot's rows come from, in the same order:
        its stored WKB is written instead of encoding every footprint again
        (at 1M buildings the snapshot took 5.2 s to write, 2.7 s of it
        encoding). Rows that are not the file's, by count or
        ``building_id``, are encoded.

    Returns
    -------
    pyarrow.Table or None
        What was written, when the WKB came from ``src`` (else None).
    """
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from pipeline.io import atomic_path, write_parquet_atomic

    stored = None
    if src is not None:
        meta = pq.read_metadata(src).metadata or {}  # the file's, as GeoParquetWriter ends it
        geo = json.loads(meta[b"geo"]) if b"geo" in meta else None
        name = geo["primary_column"] if geo else None
        if name is not None:
            stored = pq.read_table(src, columns=["building_id", name])
            ids = pa.array(snap["building_id"].to_numpy(dtype=object), pa.string())
            if (stored.num_rows != len(snap) or not pc.all(pc.equal(
                    stored.column("building_id").cast(pa.string()), ids)).as_py()):
                stored = None
    spatial = isinstance(snap, gpd.GeoDataFrame)
    if stored is None and not spatial:
        raise ValueError(f"{path}: a snapshot without footprints takes them from the yield "
                         "file, but its rows are not that file's")
    if stored is None or (len(snap) == 0 and spatial):
        write_parquet_atomic(snap, path)
        return None
    attrs = snap.drop(columns=snap.geometry.name) if spatial else snap
    table = pa.Table.from_pandas(pd.DataFrame(attrs), preserve_index=False)
    table = table.append_column("geometry", stored.column(name).cast(pa.binary()))
    geo = {**geo, "primary_column": "geometry", "columns": {"geometry": geo["columns"][name]}}
    table = table.replace_schema_metadata({**(table.schema.metadata or {}),
                                           b"geo": json.dumps(geo).encode()})
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, compression="snappy", use_dictionary=False)
    return table


def building_changes_from_file(src: str, no_id: list[str], previous_dir: str | None,
                               run_dir: str | None) -> BuildingChanges:
    """Background task: :func:`building_changes` of the yield stage's file, read here.

    Runs in a second process (:func:`pipeline.parallel.submit_background`)
    while the report stage computes the plan; it reads only
    :data:`SNAPSHOT_INPUT_COLUMNS`. The report's buildings must be the yield
    stage's in these columns (no existing PV taken off their capacity).

    Parameters
    ----------
    src : str
        ``yield_buildings.parquet``.
    no_id : list of str
        Sources without ids (:func:`sources_without_id`).
    previous_dir, run_dir : str or None
        As :func:`building_changes` (:func:`run_dirs`).

    Returns
    -------
    BuildingChanges
    """
    import pyarrow.parquet as pq

    from pipeline.footprints import Footprints

    footprints = Footprints.scan(Path(src))  # a row group at a time
    buildings = pq.read_table(src, columns=[c for c in SNAPSHOT_INPUT_COLUMNS
                                            if c != "geometry"]).to_pandas()
    return building_changes(snapshot(buildings, set(no_id), footprints.keys),
                            Path(previous_dir) if previous_dir else None,
                            Path(run_dir) if run_dir else None, Path(src), footprints.crs)


def building_changes_from_snapshot(path: str, previous_dir: str | None, crs: Any
                                   ) -> BuildingChanges:
    """Background task: :func:`compare_snapshots` of a snapshot the driver wrote.

    The footprints stay WKB; only those of added and changed buildings are
    decoded.

    Parameters
    ----------
    path : str
        This run's snapshot (:func:`write_snapshot`).
    previous_dir : str or None
        Folder of the previous run that wrote outputs.
    crs : pyproj.CRS or None
        The footprints' CRS.

    Returns
    -------
    BuildingChanges
    """
    return compare_snapshots(read_snapshot(Path(path)),
                             Path(previous_dir) if previous_dir else None, crs)


def snapshot_for_comparison(buildings: pd.DataFrame, cfg: PipelineConfig, src: Path,
                            footprints: Any) -> tuple:
    """Write this run's snapshot into its run folder, for a second process to compare.

    Parameters
    ----------
    buildings : DataFrame
        The yield stage's buildings, the rows of ``src`` in its order.
    cfg : PipelineConfig
        The configuration.
    src : Path
        ``yield_buildings.parquet`` (its stored WKB is written, :func:`write_snapshot`).
    footprints : Footprints
        The buildings' footprints on disk (:mod:`pipeline.footprints`): their
        keys and CRS.

    Returns
    -------
    tuple
        The arguments of :func:`building_changes_from_snapshot`.
    """
    from pipeline.runs import SNAPSHOT_BUILDINGS

    previous_dir, run_dir = run_dirs()
    path = run_dir / SNAPSHOT_BUILDINGS
    write_snapshot(snapshot(buildings, sources_without_id(cfg), footprints.keys), path, src)
    return (str(path), str(previous_dir) if previous_dir else None, footprints.crs)


def building_changes_args(cfg: PipelineConfig, src: Path) -> tuple:
    """Arguments of :func:`building_changes_from_file` in the run in progress.

    Plain values: the run record (:func:`pipeline.runs.current`) is the
    driver's, not the second process's.

    Parameters
    ----------
    cfg : PipelineConfig
        The configuration.
    src : Path
        ``yield_buildings.parquet``.

    Returns
    -------
    tuple
        ``(src, no_id, previous_dir, run_dir)`` as str (None where absent).
    """
    return (str(src), sorted(sources_without_id(cfg)),
            *(str(d) if d is not None else None for d in run_dirs()))


def run_dirs() -> tuple[Path | None, Path | None]:
    """The previous output run's folder and this run's (both None outside a run)."""
    from pipeline import runs

    record = runs.current()
    if record is None:
        return None, None
    return record.previous_dir, record.dir


def report_changes(dlayer: pd.DataFrame, part: BuildingChanges
                   ) -> tuple[dict[str, pd.DataFrame], str]:
    """The report stage's hook: layers ``changes``, ``changes_districts``, ``run``.

    Adds the districts to the building part (:func:`building_changes`): the
    district deltas and verdicts, this run's district snapshot (in its run
    folder, only inside a run, see :mod:`pipeline.runs`), the ``run`` layer
    and the manifest's ``changes`` entry.

    Parameters
    ----------
    dlayer : DataFrame
        The district layer with its verdicts.
    part : BuildingChanges
        The comparison of the buildings with the previous run's.

    Returns
    -------
    layers : dict
        Layer name to frame, for the GeoPackage.
    markdown : str
        The report section.
    """
    from pipeline import runs

    record = runs.current()
    cur_d = district_snapshot(dlayer)
    first = part.previous_districts is None
    prev_d = cur_d if first else part.previous_districts
    prev_id = None if first else record.previous_dir.name
    changes = part.changes
    deltas = district_deltas(part.sums_previous, part.sums_current, changes, prev_d, cur_d)
    layers: dict[str, pd.DataFrame] = {"changes": changes, "changes_districts": deltas}
    run_id = record.run_id if record else None
    if record is not None:
        from pipeline.io import write_parquet_atomic

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
