"""The GC row of `make bench-s3`: collecting 100,000 blobs on S3, Moorage against distribution.

Both collect the same content (gc_bench.Content: 10 repositories, manifests
of a config and four layers drawn from each repository's pool, 80% tagged,
the pool's undrawn layers garbage, about half of all blobs), each in its own
bucket on the same SeaweedFS, written there untimed before the first round
(objectstore.ObjectStore.put_many) in each registry's own layout.

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

import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from gc_bench import Content
from load import BenchError, Measurement
from objectstore import ObjectStore
from servers import Server, distribution_storage

GC_TIMEOUT = 3600.0         # one collection; distribution's takes minutes here
DISTRIBUTION_ROOT = "gc"


@dataclass
class GcWorkload:
    """The content to collect, and per registry whether it is in place for the next round."""

    store: ObjectStore
    blobs: int
    manifests: int
    content: Content | None = None
    seeded: set[str] = field(default_factory=set)       # registries holding the whole content
    collected: set[str] = field(default_factory=set)    # registries whose garbage a run deleted

    def prepare(self, server: Server, rnd: int) -> None:
        if self.content is None:
            started = time.monotonic()
            self.content = Content(self.blobs, self.manifests)
            print(f"  GC content: {len(self.content.files):,} blobs, {self.content.garbage:,} of them garbage, "
                  f"{len(self.content.manifests):,} manifests ({time.monotonic() - started:.0f} s)", flush=True)
        if server.name == "distribution":
            self._prepare_distribution(server)
        else:
            raise BenchError(f"no GC workload for {server.name} on S3 yet")

    def run(self, server: Server, ctx: object) -> Measurement:
        if server.name == "distribution":
            return self._run_distribution(server)
        raise BenchError(f"no GC workload for {server.name} on S3 yet")

    # ------------------------------------------------------------------
    # distribution

    def _config(self, server: Server) -> Path:
        config = server.workdir / "gc.yml"
        config.write_text(f"version: 0.1\nlog:\n  level: warn\n"
                          f"{distribution_storage(server.workdir, self._bucket(server), '/' + DISTRIBUTION_ROOT)}")
        return config

    def _bucket(self, server: Server):
        return self.store.bucket(server.name)

    def _prepare_distribution(self, server: Server) -> None:
        assert self.content is not None
        if server.name in self.seeded and server.name not in self.collected:
            return
        only = self.content.garbage_blobs if server.name in self.seeded else None
        started = time.monotonic()
        n = self.store.put_many(server.name, self.content.distribution_objects(DISTRIBUTION_ROOT, only))
        print(f"  seeded {n:,} objects for distribution's GC in {time.monotonic() - started:.0f} s", flush=True)
        self.seeded.add(server.name)
        self.collected.discard(server.name)

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
        self._check_left(server.name, f"{DISTRIBUTION_ROOT}/docker/registry/v2/blobs/")
        return Measurement(len(self.content.files) / seconds, note=f"{seconds:.1f} s")

    def _check_left(self, bucket: str, prefix: str) -> None:
        assert self.content is not None
        left = self.store.count(bucket, prefix)
        wanted = len(self.content.files) - self.content.garbage
        if left != wanted:
            raise BenchError(f"{bucket}: {left:,} blobs left after GC, wanted {wanted:,}")
