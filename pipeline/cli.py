"""Command line: ``rooftop-pv run`` (or ``python -m pipeline run``).

A thin gateway: it resolves the config, sets up logging and the Dask
scheduler, and calls each stage's runner. Errors in the input or the config
are printed as one line naming the file, the field and the fix, with exit
code 2; other failures exit 1.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

from pipeline.errors import PipelineError

STAGES = ("ingest", "classify", "roof", "shading", "yield", "report")
log = logging.getLogger("pipeline")


def run_stages(config_path: Path, stages: tuple[str, ...] = STAGES,
               scheduler: str | None = None, base_dir: Path | None = None) -> dict:
    """Run the named stages in order.

    Parameters
    ----------
    config_path : Path
        The YAML config.
    stages : tuple of str
        Stages to run, a subsequence of ``STAGES``.
    scheduler : str, optional
        Override of ``dask.scheduler``.
    base_dir : Path, optional
        Project root that relative paths resolve against (default: cwd).

    Returns
    -------
    dict
        Each stage's returned statistics.
    """
    from pipeline import classify, classify_eval, ingest, pvyield, report, roof, shading
    from pipeline.config import load_config
    from pipeline.parallel import scheduler_context

    base_dir = base_dir or Path.cwd()
    cfg = load_config(config_path)
    proc = base_dir / cfg.paths.processed_dir
    results: dict = {}
    with scheduler_context(scheduler or cfg.dask.scheduler, n_workers=cfg.dask.n_workers,
                           npartitions=cfg.dask.npartitions,
                           rows_per_partition=cfg.dask.rows_per_partition):
        for stage in stages:
            t0 = time.perf_counter()
            log.info("stage %s: start", stage)
            if stage == "ingest":
                results[stage] = ingest.run(cfg, base_dir)
            elif stage == "classify":
                results[stage] = classify.run(
                    cfg.classify, proc / "ingest_buildings.parquet",
                    proc / "ingest_areas.parquet", proc / "ingest_pois.parquet",
                    proc / "classify_buildings.parquet", base_dir, cfg.working_crs)
                rules = cfg.classify.rules_file
                classify_eval.write_evaluation(
                    proc / "ingest_buildings.parquet", proc / "ingest_areas.parquet",
                    proc / "ingest_pois.parquet",
                    rules if rules.is_absolute() else base_dir / rules,
                    proc / "classify_evaluation.md")
            elif stage == "roof":
                results[stage] = roof.run(cfg, base_dir)
            elif stage == "shading":
                results[stage] = shading.run(cfg, base_dir)
            elif stage == "yield":
                results[stage] = pvyield.run(
                    cfg.weather, cfg.yield_, proc / "shading_buildings.parquet",
                    proc / "yield_buildings.parquet", proc / "yield_classes.csv", base_dir)
            elif stage == "report":
                results[stage] = report.run(cfg, base_dir, config_path)
            else:
                raise ValueError(f"unknown stage {stage!r}; stages are {', '.join(STAGES)}")
            log.info("stage %s: done in %.1f s", stage, time.perf_counter() - t0)
    return results


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``rooftop-pv``.

    Parameters
    ----------
    argv : list of str, optional
        Arguments (default: ``sys.argv[1:]``).

    Returns
    -------
    int
        Exit code: 0 done, 1 failure, 2 bad input or config.
    """
    parser = argparse.ArgumentParser(prog="rooftop-pv", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p_run = sub.add_parser("run", help="run pipeline stages")
    p_run.add_argument("--config", type=Path, default=Path("configs/shanghai.yaml"))
    p_run.add_argument("--stage", action="append", choices=[*STAGES, "all"],
                       help="stage to run (repeatable; default all)")
    p_run.add_argument("--scheduler", help="dask scheduler: synchronous, threads, processes, "
                       "local-cluster or tcp://host:port")
    p_run.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only")
    p_val = sub.add_parser("check-config", help="validate a config and exit")
    p_val.add_argument("--config", type=Path, default=Path("configs/shanghai.yaml"))
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING if getattr(args, "quiet", False) else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    try:
        if args.command == "check-config":
            from pipeline.config import load_config

            cfg = load_config(args.config)
            print(f"{args.config}: valid ({len(cfg.sources)} sources, "
                  f"{len(cfg.targets)} targets)")
            return 0
        stages = STAGES if not args.stage or "all" in args.stage else tuple(
            s for s in STAGES if s in args.stage)
        run_stages(args.config, stages, scheduler=args.scheduler)
        return 0
    except PipelineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
