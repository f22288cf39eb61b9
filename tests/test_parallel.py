"""Serial and Dask runs give identical results (threads, processes, LocalCluster)."""

from __future__ import annotations

import geopandas as gpd
import numpy as np
import pandas as pd
import pytest
from shapely.geometry import box

from pipeline.config import PolicyConfig, RoofConfig
from pipeline.parallel import map_partitions, partition_count, scheduler_context
from pipeline.roof import roof_potential
from tests.test_roof import POLICY, ROOF


def buildings(n=300, seed=1):
    rng = np.random.default_rng(seed)
    x, y = rng.uniform(350_000, 360_000, n), rng.uniform(3_450_000, 3_460_000, n)
    w, h = rng.uniform(5, 80, n), rng.uniform(5, 60, n)
    types = rng.choice(["government", "school", "factory", "residential", "other"], n)
    gdf = gpd.GeoDataFrame({
        "building_id": [f"b{i}" for i in range(n)], "building_type": types,
        "tag_roof_shape": rng.choice([None, "gabled", "flat"], n),
        "tag_building": rng.choice([None, "house", "yes"], n),
    }, geometry=[box(a, b, a + c, b + d) for a, b, c, d in zip(x, y, w, h, strict=True)],
        crs="EPSG:32651")
    gdf["footprint_area_m2"] = gdf.area
    gdf["height_m"] = rng.uniform(3, 60, n)
    return gdf


def run(scheduler, npartitions=4):
    with scheduler_context(scheduler, n_workers=2, npartitions=npartitions):
        return map_partitions(buildings(), roof_potential, RoofConfig(**ROOF),
                              PolicyConfig(**POLICY))


def test_threads_and_processes_equal_serial():
    serial = roof_potential(buildings(), RoofConfig(**ROOF), PolicyConfig(**POLICY))
    for sched in ("synchronous", "threads", "processes"):
        pd.testing.assert_frame_equal(run(sched), serial)


@pytest.mark.slow
def test_local_cluster_equals_serial():
    serial = roof_potential(buildings(), RoofConfig(**ROOF), PolicyConfig(**POLICY))
    pd.testing.assert_frame_equal(run("local-cluster"), serial)


def test_unknown_scheduler_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown dask scheduler 'thread'"):
        with scheduler_context("thread"):
            pass


def test_partition_count_follows_rows_and_workers():
    with scheduler_context("threads", n_workers=2, rows_per_partition=100):
        assert partition_count(1000) == 10
        assert partition_count(10) == 2
        assert partition_count(1) == 1
    with scheduler_context("threads", n_workers=2, npartitions=7):
        assert partition_count(1000) == 7


def test_frozen_imports_freeze_the_stages_modules_and_thaw_at_the_end():
    import gc
    import sys

    from pipeline.parallel import STAGE_MODULES, frozen_imports

    assert gc.get_freeze_count() == 0
    with frozen_imports() as count:
        assert count > 10_000 and gc.get_freeze_count() > 10_000  # pandas, geopandas, ours
        assert all(name in sys.modules for name in STAGE_MODULES)
    assert gc.get_freeze_count() == 0  # the driver's objects are collected as usual again


def test_process_workers_start_frozen():
    import gc

    from pipeline.parallel import map_tasks

    with scheduler_context("processes", n_workers=2):
        counts = list(map_tasks(gc.get_freeze_count, [(), ()]))
    assert len(counts) == 2 and all(c > 10_000 for c in counts)
