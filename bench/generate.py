"""Synthetic Shanghai building stock for the benchmark (not part of the pipeline).

Builds N buildings over the Shanghai districts from copies of the real sample
footprints (the OSM heritage subset's building polygons and the CBDC
prototypes): each copy is rotated by a random angle, scaled by a random factor
in ``SCALE_RANGE`` (shrunk further only if it would not fit its cell) and
centred in its own cell of a square grid laid over the districts, inside the
circle inscribed in the cell, so no two buildings overlap. Types follow a mix
close to a Chinese megacity's stock (``TYPE_MIX``), heights are drawn per type
(``HEIGHT_M``), and public buildings get names the classifier recognises.
Deterministic by seed. Written as GeoParquet (EPSG:32651) in row groups of
``ROW_GROUP`` rows, generated chunk by chunk so memory stays bounded.

    python -m bench.generate --n 1000000 --out data/bench/buildings_1000000.parquet
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import geopandas as gpd
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import shapely
from geopandas.io.arrow import _geopandas_to_arrow

CRS = "EPSG:32651"
ROW_GROUP = 100_000
SCALE_RANGE = (0.6, 1.3)  # linear scale of a template footprint (area x0.36 .. x1.7)
MIN_CELL_M, MAX_CELL_M = 40.0, 150.0
FILL = 0.85  # share of the in-district grid cells that a city-sized N occupies at most
SAMPLE = Path("data/raw/shanghai")

#: (building tag, extra tags, share of buildings, name pattern or None)
TYPE_MIX: list[tuple[str, dict, float, str | None]] = [
    ("apartments", {}, 0.30, None),
    ("residential", {}, 0.18, None),
    ("house", {"roof:shape": "gabled"}, 0.05, None),
    ("commercial", {}, 0.05, None),
    ("retail", {}, 0.03, None),
    ("office", {}, 0.03, None),
    ("industrial", {}, 0.10, "{d}第{k}机械厂"),
    ("warehouse", {}, 0.05, None),
    ("school", {"amenity": "school"}, 0.025, "{d}第{k}中学"),
    ("yes", {"amenity": "kindergarten"}, 0.005, "{d}第{k}幼儿园"),
    ("government", {"office": "government"}, 0.01, "{d}第{k}街道办事处"),
    ("hospital", {"amenity": "hospital"}, 0.005, "{d}第{k}人民医院"),
    ("public", {}, 0.02, None),
    ("yes", {}, 0.14, None),
]
#: building tag -> (median height, log-sd) of a log-normal height [m]
HEIGHT_M = {"apartments": (30.0, 0.5), "residential": (18.0, 0.4), "house": (7.0, 0.2),
            "commercial": (20.0, 0.6), "retail": (10.0, 0.4), "office": (40.0, 0.6),
            "industrial": (10.0, 0.3), "warehouse": (9.0, 0.2), "school": (16.0, 0.3),
            "government": (20.0, 0.4), "hospital": (24.0, 0.4), "public": (15.0, 0.4),
            "yes": (12.0, 0.6)}
LARGE_TYPES = ("industrial", "warehouse")  # drawn from the larger half of the templates


def load_templates(sample: Path = SAMPLE) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Real footprints centred on their centroid, as polygons in metres.

    Returns
    -------
    tuple
        ``polygons`` (shapely array, centred), ``radius_m`` (largest vertex
        distance from the centroid [m]) and ``area_m2`` [m2].
    """
    osm = gpd.read_file(sample / "osm_heritage_subset.geojson")
    osm = osm[osm["building"].notna() & osm.geom_type.isin(["Polygon", "MultiPolygon"])]
    cbdc = gpd.read_file(sample / "cbdc_prototype" / "310000SHANGHAISHI.shp")
    geoms = np.concatenate([osm.to_crs(CRS).geometry.to_numpy(),
                            cbdc.to_crs(CRS).geometry.to_numpy()])
    geoms = shapely.make_valid(geoms)
    # one polygon per template: the largest part, without holes' validity surprises
    polys = []
    for g in geoms:
        parts = [p for p in shapely.get_parts(g) if p.geom_type == "Polygon"]
        if parts:
            polys.append(max(parts, key=lambda p: p.area))
    polys = np.array(polys, dtype=object)
    area = shapely.area(polys)
    polys = polys[(area >= 30) & (area <= 20_000)]
    cent = shapely.get_coordinates(shapely.centroid(polys))
    coords, idx = shapely.get_coordinates(polys, return_index=True)
    coords -= cent[idx]
    polys = shapely.set_coordinates(polys.copy(), coords)
    radius = np.zeros(len(polys))
    np.maximum.at(radius, idx, np.hypot(coords[:, 0], coords[:, 1]))
    return polys, radius, shapely.area(polys)


def grid_cells(districts: gpd.GeoDataFrame, cell_m: float) -> np.ndarray:
    """Centres of the grid cells whose whole cell lies in a district [m]."""
    x0, y0, x1, y1 = districts.total_bounds
    xs = np.arange(x0 + cell_m / 2, x1, cell_m)
    ys = np.arange(y0 + cell_m / 2, y1, cell_m)
    union = shapely.union_all(shapely.make_valid(districts.geometry.to_numpy()))
    inner = shapely.buffer(union, -cell_m * 0.75)
    shapely.prepare(inner)
    out = []
    for y in ys:  # one row of the grid at a time keeps memory small
        ok = shapely.contains_xy(inner, xs, np.full_like(xs, y))
        out.append(np.column_stack([xs[ok], np.full(ok.sum(), y)]))
    return np.concatenate(out)


def place(templates: np.ndarray, t: np.ndarray, angle: np.ndarray, scale: np.ndarray,
          centre: np.ndarray) -> np.ndarray:
    """Rotate, scale and move template polygons, vectorised over all copies.

    Parameters
    ----------
    templates : ndarray of Polygon
        Centred template polygons.
    t : ndarray of int
        Template of each copy.
    angle : ndarray [rad]
    scale : ndarray [-]
    centre : ndarray, shape (n, 2) [m]

    Returns
    -------
    ndarray of Polygon
    """
    coords, (ring_off, geom_off) = shapely.to_ragged_array(templates)[1:]
    ring_len = np.diff(ring_off)
    rings_per = np.diff(geom_off)
    # rings of each copy, then coordinates of each ring
    n_rings = rings_per[t]
    ring_ids = _ranges(geom_off[:-1][t], n_rings)
    lens = ring_len[ring_ids]
    coord_ids = _ranges(ring_off[:-1][ring_ids], lens)
    copy_of_coord = np.repeat(np.repeat(np.arange(len(t)), n_rings), lens)
    xy = coords[coord_ids]
    c, s = np.cos(angle)[copy_of_coord], np.sin(angle)[copy_of_coord]
    k = scale[copy_of_coord]
    x = k * (c * xy[:, 0] - s * xy[:, 1]) + centre[copy_of_coord, 0]
    y = k * (s * xy[:, 0] + c * xy[:, 1]) + centre[copy_of_coord, 1]
    new_ring_off = np.concatenate([[0], np.cumsum(lens)])
    new_geom_off = np.concatenate([[0], np.cumsum(n_rings)])
    return shapely.from_ragged_array(shapely.GeometryType.POLYGON, np.column_stack([x, y]),
                                     (new_ring_off, new_geom_off))


def _ranges(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Concatenation of ``arange(s, s + n)`` for each start and length."""
    total = int(lengths.sum())
    offsets = np.repeat(np.cumsum(lengths) - lengths, lengths)
    return np.repeat(starts, lengths) + (np.arange(total) - offsets)


def generate(n: int, out: Path, seed: int = 7, sample: Path = SAMPLE) -> dict:
    """Write a GeoParquet of ``n`` synthetic buildings; return a summary."""
    t0 = time.perf_counter()
    rng = np.random.default_rng(seed)
    districts = gpd.read_file(sample / "districts_wgs84.geojson").to_crs(CRS)
    land_m2 = float(districts.area.sum())
    cell = float(np.clip(np.sqrt(land_m2 * FILL / n), MIN_CELL_M, MAX_CELL_M))
    cells = grid_cells(districts, cell)
    if len(cells) < n:
        raise SystemExit(f"only {len(cells)} cells of {cell:.0f} m fit the districts; "
                         f"lower MIN_CELL_M to place {n} buildings")
    cells = cells[np.sort(rng.choice(len(cells), size=n, replace=False))]
    templates, radius, area = load_templates(sample)
    large = np.flatnonzero(area >= np.median(area))
    fit_r = 0.45 * cell  # inside the circle inscribed in the cell, with a gap
    shares = np.array([m[2] for m in TYPE_MIX])
    kind = rng.choice(len(TYPE_MIX), size=n, p=shares / shares.sum())
    t = rng.integers(0, len(templates), n)
    is_large = np.isin([TYPE_MIX[k][0] for k in range(len(TYPE_MIX))], LARGE_TYPES)[kind]
    t[is_large] = large[rng.integers(0, len(large), int(is_large.sum()))]
    scale = np.minimum(rng.uniform(*SCALE_RANGE, n), fit_r / radius[t])
    angle = rng.uniform(0, 2 * np.pi, n)
    jitter = (fit_r - scale * radius[t])[:, None] * rng.uniform(-0.7, 0.7, (n, 2)) / np.sqrt(2)
    centre = cells + jitter
    tags = np.array([m[0] for m in TYPE_MIX], dtype=object)[kind]
    height = np.empty(n)
    for tag, (med, sd) in HEIGHT_M.items():
        sel = tags == tag
        height[sel] = np.round(med * np.exp(rng.normal(0, sd, sel.sum())), 1)
    height = np.clip(height, 3.0, 250.0)
    levels = np.maximum(1, np.round(height / 3.0)).astype("int64")
    short = districts["district_name"].str.replace(r"(新区|区)$", "", regex=True).to_numpy()
    dname = short[rng.integers(0, len(short), n)]
    knum = rng.integers(1, 60, n)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".part")
    writer = None
    try:
        for start in range(0, n, ROW_GROUP):
            sl = slice(start, min(n, start + ROW_GROUP))
            m = sl.stop - sl.start
            geoms = place(templates, t[sl], angle[sl], scale[sl], centre[sl])
            cols: dict[str, object] = {
                "id": np.char.mod("g%07d", np.arange(sl.start, sl.stop)).astype(object),
                "building": tags[sl],
                "height": height[sl],
                "building:levels": levels[sl],
            }
            for key in ("amenity", "office", "roof:shape", "name"):
                cols[key] = np.full(m, None, dtype=object)
            for k, (_tag, extra, _share, pattern) in enumerate(TYPE_MIX):
                sel = kind[sl] == k
                for key, val in extra.items():
                    cols[key][sel] = val
                if pattern:
                    cols["name"][sel] = [pattern.format(d=d, k=j) for d, j in
                                         zip(dname[sl][sel], knum[sl][sel], strict=True)]
            frame = gpd.GeoDataFrame(pd.DataFrame(cols), geometry=geoms, crs=CRS)
            table = _geopandas_to_arrow(frame, index=False)
            if writer is None:
                writer = pq.ParquetWriter(tmp, table.schema, compression="snappy")
            writer.write_table(table, row_group_size=ROW_GROUP)
        writer.close()
        tmp.replace(out)
    finally:
        tmp.unlink(missing_ok=True)
    return {"n": n, "cell_m": cell, "templates": len(templates), "file": str(out),
            "seconds": time.perf_counter() - t0}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--sample", type=Path, default=SAMPLE)
    args = parser.parse_args(argv)
    print(generate(args.n, args.out, args.seed, args.sample))


if __name__ == "__main__":
    main()
