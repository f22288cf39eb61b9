"""The report a planner forwards: one self-contained HTML file, and charts.

Maps of districts and buildings, achievable versus target MW, capacity by
building type, the monthly generation profile, the path to each target, the
assumptions, the data-coverage caveat and the input accounting, with Chinese
and English labels. Charts are drawn with matplotlib's object API (no pyplot
state) in a CJK font registered from ``report.cjk_font_files`` and embedded
as base64 PNG, so the file needs nothing beside it.
"""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path
from typing import TYPE_CHECKING

import geopandas as gpd
import numpy as np
import pandas as pd

from pipeline.errors import InputError
from pipeline.styles import NO_TARGET, TYPE_STYLE, VERDICT_STYLE

if TYPE_CHECKING:
    from pipeline.footprints import Footprints

MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")


def register_cjk_font(font_files: list[Path]) -> str:
    """Register the first existing CJK font file with matplotlib.

    Parameters
    ----------
    font_files : list of Path
        Candidate font files (``report.cjk_font_files``).

    Returns
    -------
    str
        The font family name to use.

    Raises
    ------
    InputError
        If none of the files exists.
    """
    from matplotlib import font_manager

    for f in font_files:
        if Path(f).is_file():
            font_manager.fontManager.addfont(str(f))
            return font_manager.FontProperties(fname=str(f)).get_name()
    raise InputError(font_files[0], "no CJK font found for the Chinese labels of the charts "
                     f"(tried {[str(f) for f in font_files]})", field="report.cjk_font_files",
                     fix="run `make fonts` (installs Debian fonts-wqy-microhei) or list a CJK "
                     "font file in report.cjk_font_files")


def _figure(family: str, w: float, h: float):
    from matplotlib import rcParams
    from matplotlib.figure import Figure

    rcParams["font.family"] = [family, "DejaVu Sans"]
    rcParams["axes.unicode_minus"] = False
    return Figure(figsize=(w, h), dpi=110, layout="constrained")


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def _hex(rgb: tuple[int, ...]) -> str:
    return "#" + "".join(f"{v:02x}" for v in rgb[:3])


#: Above this many buildings the map's dots sit at the centre of each
#: footprint's bounds (not its centroid) and their areas are rounded to
#: :data:`DOT_DIAMETER_STEP_PT` and drawn one size at a time: Agg stamps a
#: marker of one size ~5x faster than markers of many sizes (1.4 s for 250k).
EXACT_DOTS_MAX = 20_000
#: Diameter step of the rounded dots [pt] (0.75 px at the charts' 110 dpi).
DOT_DIAMETER_STEP_PT = 0.5


def _dots(ax, xy: np.ndarray, size_pt2: np.ndarray, colour: str, binned: bool) -> None:
    """Scatter dots of the given areas [pt2]; ``binned`` rounds the diameters."""
    if not binned:
        ax.scatter(xy[:, 0], xy[:, 1], s=size_pt2, color=colour, alpha=0.8, linewidths=0,
                   zorder=3)
        return
    diameter = np.rint(np.sqrt(size_pt2) / DOT_DIAMETER_STEP_PT) * DOT_DIAMETER_STEP_PT
    for d in np.unique(diameter):
        m = diameter == d
        ax.scatter(xy[m, 0], xy[m, 1], s=float(d * d), color=colour, alpha=0.8, linewidths=0,
                   zorder=3)


def districts_map_png(dlayer: gpd.GeoDataFrame, buildings: gpd.GeoDataFrame, family: str,
                      footprints: Footprints | None = None) -> bytes:
    """Map of the districts coloured by target verdict, with the buildings as dots.

    Parameters
    ----------
    dlayer : GeoDataFrame
        The districts layer (``district_name``, ``target_verdict``).
    buildings : GeoDataFrame
        ``building_type``, ``capacity_kwp`` [kWp], footprints (or, with
        ``footprints``, a DataFrame of the same rows without them).
    family : str
        CJK font family.
    footprints : Footprints, optional
        The buildings' footprints on disk (:mod:`pipeline.footprints`).

    Returns
    -------
    bytes
        PNG.
    """
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    fig = _figure(family, 8.5, 7.5)
    ax = fig.add_subplot()
    verdict = dlayer["target_verdict"].fillna(NO_TARGET)
    colours = [np.array(VERDICT_STYLE.get(v, VERDICT_STYLE[NO_TARGET])[0]) / 255 for v in verdict]
    dlayer.plot(ax=ax, color=[tuple(c[:3]) + (0.55,) for c in colours], edgecolor="#444444",
                linewidth=0.6)
    import shapely

    binned = len(buildings) > EXACT_DOTS_MAX
    if footprints is not None:  # the buildings' footprints stayed on disk
        b = footprints.bounds
        centroids = None if binned else footprints.centroids
    else:
        geoms = np.asarray(buildings.geometry.array)
        b = shapely.bounds(geoms) if binned else None
        centroids = None if binned else shapely.get_coordinates(shapely.centroid(geoms))
    if binned:  # the centre of the bounds: 15x faster, metres off on a map of 100 m pixels
        xy = np.column_stack([(b[:, 0] + b[:, 2]) / 2, (b[:, 1] + b[:, 3]) / 2])
    else:
        xy = centroids
    size = 2 + 40 * np.sqrt(buildings["capacity_kwp"].to_numpy(dtype=float)
                            / max(float(buildings["capacity_kwp"].max()), 1.0))
    btype = buildings["building_type"].astype(object).to_numpy()
    for t, (rgb, _) in TYPE_STYLE.items():
        m = btype == t
        if m.any():
            _dots(ax, xy[m], size[m], _hex(rgb), binned)
    for _, row in dlayer.iterrows():
        p = row.geometry.representative_point()
        label = row["district_name"]
        if pd.notna(row.get("target_required_mw")):
            label += f"\n{row['target_achievable_mw']:.1f} / {row['target_required_mw']:.0f} MW"
        ax.annotate(label, (p.x, p.y), ha="center", va="center", fontsize=8, zorder=4,
                    bbox={"boxstyle": "round,pad=0.15", "fc": "white", "alpha": 0.6, "lw": 0})
    present = set(verdict)
    handles = [Patch(facecolor=np.array(rgba[:3]) / 255, alpha=0.55, edgecolor="#444444",
                     label=label) for v, (rgba, label) in VERDICT_STYLE.items() if v in present]
    handles += [Line2D([], [], marker="o", ls="", color=_hex(rgb), label=label)
                for t, (rgb, label) in TYPE_STYLE.items() if (btype == t).any()]
    ax.legend(handles=handles, loc="lower left", fontsize=7, framealpha=0.85)
    ax.set_title("区县目标与输入建筑 Districts: target verdict and buildings in the input")
    ax.set_axis_off()
    return _png(fig)


def busiest_window(buildings: gpd.GeoDataFrame, window_m: float):
    """Centre of the grid window with the most building types, then the most buildings.

    Parameters
    ----------
    buildings : GeoDataFrame
        ``building_type`` and footprints (metric CRS).
    window_m : float
        Window side [m].

    Returns
    -------
    shapely.Point
        The window's centre.
    """
    from shapely import Point

    cent = buildings.geometry.centroid
    frame = pd.DataFrame({"i": np.floor(cent.x / window_m).astype("int64"),
                          "j": np.floor(cent.y / window_m).astype("int64"),
                          "t": buildings["building_type"].astype(object).to_numpy()})
    g = frame.groupby(["i", "j"])["t"].agg(["nunique", "size"]).reset_index()
    best = g.sort_values(["nunique", "size", "i", "j"], ascending=False).iloc[0]
    return Point((best["i"] + 0.5) * window_m, (best["j"] + 0.5) * window_m)


def buildings_map_png(buildings: gpd.GeoDataFrame, plan: pd.DataFrame, target_id: str,
                      family: str, window_m: float = 1500.0,
                      footprints: Footprints | None = None) -> bytes:
    """Map of footprints by type, with the roofs that reach a target outlined.

    The window is the one holding the most building types among the
    target's ranked roofs.

    Parameters
    ----------
    buildings : GeoDataFrame
        ``building_id``, ``building_type``, footprints (metric CRS); with
        ``footprints``, a DataFrame of the same rows without them.
    plan : DataFrame
        Output of ``targets.target_plan``.
    target_id : str
        The target whose ranked roofs the map shows.
    family : str
        CJK font family.
    window_m : float
        Side of the map window [m].
    footprints : Footprints, optional
        The buildings' footprints on disk (:mod:`pipeline.footprints`): only
        the window's are read.

    Returns
    -------
    bytes
        PNG.
    """
    from matplotlib.patches import Patch

    fig = _figure(family, 8.5, 7.5)
    ax = fig.add_subplot()
    ranked = plan[plan["target_id"] == target_id].sort_values("priority_rank")
    # the ranked roofs carry their footprints and types (rows of ``buildings``)
    crs = footprints.crs if footprints is not None else buildings.crs
    pool = gpd.GeoDataFrame(ranked[["building_type", "geometry"]], geometry="geometry", crs=crs)
    if len(pool) or footprints is None:
        c = busiest_window(pool if len(pool) else buildings, window_m)
    else:  # the buildings' centroids (a point's centroid is itself)
        c = busiest_window(gpd.GeoDataFrame(
            {"building_type": buildings["building_type"].to_numpy()},
            geometry=gpd.points_from_xy(*footprints.centroids.T), crs=crs), window_m)
    half = window_m / 2
    if footprints is not None:
        rows = footprints.window(c.x - half, c.y - half, c.x + half, c.y + half)
        view = gpd.GeoDataFrame({"building_type": buildings["building_type"].iloc[rows]
                                 .to_numpy()}, geometry=footprints.take(rows).to_numpy(),
                                crs=crs)
    else:
        view = buildings.cx[c.x - half:c.x + half, c.y - half:c.y + half]
    for t, (rgb, _) in TYPE_STYLE.items():
        sel = view[view["building_type"].astype(object) == t]
        if len(sel):
            sel.plot(ax=ax, color=_hex(rgb), edgecolor="#333333", linewidth=0.3)
    top = ranked[ranked["in_target_list"]]
    top_geoms = gpd.GeoSeries(top.geometry.to_numpy(), crs=crs)
    pt = top_geoms.representative_point()
    inside = ((pt.x - c.x).abs() < half) & ((pt.y - c.y).abs() < half)
    top_geoms[inside.to_numpy()].plot(ax=ax, facecolor="none", edgecolor="#b2182b",
                                      linewidth=1.4)
    # label the 40 best-ranked roofs in view
    for k in np.flatnonzero(inside.to_numpy())[:40]:
        ax.annotate(str(top["priority_rank"].iloc[k]), (pt.x.iloc[k], pt.y.iloc[k]),
                    fontsize=7, ha="center", color="#67001f")
    ax.set_xlim(c.x - half, c.x + half)
    ax.set_ylim(c.y - half, c.y + half)
    ax.set_aspect("equal")
    types = set(view["building_type"].astype(object))
    handles = [Patch(facecolor=_hex(rgb), edgecolor="#333333", label=label)
               for t, (rgb, label) in TYPE_STYLE.items() if t in types]
    handles.append(Patch(facecolor="none", edgecolor="#b2182b", label="roofs toward the target, "
                         "all of them if the input falls short 目标屋顶清单 (rank 排序)"))
    ax.legend(handles=handles, loc="lower left", fontsize=7, framealpha=0.85)
    ax.set_title(f"建筑与优先屋顶 Buildings and ranked roofs: {target_id} "
                 f"({window_m / 1000:.1f} km window)")
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_xlabel("")
    ax.set_ylabel("")
    return _png(fig)


def targets_chart_png(targets: pd.DataFrame, family: str) -> bytes:
    """Achievable (existing + new roofs) versus target MW per target.

    Parameters
    ----------
    targets : DataFrame
        ``target_id``, ``district_name``, ``target_required_mw``,
        ``target_existing_mw``, ``target_achievable_mw`` [MW].
    family : str
        CJK font family.

    Returns
    -------
    bytes
        PNG.
    """
    fig = _figure(family, 8.0, 1.2 + 0.9 * len(targets))
    ax = fig.add_subplot()
    y = np.arange(len(targets))
    have = targets["target_existing_mw"].to_numpy(dtype=float)
    ach = targets["target_achievable_mw"].to_numpy(dtype=float)
    req = targets["target_required_mw"].to_numpy(dtype=float)
    ax.barh(y, have, height=0.5, color="#2166ac", label="existing/planned 已建在建")
    ax.barh(y, ach, left=have, height=0.5, color="#66bd63",
            label="achievable on input roofs 输入屋顶可装")
    ax.scatter(req, y, marker="|", s=900, color="#b2182b", linewidths=3, zorder=3,
               label="target 目标")
    for i in range(len(targets)):
        ax.annotate(f"{have[i] + ach[i]:.1f} / {req[i]:.0f} MW", (max(req[i], have[i] + ach[i]),
                    y[i]), xytext=(8, 0), textcoords="offset points", va="center", fontsize=9)
    ax.set_yticks(y, [f"{d}\n{t}" for d, t in zip(targets["district_name"], targets["target_id"],
                                                   strict=True)])
    ax.invert_yaxis()
    ax.set_xlim(0, max(float(req.max()), float((have + ach).max())) * 1.3)
    ax.set_xlabel("MW")
    fig.legend(fontsize=8, loc="outside lower center", ncols=3)
    ax.set_title("目标与可达装机 Achievable versus target capacity")
    return _png(fig)


def types_chart_png(by_type: pd.DataFrame, family: str) -> bytes:
    """Capacity by building type (all districts of the input).

    Parameters
    ----------
    by_type : DataFrame
        ``building_type``, ``capacity_mw`` [MW] (rows per district and type).
    family : str
        CJK font family.

    Returns
    -------
    bytes
        PNG.
    """
    g = by_type.groupby("building_type", observed=True)["capacity_mw"].sum()
    order = [t for t in TYPE_STYLE if t in g.index]
    fig = _figure(family, 8.0, 0.9 + 0.38 * len(order))
    ax = fig.add_subplot()
    vals = g.reindex(order).to_numpy(dtype=float)
    ax.barh(np.arange(len(order)), vals, color=[_hex(TYPE_STYLE[t][0]) for t in order])
    for i, v in enumerate(vals):
        ax.annotate(f"{v:.1f}", (v, i), xytext=(4, 0), textcoords="offset points",
                    va="center", fontsize=8)
    ax.set_yticks(np.arange(len(order)), [TYPE_STYLE[t][1] for t in order])
    ax.invert_yaxis()
    ax.set_xlabel("capacity 装机容量 [MW]")
    ax.set_title("按建筑类型的装机潜力 Capacity by building type")
    return _png(fig)


def monthly_chart_png(monthly: pd.DataFrame, highlight: list[str], family: str) -> bytes:
    """Monthly AC generation: all buildings (bars) and the target districts (lines).

    Parameters
    ----------
    monthly : DataFrame
        Output of ``pvyield.monthly_profile`` by ``district_name``
        (``energy_m01_mwh`` ... [MWh]).
    highlight : list of str
        Districts drawn as lines.
    family : str
        CJK font family.

    Returns
    -------
    bytes
        PNG.
    """
    cols = [f"energy_m{m:02d}_mwh" for m in range(1, 13)]
    fig = _figure(family, 8.0, 3.8)
    ax = fig.add_subplot()
    total = monthly[cols].sum().to_numpy(dtype=float) / 1000.0
    x = np.arange(12)
    ax.bar(x, total, color="#fdb863", label="all buildings in the input 全部输入建筑")
    for d in highlight:
        if d in monthly.index:
            ax.plot(x, monthly.loc[d, cols].to_numpy(dtype=float) / 1000.0, marker="o", label=d)
    ax.set_xticks(x, [f"{m + 1}月\n{MONTHS[m]}" for m in range(12)], fontsize=8)
    ax.set_ylabel("GWh")
    ax.legend(fontsize=8)
    ax.set_title("月发电量 Monthly AC generation (typical year)")
    return _png(fig)


def _img(png: bytes, alt: str) -> str:
    data = base64.b64encode(png).decode("ascii")
    return f'<figure><img alt="{html.escape(alt)}" src="data:image/png;base64,{data}"></figure>'


def _table(frame: pd.DataFrame, digits: int = 2) -> str:
    def fmt(v: object) -> str:
        if isinstance(v, bool | np.bool_):
            return "yes" if v else "no"
        if isinstance(v, float | np.floating):
            if np.isnan(v):
                return ""
            if np.isinf(v):
                return "∞"
            return f"{v:,.{digits}f}"
        if isinstance(v, int | np.integer):
            return f"{v:,}"
        return "" if v is None else str(v)

    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in frame.columns)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(fmt(v))}</td>" for v in row) + "</tr>"
                   for row in frame.itertuples(index=False, name=None))
    return f'<div class="tbl"><table><thead><tr>{head}</tr></thead><tbody>{body}</tbody>' \
        "</table></div>"


CSS = """
body{font-family:"Noto Sans CJK SC","WenQuanYi Micro Hei","Microsoft YaHei","PingFang SC",
sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222;line-height:1.45}
h1{font-size:1.6em}h2{border-bottom:2px solid #ddd;padding-bottom:.2em;margin-top:1.8em}
.caveat{background:#fff4e5;border-left:5px solid #f0a030;padding:.8em 1em}
.tbl{overflow-x:auto}table{border-collapse:collapse;font-size:.86em;margin:.6em 0}
th,td{border:1px solid #ccc;padding:.25em .5em;text-align:right}
th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}
figure{margin:1em 0}img{max-width:100%}.small{color:#666;font-size:.85em}
.kpi{display:flex;gap:1em;flex-wrap:wrap}.kpi div{background:#f3f7fb;padding:.6em 1em;
border-radius:6px}.kpi b{display:block;font-size:1.3em}
"""


def render_html(title: str, caveat: str, sections: list[tuple[str, list[str]]],
                kpis: list[tuple[str, str]], footer: str) -> str:
    """Assemble the self-contained HTML page.

    Parameters
    ----------
    title : str
        Page title.
    caveat : str
        Data-coverage caveat, shown at the top.
    sections : list
        ``(heading, [html fragments])`` in order.
    kpis : list
        ``(label, value)`` key figures shown under the caveat.
    footer : str
        Provenance line.

    Returns
    -------
    str
        The HTML document.
    """
    parts = [f"<!DOCTYPE html><html lang=\"zh-CN\"><head><meta charset=\"utf-8\">"
             f"<title>{html.escape(title)}</title><style>{CSS}</style></head><body>",
             f"<h1>{html.escape(title)}</h1>",
             f'<p class="caveat"><b>数据覆盖 Data coverage.</b> {html.escape(caveat)}</p>',
             '<div class="kpi">' + "".join(f"<div>{html.escape(k)}<b>{html.escape(v)}</b></div>"
                                           for k, v in kpis) + "</div>"]
    for heading, frags in sections:
        parts.append(f"<h2>{html.escape(heading)}</h2>")
        parts.extend(frags)
    parts.append(f'<p class="small">{html.escape(footer)}</p></body></html>')
    return "\n".join(parts)


def paragraph(text: str) -> str:
    """An escaped HTML paragraph.

    Parameters
    ----------
    text : str
        Plain text.

    Returns
    -------
    str
        ``<p>...</p>``.
    """
    return f"<p>{html.escape(text)}</p>"


def figure(png: bytes, alt: str) -> str:
    """A base64-embedded PNG figure.

    Parameters
    ----------
    png : bytes
        The image.
    alt : str
        Alternative text.

    Returns
    -------
    str
        ``<figure>`` element.
    """
    return _img(png, alt)


def table(frame: pd.DataFrame, digits: int = 2) -> str:
    """A DataFrame as an HTML table (numbers with thousands separators).

    Parameters
    ----------
    frame : DataFrame
        The table.
    digits : int
        Decimals of floats.

    Returns
    -------
    str
        ``<table>`` element.
    """
    return _table(frame, digits)
