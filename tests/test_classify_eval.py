"""Evaluation: metrics on hand-made series and the two labelled sets of the real sample."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pipeline.classify import EXPLICIT_TAG_COLUMNS, ClassificationError, load_rules
from pipeline.classify_eval import (
    DEFAULT_CBDC_LABELS,
    cbdc_labelled_set,
    evaluate,
    main,
    measure,
    osm_labelled_set,
    read_cbdc_labels,
    sample_mask,
    to_markdown,
    write_evaluation,
)
from tests.test_classify_samples import load_cbdc, load_osm, needs_sample

RULES_PATH = Path(__file__).resolve().parents[1] / "configs" / "classification.yaml"


@pytest.fixture(scope="module")
def rules():
    return load_rules(RULES_PATH)


def test_evaluate_counts_precision_recall():
    truth = pd.Series(["school", "school", "factory", "government", "factory"])
    pred = pd.Series(["school", "factory", "factory", "unknown", None])
    res = evaluate(truth, pred)
    pc = res.per_class
    assert res.labels == ["government", "school", "factory", "unknown"]
    assert pc.loc["school", "support"] == 2 and pc.loc["school", "predicted"] == 1
    assert pc.loc["school", "precision"] == 1.0 and pc.loc["school", "recall"] == 0.5
    assert pc.loc["factory", "precision"] == 0.5 and pc.loc["factory", "recall"] == 0.5
    assert np.isnan(pc.loc["government", "precision"])
    assert pc.loc["government", "recall"] == 0.0
    assert res.confusion.loc["factory", "unknown"] == 1  # a missing prediction is unknown
    assert int(res.confusion.to_numpy().sum()) == 5
    assert res.accuracy == pytest.approx(0.4)
    assert res.coverage == pytest.approx(0.6)
    assert res.covered_accuracy == pytest.approx(2 / 3)


def test_evaluate_fixed_labels_and_markdown():
    truth = pd.Series(["school"], index=[7])
    res = evaluate(truth, pd.Series(["school"], index=[7]), labels=["school", "hospital"],
                   title="tiny")
    assert list(res.confusion.columns) == ["school", "hospital"]
    text = to_markdown(res)
    assert text.startswith("### tiny")
    assert "| school | 1 | 1 | 1 | 1.00 | 1.00 |" in text
    assert "| truth \\ predicted | school | hospital |" in text


def test_cbdc_labels_fixture_is_valid():
    labels = read_cbdc_labels(DEFAULT_CBDC_LABELS)
    assert labels["source_id"].is_unique
    assert set(labels["certain"]) <= {"yes", "no"}


def test_bad_labels_file(tmp_path):
    path = tmp_path / "l.csv"
    path.write_text("source_id,true_type\n1,skool\n")
    with pytest.raises(ClassificationError, match="skool"):
        read_cbdc_labels(path)


@needs_sample
def test_cbdc_labelled_set(rules):
    buildings = load_cbdc()
    labels = read_cbdc_labels()
    frame, truth = cbdc_labelled_set(buildings, labels)
    assert len(frame) == len(truth) == 113 - (labels["certain"] == "no").sum()
    by_name = dict(zip(frame["name"], truth, strict=True))
    assert by_name["上海市应急管理局"] == "government"
    assert by_name["武宁中学"] == "school"
    assert by_name["上海少年宫"] == "other_public"
    full, _ = measure(frame, truth, frame.iloc[:0][["geometry"]],
                      frame.iloc[:0][["geometry"]], rules, "codes visible")
    assert full.per_class.loc["school", "recall"] == 1.0
    assert full.per_class.loc["government", "precision"] == 1.0
    assert full.accuracy >= 0.95
    hidden, truth_h = cbdc_labelled_set(buildings, labels, hide_codes=True)
    assert hidden["land_use_code"].isna().all()
    names_only, _ = measure(hidden, truth_h, hidden.iloc[:0][["geometry"]],
                            hidden.iloc[:0][["geometry"]], rules, "names only")
    assert names_only.covered_accuracy >= 0.9  # names are precise ...
    assert names_only.coverage < 1.0  # ... but unnamed buildings stay unknown


@needs_sample
def test_osm_labelled_set_hides_the_tags(rules):
    buildings, areas, pois = load_osm()
    frame, truth = osm_labelled_set(buildings, rules)
    assert len(frame) >= 50 and truth.notna().all()
    for column in EXPLICIT_TAG_COLUMNS:
        assert frame[column].isna().all(), column
    assert (truth == "factory").sum() >= 5
    res, classified = measure(frame, truth, areas, pois, rules, "osm")
    assert set(classified["type_source"]) <= {"containing_area", "poi", "name", "default"}
    assert res.covered_accuracy >= 0.7


@needs_sample
def test_main_prints_tables(tmp_path, capsys):
    buildings, areas, pois = load_osm()
    cbdc = load_cbdc()
    both = pd.concat([buildings, cbdc], ignore_index=True)
    b_path, a_path, p_path = (tmp_path / f"{n}.parquet" for n in ("b", "a", "p"))
    both.to_parquet(b_path)
    areas.to_parquet(a_path)
    pois.to_parquet(p_path)
    code = main(["--buildings", str(b_path), "--areas", str(a_path), "--pois", str(p_path),
                 "--rules", str(RULES_PATH)])
    out = capsys.readouterr().out
    assert code == 0
    assert out.count("### ") == 3
    assert "CBDC prototypes, survey codes hidden" in out and "OSM buildings" in out


def test_sample_mask_is_deterministic_and_sized():
    ids = pd.Series([f"b{i}" for i in range(40_000)])
    mask = sample_mask(ids, 0.25)
    assert mask.dtype == bool and 0.24 < mask.mean() < 0.26
    # the same id is in or out wherever it is: reversed order, split in two partitions
    rev = sample_mask(ids[::-1].reset_index(drop=True), 0.25)
    assert (rev[::-1] == mask).all()
    halves = np.concatenate([sample_mask(ids[:15_000], 0.25), sample_mask(ids[15_000:], 0.25)])
    assert (halves == mask).all()
    assert sample_mask(ids, 1.0).all()


@needs_sample
def test_write_evaluation_samples_large_inputs(tmp_path):
    buildings, areas, pois = load_osm()
    b_path, a_path, p_path = (tmp_path / f"{n}.parquet" for n in ("b", "a", "p"))
    buildings.to_parquet(b_path)
    areas.to_parquet(a_path)
    pois.to_parquet(p_path)
    rules = load_rules(RULES_PATH)
    full = write_evaluation(b_path, a_path, p_path, RULES_PATH, tmp_path / "all.md")
    assert not (tmp_path / "all.md").read_text(encoding="utf-8").startswith("Evaluated on")
    n_max = len(buildings) // 2
    sampled = write_evaluation(b_path, a_path, p_path, RULES_PATH, tmp_path / "s.md",
                               max_buildings=n_max)
    text = (tmp_path / "s.md").read_text(encoding="utf-8")
    share = n_max / len(buildings)
    assert text.startswith(f"Evaluated on a deterministic sample of {share:.2%} of the "
                           f"{len(buildings):,} input buildings")
    # the sampled OSM set is exactly the labelled buildings whose id hash is sampled
    keep = sample_mask(buildings["building_id"], share)
    frame, _ = osm_labelled_set(buildings[keep], rules)
    osm_full = next(r for r in full if r.title.startswith("OSM"))
    osm_sampled = next(r for r in sampled if r.title.startswith("OSM"))
    assert int(osm_sampled.confusion.to_numpy().sum()) == len(frame)
    assert 0 < len(frame) < int(osm_full.confusion.to_numpy().sum())
