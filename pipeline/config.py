"""Pipeline configuration: pydantic models of ``configs/*.yaml``.

The YAML is validated in full before any stage runs: unknown keys are
rejected (``extra="forbid"``), every assumption carries its unit in its key
name, and ranges are checked (a share lies in [0, 1], a density is positive).
``configs/shanghai.yaml`` is the default; ``tests/test_config.py`` keeps it in
sync with these models. Stage-specific sections (``classify``, ``weather``,
``yield``) are defined next to their kernels and composed here.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from pipeline.classify import BUILDING_TYPES, BuildingType, ClassifyConfig
from pipeline.errors import ConfigError
from pipeline.glossary import ATTRIBUTE_COLUMNS
from pipeline.heights import HeightsConfig
from pipeline.pvyield import YieldConfig
from pipeline.runs import RunsConfig
from pipeline.shading import ShadingConfig
from pipeline.targets import PlanConfig
from pipeline.weather import WeatherConfig


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class PathsConfig(_Model):
    """Where stages read and write (relative to the project root)."""

    processed_dir: Path = Path("data/processed")
    outputs_dir: Path = Path("outputs")


class DaskConfig(_Model):
    """How stages run in parallel."""

    scheduler: str = "threads"
    n_workers: int | None = Field(default=None, ge=1)
    npartitions: int | None = Field(default=None, ge=1)
    rows_per_partition: int = Field(default=50_000, ge=1)


class DistrictsConfig(_Model):
    """District boundaries used to assign buildings and report verdicts."""

    path: Path
    layer: str | None = None
    name_field: str = "district_name"
    code_field: str = "district_adcode"
    crs_if_missing: str | None = None


class SourceConfig(_Model):
    """One building-footprint source.

    ``kind`` is ``vector`` for any GDAL vector format or GeoParquet, ``osm``
    for an OpenStreetMap ``.osm.pbf``/``.osm`` read with GDAL's OSM driver, and
    ``raster_footprints`` for footprints traced from building-height rasters.
    """

    name: str = Field(pattern=r"^[a-z0-9_]+$")
    kind: Literal["vector", "osm", "raster_footprints"] = "vector"
    path: Path
    layer: str | None = None
    encoding: str | None = None
    text_repair: Literal["none", "gbk_read_as_latin1", "utf8_or_gbk_read_as_latin1"] = "none"
    crs_if_missing: str | None = None
    gcj02_to_wgs84: bool = False
    id_field: str | None = None
    columns: dict[str, str] = Field(default_factory=dict)
    building_filter: Literal["all", "tag_building_not_null"] = "all"
    # raster_footprints only
    raster_glob: str = "*.tif"
    raster_height_scale_m_per_unit: float = Field(default=1.0, gt=0)
    raster_min_height_m: float = Field(default=1.0, ge=0)

    @model_validator(mode="after")
    def _check_columns(self) -> SourceConfig:
        unknown = sorted(set(self.columns) - set(ATTRIBUTE_COLUMNS))
        if unknown:
            raise ValueError(
                f"source {self.name!r}: unknown canonical column(s) {unknown} in 'columns'; "
                f"allowed: {list(ATTRIBUTE_COLUMNS)}"
            )
        return self


class IngestConfig(_Model):
    """Checks applied to every footprint at ingest."""

    min_footprint_area_m2: float = Field(ge=0)
    max_footprint_area_m2: float = Field(gt=0)
    max_height_attr_m: float = Field(gt=0)
    max_levels_attr: float = Field(gt=0)
    dedup_min_overlap_share: float = Field(gt=0, le=1)
    dedup_min_area_ratio: float = Field(ge=0, le=1)
    crs_check_margin_m: float = Field(ge=0)
    gcj02_detect_min_matches: int = Field(ge=1)
    gcj02_detect_gain: float = Field(gt=1)


class RoofKindRule(_Model):
    """A rule that sets the roof kind where no tag says it (first match wins).

    ``None`` bounds and ``building_types`` match everything.
    """

    name: str = Field(pattern=r"^[a-z0-9_]+$")
    roof_kind: Literal["flat", "pitched"]
    building_types: list[BuildingType] | None = None
    min_footprint_area_m2: float | None = Field(default=None, ge=0)
    max_footprint_area_m2: float | None = Field(default=None, gt=0)
    min_height_m: float | None = Field(default=None, ge=0)
    max_height_m: float | None = Field(default=None, gt=0)


class RoofConfig(_Model):
    """Roof kind, usable roof area, layout and installable capacity assumptions."""

    module_power_density_w_per_m2: float = Field(gt=0, le=400)
    setback_flat_m_by_min_height_m: dict[float, float]
    setback_pitched_m_by_min_height_m: dict[float, float]
    utilisation_flat_by_type: dict[str, float]
    utilisation_pitched_by_type: dict[str, float]
    min_array_area_m2: float = Field(ge=0)
    min_array_width_m: float = Field(ge=0)
    flat_tilt_deg: float = Field(ge=0, le=60)
    flat_azimuth_deg: float = Field(ge=0, lt=360)
    flat_row_rule_declination_deg: float = Field(ge=-23.5, le=23.5)
    flat_row_rule_start_solar_h: float = Field(ge=6, lt=12)
    flat_row_rule_end_solar_h: float = Field(gt=12, le=18)
    pitched_tilt_deg: float = Field(gt=0, le=70)
    pitched_gcr: float = Field(gt=0, le=1)
    pitched_min_azimuth_from_north_deg: float = Field(ge=0, le=90)
    roof_kind_default: Literal["flat", "pitched"] = "flat"
    roof_kind_by_roof_shape: dict[str, Literal["flat", "pitched"]] = Field(default_factory=dict)
    roof_kind_by_tag_building: dict[str, Literal["flat", "pitched"]] = Field(
        default_factory=dict
    )
    roof_kind_rules: list[RoofKindRule] = Field(default_factory=list)

    @model_validator(mode="after")
    def _check_shares(self) -> RoofConfig:
        for key in ("utilisation_flat_by_type", "utilisation_pitched_by_type"):
            table = getattr(self, key)
            if "default" not in table:
                raise ValueError(f"roof.{key} needs a 'default' entry")
            for btype, share in table.items():
                if btype != "default" and btype not in BUILDING_TYPES:
                    raise ValueError(f"roof.{key}: unknown building type {btype!r}")
                if not 0 <= share <= 1:
                    raise ValueError(f"roof.{key}.{btype} = {share} is not a share in [0, 1]")
        for key in ("setback_flat_m_by_min_height_m", "setback_pitched_m_by_min_height_m"):
            table = getattr(self, key)
            if 0.0 not in table:
                raise ValueError(f"roof.{key} needs an entry for height 0 (all buildings)")
            if any(v < 0 for v in table.values()) or any(k < 0 for k in table):
                raise ValueError(f"roof.{key}: heights and setbacks must be >= 0")
        return self


class PolicyConfig(_Model):
    """The roof-coverage rule: share of roof area to carry PV, by building type."""

    coverage_share_by_type: dict[str, float]
    coverage_rule_types: list[BuildingType]
    coverage_rule_share: float = Field(ge=0, le=1)
    coverage_rule_name: str

    @model_validator(mode="after")
    def _check(self) -> PolicyConfig:
        for btype, share in self.coverage_share_by_type.items():
            if btype not in BUILDING_TYPES:
                raise ValueError(f"policy.coverage_share_by_type: unknown type {btype!r}")
            if not 0 <= share <= 1:
                raise ValueError(
                    f"policy.coverage_share_by_type.{btype} = {share} is not a share in [0, 1]"
                )
        return self


class TargetConfig(_Model):
    """One district MW target."""

    id: str = Field(pattern=r"^[a-z0-9_]+$")
    district_name: str
    required_mw: float = Field(gt=0)
    period: str
    eligible_types: list[BuildingType] = Field(default_factory=lambda: list(BUILDING_TYPES))
    source: str


class ReportConfig(_Model):
    """What the report says about the input's coverage, and its CJK font."""

    coverage_caveat: str
    cjk_font_files: list[Path] = Field(min_length=1)
    geopackage_process_min_buildings: int = Field(default=100_000, ge=0)
    changes_process_min_cores: int = Field(default=3, ge=1)


class PipelineConfig(_Model):
    """The whole configuration of one run."""

    name: str
    working_crs: str
    paths: PathsConfig = PathsConfig()
    dask: DaskConfig = DaskConfig()
    districts: DistrictsConfig
    sources: list[SourceConfig] = Field(min_length=1)
    ingest: IngestConfig
    classify: ClassifyConfig
    heights: HeightsConfig
    roof: RoofConfig
    shading: ShadingConfig
    weather: WeatherConfig
    yield_: YieldConfig = Field(alias="yield")
    policy: PolicyConfig
    targets: list[TargetConfig]
    plan: PlanConfig
    report: ReportConfig
    runs: RunsConfig = RunsConfig()

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    @model_validator(mode="after")
    def _check(self) -> PipelineConfig:
        names = [s.name for s in self.sources]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"sources: duplicate source name(s) {dup}")
        ids = [t.id for t in self.targets]
        if len(set(ids)) != len(ids):
            raise ValueError("targets: target ids must be unique")
        from pyproj import CRS

        crs = CRS.from_user_input(self.working_crs)
        if not crs.is_projected:
            raise ValueError(
                f"working_crs {self.working_crs!r} is geographic; areas need a projected "
                "metric CRS (e.g. EPSG:32651 for Shanghai)"
            )
        return self

    def section_hash(self, *sections: str) -> str:
        """Hash of the named config sections, for provenance records.

        Parameters
        ----------
        *sections : str
            Top-level keys (e.g. ``"roof"``, ``"yield"``); none means all.

        Returns
        -------
        str
            First 16 hex digits of the sha256 of their JSON dump.
        """
        dump = self.model_dump(mode="json", by_alias=True)
        if sections:
            dump = {k: dump[k] for k in sections}
        text = json.dumps(dump, sort_keys=True, ensure_ascii=False)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def load_config(path: str | Path) -> PipelineConfig:
    """Read and validate a pipeline config YAML.

    Parameters
    ----------
    path : str or Path
        The YAML file.

    Returns
    -------
    PipelineConfig
        The validated configuration.

    Raises
    ------
    ConfigError
        If the file is missing, not YAML, or does not validate; the message
        names the file, each failing key and what is wrong.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found. Fix: pass --config with an existing "
                          "YAML file (default configs/shanghai.yaml)")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the config must be a mapping of sections")
    try:
        return PipelineConfig.model_validate(raw)
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            loc = ".".join(str(p) for p in err["loc"]) or "(top level)"
            msg = err["msg"]
            if err["type"] == "extra_forbidden":
                msg = "unknown key (typo?); remove it or check the spelling"
            lines.append(f"  {loc}: {msg}")
        raise ConfigError(f"{path}: invalid config:\n" + "\n".join(lines)) from exc
