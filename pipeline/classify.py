"""Building-type classification: a measured, explainable rule classifier.

Every building gets one of the policy types ``government``, ``school``,
``factory``, ``hospital``, ``other_public``, ``commercial``, ``residential``,
``other`` or ``unknown``, together with the evidence that decided it. The rules
are data (``configs/classification.yaml``, schema :class:`ClassificationRules`);
this module only applies them.

Precedence (strongest first; the first level that yields a type wins and weaker
evidence that disagrees is written to ``type_conflict``, never used):

=====  ===================  ==========  ==========================================
level  type_source          confidence  evidence
=====  ===================  ==========  ==========================================
1      override             high        row of the overrides CSV
2      tag                  high        explicit use tag on the building
                                        (building=school, amenity=..., office=...,
                                        government=*, Overture class/subtype ...);
                                        ``building=yes`` carries no evidence
3      survey_code          high        the building's own land-use / survey code
                                        (CBDC landUseTyp, GB 50137-2011 code)
3'     survey_code+name     high        a broad public code (CBDC ``Administration``)
                                        narrowed by a name keyword to government,
                                        school or hospital - the only case where
                                        weaker evidence refines a stronger one
4      containing_area      medium      smallest typed area polygon (campus,
                                        land-use parcel) containing the centroid
5      poi                  medium      typed POI points inside the footprint
6      name                 low         first matching name keyword rule
7      default              low         nothing known: ``unknown``
=====  ===================  ==========  ==========================================

Inputs (kernel :func:`classify_buildings`)

==================  =====  ===================================================
column              unit   meaning
==================  =====  ===================================================
building_id         -      ``<source>:<source_id>``
geometry            m      footprint polygon in a projected metric CRS
name, name_en       -      names matched by the keyword rules
tag_*               -      OSM tags (building, amenity, office, government,
                           landuse, industrial, building:use, shop)
land_use_code       -      survey land-use code (CBDC landUseTyp, GB code)
class_field         -      dataset class (Overture ``class``)
subtype_field       -      dataset subtype (Overture ``subtype``)
areas (frame)       -      non-building polygons with the same attribute
                           columns (campuses, parcels); may be empty
pois (frame)        -      points with the attribute columns and
                           ``poi_category``; may be empty
==================  =====  ===================================================

Outputs (added columns)

==================  =====  ===================================================
column              unit   meaning
==================  =====  ===================================================
building_type       -      one of the nine types above
type_source         -      override, tag, survey_code, survey_code+name,
                           containing_area, poi, name or default
type_confidence     -      high, medium or low (fixed by type_source)
type_evidence       -      short text, e.g. ``amenity=school area 'X'`` or
                           ``name keyword '中学'``
type_conflict       -      null, or the weaker evidence that disagreed
==================  =====  ===================================================

The stage runner :func:`run` reads the GeoParquet files written by ingest, adds
the configured extra area and POI layers, runs the kernel through
:func:`pipeline.parallel.map_partitions`, applies the overrides CSV and writes
GeoParquet.
"""

from __future__ import annotations

import logging
import os
import re
import time
import unicodedata
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import geopandas as gpd
import numpy as np
import pandas as pd
import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    field_validator,
    model_validator,
)

from pipeline.columns import map_unique
from pipeline.glossary import ATTRIBUTE_COLUMNS

log = logging.getLogger(__name__)

#: The building types, in report order.
BUILDING_TYPES: tuple[str, ...] = (
    "government",
    "school",
    "factory",
    "hospital",
    "other_public",
    "commercial",
    "residential",
    "other",
    "unknown",
)

#: Confidence attached to each ``type_source``.
CONFIDENCE: dict[str, str] = {
    "override": "high",
    "tag": "high",
    "survey_code": "high",
    "survey_code+name": "high",
    "containing_area": "medium",
    "poi": "medium",
    "name": "low",
    "default": "low",
}

#: Columns added by :func:`classify_buildings`.
OUTPUT_COLUMNS: tuple[str, ...] = (
    "building_type",
    "type_source",
    "type_confidence",
    "type_evidence",
    "type_conflict",
)

#: Columns the rule tables may refer to (canonical attributes).
RULE_COLUMNS: tuple[str, ...] = ATTRIBUTE_COLUMNS

#: Human key shown in evidence text for each canonical column.
_KEY_LABEL: dict[str, str] = {
    "tag_building": "building",
    "tag_amenity": "amenity",
    "tag_office": "office",
    "tag_landuse": "landuse",
    "tag_government": "government",
    "tag_industrial": "industrial",
    "tag_building_use": "building:use",
    "tag_shop": "shop",
    "class_field": "class",
    "subtype_field": "subtype",
    "land_use_code": "land_use_code",
}

_GB_CODE = re.compile(r"^[A-Z][0-9]{0,3}$")
_CODE_SPLIT = re.compile(r"[/;,+、，]")
_MASK_CHAR = "\u25a1"  # □, replaces masked text so that neighbours do not join

BuildingType = Literal[
    "government",
    "school",
    "factory",
    "hospital",
    "other_public",
    "commercial",
    "residential",
    "other",
    "unknown",
]


class ClassificationError(ValueError):
    """A rules file, overrides file or input layer is not usable."""


# ---------------------------------------------------------------------------------------------
# configuration models
# ---------------------------------------------------------------------------------------------


class PoiLayerConfig(BaseModel):
    """An extra POI point layer (e.g. a GeoJSON or GeoPackage of Amap POIs).

    Attributes
    ----------
    path : Path
        File path, relative paths are resolved against the config's base_dir.
    layer : str, optional
        Layer name inside a multi-layer file.
    category_field : str
        Field holding the POI category (``学校``, ``科教文化服务;学校;中学``,
        ``amenity=school`` ...), looked up in ``pois.categories`` of the rules.
    name_field : str, optional
        Field holding the POI name (shown in the evidence text).
    crs_if_missing : str, optional
        CRS to assume when the file declares none (otherwise that is an error).
    """

    model_config = ConfigDict(extra="forbid")

    path: Path
    layer: str | None = None
    category_field: str
    name_field: str | None = None
    crs_if_missing: str | None = None


class AreaLayerConfig(BaseModel):
    """An extra area layer: land-use parcels or campus polygons.

    Attributes
    ----------
    path : Path
        File path, relative paths are resolved against the config's base_dir.
    layer : str, optional
        Layer name inside a multi-layer file.
    columns : dict of str to str
        Canonical column name (``land_use_code``, ``tag_amenity``,
        ``tag_landuse``, ``name``, ``source_id`` ...) to the file's field name.
    crs_if_missing : str, optional
        CRS to assume when the file declares none (otherwise that is an error).
    """

    model_config = ConfigDict(extra="forbid")

    path: Path
    layer: str | None = None
    columns: dict[str, str] = Field(default_factory=dict)
    crs_if_missing: str | None = None

    @field_validator("columns")
    @classmethod
    def _canonical_keys(cls, value: dict[str, str]) -> dict[str, str]:
        allowed = set(ATTRIBUTE_COLUMNS) | {"source_id"}
        bad = sorted(set(value) - allowed)
        if bad:
            raise ValueError(
                f"unknown canonical column(s) {bad}; use some of {sorted(allowed)}"
            )
        return value


class ClassifyConfig(BaseModel):
    """The ``classify:`` section of the main config.

    Attributes
    ----------
    rules_file : Path
        The rule tables (schema :class:`ClassificationRules`).
    overrides_file : Path, optional
        CSV with columns ``building_id,building_type,note`` that fixes single
        buildings by hand.
    poi_layers : list of PoiLayerConfig
        Extra POI point layers.
    area_layers : list of AreaLayerConfig
        Extra land-use / campus polygon layers.
    evaluation_max_buildings : int, optional
        Buildings the classifier evaluation runs on at most [buildings]: a
        larger input is evaluated on a deterministic sample of this size
        (by a hash of ``building_id``); None evaluates every building.
    """

    model_config = ConfigDict(extra="forbid")

    rules_file: Path = Path("configs/classification.yaml")
    overrides_file: Path | None = None
    poi_layers: list[PoiLayerConfig] = Field(default_factory=list)
    area_layers: list[AreaLayerConfig] = Field(default_factory=list)
    evaluation_max_buildings: int | None = Field(default=100_000, gt=0)


# ---------------------------------------------------------------------------------------------
# rule models
# ---------------------------------------------------------------------------------------------


class LandUseRule(BaseModel):
    """Type for one land-use code, optionally refinable by a name keyword.

    Attributes
    ----------
    type : str
        Building type the code gives.
    refine_by_name : list of str
        Types a name keyword may narrow this code to (``survey_code+name``).
    """

    model_config = ConfigDict(extra="forbid")

    type: BuildingType
    refine_by_name: list[BuildingType] = Field(default_factory=list)

    @model_validator(mode="before")
    @classmethod
    def _from_string(cls, value: Any) -> Any:
        if isinstance(value, str):
            return {"type": value}
        return value


class TagRules(BaseModel):
    """Tables from tag values to building types, tried in ``order``.

    Attributes
    ----------
    order : list of str
        Canonical columns in the order they are tried.
    tables : dict
        Column -> (value -> type). The value ``*`` matches any value that is not
        in ``no_evidence_values``.
    """

    model_config = ConfigDict(extra="forbid")

    order: list[str]
    tables: dict[str, dict[str, BuildingType]]

    @model_validator(mode="after")
    def _check_columns(self) -> TagRules:
        for column in [*self.order, *self.tables]:
            if column not in RULE_COLUMNS:
                raise ValueError(
                    f"column {column!r} is not a canonical attribute column "
                    f"(pipeline/glossary.py ATTRIBUTE_COLUMNS)"
                )
        missing = [c for c in self.tables if c not in self.order]
        if missing:
            raise ValueError(f"tables {missing} are not listed in order")
        return self


class LandUseRules(BaseModel):
    """Land-use / survey code tables.

    Attributes
    ----------
    exact : dict of str to LandUseRule
        Whole-value matches (CBDC landUseTyp, Chinese class names).
    gb_prefix : dict of str to LandUseRule
        GB 50137-2011 codes, longest prefix wins.
    """

    model_config = ConfigDict(extra="forbid")

    exact: dict[str, LandUseRule] = Field(default_factory=dict)
    gb_prefix: dict[str, LandUseRule] = Field(default_factory=dict)

    @field_validator("gb_prefix")
    @classmethod
    def _code_shape(cls, value: dict[str, LandUseRule]) -> dict[str, LandUseRule]:
        for code in value:
            if not _GB_CODE.match(code):
                raise ValueError(f"GB code {code!r} is not a letter plus up to 3 digits")
        return value


class AreaRules(TagRules):
    """Tag tables for area polygons, plus whether to type areas by land-use code.

    Attributes
    ----------
    use_land_use_codes : bool
        Type areas by their ``land_use_code`` with the ``land_use`` tables.
    """

    use_land_use_codes: bool = True


class PoiRules(BaseModel):
    """POI category table.

    Attributes
    ----------
    separators : str
        Characters that split hierarchical categories (most specific last).
    tag_columns : list of str
        Tag columns turned into ``key=value`` categories when present.
    categories : dict of str to str
        Category (case-insensitive; ``key=*`` allowed) to building type.
    """

    model_config = ConfigDict(extra="forbid")

    separators: str = ";|/>"
    tag_columns: list[str] = Field(default_factory=list)
    categories: dict[str, BuildingType] = Field(default_factory=dict)


class NameRule(BaseModel):
    """One name keyword rule.

    Attributes
    ----------
    id : str
        Rule name shown in messages.
    type : str
        Building type when the rule fires.
    pattern : str
        Python regex searched in the normalised name.
    unless : list of str
        Regexes; the rule is skipped when any matches the name.
    mask : list of str
        Regexes blanked out before ``pattern`` is searched.
    """

    model_config = ConfigDict(extra="forbid")

    id: str
    type: BuildingType
    pattern: str
    unless: list[str] = Field(default_factory=list)
    mask: list[str] = Field(default_factory=list)

    @field_validator("pattern", "unless", "mask")
    @classmethod
    def _compiles(cls, value: str | list[str]) -> str | list[str]:
        for pattern in [value] if isinstance(value, str) else value:
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ValueError(f"bad regex {pattern!r}: {exc}") from exc
        return value


class NameRules(BaseModel):
    """Name keyword rules.

    Attributes
    ----------
    fields : list of str
        Name columns tried in order (the next only when the previous gave nothing).
    global_masks : list of str
        Regexes blanked out before every rule (road names, former-use notes).
    rules : list of NameRule
        Rules, first match wins.
    """

    model_config = ConfigDict(extra="forbid")

    fields: list[str] = Field(default_factory=lambda: ["name", "name_en"])
    global_masks: list[str] = Field(default_factory=list)
    rules: list[NameRule] = Field(default_factory=list)

    @field_validator("global_masks")
    @classmethod
    def _compiles(cls, value: list[str]) -> list[str]:
        for pattern in value:
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ValueError(f"bad regex {pattern!r}: {exc}") from exc
        return value


class ClassificationRules(BaseModel):
    """Schema of ``configs/classification.yaml``.

    Attributes
    ----------
    version : int
        Schema version (1).
    building_types : list of str
        Must list exactly the nine building types.
    type_priority : list of str
        Tie-break order between types.
    no_evidence_values : list of str
        Tag values that carry no evidence (``yes``...).
    tags, land_use, areas, pois, names
        The rule tables, see the YAML file.
    traditional_to_simplified : dict of str to str
        Character map applied to names before matching.
    """

    model_config = ConfigDict(extra="forbid")

    version: Literal[1] = 1
    building_types: list[BuildingType] = Field(default_factory=lambda: list(BUILDING_TYPES))
    type_priority: list[BuildingType] = Field(
        default_factory=lambda: [t for t in BUILDING_TYPES if t != "unknown"]
    )
    no_evidence_values: list[str] = Field(default_factory=lambda: ["yes"])
    tags: TagRules
    land_use: LandUseRules = Field(default_factory=LandUseRules)
    areas: AreaRules
    pois: PoiRules = Field(default_factory=PoiRules)
    names: NameRules = Field(default_factory=NameRules)
    traditional_to_simplified: dict[str, str] = Field(default_factory=dict)

    _compiled: dict[str, Any] = PrivateAttr(default_factory=dict)

    @field_validator("building_types")
    @classmethod
    def _all_types(cls, value: list[str]) -> list[str]:
        if sorted(value) != sorted(BUILDING_TYPES):
            raise ValueError(f"must list exactly {list(BUILDING_TYPES)}")
        return value

    @field_validator("traditional_to_simplified")
    @classmethod
    def _single_chars(cls, value: dict[str, str]) -> dict[str, str]:
        for key, val in value.items():
            if len(key) != 1 or len(val) != 1:
                raise ValueError(f"entry {key!r}: {val!r} must map one character to one")
        return value

    def model_post_init(self, __context: Any) -> None:
        """Pre-compile regexes and normalise table keys (lower case)."""
        flags = re.IGNORECASE
        self._compiled = {
            "global_masks": [re.compile(p, flags) for p in self.names.global_masks],
            "rules": [
                (
                    rule,
                    re.compile(rule.pattern, flags),
                    [re.compile(p, flags) for p in rule.unless],
                    [re.compile(p, flags) for p in rule.mask],
                )
                for rule in self.names.rules
            ],
            "translate": str.maketrans(self.traditional_to_simplified),
            "no_evidence": {v.strip().lower() for v in self.no_evidence_values},
            "tags": {c: _lower_keys(t) for c, t in self.tags.tables.items()},
            "areas": {c: _lower_keys(t) for c, t in self.areas.tables.items()},
            "exact": _lower_keys(self.land_use.exact),
            "pois": _lower_keys(self.pois.categories),
            "priority": {t: i for i, t in enumerate(self.type_priority)},
        }


def _lower_keys(table: Mapping[str, Any]) -> dict[str, Any]:
    return {str(k).strip().lower(): v for k, v in table.items()}


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML loader that refuses duplicate mapping keys."""


def _construct_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False):
    loader.flatten_mapping(node)
    seen: dict[Any, Any] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r}", key_node.start_mark
            )
        seen[key] = True
    return loader.construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(
    yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping
)


def _format_loc(loc: Sequence[Any]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out or "<top level>"


def load_rules(path: str | os.PathLike[str]) -> ClassificationRules:
    """Read and validate the classification rule tables.

    Parameters
    ----------
    path : str or path-like
        The YAML file (``configs/classification.yaml``).

    Returns
    -------
    ClassificationRules
        The validated rules with compiled regexes.

    Raises
    ------
    ClassificationError
        When the file is missing, is not valid YAML, or a key is wrong; the
        message names the file and the key.
    """
    path = Path(path)
    if not path.is_file():
        raise ClassificationError(
            f"{path}: classification rules file not found (config key classify.rules_file)"
        )
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader)
    except yaml.YAMLError as exc:
        raise ClassificationError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ClassificationError(f"{path}: expected a mapping of rule tables at the top level")
    try:
        return ClassificationRules.model_validate(data)
    except ValidationError as exc:
        lines = [
            f"  key {_format_loc(err['loc'])}: {err['msg']} (got {err.get('input')!r:.80})"
            for err in exc.errors()
        ]
        raise ClassificationError(
            f"{path}: invalid classification rules:\n" + "\n".join(lines)
        ) from None


# ---------------------------------------------------------------------------------------------
# evidence helpers (pure)
# ---------------------------------------------------------------------------------------------


def _clean(value: Any) -> str | None:
    """Trimmed string or None for null/empty values."""
    if value is None:
        return None
    if isinstance(value, float) and np.isnan(value):
        return None
    if value is pd.NA or value is pd.NaT:
        return None
    text = str(value).strip()
    return text or None


def _column(frame: pd.DataFrame, column: str) -> pd.Series:
    """Column as object series (None for nulls); all-null when the column is absent."""
    if column not in frame.columns:
        return pd.Series([None] * len(frame), index=frame.index, dtype=object)
    values = map_unique(frame[column], _clean)  # _clean once per distinct value
    return pd.Series(values, index=frame.index, dtype=object)


def _lookup_tag(
    value: str, table: Mapping[str, str], no_evidence: set[str]
) -> tuple[str, str] | None:
    """Type and matched value for a tag value ('a;b' tried left to right)."""
    for part in value.split(";"):
        part = part.strip().lower()
        if not part or part in no_evidence:
            continue
        if part in table:
            return table[part], part
        if "*" in table:
            return table["*"], part
    return None


def _tag_candidates(
    frame: pd.DataFrame,
    order: Sequence[str],
    tables: Mapping[str, Mapping[str, str]],
    no_evidence: set[str],
) -> list[list[tuple[str, str]]]:
    """Per row (positional) the list of (type, evidence) from tag tables, in order."""
    out: list[list[tuple[str, str]]] = [[] for _ in range(len(frame))]
    for column in order:
        table = tables.get(column)
        if not table or column not in frame.columns:
            continue
        values = _column(frame, column).to_numpy()
        cache: dict[str, tuple[str, str] | None] = {}
        for pos, value in enumerate(values):
            if value is None:
                continue
            if value not in cache:
                cache[value] = _lookup_tag(value, table, no_evidence)
            hit = cache[value]
            if hit is not None:
                out[pos].append((hit[0], f"{_KEY_LABEL.get(column, column)}={hit[1]}"))
    return out


def lookup_land_use(code: Any, rules: ClassificationRules) -> tuple[LandUseRule, str] | None:
    """Rule and evidence text for one land-use code.

    Parameters
    ----------
    code : object
        A CBDC landUseTyp value, a GB 50137-2011 code or a class name.
    rules : ClassificationRules
        The rules.

    Returns
    -------
    tuple of (LandUseRule, str) or None
        The rule and e.g. ``land_use_code=A331 (GB A33)``; None when unknown.
    """
    text = _clean(code)
    if text is None:
        return None
    exact = rules._compiled["exact"]
    key = text.lower()
    if key in exact:
        return exact[key], f"land_use_code={text}"
    first = _CODE_SPLIT.split(text.upper().replace(" ", ""))[0]
    if _GB_CODE.match(first):
        for n in range(len(first), 0, -1):
            rule = rules.land_use.gb_prefix.get(first[:n])
            if rule is not None:
                return rule, f"land_use_code={text} (GB 50137-2011 {first[:n]})"
    return None


def normalise_name(name: Any, rules: ClassificationRules) -> str | None:
    """Normalise a name for keyword matching.

    NFKC (full-width to half-width), traditional to simplified characters,
    lower case, the global masks blanked out.

    Parameters
    ----------
    name : object
        The raw name.
    rules : ClassificationRules
        The rules (character map and masks).

    Returns
    -------
    str or None
        The normalised name, None for null/empty names.
    """
    text = _clean(name)
    if text is None:
        return None
    text = unicodedata.normalize("NFKC", text).translate(rules._compiled["translate"]).lower()
    for mask in rules._compiled["global_masks"]:
        text = mask.sub(_MASK_CHAR, text)
    return text


def match_name(name: Any, rules: ClassificationRules) -> tuple[str, str, str] | None:
    """Apply the name keyword rules to one name.

    Parameters
    ----------
    name : object
        The raw name.
    rules : ClassificationRules
        The rules.

    Returns
    -------
    tuple of (type, rule id, matched text) or None
        The first rule that fires, or None.
    """
    text = normalise_name(name, rules)
    if text is None:
        return None
    for rule, pattern, unless, masks in rules._compiled["rules"]:
        if any(u.search(text) for u in unless):
            continue
        target = text
        for mask in masks:
            target = mask.sub(_MASK_CHAR, target)
        found = pattern.search(target)
        if found:
            return rule.type, rule.id, found.group(0)
    return None


def _name_candidates(frame: pd.DataFrame, rules: ClassificationRules) -> list[tuple | None]:
    """Per row (positional) (type, evidence) from the name rules, or None."""
    out: list[tuple | None] = [None] * len(frame)
    cache: dict[str, tuple[str, str, str] | None] = {}
    for field in rules.names.fields:
        if field not in frame.columns:
            continue
        values = _column(frame, field).to_numpy()
        for pos, value in enumerate(values):
            if out[pos] is not None or value is None:
                continue
            if value not in cache:
                cache[value] = match_name(value, rules)
            hit = cache[value]
            if hit is not None:
                label = "name" if field == "name" else field
                out[pos] = (hit[0], f"{label} keyword '{hit[2].strip()}' ({hit[1]})")
    return out


def _feature_label(frame: pd.DataFrame, positions: np.ndarray) -> list[str]:
    """Name (or source_id) of features for evidence text."""
    names = _column(frame, "name").to_numpy()
    ids = _column(frame, "source_id").to_numpy()
    labels = []
    for pos in positions:
        label = names[pos] or ids[pos]
        labels.append(f"'{label}'" if label else "(unnamed)")
    return labels


def _area_types(areas: gpd.GeoDataFrame, rules: ClassificationRules) -> pd.DataFrame:
    """Type and evidence of each area polygon (positional), typed areas only."""
    cands = _tag_candidates(
        areas,
        [c for c in rules.areas.order if c != "land_use_code"],
        rules._compiled["areas"],
        rules._compiled["no_evidence"],
    )
    if rules.areas.use_land_use_codes and "land_use_code" in areas.columns:
        codes = _column(areas, "land_use_code").to_numpy()
        for pos, code in enumerate(codes):
            hit = lookup_land_use(code, rules) if code is not None else None
            if hit is not None:
                cands[pos].append((hit[0].type, hit[1]))
    typed = [pos for pos, c in enumerate(cands) if c]
    labels = _feature_label(areas, np.asarray(typed, dtype=int))
    return pd.DataFrame(
        {
            "pos": np.asarray(typed, dtype=int),
            "type": [cands[p][0][0] for p in typed],
            "evidence": [
                f"{cands[p][0][1]} area {lab}" for p, lab in zip(typed, labels, strict=True)
            ],
        }
    )


def _poi_types(pois: gpd.GeoDataFrame, rules: ClassificationRules) -> pd.DataFrame:
    """Type and evidence of each POI (positional), typed POIs only."""
    table = rules._compiled["pois"]
    no_evidence = rules._compiled["no_evidence"]
    seps = rules.pois.separators
    split = re.compile("[" + re.escape(seps) + "]") if seps else None
    cats = _column(pois, "poi_category").to_numpy()
    tag_values = {c: _column(pois, c).to_numpy() for c in rules.pois.tag_columns}
    rows = []
    for pos in range(len(pois)):
        keys: list[str] = []
        if cats[pos] is not None:
            parts = [p.strip() for p in split.split(cats[pos])] if split else [cats[pos]]
            keys += [cats[pos].strip()] + [p for p in reversed(parts) if p]
        for column, values in tag_values.items():
            value = values[pos]
            if value is not None and value.lower() not in no_evidence:
                key = _KEY_LABEL.get(column, column)
                keys += [f"{key}={value}", f"{key}=*"]
        for key in keys:
            hit = table.get(key.lower())
            if hit is not None:
                rows.append((pos, hit, key))
                break
    frame = pd.DataFrame(rows, columns=["pos", "type", "category"])
    frame["pos"] = frame["pos"].astype(int)
    labels = _feature_label(pois, frame["pos"].to_numpy())
    frame["evidence"] = [f"poi {c} {lab}" for c, lab in zip(frame["category"], labels, strict=True)]
    return frame


def _check_crs(buildings: gpd.GeoDataFrame, areas: gpd.GeoDataFrame, pois: gpd.GeoDataFrame):
    for label, frame in (("buildings", buildings), ("areas", areas), ("pois", pois)):
        if not isinstance(frame, gpd.GeoDataFrame) or frame.crs is None:
            raise ValueError(
                f"classify: {label} has no CRS; all inputs must be in the projected working CRS"
            )
    if buildings.crs.is_geographic:
        raise ValueError(
            f"classify: buildings are in a geographic CRS ({buildings.crs.to_string()}); "
            "reproject to the metric working CRS first"
        )
    for label, frame in (("areas", areas), ("pois", pois)):
        # the same definition text first: a full comparison builds both CRSs (~0.1 s per call)
        if frame.crs.srs != buildings.crs.srs and frame.crs != buildings.crs:
            raise ValueError(
                f"classify: {label} CRS {frame.crs.to_string()} differs from buildings CRS "
                f"{buildings.crs.to_string()}; reproject to the working CRS"
            )


def _valid_geoms(frame: gpd.GeoDataFrame) -> np.ndarray:
    geoms = frame.geometry
    return (~(geoms.isna() | geoms.is_empty)).to_numpy()


def _area_candidates(
    buildings: gpd.GeoDataFrame, areas: gpd.GeoDataFrame, rules: ClassificationRules
) -> list[list[tuple[str, str]]]:
    """Per building (positional) typed containing areas, smallest first."""
    if len(buildings) == 0 or len(areas) == 0:
        return [()] * len(buildings)  # no evidence: one shared empty (immutable) entry
    out: list[list[tuple[str, str]]] = [[] for _ in range(len(buildings))]
    typed = _area_types(areas, rules)
    if typed.empty:
        return out
    geoms = areas.geometry.to_numpy()[typed["pos"].to_numpy()]
    area_gdf = gpd.GeoDataFrame(
        {"a": np.arange(len(typed))}, geometry=list(geoms), crs=areas.crs
    )
    area_gdf = area_gdf[_valid_geoms(area_gdf)]
    valid = _valid_geoms(buildings)
    if not valid.any() or area_gdf.empty:
        return out
    centroids = gpd.GeoDataFrame(
        {"b": np.flatnonzero(valid)},
        geometry=buildings.geometry[valid].centroid.to_numpy(),
        crs=buildings.crs,
    )
    joined = gpd.sjoin(centroids, area_gdf, predicate="within", how="inner")
    if joined.empty:
        return out
    size = area_gdf.set_index("a").geometry.area
    joined = joined.assign(size=size.reindex(joined["a"]).to_numpy())
    joined = joined.sort_values(["b", "size", "a"], kind="stable")
    types = typed["type"].to_numpy()
    evidence = typed["evidence"].to_numpy()
    for b, a in zip(joined["b"].to_numpy(), joined["a"].to_numpy(), strict=True):
        out[b].append((types[a], evidence[a]))
    return out


def _poi_candidates(
    buildings: gpd.GeoDataFrame, pois: gpd.GeoDataFrame, rules: ClassificationRules
) -> list[list[tuple[str, str]]]:
    """Per building (positional) POI evidence: winner first, then the others."""
    if len(buildings) == 0 or len(pois) == 0:
        return [()] * len(buildings)  # no evidence: one shared empty (immutable) entry
    out: list[list[tuple[str, str]]] = [[] for _ in range(len(buildings))]
    typed = _poi_types(pois, rules)
    if typed.empty:
        return out
    point_gdf = gpd.GeoDataFrame(
        {"p": np.arange(len(typed))},
        geometry=list(pois.geometry.to_numpy()[typed["pos"].to_numpy()]),
        crs=pois.crs,
    )
    point_gdf = point_gdf[_valid_geoms(point_gdf)]
    valid = _valid_geoms(buildings)
    if not valid.any() or point_gdf.empty:
        return out
    footprints = gpd.GeoDataFrame(
        {"b": np.flatnonzero(valid)}, geometry=buildings.geometry[valid].to_numpy(),
        crs=buildings.crs,
    )
    joined = gpd.sjoin(point_gdf, footprints, predicate="within", how="inner")
    if joined.empty:
        return out
    types = typed["type"].to_numpy()
    evidence = typed["evidence"].to_numpy()
    priority = rules._compiled["priority"]
    for b, group in joined.groupby("b", sort=True)["p"]:
        ps = sorted(group.to_numpy())
        counts = Counter(types[p] for p in ps)
        order = sorted(counts, key=lambda t: (-counts[t], priority.get(t, 99)))
        for t in order:
            members = [p for p in ps if types[p] == t]
            text = evidence[members[0]]
            if len(members) > 1:
                text += f" (+{len(members) - 1} more)"
            out[int(b)].append((t, text))
    return out


def explicit_tag_types(buildings: pd.DataFrame, rules: ClassificationRules) -> pd.DataFrame:
    """Type given by the explicit tags alone (level 2), per building.

    Parameters
    ----------
    buildings : DataFrame
        Buildings with the canonical tag columns.
    rules : ClassificationRules
        The rules.

    Returns
    -------
    DataFrame
        Same index; ``type`` and ``evidence`` (null where no tag gives a type).
    """
    cands = _tag_candidates(
        buildings, rules.tags.order, rules._compiled["tags"], rules._compiled["no_evidence"]
    )
    return pd.DataFrame(
        {
            "type": pd.Series([c[0][0] if c else None for c in cands], dtype="str"),
            "evidence": pd.Series([c[0][1] if c else None for c in cands], dtype="str"),
        }
    ).set_axis(buildings.index)


#: Columns holding explicit use tags (hidden in the OSM evaluation).
EXPLICIT_TAG_COLUMNS: tuple[str, ...] = (
    "tag_building",
    "tag_amenity",
    "tag_office",
    "tag_landuse",
    "tag_government",
    "tag_industrial",
    "tag_building_use",
    "tag_shop",
    "class_field",
    "subtype_field",
)


def _conflict_text(items: Iterable[tuple[str, str, str]], chosen: str) -> str | None:
    parts = [f"{src}: {t} ({ev})" for src, t, ev in items if t != chosen]
    return "; ".join(dict.fromkeys(parts)) or None


# ---------------------------------------------------------------------------------------------
# kernel
# ---------------------------------------------------------------------------------------------


def classify_buildings(
    buildings: gpd.GeoDataFrame,
    areas: gpd.GeoDataFrame,
    pois: gpd.GeoDataFrame,
    rules: ClassificationRules,
) -> gpd.GeoDataFrame:
    """Classify buildings by type from tags, codes, areas, POIs and names.

    Pure per-partition kernel (module level, so it pickles for Dask).

    Parameters
    ----------
    buildings : GeoDataFrame
        Footprints in a projected metric CRS with the canonical attribute
        columns (``pipeline.glossary.ATTRIBUTE_COLUMNS``; absent ones count as
        null). May be empty.
    areas : GeoDataFrame
        Non-building polygons (campuses, land-use parcels) with the same
        attribute columns, in the same CRS. May be empty.
    pois : GeoDataFrame
        Points with the attribute columns and ``poi_category``, same CRS.
        May be empty.
    rules : ClassificationRules
        Rule tables from :func:`load_rules`.

    Returns
    -------
    GeoDataFrame
        ``buildings`` (same index and row order) with ``building_type``,
        ``type_source``, ``type_confidence``, ``type_evidence`` and
        ``type_conflict`` added (replaced if present).

    Raises
    ------
    ValueError
        When a frame has no CRS, the CRSes differ, or buildings are in a
        geographic CRS.
    """
    _check_crs(buildings, areas, pois)
    area_ev = _area_candidates(buildings, areas, rules)
    poi_ev = _poi_candidates(buildings, pois, rules)
    # rows with the same attribute values and no spatial evidence get the same result:
    # decide once per distinct evidence signature, then broadcast
    group, first = _evidence_groups(buildings, rules, area_ev, poi_ev)
    reps = buildings.iloc[first]
    n = len(reps)
    no_evidence = rules._compiled["no_evidence"]
    tags = _tag_candidates(reps, rules.tags.order, rules._compiled["tags"], no_evidence)
    codes = _column(reps, "land_use_code").to_numpy()
    area_ev = [area_ev[i] for i in first]
    poi_ev = [poi_ev[i] for i in first]
    name_ev = _name_candidates(reps, rules)

    b_type = np.empty(n, dtype=object)
    b_source = np.empty(n, dtype=object)
    b_evidence = np.empty(n, dtype=object)
    b_conflict = np.full(n, None, dtype=object)
    for i in range(n):
        levels: list[tuple[str, list[tuple[str, str]]]] = [("tag", tags[i])]
        code_hit = lookup_land_use(codes[i], rules) if codes[i] is not None else None
        levels.append(("survey_code", [(code_hit[0].type, code_hit[1])] if code_hit else []))
        levels.append(("containing_area", area_ev[i]))
        levels.append(("poi", poi_ev[i]))
        levels.append(("name", [name_ev[i]] if name_ev[i] else []))
        chosen = next((k for k, (_, ev) in enumerate(levels) if ev), None)
        if chosen is None:
            b_type[i], b_source[i], b_evidence[i] = "unknown", "default", "no evidence"
            continue
        source, evs = levels[chosen]
        kind, text = evs[0]
        skip_name = False
        if source == "survey_code" and name_ev[i] and name_ev[i][0] in code_hit[0].refine_by_name:
            if name_ev[i][0] != kind:
                kind = name_ev[i][0]
                source = "survey_code+name"
                text = f"{text} + {name_ev[i][1]}"
            skip_name = True
        weaker = [(source if k == chosen else levels[k][0], t, e)
                  for k in range(chosen, len(levels))
                  for j, (t, e) in enumerate(levels[k][1])
                  if not (k == chosen and j == 0)
                  and not (skip_name and levels[k][0] == "name")]
        b_type[i], b_source[i], b_evidence[i] = kind, source, text
        b_conflict[i] = _conflict_text(weaker, kind)

    out = buildings.copy()
    out["building_type"] = pd.Series(b_type[group], index=buildings.index, dtype="str")
    out["type_source"] = pd.Series(b_source[group], index=buildings.index, dtype="str")
    out["type_confidence"] = out["type_source"].map(CONFIDENCE).astype("str")
    out["type_evidence"] = pd.Series(b_evidence[group], index=buildings.index, dtype="str")
    out["type_conflict"] = pd.Series(b_conflict[group], index=buildings.index, dtype="str")
    return out


def _evidence_groups(
    buildings: pd.DataFrame, rules: ClassificationRules,
    area_ev: list[list[tuple[str, str]]], poi_ev: list[list[tuple[str, str]]],
) -> tuple[np.ndarray, np.ndarray]:
    """Group rows whose classification evidence is identical.

    The type of a building follows from its tag, land-use code and name
    columns and its containing-area and POI evidence. Rows with spatial
    evidence form groups of one; the others are grouped by the values of
    those columns.

    Returns
    -------
    tuple of ndarray
        ``group`` (per row, 0..G-1 in order of first appearance) and
        ``first`` (position of the first row of each group).
    """
    n = len(buildings)
    columns = dict.fromkeys([*rules.tags.order, "land_use_code", *rules.names.fields])
    key = np.zeros(n, dtype=np.int64)
    spatial = np.fromiter((bool(a) or bool(p) for a, p in zip(area_ev, poi_ev, strict=True)),
                          dtype=bool, count=n)
    parts = [np.where(spatial, np.arange(n), -1)]
    parts += [pd.factorize(_column(buildings, c), use_na_sentinel=True)[0]
              for c in columns if c in buildings.columns]
    for codes in parts:
        # both factors are < n + 1, so the product fits int64 for any realistic n
        key = pd.factorize(key * (n + 1) + (codes + 1))[0].astype(np.int64)
    n_groups = int(key.max()) + 1 if n else 0
    first = np.full(n_groups, n, dtype=np.int64)
    np.minimum.at(first, key, np.arange(n))
    return key, first


def conflicts_table(buildings: pd.DataFrame) -> pd.DataFrame:
    """List the buildings whose weaker evidence disagreed with the chosen type.

    Parameters
    ----------
    buildings : DataFrame
        Output of :func:`classify_buildings` (or :func:`apply_overrides`).

    Returns
    -------
    DataFrame
        One row per conflicting building with ``building_id`` (when present),
        ``name``, ``building_type``, ``type_source``, ``type_confidence``,
        ``type_evidence`` and ``type_conflict``; no geometry.
    """
    cols = [c for c in ("building_id", "source", "name", *OUTPUT_COLUMNS) if c in buildings]
    mask = buildings["type_conflict"].notna() if "type_conflict" in buildings else []
    return pd.DataFrame(buildings.loc[mask, cols])


# ---------------------------------------------------------------------------------------------
# overrides
# ---------------------------------------------------------------------------------------------


def load_overrides(path: str | os.PathLike[str]) -> pd.DataFrame:
    """Read the overrides CSV (``building_id,building_type,note``).

    Parameters
    ----------
    path : str or path-like
        The CSV file.

    Returns
    -------
    DataFrame
        The rows as strings; ``attrs['source']`` holds the path for messages.

    Raises
    ------
    ClassificationError
        When the file is missing or lacks a required column.
    """
    path = Path(path)
    if not path.is_file():
        raise ClassificationError(
            f"{path}: overrides file not found (config key classify.overrides_file)"
        )
    frame = pd.read_csv(path, dtype=str, keep_default_na=False, comment=None, encoding="utf-8")
    frame.columns = [c.strip() for c in frame.columns]
    missing = [c for c in ("building_id", "building_type") if c not in frame.columns]
    if missing:
        raise ClassificationError(
            f"{path}: overrides CSV lacks column(s) {missing}; the header must be "
            "building_id,building_type,note"
        )
    if "note" not in frame.columns:
        frame["note"] = ""
    frame.attrs["source"] = str(path)
    return frame


def apply_overrides(buildings: gpd.GeoDataFrame, overrides: pd.DataFrame) -> gpd.GeoDataFrame:
    """Set the type of single buildings by hand.

    Parameters
    ----------
    buildings : GeoDataFrame
        Classified buildings with ``building_id``.
    overrides : DataFrame
        Columns ``building_id``, ``building_type`` and ``note`` (from
        :func:`load_overrides`, whose path is used in error messages).

    Returns
    -------
    GeoDataFrame
        A copy with the overridden rows set to ``type_source='override'``,
        ``type_confidence='high'`` and the note as evidence; the previous
        classification goes to ``type_conflict`` when it differed.

    Raises
    ------
    ClassificationError
        For an unknown building id, an unknown type or a duplicated id; the
        message names the CSV file, the row and the fix.
    """
    source = overrides.attrs.get("source", "<overrides table>")
    out = buildings.copy()
    if overrides.empty:
        return out
    ids = out["building_id"].astype(str)
    position = pd.Series(np.arange(len(out)), index=ids.to_numpy())
    if not position.index.is_unique:
        raise ClassificationError("classify: building_id is not unique; cannot apply overrides")
    seen: dict[str, int] = {}
    for row_no, row in enumerate(overrides.itertuples(index=False), start=2):
        bid = str(getattr(row, "building_id", "")).strip()
        btype = str(getattr(row, "building_type", "")).strip()
        note = str(getattr(row, "note", "") or "").strip()
        where = f"{source}, line {row_no} (building_id={bid!r})"
        if btype not in BUILDING_TYPES:
            raise ClassificationError(
                f"{where}: unknown building_type {btype!r}; use one of {list(BUILDING_TYPES)}"
            )
        if bid not in position.index:
            raise ClassificationError(
                f"{where}: no building with this id in the input; ids look like "
                f"'<source>:<source_id>' (e.g. {ids.iloc[0] if len(ids) else 'osm:way/1'!r}) - "
                "fix the id or delete the row"
            )
        if bid in seen:
            raise ClassificationError(
                f"{where}: building_id already overridden on line {seen[bid]}; keep one row"
            )
        seen[bid] = row_no
        pos = int(position[bid])
        label = out.index[pos]
        old = (out.at[label, "type_source"], out.at[label, "building_type"],
               out.at[label, "type_evidence"])
        out.at[label, "building_type"] = btype
        out.at[label, "type_source"] = "override"
        out.at[label, "type_confidence"] = "high"
        out.at[label, "type_evidence"] = f"override: {note}" if note else "override"
        out.at[label, "type_conflict"] = (
            f"{old[0]}: {old[1]} ({old[2]})" if old[1] != btype else np.nan
        )
    return out


# ---------------------------------------------------------------------------------------------
# loaders
# ---------------------------------------------------------------------------------------------


def _resolve(path: Path, base_dir: Path) -> Path:
    path = Path(path)
    return path if path.is_absolute() else Path(base_dir) / path


def _read_layer(path: Path, layer: str | None, crs_if_missing: str | None, crs: str,
                what: str) -> gpd.GeoDataFrame:
    if not path.exists():
        raise ClassificationError(f"{path}: {what} file not found")
    kwargs: dict[str, Any] = {"layer": layer} if layer else {}
    gdf = gpd.read_file(path, **kwargs)
    if gdf.crs is None:
        if not crs_if_missing:
            raise ClassificationError(
                f"{path}: {what} has no CRS; set crs_if_missing (e.g. 'EPSG:4326') for this "
                "layer in the classify config if you know it"
            )
        gdf = gdf.set_crs(crs_if_missing)
    return gdf.to_crs(crs)


def _empty_frame(columns: Sequence[str], crs: str) -> gpd.GeoDataFrame:
    data = {c: pd.Series([], dtype="str") for c in columns}
    return gpd.GeoDataFrame(data, geometry=gpd.GeoSeries([], crs=crs), crs=crs)


def _as_str(series: pd.Series) -> pd.Series:
    return series.map(_clean, na_action="ignore").astype("str")


def load_pois(
    cfgs: Sequence[PoiLayerConfig], crs: str, base_dir: str | os.PathLike[str]
) -> gpd.GeoDataFrame:
    """Read the extra POI layers into one canonical point frame.

    Parameters
    ----------
    cfgs : sequence of PoiLayerConfig
        The layers.
    crs : str
        Working CRS to reproject to.
    base_dir : path-like
        Base for relative paths.

    Returns
    -------
    GeoDataFrame
        Points with the attribute columns (``name`` from ``name_field``, the
        others null), ``poi_category`` and ``source`` (file stem). Non-point
        features are replaced by a representative point.

    Raises
    ------
    ClassificationError
        For a missing file, field or CRS.
    """
    columns = [*ATTRIBUTE_COLUMNS, "poi_category", "source", "source_id"]
    frames = []
    for cfg in cfgs:
        path = _resolve(cfg.path, Path(base_dir))
        gdf = _read_layer(path, cfg.layer, cfg.crs_if_missing, crs, "POI layer")
        for field in (cfg.category_field, cfg.name_field):
            if field and field not in gdf.columns:
                raise ClassificationError(
                    f"{path}: POI field {field!r} not found; fields are {list(gdf.columns)}"
                )
        out = _empty_frame(columns, crs).reindex(range(len(gdf)))
        out["poi_category"] = _as_str(gdf[cfg.category_field].reset_index(drop=True))
        if cfg.name_field:
            out["name"] = _as_str(gdf[cfg.name_field].reset_index(drop=True))
        out["source"] = pd.Series([path.stem] * len(gdf), dtype="str")
        out["source_id"] = pd.Series([f"{path.stem}:{i}" for i in range(len(gdf))], dtype="str")
        geoms = gdf.geometry.reset_index(drop=True)
        not_point = (geoms.geom_type != "Point").to_numpy() & geoms.notna().to_numpy()
        if not_point.any():
            log.info("classify: %s: %d non-point POIs replaced by a representative point",
                     path, int(not_point.sum()))
            geoms = geoms.where(~not_point, geoms.representative_point())
        out = out.set_geometry(gpd.GeoSeries(geoms.to_numpy(), crs=crs))
        frames.append(out)
        log.info("classify: read %d POIs from %s", len(out), path)
    if not frames:
        return _empty_frame(columns, crs)
    return gpd.GeoDataFrame(pd.concat(frames, ignore_index=True), crs=crs)


def load_area_layers(
    cfgs: Sequence[AreaLayerConfig], crs: str, base_dir: str | os.PathLike[str]
) -> gpd.GeoDataFrame:
    """Read the extra land-use / campus layers into one canonical polygon frame.

    Parameters
    ----------
    cfgs : sequence of AreaLayerConfig
        The layers with their column mappings.
    crs : str
        Working CRS to reproject to.
    base_dir : path-like
        Base for relative paths.

    Returns
    -------
    GeoDataFrame
        Polygons with the attribute columns (mapped ones filled, the others
        null), ``source`` (file stem) and ``source_id``.

    Raises
    ------
    ClassificationError
        For a missing file, field or CRS.
    """
    columns = [*ATTRIBUTE_COLUMNS, "source", "source_id"]
    frames = []
    for cfg in cfgs:
        path = _resolve(cfg.path, Path(base_dir))
        gdf = _read_layer(path, cfg.layer, cfg.crs_if_missing, crs, "area layer")
        polygonal = gdf.geom_type.isin(["Polygon", "MultiPolygon"]).to_numpy()
        if not polygonal.all():
            log.info("classify: %s: dropped %d non-polygon features", path,
                     int((~polygonal).sum()))
        gdf = gdf[polygonal].reset_index(drop=True)
        out = _empty_frame(columns, crs).reindex(range(len(gdf)))
        for canonical, field in cfg.columns.items():
            if field not in gdf.columns:
                raise ClassificationError(
                    f"{path}: field {field!r} (mapped to {canonical}) not found; fields are "
                    f"{[c for c in gdf.columns if c != 'geometry']}"
                )
            out[canonical] = _as_str(gdf[field])
        out["source"] = pd.Series([path.stem] * len(gdf), dtype="str")
        if "source_id" not in cfg.columns:
            out["source_id"] = pd.Series(
                [f"{path.stem}:{i}" for i in range(len(gdf))], dtype="str"
            )
        out = out.set_geometry(gpd.GeoSeries(gdf.geometry.to_numpy(), crs=crs))
        frames.append(out)
        log.info("classify: read %d areas from %s", len(out), path)
    if not frames:
        return _empty_frame(columns, crs)
    return gpd.GeoDataFrame(pd.concat(frames, ignore_index=True), crs=crs)


def _read_optional_parquet(path: Path, columns: Sequence[str], crs: str) -> gpd.GeoDataFrame:
    if not Path(path).exists():
        log.info("classify: %s absent, using an empty layer", path)
        return _empty_frame(columns, crs)
    gdf = gpd.read_parquet(path)
    if gdf.crs is None:
        raise ClassificationError(f"{path}: GeoParquet without CRS")
    return gdf.to_crs(crs) if gdf.crs != crs else gdf


def _concat(frames: Sequence[gpd.GeoDataFrame], crs: str) -> gpd.GeoDataFrame:
    frames = [f for f in frames if len(f)]
    if not frames:
        return _empty_frame(ATTRIBUTE_COLUMNS, crs)
    if len(frames) == 1:
        return frames[0]
    return gpd.GeoDataFrame(pd.concat(frames, ignore_index=True), crs=crs)


def classify_partition(
    buildings: gpd.GeoDataFrame, areas: gpd.GeoDataFrame, pois: gpd.GeoDataFrame,
    rules: ClassificationRules, overrides: pd.DataFrame | None, working_crs: str,
) -> gpd.GeoDataFrame:
    """Classify one partition of buildings and apply its overrides (a kernel).

    Parameters
    ----------
    buildings : GeoDataFrame
        One partition of the ingest buildings.
    areas, pois : GeoDataFrame
        Context layers in ``working_crs``.
    rules : ClassificationRules
        The rules.
    overrides : DataFrame or None
        The whole overrides table, already checked against all building
        ids (:func:`_check_overrides`); the rows of this partition apply.
    working_crs : str
        The metric working CRS the partition is brought into.

    Returns
    -------
    GeoDataFrame
        As :func:`classify_buildings`, with overrides applied.
    """
    if buildings.crs is not None and buildings.crs != working_crs:
        buildings = buildings.to_crs(working_crs)
    out = classify_buildings(buildings, areas, pois, rules)
    if overrides is not None and len(overrides):
        ids = overrides["building_id"].astype(str).str.strip()
        mine = overrides[ids.isin(set(out["building_id"].astype(str))).to_numpy()]
        out = apply_overrides(out, mine)
    return out


def _check_overrides(building_ids: pd.Series, overrides: pd.DataFrame) -> None:
    """Raise the errors :func:`apply_overrides` raises, against all building ids."""
    n = len(building_ids)
    probe = pd.DataFrame({"building_id": building_ids.to_numpy(),
                          "building_type": np.full(n, "unknown", dtype=object),
                          "type_source": np.full(n, "default", dtype=object),
                          "type_confidence": np.full(n, "low", dtype=object),
                          "type_evidence": np.full(n, "no evidence", dtype=object),
                          "type_conflict": np.full(n, None, dtype=object)})
    apply_overrides(probe, overrides)


def run(
    cfg: ClassifyConfig,
    buildings_in: Path,
    areas_in: Path,
    pois_in: Path,
    out: Path,
    base_dir: Path,
    working_crs: str,
) -> dict[str, Any]:
    """Run the classification stage.

    Parameters
    ----------
    cfg : ClassifyConfig
        The ``classify:`` config section.
    buildings_in, areas_in, pois_in : Path
        GeoParquet files from ingest; the areas and POI files may be absent.
    out : Path
        GeoParquet written (atomically) with the classified buildings.
    base_dir : Path
        Base for the config's relative paths.
    working_crs : str
        Metric working CRS (e.g. ``EPSG:32651``).

    Returns
    -------
    dict
        ``rows_in``, ``rows_out``, ``by_type`` and ``by_source`` counts,
        ``conflicts``, ``overrides``, ``seconds`` and ``output``.
    """
    start = time.perf_counter()
    base_dir = Path(base_dir)
    rules = load_rules(_resolve(cfg.rules_file, base_dir))
    from pipeline import incremental, parallel
    from pipeline.stream import (
        map_file,
        read_all,
        read_columns,
        read_partition,
        to_arrow,
        write_tables,
    )

    if read_partition(Path(buildings_in), []).crs is None:
        raise ClassificationError(f"{buildings_in}: GeoParquet without CRS")
    crs = gpd.GeoSeries([], crs=working_crs).crs
    areas = _concat(
        [
            _read_optional_parquet(Path(areas_in), ATTRIBUTE_COLUMNS, working_crs),
            load_area_layers(cfg.area_layers, working_crs, base_dir),
        ],
        working_crs,
    )
    pois = _concat(
        [
            _read_optional_parquet(Path(pois_in), [*ATTRIBUTE_COLUMNS, "poi_category"],
                                   working_crs),
            load_pois(cfg.poi_layers, working_crs, base_dir),
        ],
        working_crs,
    )
    areas = areas.set_crs(crs, allow_override=True)
    pois = pois.set_crs(crs, allow_override=True)
    overrides = None
    if cfg.overrides_file is not None:
        overrides = load_overrides(_resolve(cfg.overrides_file, base_dir))
        _check_overrides(read_columns(Path(buildings_in), ["building_id"])["building_id"],
                         overrides)
    log.info("classify: %d areas, %d POIs in", len(areas), len(pois))
    if incremental.active() is not None:
        # scheduled reruns: the partition cache works on whole frames (pipeline.incremental)
        buildings = read_all(Path(buildings_in))
        if buildings.crs != working_crs:
            buildings = buildings.to_crs(working_crs)
        whole = parallel.map_partitions(buildings, classify_buildings, areas, pois, rules)
        if overrides is not None:
            whole = apply_overrides(whole, overrides)
        keep = ["building_type", "type_source", "type_conflict"]
        rows_out, result = write_tables([to_arrow(whole)], Path(out), keep)
        rows_in = len(buildings)
    else:
        rows_in, rows_out, result = map_file(
            Path(buildings_in), Path(out), classify_partition, areas, pois, rules, overrides,
            working_crs, keep=("building_type", "type_source", "type_conflict"),
            label="classify")
    n_overrides = 0 if overrides is None else len(overrides)
    seconds = time.perf_counter() - start
    summary = {
        "rows_in": int(rows_in),
        "rows_out": int(rows_out),
        "by_type": {k: int(v) for k, v in result["building_type"].value_counts().items()},
        "by_source": {k: int(v) for k, v in result["type_source"].value_counts().items()},
        "conflicts": int(result["type_conflict"].notna().sum()),
        "overrides": n_overrides,
        "seconds": round(seconds, 3),
        "output": str(out),
    }
    log.info("classify: %d rows in, %d rows out, %d conflicts, %.2f s -> %s",
             summary["rows_in"], summary["rows_out"], summary["conflicts"], seconds, out)
    return summary
