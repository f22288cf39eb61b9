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
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import shapely

from pipeline.glossary import ATTRIBUTE_COLUMNS


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
