"""Provenance of a run: inputs with their hashes, the config, the version, the time.

Written into the GeoPackage metadata tables (``gpkg_metadata`` and
``gpkg_metadata_reference``, through GDAL's dataset metadata), into the
workbook and the reports, so a planner can tell which data and which
assumptions produced a number.
"""

from __future__ import annotations

import hashlib
import json
from datetime import UTC, datetime
from pathlib import Path

from pipeline import __version__


def file_sha256(path: Path, chunk_bytes: int = 1 << 20) -> str:
    """The sha256 of a file, or of a directory's files (sorted by relative path).

    Parameters
    ----------
    path : Path
        A file or a directory.
    chunk_bytes : int
        Read size [bytes].

    Returns
    -------
    str
        Hex digest.
    """
    h = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for f in files:
        if path.is_dir():
            h.update(f.relative_to(path).as_posix().encode() + b"\0")
        with f.open("rb") as fh:
            while block := fh.read(chunk_bytes):
                h.update(block)
    return h.hexdigest()


def input_paths(cfg: object) -> dict[str, Path]:
    """The input files a config names, by role.

    Parameters
    ----------
    cfg : PipelineConfig
        The run's configuration.

    Returns
    -------
    dict
        Role (``source:osm``, ``districts``, ``weather``, ...) to path.
    """
    paths: dict[str, Path] = {"districts": cfg.districts.path, "weather": cfg.weather.path,
                              "classification_rules": cfg.classify.rules_file}
    for src in cfg.sources:
        paths[f"source:{src.name}"] = src.path
    if cfg.classify.overrides_file:
        paths["classification_overrides"] = cfg.classify.overrides_file
    for i, layer in enumerate([*cfg.classify.poi_layers, *cfg.classify.area_layers]):
        paths[f"classify_layer:{i}"] = layer.path
    if cfg.plan.existing_pv:
        paths["existing_pv"] = cfg.plan.existing_pv.path
    if cfg.plan.towns:
        paths["towns"] = cfg.plan.towns.path
    return paths


def provenance(cfg: object, config_path: Path, base_dir: Path,
               run_time: datetime | None = None) -> dict:
    """Inputs with hashes, the config, the version and the run time.

    Parameters
    ----------
    cfg : PipelineConfig
        The run's configuration.
    config_path : Path
        The config file.
    base_dir : Path
        Directory relative paths resolve against.
    run_time : datetime, optional
        Default: now (UTC).

    Returns
    -------
    dict
        ``pipeline_version``, ``run_time_utc``, ``config_path``,
        ``config_sha256``, ``config_hash`` (of the validated config),
        ``inputs`` (role to path, sha256 and size in bytes).
    """
    run_time = run_time or datetime.now(UTC)
    inputs = {}
    for role, p in input_paths(cfg).items():
        full = p if Path(p).is_absolute() else base_dir / p
        entry: dict = {"path": Path(p).as_posix()}
        if full.exists():
            entry["sha256"] = file_sha256(full)
            entry["bytes"] = (sum(f.stat().st_size for f in full.rglob("*") if f.is_file())
                              if full.is_dir() else full.stat().st_size)
        else:
            entry["sha256"] = None
        inputs[role] = entry
    cpath = config_path if config_path.is_absolute() else base_dir / config_path
    return {
        "pipeline": "rooftop-pv",
        "pipeline_version": __version__,
        "run_time_utc": run_time.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "config_path": config_path.as_posix(),
        "config_sha256": file_sha256(cpath) if cpath.exists() else None,
        "config_hash": cfg.section_hash(),
        "inputs": inputs,
    }


def metadata_items(prov: dict) -> dict[str, str]:
    """Provenance as flat text items for GDAL dataset metadata.

    Parameters
    ----------
    prov : dict
        Output of :func:`provenance`.

    Returns
    -------
    dict
        Key to text; ``inputs`` as JSON.
    """
    out = {f"ROOFTOP_PV_{k.upper()}": str(v) for k, v in prov.items() if k != "inputs"}
    out["ROOFTOP_PV_INPUTS"] = json.dumps(prov["inputs"], ensure_ascii=False, sort_keys=True)
    return out
