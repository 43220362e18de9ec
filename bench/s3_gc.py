"""The GC row of `make bench-s3`: collecting 100,000 blobs on S3, Moorage against distribution.

Both collect the same content (gc_bench.Content: 10 repositories, manifests
of a config and four layers drawn from each repository's pool, 80% tagged,
the pool's undrawn layers garbage, about half of all blobs), each in its own
bucket on the same SeaweedFS, written there untimed before the first round
(objectstore.ObjectStore.put_many) in each registry's own layout.

Moorage: its records written straight into its etcd (as gc_bench.py does)
and its objects at its own keys (`blobs/<alg>/<2 hex>/<hex>`), then one run
through the admin API (`POST /_admin/gc`), timed by the run's own record.

distribution: `docker-registry garbage-collect` (2.8, offline, as its docs
say to run it) over a configuration like its server's with the root
directory `gc`, so the other rows' content is not in the way. It reads every
repository's manifests from S3, then lists every blob and deletes the
unmarked ones one by one. Untagged manifests are kept by both (no
`--delete-untagged`; Moorage's gc.untagged_after_seconds is unset).

The figure is blobs examined per second (all blobs / the run's seconds), so
that higher is better like every other row; the seconds are in the note.
Between rounds, what the previous round deleted is put back (untimed).
After each run the bucket is listed to check that exactly the garbage went.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from gc_bench import Content
from load import BenchError, Measurement, admin_request
from objectstore import ObjectStore
from servers import Server, distribution_storage

from moorage.cluster.etcd_member import node_tls
from moorage.meta.etcd import EtcdClient

GC_TIMEOUT = 3600.0         # one collection; distribution's takes minutes here
DISTRIBUTION_ROOT = "gc"
DISTRIBUTION_BLOBS = f"{DISTRIBUTION_ROOT}/docker/registry/v2/blobs/"
MOORAGE_BLOBS = "blobs/sha256/"


@dataclass
class GcWorkload:
    """The content to collect, and per registry whether it is in place for the next round."""

    store: ObjectStore
    blobs: int
    manifests: int
    content: Content | None = None
    seeded: set[str] = field(default_factory=set)       # registries holding the whole content
    collected: set[str] = field(default_factory=set)    # registries whose garbage a run deleted
    before: dict[str, int] = field(default_factory=dict)  # blob objects in the bucket before the run

    def prepare(self, server: Server, rnd: int) -> None:
        if self.content is None:
            started = time.monotonic()
            self.content = Content(self.blobs, self.manifests)
            print(f"  GC content: {len(self.content.files):,} blobs, {self.content.garbage:,} of them garbage, "
                  f"{len(self.content.manifests):,} manifests ({time.monotonic() - started:.0f} s)", flush=True)
        if server.name in self.seeded and server.name not in self.collected:
            return
        started = time.monotonic()
        only = self.content.garbage_blobs if server.name in self.seeded else None
        if server.name == "distribution":
            n = self.store.put_many(server.name, self.content.distribution_objects(DISTRIBUTION_ROOT, only))
        else:
            n = self._seed_moorage(server, only)
        print(f"  seeded {n:,} objects for {server.name}'s GC in {time.monotonic() - started:.0f} s", flush=True)
        self.seeded.add(server.name)
        self.collected.discard(server.name)
        self.count_before(server)

    def run(self, server: Server, ctx: object) -> Measurement:
        if server.name == "distribution":
            return self._run_distribution(server)
        return self._run_moorage(server)

    # ------------------------------------------------------------------
    # Moorage

    def _seed_moorage(self, server: Server, only: set[str] | None) -> int:
        """Its objects, then its records (all of them again: a run deleted the garbage's)."""
        assert self.content is not None
        objects = ((f"blobs/sha256/{d[7:9]}/{d[7:]}", data)  # storage/s3/driver.py's key for a digest
                   for d, data in self.content.files.items() if only is None or d in only)
        n = self.store.put_many(server.name, objects)
        port = server.command[server.command.index("--etcd-client-port") + 1]

        async def write() -> None:
            client = EtcdClient(f"127.0.0.1:{port}", node_tls(server.workdir / "data"), timeout=60)
            try:
                await self.content.write_records(client)
            finally:
                await client.close()
        asyncio.run(write())
        time.sleep(2)  # the replica's index applies them through its watch
        return n

    def _run_moorage(self, server: Server) -> Measurement:
        assert self.content is not None
        status, _, body = admin_request(server, "POST", "/_admin/gc", {"Content-Type": "application/json"},
                                  json.dumps({"dry_run": False}).encode())
        run = json.loads(body) if status in (200, 202) else None
        if run is None:
            raise BenchError(f"starting GC: HTTP {status} {body[:200]!r}")
        deadline = time.monotonic() + GC_TIMEOUT
        while run["state"] == "running":
            if time.monotonic() > deadline:
                raise BenchError(f"Moorage's GC did not finish in {GC_TIMEOUT:.0f} s")
            time.sleep(0.2)
            status, _, body = admin_request(server, "GET", f"/_admin/gc/{run['id']}")
            run = json.loads(body)
        self.collected.add(server.name)
        if run["state"] != "done":
            raise BenchError(f"Moorage's GC ended {run['state']}: {json.dumps(run)[:300]}")
        seconds = run["finished"] - run["started"]
        self._check_left(server.name, MOORAGE_BLOBS)
        return Measurement(len(self.content.files) / seconds, note=f"{seconds:.1f} s",
                           ops=len(self.content.files))

    # ------------------------------------------------------------------
    # distribution

    def _config(self, server: Server) -> Path:
        config = server.workdir / "gc.yml"
        config.write_text(f"version: 0.1\nlog:\n  level: warn\n"
                          f"{distribution_storage(server.workdir, self._bucket(server), '/' + DISTRIBUTION_ROOT)}")
        return config

    def _bucket(self, server: Server):
        return self.store.bucket(server.name)

    def _run_distribution(self, server: Server) -> Measurement:
        assert self.content is not None
        config = self._config(server)
        log = server.workdir / "gc.log"
        env_cmd = [server.command[0], "garbage-collect", str(config)]
        started = time.monotonic()
        with open(log, "wb") as out:
            try:
                proc = subprocess.run(env_cmd, stdout=out, stderr=subprocess.STDOUT, timeout=GC_TIMEOUT,
                                      env=server.child_env())
            except subprocess.TimeoutExpired:
                raise BenchError(f"garbage-collect did not finish in {GC_TIMEOUT:.0f} s") from None
        seconds = time.monotonic() - started
        self.collected.add(server.name)
        if proc.returncode != 0:
            tail = log.read_text(errors="replace")[-300:]
            raise BenchError(f"garbage-collect exited {proc.returncode}: {tail}")
        self._check_left(server.name, DISTRIBUTION_BLOBS)
        return Measurement(len(self.content.files) / seconds, note=f"{seconds:.1f} s",
                           ops=len(self.content.files))

    def count_before(self, server: Server) -> None:
        """Blob objects in the bucket before a run (the other rows' blobs are in Moorage's too)."""
        prefix = DISTRIBUTION_BLOBS if server.name == "distribution" else MOORAGE_BLOBS
        self.before[server.name] = self.store.count(server.name, prefix)

    def _check_left(self, bucket: str, prefix: str) -> None:
        """Exactly the garbage went: as many blob objects fewer as there were garbage blobs."""
        assert self.content is not None
        left = self.store.count(bucket, prefix)
        wanted = self.before[bucket] - self.content.garbage
        if left != wanted:
            raise BenchError(f"{bucket}: {left:,} blob objects left after GC, wanted {wanted:,}")
