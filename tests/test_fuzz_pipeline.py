"""Fuzz: random mixes of valid and broken features through every stage; nothing lost or crashing."""

from __future__ import annotations

import importlib.util
import json

import geopandas as gpd
import numpy as np
import pyogrio
import pytest
import yaml

from pipeline.cli import run_stages
from tests.conftest import ROOT

BAD = ROOT / "tests/data/bad"
KINDS = ("ok", "ok", "ok", "bowtie", "null", "empty", "point", "line", "z", "tiny", "huge",
         "outside", "duplicate", "levels_text", "absurd_height", "flat")


def _corpus():
    spec = importlib.util.spec_from_file_location("make_corpus", BAD / "make_corpus.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def corpus():
    return _corpus()


@pytest.fixture(scope="module")
def epw(corpus, tmp_path_factory):
    return corpus.write_weather("weather_ok.epw", tmp_path_factory.mktemp("epw"))


def random_features(mod, rng: np.random.Generator, n: int, start: int) -> list[dict]:
    """n GeoJSON features of random kinds inside (mostly) the corpus districts."""
    feats: list[dict] = []
    for k in range(n):
        fid = start + k
        kind = KINDS[rng.integers(len(KINDS))]
        cx, cy = rng.uniform(121.401, 121.459), rng.uniform(31.201, 31.229)
        w, h = rng.uniform(8, 80), rng.uniform(8, 60)
        ring = mod.rect(cx, cy, w, h)
        geom: dict | None = mod.poly(ring)
        props = {"building": str(rng.choice(["yes", "school", "industrial", "office"])),
                 "name": None, "levels": None, "height": None}
        if kind == "bowtie":
            geom = mod.poly([ring[0], ring[2], ring[1], ring[3], ring[0]])
        elif kind == "null":
            geom = None
        elif kind == "empty":
            geom = {"type": "Polygon", "coordinates": []}
        elif kind == "point":
            geom = {"type": "Point", "coordinates": [cx, cy]}
        elif kind == "line":
            geom = {"type": "LineString", "coordinates": ring[:3]}
        elif kind == "z":
            geom = mod.poly([[x, y, 7.0] for x, y in ring])
        elif kind == "tiny":
            geom = mod.poly(mod.rect(cx, cy, 2, 2))
        elif kind == "huge":
            geom = mod.poly(mod.rect(cx, cy, 1500, 1500))
        elif kind == "outside":
            geom = mod.poly(mod.rect(cx + 0.1, cy, w, h))
        elif kind == "duplicate" and feats and feats[-1]["geometry"] is not None:
            geom = feats[-1]["geometry"]
        elif kind == "levels_text":
            props["levels"] = str(rng.choice(["5;6", "3-4", "五", "12F", "x", "-1"]))
        elif kind == "absurd_height":
            props["height"] = str(rng.choice(["-5", "5000", "30 m", "0"]))
        elif kind == "flat":
            geom = mod.poly([ring[0], ring[1], ring[0]])
        feats.append({"type": "Feature", "properties": {"fid": fid, **props}, "geometry": geom})
    return feats


@pytest.mark.slow
@pytest.mark.parametrize("seed", [1, 2])
def test_random_mix_through_every_stage(seed, corpus, epw, tmp_path):
    rng = np.random.default_rng(seed)
    n_a, n_b = int(rng.integers(15, 40)), int(rng.integers(5, 15))
    feats_a = random_features(corpus, rng, n_a, 0)
    # source b re-maps some of a's footprints (duplicates across sources) plus its own
    feats_b = [{**f, "properties": {**f["properties"], "fid": 1000 + i}}
               for i, f in enumerate(feats_a[: n_b // 2])] + random_features(corpus, rng, n_b,
                                                                             2000)
    for name, feats in (("a.geojson", feats_a), ("b.geojson", feats_b)):
        (tmp_path / name).write_text(json.dumps({"type": "FeatureCollection",
                                                 "features": feats}), encoding="utf-8")
    (tmp_path / "configs").symlink_to(ROOT / "configs")
    raw = yaml.safe_load((ROOT / "configs/shanghai.yaml").read_text(encoding="utf-8"))
    cols = {"tag_building": "building", "name": "name", "levels_attr": "levels",
            "height_attr_m": "height"}
    raw["districts"]["path"] = str(BAD / "districts.geojson")
    raw["sources"] = [{"name": s, "path": f"{s}.geojson", "id_field": "fid", "columns": cols}
                      for s in ("a", "b")]
    raw["targets"] = [{"id": "jia", "district_name": "甲区", "required_mw": 1.0,
                       "period": "2025", "source": "test"}]
    raw["weather"]["path"] = str(epw)
    raw["heights"]["rasters"] = []  # no height rasters cover the hand-made area
    config = tmp_path / "fuzz.yaml"
    config.write_text(yaml.safe_dump(raw, allow_unicode=True), encoding="utf-8")

    results = run_stages(config, scheduler="synchronous", base_dir=tmp_path)

    proc = tmp_path / "data/processed"
    acc = json.loads((proc / "ingest_accounting.json").read_text(encoding="utf-8"))
    assert acc["a"]["read"] == n_a and acc["b"]["read"] == len(feats_b)
    for a in acc.values():
        assert a["read"] == a["kept"] + a["rejected"]
    kept = sum(a["kept"] for a in acc.values())
    for stage in ("classify", "roof", "yield"):
        assert results[stage]["rows_in"] == results[stage]["rows_out"] == kept
    gpkg = tmp_path / "outputs/rooftop_pv.gpkg"
    b = pyogrio.read_dataframe(gpkg, layer="buildings", read_geometry=False)
    r = gpd.read_file(gpkg, layer="rejected")
    assert len(b) == kept and len(r) == sum(a["rejected"] for a in acc.values())
    assert b.building_id.is_unique and r.reason.notna().all()
    # every feature written is in exactly one of the two layers
    ids = {f"a:{f['properties']['fid']}" for f in feats_a} | {
        f"b:{f['properties']['fid']}" for f in feats_b}
    assert set(b.building_id) | set(r.building_id) == ids
    assert not set(b.building_id) & set(r.building_id)
    assert (b.energy_mwh_per_year >= 0).all() and (b.capacity_kwp >= 0).all()
    assert (b.usable_area_m2 <= b.footprint_area_m2 + 1e-6).all()
