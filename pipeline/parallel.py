"""Dask driver: the only module that touches Dask.

Stages hand a plain geopandas kernel (a module-level function, so it pickles)
to :func:`map_partitions`; the frame is sorted along a Hilbert curve so that
each partition is a compact patch of the map, split into partitions, and the
kernel runs once per partition with ``dask_geopandas``'s ``map_partitions``.
The output ``meta`` comes from running the kernel on the empty frame.

The scheduler is chosen once per run with :func:`scheduler_context`:
``synchronous`` (serial, for debugging and the equality test), ``threads``,
``processes``, or the address of an existing ``dask.distributed`` scheduler
(``tcp://host:port``), or ``local-cluster`` for a ``LocalCluster`` started
for the run.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import math
import os
import sys
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import geopandas as gpd
import pandas as pd

log = logging.getLogger(__name__)

#: Environment variable that, when set, overrides the configured scheduler.
SCHEDULER_ENV = "ROOFTOP_PV_SCHEDULER"
#: Environment variable: 1 shows a progress bar per stage, 0 never (default: on a terminal
#: when logging at INFO, i.e. not with ``--quiet``).
PROGRESS_ENV = "ROOFTOP_PV_PROGRESS"

_STATE: dict[str, Any] = {"npartitions": None, "rows_per_partition": 50_000}


@contextlib.contextmanager
def scheduler_context(
    scheduler: str = "threads",
    n_workers: int | None = None,
    npartitions: int | None = None,
    rows_per_partition: int = 50_000,
) -> Iterator[str]:
    """Run the enclosed stages on the chosen Dask scheduler.

    Parameters
    ----------
    scheduler : str
        ``synchronous``, ``threads``, ``processes``, ``local-cluster`` or a
        ``tcp://host:port`` address of a running ``dask.distributed`` scheduler.
        The environment variable ``ROOFTOP_PV_SCHEDULER`` overrides it.
    n_workers : int, optional
        Workers for ``threads``, ``processes`` and ``local-cluster``
        (default: the number of cores).
    npartitions : int, optional
        Fixed number of partitions per stage; by default it follows from
        ``rows_per_partition`` with at least one partition per worker.
    rows_per_partition : int
        Target number of buildings per partition [rows].

    Yields
    ------
    str
        The scheduler in use.
    """
    import dask

    scheduler = os.environ.get(SCHEDULER_ENV, scheduler)
    n_workers = n_workers or os.cpu_count() or 1
    previous = dict(_STATE)
    _STATE.update(
        npartitions=npartitions, rows_per_partition=rows_per_partition, workers=n_workers,
        client=None,
    )
    try:
        if scheduler.startswith(("tcp://", "tls://", "ucx://")) or scheduler == "local-cluster":
            from distributed import Client, LocalCluster

            if scheduler == "local-cluster":
                cluster = LocalCluster(
                    n_workers=n_workers, threads_per_worker=1, processes=True,
                    dashboard_address=":0",  # any free port: 8787 may be taken
                )
                with cluster, Client(cluster) as client:
                    _STATE["client"] = client
                    _STATE["workers"] = len(client.scheduler_info()["workers"]) or n_workers
                    log.info("dask: LocalCluster with %d workers", _STATE["workers"])
                    yield scheduler
            else:
                with Client(scheduler) as client:
                    _STATE["client"] = client
                    _STATE["workers"] = len(client.scheduler_info()["workers"]) or 1
                    log.info("dask: cluster at %s, %d workers", scheduler, _STATE["workers"])
                    yield scheduler
        elif scheduler in ("synchronous", "threads", "processes"):
            kwargs: dict[str, Any] = {"scheduler": scheduler}
            with contextlib.ExitStack() as stack:
                if scheduler != "synchronous":
                    # one pool for the whole run, shared by Dask's local scheduler and
                    # map_tasks: process workers start once, not once per computation
                    pool = stack.enter_context(_local_pool(scheduler, n_workers))
                    kwargs.update(num_workers=n_workers, pool=pool)
                    _STATE["pool"] = pool
                stack.enter_context(dask.config.set(**kwargs))
                log.info("dask: %s scheduler, %d workers", scheduler, n_workers)
                yield scheduler
        else:
            raise ValueError(
                f"unknown dask scheduler {scheduler!r}: use synchronous, threads, processes, "
                "local-cluster or tcp://host:port (config key dask.scheduler or "
                f"environment variable {SCHEDULER_ENV})"
            )
    finally:
        _STATE.clear()
        _STATE.update(previous)


@contextlib.contextmanager
def _local_pool(scheduler: str, n_workers: int) -> Iterator[Any]:
    """The worker pool of Dask's local ``threads`` or ``processes`` scheduler.

    Process workers are started with ``spawn`` (forking a process that runs
    threads, as GDAL and Arrow do, can deadlock); they import the pipeline
    once and serve every stage of the run.
    """
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor

    if scheduler == "processes":
        level = logging.getLogger("pipeline").getEffectiveLevel()
        pool: Any = ProcessPoolExecutor(n_workers,
                                        mp_context=multiprocessing.get_context("spawn"),
                                        initializer=_init_worker, initargs=(level,))
    else:
        pool = ThreadPoolExecutor(n_workers, thread_name_prefix="rooftop-pv")
    try:
        yield pool
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _init_worker(level: int) -> None:
    """Set up a process worker of the run's pool.

    It logs to stderr like the driver (spawned: no logging yet), and imports
    the stages' modules, then freezes them (:func:`frozen_imports`): the
    worker serves every stage of the run and ends with it.
    """
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s "
                        "[worker %(process)d]: %(message)s", datefmt="%H:%M:%S")
    freeze_imports()


#: The modules whose functions the stages run; imported before :func:`freeze_imports`.
STAGE_MODULES = ("pipeline.ingest", "pipeline.classify", "pipeline.classify_eval",
                 "pipeline.roof", "pipeline.shading", "pipeline.pvyield", "pipeline.changes",
                 "pipeline.report")


def freeze_imports() -> int:
    """Import the stages' modules, then leave every object alive out of cyclic GC passes.

    Python's cyclic garbage collector walks every container object it
    tracks in each full pass: after the imports of pandas, geopandas,
    pyarrow, pyproj and the pipeline about 80,000 of them, none of which
    ever becomes garbage, and the stages' kernels allocate enough tracked
    objects (shapely geometries, pandas internals) to trigger many passes.
    ``gc.freeze()`` moves the objects alive to a permanent generation that
    the passes skip; reference counting still frees them. Measured on the
    roof kernel (2 partitions of 50,000 synthetic buildings, six rounds
    alternating with and without, in one process): 2.88 s of CPU time
    instead of 3.15 s on average, 5 rounds of 6 faster.

    Returns
    -------
    int
        Objects frozen (``gc.get_freeze_count()``).
    """
    import gc
    import importlib

    for name in STAGE_MODULES:
        importlib.import_module(name)
    gc.collect()  # garbage left by the imports is freed, not frozen
    gc.freeze()
    return gc.get_freeze_count()


@contextlib.contextmanager
def frozen_imports() -> Iterator[int]:
    """:func:`freeze_imports` for the block, then ``gc.unfreeze()``.

    For the driver, which may run again in the same process (tests, a
    scheduler's long-lived process): objects frozen there are thawed at the
    end, so garbage among them is collected as usual.

    Yields
    ------
    int
        Objects frozen.
    """
    import gc

    count = freeze_imports()
    try:
        yield count
    finally:
        gc.unfreeze()


def partition_count(n_rows: int) -> int:
    """Number of partitions for a frame of ``n_rows`` rows.

    Parameters
    ----------
    n_rows : int
        Rows in the frame.

    Returns
    -------
    int
        Partition count: the fixed setting, or enough partitions to keep
        each under ``rows_per_partition`` and at least one per worker.
    """
    if _STATE.get("npartitions"):
        return max(1, min(int(_STATE["npartitions"]), max(n_rows, 1)))
    workers = int(_STATE.get("workers") or 1)
    by_size = math.ceil(n_rows / int(_STATE.get("rows_per_partition") or 50_000))
    return max(1, min(max(by_size, workers), max(n_rows, 1)))


def map_partitions(
    gdf: gpd.GeoDataFrame, kernel: Callable[..., pd.DataFrame], *args: Any, **kwargs: Any
) -> gpd.GeoDataFrame | pd.DataFrame:
    """Apply a per-partition kernel in parallel and return the computed frame.

    Parameters
    ----------
    gdf : GeoDataFrame
        Input rows with a projected CRS. The row order of the result is the
        input order (rows are re-sorted after the spatial partitioning).
    kernel : callable
        Module-level function ``kernel(partition, *args, **kwargs)`` that
        returns a frame with the same index as ``partition``.
    *args, **kwargs
        Passed to the kernel unchanged (small frames such as district
        boundaries or rule tables are broadcast to every partition).

    Returns
    -------
    GeoDataFrame or DataFrame
        The concatenated kernel output, in input order.
    """
    from pipeline import incremental

    if not gdf.index.is_unique:
        raise ValueError("map_partitions needs a unique index")
    cache = incremental.active()
    if cache is not None:  # reuse stored results of unchanged partitions
        return cache.map_partitions(gdf, kernel, args, kwargs, compute_partitions)
    return compute_partitions(gdf, kernel, *args, **kwargs)


def compute_partitions(
    gdf: gpd.GeoDataFrame, kernel: Callable[..., pd.DataFrame], *args: Any, **kwargs: Any
) -> gpd.GeoDataFrame | pd.DataFrame:
    """Apply a kernel in parallel without the partition cache (see :func:`map_partitions`)."""
    import dask
    import dask_geopandas

    meta = kernel(gdf.iloc[:0].copy(), *args, **kwargs)
    nparts = partition_count(len(gdf))
    if len(gdf) == 0 or nparts == 1 and _STATE.get("workers", 1) == 1:
        return kernel(gdf.copy(), *args, **kwargs)
    order = _spatial_order(gdf)
    sorted_gdf = gdf.iloc[order]
    with dask.config.set({"dataframe.convert-string": False}):
        # keep pandas' own dtypes: the result must equal the serial kernel's
        ddf = dask_geopandas.from_geopandas(sorted_gdf, npartitions=nparts, sort=False)
        out = ddf.map_partitions(kernel, *args, meta=meta, **kwargs).compute()
    return out.loc[gdf.index]


def _spatial_order(gdf: gpd.GeoDataFrame) -> Any:
    """Positions of the rows sorted along a Hilbert curve of their centroids."""
    import numpy as np

    geoms = gdf.geometry
    valid = ~(geoms.isna() | geoms.is_empty)
    keys = np.zeros(len(gdf), dtype="int64")
    if valid.any():
        sub = gpd.GeoSeries(geoms[valid].values, crs=gdf.crs)
        keys[valid.to_numpy()] = sub.hilbert_distance().to_numpy()
    return np.argsort(keys, kind="stable")


def n_workers() -> int:
    """Workers of the current run (1 outside a run).

    Returns
    -------
    int
    """
    return int(_STATE.get("workers") or 1)


def available_cores() -> int:
    """Cores this process may run on (its CPU affinity, else the machine's).

    Returns
    -------
    int
    """
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def local_processes() -> bool:
    """The run's workers are local processes (the ``processes`` scheduler).

    Their results reach the driver through pipes; a stage may prefer to hand
    large results over as files (:func:`pipeline.stream.map_file`).

    Returns
    -------
    bool
    """
    from concurrent.futures import ProcessPoolExecutor

    return isinstance(_STATE.get("pool"), ProcessPoolExecutor)


def submit_background(func: Callable[..., Any], *args: Any) -> Any:
    """Run ``func(*args)`` in another process of this machine while the driver goes on.

    For work the driver itself would otherwise do serially (the report's
    GeoPackage) and that holds the GIL. Uses a worker of the run's
    ``processes`` pool when there is one, else a process started for it
    (``spawn``; about 2 s to import the pipeline).

    Parameters
    ----------
    func : callable
        Module-level function; its arguments are pickled.
    *args
        Its arguments.

    Returns
    -------
    concurrent.futures.Future
        ``result()`` waits and returns (or raises) what ``func`` did.
    """
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    pool = _STATE.get("pool")
    if isinstance(pool, ProcessPoolExecutor):
        return pool.submit(func, *args)
    own = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"))
    future = own.submit(func, *args)
    own.shutdown(wait=False)  # the process exits when its one task is done
    return future


def rows_per_partition() -> int:
    """Target rows per partition of the current run [rows].

    Returns
    -------
    int
    """
    return int(_STATE.get("rows_per_partition") or 50_000)


def map_tasks(func: Callable[..., Any], items: Sequence[tuple], label: str = "",
              sizes: Sequence[int] | None = None) -> Iterator[Any]:
    """Run ``func(*item)`` for every item on the run's scheduler, in order.

    At most two tasks per worker are in flight, so a stage streamed through
    this holds only a few partitions at a time. Results are yielded in the
    order of ``items`` as they become available.

    Parameters
    ----------
    func : callable
        Module-level function (it is pickled for process and cluster workers).
    items : sequence of tuple
        Arguments of each task.
    label : str
        Name shown on the progress bar.
    sizes : sequence of int, optional
        Rows of each task, for the progress bar (default one per task).

    Yields
    ------
    object
        ``func(*item)``, in the order of ``items``.
    """
    import dask

    workers = int(_STATE.get("workers") or 1)
    inflight = max(2, 2 * workers)
    sizes = list(sizes) if sizes is not None else [1] * len(items)
    bar = progress_bar(sum(sizes), label)
    try:
        client, pool = _STATE.get("client"), _STATE.get("pool")
        if client is not None or pool is not None:
            # sliding window: a worker that finishes takes the next task while the driver
            # handles the previous result
            def submit(item: tuple) -> Any:
                if client is not None:
                    return client.submit(func, *item, pure=False)
                return pool.submit(func, *item)

            window: deque = deque()
            queue = iter(enumerate(items))
            for pos, item in itertools.islice(queue, inflight):
                window.append((pos, submit(item)))
            while window:
                pos, future = window.popleft()
                result = future.result()
                nxt = next(queue, None)
                if nxt is not None:
                    window.append((nxt[0], submit(nxt[1])))
                bar.update(sizes[pos])
                yield result
        else:  # synchronous: in the driver, one task at a time
            for pos, item in enumerate(items):
                result = dask.compute(dask.delayed(func, pure=False)(*item))[0]
                bar.update(sizes[pos])
                yield result
    finally:
        bar.close()


def progress_bar(total: int, label: str) -> Any:
    """A tqdm progress bar on stderr, or a silent stand-in.

    Shown when ``ROOFTOP_PV_PROGRESS=1``, or, when that variable is unset, on
    a terminal while the ``pipeline`` logger reports INFO (``--quiet`` hides
    it).

    Parameters
    ----------
    total : int
        Units of work (rows).
    label : str
        Description shown before the bar.

    Returns
    -------
    object
        With ``update(n)`` and ``close()``.
    """
    setting = os.environ.get(PROGRESS_ENV)
    if setting is None:
        show = sys.stderr.isatty() and logging.getLogger("pipeline").isEnabledFor(logging.INFO)
    else:
        show = setting.strip().lower() not in ("0", "false", "no", "")
    if not show or not label:
        return _NoBar()
    from tqdm import tqdm

    return tqdm(total=total, desc=label, unit="rows", unit_scale=True, leave=False,
                file=sys.stderr, dynamic_ncols=True)


class _NoBar:
    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass
