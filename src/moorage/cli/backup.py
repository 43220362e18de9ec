"""`moorage backup` and `moorage restore`: one archive out of a live cluster, a new cluster of one from it.

backup talks to any replica through the admin API only, so it runs from any
machine that can reach one (no access to the blob storage or etcd needed) and
never pauses the registry. restore checks the whole archive before it writes
a byte, and writes only into an empty data directory. The archive format and
the etcd side are in cluster/backup/.
"""

from __future__ import annotations

import argparse
import json
import shutil
import socket
import sys
import time
from pathlib import Path
from typing import Any

import httpx

from moorage import logs
from moorage.cli.adminclient import AdminClient, add_cluster_options, untrusted, _cert_failed
from moorage.cli.errors import CliError
from moorage.cli.serve import add_storage_options, storage_choice
from moorage.cluster import pki
from moorage.cluster.addresses import AddressError, check_ports_free, parse_listen
from moorage.cluster.backup import archive, restore
from moorage.cluster.backup.archive import BackupError
from moorage.cluster.etcd_member import EtcdError
from moorage.cluster.identity import Identity
from moorage.storage.errors import StorageError

MiB = 1 << 20
QUIET_SECONDS = 2.0


def register(commands) -> None:
    p = commands.add_parser(
        "backup", help="write a backup archive of a running cluster",
        description="Write one archive of a running cluster: a consistent etcd snapshot (repositories, tags, "
                    "users, grants, settings), the cluster CA and, with --with-blobs, every blob. The "
                    "registry keeps serving. The archive holds the CA key and password hashes: keep it secret.")
    add_cluster_options(p)
    p.add_argument("--output", type=Path, required=True, metavar="FILE", help="the archive to write (a tar file)")
    p.add_argument("--force", action="store_true", help="overwrite --output if it exists")
    p.add_argument("--with-blobs", action="store_true",
                   help="include every blob, streamed through the replica (default: metadata only)")
    p.add_argument("--json", action="store_true", help="print the archive's manifest as JSON")
    p.set_defaults(run=run_backup)

    p = commands.add_parser(
        "restore", help="build a new cluster of one from a backup archive",
        description="Check a backup archive, then build a new cluster of one from it in an empty data "
                    "directory; start it with `moorage serve --data-dir DIR`, then join replicas as usual. "
                    "A damaged archive is refused before anything is written.")
    p.add_argument("--input", type=Path, required=True, metavar="FILE", help="the archive `moorage backup` wrote")
    p.add_argument("--data-dir", type=Path, required=True,
                   help="the new replica's data directory; must be empty or not exist")
    p.add_argument("--storage-dir", type=Path, default=None,
                   help="blob storage directory (default: DATA_DIR/blobs); the archive's blobs go there, "
                        "else it must already hold the cluster's blobs")
    add_storage_options(p, redirect=False)
    p.add_argument("--advertise", default="127.0.0.1", metavar="IP",
                   help="address the new replica advertises (default: 127.0.0.1): its etcd member listens "
                        "there while restore runs it, and the printed `moorage serve` listens there; a serve "
                        "with another --listen host moves the member to it")
    p.add_argument("--etcd-client-port", type=int, default=2379, help="etcd client port (default: 2379)")
    p.add_argument("--etcd-peer-port", type=int, default=2380, help="etcd peer port (default: 2380)")
    p.add_argument("--listen", default=None, metavar="HOST:PORT",
                   help="the API address the printed `moorage serve` command uses (default: ADVERTISE:5000, "
                        "or a free port there when 5000 is taken)")
    p.set_defaults(run=run_restore)


# -- progress ---------------------------------------------------------------------

class Progress:
    """A bar on a terminal; elsewhere (logs, CI) a plain line at every tenth of the way,
    once a phase has run for QUIET_SECONDS: short ones stay silent, so a refusal stays one sentence."""

    def __init__(self, label: str, total: int, quiet: bool = False):
        self.label, self.total, self.done = label, max(total, 0), 0
        self.tty = sys.stderr.isatty()
        self.quiet = quiet
        self._shown = -1
        self._drawn_at = 0.0
        self.started = time.monotonic()

    def __call__(self, n: int) -> None:
        self.done += n
        self._show()

    def _show(self, final: bool = False) -> None:
        if self.quiet:
            return
        fraction = self.done / self.total if self.total else 1.0
        if self.tty:
            now = time.monotonic()
            if not final and now - self._drawn_at < 0.1:
                return
            self._drawn_at = now
            filled = int(30 * min(fraction, 1.0))
            print(f"\r{self.label:<10} [{'#' * filled}{'.' * (30 - filled)}] {fraction:4.0%} "
                  f"{self.done / MiB:8.1f}/{self.total / MiB:.1f} MiB", end="\n" if final else "",
                  file=sys.stderr, flush=True)
            return
        if time.monotonic() - self.started < QUIET_SECONDS:
            return
        step = int(fraction * 10)
        if step > self._shown and (step < 10 or final):
            self._shown = step
            print(f"moorage: {self.label}: {fraction:.0%} ({self.done / MiB:.1f}/{self.total / MiB:.1f} MiB)",
                  file=sys.stderr, flush=True)

    def finish(self) -> None:
        self.done = max(self.done, self.total)
        self._show(final=True)


# -- backup -----------------------------------------------------------------------

class _Stream:
    """A streamed GET through the admin client, with its errors as one sentence."""

    def __init__(self, admin: AdminClient, path: str):
        self.admin, self.path = admin, path
        self._cm: Any = None

    def __enter__(self) -> httpx.Response:
        a = self.admin
        try:
            self._cm = a.http.stream("GET", self.path, timeout=httpx.Timeout(600.0, connect=5.0))
            r = self._cm.__enter__()
        except httpx.ConnectError as e:
            if _cert_failed(e):
                raise CliError(untrusted(a.url, e)) from None
            raise CliError(f"cannot reach {a.url}: {e}") from None
        except httpx.HTTPError as e:
            raise CliError(f"talking to {a.url} failed: {e}") from None
        if r.status_code != 200:
            r.read()
            self._cm.__exit__(None, None, None)
            if r.status_code == 401:
                raise CliError(f"{a.url} refused the admin credentials")
            try:
                message = r.json().get("error")
            except (ValueError, AttributeError):
                message = None
            raise CliError(message or f"{a.url} answered {r.status_code} to GET {self.path}")
        return r

    def __exit__(self, *exc) -> None:
        self._cm.__exit__(*exc)


def _chunks(admin: AdminClient, r: httpx.Response):
    try:
        yield from r.iter_bytes(archive.CHUNK)
    except httpx.HTTPError as e:
        raise CliError(f"the transfer from {admin.url} broke off ({e}); run the backup again") from None


def readable_metadata(admin: AdminClient) -> dict[str, Any]:
    """Settings, users, teams, grants and visibility as people read them (the snapshot is what restores)."""
    return {
        "note": "for people to read; `moorage restore` restores from etcd.snapshot, not from this file",
        "settings": admin.call("GET", "/_admin/config").get("settings", {}),
        "users": admin.call("GET", "/_admin/users").get("users", []),
        "teams": admin.call("GET", "/_admin/teams").get("teams", []),
        "grants": admin.call("GET", "/_admin/grants").get("grants", []),
        "visibility": admin.call("GET", "/_admin/visibility").get("visibility", []),
    }


def run_backup(args: argparse.Namespace) -> int:
    output: Path = args.output
    if output.is_dir():
        raise CliError(f"--output {output} is a directory; name the archive file to write")
    if not output.parent.is_dir():
        raise CliError(f"the directory of --output {output} does not exist")
    if output.exists() and not args.force:
        raise CliError(f"--output {output} already exists; pass --force to overwrite it, or name another file")
    admin = AdminClient(args)
    quiet = args.json
    try:
        admin.call("GET", "/_admin/cluster/status")  # credentials and trust first, before any file is made
        writer = archive.ArchiveWriter(output)
        try:
            manifest = _write(admin, writer, args.with_blobs, quiet)
        except BaseException:
            writer.abort()
            raise
    except BackupError as e:
        raise CliError(str(e)) from None
    finally:
        admin.close()
    if args.json:
        print(json.dumps(manifest, indent=2))
        return 0
    size = output.stat().st_size
    print(f"wrote {output} ({size / MiB:.1f} MiB): etcd snapshot at revision {manifest['revision']} from replica "
          f"{manifest['replica']}" + (f", {manifest['blobs']} blobs" if manifest["with_blobs"] else
                                      ", no blobs (restore needs the blob storage as it is)"))
    print("keep it secret: it holds the cluster CA's key and every user's password hash")
    return 0


def _write(admin: AdminClient, writer: archive.ArchiveWriter, with_blobs: bool, quiet: bool) -> dict[str, Any]:
    metadata = readable_metadata(admin)
    with _Stream(admin, "/_admin/backup/snapshot") as r:
        size = int(r.headers.get("Content-Length", "-1"))
        sha = r.headers.get("X-Moorage-Snapshot-Sha256", "")
        if size < 0 or len(sha) != 64:
            raise CliError(f"{admin.url} sent no snapshot size or hash; upgrade it to this version of moorage")
        snap = {"revision": int(r.headers.get("X-Moorage-Revision", "0")),
                "revision_after": int(r.headers.get("X-Moorage-Revision-After", "0")),
                "etcd_version": r.headers.get("X-Moorage-Etcd-Version", ""),
                "replica": r.headers.get("X-Moorage-Replica", ""),
                "cluster_token": r.headers.get("X-Moorage-Cluster-Token", "")}
        progress = Progress("snapshot", size, quiet)
        writer.add_stream(archive.SNAPSHOT, size, _chunks(admin, r), expect_sha256=sha, progress=progress)
        progress.finish()
    info = admin.call("GET", f"/_admin/backup/info?revision={snap['revision']}"
                             f"&through={snap.pop('revision_after') or snap['revision']}")
    writer.add_bytes(archive.METADATA, json.dumps(metadata, indent=2).encode() + b"\n")
    writer.add_bytes(archive.CA_CERT, info["ca_cert"].encode())
    writer.add_bytes(archive.CA_KEY, info["ca_key"].encode())
    blobs = info["blobs"] if with_blobs else []
    if blobs:
        progress = Progress("blobs", sum(b["size"] for b in blobs), quiet)
        for b in blobs:
            with _Stream(admin, f"/_admin/backup/blobs/{b['digest']}") as r:
                writer.add_stream(archive.blob_name(b["digest"]), b["size"], _chunks(admin, r),
                                  expect_digest=b["digest"], progress=progress)
        progress.finish()
    return writer.finish(archive.new_manifest(snap, with_blobs, len(blobs)))


# -- restore ----------------------------------------------------------------------

def run_restore(args: argparse.Namespace) -> int:
    logs.setup(args.log_level)
    data_dir: Path = args.data_dir.resolve()
    if data_dir.exists() and (not data_dir.is_dir() or any(data_dir.iterdir())):
        raise CliError(f"{data_dir} is not empty; restore builds a new replica and writes only into an empty "
                       "or new --data-dir")
    storage_dir, object_store, s3 = storage_choice(args)
    if s3 and s3.get("ca_cert"):
        s3["ca_cert"] = str(Path(s3["ca_cert"]).resolve())
    location = object_store or str((storage_dir or data_dir / "blobs").resolve())
    try:
        local_etcd = restore.etcd_version()
        archive_size = args.input.stat().st_size if args.input.is_file() else 0
        progress = Progress("checking", archive_size)
        checked = archive.check(args.input, local_etcd, progress)
        progress.finish()
    except BackupError as e:
        raise CliError(str(e)) from None
    if shutil.which("etcdctl") is None:
        raise CliError("etcdctl is not installed (Debian package etcd-client); restore needs it")
    host = args.advertise
    check_ports_free([(host, args.etcd_client_port, "the etcd client port"),
                      (host, args.etcd_peer_port, "the etcd peer port")])
    listen = _listen(args.listen, host, (args.etcd_client_port, args.etcd_peer_port))
    made = not data_dir.exists()
    replica_id = Identity.new_id()
    identity = Identity(replica_id=replica_id, cluster_token=f"moorage-{replica_id}", created=time.time(),
                        storage_dir=location, etcd_client_port=args.etcd_client_port,
                        etcd_peer_port=args.etcd_peer_port, advertise=host, s3=s3)
    bars: list[Progress] = []

    def blob_progress(total: int) -> Progress:
        bars.append(Progress("blobs", total))
        return bars[-1]

    try:
        restored = restore.restore(checked, data_dir, identity, blob_progress)
    except BaseException as e:
        _undo(data_dir, made)
        if isinstance(e, (BackupError, EtcdError, pki.PkiError, StorageError)):
            raise CliError(f"{e} (the data directory was left empty)") from None
        raise
    for bar in bars:
        bar.finish()
    revision, dropped, written, present = restored.revision, restored.dropped, restored.written, restored.present
    m = checked.manifest
    print(f"restored the backup of {m.get('created_utc', '?')} (revision {m.get('revision')}, replica "
          f"{m.get('replica')}) into {data_dir} as replica {replica_id}, a new cluster of one starting at "
          f"revision {revision}")
    if dropped:
        n = len(dropped)
        print(f"the old cluster's replica record{'s' * (n != 1)} {'were' if n != 1 else 'was'} dropped "
              f"(those replicas are not part of the new cluster): {', '.join(dropped)}")
    if checked.blobs:
        print(f"blobs: {written} written to {location}, {present} already there")
    else:
        print(f"the archive has no blobs: {location} must hold the cluster's blob storage")
    # The etcd ports and the storage directory are in DATA_DIR/replica.json now; the API address is
    # not (the advertised address follows --listen at every start), and the default one may be
    # another registry's.
    print(f"start it with `moorage serve --data-dir {args.data_dir} --listen {listen}`, then join replicas "
          f"with `moorage join --existing https://{listen}`; the cluster CA is the old one, so clients trust "
          "it as before")
    return 0


def _listen(given: str | None, host: str, etcd_ports: tuple[int, ...]) -> str:
    """The API address for the restored replica: the one given, else HOST:5000, else a free port."""
    if given is not None:
        listen_host, port = parse_listen(given)
        check_ports_free([(listen_host, port, "--listen")])
        return given
    try:
        if 5000 not in etcd_ports:
            check_ports_free([(host, 5000, "the default API port")])
            return _join(host, 5000)
    except AddressError:
        pass
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.bind((host, 0))
        port = s.getsockname()[1]
    return _join(host, port)


def _join(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _undo(data_dir: Path, made: bool) -> None:
    """Leave the data directory as it was found: gone if we made it, else empty."""
    if made:
        shutil.rmtree(data_dir, ignore_errors=True)
        return
    for child in data_dir.iterdir():
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child, ignore_errors=True)
        else:
            child.unlink(missing_ok=True)
