"""Scheduled reruns: drop folder, partition cache, change report, lock, kill safety, make.

A tiny hand-made project: two square districts (Alpha, Beta) of 2 km, four
identical 40 m x 25 m flat factory roofs of the default height in each, 100 m
apart. Each roof carries about 874 m2 (inside a 1 m setback) x 0.8 factory
utilisation x 0.62 GCR (solstice rule) x 0.21 kWp/m2 = 91 kWp, so Beta's
target of 0.6 MW is not reachable from its 4 roofs (0.37 MW) and reachable
once 3 identical new roofs arrive (0.64 MW); the change report must show
exactly those 3 roofs and a delta of 3 x the capacity of an existing one.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import geopandas as gpd
import pandas as pd
import pyogrio
import pytest
import shapely
import yaml

from pipeline import changes, incremental, runs
from pipeline.cli import main
from pipeline.config import load_config
from tests.conftest import ROOT

X0, Y0 = 350_000.0, 3_450_000.0  # EPSG:32651, near Shanghai
CRS = "EPSG:32651"


def rect(x: float, y: float, w: float = 40.0, h: float = 25.0) -> shapely.Polygon:
    return shapely.box(x, y, x + w, y + h)


def roofs(ids: list[str], x0: float, y0: float) -> gpd.GeoDataFrame:
    geoms = [rect(x0 + 100 * i, y0) for i in range(len(ids))]
    return gpd.GeoDataFrame({"bid": ids, "name": [f"factory {i}" for i in ids],
                             "building": "industrial"}, geometry=geoms, crs=CRS)


def tiny_project(base: Path, epw: Path, grid_m: float | None = None) -> Path:
    """A project root with the tiny inputs; returns its config file."""
    raw = base / "data/raw/tiny"
    raw.mkdir(parents=True)
    (base / "data/raw/weather").mkdir(parents=True)
    (base / "data/raw/weather" / epw.name).symlink_to(epw)
    (base / "configs").symlink_to(ROOT / "configs")
    gpd.GeoDataFrame({"name": ["Alpha", "Beta"], "adcode": ["900001", "900002"]},
                     geometry=[shapely.box(X0, Y0, X0 + 2000, Y0 + 2000),
                               shapely.box(X0 + 2000, Y0, X0 + 4000, Y0 + 2000)],
                     crs=CRS).to_file(raw / "districts.gpkg")
    b = pd.concat([roofs(["a1", "a2", "a3", "a4"], X0 + 100, Y0 + 100),
                   roofs(["b1", "b2", "b3", "b4"], X0 + 2100, Y0 + 100)], ignore_index=True)
    gpd.GeoDataFrame(b, crs=CRS).to_parquet(raw / "buildings.parquet")
    cfg = yaml.safe_load((ROOT / "configs/shanghai.yaml").read_text(encoding="utf-8"))
    cfg["name"] = "tiny"
    cfg["dask"]["scheduler"] = "synchronous"
    cfg["districts"] = {"path": "data/raw/tiny/districts.gpkg", "layer": None,
                        "name_field": "name", "code_field": "adcode", "crs_if_missing": None}
    cfg["sources"] = [{"name": "survey", "kind": "vector",
                       "path": "data/raw/tiny/buildings.parquet", "id_field": "bid",
                       "columns": {"name": "name", "tag_building": "building"}}]
    cfg["weather"]["path"] = f"data/raw/weather/{epw.name}"
    cfg["targets"] = [{"id": "beta", "district_name": "Beta", "required_mw": 0.6,
                       "period": "2025", "source": "test"}]
    cfg["heights"]["rasters"] = []  # heights from the default (no attribute, no raster)
    cfg["runs"]["partition_grid_m"] = grid_m
    path = base / "tiny.yaml"
    path.write_text(yaml.safe_dump(cfg, allow_unicode=True), encoding="utf-8")
    return path


def drop_batch(base: Path, name: str = "batch1.gpkg") -> list[str]:
    """Three new factory roofs in Beta, in the drop folder; their building ids."""
    drop = base / "data/raw/drop"
    drop.mkdir(parents=True, exist_ok=True)
    # east of b1..b4 on the same row: the same latitude, so the same row spacing
    new = roofs(["n1", "n2", "n3"], X0 + 2500, Y0 + 100).rename(columns={"bid": "id"})
    new.to_file(drop / name)
    return [f"drop_{Path(name).stem}:{i}" for i in ("n1", "n2", "n3")]


def manifests(base: Path) -> list[dict]:
    d = base / "outputs/runs"
    return [json.loads((p / "manifest.json").read_text()) for p in sorted(d.iterdir())
            if (p / "manifest.json").is_file()]


def run_cli(base: Path, config: Path, *extra: str) -> int:
    cwd = os.getcwd()
    os.chdir(base)
    try:
        return main(["run", "--config", str(config), "-q", *extra])
    finally:
        os.chdir(cwd)


def subprocess_env() -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT), "ROOFTOP_PV_SCHEDULER": "synchronous"}


# --------------------------------------------------------------------------- fast unit tests
def snap(rows: list[tuple]) -> gpd.GeoDataFrame:
    cols = ["building_key", "building_id", "source", "district_name", "building_type",
            "capacity_kwp", "energy_mwh_per_year", "geometry_key"]
    frame = pd.DataFrame([r[:-1] for r in rows], columns=cols)
    frame["geometry_key_version"] = changes.GEOMETRY_KEY_VERSION
    return gpd.GeoDataFrame(frame, geometry=[r[-1] for r in rows], crs=CRS)


def test_compare_lists_added_removed_and_changed():
    g = rect(0, 0)
    prev = snap([("s:a", "s:a", "s", "A", "school", 10.0, 12.0, "k1", g),
                 ("s:b", "s:b", "s", "A", "school", 20.0, 24.0, "k2", g),
                 ("s:c", "s:c", "s", "B", "factory", 5.0, 6.0, "k3", g)])
    cur = snap([("s:a", "s:a", "s", "A", "school", 10.0, 12.0, "k1", g),
                ("s:b", "s:b", "s", "A", "government", 26.0, 31.0, "k2", g),
                ("s:d", "s:d", "s", "B", "factory", 7.0, 8.0, "k4", g)])
    ch = changes.compare(prev, cur).set_index("building_key")
    assert ch["change"].to_dict() == {"s:d": "added", "s:c": "removed", "s:b": "changed"}
    assert ch.loc["s:b", "changed_fields"] == "type,capacity"
    assert ch.loc["s:b", "capacity_delta_kwp"] == pytest.approx(6.0)
    assert ch.loc["s:c", "capacity_delta_kwp"] == pytest.approx(-5.0)
    assert ch.loc["s:d", "energy_delta_mwh_per_year"] == pytest.approx(8.0)
    dprev = pd.DataFrame({"district_name": ["A", "B"], "target_verdict": [None, "no"],
                          "rule_verdict": ["x", "y"]})
    dcur = pd.DataFrame({"district_name": ["A", "B"], "target_verdict": [None, "yes"],
                         "rule_verdict": ["x", "y"]})
    d = changes.district_deltas(changes.district_sums(prev), changes.district_sums(cur),
                                changes.compare(prev, cur), dprev, dcur)
    d = d.set_index("district_name")
    assert d.loc["A", "capacity_delta_kwp"] == pytest.approx(6.0)  # 36 - 30
    assert d.loc["B", "capacity_delta_kwp"] == pytest.approx(2.0)  # 7 - 5
    assert (d.loc["B", ["n_added", "n_removed", "n_changed"]].tolist() == [1, 1, 0])
    assert d["verdict_flipped"].to_dict() == {"A": False, "B": True}
    assert changes.compare(cur, cur).empty


def test_previous_snapshot_read_as_wkb_compares_like_geometries(tmp_path):
    from pipeline.io import write_parquet_atomic

    g1, g2 = rect(0, 0), rect(100, 0, 12.5, 7.25)
    prev = snap([("s:a", "s:a", "s", "A", "school", 10.0, 12.0, "k1", g1),
                 ("s:b", "s:b", "s", "A", "school", 20.0, 24.0, "k2", g2)])
    cur = snap([("s:a", "s:a", "s", "A", "school", 11.0, 12.0, "k1", g1)])
    write_parquet_atomic(prev, tmp_path / runs.SNAPSHOT_BUILDINGS)
    write_parquet_atomic(pd.DataFrame({"district_name": ["A"], "target_verdict": [None],
                                       "rule_verdict": ["x"]}),
                         tmp_path / runs.SNAPSHOT_DISTRICTS)
    loaded, _ = changes.load_previous(tmp_path)
    assert isinstance(loaded["geometry"].iloc[0], bytes)  # not decoded
    lazy, eager = changes.compare(loaded, cur), changes.compare(prev, cur)
    pd.testing.assert_frame_equal(lazy, eager)
    assert lazy.set_index("building_key").loc["s:b", "geometry"].equals(g2)
    assert changes.rekey(loaded) is loaded  # this version's keys are kept


def test_compare_of_many_buildings_matches_set_arithmetic(tmp_path):
    """Positional matching gives the sets and fields that key sets give, in key order."""
    import numpy as np

    from pipeline.io import write_parquet_atomic

    rng = np.random.default_rng(7)
    n = 400
    keys = [f"s:{i}" for i in range(n)]
    base = [(k, k, "s", "AB"[i % 2], "school", 10.0 + i, 12.0, f"g{i}", rect(50.0 * i, 0))
            for i, k in enumerate(keys)]
    prev_rows = [r for i, r in enumerate(base) if i % 7 != 3]  # added in this run: i % 7 == 3
    cur_rows = []
    for i, r in enumerate(base):
        if i % 11 == 5:
            continue  # removed
        r = list(r)
        if i % 13 == 1:
            r[4] = "factory"
        if i % 17 == 2:
            r[5] += 1.0
        if i % 19 == 4:
            r[7], r[8] = f"h{i}", rect(50.0 * i, 5.0)
        cur_rows.append(tuple(r))
    order = rng.permutation(len(cur_rows))  # row order does not matter
    prev, cur = snap(prev_rows), snap([cur_rows[i] for i in order])
    write_parquet_atomic(prev, tmp_path / "prev.parquet")
    ch = changes.compare(changes.read_snapshot(tmp_path / "prev.parquet"), cur)
    pk, ck = set(prev["building_key"]), set(cur["building_key"])
    by_kind = ch.groupby("change")["building_key"].apply(list).to_dict()
    assert by_kind["added"] == sorted(ck - pk)
    assert by_kind["removed"] == sorted(pk - ck)
    expect = {}
    for i, k in enumerate(keys):
        if k in pk and k in ck:
            f = [name for name, hit in (("geometry", i % 19 == 4), ("type", i % 13 == 1),
                                        ("capacity", i % 17 == 2)) if hit]
            if f:
                expect[k] = ",".join(f)
    assert by_kind["changed"] == sorted(expect)
    assert ch.set_index("building_key").loc[list(expect), "changed_fields"].to_dict() == expect
    assert list(ch["change"].drop_duplicates()) == ["added", "removed", "changed"]
    removed = ch[ch["change"].eq("removed")].set_index("building_key")
    assert all(removed.loc[f"s:{i}", "geometry"].equals(rect(50.0 * i, 0))
               for i in (5, 16) if f"s:{i}" in pk)
    moved = ch.set_index("building_key").loc["s:4", "geometry"]
    assert moved.equals(rect(200.0, 5.0))  # this run's footprint of a changed building


def test_compare_refuses_repeated_building_keys():
    g = rect(0, 0)
    prev = snap([("s:a", "s:a", "s", "A", "school", 10.0, 12.0, "k1", g)] * 2)
    cur = snap([("s:a", "s:a", "s", "A", "school", 10.0, 12.0, "k1", g)])
    with pytest.raises(ValueError, match="previous building snapshot: building_key is not uniq"):
        changes.compare(prev, cur)


def test_snapshot_written_with_the_stored_wkb_equals_the_encoded_one(tmp_path):
    """The snapshot takes the yield file's WKB when its rows are the file's, else encodes."""
    from pipeline.stream import GeoParquetWriter, to_arrow

    g1, g2 = rect(0, 0), rect(100, 0, 12.5, 7.25)
    cur = snap([("s:a", "s:a", "s", "A", "school", 10.0, 12.0, "k1", g1),
                ("s:b", "s:b", "s", "A", "school", 20.0, 24.0, "k2", g2)])
    src = tmp_path / "yield_buildings.parquet"
    # the file's footprints differ from the snapshot's in their WKB bytes only where it is used;
    # written as the stages write theirs (the geo metadata in the file's footer)
    with GeoParquetWriter(src) as writer:
        writer.write(to_arrow(gpd.GeoDataFrame({"building_id": ["s:a", "s:b"], "x": [1, 2]},
                                               geometry=[g1, shapely.reverse(g2)], crs=CRS)))
    changes.write_snapshot(cur, tmp_path / "encoded.parquet")
    changes.write_snapshot(cur, tmp_path / "stored.parquet", src)
    encoded, stored = (gpd.read_parquet(tmp_path / f) for f in ("encoded.parquet",
                                                                 "stored.parquet"))
    assert stored.crs == encoded.crs == cur.crs
    pd.testing.assert_frame_equal(pd.DataFrame(stored.drop(columns="geometry")),
                                  pd.DataFrame(encoded.drop(columns="geometry")))
    assert stored.geometry.iloc[1].equals_exact(shapely.reverse(g2), 0)  # the file's bytes
    assert encoded.geometry.iloc[1].equals_exact(g2, 0)
    # other rows than the file's: encoded from the snapshot
    changes.write_snapshot(cur.iloc[::-1], tmp_path / "reordered.parquet", src)
    back = gpd.read_parquet(tmp_path / "reordered.parquet")
    assert back.geometry.iloc[0].equals_exact(g2, 0)


def test_geometry_key_ignores_vertex_order_and_keys_repeat():
    a = shapely.Polygon([(0, 0), (10, 0), (10, 5), (0, 5)])
    b = shapely.Polygon([(10, 5), (0, 5), (0, 0), (10, 0)])  # same square, other start
    c = shapely.Polygon([(0, 0), (10, 0), (10, 5.5), (0, 5)])
    k = changes.geometry_keys(gpd.GeoSeries([a, b, c], crs=CRS))
    assert k[0] == k[1] != k[2]
    frame = gpd.GeoDataFrame({"building_id": ["t:0", "t:1", "o:x"], "source": ["t", "t", "o"]},
                             geometry=[a, b, a], crs=CRS)
    keys = changes.building_keys(frame, {"t"})
    assert keys[0] == f"t:geom:{k[0]}" and keys[1] == f"t:geom:{k[0]}#1" and keys[2] == "o:x"


def old_geometry_keys(geoms: gpd.GeoSeries, grid_m: float = 0.01) -> list[str]:
    """The exact (slow) key of version 1: sha1 of the normalised WKB on the grid."""
    import hashlib

    wkb = shapely.to_wkb(shapely.normalize(shapely.set_precision(geoms.array, grid_m)))
    return ["none" if b is None else hashlib.sha1(b).hexdigest()[:16] for b in wkb]


def rewritten(g: shapely.Geometry, k: int) -> shapely.Geometry:
    """The same shape written otherwise: rings from another start vertex, reversed, parts
    in another order."""
    def ring(r, rev):
        c = list(r.coords)[:-1]
        c = c[k % len(c):] + c[:k % len(c)]
        return (c[::-1] if rev else c) + [c[::-1][0] if rev else c[0]]

    if isinstance(g, shapely.MultiPolygon):
        return shapely.MultiPolygon([rewritten(p, k + 1) for p in reversed(g.geoms)])
    return shapely.Polygon(ring(g.exterior, k % 2 == 0),
                           [ring(h, k % 2 == 1) for h in reversed(g.interiors)])


def hand_made() -> list[shapely.Geometry]:
    sq = shapely.Polygon([(0, 0), (10, 0), (10, 5), (0, 5)])
    holed = shapely.Polygon([(0, 0), (30, 0), (30, 30), (0, 30)],
                            [[(5, 5), (10, 5), (10, 10)], [(20, 20), (25, 20), (25, 25)]])
    return [
        sq, shapely.Polygon([(10, 5), (0, 5), (0, 0), (10, 0)]),  # other start
        shapely.Polygon([(0, 0), (0, 5), (10, 5), (10, 0)]),  # other direction
        shapely.Polygon([(0, 0), (10, 0), (10, 0.001), (10, 5), (0, 5)]),  # repeated on grid
        shapely.Polygon([(0, 0), (10, 0), (10, 5.02), (0, 5)]),  # moved 2 cm
        shapely.Polygon([(0, 0), (10, 0), (10, 5), (0, 5.004)]),  # moved 4 mm (same cell)
        shapely.Polygon([(0, 0), (5, 0), (10, 0), (10, 5), (0, 5)]),  # extra vertex on an edge
        holed, rewritten(holed, 1), shapely.Polygon(holed.exterior),  # hole dropped
        shapely.MultiPolygon([sq, shapely.box(20, 0, 30, 5)]),
        shapely.MultiPolygon([shapely.box(20, 0, 30, 5), rewritten(sq, 2)]),
        shapely.box(5e5, 3.4e6, 5e5 + 12.345, 3.4e6 + 7.5),  # UTM-sized coordinates
        shapely.Polygon(), None,
    ]


def same_classes(a, b) -> bool:
    """Two key lists group the items alike."""
    return (pd.factorize(pd.Series(a))[0] == pd.factorize(pd.Series(b))[0]).all()


def test_geometry_key_groups_shapes_like_the_exact_key():
    geoms = gpd.GeoSeries(hand_made(), crs=CRS)
    new = changes.geometry_keys(geoms)
    old = old_geometry_keys(geoms)
    assert same_classes(new, old)
    assert new[0] == new[1] == new[2] == new[3] == new[5] != new[4]
    assert new[6] != new[0] and new[7] == new[8] != new[9] and new[10] == new[11]
    assert new[-2] == "empty" and new[-1] == "none"


def test_geometry_key_on_sample_footprints(sample):
    raw = gpd.read_file(sample / "osm_heritage_subset.geojson")
    geoms = raw.geometry[raw.geom_type.isin(["Polygon", "MultiPolygon"])].to_crs(CRS)
    geoms = gpd.GeoSeries(shapely.make_valid(geoms.array), crs=CRS)
    geoms = geoms[geoms.geom_type.isin(["Polygon", "MultiPolygon"])].reset_index(drop=True)
    other = gpd.GeoSeries([rewritten(g, i) for i, g in enumerate(geoms)], crs=CRS)
    moved = geoms.translate(0.03, 0.0)
    pool = pd.concat([geoms, other, moved], ignore_index=True)
    new, old = changes.geometry_keys(pool), old_geometry_keys(pool)
    assert same_classes(new, old)
    n = len(geoms)
    assert (new[:n] == new[n:2 * n]).all() and (new[:n] != new[2 * n:]).all()


def test_previous_snapshot_of_the_old_key_compares_unchanged():
    """Upgrading from a version with the WKB key: nothing reads as changed."""
    geoms = [rect(0, 0), rect(100, 0), rect(100, 0), rect(300, 0, 12.3456, 7.0)]
    frame = gpd.GeoDataFrame({
        "building_id": ["t:0", "t:1", "t:2", "o:x"], "source": ["t", "t", "t", "o"],
        "district_name": "A", "building_type": "school", "capacity_kwp": [1.0, 2.0, 2.0, 3.0],
        "energy_mwh_per_year": [1.0, 2.0, 2.0, 3.0]}, geometry=geoms, crs=CRS)
    old = old_geometry_keys(frame.geometry)
    base = [f"t:geom:{k}" for k in old[:3]]
    prev = frame.assign(building_key=[base[0], base[1], base[2] + "#1", "o:x"],
                        geometry_key=old)  # as version 1 wrote it: no version column
    prev = prev.assign(geometry=[rewritten(g, 1) for g in geoms])  # stored otherwise
    cur_gk = changes.geometry_keys(frame.geometry)
    cur = frame.assign(building_key=changes.building_keys(frame, {"t"}, cur_gk),
                       geometry_key=cur_gk,
                       geometry_key_version=changes.GEOMETRY_KEY_VERSION)
    stale = changes.compare(prev, cur)  # without re-keying: every building reads as changed
    assert stale["change"].value_counts().to_dict() == {"added": 3, "removed": 3, "changed": 1}
    again = changes.rekey(prev)
    assert changes.compare(again, cur).empty
    as_read = pd.DataFrame(prev).assign(geometry=shapely.to_wkb(prev.geometry.array))
    assert changes.compare(changes.rekey(as_read), cur).empty  # WKB, as load_previous reads
    assert again["building_key"].tolist() == cur["building_key"].tolist()
    assert changes.rekey(cur) is cur  # this version's snapshot is not re-keyed


def test_kept_output_is_a_copy_not_a_link(tmp_path, monkeypatch):
    """A kept output does not change when the published file is edited in place."""
    src = tmp_path / "out.gpkg"
    src.write_bytes(b"v1" * 5000)
    for supported in (True, False):
        dst = tmp_path / f"kept_{supported}.gpkg"
        if not supported:  # a file system without reflinks
            def no_clone(*args):
                raise OSError(95, "Operation not supported")
            monkeypatch.setattr(runs.fcntl, "ioctl", no_clone)
        runs.copy_file(src, dst)
        assert dst.read_bytes() == src.read_bytes()
        assert os.stat(dst).st_ino != os.stat(src).st_ino
        assert os.stat(dst).st_mtime == pytest.approx(os.stat(src).st_mtime)
    with open(src, "r+b") as f:  # what SQLite does to a GeoPackage opened in QGIS
        f.write(b"XX")
    assert (tmp_path / "kept_True.gpkg").read_bytes()[:2] == b"v1"
    assert (tmp_path / "kept_False.gpkg").read_bytes()[:2] == b"v1"


def test_sha256_soon_hashes_the_file_as_it_was_asked_for_and_follows_renames(tmp_path):
    """The digest is that of the content when asked, also if the file is replaced before the
    hashing thread gets to it; a temporary file renamed into place is not hashed again."""
    path = tmp_path / "stage.parquet"
    path.write_bytes(b"first" * 1000)
    release = threading.Event()
    pool = runs._HASH_POOL[0] if runs._HASH_POOL else None
    if pool is None:  # start the pool
        runs.sha256_file(runs.__file__)
        pool = runs._HASH_POOL[0]
    busy = [pool.submit(release.wait) for _ in range(runs.HASH_THREADS)]  # hold every thread
    try:
        future = runs.sha256_soon(path)
        assert not future.done()
        new = tmp_path / ".stage.parquet.part"
        new.write_bytes(b"second" * 1000)
        os.replace(new, path)  # as pipeline.io.atomic_path replaces a stage's output
    finally:
        release.set()
    assert all(b.result() for b in busy)
    assert future.result() == hashlib.sha256(b"first" * 1000).hexdigest()
    assert runs.sha256_file(path) == hashlib.sha256(b"second" * 1000).hexdigest()
    tmp = tmp_path / ".report.gpkg.part"
    tmp.write_bytes(b"report" * 1000)
    before = runs.sha256_soon(tmp)
    final = tmp_path / "report.gpkg"
    os.replace(tmp, final)
    assert runs.sha256_soon(final) is before  # same file: remembered, not hashed again
    assert before.result() == hashlib.sha256(b"report" * 1000).hexdigest()


@pytest.mark.slow
def test_failed_run_stamps_the_stages_that_ran_before_it(tiny, monkeypatch):
    """Stamps are written in the background while the next stage runs: a failure there
    still leaves the earlier stages stamped and recorded, and a rerun skips them."""
    base, config = tiny
    from pipeline import shading

    def fail(*args, **kwargs):
        raise RuntimeError("shading stage failed on purpose")

    monkeypatch.setattr(shading, "run", fail)
    assert run_cli(base, config) == runs.EXIT_FAILED
    (failed,) = manifests(base)
    assert failed["status"] == "failed" and "on purpose" in failed["error"]
    assert list(failed["stages"]) == ["ingest", "classify", "roof"]
    proc = base / "data/processed"
    for stage, entry in failed["stages"].items():
        stamp = json.loads((proc / runs.STAMPS_DIR / f"{stage}.json").read_text())
        assert entry["status"] == "ran" and len(entry["key"]) == 64
        assert stamp["key"] == entry["key"] and stamp["run_id"] == failed["run_id"]
        assert stamp["outputs"] == entry["outputs"] and entry["outputs"]
        for name, digest in entry["outputs"].items():
            assert hashlib.sha256((proc / name).read_bytes()).hexdigest() == digest
        for name, digest in entry["inputs"].items():
            assert failed["inputs"][name] == digest
    assert failed["stages"]["classify"]["inputs"]["data/processed/ingest_buildings.parquet"] \
        == failed["stages"]["ingest"]["outputs"]["ingest_buildings.parquet"]
    assert not (proc / runs.STAMPS_DIR / "shading.json").exists()
    monkeypatch.undo()
    assert run_cli(base, config, "--if-changed") == 0
    status = {s: e["status"] for s, e in manifests(base)[-1]["stages"].items()}
    assert status == {"ingest": "up to date", "classify": "up to date", "roof": "up to date",
                      "shading": "ran", "yield": "ran", "report": "ran"}


def test_partition_cache_computes_only_changed_partitions(tmp_path):
    seen: list[list[str]] = []

    def compute(rows, kernel, *args, **kwargs):
        seen.append(sorted(rows["building_id"]))
        return kernel(rows, *args, **kwargs)

    def area_kernel(part, factor):
        out = part.copy()
        out["x_m2"] = part.geometry.area * factor
        return out

    frame = gpd.GeoDataFrame({"building_id": ["a1", "a2", "b1"],
                              "district_adcode": ["1", "1", "2"]},
                             geometry=[rect(0, 0), rect(100, 0), rect(3000, 0, 10, 10)],
                             crs=CRS, index=[7, 8, 9])
    cache = incremental.PartitionCache(tmp_path, grid_m=None)
    first = cache.map_partitions(frame, area_kernel, (2.0,), {}, compute)
    assert seen == [["a1", "a2", "b1"]] and first["x_m2"].tolist() == [2000.0, 2000.0, 200.0]
    cache.take_stats()
    # one more building in district 2, rows shifted: district 1 is reused
    frame2 = pd.concat([frame.iloc[[2]], frame.iloc[:2],
                        gpd.GeoDataFrame({"building_id": ["b2"], "district_adcode": ["2"]},
                                         geometry=[rect(3100, 0, 5, 5)], crs=CRS, index=[1])])
    second = cache.map_partitions(frame2, area_kernel, (2.0,), {}, compute)
    assert seen[1] == ["b1", "b2"]
    pd.testing.assert_frame_equal(second, area_kernel(frame2, 2.0))
    stats = cache.take_stats()[f"{__name__}.test_partition_cache_computes_only_changed_"
                               "partitions.<locals>.area_kernel"]
    assert stats["computed_keys"] == ["2"] and stats["reused"] == 1
    # another argument is another key: everything recomputes
    cache.map_partitions(frame2, area_kernel, (3.0,), {}, compute)
    assert seen[2] == ["a1", "a2", "b1", "b2"]


def test_check_geopackage_refuses_a_damaged_file(tmp_path):
    gpkg = tmp_path / "x.gpkg"
    gpd.GeoDataFrame({"v": range(200)}, geometry=[rect(i, 0) for i in range(200)],
                     crs=CRS).to_file(gpkg)
    runs.check_geopackage(gpkg)
    data = bytearray(gpkg.read_bytes())
    data[4096 * 3:4096 * 3 + 2048] = b"\xff" * 2048  # garble a page of the table
    bad = tmp_path / "bad.gpkg"
    bad.write_bytes(bytes(data))
    with pytest.raises(RuntimeError, match="bad.gpkg"):
        runs.check_geopackage(bad)
    (tmp_path / "empty.gpkg").write_bytes(b"not sqlite at all" * 10)
    with pytest.raises(RuntimeError, match="not a readable GeoPackage"):
        runs.check_geopackage(tmp_path / "empty.gpkg")


def test_lock_refuses_a_second_holder_with_its_name(tmp_path):
    lock = tmp_path / "lock"
    with runs.run_lock(lock, 0, "pid 1 on host, run A"):
        t0 = time.monotonic()
        with pytest.raises(runs.LockError, match="another run holds the lock.*run A"):
            with runs.run_lock(lock, 0.5):
                pass
        assert time.monotonic() - t0 >= 0.5  # it waited the timeout
    with runs.run_lock(lock, 0):  # released
        pass


def test_prune_keeps_the_newest_output_runs(tmp_path):
    for i, (status, snapshot) in enumerate([("ok", True), ("ok", False), ("ok", True),
                                            ("failed", True), ("ok", True), ("ok", True)]):
        d = tmp_path / f"2025010{i}T000000Z-aaaaaa"
        d.mkdir()
        (d / "manifest.json").write_text(json.dumps({"status": status}))
        if snapshot:
            (d / runs.SNAPSHOT_BUILDINGS).write_text("x")
    removed = runs.prune_runs(tmp_path, keep=2)
    assert sorted(p.name[:9] for p in removed) == ["20250100T", "20250101T", "20250102T",
                                                   "20250103T"]
    assert [p.name[:9] for p in runs.output_runs(tmp_path)] == ["20250104T", "20250105T"]


def test_drop_files_become_sources(tmp_path):
    cfg = load_config(ROOT / "configs/shanghai.yaml")
    assert runs.with_drop_sources(cfg, tmp_path) is cfg  # no drop folder
    drop = tmp_path / "data/raw/drop"
    drop.mkdir(parents=True)
    for name in ("Batch 2.geojson", "batch_2.gpkg", ".partial.gpkg", "notes.txt"):
        (drop / name).write_text("{}")
    out = runs.with_drop_sources(cfg, tmp_path)
    extra = out.sources[len(cfg.sources):]
    assert [s.name for s in extra] == ["drop_batch_2", "drop_batch_2_gpkg"]
    assert [s.path.as_posix() for s in extra] == ["data/raw/drop/Batch 2.geojson",
                                                 "data/raw/drop/batch_2.gpkg"]
    assert extra[0].id_field == "id" and extra[0].columns == dict(cfg.runs.drop.columns)


# --------------------------------------------------------------------------- pipeline runs
@pytest.fixture
def tiny(tmp_path, iwec_epw):
    base = tmp_path / "project"
    base.mkdir()
    return base, tiny_project(base, iwec_epw)


@pytest.fixture(scope="module")
def tiny_run_once(tmp_path_factory, iwec_epw):
    """The tiny project after one successful run (copied by :func:`tiny_done`)."""
    base = tmp_path_factory.mktemp("tiny_done") / "project"
    base.mkdir()
    config = tiny_project(base, iwec_epw)
    assert run_cli(base, config) == 0
    return base


@pytest.fixture
def tiny_done(tiny_run_once, tmp_path):
    """A fresh copy of the tiny project after its first run (relative paths, links kept)."""
    base = tmp_path / "project"
    shutil.copytree(tiny_run_once, base, symlinks=True)
    return base, base / "tiny.yaml"


@pytest.mark.slow
def test_drop_file_recomputes_its_district_and_is_reported(tiny_done, tmp_path, iwec_epw,
                                                            capsys):
    base, config = tiny_done
    (first,) = manifests(base)
    assert first["status"] == "ok" and first["previous_output_run"] is None
    assert first["stages"]["ingest"]["rows_in"] == 8 and first["stages"]["yield"]["rows_out"] == 8
    for key in ("run_id", "started", "ended", "inputs", "config", "packages", "host"):
        assert first[key]
    assert "data/raw/tiny/buildings.parquet" in first["inputs"]
    assert (base / "outputs/runs" / first["run_id"] / "run.log").read_text().count("rows") >= 3

    # unchanged: nothing to do, no new run record
    capsys.readouterr()
    assert run_cli(base, config, "--if-changed") == 0
    assert "nothing to do" in capsys.readouterr().out
    assert len(manifests(base)) == 1
    assert "nothing to do" in (base / "outputs/runs/history.log").read_text()

    added = drop_batch(base)
    assert run_cli(base, config, "--if-changed") == 0
    second = manifests(base)[-1]
    assert second["previous_output_run"] == first["run_id"]
    assert second["drop_files"] == ["data/raw/drop/batch1.gpkg"]
    for stage, kernel in (("classify", "pipeline.classify.classify_buildings"),
                          ("roof", "pipeline.roof.roof_kernel"),
                          ("shading", "pipeline.shading.shading_kernel"),
                          ("yield", "pipeline.planes.join_plane_yield")):
        p = second["stages"][stage]["partitions"][kernel]
        assert p["computed_keys"] == ["900002"], (stage, p)  # Beta only
        assert p["reused"] == 1 and p["rows_computed"] == 7
    assert second["stages"]["ingest"]["partitions"]["pipeline.ingest.normalise_footprints"][
        "reused"] == 1  # the unchanged survey source

    gpkg = base / "outputs/rooftop_pv.gpkg"
    first_buildings = pyogrio.read_dataframe(
        base / "outputs/runs" / first["run_id"] / "rooftop_pv.gpkg", layer="buildings")
    roof_kwp = first_buildings.set_index("building_id").loc["survey:b1", "capacity_kwp"]
    assert 80 < roof_kwp < 100  # 874 m2 x 0.8 x ~0.62 x 0.21 kWp/m2
    ch = pyogrio.read_dataframe(gpkg, layer="changes")
    assert sorted(ch["building_id"]) == added and set(ch["change"]) == {"added"}
    assert ch["capacity_kwp"].to_numpy() == pytest.approx([roof_kwp] * 3, rel=1e-5)
    d = pyogrio.read_dataframe(gpkg, layer="changes_districts").set_index("district_name")
    assert d.loc["Beta", "capacity_delta_kwp"] == pytest.approx(3 * roof_kwp, rel=1e-5)
    assert d.loc["Alpha", "capacity_delta_kwp"] == pytest.approx(0.0)
    assert d.loc["Beta", "target_verdict_previous"].startswith("not reachable")
    assert d.loc["Beta", "target_verdict"] == "reachable"
    assert bool(d.loc["Beta", "verdict_flipped"]) and not bool(d.loc["Alpha", "verdict_flipped"])
    run = pyogrio.read_dataframe(gpkg, layer="run")
    assert run.loc[0, "run_id"] == second["run_id"]
    meta = pyogrio.read_info(gpkg, layer="buildings")["dataset_metadata"]
    assert meta["ROOFTOP_PV_RUN_ID"] == second["run_id"]
    assert run.loc[0, "previous_run_id"] == first["run_id"]
    md = (base / "outputs/report.md").read_text(encoding="utf-8")
    assert "## Changes since the previous run" in md and "3 buildings added, 0 removed" in md
    assert second["changes"]["added"] == 3
    assert second["changes"]["verdicts_flipped"] == ["Beta"]
    # previous outputs kept in their run folder
    assert len(first_buildings) == 8

    # the incremental result equals a cold run on the same inputs
    cold = tmp_path / "cold"
    cold.mkdir()
    cold_config = tiny_project(cold, iwec_epw)
    drop_batch(cold)
    assert run_cli(cold, cold_config) == 0
    for name in ("yield_buildings.parquet", "ingest_rejected.parquet"):
        pd.testing.assert_frame_equal(gpd.read_parquet(base / "data/processed" / name),
                                      gpd.read_parquet(cold / "data/processed" / name))


KILL_SCRIPT = """
import sys, time
from pathlib import Path
import pyogrio
real = pyogrio.write_dataframe
def slow(df, path, **kw):
    real(df, path, **kw)
    flag = Path(sys.argv[1])  # a layer is in the temporary file: say so, atomically
    flag.with_suffix(".part").write_text(str(path))
    flag.with_suffix(".part").replace(flag)
    time.sleep(120)
pyogrio.write_dataframe = slow
from pipeline.cli import main
sys.exit(main(["run", "--config", sys.argv[2], "--stage", "report", "-q"]))
"""


@pytest.mark.slow
def test_sigkill_while_writing_leaves_previous_geopackage(tiny_done, tmp_path):
    base, config = tiny_done
    gpkg = base / "outputs/rooftop_pv.gpkg"
    before = runs.sha256_file(gpkg)
    flag = tmp_path / "writing"
    proc = subprocess.Popen([sys.executable, "-c", KILL_SCRIPT, str(flag), str(config)],
                            cwd=base, env=subprocess_env())
    try:
        deadline = time.monotonic() + 120
        while not flag.exists():
            assert proc.poll() is None, "the run ended before it wrote the GeoPackage"
            assert time.monotonic() < deadline
            time.sleep(0.05)
        tmp_gpkg = Path(flag.read_text())
        assert tmp_gpkg.parent == gpkg.parent and tmp_gpkg.exists()
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
    assert proc.returncode == -signal.SIGKILL
    assert runs.sha256_file(gpkg) == before  # untouched
    runs.check_geopackage(gpkg)
    assert len(pyogrio.read_dataframe(gpkg, layer="buildings")) == 8
    assert tmp_gpkg.exists()  # the killed run's half-written file
    assert run_cli(base, config, "--stage", "report") == 0  # the next run completes
    assert not tmp_gpkg.exists()
    runs.check_geopackage(gpkg)
    assert manifests(base)[-1]["status"] == "ok"
    assert manifests(base)[-1]["stages"]["report"]["rows_out"] == 8

    # a run that fails (a drop file without the mapped field) changes nothing published
    after = runs.sha256_file(gpkg)
    drop = base / "data/raw/drop"
    drop.mkdir(parents=True)
    roofs(["x1"], X0 + 2100, Y0 + 900).drop(columns="building").to_file(drop / "bad.gpkg")
    assert run_cli(base, config) == 2
    assert runs.sha256_file(gpkg) == after
    failed = manifests(base)[-1]
    assert failed["status"] == "failed" and "building" in failed["error"]
    assert "bad.gpkg" in failed["error"]


@pytest.mark.slow
def test_two_runs_at_once_wait_or_exit_with_the_lock_message(tiny_done):
    base, config = tiny_done
    cmd = [sys.executable, "-m", "pipeline", "run", "--config", str(config), "--stage",
           "report", "-q"]
    lock = base / "outputs" / runs.LOCK_NAME
    with runs.run_lock(lock, 0, "pid 4242, the other run"):
        refused = subprocess.run(cmd, cwd=base, env=subprocess_env(), capture_output=True,
                                 text=True, timeout=120)
        waiting = subprocess.Popen([*cmd, "--lock-timeout", "120"], cwd=base,
                                   env=subprocess_env(), stderr=subprocess.PIPE, text=True)
        time.sleep(3)
        assert waiting.poll() is None  # still waiting for the lock
    assert refused.returncode == runs.EXIT_LOCKED == 3
    assert "another run holds the lock (pid 4242, the other run)" in refused.stderr
    _, err = waiting.communicate(timeout=120)
    assert waiting.returncode == 0, err  # it ran once the lock was released
    # both started together: they run one after the other
    procs = [subprocess.Popen([*cmd, "--lock-timeout", "120"], cwd=base, env=subprocess_env())
             for _ in range(2)]
    assert [p.wait(180) for p in procs] == [0, 0]
    a, b = sorted(manifests(base)[-2:], key=lambda m: m["started"])
    assert a["ended"] <= b["started"]


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_second_make_all_does_no_stage_work(tiny, tmp_path):
    base, config = tiny
    shutil.copy(ROOT / "Makefile", base / "Makefile")
    (base / "pipeline").symlink_to(ROOT / "pipeline")
    shutil.copy(ROOT / "pyproject.toml", base / "pyproject.toml")
    venv = base / "venv"
    venv.mkdir()
    (venv / ".installed").touch()  # newer than pyproject.toml
    sample = tmp_path / "empty_sample"
    sample.mkdir()
    (base / "data/raw/shanghai").mkdir(parents=True)
    (base / "data/raw/shanghai/.complete").touch()
    args = ["make", "-C", str(base), f"PY={sys.executable}", f"VENV={venv}",
            f"CONFIG={config.name}", f"SAMPLE_DIR={sample}", "SCHEDULER=synchronous"]
    env = subprocess_env()
    first = subprocess.run([*args, "all"], env=env, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr
    assert first.stdout.count("-m pipeline run") == 6
    assert subprocess.run([*args, "-q", "all"], env=env).returncode == 0  # up to date
    again = subprocess.run([*args, "all"], env=env, capture_output=True, text=True, timeout=60)
    assert again.returncode == 0 and "-m pipeline run" not in again.stdout
    time.sleep(1.1)  # a new mtime
    drop_batch(base)
    assert subprocess.run([*args, "-q", "all"], env=env).returncode == 1  # the drop folder
