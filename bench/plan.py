"""Benchmark: the report stage with existing PV and towns, against the report without them.

Existing PV and towns join every building's footprint, so the report's driver
reads all footprints again, a row group at a time (``pipeline/footprints.py``,
``pipeline.deliverables.plan_row_groups``). This script measures what that
costs at N buildings. It needs the yield stage's output of a ``bench.run``
at that N (``data/bench/<N>/processed``) and writes beside it, deterministic
by seed:

- ``plan/towns.gpkg``: every district cut by a square grid (``--town-grid-m``),
  one town per piece;
- ``plan/pv.gpkg``: ``--systems`` PV systems on random roofs with capacity,
  half of them squares around the roof's centroid, half points.

Then it runs the report stage alone (2 workers), alternately without and with
the plan inputs, ``--repeat`` times each, and prints the wall times, the peak
summed RSS of the process tree and the report's own steps.

    python -m bench.run --sizes 1000000      # once, for the yield stage's output
    python -m bench.plan --n 1000000 [--repeat 2]
"""

from __future__ import annotations

import argparse
import re
import statistics
import sys

import geopandas as gpd
import numpy as np
import shapely
import yaml

from bench.run import BENCH, ROOT, measured

STEPS_RE = re.compile(r"report steps \[s\]: (.*)")


def plan_inputs(n: int, systems: int, grid_m: float, seed: int) -> dict:
    """Write the towns and PV systems for the bench stock of ``n``; the ``plan`` config keys."""
    work = BENCH / str(n)
    src = work / "processed/yield_buildings.parquet"
    if not src.exists():
        raise SystemExit(f"{src} is missing: run `python -m bench.run --sizes {n}` first")
    cfg = yaml.safe_load((work / "config_processes_2.yaml").read_text(encoding="utf-8"))
    b = gpd.read_parquet(src, columns=["capacity_kwp", "geometry"])
    rng = np.random.default_rng(seed)
    with_pv = np.flatnonzero(b["capacity_kwp"].to_numpy() > 0)
    rows = np.sort(rng.choice(with_pv, size=min(systems, len(with_pv)), replace=False))
    centre = shapely.centroid(b.geometry.to_numpy()[rows])
    geoms = np.where(np.arange(len(rows)) % 2 == 1,
                     shapely.buffer(centre, 4.0, cap_style="square"), centre)
    out = work / "plan"
    out.mkdir(exist_ok=True)
    gpd.GeoDataFrame({"id": [f"p{i}" for i in range(len(rows))],
                      "kwp": np.round(rng.uniform(5.0, 300.0, len(rows)), 1),
                      "year": rng.integers(2019, 2025, len(rows))},
                     geometry=geoms, crs=b.crs).to_file(out / "pv.gpkg")
    dcfg = cfg["districts"]
    d = gpd.read_file(ROOT / dcfg["path"]).to_crs(b.crs)[[dcfg["name_field"], "geometry"]]
    x0, y0, x1, y1 = d.total_bounds
    cells = gpd.GeoDataFrame(geometry=[shapely.box(x, y, x + grid_m, y + grid_m)
                                       for x in np.arange(x0, x1, grid_m)
                                       for y in np.arange(y0, y1, grid_m)], crs=b.crs)
    towns = gpd.overlay(d, cells, how="intersection", keep_geom_type=True)
    towns = towns.rename(columns={dcfg["name_field"]: "district"})
    towns["name"] = [f"town {i}" for i in range(len(towns))]
    towns[["name", "district", "geometry"]].to_file(out / "towns.gpkg")
    print(f"plan inputs: {len(rows):,} PV systems, {len(towns):,} towns -> {out}", flush=True)
    return {"existing_pv": {"path": str((out / "pv.gpkg").resolve()), "id_field": "id",
                            "capacity_field_kwp": "kwp", "year_field": "year"},
            "towns": {"path": str((out / "towns.gpkg").resolve()), "name_field": "name",
                      "district_field": "district"}}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--systems", type=int, default=5000)
    parser.add_argument("--town-grid-m", type=float, default=4000.0)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--repeat", type=int, default=2)
    args = parser.parse_args(argv)
    work = BENCH / str(args.n)
    base = work / "config_processes_2.yaml"
    if not base.exists():
        raise SystemExit(f"{base} is missing: run `python -m bench.run --sizes {args.n}` first")
    cfg = yaml.safe_load(base.read_text(encoding="utf-8"))
    cfg["plan"].update(plan_inputs(args.n, args.systems, args.town_grid_m, args.seed))
    with_plan = work / "config_plan_2.yaml"
    with_plan.write_text(yaml.safe_dump(cfg, allow_unicode=True), encoding="utf-8")
    runs: dict[str, list[dict]] = {"without": [], "with": []}
    for _ in range(args.repeat):
        for case, config in (("without", base), ("with", with_plan)):
            run = measured([sys.executable, "-m", "pipeline", "run", "--stage", "report",
                            "--config", str(config)],
                           env={"PYTHONPATH": str(ROOT), "ROOFTOP_PV_PROGRESS": "0"})
            steps = STEPS_RE.search(run["stderr"])
            run["steps"] = steps.group(1) if steps else ""
            runs[case].append(run)
            print(f"report {case} existing PV and towns: {run['seconds']:.1f} s, peak RSS "
                  f"{run['peak_rss_gib']:.2f} GiB\n    steps: {run['steps']}", flush=True)
    for case, done in runs.items():
        print(f"N={args.n:,} report {case} existing PV and towns: median "
              f"{statistics.median(r['seconds'] for r in done):.1f} s (runs "
              + ", ".join(f"{r['seconds']:.1f}" for r in done) + "), peak RSS "
              f"{max(r['peak_rss_gib'] for r in done):.2f} GiB", flush=True)


if __name__ == "__main__":
    main()
