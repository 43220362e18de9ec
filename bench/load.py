"""HTTP load: the requests the scenarios time, and the tools that send them.

Synchronous pushes (http.client, sendfile for big bodies), the concurrent
aiohttp small-push clients, and the curl and wrk runners with their parsers.
Every request goes over the server's transport (HTTPS when it serves TLS,
trusting its CA only) and carries its credentials (credentials.py).
"""

from __future__ import annotations

import asyncio
import http.client
import mmap
import re
import ssl
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Awaitable, Callable, Protocol
from urllib.parse import urljoin, urlsplit

import aiohttp
import yarl

from content import MiB, OCI_MANIFEST, Image, SourceFile, sha256
from credentials import Credentials, repository_of


class Target(Protocol):
    """A registry under load, as this module needs it (servers.Server is one): named here, so
    that the modules that run the registries can import this one and not the other way round."""

    port: int
    ca: Path | None
    credentials: Credentials | None

    @property
    def url(self) -> str: ...

    def ssl_context(self) -> ssl.SSLContext | None: ...


class ToolSettings(Protocol):
    """How wrk and hey are run (scenarios.Config is one)."""

    wrk_conns: int
    wrk_seconds: int
    wrk_threads: int


NET_TIMEOUT = 60.0          # one HTTP request, including a 256 MiB body


class BenchError(Exception):
    """A failed run: reported in its row, the bench goes on."""


# --------------------------------------------------------------------------
# HTTP, synchronous: http.client, with sendfile for big bodies

Response = tuple[int, http.client.HTTPMessage, bytes]


TLS_WRITE = 1 * MiB  # a big body over TLS goes out in slices of this size (see send_file)


def connect(server: Target, timeout: float = NET_TIMEOUT) -> http.client.HTTPConnection:
    ctx = server.ssl_context() if getattr(server, "tls", False) else None
    if ctx is not None:
        return http.client.HTTPSConnection("127.0.0.1", server.port, timeout=timeout, context=ctx)
    return http.client.HTTPConnection("127.0.0.1", server.port, timeout=timeout)


def auth_headers(server: Target, target: str) -> dict[str, str]:
    """What a client logged in to this server sends with a request for `target` (nothing if no auth)."""
    creds = getattr(server, "credentials", None)
    if creds is None or not target.startswith("/v2/"):
        return {}

    def fetch(method: str, path: str, headers: dict[str, str]) -> tuple[int, bytes]:
        status, _, body = raw_request(server, method, path, headers)
        return status, body
    return creds.headers(repository_of(target), fetch)


def repo_auth(server: Target, repo: str) -> dict[str, str]:
    """The Authorization header for requests about `repo`; fetching it (if due) is the untimed part."""
    return auth_headers(server, f"/v2/{repo}/blobs/")


def call(server: Target, conn: http.client.HTTPConnection, method: str, target: str,
         headers: dict[str, str] | None = None, body: bytes = b"") -> Response:
    conn.request(method, target, body=body, headers={**auth_headers(server, target), **(headers or {})})
    resp = conn.getresponse()
    return resp.status, resp.headers, resp.read()


def send_file(sock: object, path: Path, offset: int, length: int) -> int:
    """Send a slice of a file: sendfile(2) over plain TCP; over TLS, 1 MiB slices of an mmap.

    Python's SSLSocket.sendfile falls back to 8 KiB send() calls, which makes
    the client, not the registry, the bottleneck of a push; slices of a mapping
    are encrypted straight from the page cache.
    """
    with open(path, "rb") as f:
        if not isinstance(sock, ssl.SSLSocket):
            return sock.sendfile(f, offset, length)
        start = offset - offset % mmap.ALLOCATIONGRANULARITY
        # Unmapped when the last slice is gone (no close(): a slice held by an
        # exception's traceback would make it fail and hide the real error).
        view = memoryview(mmap.mmap(f.fileno(), offset + length - start, offset=start,
                                    access=mmap.ACCESS_READ))
        end = offset - start + length
        for pos in range(offset - start, end, TLS_WRITE):
            sock.sendall(view[pos:min(pos + TLS_WRITE, end)])
        return length


def call_file(server: Target, conn: http.client.HTTPConnection, method: str, target: str, path: Path,
              offset: int, length: int, headers: dict[str, str]) -> Response:
    """A request whose body is a slice of a file, sent with sendfile(2) (or mmap slices over TLS)."""
    conn.putrequest(method, target, skip_accept_encoding=True)
    for name, value in {**auth_headers(server, target), **headers, "Content-Length": str(length)}.items():
        conn.putheader(name, value)
    conn.endheaders()
    sent = send_file(conn.sock, path, offset, length)
    if sent != length:
        raise BenchError(f"sent {sent} of {length} bytes")
    resp = conn.getresponse()
    return resp.status, resp.headers, resp.read()


def raw_request(server: Target, method: str, target: str, headers: dict[str, str] | None = None,
                body: bytes = b"", timeout: float = NET_TIMEOUT) -> Response:
    """One request on a new connection, exactly as given: no credentials added."""
    conn = connect(server, timeout)
    try:
        conn.request(method, target, body=body, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, resp.headers, resp.read()
    finally:
        conn.close()


def request(server: Target, method: str, target: str, headers: dict[str, str] | None = None,
            body: bytes = b"", timeout: float = NET_TIMEOUT) -> Response:
    """One request on a new connection, with the credentials a logged-in client sends."""
    return raw_request(server, method, target, {**auth_headers(server, target), **(headers or {})},
                       body, timeout)


def admin_request(server: Target, method: str, target: str, headers: dict[str, str] | None = None,
                  body: bytes = b"") -> Response:
    """A request to Moorage's admin API, which takes the admin's Basic credentials (not a token)."""
    assert server.credentials is not None
    return raw_request(server, method, target, {"Authorization": server.credentials.basic(), **(headers or {})},
                       body)


def expect(resp: Response, status: int, what: str) -> Response:
    if resp[0] != status:
        raise BenchError(f"{what}: HTTP {resp[0]} (wanted {status}): {resp[2][:200]!r}")
    return resp


def location(server: Target, base: str, resp: Response) -> str:
    """The Location of an upload as a request target (path and query)."""
    loc = resp[1].get("Location")
    if not loc:
        raise BenchError("upload response without Location")
    parts = urlsplit(urljoin(server.url + base, loc))
    return parts.path + (f"?{parts.query}" if parts.query else "")


def with_digest(target: str, digest: str) -> str:
    return target + ("&" if "?" in target else "?") + "digest=" + digest


def start_upload(server: Target, conn: http.client.HTTPConnection, repo: str) -> str:
    base = f"/v2/{repo}/blobs/uploads/"
    return location(server, base, expect(call(server, conn, "POST", base), 202, "POST upload"))


def push_monolithic(server: Target, repo: str, src: SourceFile) -> None:
    """POST, then one PUT ?digest= carrying the whole blob (the spec's monolithic upload)."""
    conn = connect(server)
    try:
        target = start_upload(server, conn, repo)
        resp = call_file(server, conn, "PUT", with_digest(target, src.digest), src.path, 0, src.size,
                         {"Content-Type": "application/octet-stream"})
        expect(resp, 201, "PUT blob")
    finally:
        conn.close()


def push_chunked(server: Target, repo: str, src: SourceFile, chunk: int) -> None:
    """POST, PATCH chunk by chunk (following each new Location), then PUT ?digest=."""
    conn = connect(server)
    try:
        target = start_upload(server, conn, repo)
        for offset in range(0, src.size, chunk):
            length = min(chunk, src.size - offset)
            resp = call_file(server, conn, "PATCH", target, src.path, offset, length, {
                "Content-Type": "application/octet-stream",
                "Content-Range": f"{offset}-{offset + length - 1}",
            })
            target = location(server, target, expect(resp, 202, f"PATCH at {offset}"))
        expect(call(server, conn, "PUT", with_digest(target, src.digest), {"Content-Length": "0"}),
               201, "PUT close")
    finally:
        conn.close()


def push_small_blob(server: Target, repo: str, data: bytes) -> str:
    conn = connect(server)
    try:
        target = start_upload(server, conn, repo)
        digest = sha256(data)
        expect(call(server, conn, "PUT", with_digest(target, digest),
                    {"Content-Type": "application/octet-stream"}, data), 201, "PUT blob")
        return digest
    finally:
        conn.close()


def push_manifest(server: Target, repo: str, ref: str, body: bytes) -> None:
    expect(request(server, "PUT", f"/v2/{repo}/manifests/{ref}", {"Content-Type": OCI_MANIFEST},
                   body), 201, "PUT manifest")


# --------------------------------------------------------------------------
# HTTP, asynchronous: the concurrent small-push clients

async def push_image_async(session: aiohttp.ClientSession, base: str, repo: str, tag: str,
                           image: Image, auth: dict[str, str] | None = None) -> int:
    """Every blob with POST + PUT ?digest=, then the manifest; returns the operations done.

    `auth`: the Authorization header for `repo` (auth_headers), fetched before the timed part.
    """
    auth = auth or {}
    post_url = f"{base}/v2/{repo}/blobs/uploads/"
    for blob in image.blobs:
        async with session.post(post_url, headers=auth) as r:
            text = await r.read()
            if r.status != 202:
                raise BenchError(f"POST upload: HTTP {r.status} {text[:200]!r}")
            loc = r.headers.get("Location", "")
        put_url = yarl.URL(with_digest(urljoin(post_url, loc), sha256(blob)), encoded=True)
        async with session.put(put_url, data=blob,
                               headers={**auth, "Content-Type": "application/octet-stream"}) as r:
            text = await r.read()
            if r.status != 201:
                raise BenchError(f"PUT blob: HTTP {r.status} {text[:200]!r}")
    await put_manifest_async(session, base, repo, tag, image.manifest, auth)
    return len(image.blobs) + 1


async def put_manifest_async(session: aiohttp.ClientSession, base: str, repo: str, tag: str,
                             body: bytes, auth: dict[str, str] | None = None) -> int:
    async with session.put(f"{base}/v2/{repo}/manifests/{tag}", data=body,
                           headers={**(auth or {}), "Content-Type": OCI_MANIFEST}) as r:
        text = await r.read()
        if r.status != 201:
            raise BenchError(f"PUT manifest {repo}:{tag}: HTTP {r.status} {text[:200]!r}")
    return 1


Job = Callable[[aiohttp.ClientSession], Awaitable[int]]  # one client's unit of work; returns ops done


async def run_clients(jobs: list[Job], clients: int, timeout: float,
                      ssl_context: ssl.SSLContext | None = None) -> int:
    """Run jobs from `clients` concurrent workers, each one request at a time; returns the ops."""
    pending = iter(jobs)  # shared by the workers: each takes the next job when it is free
    per_request = aiohttp.ClientTimeout(total=NET_TIMEOUT)
    connector = aiohttp.TCPConnector(limit=clients, ssl=ssl_context if ssl_context is not None else True)
    async with aiohttp.ClientSession(connector=connector, timeout=per_request) as session:
        async def worker() -> int:
            done = 0
            for job in pending:
                done += await job(session)
            return done
        counts = await asyncio.wait_for(asyncio.gather(*(worker() for _ in range(clients))), timeout)
    return sum(counts)



# --------------------------------------------------------------------------
# External load generators

def curl_args(server: Target, target: str) -> list[str]:
    """curl's options for this server: its CA, HTTP/1.1, its credentials.

    HTTP/1.1 for both registries: Moorage (aiohttp) speaks nothing else, and
    curl would pick HTTP/2 with distribution, which pulls at half the speed of
    its HTTP/1.1 here (Go's HTTP/2 flow control): like with like, and the
    stricter comparison for Moorage.
    """
    args = []
    if getattr(server, "tls", False):
        args += ["--cacert", str(server.ca), "--http1.1"]
    for name, value in auth_headers(server, target).items():
        args += ["-H", f"{name}: {value}"]
    return args


def curl_pull(server: Target, target: str, streams: int, size: int) -> float:
    """MiB/s over all streams: total bytes over the slowest stream's time, as curl measures it.

    curl's own clock leaves out its process start (~5 ms, 4% of a 256 MiB pull)
    and the TLS handshake's share is as small; the streams start within a few
    milliseconds of each other.
    """
    # -L: a registry on object storage answers with a redirect to a presigned URL;
    # curl then sends the request there without the registry's Authorization.
    cmd = ["curl", "-sS", "-L", "--max-time", "60", "-o", "/dev/null", *curl_args(server, target),
           "-w", "%{http_code} %{size_download} %{time_total}", server.url + target]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(streams)]
    try:
        outputs = [proc.communicate(timeout=90) for proc in procs]
    except subprocess.TimeoutExpired:
        raise BenchError("curl timed out") from None
    finally:
        for proc in procs:  # none outlives its run, even on Ctrl-C
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    times = []
    for out, err in outputs:
        fields = out.split()
        if fields[:2] != ["200", str(size)]:
            raise BenchError(f"curl pull: {out!r} {err.strip()!r}")
        times.append(float(fields[2]))
    return streams * size / MiB / max(times)


@dataclass
class Measurement:
    value: float
    p99_ms: float | None = None
    note: str = ""
    # The units of work the run did (requests, MiB, operations: the row's unit
    # without "/s"), so that the server's CPU time can be given per unit.
    ops: float | None = None


def parse_wrk(output: str) -> Measurement:
    """Requests/s and the 99th percentile; a run with more than 1% errors is no figure at all."""
    rps = re.search(r"Requests/sec:\s+([\d.]+)", output)
    total = re.search(r"(\d+) requests in", output)
    if not rps or not total:
        raise BenchError(f"unreadable wrk output: {output[-300:]!r}")
    p99 = None
    if m := re.search(r"^\s*99%\s+([\d.]+)(us|ms|s)\s*$", output, re.M):
        p99 = float(m.group(1)) * {"us": 1e-3, "ms": 1.0, "s": 1e3}[m.group(2)]
    bad = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
    sock = re.search(r"Socket errors: (.*)", output)
    errors = int(bad.group(1)) if bad else 0
    if sock:
        errors += sum(int(n) for n in re.findall(r"\d+", sock.group(1)))
    if int(total.group(1)) == 0:
        raise BenchError("wrk: no request completed")
    if errors > 0.01 * int(total.group(1)):
        raise BenchError(f"wrk: {errors} errors of {total.group(1)} requests")
    return Measurement(float(rps.group(1)), p99, f"{errors} errors" if errors else "",
                       ops=int(total.group(1)))


def wrk(server: Target, target: str, cfg: ToolSettings, headers: dict[str, str] | None = None,
        script: Path | None = None) -> Measurement:
    cmd = ["wrk", f"-t{cfg.wrk_threads}", f"-c{cfg.wrk_conns}", f"-d{cfg.wrk_seconds}s",
           "--timeout", "5s", "--latency"]
    if script:
        cmd += ["-s", str(script)]
    # wrk speaks TLS for https URLs (and checks no certificate: it only measures).
    return load_tool(cmd, server, target, cfg, headers, parse_wrk)


def load_tool(cmd: list[str], server: Target, target: str, cfg: ToolSettings, headers: dict[str, str] | None,
              parse: Callable[[str], Measurement]) -> Measurement:
    """Run a load generator (wrk, hey) for cfg.wrk_seconds against target, with the client's headers."""
    for name, value in {**auth_headers(server, target), **(headers or {})}.items():
        cmd += ["-H", f"{name}: {value}"]
    try:
        out = subprocess.run(cmd + [server.url + target], capture_output=True, text=True,
                             timeout=cfg.wrk_seconds + 30)
    except subprocess.TimeoutExpired:
        raise BenchError(f"{cmd[0]} timed out") from None
    if out.returncode != 0:
        raise BenchError(f"{cmd[0]} exit {out.returncode}: {out.stderr.strip()[:300]}")
    return parse(out.stdout)


def parse_hey(output: str) -> Measurement:
    """Requests/s and the 99th percentile from hey's summary; over 1% errors or non-2xx/3xx is no figure."""
    rps = re.search(r"Requests/sec:\s+([\d.]+)", output)
    if not rps:
        raise BenchError(f"unreadable hey output: {output[-300:]!r}")
    p99 = None
    if m := re.search(r"99% in ([\d.]+) secs", output):
        p99 = float(m.group(1)) * 1e3
    statuses = {int(code): int(n) for code, n in re.findall(r"\[(\d{3})\]\s+(\d+) responses", output)}
    errors = 0
    if "Error distribution:" in output:
        errors = sum(int(n) for n in re.findall(r"^\s+\[(\d+)\]\s", output.split("Error distribution:")[1], re.M))
    total = sum(statuses.values())
    bad = sum(n for code, n in statuses.items() if not 200 <= code < 400) + errors
    if total == 0:
        raise BenchError(f"hey: no request completed: {output[-300:]!r}")
    if bad > 0.01 * (total + errors):
        raise BenchError(f"hey: {bad} errors or non-2xx/3xx of {total + errors} requests: {statuses}")
    return Measurement(float(rps.group(1)), p99, f"{bad} errors" if bad else "", ops=total + errors)


def hey(server: Target, target: str, cfg: ToolSettings, method: str) -> Measurement:
    """Like wrk, with hey: wrk 4.1 cannot time a HEAD whose answer has a body or no Content-Length
    (its parser waits for the body); hey asks with Go's client, redirects not followed, keep-alive.
    It speaks TLS for https URLs and checks no certificate, as wrk."""
    cmd = ["hey", "-z", f"{cfg.wrk_seconds}s", "-c", str(cfg.wrk_conns), "-m", method, "-t", "5",
           "-disable-redirects"]
    return load_tool(cmd, server, target, cfg, None, parse_hey)
