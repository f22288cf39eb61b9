"""Default QGIS styles for the GeoPackage layers (QML in the ``layer_styles`` table).

QGIS reads a layer's default style from the GeoPackage table ``layer_styles``
(the table QGIS itself writes with "Save as Default → Datasource Database"):
for a layer it takes the row with ``f_table_schema = ''``, its
``f_table_name`` and ``f_geometry_column`` (``''`` for attribute tables),
preferring ``useAsDefault``, and applies the QML in ``styleQML``. So the
planner opening ``rooftop_pv.gpkg`` sees, without styling anything:

- ``buildings``: categorised by ``building_type`` (bilingual legend), each
  roof shaded by ``capacity_kwp`` (fill opacity grows with capacity);
- ``districts``: coloured by target verdict, labelled with the Chinese name and
  achievable / required MW;
- ``rejected``: grey (polygons, lines and points alike);
- ``target_plan``: the roofs that reach each target outlined, with their rank;
- ``towns``, ``existing_pv``: outlined, labelled;
- every layer and table: field aliases from :mod:`pipeline.glossary`, with
  units.

Symbol-layer properties are written as ``<prop k= v=>`` elements, which all
QGIS 3 versions read.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from datetime import UTC, datetime

import pandas as pd

from pipeline.glossary import describe

#: Colour (r, g, b) and bilingual legend label of each building type.
TYPE_STYLE: dict[str, tuple[tuple[int, int, int], str]] = {
    "government": ((215, 48, 39), "government 党政机关"),
    "school": ((244, 109, 67), "school 学校"),
    "hospital": ((231, 41, 138), "hospital 医院"),
    "other_public": ((253, 174, 97), "other public 其他公共建筑"),
    "factory": ((69, 117, 180), "factory 工业厂房"),
    "commercial": ((116, 173, 209), "commercial 商业"),
    "residential": ((166, 217, 106), "residential 住宅"),
    "other": ((190, 174, 212), "other 其他"),
    "unknown": ((189, 189, 189), "unknown 未分类"),
}

#: Colour (r, g, b, a) and legend label of each district verdict.
NO_TARGET = "no target"
VERDICT_STYLE: dict[str, tuple[tuple[int, int, int, int], str]] = {
    "reachable": ((26, 152, 80, 90), "target reachable 目标可达成"),
    "not reachable from the buildings in the input": (
        (215, 48, 39, 90), "target not reachable from the input 输入建筑不足以达成"),
    "no eligible buildings in the input": (
        (253, 174, 97, 90), "no eligible buildings in the input 输入中无符合条件的建筑"),
    NO_TARGET: ((240, 240, 240, 90), "no target configured 未设目标"),
}

#: QGIS label font (Chinese glyphs): the family of the font ``make fonts`` installs.
LABEL_FONT = "WenQuanYi Micro Hei"
QML_VERSION = "3.22.16-Białowieża"


def _rgba(rgb: tuple[int, ...], alpha: int = 255) -> str:
    return ",".join(str(v) for v in (*rgb[:3], rgb[3] if len(rgb) > 3 else alpha))


def _root() -> ET.Element:
    return ET.Element("qgis", {"version": QML_VERSION, "styleCategories": "AllStyleCategories",
                               "labelsEnabled": "0"})


def _props(layer: ET.Element, props: dict[str, str]) -> None:
    for k, v in props.items():
        ET.SubElement(layer, "prop", {"k": k, "v": v})


def _data_defined(parent: ET.Element, props: dict[str, str]) -> None:
    """``<data_defined_properties>``: property name to QGIS expression."""
    dd = ET.SubElement(parent, "data_defined_properties")
    coll = ET.SubElement(dd, "Option", {"type": "Map"})
    ET.SubElement(coll, "Option", {"type": "QString", "name": "name", "value": ""})
    pmap = ET.SubElement(coll, "Option", {"type": "Map", "name": "properties"})
    for name, expr in props.items():
        p = ET.SubElement(pmap, "Option", {"type": "Map", "name": name})
        ET.SubElement(p, "Option", {"type": "bool", "name": "active", "value": "true"})
        ET.SubElement(p, "Option", {"type": "QString", "name": "expression", "value": expr})
        ET.SubElement(p, "Option", {"type": "int", "name": "type", "value": "3"})
    ET.SubElement(coll, "Option", {"type": "QString", "name": "type", "value": "collection"})


def _symbol(parent: ET.Element, name: str, kind: str, fill: str, outline: str,
            width_mm: float, dd: dict[str, str] | None = None, style: str = "solid"
            ) -> ET.Element:
    """A one-layer fill, line or marker symbol."""
    sym = ET.SubElement(parent, "symbol", {"type": kind, "name": name, "alpha": "1",
                                           "clip_to_extent": "1", "force_rhr": "0"})
    if kind == "fill":
        layer = ET.SubElement(sym, "layer", {"class": "SimpleFill", "enabled": "1",
                                             "locked": "0", "pass": "0"})
        _props(layer, {"color": fill, "style": style, "outline_color": outline,
                       "outline_style": "solid", "outline_width": f"{width_mm:g}",
                       "outline_width_unit": "MM", "joinstyle": "bevel"})
    elif kind == "line":
        layer = ET.SubElement(sym, "layer", {"class": "SimpleLine", "enabled": "1",
                                             "locked": "0", "pass": "0"})
        _props(layer, {"line_color": outline, "line_style": "solid",
                       "line_width": f"{width_mm:g}", "line_width_unit": "MM"})
    else:
        layer = ET.SubElement(sym, "layer", {"class": "SimpleMarker", "enabled": "1",
                                             "locked": "0", "pass": "0"})
        _props(layer, {"name": "circle", "color": fill, "outline_color": outline,
                       "outline_width": "0.2", "outline_width_unit": "MM", "size": "1.6",
                       "size_unit": "MM"})
    _data_defined(layer, dd or {})
    return sym


def _aliases(root: ET.Element, columns: list[str]) -> None:
    """``<aliases>`` from the glossary: description with its unit."""
    al = ET.SubElement(root, "aliases")
    for i, col in enumerate(columns):
        text = describe(col)
        if text:
            ET.SubElement(al, "alias", {"field": col, "index": str(i), "name": text})


def _labeling(root: ET.Element, expression: str, size_pt: float = 10.0,
              placement: str = "1") -> None:
    """Simple labelling by an expression in the CJK font, with a white buffer."""
    root.set("labelsEnabled", "1")
    lab = ET.SubElement(root, "labeling", {"type": "simple"})
    st = ET.SubElement(lab, "settings", {"calloutType": "simple"})
    ts = ET.SubElement(st, "text-style", {
        "fieldName": expression, "isExpression": "1", "fontFamily": LABEL_FONT,
        "namedStyle": "Regular", "fontSize": f"{size_pt:g}", "fontSizeUnit": "Point",
        "textColor": "20,20,20,255", "textOpacity": "1", "multilineHeight": "1",
        "fontWeight": "50", "fontItalic": "0", "previewBkgrdColor": "255,255,255,255"})
    ET.SubElement(ts, "text-buffer", {"bufferDraw": "1", "bufferSize": "0.8",
                                      "bufferSizeUnits": "MM", "bufferColor": "255,255,255,255",
                                      "bufferOpacity": "0.85", "bufferJoinStyle": "128"})
    ET.SubElement(st, "text-format", {"wrapChar": "", "multilineAlign": "1",
                                      "autoWrapLength": "0", "plussign": "0"})
    ET.SubElement(st, "placement", {"placement": placement, "centroidInside": "1",
                                    "centroidWhole": "0", "fitInPolygonOnly": "0",
                                    "overrunDistance": "0", "dist": "0",
                                    "placementFlags": "10", "priority": "5"})
    ET.SubElement(st, "rendering", {"obstacle": "1", "displayAll": "1", "drawLabels": "1",
                                    "scaleVisibility": "0", "upsidedownLabels": "0",
                                    "limitNumLabels": "0", "mergeLines": "0",
                                    "labelPerPart": "0", "fontMinPixelSize": "3",
                                    "fontLimitPixelSize": "0", "zIndex": "0"})


def _categorized(root: ET.Element, attr: str, cats: list[tuple[str, str, dict]]) -> None:
    """Categorised renderer: ``(value, label, symbol kwargs)`` per category."""
    r = ET.SubElement(root, "renderer-v2", {"type": "categorizedSymbol", "attr": attr,
                                            "symbollevels": "0", "enableorderby": "0",
                                            "forceraster": "0"})
    cel = ET.SubElement(r, "categories")
    sel = ET.SubElement(r, "symbols")
    for i, (value, label, sym) in enumerate(cats):
        ET.SubElement(cel, "category", {"render": "true", "symbol": str(i), "value": value,
                                        "label": label})
        _symbol(sel, str(i), **sym)


def _to_text(root: ET.Element) -> str:
    ET.indent(root)
    return "<!DOCTYPE qgis PUBLIC 'http://mrcc.com/qgis.dtd' 'SYSTEM'>\n" + ET.tostring(
        root, encoding="unicode")


def buildings_qml(columns: list[str], capacity_high_kwp: float) -> str:
    """Buildings: categorised by type, fill opacity graded by capacity.

    Parameters
    ----------
    columns : list of str
        The layer's fields (for the aliases).
    capacity_high_kwp : float
        Capacity at which a roof reaches full opacity [kWp] (e.g. the 95th
        percentile); roofs without capacity are faint.

    Returns
    -------
    str
        The QML document.
    """
    root = _root()
    hi = max(float(capacity_high_kwp), 1.0)
    cats = []
    for value, (rgb, label) in TYPE_STYLE.items():
        r, g, b = rgb
        dd = {"fillColor": (f"color_rgba({r},{g},{b},scale_linear(coalesce(\"capacity_kwp\",0),"
                            f"0,{hi:.1f},90,255))")}
        cats.append((value, label, {"kind": "fill", "fill": _rgba(rgb), "outline":
                                    _rgba(tuple(int(c * 0.6) for c in rgb)), "width_mm": 0.15,
                                    "dd": dd}))
    _categorized(root, "building_type", cats)
    _aliases(root, columns)
    return _to_text(root)


def districts_qml(columns: list[str]) -> str:
    """Districts: coloured by target verdict, labelled in Chinese with MW.

    Parameters
    ----------
    columns : list of str
        The layer's fields.

    Returns
    -------
    str
        The QML document.
    """
    root = _root()
    cats = [(value, label, {"kind": "fill", "fill": _rgba(rgba), "outline": "60,60,60,255",
                            "width_mm": 0.4})
            for value, (rgba, label) in VERDICT_STYLE.items()]
    _categorized(root, f"coalesce(\"target_verdict\", '{NO_TARGET}')", cats)
    _labeling(root, "\"district_name\" || if(\"target_required_mw\" IS NULL, '', "
              "'\\n' || format_number(\"target_achievable_mw\", 1) || ' / ' || "
              "format_number(\"target_required_mw\", 0) || ' MW')", size_pt=10)
    _aliases(root, columns)
    return _to_text(root)


def rejected_qml(columns: list[str]) -> str:
    """Rejected features: grey polygons, lines and points (a rule per geometry type).

    Parameters
    ----------
    columns : list of str
        The layer's fields.

    Returns
    -------
    str
        The QML document.
    """
    return _by_geometry(columns, "150,150,150,110", "110,110,110,255", "rejected 未采用")


def existing_pv_qml(columns: list[str]) -> str:
    """Existing and planned PV systems: dark blue, points or outlines.

    Parameters
    ----------
    columns : list of str
        The layer's fields.

    Returns
    -------
    str
        The QML document.
    """
    return _by_geometry(columns, "30,60,150,160", "20,30,100,255",
                        "existing or planned PV 已建/在建光伏")


def _by_geometry(columns: list[str], fill: str, outline: str, label: str) -> str:
    root = _root()
    r = ET.SubElement(root, "renderer-v2", {"type": "RuleRenderer", "symbollevels": "0",
                                            "enableorderby": "0", "forceraster": "0"})
    rules = ET.SubElement(r, "rules", {"key": "root"})
    syms = ET.SubElement(r, "symbols")
    for i, (gtype, kind) in enumerate((("Polygon", "fill"), ("Line", "line"),
                                       ("Point", "marker"))):
        ET.SubElement(rules, "rule", {"key": f"r{i}", "symbol": str(i),
                                      "filter": f"geometry_type($geometry) = '{gtype}'",
                                      "label": f"{label} ({gtype.lower()})"})
        _symbol(syms, str(i), kind, fill, outline, 0.3 if kind == "line" else 0.2)
    _aliases(root, columns)
    return _to_text(root)


def target_plan_qml(columns: list[str], label_top_n: int) -> str:
    """Ranked roofs: those that reach the target outlined in orange, with their rank.

    Parameters
    ----------
    columns : list of str
        The layer's fields.
    label_top_n : int
        Ranks up to this are labelled (``plan.report_top_n``).

    Returns
    -------
    str
        The QML document.
    """
    root = _root()
    cats = [("in list", "roofs toward the target (all if the input falls short) 目标屋顶清单",
             {"kind": "fill", "fill": "255,127,0,0", "outline": "178,24,43,255",
              "width_mm": 0.6}),
            ("later", "further ranked roofs 其余屋顶",
             {"kind": "fill", "fill": "255,255,255,0", "outline": "120,120,120,255",
              "width_mm": 0.2})]
    _categorized(root, "if(\"in_target_list\", 'in list', 'later')", cats)
    _labeling(root, f"if(\"priority_rank\" <= {int(label_top_n)}, "
              "to_string(\"priority_rank\"), '')", size_pt=8, placement="1")
    _aliases(root, columns)
    return _to_text(root)


def towns_qml(columns: list[str]) -> str:
    """Towns: dashed outlines labelled with the name and the town's MW share.

    Parameters
    ----------
    columns : list of str
        The layer's fields.

    Returns
    -------
    str
        The QML document.
    """
    root = _root()
    r = ET.SubElement(root, "renderer-v2", {"type": "singleSymbol", "symbollevels": "0",
                                            "enableorderby": "0", "forceraster": "0"})
    syms = ET.SubElement(r, "symbols")
    _symbol(syms, "0", "fill", "255,255,255,0", "90,90,90,255", 0.3, style="no")
    _labeling(root, "\"town_name\" || if(\"town_target_mw\" IS NULL, '', '\\n' || "
              "format_number(\"town_target_mw\", 1) || ' MW')", size_pt=8)
    _aliases(root, columns)
    return _to_text(root)


def table_qml(columns: list[str]) -> str:
    """Attribute tables: field aliases only.

    Parameters
    ----------
    columns : list of str
        The table's fields.

    Returns
    -------
    str
        The QML document.
    """
    root = _root()
    _aliases(root, columns)
    return _to_text(root)


def layer_styles_table(styles: dict[str, tuple[str, str]], now: datetime | None = None
                       ) -> pd.DataFrame:
    """The ``layer_styles`` rows QGIS reads as each layer's default style.

    Parameters
    ----------
    styles : dict
        Layer name to ``(geometry column, QML)``; the geometry column is
        ``''`` for attribute tables (what OGR reports for them).
    now : datetime, optional
        ``update_time`` (default: now, UTC).

    Returns
    -------
    DataFrame
        One row per layer, the columns of the QGIS ``layer_styles`` table.
    """
    now = now or datetime.now(UTC)
    rows = [{"f_table_catalog": "", "f_table_schema": "", "f_table_name": name,
             "f_geometry_column": geom, "styleName": name, "styleQML": qml, "styleSLD": "",
             "useAsDefault": True, "description": f"rooftop-pv default style of {name}",
             "owner": "", "ui": None, "update_time": pd.Timestamp(now).tz_convert("UTC")}
            for name, (geom, qml) in styles.items()]
    return pd.DataFrame(rows)
