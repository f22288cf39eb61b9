"""Scheduled runs: run records, the lock, stage keys, the drop folder, retention.

A scheduler (cron, a systemd timer) calls ``rooftop-pv run --if-changed``.
Each run

1. takes the run lock (``<outputs_dir>/.rooftop-pv.lock``, ``fcntl.flock``);
   a second run waits up to ``runs.lock_timeout_s`` and then exits with
   :data:`EXIT_LOCKED` and a message naming the run that holds it;
2. removes temporary files that a killed run left behind (``.*.part*``);
3. picks up new building files in the drop folder (``runs.drop.path``) as
   extra sources, one per file, named ``drop_<file stem>``;
4. computes each stage's key, the sha256 of everything the stage's outputs
   depend on: its input files (content), the config sections it reads and
   its code. With ``--if-changed`` a stage whose key equals the one stamped
   beside its outputs (``<processed_dir>/.stamps/<stage>.json``) is skipped,
   and a run with every stage up to date does nothing and exits 0. Files are
   hashed in background threads (the stamps follow while the next stage runs:
   at 1M buildings ~2.5 GB of stage files and GeoPackage, ~4 s of hashing that
   the driver used to do between stages);
5. writes a manifest ``outputs/runs/<run_id>/manifest.json`` (run id, start
   and end, inputs with sha256, config hash, package versions, rows in and
   out per stage, durations, kernel partitions computed and reused, host)
   and a log file ``run.log`` beside it;
6. keeps the outputs of the last ``runs.keep_runs`` runs that wrote them
   (copies of the GeoPackage, the reports and the workbook, and the snapshot the
   next run's change report compares against) and deletes older run folders.

Exit codes of ``rooftop-pv run``: :data:`EXIT_OK` (done, or nothing to do),
:data:`EXIT_FAILED`, :data:`EXIT_BAD_INPUT`, :data:`EXIT_LOCKED`.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import functools
import hashlib
import json
import logging
import os
import platform
import re
import shutil
import socket
import sqlite3
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field

from pipeline.errors import PipelineError

if TYPE_CHECKING:  # config.py imports this module
    from pipeline.config import PipelineConfig, SourceConfig

log = logging.getLogger(__name__)

#: Exit codes of ``rooftop-pv run`` (also in the README).
EXIT_OK = 0
EXIT_FAILED = 1
EXIT_BAD_INPUT = 2
EXIT_LOCKED = 3

LOCK_NAME = ".rooftop-pv.lock"
RUNS_DIR = "runs"
STAMPS_DIR = ".stamps"
CACHE_DIR = "cache"
HISTORY = "history.log"
#: Files a run keeps in its run folder (copies of the outputs it wrote).
KEPT_OUTPUTS = ("rooftop_pv.gpkg", "report.md", "report.html", "rooftop_pv.xlsx")
SNAPSHOT_BUILDINGS = "snapshot_buildings.parquet"
SNAPSHOT_DISTRICTS = "snapshot_districts.parquet"
PACKAGES = ("numpy", "pandas", "geopandas", "shapely", "pyogrio", "pyarrow", "pyproj",
            "rasterio", "pvlib", "dask", "dask-geopandas", "distributed", "pydantic", "PyYAML",
            "rooftop-pv")
PIPELINE_DIR = Path(__file__).resolve().parent


# --------------------------------------------------------------------------- config
class DropConfig(BaseModel):
    """The drop folder: new building files picked up by the next run."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    path: Path = Path("data/raw/drop")
    suffixes: list[str] = Field(
        default_factory=lambda: [".geojson", ".gpkg", ".parquet", ".fgb", ".shp"])
    layer: str | None = None
    encoding: str | None = None
    crs_if_missing: str | None = None
    id_field: str | None = "id"
    columns: dict[str, str] = Field(default_factory=dict)


class RunsConfig(BaseModel):
    """Scheduled reruns: retention, the lock, cache partitions, the drop folder."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    keep_runs: int = Field(default=5, ge=1)
    lock_timeout_s: float = Field(default=0.0, ge=0)
    partition_cache: bool = True
    partition_grid_m: float | None = Field(default=5000.0, gt=0)
    drop: DropConfig = DropConfig()


class LockError(PipelineError):
    """Another run holds the run lock."""


# --------------------------------------------------------------------------- drop folder
def drop_files(cfg: PipelineConfig, base_dir: Path) -> list[Path]:
    """Building files waiting in the drop folder, sorted by name.

    Parameters
    ----------
    cfg : PipelineConfig
        ``runs.drop.path`` and ``runs.drop.suffixes``.
    base_dir : Path
        Project root.

    Returns
    -------
    list of Path
        Files whose suffix is one of ``runs.drop.suffixes`` (hidden files and
        partial copies starting with ``.`` are ignored).
    """
    drop = cfg.runs.drop
    folder = drop.path if drop.path.is_absolute() else base_dir / drop.path
    if not folder.is_dir():
        return []
    suffixes = {s.lower() for s in drop.suffixes}
    return sorted(p for p in folder.iterdir()
                  if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in suffixes)


def drop_sources(cfg: PipelineConfig, base_dir: Path) -> list[SourceConfig]:
    """One source per drop-folder file, with the drop folder's column mapping.

    Parameters
    ----------
    cfg : PipelineConfig
        The configuration.
    base_dir : Path
        Project root.

    Returns
    -------
    list of SourceConfig
        Sources named ``drop_<stem>`` (lower case, other characters as
        ``_``; ``drop_<stem>_<suffix>`` when two files share a stem).
    """
    from pipeline.config import SourceConfig

    drop = cfg.runs.drop
    taken = {s.name for s in cfg.sources}
    out = []
    for path in drop_files(cfg, base_dir):
        name = "drop_" + re.sub(r"[^a-z0-9_]", "_", path.stem.lower())
        if name in taken:
            name += "_" + path.suffix.lower().lstrip(".")
        taken.add(name)
        rel = Path(_rel(path, base_dir))
        out.append(SourceConfig(name=name, kind="vector", path=rel, layer=drop.layer,
                                encoding=drop.encoding, crs_if_missing=drop.crs_if_missing,
                                id_field=drop.id_field, columns=dict(drop.columns)))
    return out


def with_drop_sources(cfg: PipelineConfig, base_dir: Path) -> PipelineConfig:
    """The configuration with the drop folder's files appended to ``sources``.

    Parameters
    ----------
    cfg : PipelineConfig
        The configuration.
    base_dir : Path
        Project root.

    Returns
    -------
    PipelineConfig
        ``cfg`` itself when the drop folder is empty or absent.
    """
    extra = drop_sources(cfg, base_dir)
    if not extra:
        return cfg
    log.info("drop folder: %d new building file(s): %s", len(extra),
             ", ".join(s.path.name for s in extra))
    return cfg.model_copy(update={"sources": [*cfg.sources, *extra]})


# --------------------------------------------------------------------------- hashing
#: ioctl request of Linux's FICLONE (reflink a whole file), <linux/fs.h>.
FICLONE = 0x40049409


def reflink(src: Path, dst: Path) -> bool:
    """Make ``dst`` a copy-on-write clone of ``src`` (False where unsupported).

    A clone shares the blocks until either file is written, then they
    diverge: unlike a hard link, a write into one never shows in the other.
    """
    if not sys.platform.startswith("linux"):
        return False
    with open(src, "rb") as fi, open(dst, "wb") as fo:
        try:
            fcntl.ioctl(fo.fileno(), FICLONE, fi.fileno())
        except OSError:
            ok = False
        else:
            ok = True
    if not ok:
        dst.unlink()
    return ok


def copy_file(src: Path, dst: Path) -> None:
    """Copy a file with its times: a reflink where possible, else a byte copy."""
    if reflink(src, dst):
        shutil.copystat(src, dst)
    else:
        shutil.copy2(src, dst)


#: (device, inode, size, mtime) -> future of the sha256, per process: a stage's outputs are
#: hashed when it ends and again as the next stage's inputs (~1 s per GB each time)
_SHA256_MEMO: dict[tuple, Future] = {}
_SHA256_LOCK = threading.Lock()
#: Threads hashing files beside the stages (hashlib and file reads release the GIL).
HASH_THREADS = 2
_HASH_POOL: list[ThreadPoolExecutor] = []


def sha256_soon(path: Path) -> Future:
    """Start hashing a file's content (sha256, hex) in a background thread.

    The file is opened here: the digest is that of its content now, also if
    it is replaced meanwhile (files are replaced by renaming a new one over
    them, :func:`pipeline.io.atomic_path`; the open handle keeps reading the
    old one). Digests are remembered per process by the file's identity
    (device, inode, size and modification time), not its name: a temporary
    file hashed before it is renamed into place is not hashed again.

    Parameters
    ----------
    path : Path
        The file.

    Returns
    -------
    concurrent.futures.Future
        Of the hex digest.
    """
    f = open(path, "rb")  # noqa: SIM115  (closed by the hashing thread)
    try:
        st = os.fstat(f.fileno())
        key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
        with _SHA256_LOCK:
            fut = _SHA256_MEMO.get(key)
            if fut is None or (fut.done() and fut.exception() is not None):
                if not _HASH_POOL:
                    _HASH_POOL.append(ThreadPoolExecutor(HASH_THREADS,
                                                         thread_name_prefix="rooftop-pv-sha256"))
                fut = _HASH_POOL[0].submit(_sha256_of, f)
                f = None
                _SHA256_MEMO[key] = fut
        return fut
    finally:
        if f is not None:
            f.close()


def _sha256_of(f: Any) -> str:
    with f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def sha256_file(path: Path) -> str:
    """The sha256 of a file's content (hex); see :func:`sha256_soon`."""
    return sha256_soon(path).result()


def _resolve(path: Path, base_dir: Path) -> Path:
    path = Path(path)
    return path if path.is_absolute() else base_dir / path


def _rel(path: Path, base_dir: Path) -> str:
    """A path relative to the project root where it lies inside it."""
    try:
        return Path(path).relative_to(base_dir).as_posix()
    except ValueError:
        return Path(path).as_posix()


def _with_sidecars(path: Path) -> list[Path]:
    """A file and the files that belong to it (Shapefile .shx/.dbf/.prj/.cpg)."""
    if path.is_dir():
        return sorted(p for p in path.rglob("*") if p.is_file())
    if path.suffix.lower() == ".shp":
        return sorted(p for p in path.parent.glob(path.stem + ".*") if p.is_file())
    return [path]


def stage_io(cfg: PipelineConfig, stage: str, base_dir: Path, config_path: Path
             ) -> tuple[list[Path], list[Path], tuple[str, ...]]:
    """What a stage reads and writes, and the config sections it depends on.

    Parameters
    ----------
    cfg : PipelineConfig
        The configuration (with the drop sources).
    stage : str
        ``ingest``, ``classify``, ``roof``, ``shading``, ``yield`` or ``report``.
    base_dir : Path
        Project root.
    config_path : Path
        The config file (the report reads its comments).

    Returns
    -------
    inputs, outputs : list of Path
        Input files (that exist) and output files.
    sections : tuple of str
        Top-level config keys (empty: the whole config).
    """
    proc = _resolve(cfg.paths.processed_dir, base_dir)
    out = _resolve(cfg.paths.outputs_dir, base_dir)
    districts = _resolve(cfg.districts.path, base_dir)
    if stage == "ingest":
        inputs = [districts]
        for src in cfg.sources:
            inputs += _with_sidecars(_resolve(src.path, base_dir))
        outputs = [proc / n for n in ("ingest_buildings.parquet", "ingest_areas.parquet",
                                      "ingest_pois.parquet", "ingest_rejected.parquet",
                                      "ingest_accounting.json")]
        sections: tuple[str, ...] = ("working_crs", "sources", "districts", "ingest", "targets")
    elif stage == "classify":
        from pipeline.classify_eval import DEFAULT_CBDC_LABELS

        c = cfg.classify
        inputs = [proc / "ingest_buildings.parquet", proc / "ingest_areas.parquet",
                  proc / "ingest_pois.parquet", _resolve(c.rules_file, base_dir),
                  DEFAULT_CBDC_LABELS]
        if c.overrides_file is not None:
            inputs.append(_resolve(c.overrides_file, base_dir))
        for layer in [*c.poi_layers, *c.area_layers]:
            inputs += _with_sidecars(_resolve(layer.path, base_dir))
        outputs = [proc / "classify_buildings.parquet", proc / "classify_evaluation.md"]
        sections = ("working_crs", "classify")
    elif stage == "roof":
        import glob

        inputs = [proc / "classify_buildings.parquet"]
        for entry in cfg.heights.rasters:
            pattern = _resolve(Path(entry.path), base_dir).as_posix()
            inputs += [Path(f) for f in sorted(glob.glob(pattern, recursive=True))]
        outputs = [proc / "roof_buildings.parquet"]
        sections = ("roof", "policy", "heights")
    elif stage == "shading":
        inputs = [proc / "roof_buildings.parquet", _resolve(cfg.weather.path, base_dir)]
        outputs = [proc / "shading_buildings.parquet"]
        sections = ("shading", "weather", "yield")
    elif stage == "yield":
        inputs = [proc / "shading_buildings.parquet", _resolve(cfg.weather.path, base_dir)]
        outputs = [proc / "yield_buildings.parquet", proc / "yield_classes.csv"]
        sections = ("weather", "yield")
    elif stage == "report":
        inputs = [proc / "yield_buildings.parquet", proc / "ingest_rejected.parquet",
                  proc / "ingest_accounting.json", proc / "classify_evaluation.md", districts,
                  Path(config_path)]
        outputs = [out / name for name in KEPT_OUTPUTS]
        sections = ()
    else:
        raise ValueError(f"unknown stage {stage!r}")
    return [p for p in inputs if p.is_file()], outputs, sections


def code_hash() -> str:
    """sha256 over the source of every module of the package.

    Deliberately coarse: a stage's result depends on helpers in other
    modules, so any code change (an upgrade) redoes every stage once.
    """
    if "code" not in _CODE_HASH:
        h = hashlib.sha256()
        for path in sorted(PIPELINE_DIR.glob("*.py")):
            h.update(path.name.encode())
            h.update(path.read_bytes())
        _CODE_HASH["code"] = h.hexdigest()
    return _CODE_HASH["code"]


_CODE_HASH: dict[str, str] = {}


def stage_key(cfg: PipelineConfig, stage: str, base_dir: Path, config_path: Path
              ) -> tuple[str, dict[str, str]]:
    """The key of a stage's outputs: inputs' content, config sections, code.

    Parameters
    ----------
    cfg : PipelineConfig
        The configuration (with the drop sources).
    stage : str
        The stage.
    base_dir : Path
        Project root.
    config_path : Path
        The config file.

    Returns
    -------
    key : str
        sha256 (hex) of the parts below.
    inputs : dict
        Input file (as given) to its sha256.
    """
    return stage_key_soon(cfg, stage, base_dir, config_path)()


def stage_key_soon(cfg: PipelineConfig, stage: str, base_dir: Path, config_path: Path
                   ) -> Callable[[], tuple[str, dict[str, str]]]:
    """:func:`stage_key` of the input files as they are now, hashed in the background.

    The input files are opened and their hashing started here
    (:func:`sha256_soon`); the returned function waits for them and returns
    what :func:`stage_key` returns (computed once).
    """
    inputs, _, sections = stage_io(cfg, stage, base_dir, config_path)
    files = {_rel(p, base_dir): sha256_soon(p) for p in inputs}
    dump = json.loads(cfg.model_dump_json(by_alias=True))
    if sections:
        dump = {k: dump[k] for k in sections}
    code = code_hash()

    @functools.cache
    def key() -> tuple[str, dict[str, str]]:
        hashed = {name: f.result() for name, f in files.items()}
        parts = {"stage": stage, "config": dump, "code": code, "inputs": sorted(hashed.items())}
        text = json.dumps(parts, sort_keys=True, ensure_ascii=False, default=str)
        return hashlib.sha256(text.encode()).hexdigest(), hashed

    return key


def _stamp_path(cfg: PipelineConfig, stage: str, base_dir: Path) -> Path:
    return _resolve(cfg.paths.processed_dir, base_dir) / STAMPS_DIR / f"{stage}.json"


def read_stamp(cfg: PipelineConfig, stage: str, base_dir: Path) -> dict | None:
    """The stamp the last run of ``stage`` left beside its outputs (or None)."""
    path = _stamp_path(cfg, stage, base_dir)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def is_up_to_date(cfg: PipelineConfig, stage: str, base_dir: Path, config_path: Path,
                  key: str | None = None) -> bool:
    """Whether a stage's outputs are those its current inputs would give.

    True when the stamp's key equals the stage's current key and every
    output still has the sha256 the stamp recorded.
    """
    stamp = read_stamp(cfg, stage, base_dir)
    if stamp is None:
        return False
    key = key or stage_key(cfg, stage, base_dir, config_path)[0]
    if stamp.get("key") != key:
        return False
    _, outputs, _ = stage_io(cfg, stage, base_dir, config_path)
    recorded = stamp.get("outputs", {})
    for p in outputs:
        if not p.is_file() or recorded.get(p.name) != sha256_file(p):
            return False
    return True


def _write_json_atomic(obj: object, path: Path) -> None:
    from pipeline.io import atomic_path

    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, ensure_ascii=False, indent=2, default=str),
                       encoding="utf-8")


# --------------------------------------------------------------------------- lock
@contextlib.contextmanager
def run_lock(path: Path, timeout_s: float = 0.0, holder: str = "") -> Iterator[Path]:
    """Hold an exclusive ``flock`` on ``path`` for the duration of a run.

    Parameters
    ----------
    path : Path
        The lock file (created if absent, never deleted: deleting a lock
        file that another process has open would let a third one in).
    timeout_s : float
        How long to wait for another run to release it [s]; 0 = not at all.
    holder : str
        Written into the lock file for the message the next run prints.

    Yields
    ------
    Path
        The lock file.

    Raises
    ------
    LockError
        When the lock is still held after ``timeout_s``; the message names
        the lock file and the run that holds it.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as exc:
                if exc.errno not in (errno.EAGAIN, errno.EACCES):
                    raise
                if time.monotonic() >= deadline:
                    other = path.read_text(encoding="utf-8", errors="replace").strip()
                    raise LockError(
                        f"{path}: another run holds the lock ({other or 'holder unknown'}); "
                        f"waited {timeout_s:g} s. Fix: let it finish (the scheduler's next "
                        "call picks up anything new), or raise runs.lock_timeout_s / "
                        "--lock-timeout to wait longer") from None
                time.sleep(min(0.2, max(deadline - time.monotonic(), 0.01)))
        os.ftruncate(fd, 0)
        os.write(fd, holder.encode())
        os.fsync(fd)
        yield path
    finally:
        os.close(fd)  # closing releases the flock


def clean_stale_temps(*dirs: Path) -> list[Path]:
    """Delete temporary files a killed run left behind (call with the lock held).

    Parameters
    ----------
    *dirs : Path
        Directories the stages write to.

    Returns
    -------
    list of Path
        The files removed (``.<name>.*.part*`` from :func:`pipeline.io.atomic_path`,
        ``.<name>.*.tmp`` and ``.<name>.tmp-<pid>`` from the stages' own writers).
    """
    removed = []
    pattern = re.compile(r"^\..+(\.part|\.tmp)")
    for d in dirs:
        if not d.is_dir():
            continue
        for p in d.iterdir():
            if p.is_file() and pattern.match(p.name):
                p.unlink(missing_ok=True)
                removed.append(p)
    if removed:
        log.warning("removed %d temporary file(s) left by an interrupted run: %s",
                    len(removed), ", ".join(p.name for p in removed))
    return removed


# --------------------------------------------------------------------------- GeoPackage check
def check_geopackage(path: Path) -> None:
    """Check a GeoPackage before it replaces the published one.

    Runs SQLite's ``PRAGMA quick_check`` (page structure, record formats and
    constraints: what a write cut short or a damaged file breaks; it skips
    the full index-to-table cross-check of ``integrity_check``, which takes
    several times as long on a million buildings) and checks that the file
    is a GeoPackage (``gpkg_contents`` lists its layers).

    Parameters
    ----------
    path : Path
        The (temporary) GeoPackage.

    Raises
    ------
    RuntimeError
        Naming the file and what the check found.
    """
    uri = f"file:{Path(path).as_posix()}?mode=ro"
    try:
        con = sqlite3.connect(uri, uri=True)
        try:
            result = [r[0] for r in con.execute("PRAGMA quick_check").fetchall()]
            n_layers = con.execute("SELECT count(*) FROM gpkg_contents").fetchone()[0]
        finally:
            con.close()
    except sqlite3.DatabaseError as exc:
        raise RuntimeError(f"{path}: not a readable GeoPackage ({exc})") from exc
    if result != ["ok"]:
        raise RuntimeError(f"{path}: GeoPackage integrity check failed: {result[:5]}")
    if n_layers == 0:
        raise RuntimeError(f"{path}: GeoPackage has no layers")


# --------------------------------------------------------------------------- provenance
def package_versions() -> dict[str, str]:
    """Versions of Python, GDAL/PROJ and the packages that shape the numbers."""
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "not installed"
    try:
        import pyogrio
        import pyproj

        out["GDAL"] = pyogrio.__gdal_version_string__
        out["PROJ"] = pyproj.proj_version_str
    except ImportError:  # pragma: no cover - both are dependencies
        pass
    return out


def host_info() -> dict[str, Any]:
    """Host name, platform, cores and user of this run."""
    return {"hostname": socket.gethostname(), "platform": platform.platform(),
            "cpu_count": os.cpu_count(), "pid": os.getpid(),
            "user": os.environ.get("USER") or os.environ.get("LOGNAME") or ""}


def new_run_id(now: datetime | None = None) -> str:
    """A sortable, unique run id: ``YYYYmmddTHHMMSSZ-<6 hex>``."""
    now = now or datetime.now(UTC)
    return now.strftime("%Y%m%dT%H%M%SZ") + "-" + uuid.uuid4().hex[:6]


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


def output_runs(runs_dir: Path) -> list[Path]:
    """Run folders of successful runs that wrote outputs, oldest first."""
    if not runs_dir.is_dir():
        return []
    out = []
    for d in sorted(runs_dir.iterdir()):
        m = d / "manifest.json"
        if not (d.is_dir() and m.is_file()):
            continue
        try:
            manifest = json.loads(m.read_text(encoding="utf-8"))
        except json.JSONDecodeError:
            continue
        if manifest.get("status") == "ok" and (d / SNAPSHOT_BUILDINGS).is_file():
            out.append(d)
    return out


def prune_runs(runs_dir: Path, keep: int, protect: Path | None = None) -> list[Path]:
    """Delete run folders beyond the newest ``keep`` runs that wrote outputs.

    Folders of runs without outputs (single stages, failures) are deleted
    once they are older than the oldest output run kept.

    Parameters
    ----------
    runs_dir : Path
        ``outputs/runs``.
    keep : int
        Output runs to keep.
    protect : Path, optional
        A folder never deleted (the current run's).

    Returns
    -------
    list of Path
        The deleted folders.
    """
    kept = output_runs(runs_dir)[-keep:]
    if not kept:
        return []
    oldest = kept[0].name
    removed = []
    for d in sorted(runs_dir.iterdir()):
        if d.is_dir() and d not in kept and d != protect and d.name < oldest:
            shutil.rmtree(d, ignore_errors=True)
            removed.append(d)
    return removed


# --------------------------------------------------------------------------- the run record
class RunRecord:
    """One run: its id, folder, manifest and log file.

    Parameters
    ----------
    cfg : PipelineConfig
        The configuration (with the drop sources).
    config_path : Path
        The config file.
    base_dir : Path
        Project root.
    stages : tuple of str
        Stages asked for.
    argv : list of str, optional
        The command line, for the manifest.
    """

    def __init__(self, cfg: PipelineConfig, config_path: Path, base_dir: Path,
                 stages: tuple[str, ...], argv: list[str] | None = None):
        self.cfg = cfg
        self.config_path = Path(config_path)
        self.base_dir = base_dir
        self.outputs_dir = _resolve(cfg.paths.outputs_dir, base_dir)
        self.processed_dir = _resolve(cfg.paths.processed_dir, base_dir)
        self.runs_dir = self.outputs_dir / RUNS_DIR
        self.run_id = new_run_id()
        self.dir = self.runs_dir / self.run_id
        self.keys: dict[str, Callable[[], tuple[str, dict[str, str]]]] = {}
        # stamps of finished stages, written by this thread once their files are hashed
        self._stamper = ThreadPoolExecutor(1, thread_name_prefix="rooftop-pv-stamp")
        self._stamps: list[Future] = []
        previous = output_runs(self.runs_dir)
        self.previous_dir = previous[-1] if previous else None
        self.manifest: dict[str, Any] = {
            "run_id": self.run_id,
            "status": "running",
            "started": _now(),
            "ended": None,
            "command": argv if argv is not None else sys.argv,
            "stages_requested": list(stages),
            "config": {"path": str(self.config_path),
                       "sha256": sha256_file(self.config_path),
                       "hash": cfg.section_hash()},
            "drop_files": [str(s.path) for s in cfg.sources if s.name.startswith("drop_")],
            "previous_output_run": self.previous_dir.name if self.previous_dir else None,
            "inputs": {},
            "stages": {},
            "outputs": {},
            "packages": package_versions(),
            "host": host_info(),
        }
        self._handler: logging.Handler | None = None

    # -- keys
    def key(self, stage: str) -> str:
        """The stage's key from the current files (computed once per stage)."""
        if stage not in self.keys:
            self.keys[stage] = stage_key_soon(self.cfg, stage, self.base_dir, self.config_path)
        return self.keys[stage]()[0]

    def up_to_date(self, stage: str) -> bool:
        """Whether ``stage`` can be skipped (see :func:`is_up_to_date`)."""
        return is_up_to_date(self.cfg, stage, self.base_dir, self.config_path, self.key(stage))

    # -- log file
    def open_log(self) -> Path:
        """Start writing the run's log (INFO and up) to ``<run folder>/run.log``."""
        self.dir.mkdir(parents=True, exist_ok=True)
        path = self.dir / "run.log"
        handler = logging.FileHandler(path, encoding="utf-8")
        handler.setFormatter(logging.Formatter(
            "%(asctime)s %(levelname)s %(name)s: %(message)s"))
        root, plog = logging.getLogger(), logging.getLogger("pipeline")
        self._saved = (plog.level, [(h, h.level) for h in root.handlers])
        for h in root.handlers:  # the console keeps its level (e.g. --quiet)
            if h.level == logging.NOTSET:
                h.setLevel(root.getEffectiveLevel())
        plog.addHandler(handler)
        plog.setLevel(logging.INFO)
        self._handler = handler
        return path

    def close_log(self) -> None:
        """Stop writing the log file."""
        if self._handler is not None:
            plog = logging.getLogger("pipeline")
            plog.removeHandler(self._handler)
            level, handlers = self._saved
            plog.setLevel(level)
            for h, lvl in handlers:
                h.setLevel(lvl)
            self._handler.close()
            self._handler = None

    # -- stages
    def skip(self, stage: str, if_changed: bool) -> bool:
        """Whether to skip ``stage``; records the skip. Call just before the stage.

        The stage key is taken here, from the inputs as they are when the
        stage starts: a file that changes while the stage reads it makes the
        next run redo the stage.
        """
        self.keys[stage] = stage_key_soon(self.cfg, stage, self.base_dir, self.config_path)
        if if_changed and self.up_to_date(stage):
            self.stage_skipped(stage)
            return True
        return False

    def stage_skipped(self, stage: str) -> None:
        """Record a stage skipped because its outputs are up to date."""
        stamp = read_stamp(self.cfg, stage, self.base_dir) or {}
        self.manifest["stages"][stage] = {
            "status": "up to date", "key": self.key(stage),
            "outputs_from_run": stamp.get("run_id"),
            "rows_in": stamp.get("rows_in"), "rows_out": stamp.get("rows_out"),
        }
        log.info("stage %s: up to date (outputs of run %s)", stage, stamp.get("run_id"))

    def stage_done(self, stage: str, result: Any, duration_s: float,
                   partitions: dict | None = None) -> None:
        """Record a stage that ran and stamp its outputs with its key (see :meth:`skip`).

        The stage's entry is in the manifest at once; its key, the inputs' and
        outputs' sha256 and the stamp beside the outputs follow once the files
        are hashed, in background threads while the next stage runs
        (:meth:`flush` waits for them).
        """
        if stage not in self.keys:
            self.keys[stage] = stage_key_soon(self.cfg, stage, self.base_dir, self.config_path)
        _, outputs, _ = stage_io(self.cfg, stage, self.base_dir, self.config_path)
        rows_in, rows_out, extra = stage_counts(stage, result)
        if stage == "report" and rows_in is None:
            rows_in, rows_out = _report_counts(inputs_dir=self.processed_dir,
                                               gpkg=self.outputs_dir / "rooftop_pv.gpkg")
        entry = {"status": "ran", "key": None, "duration_s": round(duration_s, 3),
                 "rows_in": rows_in, "rows_out": rows_out, **extra, "inputs": {}, "outputs": {}}
        if partitions:
            entry["partitions"] = partitions
        self.manifest["stages"][stage] = entry
        hashes = {p.name: sha256_soon(p) for p in outputs if p.is_file()}
        self._stamps.append(self._stamper.submit(self._stamp, stage, entry, self.keys[stage],
                                                 hashes))
        for downstream in _after(stage):  # their inputs changed under them
            self.keys.pop(downstream, None)

    def _stamp(self, stage: str, entry: dict, key_of: Callable[[], tuple[str, dict[str, str]]],
               hashes: dict[str, Future]) -> None:
        """Complete a stage's entry once its files are hashed, and write its stamp."""
        key, inputs = key_of()
        entry.update(key=key, inputs=inputs,
                     outputs={name: f.result() for name, f in hashes.items()})
        self.manifest["inputs"].update(inputs)
        stamp = {"stage": stage, "key": key, "run_id": self.run_id, "finished": _now(),
                 "rows_in": entry["rows_in"], "rows_out": entry["rows_out"],
                 "outputs": entry["outputs"]}
        _write_json_atomic(stamp, _stamp_path(self.cfg, stage, self.base_dir))

    def flush(self) -> None:
        """Wait until the stages that ran are stamped (raises what stamping raised)."""
        while self._stamps:
            self._stamps.pop(0).result()

    # -- finish
    def keep_outputs(self) -> None:
        """Copy the published outputs into the run folder.

        Copies, not hard links. The pipeline itself never writes into a
        published file (each run replaces it by renaming a new file over it,
        which would leave a hard-linked kept copy with the old content), but
        SQLite writes a GeoPackage in place: a planner who edits the published
        one in QGIS (or who saves a style into it) would change a hard-linked
        kept copy, and its sha256 in the manifest. The copy is a reflink
        (copy-on-write, instant) where the file system has them (Btrfs, XFS),
        else a kernel copy (``shutil.copy2``; ~1 s per GB).
        """
        from pipeline.io import atomic_path

        kept = [name for name in KEPT_OUTPUTS if (self.outputs_dir / name).is_file()]
        # their sha256 (usually remembered from stage_done) while they are copied
        digests = {name: sha256_soon(self.outputs_dir / name) for name in kept}
        for name in kept:
            with atomic_path(self.dir / name) as tmp:
                copy_file(self.outputs_dir / name, tmp)
        for name in kept:  # the copies' content: that of the published files
            self.manifest["outputs"][name] = digests[name].result()

    def finish(self, status: str, error: str | None = None) -> None:
        """Write the manifest; after a successful run with outputs, prune old runs.

        A failed run first waits for the stamps of the stages that ran before
        the failure (a stamp that fails then is logged, not raised).
        """
        if status != "ok":
            try:
                self.flush()
            except Exception:  # the run's own error is the one reported
                log.warning("run %s: a stage's outputs could not be stamped", self.run_id,
                            exc_info=True)
        self._stamper.shutdown(wait=True)
        self.manifest["status"] = status
        self.manifest["ended"] = _now()
        if error:
            self.manifest["error"] = error
        self.dir.mkdir(parents=True, exist_ok=True)
        _write_json_atomic(self.manifest, self.dir / "manifest.json")
        if status == "ok":
            removed = prune_runs(self.runs_dir, self.cfg.runs.keep_runs, protect=self.dir)
            if removed:
                log.info("runs: removed %d old run folder(s) (keep_runs=%d)", len(removed),
                         self.cfg.runs.keep_runs)


def _after(stage: str) -> tuple[str, ...]:
    from pipeline.cli import STAGES

    return STAGES[STAGES.index(stage) + 1:]


def stage_counts(stage: str, result: Any) -> tuple[int | None, int | None, dict]:
    """Rows in and out from a stage runner's returned statistics.

    Parameters
    ----------
    stage : str
        The stage.
    result : Any
        What its runner returned.

    Returns
    -------
    rows_in, rows_out : int or None
        For ingest, features read and buildings kept (the rest are rejected).
    extra : dict
        ``rows_rejected`` for ingest.
    """
    if not isinstance(result, dict):
        return None, None, {}
    if stage == "ingest":
        read = sum(int(a["read"]) for a in result.values())
        kept = sum(int(a["kept"]) for a in result.values())
        return read, kept, {"rows_rejected": read - kept}
    rows_in, rows_out = result.get("rows_in"), result.get("rows_out")
    return (int(rows_in) if rows_in is not None else None,
            int(rows_out) if rows_out is not None else None, {})


def _report_counts(inputs_dir: Path, gpkg: Path) -> tuple[int | None, int | None]:
    """Buildings into the report stage and in the GeoPackage's ``buildings`` layer."""
    import pyarrow.parquet as pq
    import pyogrio

    try:
        rows_in = pq.read_metadata(inputs_dir / "yield_buildings.parquet").num_rows
        rows_out = int(pyogrio.read_info(gpkg, layer="buildings")["features"])
    except (OSError, ValueError, pyogrio.errors.DataSourceError):
        return None, None
    return rows_in, rows_out


_CURRENT: list[RunRecord] = []


def current() -> RunRecord | None:
    """The run in progress in this process (None outside :func:`run_context`)."""
    return _CURRENT[-1] if _CURRENT else None


def append_history(runs_dir: Path, line: str) -> None:
    """Append one line to ``outputs/runs/history.log`` (every call, incl. no-ops)."""
    runs_dir.mkdir(parents=True, exist_ok=True)
    with open(runs_dir / HISTORY, "a", encoding="utf-8") as f:
        f.write(f"{_now()} {line}\n")


@contextlib.contextmanager
def run_context(cfg: PipelineConfig, config_path: Path, base_dir: Path,
                stages: tuple[str, ...], lock_timeout_s: float | None = None,
                argv: list[str] | None = None) -> Iterator[RunRecord]:
    """Lock, clean up, record and cache one run.

    Parameters
    ----------
    cfg : PipelineConfig
        The configuration (with the drop sources).
    config_path : Path
        The config file.
    base_dir : Path
        Project root.
    stages : tuple of str
        Stages asked for.
    lock_timeout_s : float, optional
        Override of ``runs.lock_timeout_s``.
    argv : list of str, optional
        The command line for the manifest.

    Yields
    ------
    RunRecord
        The run; the caller records stages on it. The manifest is written on
        exit with status ``ok``, or ``failed`` and the error.
    """
    from pipeline.incremental import partition_cache

    outputs_dir = _resolve(cfg.paths.outputs_dir, base_dir)
    processed_dir = _resolve(cfg.paths.processed_dir, base_dir)
    timeout = cfg.runs.lock_timeout_s if lock_timeout_s is None else lock_timeout_s
    holder = (f"pid {os.getpid()} on {socket.gethostname()}, started {_now()}, "
              f"config {config_path}")
    with run_lock(outputs_dir / LOCK_NAME, timeout, holder):
        clean_stale_temps(outputs_dir, processed_dir)
        record = RunRecord(cfg, config_path, base_dir, stages, argv)
        _CURRENT.append(record)
        try:
            cache = (partition_cache(processed_dir / CACHE_DIR, cfg.runs.partition_grid_m)
                     if cfg.runs.partition_cache else contextlib.nullcontext())
            with cache:
                yield record
            record.flush()  # the stamps of the last stages, before the run counts as done
        except BaseException as exc:
            if not isinstance(exc, PipelineError):
                log.error("run %s failed", record.run_id, exc_info=True)
            if record.dir.exists():
                record.finish("failed", f"{type(exc).__name__}: {exc}")
                append_history(record.runs_dir, f"{record.run_id} failed: {exc}")
            raise
        else:
            if record.dir.exists():
                record.finish("ok")
                ran = [s for s, e in record.manifest["stages"].items() if e["status"] == "ran"]
                append_history(record.runs_dir, f"{record.run_id} ok: ran {', '.join(ran)}")
        finally:
            _CURRENT.remove(record)
            record._stamper.shutdown(wait=True)
            record.close_log()
