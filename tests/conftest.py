"""Shared fixtures: the real Shanghai sample and the project root."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def sample_dir() -> Path | None:
    """The real sample: $ROOFTOP_PV_SAMPLE_DIR, data/raw/shanghai, or ../shared/..."""
    for cand in (os.environ.get("ROOFTOP_PV_SAMPLE_DIR"), ROOT / "data/raw/shanghai",
                 ROOT.parent / "shared/data/shanghai"):
        if cand and (Path(cand) / "districts_wgs84.geojson").is_file():
            return Path(cand)
    return None


@pytest.fixture(scope="session")
def sample() -> Path:
    d = sample_dir()
    if d is None:
        pytest.skip("the real Shanghai sample is not available (set ROOFTOP_PV_SAMPLE_DIR or "
                    "run `make data`)")
    return d


@pytest.fixture(scope="session")
def root() -> Path:
    return ROOT


@pytest.fixture(scope="session")
def iwec_epw(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The real IWEC EPW: data/raw copy, else fetched once into the pytest cache."""
    from pipeline.data import DataError, locate_iwec_epw

    cache = getattr(request.config, "cache", None)  # None with -p no:cacheprovider
    cache_dir = cache.mkdir("rooftop-pv-iwec") if cache else tmp_path_factory.mktemp("iwec")
    try:
        return locate_iwec_epw(ROOT, cache_dir)
    except DataError as exc:
        pytest.skip(f"Shanghai IWEC EPW not available (make data, or PyPI access): {exc}")


@pytest.fixture(scope="session")
def iwec(iwec_epw: Path):
    """The IWEC weather, read and checked."""
    from pipeline.weather import WeatherConfig, read_weather

    return read_weather(WeatherConfig(path=iwec_epw), ROOT)


def ingest_config(tmp: Path, sources: list[dict]):
    """A config over the bad-input corpus districts with these sources, outputs under ``tmp``."""
    import geopandas as gpd
    import yaml

    from pipeline.config import load_config

    districts = ROOT / "tests/data/bad/districts.geojson"
    raw = yaml.safe_load((ROOT / "configs/shanghai.yaml").read_text(encoding="utf-8"))
    raw["paths"] = {"processed_dir": str(tmp / "processed"), "outputs_dir": str(tmp / "out")}
    raw["districts"] = {"path": str(districts), "layer": None, "name_field": "district_name",
                        "code_field": "district_adcode", "crs_if_missing": None}
    raw["sources"] = sources
    raw["targets"] = [{"id": "jia", "district_name": gpd.read_file(districts)["district_name"]
                       .iloc[0], "required_mw": 1.0, "period": "2025", "source": "test"}]
    cfg = tmp / "config.yaml"
    cfg.write_text(yaml.safe_dump(raw, allow_unicode=True), encoding="utf-8")
    return load_config(cfg)


def make_base(base: Path, sample: Path, epw: Path) -> Path:
    """A project root in ``base`` with the sample, the EPW and the configs linked in."""
    (base / "data/raw/weather").mkdir(parents=True, exist_ok=True)
    (base / "data/raw/shanghai").symlink_to(sample)
    (base / "data/raw/weather" / epw.name).symlink_to(epw)
    (base / "configs").symlink_to(ROOT / "configs")
    return base
