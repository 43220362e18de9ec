#!/usr/bin/env python3
"""Moorage against the reference registry (CNCF distribution), same workload.

Both registries run side by side on loopback. Every scenario runs on registry A,
then on registry B, for several rounds, so that drift of the machine (page
cache, writeback, thermal state) hits both alike; the table reports medians and
the ratio Moorage / distribution against the project's targets.

Usage: bench/bench.py [--quick] [--only moorage|distribution] [--insecure-http] [--s3] [--workers N]
                      [--json FILE]

Both serve HTTPS (Moorage with its cluster CA, distribution with a certificate
the bench makes), unless --insecure-http runs both over plain HTTP. Moorage's
requests carry a Bearer token from its token endpoint, as docker's do;
distribution runs without authentication (its token auth needs an external
token server).

With --s3 (`make bench-s3`) both keep their blobs in S3 buckets of one
SeaweedFS the bench starts (objectstore.py), and the table has the S3 rows
and targets: pulls through a registry's redirect, and Moorage's pulls
streamed through it, against curl reading the same bytes straight from the
store (the `direct` column), and a garbage collection of 100,000 blobs
(s3_gc.py).

Nothing here talks to anything but 127.0.0.1. Every subprocess and network call
has a timeout, so a dead server turns into an error in its row, never a hang.

This file is the entry point and the run loop; the rest lives beside it:
servers.py (the registry processes, their CPU and memory), load.py (HTTP
clients, curl and wrk), scenarios.py (sizes, seeding, the rows), report.py
(summaries, tables, JSON), content.py (digests, images, the big blob).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from content import MiB, SourceFile
from load import BenchError
from report import Run, print_memory, print_table, summarize, write_json
from scenarios import QUICK, Config, Scenario, make_seed, s3_scenarios, scenarios, seed_server
from servers import CpuMeter, Server, distribution_server, moorage_server, wait_for_quiet
from objectstore import WEED, DirectRead, ObjectStore
from s3_gc import GcWorkload


# --------------------------------------------------------------------------
# Running: every scenario on every server, round after round

def measure(sc: Scenario, server: Server, rnd: int, quiet_wait: float) -> Run:
    """One run of one scenario on one server; any failure becomes the run's error."""
    try:
        server.check_alive()
        if sc.needs_seed and server.seed_error:
            raise BenchError(f"seeding failed: {server.seed_error}")
        ctx = sc.prepare(server, rnd)
        # Each run starts with no dirty pages: a registry that does not sync
        # (distribution) would otherwise have its writes flushed by the kernel
        # during the other registry's run, which alternates with it.
        os.sync()
        wait_for_quiet(quiet_wait)
        meter = CpuMeter(server)
        m = sc.run(server, ctx)
        cpu = meter.stop()
        busy = (cpu["cpu_server"] + cpu["cpu_children"]) * cpu["seconds"]
        per_op = busy / m.ops * 1e6 if m.ops else None
        return Run(m.value, m.p99_ms, None, m.note, cpu_us_per_op=per_op, **cpu)
    except Exception as exc:  # noqa: BLE001 - one row's failure must not end the bench
        alive = server.proc is not None and server.proc.poll() is None
        msg = f"{type(exc).__name__}: {exc}".splitlines()[0][:160]
        return Run(error=msg if alive else f"server died: {msg}")
    finally:
        server.observe_memory()


def run_bench(cfg: Config, servers: list[Server], src: SourceFile, workdir: Path,
              quiet_wait: float, wanted: set[str] = frozenset(), store: ObjectStore | None = None) -> list[dict]:
    seed = make_seed(cfg, src)
    for s in servers:
        print(f"seeding {s.name} ...", flush=True)
        try:
            if isinstance(s, DirectRead):
                s.seed(src)
            else:
                seed_server(s, seed, src, cfg)
        except Exception as exc:  # noqa: BLE001
            s.seed_error = f"{type(exc).__name__}: {exc}".splitlines()[0][:200]
            print(f"  seeding {s.name} failed: {s.seed_error}", flush=True)
        s.observe_memory()
        s.seeded_kib = sum(s.peak_kib.values())
    head_lua = workdir / "head.lua"
    head_lua.write_text('wrk.method = "HEAD"\n')
    rows = []
    if store is None:
        table = scenarios(cfg, src, seed, head_lua)
    else:
        table = s3_scenarios(cfg, src, seed, head_lua, GcWorkload(store, cfg.gc_blobs, cfg.gc_manifests))
    unknown = wanted - {sc.key for sc in table}
    if unknown:
        raise BenchError(f"unknown scenario(s) {', '.join(sorted(unknown))}; "
                         f"known: {', '.join(sc.key for sc in table)}")
    for sc in table:
        if wanted and sc.key not in wanted:
            continue
        here = [s for s in servers if s.name in sc.runs_on]
        runs: dict[str, list[Run]] = {s.name: [] for s in here}
        for rnd in range(cfg.rounds):
            for s in here:
                r = measure(sc, s, rnd, quiet_wait)
                runs[s.name].append(r)
                shown = f"{r.value:,.1f} {sc.unit}" if r.error is None else f"ERROR {r.error}"
                print(f"  {sc.title} | round {rnd + 1} | {s.name}: {shown}", flush=True)
        rows.append(summarize(sc, runs))
    return rows


# --------------------------------------------------------------------------
# Entry point

def one_process_memory(cfg: Config, src: SourceFile, workdir: Path, tls: bool, moorage: Server) -> dict[str, Any]:
    """Moorage's memory with its worker processes beside the same replica as one process
    (`--workers 1`), each holding the same seeded content: workers cost memory (each holds its
    own index), and this says how much. Peaks once seeded, and the workers' over every run."""
    (workdir / "moorage-1").mkdir()
    one = moorage_server(workdir / "moorage-1", tls=tls, workers=1)
    try:
        one.start()
        seed_server(one, make_seed(cfg, src), src, cfg)
        one.observe_memory()
        one.seeded_kib = sum(one.peak_kib.values())
    except Exception as exc:  # noqa: BLE001 - a side figure: say it failed, keep the table
        print(f"\nmemory of one process: {type(exc).__name__}: {exc}".splitlines()[0][:200])
        return {}
    finally:
        one.stop()
    print(f"  once seeded (the same content): moorage {moorage.seeded_kib / 1024:.0f} MiB with its workers, "
          f"{one.seeded_kib / 1024:.0f} MiB as one process (--workers 1); with its workers over every run: "
          f"{sum(moorage.peak_kib.values()) / 1024:.0f} MiB")
    return {"seeded_kib": one.seeded_kib, "workers_seeded_kib": moorage.seeded_kib}


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="1 round, smaller sizes: a smoke run")
    p.add_argument("--only", choices=["moorage", "distribution"], help="bench one registry alone")
    p.add_argument("--rounds", type=int, help="override the number of rounds")
    p.add_argument("--scenarios", metavar="KEYS",
                   help="comma-separated scenario keys to run (default: all)")
    p.add_argument("--insecure-http", action="store_true",
                   help="both registries over plain HTTP (Moorage with --insecure-http) instead of HTTPS")
    p.add_argument("--s3", action="store_true",
                   help="blobs in S3 buckets of a SeaweedFS the bench starts; the S3 rows and targets")
    p.add_argument("--workers", type=int, metavar="N",
                   help="Moorage's `serve --workers N` (default: its own default, the machine's cores)")
    p.add_argument("--json", type=Path, metavar="FILE", help="write all results as JSON")
    p.add_argument("--quiet-wait", type=float, default=20.0, metavar="S",
                   help="before each run, wait up to S seconds for the machine to be idle (default 20)")
    p.add_argument("--tmp", type=Path, default=None,
                   help="parent of the temp dir (default: system temp dir; keep it on the same disk)")
    return p.parse_args(argv)


def tool_output(cmd: list[str]) -> str:
    """First line a tool prints about itself, or '?' (wrk prints its version on stderr)."""
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    return ((out.stdout or out.stderr).strip().splitlines() or ["?"])[0]


def environment(tls: bool, s3: bool, workers: int | None) -> dict[str, str]:
    """What was measured, so that two result files can be told apart."""
    repo = Path(__file__).resolve().parent.parent
    dirty = tool_output(["git", "-C", str(repo), "status", "--porcelain", "--", "src"]) not in ("?", "")
    return {
        "moorage": tool_output(["git", "-C", str(repo), "rev-parse", "--short", "HEAD"])
                   + (" + uncommitted changes in src/" if dirty else ""),
        "moorage workers": str(workers) if workers else "its default",
        "distribution": tool_output(["docker-registry", "--version"]),
        "wrk": tool_output(["wrk", "-v"]),
        "python": sys.version.split()[0],
        "transport": "HTTPS for both (TLS 1.3; HTTP/1.1)" if tls else "plain HTTP for both",
        "credentials": "Moorage: Bearer token (admin) from /token; distribution: none (no token server)",
        **({"object store": tool_output([WEED, "version"]).split("For enterprise")[0].strip()
                                  + ", S3 over plain HTTP on loopback, one bucket per registry"}
           if s3 else {}),
        "cores": str(os.cpu_count()),
        "loadavg": Path("/proc/loadavg").read_text().strip(),
    }


def check_tools(s3: bool) -> None:
    missing = [t for t in ("wrk", "curl", *(("hey", WEED) if s3 else ())) if not shutil.which(t)]
    if missing:
        sys.exit(f"missing tools: {', '.join(missing)} (make bench installs them)")


def raise_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    cfg = QUICK if args.quick else Config()
    if args.rounds:
        cfg = Config(**{**asdict(cfg), "rounds": args.rounds})
    check_tools(args.s3)
    signal.signal(signal.SIGTERM, raise_interrupt)
    started = time.monotonic()
    tls = not args.insecure_http
    env = environment(tls, args.s3, args.workers)
    print("; ".join(f"{k}: {v}" for k, v in env.items()), flush=True)
    workdir = Path(tempfile.mkdtemp(prefix="moorage-bench-", dir=args.tmp))
    servers: list[Server] = []
    store: ObjectStore | None = None
    try:
        names = [args.only] if args.only else ["moorage", "distribution"]
        factories = {"moorage": functools.partial(moorage_server, workers=args.workers),
                     "distribution": distribution_server}
        if args.s3:
            print("starting SeaweedFS ...", flush=True)
            store = ObjectStore(workdir).start()
        for name in names:
            (workdir / name).mkdir()
            if store is None:
                servers.append(factories[name](workdir / name, tls=tls))
            else:
                server = factories[name](workdir / name, tls=tls, bucket=store.bucket(name))
                server.helpers.append(store.pid())
                if name == "distribution":
                    server.put_blob_directly = store.put_distribution_blob
                servers.append(server)
        if store is not None:
            servers.append(DirectRead(store, workdir))
            names.append("direct")
        print(f"writing the {cfg.blob_size // MiB} MiB source blob ...", flush=True)
        src = SourceFile(workdir / "source.bin", cfg.blob_size)
        for s in servers:
            print(f"starting {s.name} on {s.url} ...", flush=True)
            s.start()
        wanted = set(args.scenarios.split(",")) if args.scenarios else set()
        rows = run_bench(cfg, servers, src, workdir, args.quiet_wait, wanted, store)
        print(f"\n{env['transport']}; {env['credentials']}")
        print_table(rows, names)
        memory = print_memory(servers)
        if "moorage" in names and args.workers != 1 and store is None:
            memory["moorage one process"] = one_process_memory(cfg, src, workdir, tls,
                                                               next(s for s in servers if s.name == "moorage"))
        took = time.monotonic() - started
        print(f"\n{cfg.rounds} round(s), medians; bench took {took:.0f} s")
        if args.json:
            write_json(args.json, env, cfg, rows, memory, took)
        return 0
    except BenchError as exc:
        print(f"bench failed: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        cleanup(servers, workdir, store)


def cleanup(servers: list[Server], workdir: Path, store: ObjectStore | None = None) -> None:
    """Stop every server, then the object store, and remove the temp dir, whatever fails on the way
    (even a second Ctrl-C)."""
    for s in servers:
        try:
            s.stop()
        except BaseException as exc:  # noqa: BLE001 - the next server must still be stopped
            print(f"stopping {s.name}: {exc!r}", file=sys.stderr)
            if s.proc is not None:
                with contextlib.suppress(OSError):
                    os.killpg(s.proc.pid, signal.SIGKILL)
    if store is not None:
        try:
            store.stop()
        except BaseException as exc:  # noqa: BLE001 - the temp dir must still go
            print(f"stopping SeaweedFS: {exc!r}", file=sys.stderr)
    shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
