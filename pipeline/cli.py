"""Command line: ``rooftop-pv run`` (or ``python -m pipeline run``).

A thin gateway: it resolves the config, sets up logging and the Dask
scheduler, and calls each stage's runner inside a recorded, locked run
(``pipeline.runs``). Errors in the input or the config are printed as one line
naming the file, the field and the fix, with exit code 2; a run that finds
another one writing exits 3; other failures exit 1. Done, or nothing to do
with ``--if-changed``, is 0.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

from pipeline.errors import PipelineError
from pipeline.runs import EXIT_BAD_INPUT, EXIT_FAILED, EXIT_LOCKED, EXIT_OK, LockError

STAGES = ("ingest", "classify", "roof", "shading", "yield", "report")
log = logging.getLogger("pipeline")


def run_stages(config_path: Path, stages: tuple[str, ...] = STAGES,
               scheduler: str | None = None, base_dir: Path | None = None,
               if_changed: bool = False, lock_timeout_s: float | None = None,
               argv: list[str] | None = None) -> dict:
    """Run the named stages in order, as one recorded run (see ``pipeline.runs``).

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
    if_changed : bool
        Skip stages whose outputs are up to date; with none to run, do
        nothing (the result is ``{"nothing_to_do": True}``).
    lock_timeout_s : float, optional
        Override of ``runs.lock_timeout_s`` [s].
    argv : list of str, optional
        The command line, for the run record.

    Returns
    -------
    dict
        Each stage's returned statistics, and ``run_id``.
    """
    from pipeline import (
        classify,
        classify_eval,
        incremental,
        ingest,
        pvyield,
        report,
        roof,
        runs,
        shading,
    )
    from pipeline.config import load_config
    from pipeline.parallel import frozen_imports, scheduler_context

    base_dir = base_dir or Path.cwd()
    cfg = runs.with_drop_sources(load_config(config_path), base_dir)
    proc = base_dir / cfg.paths.processed_dir
    results: dict = {}
    with frozen_imports(), \
            runs.run_context(cfg, config_path, base_dir, stages, lock_timeout_s, argv) as run, \
            scheduler_context(scheduler or cfg.dask.scheduler, n_workers=cfg.dask.n_workers,
                              npartitions=cfg.dask.npartitions,
                              rows_per_partition=cfg.dask.rows_per_partition):
        if if_changed and all(run.up_to_date(s) for s in stages):
            log.info("nothing to do: inputs, config and code unchanged since the last run")
            runs.append_history(run.runs_dir, "nothing to do (--if-changed)")
            return {"nothing_to_do": True}
        log.info("run %s: log in %s", run.run_id, run.open_log())
        results["run_id"] = run.run_id
        for stage in stages:
            if run.skip(stage, if_changed):
                continue
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
                    proc / "classify_evaluation.md",
                    max_buildings=cfg.classify.evaluation_max_buildings)
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
            run.stage_done(stage, results[stage], time.perf_counter() - t0,
                           incremental.active().take_stats() if incremental.active() else None)
        if run.manifest["stages"].get("report", {}).get("status") == "ran":
            run.keep_outputs()
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
        Exit code: 0 done (or nothing to do), 1 failure, 2 bad input or
        config, 3 another run holds the lock.
    """
    parser = argparse.ArgumentParser(prog="rooftop-pv", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p_run = sub.add_parser("run", help="run pipeline stages")
    p_run.add_argument("--config", type=Path, default=Path("configs/shanghai.yaml"))
    p_run.add_argument("--stage", action="append", choices=[*STAGES, "all"],
                       help="stage to run (repeatable; default all)")
    p_run.add_argument("--scheduler", help="dask scheduler: synchronous, threads, processes, "
                       "local-cluster or tcp://host:port")
    p_run.add_argument("--if-changed", action="store_true",
                       help="skip stages whose inputs, config and code are unchanged; exit 0 "
                       "at once when nothing changed (for schedulers)")
    p_run.add_argument("--lock-timeout", type=float, default=None, metavar="SECONDS",
                       help="wait this long for another run to finish (default: "
                       "runs.lock_timeout_s in the config)")
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
        result = run_stages(args.config, stages, scheduler=args.scheduler,
                            if_changed=args.if_changed, lock_timeout_s=args.lock_timeout,
                            argv=["rooftop-pv", *(argv if argv is not None else sys.argv[1:])])
        print("nothing to do: inputs, config and code unchanged" if result.get("nothing_to_do")
              else f"done: run {result['run_id']}")
        return EXIT_OK
    except LockError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_LOCKED
    except PipelineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except Exception as exc:  # any other failure: one line here, the traceback in the run log
        print(f"error: {type(exc).__name__}: {exc} (traceback in outputs/runs/<run id>/run.log; "
              "the previous outputs are unchanged)", file=sys.stderr)
        return EXIT_FAILED
