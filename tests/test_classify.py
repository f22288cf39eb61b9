"""Hand-made cases for every rule table and trap of the building-type classifier."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import geopandas as gpd
import pandas as pd
import pytest
import shapely
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline import parallel
from pipeline.classify import (
    BUILDING_TYPES,
    OUTPUT_COLUMNS,
    AreaLayerConfig,
    ClassificationError,
    ClassifyConfig,
    PoiLayerConfig,
    apply_overrides,
    classify_buildings,
    conflicts_table,
    load_area_layers,
    load_overrides,
    load_pois,
    load_rules,
    lookup_land_use,
    match_name,
    run,
)
from pipeline.glossary import ATTRIBUTE_COLUMNS

ROOT = Path(__file__).resolve().parents[1]
RULES_PATH = ROOT / "configs" / "classification.yaml"
CRS = "EPSG:32651"
X0, Y0 = 350_000.0, 3_450_000.0  # central Shanghai in UTM 51N


@functools.cache
def _rules():
    return load_rules(RULES_PATH)


@pytest.fixture(scope="module")
def rules():
    return _rules()


def frame(rows: list[dict], crs: str = CRS, index=None) -> gpd.GeoDataFrame:
    """Canonical frame from dicts with 'geometry' and some attribute columns."""
    data = {c: pd.Series([r.get(c) for r in rows], dtype="str") for c in ATTRIBUTE_COLUMNS}
    extra = {k for r in rows for k in r} - set(ATTRIBUTE_COLUMNS) - {"geometry"}
    for key in sorted(extra):
        data[key] = pd.Series([r.get(key) for r in rows], dtype="str")
    out = gpd.GeoDataFrame(data, geometry=[r["geometry"] for r in rows], crs=crs)
    if "building_id" not in out.columns:
        out["building_id"] = [f"test:{i}" for i in range(len(out))]
    out["source"] = "test"
    out["source_id"] = [str(i) for i in range(len(out))]
    if out.crs is None or not out.crs.is_geographic:
        out["footprint_area_m2"] = out.geometry.area
    if index is not None:
        out.index = index
    return out


def box(i: int = 0, size: float = 20.0, dy: float = 0.0):
    x = X0 + i * 100.0
    return shapely.box(x, Y0 + dy, x + size, Y0 + dy + size)


def empty(crs: str = CRS) -> gpd.GeoDataFrame:
    return frame([], crs=crs)


def classify_one(rules, areas=None, pois=None, **attrs) -> pd.Series:
    b = frame([{"geometry": box(), **attrs}])
    out = classify_buildings(b, areas if areas is not None else empty(),
                             pois if pois is not None else empty(), rules)
    return out.iloc[0]


# --------------------------------------------------------------------------------- rules file
def test_rules_file_loads_and_lists_all_types(rules):
    assert sorted(rules.building_types) == sorted(BUILDING_TYPES)
    assert rules.names.rules and rules.tags.order


@pytest.mark.parametrize(
    "text, key",
    [
        ("tags: {order: [tag_building], tables: {tag_building: {school: skool}}}\n"
         "areas: {order: [], tables: {}}\n", "tags.tables.tag_building.school"),
        ("tags: {order: [tag_nonsense], tables: {}}\nareas: {order: [], tables: {}}\n",
         "tags"),
        ("tags: {order: [], tables: {}}\nareas: {order: [], tables: {}}\nfoo: 1\n", "foo"),
        ("tags: {order: [], tables: {}}\nareas: {order: [], tables: {}}\n"
         "names: {rules: [{id: x, type: school, pattern: '(('}]}\n", "names.rules[0].pattern"),
        ("tags: {order: [], tables: {}}\nareas: {order: [], tables: {}}\n"
         "land_use: {gb_prefix: {A3x: school}}\n", "land_use.gb_prefix"),
    ],
)
def test_bad_rules_file_names_file_and_key(tmp_path, text, key):
    path = tmp_path / "bad.yaml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ClassificationError) as err:
        load_rules(path)
    assert str(path) in str(err.value)
    assert key in str(err.value)


def test_rules_file_duplicate_key_and_missing_file(tmp_path):
    path = tmp_path / "dup.yaml"
    path.write_text("tags: {order: [], tables: {}}\ntags: {order: [], tables: {}}\n")
    with pytest.raises(ClassificationError, match="duplicate key 'tags'"):
        load_rules(path)
    with pytest.raises(ClassificationError, match="not found"):
        load_rules(tmp_path / "missing.yaml")


def test_config_models_forbid_extra_keys():
    with pytest.raises(ValueError):
        ClassifyConfig.model_validate({"rules_fle": "x.yaml"})
    with pytest.raises(ValueError, match="unknown canonical column"):
        AreaLayerConfig.model_validate({"path": "a.gpkg", "columns": {"landuse": "LU"}})
    cfg = ClassifyConfig.model_validate(
        {"poi_layers": [{"path": "p.geojson", "category_field": "type"}]}
    )
    assert cfg.rules_file == Path("configs/classification.yaml")


# --------------------------------------------------------------------------------- tags
@pytest.mark.parametrize(
    "attrs, expected, evidence",
    [
        ({"tag_building": "school"}, "school", "building=school"),
        ({"tag_building": "university"}, "school", "building=university"),
        ({"tag_building": "kindergarten"}, "school", "building=kindergarten"),
        ({"tag_building": "government"}, "government", "building=government"),
        ({"tag_building": "hospital"}, "hospital", "building=hospital"),
        ({"tag_building": "industrial"}, "factory", "building=industrial"),
        ({"tag_building": "manufacture"}, "factory", "building=manufacture"),
        ({"tag_building": "warehouse"}, "factory", "building=warehouse"),
        ({"tag_building": "office"}, "commercial", "building=office"),
        ({"tag_building": "retail"}, "commercial", "building=retail"),
        ({"tag_building": "apartments"}, "residential", "building=apartments"),
        ({"tag_building": "House"}, "residential", "building=house"),
        ({"tag_building": "church"}, "other_public", "building=church"),
        ({"tag_building": "civic"}, "other_public", "building=civic"),
        ({"tag_building": "yes", "tag_amenity": "school"}, "school", "amenity=school"),
        ({"tag_amenity": "clinic"}, "hospital", "amenity=clinic"),
        ({"tag_amenity": "townhall"}, "government", "amenity=townhall"),
        ({"tag_amenity": "police"}, "government", "amenity=police"),
        ({"tag_amenity": "courthouse"}, "government", "amenity=courthouse"),
        ({"tag_amenity": "library"}, "other_public", "amenity=library"),
        ({"tag_amenity": "bank"}, "commercial", "amenity=bank"),
        ({"tag_building": "house", "tag_amenity": "kindergarten"}, "school",
         "amenity=kindergarten"),
        ({"tag_office": "government"}, "government", "office=government"),
        ({"tag_government": "tax"}, "government", "government=tax"),
        ({"tag_government": "上海市科学技术协会"}, "government", "government=上海市科学技术协会"),
        ({"tag_industrial": "brewery"}, "factory", "industrial=brewery"),
        ({"tag_landuse": "industrial"}, "factory", "landuse=industrial"),
        ({"tag_building_use": "office", "tag_building": "skyscraper"}, "commercial",
         "building:use=office"),
        ({"tag_shop": "mall"}, "commercial", "shop=mall"),
        ({"tag_building": "school;yes"}, "school", "building=school"),
        ({"subtype_field": "education"}, "school", "subtype=education"),
        ({"subtype_field": "medical"}, "hospital", "subtype=medical"),
        ({"subtype_field": "industrial"}, "factory", "subtype=industrial"),
        ({"subtype_field": "civic"}, "other_public", "subtype=civic"),
        ({"subtype_field": "civic", "class_field": "government"}, "government",
         "class=government"),
    ],
)
def test_explicit_tags(rules, attrs, expected, evidence):
    row = classify_one(rules, **attrs)
    assert row["building_type"] == expected
    assert row["type_source"] == "tag"
    assert row["type_confidence"] == "high"
    assert row["type_evidence"] == evidence


def test_building_yes_is_no_evidence(rules):
    row = classify_one(rules, tag_building="yes")
    assert (row["building_type"], row["type_source"], row["type_confidence"]) == (
        "unknown", "default", "low")
    row = classify_one(rules, tag_building="yes", name="静安区第一中学")
    assert (row["building_type"], row["type_source"]) == ("school", "name")


def test_tag_is_never_overridden_by_weaker_evidence(rules):
    areas = frame([{"geometry": box(0, size=200, dy=-90), "tag_amenity": "school",
                    "name": "某中学校园"}])
    pois = frame([{"geometry": box().centroid, "poi_category": "医院", "name": "某医院"}])
    row = classify_one(rules, areas=areas, pois=pois, tag_building="residential",
                       name="第一中学")
    assert row["building_type"] == "residential"
    assert row["type_source"] == "tag"
    for part in ("containing_area: school", "poi: hospital", "name: school"):
        assert part in row["type_conflict"]


def test_agreeing_evidence_is_no_conflict(rules):
    row = classify_one(rules, tag_amenity="school", name="第一中学")
    assert row["building_type"] == "school"
    assert pd.isna(row["type_conflict"])


# --------------------------------------------------------------------------------- land use
@pytest.mark.parametrize(
    "code, expected",
    [
        ("A1", "government"), ("A2", "other_public"), ("A21", "other_public"),
        ("A3", "school"), ("A31", "school"), ("A33", "school"), ("A331", "school"),
        ("A35", "other_public"), ("A4", "other_public"), ("A5", "hospital"),
        ("A51", "hospital"), ("A6", "other_public"), ("A9", "other_public"),
        ("B1", "commercial"), ("B29", "commercial"), ("M1", "factory"), ("m2", "factory"),
        ("M3", "factory"), ("W1", "factory"), ("W3", "factory"), ("R2", "residential"),
        ("S3", "other"), ("U12", "other"), ("B1/R2", "commercial"),
        ("Administration", "other_public"), ("Industry", "factory"), ("Office", "commercial"),
        ("Commercial", "commercial"), ("Residential_1", "residential"),
        ("residential_3", "residential"), ("Transport", "other"), ("行政办公用地", "government"),
        ("工业用地", "factory"),
    ],
)
def test_land_use_codes(rules, code, expected):
    hit = lookup_land_use(code, rules)
    assert hit is not None and hit[0].type == expected
    row = classify_one(rules, land_use_code=code)
    assert (row["building_type"], row["type_source"], row["type_confidence"]) == (
        expected, "survey_code", "high")


@pytest.mark.parametrize("code", ["Rubbish", "X9", "", "A12345", "residential_9"])
def test_unknown_land_use_codes_carry_no_evidence(rules, code):
    assert lookup_land_use(code, rules) is None


@pytest.mark.parametrize(
    "name, expected, source",
    [
        ("上海市应急管理局", "government", "survey_code+name"),
        ("浦东海关", "government", "survey_code+name"),
        ("武宁中学", "school", "survey_code+name"),
        ("上海大学宝山校区东区图书馆", "school", "survey_code+name"),
        ("某区中心医院", "hospital", "survey_code+name"),
        ("上海少年宫", "other_public", "survey_code"),
        ("上海电气集团总公司", "other_public", "survey_code"),  # not a refinement target
        (None, "other_public", "survey_code"),
    ],
)
def test_administration_refined_by_name(rules, name, expected, source):
    row = classify_one(rules, land_use_code="Administration", name=name)
    assert (row["building_type"], row["type_source"], row["type_confidence"]) == (
        expected, source, "high")
    if source == "survey_code+name":
        assert "land_use_code=Administration + name keyword" in row["type_evidence"]
        assert pd.isna(row["type_conflict"])


def test_survey_code_is_not_contradicted_by_name(rules):
    row = classify_one(rules, land_use_code="Industry", name="某中学")
    assert row["building_type"] == "factory"
    assert row["type_source"] == "survey_code"
    assert "name: school" in row["type_conflict"]
    row = classify_one(rules, land_use_code="Residential_1", name="同济大学四平路校区A52号楼")
    assert row["building_type"] == "residential"


def test_tag_beats_survey_code(rules):
    row = classify_one(rules, tag_building="school", land_use_code="M1")
    assert row["building_type"] == "school"
    assert "survey_code: factory" in row["type_conflict"]


# --------------------------------------------------------------------------------- areas
def test_containing_area_school_campus(rules):
    campus = {"geometry": box(0, size=300, dy=-100), "tag_amenity": "school",
              "name": "上海盲童学校"}
    row = classify_one(rules, areas=frame([campus]), tag_building="yes", name="A楼")
    assert (row["building_type"], row["type_source"], row["type_confidence"]) == (
        "school", "containing_area", "medium")
    assert row["type_evidence"] == "amenity=school area '上海盲童学校'"


@pytest.mark.parametrize(
    "tags, expected",
    [
        ({"tag_amenity": "hospital"}, "hospital"),
        ({"tag_amenity": "university"}, "school"),
        ({"tag_office": "government"}, "government"),
        ({"tag_amenity": "townhall"}, "government"),
        ({"tag_landuse": "industrial"}, "factory"),
        ({"tag_landuse": "residential"}, "residential"),
        ({"land_use_code": "A33"}, "school"),
        ({"land_use_code": "M1"}, "factory"),
        ({"tag_landuse": "grass"}, "unknown"),
    ],
)
def test_containing_area_tables(rules, tags, expected):
    area = {"geometry": box(0, size=300, dy=-100), **tags}
    row = classify_one(rules, areas=frame([area]))
    assert row["building_type"] == expected


def test_smallest_containing_area_wins(rules):
    big = {"geometry": box(0, size=1000, dy=-500), "tag_landuse": "residential",
           "name": "大社区"}
    small = {"geometry": box(0, size=200, dy=-90), "tag_amenity": "kindergarten",
             "name": "小幼儿园"}
    untyped = {"geometry": box(0, size=50, dy=-10), "tag_landuse": "grass"}
    row = classify_one(rules, areas=frame([big, small, untyped]))
    assert row["building_type"] == "school"
    assert "小幼儿园" in row["type_evidence"]
    assert "containing_area: residential" in row["type_conflict"]


def test_area_not_containing_centroid_is_ignored(rules):
    area = {"geometry": box(5, size=300), "tag_amenity": "school"}
    assert classify_one(rules, areas=frame([area]))["building_type"] == "unknown"


def test_area_beats_poi_and_name(rules):
    area = {"geometry": box(0, size=300, dy=-100), "tag_landuse": "industrial"}
    pois = frame([{"geometry": box().centroid, "poi_category": "公司企业"}])
    row = classify_one(rules, areas=frame([area]), pois=pois, name="某小区1号楼")
    assert row["building_type"] == "factory"
    assert "poi: commercial" in row["type_conflict"]
    assert "name: residential" in row["type_conflict"]


# --------------------------------------------------------------------------------- POIs
@pytest.mark.parametrize(
    "category, expected",
    [
        ("政府机构", "government"), ("学校", "school"), ("医院", "hospital"),
        ("工厂", "factory"), ("公司企业", "commercial"),
        ("科教文化服务;学校;中学", "school"), ("公司企业;工厂", "factory"),
        ("医疗保健服务;综合医院;三级甲等医院", "hospital"), ("科教文化服务;驾校", "commercial"),
        ("amenity=school", "school"), ("School", "school"), ("tourism=museum", "other_public"),
        ("餐饮服务;中餐厅", "unknown"),
    ],
)
def test_poi_categories(rules, category, expected):
    pois = frame([{"geometry": box().centroid, "poi_category": category, "name": "点"}])
    row = classify_one(rules, pois=pois)
    assert row["building_type"] == expected
    if expected != "unknown":
        assert (row["type_source"], row["type_confidence"]) == ("poi", "medium")


def test_poi_from_tag_columns_and_majority(rules):
    pts = [
        {"geometry": shapely.Point(X0 + 5, Y0 + 5), "tag_amenity": "school", "name": "甲"},
        {"geometry": shapely.Point(X0 + 6, Y0 + 6), "poi_category": "学校", "name": "乙"},
        {"geometry": shapely.Point(X0 + 7, Y0 + 7), "poi_category": "银行", "name": "丙"},
        {"geometry": shapely.Point(X0 + 500, Y0 + 7), "poi_category": "医院"},  # outside
    ]
    row = classify_one(rules, pois=frame(pts))
    assert row["building_type"] == "school"
    assert "(+1 more)" in row["type_evidence"]
    assert "poi: commercial" in row["type_conflict"]
    assert "hospital" not in row["type_conflict"]


# --------------------------------------------------------------------------------- names
@pytest.mark.parametrize(
    "name, expected",
    [
        # plain keywords
        ("上海市人民政府", "government"), ("徐汇区政府", "government"),
        ("卢湾区政府2号楼", "government"), ("上海市应急管理局", "government"),
        ("虹口区体育局", "government"), ("上海海关", "government"),
        ("静安区人民法院", "government"),
        ("某街道办事处", "government"), ("上海市公安局", "government"),
        ("武宁中学", "school"), ("上海市金沙江路小学", "school"), ("复旦大学", "school"),
        ("上海体育学院", "school"), ("阳光幼儿园", "school"),
        ("市眼科医院", "hospital"), ("某镇卫生院", "hospital"), ("社区卫生服务中心", "hospital"),
        ("上海第三钢铁厂", "factory"), ("某某工厂", "factory"), ("汽车制造车间", "factory"),
        ("厂房出租", "factory"),
        ("Pudong Government Office", "government"), ("Shanghai No. 2 Middle School", "school"),
        ("Huashan Hospital", "hospital"), ("Shanghai Cotton Mill", "factory"),
        # traps: shops named with 学校
        ("驾驶学校", "commercial"), ("东方驾驶学校报名点", "commercial"),
        ("学校门口小卖部", "commercial"), ("阳光校服店", "commercial"),
        ("新东方培训学校", "commercial"),
        ("Happy Driving School", "commercial"),
        # traps: streets and compounds
        ("大学路248号", "unknown"), ("大学路", "unknown"), ("政府路88号", "unknown"),
        ("政府街12号", "unknown"), ("大学里3号楼", "unknown"), ("大学路小学", "school"),
        ("University Road 5", "unknown"),
        # traps: industrial parks, former sites, museums, dormitories
        ("漕河泾工业园A座", "commercial"), ("张江高科技产业园1号楼", "commercial"),
        ("红坊创意园", "commercial"), ("福新面粉一厂旧址", "other"),
        ("曾为黄浦区人民政府大楼", "other"),
        ("江南造船厂博物馆", "other_public"), ("沪西工人半日学校史料陈列馆", "other_public"),
        ("某纪念馆", "other_public"), ("上海电筒厂职工宿舍", "residential"),
        ("同济中学 (原上海图书馆)", "school"), ("同济中学（原上海图书馆）", "school"),
        ("Former East Asia Bank", "unknown"),
        # traps: 局 that is no government
        ("上海邮政总局大楼", "unknown"), ("某邮局", "unknown"), ("中华书局", "unknown"),
        ("上海市中华路电话局", "unknown"),
        # traditional characters
        ("上海市第一中學", "school"), ("盲童學校", "school"), ("區政府", "government"),
        ("仁濟醫院", "hospital"), ("江南造船廠", "factory"), ("北京大學", "school"),
        ("福新麵粉一廠舊址", "other"),
        # full-width characters
        ("ＸＸ中学", "school"),
    ],
)
def test_name_keywords_and_traps(rules, name, expected):
    row = classify_one(rules, name=name)
    assert row["building_type"] == expected, row["type_evidence"]
    if expected != "unknown":
        assert (row["type_source"], row["type_confidence"]) == ("name", "low")
        assert "keyword" in row["type_evidence"]


def test_addr_street_is_not_a_name(rules):
    row = classify_one(rules, addr_street="大学路", name=None)
    assert row["building_type"] == "unknown"
    row = classify_one(rules, addr_street="政府路", name="某某公寓")
    assert row["building_type"] == "residential"


def test_name_en_only_when_name_gives_nothing(rules):
    row = classify_one(rules, name="某楼", name_en="Shanghai Middle School")
    assert row["building_type"] == "school"
    assert "name_en keyword" in row["type_evidence"]
    row = classify_one(rules, name="某公寓", name_en="Shanghai Middle School")
    assert row["building_type"] == "residential"


def test_match_name_returns_rule_and_text(rules):
    assert match_name("武宁中学", rules) == ("school", "school", "中学")
    assert match_name(None, rules) is None
    assert match_name("   ", rules) is None


# --------------------------------------------------------------------------------- kernel
def test_crs_checks(rules):
    b = frame([{"geometry": box()}])
    with pytest.raises(ValueError, match="differs"):
        classify_buildings(b, empty("EPSG:3857"), empty(), rules)
    with pytest.raises(ValueError, match="no CRS"):
        classify_buildings(b, empty(), frame([], crs=None), rules)
    with pytest.raises(ValueError, match="geographic"):
        g = b.to_crs("EPSG:4326")
        classify_buildings(g, empty("EPSG:4326"), empty("EPSG:4326"), rules)


def test_empty_frame_and_index_kept(rules):
    out = classify_buildings(empty(), empty(), empty(), rules)
    assert len(out) == 0
    for col in OUTPUT_COLUMNS:
        assert col in out.columns
    b = frame([{"geometry": box(0), "name": "武宁中学"}, {"geometry": box(1)},
               {"geometry": None, "name": "某医院"}], index=pd.Index([30, 10, 20]))
    out = classify_buildings(b, empty(), empty(), rules)
    assert list(out.index) == [30, 10, 20]
    assert list(out["building_type"]) == ["school", "unknown", "hospital"]
    assert str(out["building_type"].dtype) == str(classify_buildings(
        empty(), empty(), empty(), rules)["building_type"].dtype)
    assert out.crs == b.crs


def test_missing_attribute_columns_count_as_null(rules):
    b = gpd.GeoDataFrame({"name": ["第一中学"]}, geometry=[box()], crs=CRS)
    out = classify_buildings(b, empty(), empty(), rules)
    assert out["building_type"].iloc[0] == "school"


def _town(n: int = 40) -> tuple[gpd.GeoDataFrame, gpd.GeoDataFrame, gpd.GeoDataFrame]:
    names = ["武宁中学", "某医院", None, "政府路1号", "某小区3号楼", "工业园A座", "旧址"]
    rows = []
    for i in range(n):
        rows.append({"geometry": shapely.box(X0 + (i % 8) * 60, Y0 + (i // 8) * 60,
                                             X0 + (i % 8) * 60 + 30, Y0 + (i // 8) * 60 + 30),
                     "name": names[i % len(names)],
                     "tag_building": "industrial" if i % 11 == 0 else "yes"})
    areas = frame([{"geometry": shapely.box(X0 - 10, Y0 - 10, X0 + 200, Y0 + 130),
                    "tag_amenity": "school", "name": "校园"},
                   {"geometry": shapely.box(X0 + 250, Y0 + 100, X0 + 500, Y0 + 400),
                    "land_use_code": "M1"}])
    pois = frame([{"geometry": shapely.Point(X0 + 15 + 60 * k, Y0 + 200),
                   "poi_category": ["学校", "医院", "政府机构"][k % 3]} for k in range(8)])
    return frame(rows), areas, pois


def test_map_partitions_threads_equals_direct_call(rules):
    b, areas, pois = _town()
    direct = classify_buildings(b, areas, pois, rules)
    with parallel.scheduler_context("threads", n_workers=3, npartitions=3):
        par = parallel.map_partitions(b, classify_buildings, areas, pois, rules)
    pd.testing.assert_frame_equal(pd.DataFrame(par[list(OUTPUT_COLUMNS)]),
                                  pd.DataFrame(direct[list(OUTPUT_COLUMNS)]))
    assert set(direct["type_source"]) >= {"tag", "containing_area", "poi", "name", "default"}


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.text(alphabet="学校政府厂局医院路街旧址博物馆宿舍大學里园号楼 abcSchool()（）",
                        max_size=12) | st.none(), min_size=1, max_size=5))
def test_any_name_gives_a_valid_type(names):
    rules = _rules()
    b = frame([{"geometry": box(i), "name": n} for i, n in enumerate(names)])
    out = classify_buildings(b, empty(), empty(), rules)
    assert set(out["building_type"]) <= set(BUILDING_TYPES)
    assert out["type_confidence"].notna().all()


# --------------------------------------------------------------------------------- overrides
def _classified(rules):
    b = frame([{"geometry": box(0), "name": "武宁中学", "building_id": "osm:way/1"},
               {"geometry": box(1), "name": "某小区", "building_id": "osm:way/2"}])
    return classify_buildings(b, empty(), empty(), rules)


def test_apply_overrides(tmp_path, rules):
    csv = tmp_path / "overrides.csv"
    csv.write_text("building_id,building_type,note\nosm:way/1,government,"
                   "checked on site 2025\n", encoding="utf-8")
    out = apply_overrides(_classified(rules), load_overrides(csv))
    row = out.iloc[0]
    assert (row["building_type"], row["type_source"], row["type_confidence"]) == (
        "government", "override", "high")
    assert "checked on site 2025" in row["type_evidence"]
    assert "name: school" in row["type_conflict"]
    assert out.iloc[1]["type_source"] == "name"
    table = conflicts_table(out)
    assert list(table["building_id"]) == ["osm:way/1"]
    assert "geometry" not in table.columns


@pytest.mark.parametrize(
    "body, message",
    [
        ("osm:way/9,school,x\n", "line 2 (building_id='osm:way/9'): no building with this id"),
        ("osm:way/1,skool,x\n", "unknown building_type 'skool'"),
        ("osm:way/1,school,a\nosm:way/1,factory,b\n", "already overridden on line 2"),
    ],
)
def test_override_errors_name_file_row_and_fix(tmp_path, rules, body, message):
    csv = tmp_path / "overrides.csv"
    csv.write_text("building_id,building_type,note\n" + body, encoding="utf-8")
    with pytest.raises(ClassificationError) as err:
        apply_overrides(_classified(rules), load_overrides(csv))
    assert str(csv) in str(err.value)
    assert message in str(err.value)


def test_overrides_file_needs_header(tmp_path):
    csv = tmp_path / "o.csv"
    csv.write_text("id,type\n1,school\n")
    with pytest.raises(ClassificationError, match="building_id,building_type,note"):
        load_overrides(csv)


# --------------------------------------------------------------------------------- loaders, run
def _write_inputs(tmp_path: Path) -> tuple[Path, gpd.GeoDataFrame]:
    rows = [
        {"geometry": box(0), "name": "A楼", "building_id": "t:0"},   # inside the land-use parcel
        {"geometry": box(3), "name": "B楼", "building_id": "t:1"},   # has a POI inside
        {"geometry": box(6), "name": "某小区", "building_id": "t:2"},  # overridden
        {"geometry": box(9), "tag_building": "industrial", "building_id": "t:3"},
    ]
    b = frame(rows)
    path = tmp_path / "ingest_buildings.parquet"
    b.to_parquet(path)
    return path, b


def test_run_end_to_end_with_layers_and_overrides(tmp_path, rules):
    buildings_in, b = _write_inputs(tmp_path)
    # a land-use layer with GB codes, GeoPackage, own field names, no CRS declared
    parcels = gpd.GeoDataFrame(
        {"YDDM": ["A33", "R2"], "DKMC": ["某中学用地", "某居住用地"]},
        geometry=[box(0, size=200, dy=-90), box(20, size=200, dy=-90)], crs=None)
    gpkg = tmp_path / "landuse.gpkg"
    with pytest.warns(UserWarning, match="crs"):
        parcels.to_file(gpkg, layer="parcels")
    # a POI layer in WGS84 GeoJSON
    centre = gpd.GeoSeries([box(3).centroid], crs=CRS).to_crs("EPSG:4326").iloc[0]
    geojson = tmp_path / "pois.geojson"
    geojson.write_text(json.dumps({"type": "FeatureCollection", "features": [
        {"type": "Feature", "properties": {"type": "医疗保健服务;综合医院", "title": "某医院"},
         "geometry": {"type": "Point", "coordinates": [centre.x, centre.y]}}]}),
        encoding="utf-8")
    overrides = tmp_path / "overrides.csv"
    overrides.write_text("building_id,building_type,note\nt:2,government,"
                         "街道办事处 in a converted block\n", encoding="utf-8")
    rules_copy = tmp_path / "rules" / "classification.yaml"
    rules_copy.parent.mkdir()
    rules_copy.write_text(RULES_PATH.read_text(encoding="utf-8"), encoding="utf-8")
    cfg = ClassifyConfig.model_validate({
        "rules_file": "rules/classification.yaml",       # relative to base_dir
        "overrides_file": "overrides.csv",
        "poi_layers": [{"path": "pois.geojson", "category_field": "type",
                        "name_field": "title"}],
        "area_layers": [{"path": "landuse.gpkg", "layer": "parcels",
                         "columns": {"land_use_code": "YDDM", "name": "DKMC"},
                         "crs_if_missing": CRS}],
    })
    out = tmp_path / "out" / "classify_buildings.parquet"
    summary = run(cfg, buildings_in, tmp_path / "absent_areas.parquet",
                  tmp_path / "absent_pois.parquet", out, tmp_path, CRS)
    result = gpd.read_parquet(out).set_index("building_id")
    assert summary["rows_in"] == summary["rows_out"] == 4
    assert result.loc["t:0", "building_type"] == "school"
    assert result.loc["t:0", "type_source"] == "containing_area"
    assert "某中学用地" in result.loc["t:0", "type_evidence"]
    assert result.loc["t:1", "building_type"] == "hospital"
    assert result.loc["t:1", "type_source"] == "poi"
    assert result.loc["t:2", "type_source"] == "override"
    assert result.loc["t:3", "building_type"] == "factory"
    assert summary["by_source"] == {"containing_area": 1, "poi": 1, "override": 1, "tag": 1}
    assert summary["by_type"]["government"] == 1
    assert summary["overrides"] == 1
    assert result.crs == b.crs
    assert not list(out.parent.glob("*.tmp"))


def test_run_without_extra_layers(tmp_path):
    buildings_in, _ = _write_inputs(tmp_path)
    cfg = ClassifyConfig(rules_file=RULES_PATH)
    out = tmp_path / "c.parquet"
    summary = run(cfg, buildings_in, tmp_path / "a.parquet", tmp_path / "p.parquet", out,
                  tmp_path, CRS)
    assert summary["by_type"] == {"unknown": 2, "residential": 1, "factory": 1}


def test_area_layer_without_crs_is_an_error(tmp_path):
    parcels = gpd.GeoDataFrame({"code": ["A1"]}, geometry=[box(0)], crs=None)
    path = tmp_path / "lu.gpkg"
    with pytest.warns(UserWarning, match="crs"):
        parcels.to_file(path)
    cfg = AreaLayerConfig(path=Path("lu.gpkg"), columns={"land_use_code": "code"})
    with pytest.raises(ClassificationError, match="no CRS; set crs_if_missing"):
        load_area_layers([cfg], CRS, tmp_path)
    bad = AreaLayerConfig(path=Path("lu.gpkg"), columns={"land_use_code": "CODE_X"},
                          crs_if_missing=CRS)
    with pytest.raises(ClassificationError, match="'CODE_X'"):
        load_area_layers([bad], CRS, tmp_path)
    ok = load_area_layers([bad.model_copy(update={"columns": {"land_use_code": "code"}})],
                          CRS, tmp_path)
    assert list(ok["land_use_code"]) == ["A1"] and ok.crs == CRS


def test_poi_layer_errors_and_empty(tmp_path):
    assert len(load_pois([], CRS, tmp_path)) == 0
    with pytest.raises(ClassificationError, match="not found"):
        load_pois([PoiLayerConfig(path=Path("nope.geojson"), category_field="c")], CRS, tmp_path)
    path = tmp_path / "p.geojson"
    path.write_text(json.dumps({"type": "FeatureCollection", "features": [
        {"type": "Feature", "properties": {"kind": "学校"},
         "geometry": {"type": "Point", "coordinates": [121.47, 31.23]}}]}))
    with pytest.raises(ClassificationError, match="'category'"):
        load_pois([PoiLayerConfig(path=path, category_field="category")], CRS, tmp_path)
    pois = load_pois([PoiLayerConfig(path=path, category_field="kind")], CRS, tmp_path)
    assert list(pois["poi_category"]) == ["学校"] and pois.crs == CRS
