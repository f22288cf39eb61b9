"""Open the GeoPackage in QGIS (PyQGIS, headless) and render a map.

Run with the system Python that Debian's ``python3-qgis`` installs into, not
the project's virtualenv (which cannot import ``qgis``)::

    QT_QPA_PLATFORM=offscreen /usr/bin/python3 -m pipeline.qgis_check
        outputs/rooftop_pv.gpkg --png outputs/qgis_check.png

It loads every layer the way QGIS does when a user adds it (the default
style comes from the GeoPackage's ``layer_styles`` table), checks that each
layer is valid and carries its embedded style (buildings categorised by
``building_type``, districts by verdict with labels, rejected features by
geometry rule, field aliases present), and renders districts, buildings and
the ranked roofs to a PNG. Exit code 0 when every check passes, 1 otherwise,
with one line per failure. Uses only the standard library and ``qgis``.
"""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
import sys
from pathlib import Path

#: Layer name to (renderer type, classification attribute or None, labels on).
EXPECTED = {
    "buildings": ("categorizedSymbol", "building_type", False),
    "districts": ("categorizedSymbol", "coalesce(\"target_verdict\", 'no target')", True),
    "rejected": ("RuleRenderer", None, False),
    "target_plan": ("categorizedSymbol", "if(\"in_target_list\", 'in list', 'later')", True),
    "towns": ("singleSymbol", None, True),
    "existing_pv": ("RuleRenderer", None, False),
}
#: Fields whose alias must carry a unit in brackets.
ALIAS_CHECK = {"buildings": "capacity_kwp", "districts": "capacity_mw",
               "targets": "target_required_mw"}


def gpkg_layers(path: Path) -> list[str]:
    """Layer and table names registered in ``gpkg_contents`` (not ``layer_styles``).

    Parameters
    ----------
    path : Path
        The GeoPackage.

    Returns
    -------
    list of str
        Table names.
    """
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as con:
        rows = con.execute("SELECT table_name FROM gpkg_contents ORDER BY rowid").fetchall()
    return [r[0] for r in rows if r[0] != "layer_styles"]


def render(layers: list, extent: object, size_px: int) -> object:
    """Render layers (first on top) over an extent to a square image.

    Parameters
    ----------
    layers : list of QgsVectorLayer
        The layers, first drawn on top.
    extent : QgsRectangle
        Map extent in the layers' CRS.
    size_px : int
        Image side [px].

    Returns
    -------
    QImage
        The rendered map.
    """
    from qgis.core import QgsMapRendererParallelJob, QgsMapSettings
    from qgis.PyQt.QtCore import QSize
    from qgis.PyQt.QtGui import QColor

    settings = QgsMapSettings()
    settings.setLayers(layers)
    settings.setDestinationCrs(layers[-1].crs())
    settings.setBackgroundColor(QColor(255, 255, 255))
    settings.setOutputSize(QSize(size_px, size_px))
    settings.setExtent(extent)
    job = QgsMapRendererParallelJob(settings)
    job.start()
    job.waitForFinished()
    return job.renderedImage()


def zoom_extent(layer: object, window_m: float) -> object:
    """The square window (on a grid of its size) with the most classified buildings.

    Windows are scored by the number of distinct ``building_type`` values,
    then by the buildings of a known type, so the view shows the categories.

    Parameters
    ----------
    layer : QgsVectorLayer
        ``buildings`` (``building_type``).
    window_m : float
        Window side [m] (layer CRS units).

    Returns
    -------
    QgsRectangle or None
        The window, None for an empty layer.
    """
    from qgis.core import QgsRectangle

    types: dict[tuple[int, int], set] = {}
    known: dict[tuple[int, int], int] = {}
    has_type = layer.fields().indexOf("building_type") >= 0
    for feat in layer.getFeatures():
        g = feat.geometry()
        if g is None or g.isEmpty():
            continue
        c = g.centroid().asPoint()
        key = (int(c.x() // window_m), int(c.y() // window_m))
        btype = feat["building_type"] if has_type else None
        types.setdefault(key, set()).add(btype)
        known[key] = known.get(key, 0) + (btype not in (None, "unknown"))
    if not types:
        return None
    i, j = max(types, key=lambda k: (len(types[k]), known[k], k))
    return QgsRectangle(i * window_m, j * window_m, (i + 1) * window_m, (j + 1) * window_m)


def check(path: Path, png: Path | None, size_px: int = 1100, window_m: float = 1500.0
          ) -> list[str]:
    """Check the GeoPackage in QGIS and render it.

    Parameters
    ----------
    path : Path
        The GeoPackage.
    png : Path, optional
        Where to render districts, buildings and ranked roofs: the whole
        extent beside the window with most building types.
    size_px : int
        Side of each of the two panels [px].
    window_m : float
        Side of the zoomed window [m].

    Returns
    -------
    list of str
        Failures (empty when all checks pass).
    """
    from qgis.core import QgsApplication, QgsProject, QgsRectangle, QgsVectorLayer
    from qgis.PyQt.QtGui import QColor, QImage, QPainter

    app = QgsApplication([], False)
    app.initQgis()
    failures: list[str] = []
    loaded: dict[str, QgsVectorLayer] = {}
    try:
        for name in gpkg_layers(path):
            layer = QgsVectorLayer(f"{path}|layername={name}", name, "ogr")
            if not layer.isValid():
                failures.append(f"{name}: QGIS cannot open the layer")
                continue
            loaded[name] = layer
            report = {"features": layer.featureCount()}
            if name in EXPECTED:
                rtype, attr, labels = EXPECTED[name]
                r = layer.renderer()
                report["renderer"] = r.type() if r else None
                if r is None or r.type() != rtype:
                    failures.append(f"{name}: renderer {r.type() if r else None}, expected "
                                    f"{rtype} (embedded default style not applied)")
                elif attr is not None and r.classAttribute() != attr:
                    failures.append(f"{name}: classified by {r.classAttribute()!r}, "
                                    f"expected {attr!r}")
                elif rtype == "categorizedSymbol":
                    report["categories"] = [c.label() for c in r.categories()]
                    if len(r.categories()) < 2:
                        failures.append(f"{name}: fewer than 2 categories")
                if labels and not (layer.labelsEnabled() and layer.labeling()):
                    failures.append(f"{name}: labels not enabled")
            if name in ALIAS_CHECK:
                field = ALIAS_CHECK[name]
                alias = layer.attributeAlias(layer.fields().indexOf(field))
                report["alias"] = {field: alias}
                if "[" not in alias:
                    failures.append(f"{name}: alias of {field} has no unit: {alias!r}")
            print(f"{name}: {json.dumps(report, ensure_ascii=False)}")
        if png is not None and "districts" in loaded:
            project = QgsProject.instance()
            order = [n for n in ("target_plan", "buildings", "districts") if n in loaded]
            for n in order:
                project.addMapLayer(loaded[n])
            overview = QgsRectangle(loaded["districts"].extent())
            overview.scale(1.05)
            panels = [render([loaded[n] for n in order], overview, size_px)]
            zoom = (zoom_extent(loaded["buildings"], window_m) if "buildings" in loaded
                    else None)
            if zoom is not None:
                panels.append(render([loaded[n] for n in order], zoom, size_px))
            image = QImage(size_px * len(panels), size_px, QImage.Format_ARGB32)
            image.fill(QColor(255, 255, 255))
            painter = QPainter(image)
            for i, panel in enumerate(panels):
                painter.drawImage(i * size_px, 0, panel)
            painter.end()
            png.parent.mkdir(parents=True, exist_ok=True)
            tmp = png.with_name(f".{png.name}.part.png")
            if not image.save(str(tmp), "PNG"):
                failures.append(f"could not write {png}")
            else:
                os.replace(tmp, png)
                print(f"rendered {png} ({image.width()} x {image.height()} px): overview"
                      + (f" and the {window_m / 1000:g} km window with most building types"
                         if zoom is not None else ""))
    finally:
        # drop the Python-owned layers before QGIS exits (else they are freed after it)
        layer = None
        loaded.clear()
        QgsProject.instance().clear()
        app.exitQgis()
    return failures


def main(argv: list[str] | None = None) -> int:
    """Command line: check a GeoPackage, print failures, return the exit code.

    Parameters
    ----------
    argv : list of str, optional
        Arguments (default: ``sys.argv[1:]``).

    Returns
    -------
    int
        0 when every check passes, 1 otherwise.
    """
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("gpkg", type=Path)
    p.add_argument("--png", type=Path, default=None)
    args = p.parse_args(argv)
    if not args.gpkg.is_file():
        print(f"error: {args.gpkg}: GeoPackage not found. Fix: run `make all` first",
              file=sys.stderr)
        return 1
    failures = check(args.gpkg, args.png)
    for f in failures:
        print(f"FAIL {f}", file=sys.stderr)
    print("qgis-check: " + ("passed" if not failures else f"{len(failures)} failure(s)"))
    return 0 if not failures else 1


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    # skip interpreter teardown: Qt objects destroyed after QgsApplication.exitQgis() may crash
    os._exit(code)
