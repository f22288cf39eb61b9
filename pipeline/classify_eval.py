"""Evaluation of the building-type classifier on labelled sets.

Two labelled sets measure the rules of :mod:`pipeline.classify`:

CBDC prototypes
    Truth from the survey code ``landUseTyp`` (:data:`CBDC_TRUTH`), refined by
    hand labels written from the names (``configs/labels/cbdc_prototypes.csv``:
    ``source_id,name,true_type,certain,note``; rows marked ``certain=no`` are
    left out). Measured twice: with the survey codes visible (the full
    classifier: code table plus the name refinement of ``Administration``) and
    with the codes hidden (the name rules alone).
OSM sample
    Truth from the buildings' explicit use tags (``building=school``,
    ``amenity=*``, ``office=*``, ``government=*`` ...); those tags are then
    hidden (set to null) so that the containing-area, POI and name rules are
    what is measured.

=================  =====  ===================================================
output             unit   meaning
=================  =====  ===================================================
support            -      buildings whose true type is the class
predicted          -      buildings predicted as the class
correct            -      true positives
precision          -      correct / predicted (NaN when nothing predicted)
recall             -      correct / support (NaN when no support)
confusion          -      rows: true type, columns: predicted type
=================  =====  ===================================================

Run ``python -m pipeline.classify_eval --buildings
data/processed/ingest_buildings.parquet --areas ... --pois ... --rules
configs/classification.yaml`` to print the tables.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import geopandas as gpd
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.classify import (
    BUILDING_TYPES,
    EXPLICIT_TAG_COLUMNS,
    ClassificationError,
    ClassificationRules,
    classify_buildings,
    explicit_tag_types,
    load_rules,
)
from pipeline.glossary import ATTRIBUTE_COLUMNS

#: Truth derived from the CBDC ``landUseTyp`` code (before the hand labels).
CBDC_TRUTH: dict[str, str] = {
    "administration": "other_public",
    "industry": "factory",
    "office": "commercial",
    "commercial": "commercial",
    "residential_1": "residential",
    "residential_2": "residential",
    "residential_3": "residential",
    "transport": "other",
}

#: Default hand labels of the CBDC prototypes.
DEFAULT_CBDC_LABELS = Path(__file__).resolve().parents[1] / "configs/labels/cbdc_prototypes.csv"


@dataclass(frozen=True)
class EvalResult:
    """Per-class scores and confusion matrix of one labelled set.

    Attributes
    ----------
    title : str
        Name of the labelled set.
    labels : list of str
        Classes in table order.
    per_class : DataFrame
        Index: class; columns ``support``, ``predicted``, ``correct``,
        ``precision``, ``recall``.
    confusion : DataFrame
        Counts; rows: true class, columns: predicted class.
    n : int
        Labelled buildings.
    accuracy : float
        Share of buildings predicted correctly (``unknown`` counts as wrong).
    coverage : float
        Share of buildings given a type other than ``unknown``.
    covered_accuracy : float
        Accuracy among the buildings given a type.
    """

    title: str
    labels: list[str]
    per_class: pd.DataFrame
    confusion: pd.DataFrame
    n: int
    accuracy: float
    coverage: float
    covered_accuracy: float


def evaluate(
    truth: pd.Series,
    predicted: pd.Series,
    labels: Sequence[str] | None = None,
    title: str = "",
) -> EvalResult:
    """Compare predicted with true types.

    Parameters
    ----------
    truth : Series
        True type per building.
    predicted : Series
        Predicted type, aligned on the same index (missing = ``unknown``).
    labels : sequence of str, optional
        Classes to report (default: the building types that occur).
    title : str
        Name of the set.

    Returns
    -------
    EvalResult
        Per-class precision, recall and support, and the confusion matrix.
    """
    truth = truth.astype(object)
    predicted = predicted.reindex(truth.index).astype(object).where(
        predicted.reindex(truth.index).notna(), "unknown"
    )
    if labels is None:
        present = set(truth) | set(predicted)
        labels = [t for t in BUILDING_TYPES if t in present]
        labels += sorted(str(t) for t in present - set(labels))
    labels = list(labels)
    confusion = pd.crosstab(
        pd.Categorical(truth, categories=labels),
        pd.Categorical(predicted, categories=labels),
        dropna=False,
    )
    confusion.index = pd.Index(labels, name="truth")
    confusion.columns = pd.Index(labels, name="predicted")
    confusion = confusion.astype(int)
    correct = pd.Series(np.diag(confusion.to_numpy()), index=labels)
    support = confusion.sum(axis=1)
    predicted_n = confusion.sum(axis=0)
    per_class = pd.DataFrame(
        {
            "support": support,
            "predicted": predicted_n,
            "correct": correct,
            "precision": correct / predicted_n.replace(0, np.nan),
            "recall": correct / support.replace(0, np.nan),
        }
    )
    per_class.index.name = "type"
    n = int(len(truth))
    hit = (truth == predicted).to_numpy()
    typed = (predicted != "unknown").to_numpy()
    accuracy = float(hit.mean()) if n else float("nan")
    coverage = float(typed.mean()) if n else float("nan")
    covered = float(hit[typed].mean()) if typed.any() else float("nan")
    return EvalResult(title, labels, per_class, confusion, n, accuracy, coverage, covered)


def _fmt(value: object) -> str:
    if isinstance(value, float):
        return "-" if np.isnan(value) else f"{value:.2f}"
    return str(value)


def _table(frame: pd.DataFrame, index_name: str) -> str:
    head = [index_name, *map(str, frame.columns)]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for idx, row in zip(frame.index, frame.itertuples(index=False), strict=True):
        lines.append("| " + " | ".join([str(idx), *(_fmt(v) for v in row)]) + " |")
    return "\n".join(lines)


def to_markdown(result: EvalResult) -> str:
    """Render an evaluation as Markdown tables (no extra dependency).

    Parameters
    ----------
    result : EvalResult
        The evaluation.

    Returns
    -------
    str
        A heading, the per-class table and the confusion matrix.
    """
    per_class = result.per_class[result.per_class[["support", "predicted"]].sum(axis=1) > 0]
    parts = [
        f"### {result.title or 'evaluation'}",
        "",
        f"{result.n} labelled buildings; accuracy {_fmt(result.accuracy)} "
        f"(unknown counts as wrong); coverage {_fmt(result.coverage)}; "
        f"accuracy where a type was given {_fmt(result.covered_accuracy)}",
        "",
        _table(per_class, "type"),
        "",
        "Confusion matrix (rows: truth, columns: predicted)",
        "",
        _table(result.confusion, "truth \\ predicted"),
        "",
    ]
    return "\n".join(parts)


# ---------------------------------------------------------------------------------------------
# labelled sets
# ---------------------------------------------------------------------------------------------


def read_cbdc_labels(path: str | Path = DEFAULT_CBDC_LABELS) -> pd.DataFrame:
    """Read the CBDC hand labels.

    Parameters
    ----------
    path : str or Path
        CSV with ``source_id,name,true_type,certain,note``.

    Returns
    -------
    DataFrame
        The labels as strings.

    Raises
    ------
    ClassificationError
        For a missing column or an unknown type.
    """
    labels = pd.read_csv(path, dtype=str, keep_default_na=False)
    missing = {"source_id", "true_type"} - set(labels.columns)
    if missing:
        raise ClassificationError(f"{path}: missing column(s) {sorted(missing)}")
    bad = labels.loc[~labels["true_type"].isin(BUILDING_TYPES), "true_type"]
    if len(bad):
        raise ClassificationError(
            f"{path}: unknown true_type {sorted(set(bad))}; use one of {list(BUILDING_TYPES)}"
        )
    if "certain" not in labels.columns:
        labels["certain"] = "yes"
    return labels


def cbdc_labelled_set(
    buildings: gpd.GeoDataFrame,
    labels: pd.DataFrame,
    hide_codes: bool = False,
) -> tuple[gpd.GeoDataFrame, pd.Series]:
    """CBDC prototypes with their true types.

    Parameters
    ----------
    buildings : GeoDataFrame
        Canonical buildings; the rows whose ``land_use_code`` is a CBDC
        ``landUseTyp`` value are used.
    labels : DataFrame
        Hand labels (:func:`read_cbdc_labels`), keyed by ``source_id``; rows
        with ``certain`` = ``no`` drop the building from the set.
    hide_codes : bool
        Set ``land_use_code`` to null so the name rules alone are measured.

    Returns
    -------
    tuple of (GeoDataFrame, Series)
        The buildings to classify and their true types (same index).
    """
    codes = buildings["land_use_code"].astype(object).where(buildings["land_use_code"].notna())
    key = codes.map(lambda v: str(v).strip().lower() if isinstance(v, str) else None)
    selected = buildings[key.isin(CBDC_TRUTH).to_numpy()].copy()
    truth = key[key.isin(CBDC_TRUTH)].map(CBDC_TRUTH).astype(object)
    by_id = labels.set_index(labels["source_id"].astype(str).str.strip())
    ids = selected["source_id"].astype(str).str.strip()
    keep = np.ones(len(selected), dtype=bool)
    for pos, sid in enumerate(ids):
        if sid in by_id.index:
            row = by_id.loc[sid]
            if str(row.get("certain", "yes")).strip().lower() == "no":
                keep[pos] = False
            else:
                truth.iloc[pos] = row["true_type"]
    selected, truth = selected[keep], truth[keep]
    if hide_codes:
        selected["land_use_code"] = pd.Series([None] * len(selected), index=selected.index,
                                              dtype="str")
    return selected, truth.astype("str")


def osm_labelled_set(
    buildings: gpd.GeoDataFrame, rules: ClassificationRules
) -> tuple[gpd.GeoDataFrame, pd.Series]:
    """Select buildings whose explicit use tags give the truth, then hide the tags.

    Parameters
    ----------
    buildings : GeoDataFrame
        Canonical buildings (OSM or Overture).
    rules : ClassificationRules
        The rules; their tag tables define the truth.

    Returns
    -------
    tuple of (GeoDataFrame, Series)
        The buildings with every explicit tag column set to null, and their
        true types (same index).
    """
    tagged = explicit_tag_types(buildings, rules)
    has = tagged["type"].notna().to_numpy()
    selected = buildings[has].copy()
    for column in EXPLICIT_TAG_COLUMNS:
        if column in selected.columns:
            selected[column] = pd.Series([None] * len(selected), index=selected.index,
                                         dtype="str")
    return selected, tagged.loc[has, "type"]


def measure(
    frame: gpd.GeoDataFrame,
    truth: pd.Series,
    areas: gpd.GeoDataFrame,
    pois: gpd.GeoDataFrame,
    rules: ClassificationRules,
    title: str,
) -> tuple[EvalResult, gpd.GeoDataFrame]:
    """Classify a labelled set and evaluate it.

    Parameters
    ----------
    frame : GeoDataFrame
        Buildings of the set.
    truth : Series
        True types (same index).
    areas, pois : GeoDataFrame
        Context layers, same CRS.
    rules : ClassificationRules
        The rules.
    title : str
        Name of the set.

    Returns
    -------
    tuple of (EvalResult, GeoDataFrame)
        The evaluation and the classified buildings.
    """
    classified = classify_buildings(frame, areas, pois, rules)
    return evaluate(truth, classified["building_type"], title=title), classified


def _read_optional(path: str | None, crs) -> gpd.GeoDataFrame:
    if path and Path(path).exists():
        return gpd.read_parquet(path).to_crs(crs)
    data = {c: pd.Series([], dtype="str") for c in ATTRIBUTE_COLUMNS}
    return gpd.GeoDataFrame(data, geometry=gpd.GeoSeries([], crs=crs), crs=crs)


def evaluate_sets(
    buildings: gpd.GeoDataFrame,
    areas: gpd.GeoDataFrame,
    pois: gpd.GeoDataFrame,
    rules: ClassificationRules,
    cbdc_labels: str | Path = DEFAULT_CBDC_LABELS,
    which: str = "all",
) -> list[EvalResult]:
    """Evaluate the classifier on every labelled set found in the ingest output.

    Parameters
    ----------
    buildings : GeoDataFrame
        Ingest-stage buildings (canonical columns).
    areas, pois : GeoDataFrame
        Ingest-stage areas and POIs, same CRS.
    rules : ClassificationRules
        The rules.
    cbdc_labels : str or Path
        Hand labels of the CBDC prototypes.
    which : str
        ``all``, ``cbdc`` or ``osm``.

    Returns
    -------
    list of EvalResult
        One result per labelled set with at least one building.
    """
    labels = read_cbdc_labels(cbdc_labels) if which in ("all", "cbdc") else None
    pairs = labelled_predictions(buildings, areas, pois, rules, labels, which)
    return [evaluate(truth, predicted, title=title) for title, truth, predicted in pairs]


def labelled_predictions(
    buildings: gpd.GeoDataFrame,
    areas: gpd.GeoDataFrame,
    pois: gpd.GeoDataFrame,
    rules: ClassificationRules,
    cbdc_labels: pd.DataFrame | None,
    which: str = "all",
) -> list[tuple[str, pd.Series, pd.Series]]:
    """True and predicted types of each labelled set (a per-partition kernel).

    Parameters
    ----------
    buildings : GeoDataFrame
        Ingest-stage buildings, or one partition of them.
    areas, pois : GeoDataFrame
        Context layers, same CRS.
    rules : ClassificationRules
        The rules.
    cbdc_labels : DataFrame or None
        From :func:`read_cbdc_labels` (None skips the CBDC sets).
    which : str
        ``all``, ``cbdc`` or ``osm``.

    Returns
    -------
    list of (title, truth, predicted)
        For each labelled set with at least one building.
    """
    out = []
    if which in ("all", "cbdc") and cbdc_labels is not None:
        for hide, title in ((False, "CBDC prototypes, survey codes visible"),
                            (True, "CBDC prototypes, survey codes hidden (names only)")):
            frame, truth = cbdc_labelled_set(buildings, cbdc_labels, hide_codes=hide)
            if len(frame):
                classified = classify_buildings(frame, areas, pois, rules)
                out.append((title, truth, classified["building_type"]))
    if which in ("all", "osm"):
        frame, truth = osm_labelled_set(buildings, rules)
        if len(frame):
            classified = classify_buildings(frame, areas, pois, rules)
            out.append(("OSM buildings, explicit use tags hidden", truth,
                        classified["building_type"]))
    return out


def sample_mask(building_id: pd.Series, share: float) -> np.ndarray:
    """Deterministic sample of buildings by a hash of their id.

    Parameters
    ----------
    building_id : Series
        Building ids (compared as text).
    share : float
        Share of buildings to keep [-]; 1 keeps all.

    Returns
    -------
    ndarray of bool
        True for the sampled rows; the same id is always in or out,
        whichever partition it is in.
    """
    if share >= 1.0:
        return np.ones(len(building_id), dtype=bool)
    digest = pd.util.hash_array(building_id.astype(str).to_numpy(dtype=object))
    return (digest % np.uint64(1_000_000)) < np.uint64(round(share * 1_000_000))


def _sampled_rows(table: pa.Table, share: float) -> np.ndarray:
    return sample_mask(table.column("building_id").to_pandas(), share)


def _partition_predictions(path: str, row_groups: list[int], areas: gpd.GeoDataFrame,
                           pois: gpd.GeoDataFrame, rules: ClassificationRules,
                           cbdc_labels: pd.DataFrame, share: float = 1.0,
                           ) -> list[tuple[str, pd.Series, pd.Series]]:
    from pipeline.stream import read_partition

    keep = None if share >= 1.0 else partial(_sampled_rows, share=share)
    part = read_partition(Path(path), row_groups, keep=keep)
    pairs = labelled_predictions(part, areas, pois, rules, cbdc_labels)
    # plain object series: small to send back, and equal whatever the partition
    return [(t, y.astype(object).reset_index(drop=True),
             p.reindex(y.index).astype(object).reset_index(drop=True))
            for t, y, p in pairs]


def write_evaluation(buildings_in: Path, areas_in: Path, pois_in: Path, rules_file: Path,
                     out: Path, max_buildings: int | None = None) -> list[EvalResult]:
    """Evaluate on the ingest outputs and write the tables as Markdown.

    The buildings are streamed partition by partition (each classified by a
    worker); only the true and predicted types are gathered.

    Parameters
    ----------
    buildings_in, areas_in, pois_in : Path
        Ingest-stage GeoParquet files (areas and POIs may be absent).
    rules_file : Path
        The rule tables.
    out : Path
        Markdown file to write (atomically).
    max_buildings : int, optional
        Above this many input buildings, evaluate a deterministic sample of
        about this size (:func:`sample_mask`) [buildings]; None: all.

    Returns
    -------
    list of EvalResult
        The evaluations written.
    """
    from pipeline.io import atomic_path
    from pipeline.parallel import map_tasks
    from pipeline.stream import partitions, read_partition

    crs = read_partition(Path(buildings_in), []).crs
    areas = _read_optional(str(areas_in), crs)
    pois = _read_optional(str(pois_in), crs)
    rules, labels = load_rules(rules_file), read_cbdc_labels(DEFAULT_CBDC_LABELS)
    parts = partitions(Path(buildings_in))
    n_rows = pq.ParquetFile(buildings_in).metadata.num_rows
    share = 1.0 if max_buildings is None or n_rows <= max_buildings else max_buildings / n_rows
    tasks = [(str(buildings_in), p, areas, pois, rules, labels, share) for p in parts]
    sets: dict[str, tuple[list, list]] = {}
    for pairs in map_tasks(_partition_predictions, tasks, label="classify evaluation"):
        for title, truth, predicted in pairs:
            sets.setdefault(title, ([], []))
            sets[title][0].append(truth)
            sets[title][1].append(predicted)
    order = ["CBDC prototypes, survey codes visible",
             "CBDC prototypes, survey codes hidden (names only)",
             "OSM buildings, explicit use tags hidden"]
    results = [evaluate(pd.concat(sets[t][0], ignore_index=True),
                        pd.concat(sets[t][1], ignore_index=True), title=t)
               for t in sorted(sets, key=lambda t: order.index(t) if t in order else 99)]
    text = "\n\n".join(to_markdown(r) for r in results) or "No labelled buildings in the input."
    if share < 1.0:
        text = (f"Evaluated on a deterministic sample of {share:.2%} of the {n_rows:,} input "
                f"buildings (by a hash of building_id; config key "
                f"classify.evaluation_max_buildings = {max_buildings:,}).\n\n" + text)
    with atomic_path(out) as tmp:
        tmp.write_text(text + "\n", encoding="utf-8")
    return results


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: print the evaluation tables of both labelled sets.

    Parameters
    ----------
    argv : sequence of str, optional
        Arguments (default: ``sys.argv[1:]``).

    Returns
    -------
    int
        Exit status (0, or 1 when no labelled building was found).
    """
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.classify_eval", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--buildings", required=True, help="GeoParquet from ingest")
    parser.add_argument("--areas", help="GeoParquet of areas (optional)")
    parser.add_argument("--pois", help="GeoParquet of POIs (optional)")
    parser.add_argument("--rules", default="configs/classification.yaml")
    parser.add_argument("--cbdc-labels", default=str(DEFAULT_CBDC_LABELS))
    parser.add_argument("--set", choices=("all", "cbdc", "osm"), default="all")
    args = parser.parse_args(argv)

    rules = load_rules(args.rules)
    buildings = gpd.read_parquet(args.buildings)
    areas = _read_optional(args.areas, buildings.crs)
    pois = _read_optional(args.pois, buildings.crs)
    results = evaluate_sets(buildings, areas, pois, rules, args.cbdc_labels, args.set)
    for result in results:
        print(to_markdown(result))
    if not results:
        print("no labelled buildings found (no CBDC landUseTyp codes, no explicit use tags)",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
