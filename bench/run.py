"""Benchmark: I/O floor, full pipeline and each stage at N buildings.

For each N it generates the synthetic stock (``bench.generate``, cached under
``data/bench/``), writes a config that is ``configs/shanghai.yaml`` with that
file as the only source, and runs, each in its own process so that the peak
memory (summed RSS of the process and all its children, sampled every
0.1 s) is per run:

- the I/O floor: read the input GeoParquet and write the same rows to a
  GeoPackage, nothing else;
- the pipeline (all stages) with 2 workers, then with 1 worker for the
  speed-up (``--speedup-sizes``).

It prints wall time, buildings per second, the pipeline / I/O floor ratio,
the time of each stage (from the pipeline's log) and outside them (process
start, imports, run records) and the peak RSS, and
writes the same numbers to ``data/bench/results.json``. With ``--repeat R``
each measurement runs R times and the medians are reported.

    python -m bench.run --sizes 250000 1000000 2000000 [--repeat 2]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil

from bench.generate import generate

ROOT = Path(__file__).resolve().parents[1]
BENCH = Path("data/bench")
STAGE_RE = re.compile(r"stage (\w+): done in ([\d.]+) s")

IO_FLOOR = """
import sys, geopandas as gpd, pyogrio
gdf = gpd.read_parquet(sys.argv[1])
pyogrio.write_dataframe(gdf, sys.argv[2], layer="buildings", driver="GPKG", use_arrow=True)
"""


def bench_config(n: int, data: Path, workdir: Path, scheduler: str, workers: int) -> Path:
    """``configs/shanghai.yaml`` with the synthetic stock as the only source."""
    text = (ROOT / "configs/shanghai.yaml").read_text(encoding="utf-8")
    head, rest = text.split("\nsources:\n", 1)
    _, tail = rest.split("\ningest:\n", 1)
    source = f"""
sources:
  - name: synthetic  # bench/generate.py: copies of the sample footprints
    kind: vector
    path: {data.resolve()}
    id_field: id
    columns:
      name: name
      tag_building: building
      tag_amenity: amenity
      tag_office: office
      tag_roof_shape: "roof:shape"
      height_attr_m: height
      levels_attr: "building:levels"
"""
    text = head + source + "\ningest:\n" + tail
    text = re.sub(r"processed_dir: \S+", f"processed_dir: {workdir / 'processed'}", text)
    text = re.sub(r"outputs_dir: \S+", f"outputs_dir: {workdir / 'outputs'}", text)
    text = re.sub(r"scheduler: \S+", f"scheduler: {scheduler}", text)
    text = re.sub(r"n_workers: \S+", f"n_workers: {workers}", text)
    # one-off large runs stream row groups; the rerun cache is for scheduled reruns
    text = re.sub(r"partition_cache: \S+", "partition_cache: false", text)
    path = workdir / f"config_{scheduler}_{workers}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def measured(cmd: list[str], env: dict | None = None) -> dict:
    """Run a command; wall time, peak summed RSS of its process tree, stderr."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env={**os.environ, **(env or {})})
    peak = [0]
    done = threading.Event()

    def sample() -> None:
        root = psutil.Process(proc.pid)
        while not done.is_set():
            try:
                procs = [root, *root.children(recursive=True)]
                rss = 0
                for p in procs:
                    try:
                        rss += p.memory_info().rss
                    except psutil.Error:
                        pass
                peak[0] = max(peak[0], rss)
            except psutil.Error:
                pass
            done.wait(0.1)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    out, err = proc.communicate()
    done.set()
    th.join()
    wall = time.perf_counter() - t0
    if proc.returncode:
        sys.stderr.write(err[-4000:])
        raise SystemExit(f"{' '.join(cmd)} failed with exit code {proc.returncode}")
    return {"seconds": wall, "peak_rss_gib": peak[0] / 2**30, "stderr": err}


def run_size(n: int, speedup: bool, scheduler: str, repeat: int = 1) -> dict:
    """The I/O floor and the pipeline runs at one size, each ``repeat`` times.

    Times are the median of the repeats (``runs_s`` lists them all; stage times
    are medians too), the peak RSS the largest of them.
    """
    data = BENCH / f"buildings_{n}.parquet"
    if not data.exists():
        print(f"generating {n:,} buildings -> {data}", flush=True)
        generate(n, data)
    work = BENCH / str(n)
    py = sys.executable
    gpkg = work / "io_floor.gpkg"
    work.mkdir(parents=True, exist_ok=True)
    floors = []
    for _ in range(repeat):
        gpkg.unlink(missing_ok=True)
        floors.append(measured([py, "-c", IO_FLOOR, str(data), str(gpkg)]))
    gpkg.unlink(missing_ok=True)
    res = {"n": n, "repeat": repeat,
           "io_floor_s": statistics.median(f["seconds"] for f in floors),
           "io_floor_runs_s": [f["seconds"] for f in floors],
           "io_floor_peak_rss_gib": max(f["peak_rss_gib"] for f in floors)}
    for workers in ([2, 1] if speedup else [2]):
        cfg = bench_config(n, data, work, scheduler, workers)
        runs = []
        for k in range(repeat):
            run = measured([py, "-m", "pipeline", "run", "--config", str(cfg)],
                           env={"PYTHONPATH": str(ROOT), "ROOFTOP_PV_PROGRESS": "0"})
            run["stages"] = {m.group(1): float(m.group(2))
                             for m in STAGE_RE.finditer(run["stderr"])}
            runs.append(run)
            suffix = "" if k == 0 else f"_{k + 1}"
            (work / f"pipeline_{workers}w{suffix}.log").write_text(run["stderr"],
                                                                   encoding="utf-8")
        res[f"pipeline_{workers}w"] = {
            "seconds": statistics.median(r["seconds"] for r in runs),
            "runs_s": [r["seconds"] for r in runs],
            "peak_rss_gib": max(r["peak_rss_gib"] for r in runs),
            "stages": {name: statistics.median(r["stages"].get(name, float("nan"))
                                               for r in runs)
                       for name in runs[0]["stages"]},
            # process start, imports, run records and hashing between the stages
            "outside_stages_s": statistics.median(r["seconds"] - sum(r["stages"].values())
                                                  for r in runs)}
    p2 = res["pipeline_2w"]["seconds"]
    res["buildings_per_s"] = n / p2
    res["ratio_pipeline_io_floor"] = p2 / res["io_floor_s"]
    if speedup:
        res["speedup_2w_over_1w"] = res["pipeline_1w"]["seconds"] / p2
    return res


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[250_000, 1_000_000, 2_000_000])
    parser.add_argument("--speedup-sizes", type=int, nargs="*", default=[1_000_000],
                        help="sizes also run with 1 worker for the 2-vs-1 speed-up")
    parser.add_argument("--scheduler", default="processes",
                        help="dask scheduler for the pipeline runs (default processes: "
                        "the kernels' pandas code holds the GIL, so threads share one core "
                        "for much of the run)")
    parser.add_argument("--repeat", type=int, default=1,
                        help="runs of each measurement; the medians are reported (run-to-run "
                        "differences on a shared 2-core machine reach 20%%)")
    args = parser.parse_args(argv)
    load = os.getloadavg()
    print(f"cores {os.cpu_count()}, load average before the run {load[0]:.2f} "
          f"{load[1]:.2f} {load[2]:.2f}", flush=True)
    results = []
    for n in args.sizes:
        r = run_size(n, n in args.speedup_sizes, args.scheduler, args.repeat)
        results.append(r)
        p = r["pipeline_2w"]
        stages = "  ".join(f"{k} {v:.1f}s" for k, v in p["stages"].items())
        line = (f"N={n:>9,}  pipeline {p['seconds']:6.1f} s  {r['buildings_per_s']:8,.0f} "
                f"bldg/s  I/O floor {r['io_floor_s']:5.1f} s  ratio "
                f"{r['ratio_pipeline_io_floor']:.2f}  peak RSS {p['peak_rss_gib']:.2f} GiB")
        if r["repeat"] > 1:
            line += "  (medians of runs " + ", ".join(f"{t:.1f}" for t in p["runs_s"]) + " s)"
        if "speedup_2w_over_1w" in r:
            line += (f"  1 worker {r['pipeline_1w']['seconds']:.1f} s, speed-up "
                     f"{r['speedup_2w_over_1w']:.2f}")
        print(line + "\n    stages (2 workers): " + stages
              + f"  outside the stages {p['outside_stages_s']:.1f}s", flush=True)
        if "pipeline_1w" in r:
            one = r["pipeline_1w"]["stages"]
            print("    stages (1 worker):  " + "  ".join(
                f"{k} {v:.1f}s (x{v / p['stages'][k]:.2f})" for k, v in one.items()
                if p["stages"].get(k)), flush=True)
    by_n = {r["n"]: r for r in results}
    if 1_000_000 in by_n and 2_000_000 in by_n:
        t1, t2 = (by_n[k]["pipeline_2w"]["seconds"] for k in (1_000_000, 2_000_000))
        print(f"time(2M)/time(1M) = {t2 / t1:.2f}")
    print(f"load average after the run {os.getloadavg()[0]:.2f}")
    BENCH.mkdir(parents=True, exist_ok=True)
    (BENCH / "results.json").write_text(json.dumps(results, indent=2), encoding="utf-8")


if __name__ == "__main__":
    main()
