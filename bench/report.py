"""Results: the runs of each scenario summarized into rows, printed as tables, written as JSON."""

from __future__ import annotations

import json
import os
import statistics
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from scenarios import Config, Scenario
from servers import Server


@dataclass
class Run:
    """One run of one scenario on one server: its figure or its error, and the cores it kept busy."""

    value: float | None = None
    p99_ms: float | None = None
    error: str | None = None
    note: str = ""
    seconds: float = 0.0
    cpu_server: float | None = None     # cores busy in the server process
    cpu_children: float | None = None   # cores busy in its children (Moorage: etcd)
    cpu_bench: float | None = None      # cores busy in the load generators
    cpu_other: float | None = None      # cores busy in anything else on the machine
    # CPU time of the server and its children per unit of the row (request, MiB,
    # operation), in microseconds: the figure that carries to a machine with more cores.
    cpu_us_per_op: float | None = None


def median_of(runs: list[Run], attr: str) -> float | None:
    values = [getattr(r, attr) for r in runs if r.error is None and getattr(r, attr) is not None]
    return statistics.median(values) if values else None


def summarize(sc: Scenario, runs: dict[str, list[Run]]) -> dict[str, Any]:
    row: dict[str, Any] = {"scenario": sc.title, "unit": sc.unit, "target": sc.target}
    for name, rs in runs.items():
        row[name] = {
            "median": median_of(rs, "value"), "p99_ms": median_of(rs, "p99_ms"),
            **{k: median_of(rs, k) for k in ("cpu_server", "cpu_children", "cpu_bench", "cpu_other",
                                             "cpu_us_per_op")},
            "errors": [r.error for r in rs if r.error], "runs": [asdict(r) for r in rs],
            "note": "; ".join(r.note for r in rs if r.note and r.error is None),
        }
    m = row.get("moorage", {}).get("median")
    d = row.get(sc.baseline, {}).get("median")
    row["baseline"] = sc.baseline
    row["ratio"] = m / d if m and d else None
    row["met"] = None if row["ratio"] is None else row["ratio"] >= sc.target
    return row


def fmt_value(side: dict | None) -> str:
    if not side:
        return "-"
    if side["median"] is None:
        return "ERROR"
    text = f"{side['median']:,.0f}"
    if side["p99_ms"] is not None:
        text += f" (p99 {side['p99_ms']:.1f} ms)"
    if side["errors"]:
        text += f" [{len(side['errors'])} failed]"
    if side.get("note"):
        text += f" ({side['note']})"
    return text


def fmt_cpu(side: dict | None) -> str:
    if not side or side.get("cpu_us_per_op") is None:
        return "-"
    return f"{side['cpu_us_per_op']:,.0f}"


def cpu_unit(unit: str) -> str:
    return {"req/s": "request", "MiB/s": "MiB", "ops/s": "op"}.get(unit, unit.removesuffix("/s"))


def render(head: list[str], body: list[list[str]]) -> None:
    """A plain fixed-width table: readable in a terminal and in a CI log alike."""
    widths = [max(len(r[i]) for r in [head, *body]) for i in range(len(head))]
    for cells in [head, ["-" * w for w in widths], *body]:
        print("  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip())


def print_table(rows: list[dict], names: list[str]) -> None:
    body = []
    for row in rows:
        ratio = f"{row['ratio']:.2f}x" if row["ratio"] is not None else "-"
        status = {True: "met", False: "NOT met",
                  None: "-" if "moorage" not in names or len(names) < 2 else "error"}[row["met"]]
        against = "" if row["baseline"] == "distribution" else f" {row['baseline']}"
        body.append([row["scenario"], row["unit"], *(fmt_value(row.get(n)) for n in names),
                     ratio, f">={row['target']:g}x{against}", status,
                     cpu_unit(row["unit"]), *(fmt_cpu(row.get(n)) for n in names)])
    print()
    # CPU per unit: the server's own time (Moorage: every process of the replica, etcd
    # included) per request, MiB or operation; unlike the rates it does not depend on how
    # many cores the machine has or how much of them the load generator took.
    render(["scenario", "unit", *names, "ratio M/D", "target", "status", "per",
            *(f"{short(n)} CPU us" for n in names)], body)
    if any(row["baseline"] != "distribution" for row in rows):
        print("(a target naming another column is the ratio against that column: Moorage / it)")
    print_errors(rows, names)
    print_cpu(rows, names)


def print_errors(rows: list[dict], names: list[str]) -> None:
    errors = [(row["scenario"], n, e) for row in rows for n in names
              for e in dict.fromkeys(row.get(n, {}).get("errors", []))]
    if errors:
        print("\nErrors:")
        for scenario, name, err in errors:
            print(f"  {scenario} / {name}: {err}")


def short(name: str) -> str:
    """A column's initial in the CPU tables: M, D, and S3 for the direct reads from the store."""
    return "S3" if name == "direct" else name[0].upper()


CPU_COLUMNS = {"cpu_server": "server", "cpu_children": "children", "cpu_bench": "bench",
               "cpu_other": "other"}


def print_cpu(rows: list[dict], names: list[str]) -> None:
    """Where the cores went during the runs (medians).

    server ~1.0 with little else: one Python process is the bottleneck.
    children high: etcd is. other > 0: something outside the bench competed.
    """
    print(f"\nCPU during the runs, cores busy (the machine has {os.cpu_count()}); "
          "children = etcd and the worker processes for Moorage, and SeaweedFS with --s3; "
          "bench = curl/wrk/the Python clients:")
    head, body = ["scenario"], []
    for n in names:
        head += [f"{short(n)} {label}" for label in CPU_COLUMNS.values()]
    for row in rows:
        cells = [row["scenario"]]
        for n in names:
            side = row.get(n) or {}
            cells += ["-" if side.get(k) is None else f"{side[k]:.2f}" for k in CPU_COLUMNS]
        body.append(cells)
    render(head, body)
    busy = [row[n]["cpu_other"] for row in rows for n in names
            if (row.get(n) or {}).get("cpu_other") is not None]
    if busy and max(busy) > 0.25:
        print(f"WARNING: other processes kept up to {max(busy):.2f} cores busy during the runs: "
              "absolute figures are low and ratios noisy; rerun on a quiet machine.")


def print_memory(servers: list[Server]) -> dict[str, Any]:
    print("\nPeak RSS (VmHWM):")
    report = {}
    for s in servers:
        mem = s.memory_report()
        report[s.name] = mem
        kids = ", ".join(f"{k} {v / 1024:.0f} MiB" for k, v in mem["children_kib"].items())
        print(f"  {s.name:<13} server {mem['server_kib'] / 1024:.0f} MiB"
              + (f" + {kids}" if kids else "") + f" = {mem['total_kib'] / 1024:.0f} MiB")
    return report


def write_json(path: Path, env: dict[str, str], cfg: Config, rows: list[dict],
               memory: dict[str, Any], took: float) -> None:
    """All results in one file: what was measured, with which sizes, and every run."""
    path.write_text(json.dumps({"environment": env, "config": asdict(cfg), "rows": rows,
                                "memory": memory, "seconds": took}, indent=2))
