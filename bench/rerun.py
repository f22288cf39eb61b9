"""Benchmark of scheduled reruns: full run, unchanged rerun, rerun after 1% new buildings.

Runs the command line a scheduler would call (``python -m pipeline run``) in a
scratch project built from the Shanghai sample, and prints wall-clock times
(Python start-up and imports included):

1. full run, nothing cached;
2. unchanged rerun with ``--if-changed`` (nothing to do);
3. unchanged rerun without ``--if-changed`` (every stage runs, kernels reuse
   their cached partitions);
4. rerun with ``--if-changed`` after 1% new buildings land in the drop folder,
   all in one district;
5. for comparison, a full run on the same inputs with nothing cached.

``--replicate N`` scales the sample up by adding N - 1 copies of the
OpenStreetMap subset shifted east by 0.03 deg each (a stand-in until the scale
issue's generator is available).

Usage::

    PYTHONPATH=. .venv/bin/python bench/rerun.py [--replicate 4] [--scheduler threads]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import geopandas as gpd
import numpy as np
import shapely
import yaml

ROOT = Path(__file__).resolve().parents[1]


def build_project(base: Path, sample: Path, epw: Path, replicate: int) -> Path:
    """A scratch project root with the sample linked in; returns its config."""
    (base / "data/raw/weather").mkdir(parents=True)
    (base / "data/raw/shanghai").symlink_to(sample.resolve())
    (base / "data/raw/weather" / epw.name).symlink_to(epw.resolve())
    (base / "configs").symlink_to(ROOT / "configs")
    cfg = yaml.safe_load((ROOT / "configs/shanghai.yaml").read_text(encoding="utf-8"))
    if replicate > 1:
        osm = next(s for s in cfg["sources"] if s["name"] == "osm")
        raw = gpd.read_file(sample / Path(osm["path"]).name)
        copies = []
        for k in range(replicate):
            part = raw.copy()
            part["geometry"] = part.geometry.translate(xoff=0.03 * k)
            part["id"] = part["id"].astype(str) + ("" if k == 0 else f"#copy{k}")
            copies.append(part)
        out = base / "data/raw/bench"
        out.mkdir(parents=True)
        gpd.GeoDataFrame(np.concatenate([c.to_numpy() for c in copies]), columns=raw.columns,
                         geometry="geometry", crs=raw.crs).to_parquet(out / "osm_scaled.parquet")
        osm["path"] = "data/raw/bench/osm_scaled.parquet"
    path = base / "bench.yaml"
    path.write_text(yaml.safe_dump(cfg, allow_unicode=True), encoding="utf-8")
    return path


def new_buildings(base: Path, share: float) -> tuple[int, str]:
    """Write ``share`` x kept buildings as new factory roofs in one district's free space.

    Returns the number written and the district.
    """
    kept = gpd.read_parquet(base / "data/processed/ingest_buildings.parquet")
    n = max(1, math.ceil(share * len(kept)))
    district = kept["district_name"].value_counts().index[0]
    mine = kept[kept["district_name"] == district]
    districts = gpd.read_file(base / "data/raw/shanghai/districts_wgs84.geojson").to_crs(kept.crs)
    area = districts.loc[districts["district_name"] == district].geometry.union_all()
    cx, cy = mine.geometry.union_all().centroid.coords[0]
    taken = shapely.STRtree(kept.geometry.buffer(5.0).to_numpy())
    step, found = 60.0, []
    for radius in range(1, 400):  # rings of candidate positions around the data
        ring = [(cx + i * step, cy + j * step) for i in range(-radius, radius + 1)
                for j in range(-radius, radius + 1) if max(abs(i), abs(j)) == radius]
        for x, y in ring:
            box = shapely.box(x, y, x + 30.0, y + 20.0)
            if area.contains(box) and len(taken.query(box, predicate="intersects")) == 0:
                found.append(box)
                if len(found) == n:
                    break
        if len(found) == n:
            break
    drop = base / "data/raw/drop"
    drop.mkdir(parents=True, exist_ok=True)
    gpd.GeoDataFrame({"id": [f"bench{i}" for i in range(len(found))],
                      "name": [f"new factory {i}" for i in range(len(found))],
                      "building": "industrial"}, geometry=found, crs=kept.crs
                     ).to_file(drop / "bench_new.gpkg")
    return len(found), district


def timed(base: Path, config: Path, *extra: str, scheduler: str) -> float:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "pipeline", "run", "--config", str(config), "-q",
           "--scheduler", scheduler, *extra]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=base, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr}")
    return seconds


def last_manifest(base: Path) -> dict:
    runs = sorted(p for p in (base / "outputs/runs").iterdir() if (p / "manifest.json").exists())
    return json.loads((runs[-1] / "manifest.json").read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sample", type=Path, default=ROOT / "data/raw/shanghai")
    parser.add_argument("--epw", type=Path,
                        default=ROOT / "data/raw/weather/CHN_Shanghai.Shanghai.583670_IWEC.epw")
    parser.add_argument("--replicate", type=int, default=1)
    parser.add_argument("--share", type=float, default=0.01, help="new buildings [-]")
    parser.add_argument("--scheduler", default="threads")
    parser.add_argument("--keep", action="store_true", help="keep the scratch project")
    args = parser.parse_args()
    base = Path(tempfile.mkdtemp(prefix="rooftop-pv-bench-"))
    try:
        config = build_project(base, args.sample, args.epw, args.replicate)
        rows = [("full run, nothing cached", timed(base, config, scheduler=args.scheduler))]
        n_kept = len(gpd.read_parquet(base / "data/processed/ingest_buildings.parquet"))
        rows.append(("unchanged rerun, --if-changed",
                     timed(base, config, "--if-changed", scheduler=args.scheduler)))
        rows.append(("unchanged rerun, all stages (cached partitions)",
                     timed(base, config, scheduler=args.scheduler)))
        n_new, district = new_buildings(base, args.share)
        rows.append((f"rerun after {n_new} new buildings ({n_new / n_kept:.1%}), --if-changed",
                     timed(base, config, "--if-changed", scheduler=args.scheduler)))
        manifest = last_manifest(base)
        parts = {k: (v["computed"], v["partitions"])
                 for s in manifest["stages"].values() for k, v in s.get("partitions", {}).items()}
        shutil.rmtree(base / "data/processed")
        rows.append(("full run on the same inputs, nothing cached",
                     timed(base, config, scheduler=args.scheduler)))
        print(f"sample x{args.replicate}: {n_kept} buildings; new ones in {district}; "
              f"scheduler {args.scheduler}; {os.cpu_count()} cores")
        print(f"{'case':<62} {'seconds':>8}")
        for name, seconds in rows:
            print(f"{name:<62} {seconds:>8.1f}")
        print("partitions recomputed after the new buildings (computed / total):")
        for kernel, (computed, total) in parts.items():
            print(f"  {kernel:<45} {computed:>4} / {total}")
        print("changes:", json.dumps(manifest.get("changes", {}), ensure_ascii=False))
    finally:
        if args.keep:
            print("scratch project:", base)
        else:
            shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
