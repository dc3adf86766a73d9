"""Render the results folder: PNGs per device and a markdown summary (SUMMARY.md).

For each `<device-slug>.csv` (the last row per key, so re-runs supersede older rows):
- time and % of roofline against V, one line per provider, where a group has several V;
- peak memory against N where a group has several N;
- otherwise a bar chart per shape: median time with its 20-80% range, and peak memory.
A sweep's PNG is linked once, under the table of its largest shape.
SUMMARY.md gets one table per (loss, mode, dtype, shape) with the device's measured ceilings,
the peers' equivalents and links to the PNGs. matplotlib is needed only here.
"""

from __future__ import annotations

import glob
import json
import os
import time
from typing import Dict, List

from .models import MODES
from .providers import PEER_NOTES
from .report import significant
from .results_io import as_float, latest_rows, read_rows

SHAPE_COLUMNS = ("n", "v", "h_student", "h_teacher")


def _group(rows: List[dict], columns: tuple) -> Dict[tuple, List[dict]]:
    groups: Dict[tuple, List[dict]] = {}
    for row in rows:
        groups.setdefault(tuple(row[c] for c in columns), []).append(row)
    return groups


def _shape_label(loss: str, n, v, hs, ht) -> str:
    if loss == "fused_linear_distillation":
        return f"N={n} V={v} Hs={hs} Ht={ht}"
    if loss == "sparse_distillation":
        return f"N={n} V={v} k={ht}"
    return f"N={n} V={v}"


def _file_name(*parts) -> str:
    return "-".join(str(p).replace("+", "-") for p in parts) + ".png"


def _by_provider(rows: List[dict], x: str) -> Dict[str, List[dict]]:
    lines: Dict[str, List[dict]] = {}
    for row in sorted(rows, key=lambda r: int(r[x])):
        lines.setdefault(row["provider"], []).append(row)
    return lines


def _sweep_v(plt, rows, title, path) -> None:
    fig, (ax_t, ax_r) = plt.subplots(1, 2, figsize=(11, 4))
    for provider, line in _by_provider(rows, "v").items():
        xs = [int(r["v"]) for r in line]
        ax_t.plot(xs, [float(r["median_ms"]) for r in line], marker="o", label=provider)
        pct = [as_float(r["roofline_pct"]) for r in line]
        if all(p is not None for p in pct):
            ax_r.plot(xs, pct, marker="o", label=provider)
    ax_t.set(xscale="log", yscale="log", xlabel="V", ylabel="median ms", title=title)
    ax_r.set(xscale="log", xlabel="V", ylabel="% of roofline", title="% of measured roofline")
    ax_t.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _sweep_n(plt, rows, title, path) -> None:
    fig, ax = plt.subplots(figsize=(6, 4))
    for provider, line in _by_provider(rows, "n").items():
        ax.plot([int(r["n"]) for r in line], [float(r["peak_mem_mb"]) for r in line],
                marker="o", label=provider)
    ax.set(xscale="log", yscale="log", xlabel="N", ylabel="peak extra MiB", title=title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _bars(plt, rows, title, path) -> None:
    rows = sorted(rows, key=lambda r: float(r["median_ms"]))
    names = [r["provider"] for r in rows]
    med = [float(r["median_ms"]) for r in rows]
    err = [[m - float(r["p20_ms"]) for m, r in zip(med, rows)],
           [float(r["p80_ms"]) - m for m, r in zip(med, rows)]]
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(11, 3.5))
    ax_t.bar(names, med, yerr=err, capsize=4)
    ax_t.set(ylabel="median ms (bars: 20-80%)", title=title)
    ax_m.bar(names, [float(r["peak_mem_mb"]) for r in rows], color="tab:orange")
    ax_m.set(ylabel="peak extra MiB", title="peak memory")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def render_plots(rows: List[dict], plot_dir: str) -> Dict[tuple, List[str]]:
    """Writes the PNGs; returns {(loss, mode, dtype, n, v, hs, ht): [png paths]}."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(plot_dir, exist_ok=True)
    images: Dict[tuple, List[str]] = {}

    swept = set()  # shapes shown by a sweep: no bar chart of their own

    def key_of(row) -> tuple:
        return (row["loss"], row["mode"], row["dtype"]) + tuple(row[c] for c in SHAPE_COLUMNS)

    def attach_sweep(path, group_rows):
        keys = {key_of(r) for r in group_rows}
        swept.update(keys)
        images.setdefault(max(keys, key=lambda k: tuple(int(x) for x in k[3:])), []).append(path)

    for (loss, mode, dtype, n, hs, ht), group in _group(
            rows, ("loss", "mode", "dtype", "n", "h_student", "h_teacher")).items():
        if len({r["v"] for r in group}) > 1:
            path = os.path.join(plot_dir, _file_name(loss, mode, dtype, f"n{n}", hs, ht, "vs-v"))
            _sweep_v(plt, group, f"{loss} {mode} {dtype} N={n}", path)
            attach_sweep(path, group)
    for (loss, mode, dtype, v, hs, ht), group in _group(
            rows, ("loss", "mode", "dtype", "v", "h_student", "h_teacher")).items():
        if len({r["n"] for r in group}) > 1:
            path = os.path.join(plot_dir, _file_name(loss, mode, dtype, f"v{v}", hs, ht, "vs-n"))
            _sweep_n(plt, group, f"{loss} {mode} {dtype} V={v}: memory", path)
            attach_sweep(path, group)
    for key, group in _group(rows, ("loss", "mode", "dtype") + SHAPE_COLUMNS).items():
        if len(group) > 1 and key not in swept:
            loss, mode, dtype, n, v, hs, ht = key
            path = os.path.join(plot_dir, _file_name(loss, mode, dtype, n, v, hs, ht, "bars"))
            _bars(plt, group, f"{loss} {mode} {dtype} {_shape_label(loss, n, v, hs, ht)}", path)
            images.setdefault(key, []).append(path)
    return images


def _cell(text, spec) -> str:
    value = as_float(text)
    return "-" if value is None else format(value, spec)


def _sig(text, digits: int = 3) -> str:
    return significant(as_float(text), digits)


def _table(group: List[dict]) -> List[str]:
    eager = next((float(r["median_ms"]) for r in group if r["provider"] == "eager"), None)
    lines = ["| provider | median ms | p20–p80 ms | peak extra MiB | GB/s | TFLOP/s | "
             "% roofline | vs eager | git |", "|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in sorted(group, key=lambda r: float(r["median_ms"])):
        med = float(r["median_ms"])
        speed = "-" if eager is None else f"{eager / med:.2f}x"
        lines.append(f"| {r['provider']} | {med:.3f} | {_cell(r['p20_ms'], '.3f')}–"
                     f"{_cell(r['p80_ms'], '.3f')} | {_sig(r['peak_mem_mb'])} | "
                     f"{_cell(r['gbps'], '.2f')} | {_cell(r['tflops'], '.4f')} | "
                     f"{_cell(r['roofline_pct'], '.1f')} | {speed} | {r['git_rev']} |")
    return lines


def _device_section(csv_path: str, rows: List[dict], images, out_dir: str) -> List[str]:
    slug = os.path.basename(csv_path)[:-4]
    devices = sorted({r["device"] for r in rows})
    lines = [f"## {', '.join(devices)}", "",
             f"Rows: [`{os.path.basename(csv_path)}`]({os.path.basename(csv_path)}); torch "
             f"{', '.join(sorted({r['torch'] for r in rows}))}, triton "
             f"{', '.join(sorted({r['triton'] or '-' for r in rows}))}."]
    ceilings_path = os.path.join(out_dir, f"{slug}-ceilings.json")
    if os.path.exists(ceilings_path):
        with open(ceilings_path) as f:
            ceilings = json.load(f)
        listed = ", ".join(f"{k} = {v}" for k, v in sorted(ceilings.items()))
        lines.append(f"Measured ceilings ([`{os.path.basename(ceilings_path)}`]"
                     f"({os.path.basename(ceilings_path)})): {listed}.")
    order = {m: i for i, m in enumerate(MODES)}
    groups = _group(rows, ("loss", "mode", "dtype") + SHAPE_COLUMNS)
    for key in sorted(groups, key=lambda k: (k[0], order.get(k[1], 9), k[2],
                                             *(int(x) for x in k[3:]))):
        loss, mode, dtype, n, v, hs, ht = key
        lines += ["", f"### {loss}, {mode}, {dtype}, {_shape_label(loss, n, v, hs, ht)}", ""]
        lines += _table(groups[key])
        for path in images.get(key, []):
            rel = os.path.relpath(path, out_dir)
            lines += ["", f"![{os.path.basename(path)}]({rel})"]
    notes = sorted({(r["loss"], r["provider"]) for r in rows} & set(PEER_NOTES))
    if notes:
        lines += ["", "Providers' formulas:"]
        lines += [f"- {loss} / {p}: {PEER_NOTES[(loss, p)]}" for loss, p in notes]
    return lines


HEADER = """# Benchmark results

Generated by `fastkd bench --plot` ({date}) from the CSV files in this folder; every number
below is a row of those files. Times are medians of repeated runs with their 20% / 80%
quantiles (GPU: CUDA events, L2 flushed before each run; CPU: wall clock, inputs rotated
beyond the last-level cache). Peak extra memory is what one step allocates beyond its inputs
(MiB; GPU: `max_memory_allocated`; CPU: peak of the allocations the profiler tracked).
GB/s uses the byte floor (dense fwd+bwd: `3*N*V*bytes`), TFLOP/s the fused-linear FLOP floor
`2*N*V*(3*Hs+Ht)`; % roofline compares with the device's measured copy bandwidth or matmul
rate (the models are documented in `fastkd.bench.models`). On a CPU other processes may have
competed with a run: compare rows of one run.
"""


def render(out_dir: str) -> List[str]:
    """Renders PNGs into `<out_dir>/plots/` and writes `<out_dir>/SUMMARY.md`; returns a log."""
    log = []
    sections = [HEADER.format(date=time.strftime("%Y-%m-%d"))]
    for csv_path in sorted(glob.glob(os.path.join(out_dir, "*.csv"))):
        rows = latest_rows(read_rows(csv_path))
        if not rows:
            continue
        slug = os.path.basename(csv_path)[:-4]
        try:
            images = render_plots(rows, os.path.join(out_dir, "plots", slug))
        except ImportError as exc:
            log.append(f"plots skipped ({exc}); pip install matplotlib")
            images = {}
        log += [f"wrote {p}" for p in sorted({p for ps in images.values() for p in ps})]
        sections.append("\n".join(_device_section(csv_path, rows, images, out_dir)))
    summary = os.path.join(out_dir, "SUMMARY.md")
    with open(summary, "w") as f:
        f.write("\n\n".join(sections) + "\n")
    log.append(f"wrote {summary}")
    return log
