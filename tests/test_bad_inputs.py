"""The corpus of bad inputs (tests/data/bad/manifest.yaml): each gives its documented outcome."""

from __future__ import annotations

import copy
import importlib.util
import json
import math
from pathlib import Path

import geopandas as gpd
import pandas as pd
import pytest
import yaml

from pipeline import ingest
from pipeline.config import load_config
from pipeline.errors import PipelineError
from pipeline.parallel import scheduler_context
from pipeline.weather import WeatherConfig, read_weather
from tests.conftest import ROOT

BAD = ROOT / "tests/data/bad"
MANIFEST = yaml.safe_load((BAD / "manifest.yaml").read_text(encoding="utf-8"))["entries"]
COLUMNS = {"tag_building": "building", "name": "name", "levels_attr": "levels",
           "height_attr_m": "height"}


def _corpus_module():
    spec = importlib.util.spec_from_file_location("make_corpus", BAD / "make_corpus.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def weather_dir(tmp_path_factory):
    mod = _corpus_module()
    out = tmp_path_factory.mktemp("weather")
    base = mod.clear_sky_year()
    for e in MANIFEST:
        if e["kind"] == "weather":
            mod.write_weather(e["file"], out, base)
    return out


def _merge(a: dict, b: dict) -> dict:
    out = copy.deepcopy(a)
    for k, v in b.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _source(name: str, file: str, extra: dict | None = None) -> dict:
    path = BAD / file
    columns = dict(COLUMNS)
    if file.startswith("missing_mapped_column"):
        columns = {"tag_building": "building"}
    elif path.suffix == ".shp":
        columns = {"tag_building": "building", **({"name": "name"} if "enc" in file or
                                                  "decod" in file else {})}
    return {"name": name, "kind": "vector", "path": str(path), "id_field": "fid",
            "columns": columns, **(extra or {})}


def corpus_config(entry: dict, tmp: Path) -> Path:
    """A config whose sources are the entry's files, over the corpus districts."""
    raw = yaml.safe_load((ROOT / "configs/shanghai.yaml").read_text(encoding="utf-8"))
    raw["paths"] = {"processed_dir": str(tmp / "processed"), "outputs_dir": str(tmp / "out")}
    raw["dask"]["scheduler"] = "synchronous"
    raw["districts"] = {"path": str(BAD / "districts.geojson"), "layer": None,
                        "name_field": "district_name", "code_field": "district_adcode",
                        "crs_if_missing": None}
    raw["sources"] = [_source("t", entry["file"], entry.get("source"))] + [
        _source(f"a{k}", f) for k, f in enumerate(entry.get("also", []))]
    raw["targets"] = [{"id": "jia", "district_name": "甲区", "required_mw": 1.0,
                       "period": "2025", "source": "test"}]
    raw = _merge(raw, entry.get("patch", {}))
    path = tmp / "config.yaml"
    path.write_text(yaml.safe_dump(raw, allow_unicode=True), encoding="utf-8")
    return path


def run_ingest(config: Path) -> tuple[dict, gpd.GeoDataFrame, gpd.GeoDataFrame]:
    cfg = load_config(config)
    with scheduler_context("synchronous", n_workers=1):
        acc = ingest.run(cfg, config.parent)
    proc = Path(cfg.paths.processed_dir)
    return (acc, gpd.read_parquet(proc / "ingest_buildings.parquet"),
            gpd.read_parquet(proc / "ingest_rejected.parquet"))


def _same(a, b) -> bool:
    if b is None:
        return a is None or a is pd.NA or (isinstance(a, float) and math.isnan(a))
    if isinstance(b, int | float):
        return a is not None and math.isclose(float(a), float(b), rel_tol=1e-9, abs_tol=1e-9)
    return a == b


@pytest.mark.slow
@pytest.mark.parametrize("entry", MANIFEST,
                         ids=[f"{e['kind']}:{e['file']}:{e['defect']}" for e in MANIFEST])
def test_bad_input_gives_documented_outcome(entry, tmp_path, weather_dir):
    outcome, _, text = entry["expected"].partition(":")
    if entry["kind"] == "weather":
        path = weather_dir / entry["file"]
        if outcome == "error":
            with pytest.raises(PipelineError) as err:
                read_weather(WeatherConfig(path=path), tmp_path)
            assert text in str(err.value) and str(path) in str(err.value)
            assert "\n" not in str(err.value)
            return
        weather = read_weather(WeatherConfig(path=path), tmp_path)
        assert weather.data.notna().all().all() and len(weather.data) == 8760
        if outcome == "warning":
            assert any(text in w for w in weather.warnings), weather.warnings
        else:
            assert weather.warnings == []
        return

    config = corpus_config(entry, tmp_path)
    if outcome == "error":
        with pytest.raises(PipelineError) as err:
            run_ingest(config)
        msg = str(err.value)
        assert text in msg, msg
        if entry["kind"] == "source":
            assert entry["file"] in msg and "Fix:" in msg, msg
            assert "\n" not in msg
        assert not (tmp_path / "processed/ingest_buildings.parquet").exists()
        return

    acc, kept, rejected = run_ingest(config)
    for src, a in acc.items():
        assert a["read"] == a["kept"] + a["rejected"], (src, a)
        assert a["kept"] == (kept.source == src).sum()
        assert a["rejected"] == (rejected.source == src).sum()
    main = kept[kept.source == "t"].set_index("source_id")
    if (BAD / entry["file"]).stat().st_size > 50 and entry.get("defect_ids") != []:
        assert "0" in main.index, "the control building must be kept"
    ids = [str(i) for i in entry.get("defect_ids", [1])]
    if outcome in ("kept", "repaired"):
        assert set(ids) <= set(main.index), (ids, list(main.index), rejected.reason.tolist())
        for i in ids:
            row = main.loc[i]
            if outcome == "kept":
                assert not row.geometry_repaired and row.attribute_issues is None, row
            elif text == "geometry":
                assert row.geometry_repaired
                assert row.geometry.is_valid and not row.geometry.has_z
            else:
                assert text in (row.attribute_issues or ""), row.attribute_issues
    elif outcome == "rejected":
        rej = rejected[rejected.source == "t"].set_index("source_id")
        for i in ids:
            assert i in rej.index, (i, list(main.index))
            assert text in rej.loc[i, "reason"], rej.loc[i, "reason"]
            assert json.loads(rej.loc[i, "original_attributes"])["fid"] == int(i)
    elif outcome == "warning":
        warnings = [w for a in acc.values() for w in a["warnings"]]
        assert any(text in w for w in warnings), warnings
    else:
        raise AssertionError(f"unknown expected outcome {entry['expected']!r}")
    for column, by_id in entry.get("values", {}).items():
        for i, value in by_id.items():
            assert _same(main.loc[str(i), column], value), (column, i, main.loc[str(i), column])


def test_corpus_is_small_and_every_file_is_documented():
    files = {p.name for p in BAD.iterdir() if p.is_file()}
    documented = {e["file"] for e in MANIFEST} | {f for e in MANIFEST for f in e.get("also", [])}
    stems = {Path(f).stem for f in documented}
    helpers = {"manifest.yaml", "make_corpus.py", "districts.geojson"}
    undocumented = {f for f in files - helpers if Path(f).stem not in stems}
    assert not undocumented
    assert sum((BAD / f).stat().st_size for f in files) < 200_000
