"""Time ingest's merge plan (``pipeline.ingest.merge_plan``) on a benchmark stock's boxes.

The plan is the driver's share of the ingest merge: the partitions' key
ranges, and the groups of possible duplicates moved so that none straddles a
partition edge. This reads the footprints of a ``bench.generate`` file once,
splits them into chunks of ``--rows-per-partition`` rows, each sorted by
Hilbert key as ``ingest_chunk`` spills them, optionally adds a second source
that repeats a share of the buildings shifted by a few metres (duplicates),
and times the plan (the geometry reading is not timed).

    python -m bench.merge_plan data/bench/buildings_1000000.parquet --copies 0.5
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import shapely

from pipeline.config import load_config
from pipeline.ingest import merge_plan
from pipeline.stream import spatial_keys

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("path", type=Path, help="a GeoParquet file from bench.generate")
    ap.add_argument("--rows-per-partition", type=int, default=50_000)
    ap.add_argument("--copies", type=float, default=0.0,
                    help="share of the buildings repeated, shifted, as a second source")
    ap.add_argument("--shift-m", type=float, default=2.0, help="s.d. of the copies' shift [m]")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--config", type=Path, default=ROOT / "configs/shanghai.yaml",
                    help="for the duplicate thresholds")
    args = ap.parse_args()
    icfg = load_config(args.config).ingest
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    wkb = pq.read_table(args.path, columns=["geometry"])["geometry"]
    geoms = shapely.from_wkb(wkb.to_numpy(zero_copy_only=False))
    rng = np.random.default_rng(0)
    copied = geoms[rng.random(len(geoms)) < args.copies]
    shift = rng.normal(0, args.shift_m, (len(copied), 2))
    geoms = np.r_[geoms, shapely.transform(copied, lambda xy: xy + np.repeat(
        shift, shapely.get_num_coordinates(copied), axis=0))]
    bounds = shapely.bounds(geoms)
    extent = (*bounds[:, :2].min(axis=0), *bounds[:, 2:].max(axis=0))
    keys, areas = spatial_keys(geoms, extent), shapely.area(geoms)
    size = args.rows_per_partition
    chunks = []
    for start in range(0, len(geoms), size):
        order = np.argsort(keys[start:start + size], kind="stable") + start
        chunks.append((keys[order], bounds[order], areas[order]))
    for _ in range(args.repeat):
        t0, c0 = time.perf_counter(), time.process_time()
        plan = merge_plan(*(list(c) for c in zip(*chunks, strict=True)), size,
                          icfg.dedup_min_overlap_share, icfg.dedup_min_area_ratio)
        print(f"{len(geoms):,} footprints, {len(plan)} partitions: merge plan in "
              f"{time.perf_counter() - t0:.2f} s ({time.process_time() - c0:.2f} s CPU)")


if __name__ == "__main__":
    main()
