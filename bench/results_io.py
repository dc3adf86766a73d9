"""Result rows: the CSV schema, device identification, provenance (versions, git revision).

One CSV per device, `<results folder>/<device-slug>.csv`; rows are appended, a re-run adds
new rows and readers take the last row per key. Columns (exactly, in this order) are
`COLUMNS`; `timestamp` is when the row was measured, UTC, ISO 8601 ('2026-12-01T20:41:07Z').
A file written before the timestamp column existed (`LEGACY_COLUMNS`) is upgraded in place
on the next append: its old rows get an empty timestamp.
`h_student` / `h_teacher` are the hidden sizes of fused-linear rows; dense rows hold 0, 0;
sparse (top-k teacher) rows hold 0 and k, the teacher entries per token. `gbps` is filled for
byte-bound losses (dense, sparse), `tflops` for the fused-linear loss; the other is empty.
"""

from __future__ import annotations

import csv
import os
import platform
import re
import subprocess
from typing import Dict, Iterable, List, Optional

import torch

COLUMNS = (
    "loss", "provider", "mode", "dtype", "n", "v", "h_student", "h_teacher",
    "median_ms", "p20_ms", "p80_ms", "peak_mem_mb", "gbps", "tflops", "roofline_pct",
    "device", "torch", "triton", "git_rev", "timestamp",
)
LEGACY_COLUMNS = COLUMNS[:-1]
KEY_COLUMNS = ("loss", "provider", "mode", "dtype", "n", "v", "h_student", "h_teacher",
               "device")
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.realpath(__file__)))


def slugify(text: str) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'nvidia-h100-80gb-hbm3'."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def cpu_model_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def device_name(device: torch.device) -> str:
    """Human-readable device, as written in the `device` column."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{cpu_model_name()} ({torch.get_num_threads()} threads)"


def device_slug(device: torch.device) -> str:
    """File-name slug: `nvidia-h100-80gb-hbm3`, `cpu-amd-epyc`."""
    if device.type == "cuda":
        return slugify(torch.cuda.get_device_name(device))
    return "cpu-" + slugify(cpu_model_name())


def triton_version() -> str:
    try:
        import triton
    except Exception:  # not installed, or broken
        return ""
    return getattr(triton, "__version__", "")


def _git(root: str, *args: str) -> str:
    return subprocess.run(["git", "-C", root, *args], capture_output=True, text=True,
                          timeout=10, check=True).stdout.strip()


def installed_version() -> str:
    """fastkd's version as recorded in its package metadata when it was built."""
    from importlib import metadata

    try:
        return metadata.version("fastkd")
    except metadata.PackageNotFoundError:
        import fastkd

        return getattr(fastkd, "__version__", "unknown")


def git_rev(root: str = REPO_ROOT) -> str:
    """The revision of the benchmarked code.

    The environment variable FASTKD_GIT_REV when set (a copy of the tree without .git, e.g.
    on a lent GPU machine). In a git checkout of fastkd (an editable install): the short HEAD
    revision, with '+dirty' when the benchmarked sources differ from it. Otherwise (an
    installed package, or no git):
    'v' + the version recorded at build time, e.g. 'v0.1.0'. A git repository that merely
    encloses an installed package (a virtual environment inside some project) is not used.
    """
    recorded = os.environ.get("FASTKD_GIT_REV")   # set by scripts/gpu_check.py (no .git there)
    if recorded:
        return recorded
    try:
        top = _git(root, "rev-parse", "--show-toplevel")
        if os.path.realpath(top) != os.path.realpath(root):
            raise OSError("not a fastkd checkout")
        rev = _git(root, "rev-parse", "--short", "HEAD")
        dirty = _git(root, "status", "--porcelain", "--", "fastkd", "kernels", "csrc",
                     "bench/*.py")
    except (OSError, subprocess.SubprocessError):
        return "v" + installed_version()
    return rev + ("+dirty" if dirty else "")


def format_value(value) -> str:
    """CSV text of one value: '' for None or NaN; floats to 5 significant figures, written
    without an exponent (14610.0 -> '14610', 0.00047941 -> '0.00047941')."""
    if value is None:
        return ""
    if isinstance(value, float):
        if value != value:
            return ""
        rounded = float(f"{value:.5g}")
        return f"{rounded:.12f}".rstrip("0").rstrip(".")
    return str(value)


def _upgrade_legacy(path: str) -> None:
    """Rewrites a CSV with `LEGACY_COLUMNS` under `COLUMNS` (empty new cells)."""
    rows = read_rows(path)
    tmp = path + ".upgrade"
    with open(tmp, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(COLUMNS)
        for row in rows:
            writer.writerow([row.get(c, "") for c in COLUMNS])
    os.replace(tmp, path)


def append_rows(path: str, rows: Iterable[Dict[str, object]]) -> int:
    """Appends rows (dicts keyed by COLUMNS) to `path`, writing the header to a new file.

    Parameters
    ----------
    path : str
        The CSV file; its folder is created if needed.
    rows : iterable of dict
        Each keyed by exactly `COLUMNS`.

    Returns
    -------
    int
        The number of rows written. Raises ValueError for rows with other keys, or for an
        existing file whose header is neither `COLUMNS` nor `LEGACY_COLUMNS`.
    """
    rows = list(rows)
    for row in rows:
        if set(row) != set(COLUMNS):
            raise ValueError(f"row keys {sorted(row)} differ from COLUMNS {list(COLUMNS)}")
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    is_new = not os.path.exists(path) or os.path.getsize(path) == 0
    if not is_new:
        header = read_header(path)
        if header == list(LEGACY_COLUMNS):
            _upgrade_legacy(path)
        elif header != list(COLUMNS):
            raise ValueError(f"{path} has columns {header}, expected {list(COLUMNS)}")
    with open(path, "a", newline="") as f:
        writer = csv.writer(f)
        if is_new:
            writer.writerow(COLUMNS)
        for row in rows:
            writer.writerow([format_value(row[c]) for c in COLUMNS])
    return len(rows)


def read_header(path: str) -> List[str]:
    with open(path, newline="") as f:
        return next(csv.reader(f), [])


def read_rows(path: str) -> List[Dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def latest_rows(rows: Iterable[Dict[str, str]]) -> List[Dict[str, str]]:
    """The last row for each key (a re-run supersedes earlier rows), in order of appearance."""
    latest: Dict[tuple, Dict[str, str]] = {}
    for row in rows:
        key = tuple(row[c] for c in KEY_COLUMNS)
        latest.pop(key, None)
        latest[key] = row
    return list(latest.values())


def as_float(text: Optional[str]) -> Optional[float]:
    return float(text) if text not in (None, "") else None
