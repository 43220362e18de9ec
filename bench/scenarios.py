"""The rows of the table: workload sizes, the content seeded before the runs, each scenario."""

from __future__ import annotations

import asyncio
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from content import ACCEPT, MiB, OCI_MANIFEST, Image, SourceFile, sha256
from load import (BenchError, admin_request, Job, Measurement, curl_pull, hey, push_chunked, push_image_async,
                  push_manifest, push_monolithic, push_small_blob, put_manifest_async, repo_auth,
                  request, run_clients, wrk)
from servers import Server


# --------------------------------------------------------------------------
# Workload size

@dataclass(frozen=True)
class Config:
    """Sizes of one bench run; `--quick` shrinks them for a smoke run."""

    rounds: int = 3
    blob_size: int = 256 * MiB
    chunk_size: int = 8 * MiB
    pull_streams: int = 8
    wrk_seconds: int = 5
    wrk_threads: int = 2
    wrk_conns: int = 64
    tags: int = 1000
    small_blobs: int = 2000
    small_manifests: int = 200
    small_clients: int = 8
    gc_blobs: int = 100_000         # --s3 only: the GC comparison
    gc_manifests: int = 10_000


QUICK = Config(rounds=1, blob_size=64 * MiB, wrk_seconds=2, tags=200,
               small_blobs=400, small_manifests=40, gc_blobs=10_000, gc_manifests=1_000)


# --------------------------------------------------------------------------
# Seeding: what the read scenarios read, pushed once per registry, untimed

# wrk 4.1 waits for the body a HEAD response announces (its parser is never told
# the request was HEAD), so the HEAD scenario asks for the empty blob: same code
# path in both registries (link lookup, stat, headers), Content-Length: 0.
EMPTY_DIGEST = sha256(b"")

PULL_REPO, IMAGE_REPO, TAGS_REPO, PUSH_REPO = "bench/pull", "bench/app", "bench/tags", "bench/push"
REGISTRIES = ("moorage", "distribution")


@dataclass
class Seed:
    """What every registry holds before the timed runs start."""

    pull_digest: str
    pull_size: int
    image: Image
    tag_count: int


def make_seed(cfg: Config, src: SourceFile) -> Seed:
    """The same content for every registry: the source file as it is now, before any push refreshes it."""
    return Seed(src.digest, src.size, Image.random(n_layers=2), cfg.tags)


def seed_server(server: Server, seed: Seed, src: SourceFile, cfg: Config) -> None:
    """Push the pull blob, one image tagged latest, and a repository with cfg.tags tags."""
    if src.digest != seed.pull_digest:
        raise BenchError("the source file changed before seeding")
    push_monolithic(server, PULL_REPO, src)
    for blob in seed.image.blobs:
        push_small_blob(server, IMAGE_REPO, blob)
        push_small_blob(server, TAGS_REPO, blob)
    if server.put_blob_directly is not None:  # distribution on S3 cannot upload an empty blob
        server.put_blob_directly(IMAGE_REPO, EMPTY_DIGEST, b"")
    else:
        push_small_blob(server, IMAGE_REPO, b"")
    push_manifest(server, IMAGE_REPO, "latest", seed.image.manifest)
    auth = repo_auth(server, TAGS_REPO)
    jobs = [lambda s, t=f"t{i:04d}": put_manifest_async(s, server.url, TAGS_REPO, t,
                                                        seed.image.manifest, auth)
            for i in range(cfg.tags)]
    asyncio.run(run_clients(jobs, cfg.small_clients, timeout=300, ssl_context=server.ssl_context()))
    verify_seed(server, seed)


def verify_seed(server: Server, seed: Seed) -> None:
    """The read scenarios must read what a client would: check it once before wrk hammers it."""
    status, headers, body = request(server, "GET", f"/v2/{IMAGE_REPO}/manifests/latest",
                                    {"Accept": ACCEPT})
    if status != 200 or body != seed.image.manifest:
        raise BenchError(f"manifest GET: HTTP {status}, body {'differs' if status == 200 else body[:200]!r}")
    if headers.get("Content-Type") != OCI_MANIFEST:
        raise BenchError(f"manifest GET: Content-Type {headers.get('Content-Type')!r}")
    status, headers, _ = request(server, "HEAD", f"/v2/{IMAGE_REPO}/blobs/{EMPTY_DIGEST}")
    # distribution on S3 answers a HEAD with a redirect to a presigned URL, as it does a GET: wrk
    # then times that answer alone, without the object store's HEAD a client would follow it with.
    redirected = status == 307 and headers.get("Location")
    if not redirected and (status != 200 or headers.get("Content-Length") != "0"):
        raise BenchError(f"blob HEAD: HTTP {status}, Content-Length {headers.get('Content-Length')}")
    status, _, body = request(server, "GET", f"/v2/{TAGS_REPO}/tags/list")
    tags = json.loads(body).get("tags") or [] if status == 200 else []
    if len(tags) != seed.tag_count:
        raise BenchError(f"tags/list: HTTP {status}, {len(tags)} tags, wanted {seed.tag_count}")
    # A warm pull, so the timed pulls of both registries start from the page cache.
    curl_pull(server, server.blob_target(PULL_REPO, seed.pull_digest), 1, seed.pull_size)


# --------------------------------------------------------------------------
# Scenarios

@dataclass
class Scenario:
    """One row of the table.

    `prepare` runs untimed before each run (fresh content, digests, the
    client's token for the repositories it uses); `run` is the measured part,
    around which the servers' CPU time is sampled.
    """

    key: str
    title: str
    unit: str
    target: float
    run: Callable[[Server, Any], Measurement]
    prepare: Callable[[Server, int], Any] = lambda server, rnd: None
    needs_seed: bool = True
    baseline: str = "distribution"      # the ratio is moorage / this server's figure
    runs_on: tuple[str, ...] = REGISTRIES


def timed_mib_s(size: int, action: Callable[[], None]) -> Measurement:
    start = time.perf_counter()
    action()
    return Measurement(size / MiB / (time.perf_counter() - start), ops=size / MiB)


def pulled(server: Server, target: str, streams: int, size: int) -> Measurement:
    return Measurement(curl_pull(server, target, streams, size), ops=streams * size / MiB)


def fresh_source(src: SourceFile) -> Callable[[Server, int], Any]:
    """A new blob per push, and no dirty pages of the previous push to flush meanwhile."""
    def prepare(server: Server, rnd: int) -> None:
        repo_auth(server, PUSH_REPO)
        src.refresh()
        os.sync()
    return prepare


def logged_in(repo: str) -> Callable[[Server, int], Any]:
    """A client that holds a valid token for `repo` when the run starts."""
    return lambda server, rnd: repo_auth(server, repo)


def small_jobs(server: Server, rnd: int, cfg: Config) -> list[Job]:
    per_image = cfg.small_blobs // cfg.small_manifests
    images = [Image.random(n_layers=per_image - 1) for _ in range(cfg.small_manifests)]
    repos = [f"small/r{rnd}-c{c}" for c in range(cfg.small_clients)]
    auth = {repo: repo_auth(server, repo) for repo in repos}
    return [lambda s, i=i, img=img, repo=repos[i % cfg.small_clients]: push_image_async(
                s, server.url, repo, f"v{i}", img, auth[repo])
            for i, img in enumerate(images)]


def run_small(server: Server, jobs: list[Job], cfg: Config) -> Measurement:
    start = time.perf_counter()
    ops = asyncio.run(run_clients(jobs, cfg.small_clients, timeout=600, ssl_context=server.ssl_context()))
    return Measurement(ops / (time.perf_counter() - start), ops=ops)


def pull(key: str, title: str, streams: int, target: float, seed: Seed, src: SourceFile,
         prepare: Callable[[Server, int], Any] = logged_in(PULL_REPO), **kw: Any) -> Scenario:
    """curl pulling the seeded big blob, following a redirect if the server answers with one."""
    return Scenario(key, title, "MiB/s", target,
                    lambda s, _: pulled(s, s.blob_target(PULL_REPO, seed.pull_digest), streams, src.size),
                    prepare=prepare, **kw)


def redirects(on: bool) -> Callable[[Server, int], Any]:
    """Moorage on S3 redirects blob GETs or streams them, as its cluster setting says; set it first."""
    def prepare(server: Server, rnd: int) -> None:
        repo_auth(server, PULL_REPO)
        if server.name == "moorage":
            body = json.dumps({"value": on}).encode()
            status, _, text = admin_request(server, "PUT", "/_admin/config/storage.redirect",
                                            {"Content-Type": "application/json"}, body)
            if status != 200:
                raise BenchError(f"setting storage.redirect: HTTP {status} {text[:200]!r}")
    return prepare


def scenarios(cfg: Config, src: SourceFile, seed: Seed, head_lua: Path) -> list[Scenario]:
    """The rows of `make bench`, with issue 12's targets (HTTPS against distribution on 2 cores)."""
    size_label = f"{cfg.blob_size // MiB} MiB"
    return [
        *pushes(cfg, src, 2.0),
        pull("pull_1", f"blob pull {size_label}, 1 stream", 1, 1.0, seed, src),
        pull("pull_n", f"blob pull {size_label}, {cfg.pull_streams} streams", cfg.pull_streams, 1.0,
             seed, src),
        *reads(cfg, head_lua, 7.0),
        tags_list(cfg, 10.0),
        small_pushes(cfg, 2.5),
    ]


def s3_scenarios(cfg: Config, src: SourceFile, seed: Seed, head_lua: Path, gc: Any) -> list[Scenario]:
    """The rows of `--s3`, with the issue's targets: against distribution on S3, and pulls against
    curl reading the same bytes straight from the object store (the `direct` column)."""
    size_label = f"{cfg.blob_size // MiB} MiB"
    with_direct = ("moorage", "distribution", "direct")
    return [
        *pushes(cfg, src, 1.5),
        pull("pull_redirect_1", f"blob pull {size_label}, 1 stream, redirected", 1, 0.9, seed, src,
             prepare=redirects(True), baseline="direct", runs_on=with_direct),
        pull("pull_redirect_n", f"blob pull {size_label}, {cfg.pull_streams} streams, redirected",
             cfg.pull_streams, 0.9, seed, src, prepare=redirects(True), baseline="direct",
             runs_on=with_direct),
        pull("pull_streamed_1", f"blob pull {size_label}, 1 stream, through the registry", 1, 0.7, seed,
             src, prepare=redirects(False), baseline="direct", runs_on=("moorage", "direct")),
        pull("pull_streamed_n", f"blob pull {size_label}, {cfg.pull_streams} streams, through the registry",
             cfg.pull_streams, 0.7, seed, src, prepare=redirects(False), baseline="direct",
             runs_on=("moorage", "direct")),
        *reads(cfg, head_lua, 20.0, head_with_hey=True),
        tags_list(cfg, 3.0),
        small_pushes(cfg, 2.0),
        Scenario("gc", f"GC of {cfg.gc_blobs:,} blobs ({cfg.gc_manifests:,} manifests)", "blobs/s", 10.0,
                 gc.run, prepare=gc.prepare, needs_seed=False),
    ]


def pushes(cfg: Config, src: SourceFile, target: float) -> list[Scenario]:
    size_label = f"{cfg.blob_size // MiB} MiB"
    return [
        Scenario("push_monolithic", f"blob push monolithic {size_label}", "MiB/s", target,
                 lambda s, _: timed_mib_s(src.size, lambda: push_monolithic(s, PUSH_REPO, src)),
                 prepare=fresh_source(src), needs_seed=False),
        Scenario("push_chunked", f"blob push chunked {size_label}, {cfg.chunk_size // MiB} MiB PATCHes",
                 "MiB/s", target,
                 lambda s, _: timed_mib_s(src.size,
                                          lambda: push_chunked(s, PUSH_REPO, src, cfg.chunk_size)),
                 prepare=fresh_source(src), needs_seed=False),
    ]


def reads(cfg: Config, head_lua: Path, target: float, head_with_hey: bool = False) -> list[Scenario]:
    """The hot path: manifest GET by tag and blob HEAD.

    head_with_hey: distribution on S3 answers a HEAD with a redirect that has
    no Content-Length, which wrk cannot time; hey times both registries then.
    """
    head_path = f"/v2/{IMAGE_REPO}/blobs/{EMPTY_DIGEST}"
    if head_with_hey:
        head = Scenario("blob_head", f"blob HEAD (empty blob), {cfg.wrk_conns} conns, hey", "req/s", target,
                        lambda s, _: hey(s, head_path, cfg, "HEAD"), prepare=logged_in(IMAGE_REPO))
    else:
        head = Scenario("blob_head", f"blob HEAD (empty blob), {cfg.wrk_conns} conns", "req/s", target,
                        lambda s, _: wrk(s, head_path, cfg, script=head_lua), prepare=logged_in(IMAGE_REPO))
    return [
        Scenario("manifest_get", f"manifest GET by tag, {cfg.wrk_conns} conns", "req/s", target,
                 lambda s, _: wrk(s, f"/v2/{IMAGE_REPO}/manifests/latest", cfg,
                                  headers={"Accept": ACCEPT}),
                 prepare=logged_in(IMAGE_REPO)),
        head,
    ]


def tags_list(cfg: Config, target: float) -> Scenario:
    return Scenario("tags_list", f"tags list, {cfg.tags} tags, {cfg.wrk_conns} conns", "req/s", target,
                    lambda s, _: wrk(s, f"/v2/{TAGS_REPO}/tags/list", cfg),
                    prepare=logged_in(TAGS_REPO))


def small_pushes(cfg: Config, target: float) -> Scenario:
    return Scenario("small_pushes",
                    f"{cfg.small_blobs} small blob pushes + {cfg.small_manifests} manifests, "
                    f"{cfg.small_clients} clients", "ops/s", target,
                    lambda s, jobs: run_small(s, jobs, cfg),
                    prepare=lambda s, rnd: small_jobs(s, rnd, cfg), needs_seed=False)
