"""Duplicate footprints within and across sources, found by overlap.

The same building often comes from several sources (an OpenStreetMap way, a
survey record, a footprint traced from a height raster) or twice from one
source. Two footprints are duplicates when at least
``ingest.dedup_min_overlap_share`` of the smaller one lies inside the larger
and the smaller has at least ``ingest.dedup_min_area_ratio`` of the larger's
area (comparable size: a building inside a block-sized polygon is not a
duplicate of the block). Of each group of duplicates the richest record is
kept and the others are rejected with the kept one's ``building_id`` in the
reason.

Intersection over union alone misses real duplicates: the CBDC prototypes in
the Shanghai sample are displaced and simplified, and their OSM twins (e.g.
上海中心大厦) overlap 86-89% of the smaller footprint at an IoU of only
0.39-0.49.

Richness (:func:`richness`)
    the number of non-null canonical attributes, where ``building=yes`` counts
    as no attribute (it says nothing about use), plus 2 when the record has a
    height or a storey count (the roof stage and the classifier use them).
    Ties go to the source listed first in the config, then to the larger
    footprint, then to the smaller ``building_id``.

The choice is greedy in rank order (as in non-maximum suppression): a record
is kept unless it duplicates a better-ranked record that is kept. Candidate
pairs come from an STRtree query, and the overlap of all pairs is computed
in one vectorised call, so the cost grows with the number of overlapping
pairs, not with the square of the number of footprints.

Candidate groups (:func:`candidate_groups`)
    A record's fate depends only on the records it is joined to by chains of
    duplicate pairs, so running :func:`find_duplicates` on any set of whole
    groups of such chains gives the same answer for them as running it over
    all records at once. The groups are found from bounding boxes and areas
    alone (4 + 1 floats a record, no geometry), with tests that every
    duplicate pair passes: the boxes intersect, the area ratio is at least
    ``dedup_min_area_ratio``, and the boxes' intersection (which holds the
    footprints' intersection) is at least ``dedup_min_overlap_share`` of the
    smaller footprint. Chunked ingest uses them to keep each group in one
    merge partition. Touching neighbours fail the overlap test, so groups stay
    small (the duplicates and the odd overlapping neighbour) even where
    buildings form terraces.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator

import numpy as np
import pandas as pd
import shapely

from pipeline.glossary import ATTRIBUTE_COLUMNS

#: relative slack [-] on the area tests of :func:`candidate_pairs`: the box tests must never
#: reject a pair that :func:`overlapping_pairs` accepts, whatever the rounding of the areas
CANDIDATE_RTOL = 1e-6
#: boxes over more cells of a strip of :func:`box_pairs`' grid than this are tested directly
#: against the boxes in their rows instead of being listed cell by cell; bounds the cells listed
#: per box (the memory), whatever the spread of box sizes [cells]
GRID_MAX_CELLS = 256


def richness(frame: pd.DataFrame) -> np.ndarray:
    """Score of how much a record says about its building.

    Parameters
    ----------
    frame : DataFrame
        Canonical attribute columns.

    Returns
    -------
    ndarray
        int score (see the module docstring).
    """
    cols = [c for c in ATTRIBUTE_COLUMNS if c in frame.columns]
    present = frame[cols].notna().to_numpy()
    score = present.sum(axis=1)
    if "tag_building" in frame.columns:
        score -= (frame["tag_building"].astype(object) == "yes").to_numpy(dtype=bool)
    height = np.zeros(len(frame), dtype=bool)
    for c in ("height_attr_m", "levels_attr"):
        if c in frame.columns:
            height |= frame[c].notna().to_numpy()
    return score + 2 * height


def overlapping_pairs(geoms: np.ndarray, min_overlap_share: float, min_area_ratio: float
                      ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Pairs of polygons that are duplicates by overlap.

    Parameters
    ----------
    geoms : ndarray of shapely geometries
        Valid polygons in a metric CRS.
    min_overlap_share : float
        Least share of the smaller polygon's area inside the larger (0, 1] [-].
    min_area_ratio : float
        Least ratio of the smaller area to the larger [0, 1] [-].

    Returns
    -------
    i, j : ndarray
        Positions with ``i < j``.
    share : ndarray
        Intersection area over the smaller area [-].
    ratio : ndarray
        Smaller area over larger area [-].
    """
    geoms = np.asarray(geoms, dtype=object)
    if len(geoms) < 2:
        empty = np.empty(0, dtype=np.intp)
        return empty, empty, np.empty(0), np.empty(0)
    tree = shapely.STRtree(geoms)
    i, j = tree.query(geoms, predicate="intersects")
    keep = i < j
    i, j = i[keep], j[keep]
    area = shapely.area(geoms)
    small = np.minimum(area[i], area[j])
    large = np.maximum(area[i], area[j])
    with np.errstate(invalid="ignore", divide="ignore"):
        ratio = np.where(large > 0, small / large, 0.0)
    # the intersection is only computed for pairs of comparable size
    cand = ratio >= min_area_ratio
    i, j, small, ratio = i[cand], j[cand], small[cand], ratio[cand]
    inter = shapely.area(shapely.intersection(geoms[i], geoms[j]))
    with np.errstate(invalid="ignore", divide="ignore"):
        share = np.where(small > 0, inter / small, 0.0)
    hit = share >= min_overlap_share
    return i[hit], j[hit], share[hit], ratio[hit]


def find_duplicates(frame: pd.DataFrame, min_overlap_share: float, min_area_ratio: float,
                    source_order: list[str]) -> pd.DataFrame:
    """Which footprints duplicate a richer one, and which one they duplicate.

    Parameters
    ----------
    frame : GeoDataFrame
        Kept footprints of all sources, metric CRS, with ``building_id``,
        ``source``, ``footprint_area_m2`` and the canonical attributes.
    min_overlap_share : float
        Least share of the smaller footprint inside the larger [-].
    min_area_ratio : float
        Least ratio of the smaller footprint's area to the larger's [-].
    source_order : list of str
        Source names, most trusted first (tie-break).

    Returns
    -------
    DataFrame
        One row per dropped footprint, indexed like ``frame``: ``kept_id``
        (``building_id`` of the record kept instead), ``overlap_share`` and
        ``area_ratio`` of the pair [-], ``richness_dropped``, ``richness_kept``.
    """
    n = len(frame)
    i, j, share, ratio = overlapping_pairs(np.asarray(frame.geometry.array), min_overlap_share,
                                           min_area_ratio)
    if len(i) == 0:
        return pd.DataFrame({"kept_id": pd.Series(dtype=object),
                             "overlap_share": pd.Series(dtype=float),
                             "area_ratio": pd.Series(dtype=float),
                             "richness_dropped": pd.Series(dtype=int),
                             "richness_kept": pd.Series(dtype=int)}, index=frame.index[:0])
    score = richness(frame)
    src_rank = frame["source"].map({s: k for k, s in enumerate(source_order)}).fillna(
        len(source_order)).to_numpy()
    order = np.lexsort((frame["building_id"].to_numpy(dtype=str),
                        -frame["footprint_area_m2"].to_numpy(dtype=float), src_rank, -score))
    rank = np.empty(n, dtype=np.intp)
    rank[order] = np.arange(n)
    # orient each pair better -> worse
    better = np.where(rank[i] < rank[j], i, j)
    worse = np.where(rank[i] < rank[j], j, i)
    state = np.zeros(n, dtype=np.int8)  # 0 undecided, 1 kept, 2 dropped
    involved = np.zeros(n, dtype=bool)
    involved[better] = True
    involved[worse] = True
    state[~involved] = 1
    kept_by = np.full(n, -1, dtype=np.intp)
    pair_share = np.zeros(n)
    pair_ratio = np.zeros(n)
    while (state == 0).any():
        # undecided records with no undecided or kept better neighbour are kept
        open_pair = state[better] != 2
        blocked = np.zeros(n, dtype=bool)
        blocked[worse[open_pair]] = True
        state[(state == 0) & ~blocked] = 1
        # records with a kept better neighbour are dropped (the best-ranked one names it)
        hit = (state[better] == 1) & (state[worse] == 0)
        if hit.any():
            hb, hw, hs, hr = better[hit], worse[hit], share[hit], ratio[hit]
            first = np.lexsort((rank[hb], hw))
            hb, hw, hs, hr = hb[first], hw[first], hs[first], hr[first]
            uniq = np.r_[True, hw[1:] != hw[:-1]]
            kept_by[hw[uniq]] = hb[uniq]
            pair_share[hw[uniq]] = hs[uniq]
            pair_ratio[hw[uniq]] = hr[uniq]
            state[hw[uniq]] = 2
    dropped = np.flatnonzero(state == 2)
    ids = frame["building_id"].to_numpy(dtype=object)
    return pd.DataFrame({
        "kept_id": ids[kept_by[dropped]],
        "overlap_share": pair_share[dropped],
        "area_ratio": pair_ratio[dropped],
        "richness_dropped": score[dropped],
        "richness_kept": score[kept_by[dropped]],
    }, index=frame.index[dropped])


def box_pairs(bounds_m: np.ndarray, block_rows: int,
              keep: Callable[[np.ndarray, np.ndarray], np.ndarray] | None = None
              ) -> tuple[np.ndarray, np.ndarray]:
    """Pairs of boxes that intersect (touching counts), by a uniform grid.

    Each box is listed in every cell of a square grid it covers (the cell is
    the median box extent, so most boxes cover one to four cells); the boxes
    listed in one cell are paired, and a pair is kept in the one cell holding
    the lower-left corner of the boxes' intersection. Pure NumPy: no geometry
    is built. The grid is swept in strips of columns holding the lower-left
    corners of about ``block_rows`` boxes (plus the boxes reaching into the
    strip from the left), so the memory and the arrays made are those of a
    strip, not of all boxes. A box over more than :data:`GRID_MAX_CELLS`
    cells of a strip (far larger than most) is tested directly against the
    boxes in its rows instead of being listed cell by cell.

    Parameters
    ----------
    bounds_m : ndarray, shape (n, 4)
        ``xmin, ymin, xmax, ymax`` of each box [m]; rows with a non-finite
        bound are in no pair.
    block_rows : int
        Boxes per strip [rows].
    keep : callable, optional
        ``keep(i, j)`` gives a boolean mask of the pairs (row positions) to
        return; applied strip by strip, so the memory follows the pairs kept.

    Returns
    -------
    i, j : ndarray of intp
        Row positions with ``i < j``, each intersecting pair (that ``keep``
        keeps) once.
    """
    pairs = list(box_pair_batches(bounds_m, block_rows, keep))
    empty = np.empty(0, dtype=np.intp)
    return (np.concatenate([empty, *(p[0] for p in pairs)]),
            np.concatenate([empty, *(p[1] for p in pairs)]))


def box_pair_batches(bounds_m: np.ndarray, block_rows: int,
                     keep: Callable[[np.ndarray, np.ndarray], np.ndarray] | None = None
                     ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """:func:`box_pairs`, one strip of the grid at a time.

    Parameters
    ----------
    bounds_m, block_rows, keep
        As for :func:`box_pairs`.

    Yields
    ------
    i, j : ndarray of intp
        The pairs found in one strip.
    """
    bounds_m = np.asarray(bounds_m, dtype=float).reshape(-1, 4)
    rows = np.flatnonzero(np.isfinite(bounds_m).all(axis=1))
    if len(rows) < 2:
        return
    box = bounds_m[rows]
    extent_m = np.maximum(box[:, 2] - box[:, 0], box[:, 3] - box[:, 1])
    cell_m = float(np.median(extent_m))
    if not cell_m > 0:  # mostly points: any positive cell size works
        cell_m = max(float(extent_m.max()), 1.0)
    origin = (float(box[:, 0].min()), float(box[:, 1].min()), cell_m)
    n_grid_rows = int((box[:, 3].max() - origin[1]) / cell_m) + 1
    col0 = _grid_index(box[:, 0], origin[0], cell_m)
    order = np.argsort(col0, kind="stable")
    col0 = col0[order]
    # strips of columns, each starting at the corner column of every block_rows-th box
    edges = np.r_[np.unique(col0[::max(block_rows, 1)]), col0[-1] + 1]
    firsts = np.searchsorted(col0, edges)
    carry = np.empty(0, dtype=np.intp)
    for k in range(len(edges) - 1):
        active = np.r_[carry, order[firsts[k]:firsts[k + 1]]]
        i, j, reach = _strip_pairs(box[active], rows[active], origin, n_grid_rows,
                                   (int(edges[k]), int(edges[k + 1])), keep)
        yield i, j
        carry = active[reach]


def _grid_index(coord_m: np.ndarray, origin_m: float, cell_m: float) -> np.ndarray:
    """Grid column (or row) of coordinates [m] at or past the origin [cells]."""
    return ((coord_m - origin_m) / cell_m).astype(np.int64)


def _strip_pairs(box: np.ndarray, ids: np.ndarray, origin: tuple[float, float, float],
                 n_grid_rows: int, cols: tuple[int, int],
                 keep: Callable[[np.ndarray, np.ndarray], np.ndarray] | None
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Intersecting pairs of boxes in the grid columns ``cols[0]`` to ``cols[1] - 1``.

    Returns the pairs as ``ids`` (smaller first; each pair where the
    lower-left corner of its intersection lies in the strip, and ``keep``
    keeps it) and which boxes reach past the strip. Boxes over more than
    :data:`GRID_MAX_CELLS` cells of the strip are not listed cell by cell
    but tested directly against the boxes whose rows they span.
    """
    first_col, stop_col = cols

    def kept(i: np.ndarray, j: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        i, j = np.minimum(ids[i], ids[j]), np.maximum(ids[i], ids[j])
        if keep is None:
            return i, j
        hit = keep(i, j)
        return i[hit], j[hit]

    x0, y0, cell_m = origin
    col0, col1 = _grid_index(box[:, 0], x0, cell_m), _grid_index(box[:, 2], x0, cell_m)
    row0, row1 = _grid_index(box[:, 1], y0, cell_m), _grid_index(box[:, 3], y0, cell_m)
    reach = col1 >= stop_col
    lo, hi = np.maximum(col0, first_col), np.minimum(col1, stop_col - 1)
    n_cols = hi - lo + 1
    n_cells = n_cols * (row1 - row0 + 1)
    small, big = np.flatnonzero(n_cells <= GRID_MAX_CELLS), np.flatnonzero(n_cells > GRID_MAX_CELLS)
    # (cell, box) listings of the small boxes, one per cell a box covers
    member = np.repeat(small, n_cells[small])
    step = np.arange(len(member)) - np.repeat(np.cumsum(n_cells[small]) - n_cells[small],
                                              n_cells[small])
    up = (step / n_cols[member]).astype(np.int64)  # float division: far faster than int64's
    cell = (lo[member] + step - up * n_cols[member]) * n_grid_rows + row0[member] + up
    listing = np.sort(cell * len(box) + member)  # by cell, then by box
    cell, member = np.divmod(listing, len(box))
    # the listings' boxes in listing order, so that the pairs below read them in sequence
    bx0, by0, bx1, by1 = box[member].T
    bc, br = col0[member], row0[member]
    starts = np.flatnonzero(np.r_[True, cell[1:] != cell[:-1]])
    end = np.repeat(np.r_[starts[1:], len(cell)], np.diff(np.r_[starts, len(cell)]))
    a = np.arange(len(cell))
    out_i, out_j = [np.empty(0, dtype=np.intp)], [np.empty(0, dtype=np.intp)]
    for gap in itertools.count(1):  # pairs of listings ``gap`` apart in one cell
        a = a[a + gap < end[a]]
        if not len(a):
            break
        b = a + gap
        hit = ((np.maximum(bx0[a], bx0[b]) <= np.minimum(bx1[a], bx1[b]))
               & (np.maximum(by0[a], by0[b]) <= np.minimum(by1[a], by1[b]))
               & (np.maximum(bc[a], bc[b]) * n_grid_rows + np.maximum(br[a], br[b]) == cell[a]))
        i, j = kept(member[a[hit]], member[b[hit]])
        out_i.append(i)
        out_j.append(j)
    # big boxes: against the small boxes that start in their rows and the later big boxes
    by_ymin = small[np.argsort(box[small, 1], kind="stable")]
    ymin_sorted = box[by_ymin, 1]
    small_height_m = float((box[small, 3] - box[small, 1]).max(initial=0.0))
    for k, g in enumerate(big):
        span = slice(np.searchsorted(ymin_sorted, box[g, 1] - small_height_m),
                     np.searchsorted(ymin_sorted, box[g, 3], "right"))
        other = np.r_[by_ymin[span], big[k + 1:]]
        corner_col = np.maximum(col0[g], col0[other])
        hit = ((np.maximum(box[g, 0], box[other, 0]) <= np.minimum(box[g, 2], box[other, 2]))
               & (np.maximum(box[g, 1], box[other, 1]) <= np.minimum(box[g, 3], box[other, 3]))
               & (corner_col >= first_col) & (corner_col < stop_col))
        i, j = kept(np.full(int(hit.sum()), g), other[hit])
        out_i.append(i)
        out_j.append(j)
    return np.concatenate(out_i), np.concatenate(out_j), reach


def candidate_groups(bounds_m: np.ndarray, area_m2: np.ndarray, min_overlap_share: float,
                     min_area_ratio: float, block_rows: int) -> np.ndarray:
    """Groups of footprints that duplicate chains cannot leave (see the module docstring).

    :func:`find_duplicates` run on any set of whole groups decides for
    their records as it does run over all records at once: every pair that
    :func:`overlapping_pairs` reports passes the box tests here (they are
    necessary conditions, with :data:`CANDIDATE_RTOL` of slack). The pairs
    are joined into groups one strip of :func:`box_pairs` at a time, so the
    memory does not grow with the number of pairs.

    Parameters
    ----------
    bounds_m : ndarray, shape (n, 4)
        Bounding box of each footprint [m].
    area_m2 : ndarray
        Area of each footprint [m2].
    min_overlap_share, min_area_ratio : float
        Duplicate thresholds [-] (:func:`find_duplicates`).
    block_rows : int
        Boxes per strip of :func:`box_pairs` [rows].

    Returns
    -------
    ndarray of intp
        For each footprint the smallest row position of its group (its own
        position when it can duplicate nothing).
    """
    bounds_m = np.asarray(bounds_m, dtype=float).reshape(-1, 4)
    area_m2 = np.asarray(area_m2, dtype=float)

    def may_duplicate(i: np.ndarray, j: np.ndarray) -> np.ndarray:
        small = np.minimum(area_m2[i], area_m2[j])
        large = np.maximum(area_m2[i], area_m2[j])
        with np.errstate(invalid="ignore", divide="ignore"):
            ratio = np.where(large > 0, small / large, 0.0)
        width_m = (np.minimum(bounds_m[i, 2], bounds_m[j, 2])
                   - np.maximum(bounds_m[i, 0], bounds_m[j, 0]))
        height_m = (np.minimum(bounds_m[i, 3], bounds_m[j, 3])
                    - np.maximum(bounds_m[i, 1], bounds_m[j, 1]))
        return ((ratio >= min_area_ratio * (1 - CANDIDATE_RTOL))
                & (width_m * height_m >= min_overlap_share * small * (1 - CANDIDATE_RTOL)))

    group = np.arange(len(area_m2))
    held_i: list[np.ndarray] = []
    held_j: list[np.ndarray] = []
    for i, j in box_pair_batches(bounds_m, block_rows, may_duplicate):
        held_i.append(i)
        held_j.append(j)
        if sum(map(len, held_i)) >= len(group):  # joined when as many pairs as footprints
            group = join_components(group, np.concatenate(held_i), np.concatenate(held_j))
            held_i, held_j = [], []
    if held_i:
        group = join_components(group, np.concatenate(held_i), np.concatenate(held_j))
    return group


def join_components(root: np.ndarray, i: np.ndarray, j: np.ndarray) -> np.ndarray:
    """Connected components of a graph, joined with more edges.

    Parameters
    ----------
    root : ndarray of intp
        For each node the smallest node of its component so far (``arange``
        for a graph without edges).
    i, j : ndarray of int
        The new edges' end nodes.

    Returns
    -------
    ndarray of intp
        For each node the smallest node of its component with the new edges.
    """
    if not len(i):
        return root
    label = np.array(root, dtype=np.intp, copy=True)
    i, j = np.asarray(i, dtype=np.intp), np.asarray(j, dtype=np.intp)
    while True:
        while (label[label] != label).any():  # point every node at its root
            label = label[label]
        li, lj = label[i], label[j]
        split = li != lj
        if not split.any():
            return label
        # hook the larger root of each edge under the smaller
        np.minimum.at(label, np.maximum(li[split], lj[split]), np.minimum(li[split], lj[split]))
