"""S3 client libraries against a real SeaweedFS: obstore (Rust object_store) and aiobotocore.

    make bench-s3-clients [BENCH_ARGS="--rounds 3 --quick --only obstore,aiobotocore"]

Every measurement runs in a fresh worker process (this file with --worker),
so peak memory and CPU belong to one library and one workload. The libraries
alternate within each round; the table shows medians over the rounds.
CPU is the worker's own (every thread, Rust's included), per operation or
per GiB; SeaweedFS's is not counted. The endpoint is plain HTTP on loopback,
so both libraries sign every payload with SHA-256 (neither may send
UNSIGNED-PAYLOAD without TLS by default): that cost is in the figures.

Workloads (sizes as the S3 driver will see them):
  import        import the library and build a client: ms and MiB of RSS
  put           PUT 2,000 x 1 KiB, 500 x 64 KiB, 100 x 1 MiB, 16 in flight
  keys          10,000 1 KiB objects under one prefix: PUT rate, ListObjectsV2
                of them all, HEAD rate (16 in flight), presigned GET URL rate,
                DeleteObjects of all 10,000
  multipart     a 256 MiB object from 1 MiB memory chunks, parts of 5/8/16 MiB,
                one part at a time (as one upload session sends them); peak RSS
                above the worker's baseline shows how often a part is held
  get           GET of a 256 MiB object streamed in 1 MiB chunks, whole and a
                128 MiB Range
  features      what each library offers the driver, checked live where it can be
  hashing       (not a client) sha256 by hashlib against rehashes, whose state
                can be saved in an upload record and resumed on another replica
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, AsyncIterator

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))

MiB = 1 << 20
KiB = 1 << 10
LIBS = ("obstore", "aiobotocore")
BIG = 256 * MiB
CONCURRENCY = 16
WORKER_TIMEOUT = 600
CRASHES: dict[str, int] = {}


def rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * KiB
    return 0


class RssPeak:
    """The highest RSS while a block runs, sampled every 2 ms from a thread
    (ru_maxrss would include peaks from before the block)."""

    def __enter__(self) -> "RssPeak":
        self.base = self.peak = rss()
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._done.wait(0.002):
            self.peak = max(self.peak, rss())

    def __exit__(self, *exc) -> None:
        self._done.set()
        self._thread.join()

    @property
    def over_base(self) -> float:
        return (self.peak - self.base) / MiB


def cpu() -> float:
    return time.process_time()


# ----------------------------------------------------------------------------
# One adapter per library: the same calls, each written the way that library
# is meant to be used.

class Boto:
    name = "aiobotocore"

    def __init__(self, endpoint: str, bucket: str):
        self.endpoint, self.bucket = endpoint, bucket

    async def open(self) -> None:
        import aiobotocore.session
        import botocore.config

        config = botocore.config.Config(
            s3={"addressing_style": "path"}, max_pool_connections=32,
            connect_timeout=5, read_timeout=60, retries={"mode": "standard", "max_attempts": 3},
            # Checksums only where the API demands them (DeleteObjects): the
            # default CRC32 on every body is extra CPU the driver does not need.
            request_checksum_calculation="when_required", response_checksum_validation="when_required")
        self._ctx = aiobotocore.session.get_session().create_client(
            "s3", endpoint_url=self.endpoint, region_name="us-east-1", config=config)
        self.c = await self._ctx.__aenter__()

    async def close(self) -> None:
        await self._ctx.__aexit__(None, None, None)

    async def put(self, key: str, data) -> None:
        await self.c.put_object(Bucket=self.bucket, Key=key, Body=data)

    async def head(self, key: str) -> int:
        return (await self.c.head_object(Bucket=self.bucket, Key=key))["ContentLength"]

    async def stream(self, key: str, start: int | None = None, end: int | None = None) -> int:
        kw = {"Range": f"bytes={start}-{end - 1}"} if start is not None else {}
        r = await self.c.get_object(Bucket=self.bucket, Key=key, **kw)
        n = 0
        async with r["Body"] as body:
            async for chunk in body.iter_chunks(MiB):
                n += len(chunk)
        return n

    async def list(self, prefix: str) -> int:
        n = 0
        async for page in self.c.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix):
            n += len(page.get("Contents", ()))
        return n

    async def delete_many(self, keys: list[str]) -> None:
        for i in range(0, len(keys), 1000):
            r = await self.c.delete_objects(Bucket=self.bucket, Delete={
                "Objects": [{"Key": k} for k in keys[i:i + 1000]], "Quiet": True})
            assert not r.get("Errors"), r["Errors"][:3]

    async def presign(self, key: str) -> str:
        return await self.c.generate_presigned_url(
            "get_object", Params={"Bucket": self.bucket, "Key": key}, ExpiresIn=300)

    async def multipart(self, key: str, chunks: AsyncIterator[memoryview], part_size: int) -> None:
        """The driver's way: chunks are copied once into a part buffer, which goes
        out through a reader over it (storage/s3/client.py PartBody: botocore would copy
        a bytearray body into a BytesIO)."""
        from moorage.storage.s3.client import PartBody

        up = await self.c.create_multipart_upload(Bucket=self.bucket, Key=key)
        uid, parts = up["UploadId"], []
        buf = bytearray(part_size)
        fill = 0

        async def send() -> None:
            r = await self.c.upload_part(Bucket=self.bucket, Key=key, UploadId=uid, PartNumber=len(parts) + 1,
                                         Body=PartBody(memoryview(buf)[:fill]), ContentLength=fill)
            parts.append({"PartNumber": len(parts) + 1, "ETag": r["ETag"]})

        async for chunk in chunks:
            view = memoryview(chunk)
            while view:
                take = min(len(view), part_size - fill)
                buf[fill:fill + take] = view[:take]
                fill += take
                view = view[take:]
                if fill == part_size:
                    await send()
                    fill = 0
        if fill:
            await send()
        await self.c.complete_multipart_upload(Bucket=self.bucket, Key=key, UploadId=uid,
                                               MultipartUpload={"Parts": parts})

    async def put_if_absent(self, key: str, data: bytes) -> bool:
        try:
            await self.c.put_object(Bucket=self.bucket, Key=key, Body=data, IfNoneMatch="*")
            return True
        except self.c.exceptions.ClientError as e:
            if e.response["Error"]["Code"] == "PreconditionFailed":
                return False
            raise


class Obstore:
    name = "obstore"

    def __init__(self, endpoint: str, bucket: str):
        self.endpoint, self.bucket = endpoint, bucket

    async def open(self) -> None:
        from datetime import timedelta

        from obstore.store import S3Store

        # Keys given explicitly: without them object_store falls back to the EC2
        # metadata address, which is not ours to call from here.
        self.s = S3Store(self.bucket, endpoint=self.endpoint, region="us-east-1",
                         access_key_id=os.environ["AWS_ACCESS_KEY_ID"],
                         secret_access_key=os.environ["AWS_SECRET_ACCESS_KEY"],
                         virtual_hosted_style_request=False,
                         client_options={"allow_http": True, "timeout": "60s", "connect_timeout": "5s",
                                         "pool_max_idle_per_host": "32"},
                         retry_config={"max_retries": 2, "retry_timeout": timedelta(seconds=30)})

    async def close(self) -> None:
        pass

    async def put(self, key: str, data) -> None:
        import obstore
        await obstore.put_async(self.s, key, data, use_multipart=False)

    async def head(self, key: str) -> int:
        import obstore
        return (await obstore.head_async(self.s, key))["size"]

    async def stream(self, key: str, start: int | None = None, end: int | None = None) -> int:
        import obstore
        opts = {"range": (start, end)} if start is not None else None
        r = await obstore.get_async(self.s, key, options=opts)
        n = 0
        async for chunk in r.stream(min_chunk_size=MiB):
            n += len(chunk)
        return n

    async def list(self, prefix: str) -> int:
        import obstore
        n = 0
        async for batch in obstore.list(self.s, prefix, chunk_size=1000):
            n += len(batch)
        return n

    async def delete_many(self, keys: list[str]) -> None:
        import obstore
        await obstore.delete_async(self.s, keys)

    async def presign(self, key: str) -> str:
        from datetime import timedelta

        import obstore
        return obstore.sign(self.s, "GET", key, timedelta(seconds=300))

    async def multipart(self, key: str, chunks: AsyncIterator[memoryview], part_size: int) -> None:
        """obstore's only multipart path: put_async from an async iterator, parts cut in Rust."""
        import obstore
        await obstore.put_async(self.s, key, chunks, chunk_size=part_size, max_concurrency=1)

    async def put_if_absent(self, key: str, data: bytes) -> bool:
        import obstore
        from obstore.exceptions import AlreadyExistsError, PreconditionError
        try:
            await obstore.put_async(self.s, key, data, mode="create")
            return True
        except (AlreadyExistsError, PreconditionError):
            return False


ADAPTERS = {"obstore": Obstore, "aiobotocore": Boto}


# ----------------------------------------------------------------------------
# Workloads (run inside a worker)

async def bounded(n: int, fn) -> None:
    """fn(i) for i in range(n), CONCURRENCY at a time."""
    it = iter(range(n))

    async def lane() -> None:
        for i in it:
            await fn(i)

    await asyncio.gather(*(lane() for _ in range(CONCURRENCY)))


async def timed(fn) -> tuple[float, float]:
    t0, c0 = time.perf_counter(), cpu()
    await fn()
    return time.perf_counter() - t0, cpu() - c0


async def w_put(lib, prefix: str, quick: bool) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for size, count in ((KiB, 2000), (64 * KiB, 500), (MiB, 100)):
        count = count // 4 if quick else count
        data = os.urandom(size)
        wall, used = await timed(lambda: bounded(count, lambda i: lib.put(f"{prefix}/put{size}/{i}", data)))
        out[f"put {size // KiB} KiB ops/s"] = count / wall
        out[f"put {size // KiB} KiB CPU ms/op"] = used / count * 1000
        await lib.delete_many([f"{prefix}/put{size}/{i}" for i in range(count)])
    return out


async def w_keys(lib, prefix: str, quick: bool) -> dict[str, Any]:
    n = 2000 if quick else 10_000
    keys = [f"{prefix}/keys/{i:06d}" for i in range(n)]
    data = os.urandom(KiB)
    out: dict[str, Any] = {}
    wall, used = await timed(lambda: bounded(n, lambda i: lib.put(keys[i], data)))
    out[f"put {n} x 1 KiB ops/s"] = n / wall
    listed = 0

    async def do_list() -> None:
        nonlocal listed
        listed = await lib.list(f"{prefix}/keys/")

    wall, used = await timed(do_list)
    assert listed == n, (listed, n)
    out[f"list {n} keys, s"] = wall
    heads = min(n, 4000)
    wall, used = await timed(lambda: bounded(heads, lambda i: lib.head(keys[i])))
    out["head ops/s"] = heads / wall
    out["head CPU ms/op"] = used / heads * 1000

    async def do_sign() -> None:
        for k in keys:
            await lib.presign(k)

    wall, used = await timed(do_sign)
    out["presign URLs/s"] = n / wall
    wall, used = await timed(lambda: lib.delete_many(keys))
    out[f"delete {n} keys (DeleteObjects), s"] = wall
    assert await lib.list(f"{prefix}/keys/") == 0
    return out


async def chunks_of(total: int, source: bytes) -> AsyncIterator[memoryview]:
    """1 MiB slices of one buffer, as a request body arrives; nothing new is allocated."""
    view = memoryview(source)
    sent = 0
    while sent < total:
        n = min(MiB, total - sent)
        yield view[:n]
        sent += n


async def w_multipart(lib, prefix: str, quick: bool, part_mib: int) -> dict[str, Any]:
    total = 64 * MiB if quick else BIG
    source = os.urandom(MiB)
    key = f"{prefix}/mp{part_mib}"
    with RssPeak() as mem:
        wall, used = await timed(lambda: lib.multipart(key, chunks_of(total, source), part_mib * MiB))
    assert await lib.head(key) == total
    await lib.delete_many([key])
    return {f"multipart {part_mib} MiB parts MiB/s": total / MiB / wall,
            f"multipart {part_mib} MiB parts CPU s/GiB": used / (total / (1 << 30)),
            f"multipart {part_mib} MiB parts peak RSS over base, MiB": mem.over_base}


async def w_get(lib, key: str, quick: bool) -> dict[str, Any]:
    size = await lib.head(key)
    got = 0

    async def whole() -> None:
        nonlocal got
        got = await lib.stream(key)

    wall, used = await timed(whole)
    assert got == size
    out = {"get MiB/s": size / MiB / wall, "get CPU s/GiB": used / (size / (1 << 30))}
    start, end = size // 4, size // 4 * 3

    async def ranged() -> None:
        nonlocal got
        got = await lib.stream(key, start, end)

    wall, used = await timed(ranged)
    assert got == end - start
    out["get Range MiB/s"] = (end - start) / MiB / wall
    return out


async def w_features(lib, prefix: str, seaweed_env: dict) -> dict[str, Any]:
    """What the driver needs, tried against SeaweedFS where a call exists at all."""
    out: dict[str, Any] = {}
    key = f"{prefix}/cond"
    first, second = await lib.put_if_absent(key, b"a"), await lib.put_if_absent(key, b"b")
    out["conditional put (If-None-Match: *)"] = "yes" if (first, second) == (True, False) else f"no {first, second}"
    await lib.delete_many([key])
    if isinstance(lib, Boto):
        c, b = lib.c, lib.bucket
        await c.put_object(Bucket=b, Key=f"{prefix}/src", Body=b"x" * KiB)
        up = await c.create_multipart_upload(Bucket=b, Key=f"{prefix}/mp")
        p1 = await c.upload_part(Bucket=b, Key=f"{prefix}/mp", UploadId=up["UploadId"], PartNumber=1,
                                 Body=b"y" * (5 * MiB))
        p2 = await c.upload_part_copy(Bucket=b, Key=f"{prefix}/mp", UploadId=up["UploadId"], PartNumber=2,
                                      CopySource={"Bucket": b, "Key": f"{prefix}/src"})
        listed = await c.list_parts(Bucket=b, Key=f"{prefix}/mp", UploadId=up["UploadId"])
        uploads = await c.list_multipart_uploads(Bucket=b, Prefix=f"{prefix}/")
        await c.complete_multipart_upload(Bucket=b, Key=f"{prefix}/mp", UploadId=up["UploadId"], MultipartUpload={
            "Parts": [{"PartNumber": 1, "ETag": p1["ETag"]}, {"PartNumber": 2, "ETag": p2["CopyPartResult"]["ETag"]}]})
        size = await lib.head(f"{prefix}/mp")
        ok = len(listed["Parts"]) == 2 and len(uploads.get("Uploads", ())) == 1 and size == 5 * MiB + KiB
        out["multipart primitives (create/part/list parts/list uploads/complete/abort)"] = "yes" if ok else "FAILED"
        out["UploadPartCopy (server-side)"] = "yes" if ok else "FAILED"
        await lib.delete_many([f"{prefix}/src", f"{prefix}/mp"])
    else:
        import obstore
        names = set(dir(obstore)) | set(dir(lib.s))
        has = {"create_multipart", "put_part", "complete_multipart", "upload_part"} & names
        out["multipart primitives (create/part/list parts/list uploads/complete/abort)"] = (
            "partial" if has else "no: only put()/open_writer() inside one process, no upload id to resume")
        out["UploadPartCopy (server-side)"] = "no: copy() of whole objects only"
    if isinstance(lib, Obstore):
        # Not tried live: with no keys in the environment object_store goes on
        # to the EC2 metadata address, which no test here may call.
        out["credentials from the shared file"] = (
            "no: environment, web identity, ECS and EC2 metadata only (or a Python credential_provider)")
        return out
    # The shared credentials file alone (no keys in the environment), metadata off.
    with tempfile.TemporaryDirectory() as d:
        creds = Path(d) / "credentials"
        creds.write_text(f"[default]\naws_access_key_id = {seaweed_env['AWS_ACCESS_KEY_ID']}\n"
                         f"aws_secret_access_key = {seaweed_env['AWS_SECRET_ACCESS_KEY']}\n")
        env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_ACCESS") and not k.startswith("AWS_SECRET")}
        env.update(AWS_SHARED_CREDENTIALS_FILE=str(creds), AWS_CONFIG_FILE=str(Path(d) / "none"),
                   AWS_EC2_METADATA_DISABLED="true")
        r = subprocess.run([sys.executable, __file__, "--worker", lib.name, "--workload", "probe",
                            "--endpoint", lib.endpoint, "--bucket", lib.bucket, "--prefix", prefix],
                           env=env, capture_output=True, text=True, timeout=60)
        out["credentials from the shared file"] = "yes" if r.returncode == 0 else "no"
    return out


async def w_probe(lib, prefix: str) -> dict[str, Any]:
    await asyncio.wait_for(lib.put(f"{prefix}/probe", b"p"), 20)
    await lib.delete_many([f"{prefix}/probe"])
    return {}


async def worker(args) -> dict[str, Any]:
    if args.workload == "import":
        base, t0 = rss(), time.perf_counter()
        lib = ADAPTERS[args.worker](args.endpoint, args.bucket)
        await lib.open()
        wall = time.perf_counter() - t0
        return {"import + client, ms": wall * 1000, "import + client, RSS MiB": (rss() - base) / MiB}
    lib = ADAPTERS[args.worker](args.endpoint, args.bucket)
    await lib.open()
    try:
        if args.workload == "put":
            return await w_put(lib, args.prefix, args.quick)
        if args.workload == "keys":
            return await w_keys(lib, args.prefix, args.quick)
        if args.workload.startswith("multipart"):
            return await w_multipart(lib, args.prefix, args.quick, int(args.workload[9:]))
        if args.workload == "get":
            return await w_get(lib, args.key, args.quick)
        if args.workload == "features":
            return await w_features(lib, args.prefix, json.loads(args.env))
        if args.workload == "probe":
            return await w_probe(lib, args.prefix)
        raise SystemExit(f"unknown workload {args.workload}")
    finally:
        await lib.close()


def w_hashing(quick: bool) -> dict[str, Any]:
    """Throughput in 1 MiB updates (one thread and two), and the cost of saving and resuming."""
    import hashlib

    import rehashes

    data = [os.urandom(MiB) for _ in range(64 if quick else 256)]
    out: dict[str, Any] = {}
    for name, make in (("hashlib", hashlib.sha256), ("rehashes", rehashes.PySha256)):
        def run() -> None:
            h = make()
            for chunk in data:
                h.update(chunk)

        t0 = time.perf_counter()
        run()
        out[f"{name} sha256 MiB/s"] = len(data) / (time.perf_counter() - t0)
        threads = [threading.Thread(target=run) for _ in range(2)]
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        out[f"{name} sha256, 2 threads, MiB/s"] = 2 * len(data) / (time.perf_counter() - t0)
    h = rehashes.PySha256()
    h.update(data[0][:12345])
    t0 = time.perf_counter()
    for _ in range(10_000):
        state = h.serialize()
    out["rehashes save state, us"] = (time.perf_counter() - t0) / 10_000 * 1e6
    t0 = time.perf_counter()
    for _ in range(10_000):
        resumed = rehashes.PySha256.deserialize(state)
    out["rehashes resume state, us"] = (time.perf_counter() - t0) / 10_000 * 1e6
    out["rehashes state, bytes"] = len(state)
    resumed.update(data[0][12345:])
    assert resumed.finalize() == hashlib.sha256(data[0]).hexdigest()
    return out


# ----------------------------------------------------------------------------
# The driver of the bench

def run_worker(lib: str, workload: str, store, prefix: str, quick: bool, key: str = "") -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--worker", lib, "--workload", workload, "--endpoint", store.endpoint,
           "--bucket", store.bucket, "--prefix", prefix, "--key", key, "--env", json.dumps(store.env)]
    if quick:
        cmd.append("--quick")
    for attempt in range(3):
        r = subprocess.run(cmd, env={**os.environ, **store.env, "RUST_BACKTRACE": "1"},
                           capture_output=True, text=True, timeout=WORKER_TIMEOUT)
        if r.returncode >= 0:
            break
        # A worker killed by a signal (obstore aborted with SIGABRT now and
        # then here, saying nothing) is counted and run again.
        CRASHES[lib] = CRASHES.get(lib, 0) + 1
        print(f"{lib} {workload} died of signal {-r.returncode}: {r.stderr[-300:]!r}", file=sys.stderr)
    if r.returncode != 0:
        raise SystemExit(f"{lib} {workload} exited {r.returncode}:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="1 round, smaller counts and a 64 MiB object")
    ap.add_argument("--only", default=",".join(LIBS))
    ap.add_argument("--workloads", default="import,put,keys,multipart5,multipart8,multipart16,get,features,hashing")
    ap.add_argument("--json", help="write every run's figures here")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--workload", help=argparse.SUPPRESS)
    ap.add_argument("--endpoint", help=argparse.SUPPRESS)
    ap.add_argument("--bucket", help=argparse.SUPPRESS)
    ap.add_argument("--prefix", help=argparse.SUPPRESS)
    ap.add_argument("--key", help=argparse.SUPPRESS)
    ap.add_argument("--env", default="{}", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker == "hashing":
        print(json.dumps(w_hashing(args.quick)))
        return
    if args.worker:
        print(json.dumps(asyncio.run(worker(args))))
        return

    from seaweed import SeaweedFS

    libs = [lib for lib in args.only.split(",") if lib]
    workloads = [w for w in args.workloads.split(",") if w]
    rounds = 1 if args.quick else args.rounds
    with tempfile.TemporaryDirectory(prefix="s3bench-") as tmp:
        store = SeaweedFS(Path(tmp)).start()
        try:
            big = "bench/big"
            client = store.client(timeout=120)
            client.put_object(Bucket=store.bucket, Key=big, Body=os.urandom(64 * MiB if args.quick else BIG))
            client.close()
            results: dict[str, dict[str, list[float]]] = {lib: {} for lib in libs}
            text: dict[str, dict[str, str]] = {lib: {} for lib in libs}
            hashing: dict[str, list[float]] = {}
            for rnd in range(rounds):
                for w in workloads:
                    if w == "features" and rnd:
                        continue
                    if w == "hashing":
                        for name, value in run_worker("hashing", w, store, "", args.quick).items():
                            hashing.setdefault(name, []).append(value)
                        continue
                    order = libs if rnd % 2 == 0 else libs[::-1]
                    for lib in order:
                        figures = run_worker(lib, w, store, f"r{rnd}-{lib}", args.quick, big)
                        for name, value in figures.items():
                            if isinstance(value, str):
                                text[lib][name] = value
                            else:
                                results[lib].setdefault(name, []).append(value)
                        print(f"round {rnd + 1}/{rounds} {w} {lib}: done", file=sys.stderr, flush=True)
        finally:
            store.cleanup()
    names = list(dict.fromkeys(n for lib in libs for n in results[lib]))
    width = max(map(len, names + ["figure"])) + 2
    print(f"\nmedians of {rounds} round(s); SeaweedFS {store.endpoint} on loopback\n")
    print("figure".ljust(width) + "".join(lib.rjust(14) for lib in libs))
    for n in names:
        row = "".join(f"{statistics.median(results[lib][n]):14,.2f}" if n in results[lib] else " " * 14
                      for lib in libs)
        print(n.ljust(width) + row)
    feats = list(dict.fromkeys(n for lib in libs for n in text[lib]))
    if feats:
        print()
        for n in feats:
            print(n)
            for lib in libs:
                print(f"    {lib}: {text[lib].get(n, '-')}")
    if hashing:
        print(f"\nhashing (medians of {rounds})")
        for n, values in hashing.items():
            print(f"    {n.ljust(width - 4)}{statistics.median(values):14,.2f}")
    for lib, n in CRASHES.items():
        print(f"\n{lib}: {n} worker(s) died of a signal and were run again")
    if args.json:
        Path(args.json).write_text(json.dumps({"figures": results, "features": text, "hashing": hashing},
                                              indent=1))


if __name__ == "__main__":
    main()
