"""The console report of `fastkd bench`: one aligned table per measured case, then the peers'
formulas, the providers that could not run (and why) and any failures."""

from __future__ import annotations

import math
import sys
from typing import Dict, List, Optional, Sequence

from .providers import PEER_NOTES


class Report:
    """What a run produced: rows measured, providers skipped (with the reason), failures,
    and the loss value each provider computed (a check that they compute one function)."""

    def __init__(self):
        self.rows: List[Dict[str, object]] = []
        self.skipped: Dict[tuple, str] = {}
        self.failed: List[str] = []
        self.values: Dict[tuple, float] = {}

    @staticmethod
    def value_key(loss, dtype_name, n, v, hs, ht, provider) -> tuple:
        return (loss, dtype_name, n, v, hs, ht, provider)


def significant(value: Optional[float], digits: int = 4) -> str:
    """`value` to `digits` significant figures without an exponent; '-' for None or NaN.

    14610.03 -> '14610', 4.76512 -> '4.765', 0.0083199 -> '0.008320', 0 -> '0'.
    """
    if value is None or value != value:
        return "-"
    if value == 0 or math.isinf(value):
        return str(value) if math.isinf(value) else "0"
    magnitude = math.floor(math.log10(abs(value)))
    decimals = max(0, digits - 1 - magnitude)
    return f"{value:.{decimals}f}"


def format_table(header: Sequence[str], rows: Sequence[Sequence[str]],
                 left: int = 1, indent: str = "  ") -> List[str]:
    """Lines of a text table: the first `left` columns left-aligned, the rest right-aligned,
    every column as wide as its widest cell, columns separated by two spaces."""
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows)]

    def line(cells) -> str:
        parts = [str(c).ljust(w) if i < left else str(c).rjust(w)
                 for i, (c, w) in enumerate(zip(cells, widths))]
        return (indent + "  ".join(parts)).rstrip()

    return [line(header)] + [line(r) for r in rows]


TABLE_HEADER = ("provider", "median ms", "p20-p80 ms", "peak MiB", "GB/s", "TFLOP/s",
                "% roofline", "vs eager", "loss")


def case_title(loss, mode, dtype, n, v, hs, ht) -> str:
    shape = f"N={n} V={v}"
    if loss == "sparse_distillation":
        shape += f" k={ht}"
    elif hs:
        shape += f" Hs={hs} Ht={ht}"
    return f"{loss} {mode} {dtype} {shape}"


def case_rows(rows: List[dict], values: Dict[tuple, float]) -> List[List[str]]:
    """Table cells of one case's rows (all sharing loss, mode, dtype and shape)."""
    eager = next((r["median_ms"] for r in rows if r["provider"] == "eager"), None)
    cells = []
    for r in rows:
        key = Report.value_key(r["loss"], r["dtype"], r["n"], r["v"], r["h_student"],
                               r["h_teacher"], r["provider"])
        speed = "-" if eager is None else significant(eager / r["median_ms"], 3) + "x"
        cells.append([r["provider"], significant(r["median_ms"]),
                      f"{significant(r['p20_ms'])}-{significant(r['p80_ms'])}",
                      significant(r["peak_mem_mb"], 3), significant(r["gbps"], 3),
                      significant(r["tflops"], 3), significant(r["roofline_pct"], 3), speed,
                      significant(values.get(key), 6)])
    return cells


def print_report(report: Report, out=None) -> None:
    """Prints the tables, notes, skipped providers and failures of `report`."""
    out = out or sys.stdout
    groups: Dict[tuple, list] = {}
    for row in report.rows:
        key = (row["loss"], row["mode"], row["dtype"], row["n"], row["v"], row["h_student"],
               row["h_teacher"])
        groups.setdefault(key, []).append(row)
    for key, rows in groups.items():
        print(f"\n{case_title(*key)}", file=out)
        print("\n".join(format_table(TABLE_HEADER, case_rows(rows, report.values))), file=out)
    notes = {(loss, p): PEER_NOTES[(loss, p)] for loss, p in
             {(r["loss"], r["provider"]) for r in report.rows} if (loss, p) in PEER_NOTES}
    if notes or report.skipped or report.failed:
        print(file=out)
    for (loss, provider), note in sorted(notes.items()):
        print(f"note {loss}/{provider}: {note}", file=out)
    for (loss, provider), reason in report.skipped.items():
        print(f"skipped {loss}/{provider}: {reason} (no row written)", file=out)
    for failure in report.failed:
        print(f"FAILED {failure}", file=out)
