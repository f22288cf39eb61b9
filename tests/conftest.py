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
