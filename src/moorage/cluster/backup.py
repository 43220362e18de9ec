"""Backup and restore: the archive format, the consistent etcd snapshot, and a restore into a cluster of one.

The archive is one uncompressed tar (blobs are compressed already), written
by `moorage backup` and read by `moorage restore`:

    etcd.snapshot           etcd's Maintenance.Snapshot stream as is (what
                            `etcdctl snapshot save` writes): every key of the
                            cluster at one revision, users, grants and
                            settings included; its last 32 bytes are etcd's
                            own sha256 of the rest
    metadata.json           the settings, users (no password hashes), teams,
                            grants and visibility as readable JSON, for people;
                            restore uses the snapshot, never this file
    ca/ca.crt, ca/ca.key    the cluster CA: a restored cluster keeps it, so
                            every client that trusts the old cluster trusts
                            the new one. THE KEY MAKES THE ARCHIVE SECRET.
    blobs/<alg>/<hex>       with --with-blobs: every blob the snapshot knows
    manifest.json           written last, as a trailer: format version, the
                            moorage and etcd versions, the revision, where and
                            when it was taken, and every other file with its
                            size and sha256

The manifest comes last so it can name every file's hash as computed while
writing, and so an archive cut short (a full disk, a killed copy) lacks it
and is refused as incomplete. Restore reads the archive twice: once to check
every file against the manifest, and only then to write anything.

Restore builds a new cluster of one with etcd's own `etcdctl snapshot
restore`, which checks the snapshot's hash and rewrites the membership to
the one new member under a new cluster token, keeping every key and
revision. The old replicas' records and the upload sessions in flight
(their data is not in the archive) are then deleted with the member
running, as emergency-repair does; the replica itself starts with `moorage
serve`. Unlike emergency-repair, it needs none of the old replicas' disks.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import msgspec

from moorage import __version__
from moorage.cluster import pki
from moorage.cluster.addresses import url_host
from moorage.cluster.identity import Identity
from moorage.meta import keys
from moorage.meta.etcd import EtcdClient, EtcdUnavailable, op_delete
from moorage.meta.records import BlobRecord, decoder
from moorage.storage.base import BlobDriver

FORMAT = 1
KIND = "moorage-backup"
MANIFEST = "manifest.json"
SNAPSHOT = "etcd.snapshot"
METADATA = "metadata.json"
CA_CERT = "ca/ca.crt"
CA_KEY = "ca/ca.key"
BLOBS = "blobs/"
CHUNK = 1 << 20
ETCD_HASH = 32  # etcd appends sha256(data) to a snapshot
LEADER_SECONDS = 20.0
MAX_MANIFEST = 1 << 30  # about 200 bytes a file: millions of blobs fit
_BLOB_NAME = re.compile(r"^blobs/(sha256|sha384|sha512)/([0-9a-f]{64,128})$")
_HEX_LENGTH = {"sha256": 64, "sha384": 96, "sha512": 128}

Progress = Callable[[int], None]
_blob_record = decoder(BlobRecord)


class BackupError(Exception):
    """A backup or restore that cannot go on; the message is one sentence."""


class Compacted(Exception):
    """etcd no longer holds the revision asked for (compacted away)."""


def blob_name(digest: str) -> str:
    algorithm, _, hexpart = digest.partition(":")
    return f"{BLOBS}{algorithm}/{hexpart}"


def digest_of(name: str) -> str | None:
    m = _BLOB_NAME.match(name)
    if m is None or len(m.group(2)) != _HEX_LENGTH[m.group(1)]:
        return None
    return f"{m.group(1)}:{m.group(2)}"


class TrailerCheck:
    """Checks etcd's own hash at the end of a snapshot, fed chunk by chunk."""

    def __init__(self) -> None:
        self._hash = hashlib.sha256()
        self._tail = b""

    def update(self, chunk: bytes) -> None:
        data = self._tail + chunk
        self._hash.update(data[:-ETCD_HASH])
        self._tail = data[-ETCD_HASH:]

    def ok(self) -> bool:
        return len(self._tail) == ETCD_HASH and self._hash.digest() == self._tail


# -- the replica's side: a consistent snapshot ------------------------------------

@dataclass
class Snapshot:
    """A snapshot spooled to an anonymous file (gone when closed), with what the archive records of it."""

    file: IO[bytes]
    size: int
    sha256: str
    revision: int        # every write acknowledged before the backup began is in it
    etcd_version: str
    # Read once the snapshot was taken: the snapshot holds no write newer than
    # this, so blobs listed at `revision` or here cover every blob it knows.
    revision_after: int


async def take_snapshot(client: EtcdClient, spool_dir: Path) -> Snapshot:
    """Spool the local member's snapshot, so its size and hash can be sent before its bytes.

    The linearizable revision read first makes the local member apply
    everything the cluster had committed by then; the snapshot, taken next
    from the same member, therefore holds every acknowledged write up to
    that revision (and any that came after). Nothing is paused: etcd
    snapshots its backend under a read transaction while writes go on.
    """
    revision = await client.revision()
    version = (await client.status()).version
    spool_dir.mkdir(parents=True, exist_ok=True)
    f = tempfile.TemporaryFile(dir=spool_dir)  # 0600, unlinked at once: it holds every secret
    try:
        sha, size, pending = hashlib.sha256(), 0, []
        pending_bytes = 0
        async for chunk in client.snapshot():
            pending.append(chunk)
            pending_bytes += len(chunk)
            if pending_bytes >= CHUNK:
                data = b"".join(pending)
                pending, pending_bytes = [], 0
                sha.update(data)
                size += len(data)
                await asyncio.to_thread(f.write, data)
        data = b"".join(pending)
        sha.update(data)
        size += len(data)
        await asyncio.to_thread(f.write, data)
        await asyncio.to_thread(f.flush)
        f.seek(0)
        return Snapshot(f, size, sha.hexdigest(), revision, version, await client.revision())
    except BaseException:
        f.close()
        raise


async def blobs_between(client: EtcdClient, revision: int, through: int) -> list[dict[str, Any]]:
    """Every blob recorded at `revision` or at `through`, with its size: a snapshot taken between
    the two knows no other (a blob it knows existed at the first or was created by the second)."""
    try:
        _, kvs = await client.range_prefix(keys.BLOB, revision=revision)
        if through != revision:
            _, later = await client.range_prefix(keys.BLOB, revision=through)
            kvs = list({kv.key: kv for kv in [*kvs, *later]}.values())
    except EtcdUnavailable as e:
        if "compacted" in str(e):
            raise Compacted(str(e)) from None
        raise
    blobs = []
    for kv in kvs:
        try:
            blobs.append({"digest": kv.key[len(keys.BLOB):].decode(), "size": _blob_record.decode(kv.value).size})
        except (msgspec.DecodeError, UnicodeDecodeError):
            continue
    return blobs


# -- writing an archive (the CLI's side) -----------------------------------------------

class _Reader(io.RawIOBase):
    """A file object over chunks, for tarfile: exact reads, hashing and progress on the way."""

    def __init__(self, chunks: Iterable[bytes], hashers: list, progress: Progress | None):
        self._chunks: Iterator[bytes] = iter(chunks)
        self._buf = bytearray()
        self._hashers = hashers
        self._progress = progress

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        while n < 0 or len(self._buf) < n:
            chunk = next(self._chunks, None)
            if chunk is None:
                break
            for h in self._hashers:
                h.update(chunk)
            if self._progress is not None:
                self._progress(len(chunk))
            self._buf += chunk
        n = len(self._buf) if n < 0 else min(n, len(self._buf))
        out = bytes(self._buf[:n])
        del self._buf[:n]
        return out


class ArchiveWriter:
    """Writes FILE.partial (mode 0600: the archive holds the CA key), renamed to FILE once complete."""

    def __init__(self, path: Path):
        self.path = path
        self.partial = path.with_name(path.name + ".partial")
        try:
            fd = os.open(self.partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        except OSError as e:
            raise BackupError(f"cannot write {self.partial}: {e.strerror}") from None
        self._file = os.fdopen(fd, "wb")
        self._tar = tarfile.open(fileobj=self._file, mode="w", format=tarfile.PAX_FORMAT)
        self.files: list[dict[str, Any]] = []

    def _info(self, name: str, size: int, mode: int = 0o600) -> tarfile.TarInfo:
        info = tarfile.TarInfo(name)
        info.size, info.mode, info.mtime = size, mode, int(time.time())
        return info

    def add_bytes(self, name: str, data: bytes) -> None:
        self._tar.addfile(self._info(name, len(data)), io.BytesIO(data))
        self.files.append({"name": name, "size": len(data), "sha256": hashlib.sha256(data).hexdigest()})

    def add_stream(self, name: str, size: int, chunks: Iterable[bytes], expect_sha256: str | None = None,
                   expect_digest: str | None = None, progress: Progress | None = None) -> str:
        """Stream `size` bytes into the archive; returns their sha256, checked against what was expected."""
        sha = hashlib.sha256()
        hashers = [sha]
        other = None
        if expect_digest is not None and not expect_digest.startswith("sha256:"):
            other = hashlib.new(expect_digest.partition(":")[0])
            hashers.append(other)
        try:
            self._tar.addfile(self._info(name, size), _Reader(chunks, hashers, progress))
        except OSError as e:
            if "unexpected end of data" in str(e):
                raise BackupError(f"{name} came shorter than its {size} bytes; run the backup again") from None
            raise
        got = sha.hexdigest()
        if expect_digest is not None and (other or sha).hexdigest() != expect_digest.partition(":")[2]:
            raise BackupError(f"blob {expect_digest} arrived with other content; run the backup again")
        if expect_sha256 is not None and got != expect_sha256:
            raise BackupError(f"{name} arrived with sha256 {got}, not the {expect_sha256} announced; "
                              "run the backup again")
        self.files.append({"name": name, "size": size, "sha256": got})
        return got

    def finish(self, manifest: dict[str, Any]) -> dict[str, Any]:
        manifest = {**manifest, "files": self.files}
        data = json.dumps(manifest, indent=2).encode() + b"\n"
        self._tar.addfile(self._info(MANIFEST, len(data)), io.BytesIO(data))
        self._tar.close()
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        os.replace(self.partial, self.path)
        return manifest

    def abort(self) -> None:
        try:
            self._tar.close()
        except Exception:  # noqa: BLE001 - the archive is being thrown away anyway
            pass
        self._file.close()
        self.partial.unlink(missing_ok=True)


def new_manifest(snapshot_info: dict[str, Any], with_blobs: bool, blobs: int) -> dict[str, Any]:
    return {
        "kind": KIND,
        "format": FORMAT,
        "moorage_version": __version__,
        "etcd_version": snapshot_info["etcd_version"],
        "revision": snapshot_info["revision"],
        "created": time.time(),
        "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "replica": snapshot_info["replica"],
        "cluster_token": snapshot_info["cluster_token"],
        "snapshot": SNAPSHOT,
        "with_blobs": with_blobs,
        "blobs": blobs,
        "secret": "this archive holds the cluster CA's private key and every user's password hash: "
                  "keep it as safe as the cluster itself",
    }


# -- checking an archive (restore, before it writes anything) ----------------------------

@dataclass
class Checked:
    path: Path
    manifest: dict[str, Any]
    files: dict[str, dict[str, Any]]   # name -> {size, sha256}

    @property
    def blobs(self) -> list[str]:
        return [n for n in self.files if n.startswith(BLOBS)]


def _damaged(path: Path, what: str) -> BackupError:
    return BackupError(f"the archive {path} is damaged: {what}; nothing was written")


def _version(value: object) -> tuple[int, int]:
    m = re.match(r"^(\d+)\.(\d+)", str(value))
    return (int(m.group(1)), int(m.group(2))) if m else (0, 0)


def check(path: Path, local_etcd: str, progress: Progress | None = None) -> Checked:
    """Read the whole archive once and refuse it, in one sentence, unless every file is as its manifest says."""
    seen: dict[str, dict[str, Any]] = {}
    manifest_bytes: bytes | None = None
    trailer_ok = False
    try:
        with tarfile.open(path, mode="r:") as tar:
            for member in tar:
                name = member.name
                if name in seen or (name == MANIFEST and manifest_bytes is not None):
                    raise _damaged(path, f"it holds {name} twice")
                if not member.isfile() or name.startswith("/") or ".." in name.split("/"):
                    raise _damaged(path, f"it holds an unexpected entry {name!r}")
                f = tar.extractfile(member)
                assert f is not None
                if name == MANIFEST:
                    if member.size > MAX_MANIFEST:
                        raise _damaged(path, f"its {MANIFEST} is {member.size} bytes, past any real one")
                    manifest_bytes = f.read()
                    continue
                sha = hashlib.sha256()
                trailer = TrailerCheck() if name == SNAPSHOT else None
                digest = digest_of(name) if name.startswith(BLOBS) else None
                other = hashlib.new(digest.partition(":")[0]) if digest and not digest.startswith("sha256:") else None
                while chunk := f.read(CHUNK):
                    sha.update(chunk)
                    if trailer is not None:
                        trailer.update(chunk)
                    if other is not None:
                        other.update(chunk)
                    if progress is not None:
                        progress(len(chunk))
                if name.startswith(BLOBS):
                    if digest is None:
                        raise _damaged(path, f"it holds a blob under a name that is no digest ({name})")
                    want = digest.partition(":")[2]
                    if (other.hexdigest() if other is not None else sha.hexdigest()) != want:
                        raise _damaged(path, f"the content of blob {digest} does not match its digest")
                if trailer is not None:
                    trailer_ok = trailer.ok()
                seen[name] = {"size": member.size, "sha256": sha.hexdigest()}
    except FileNotFoundError:
        raise BackupError(f"there is no archive at {path}") from None
    except IsADirectoryError:
        raise BackupError(f"{path} is a directory, not a backup archive") from None
    except PermissionError:
        raise BackupError(f"cannot read the archive {path}: permission denied") from None
    except tarfile.ReadError as e:
        if "unexpected end of data" in str(e) or not seen and manifest_bytes is None and "empty" in str(e):
            raise _damaged(path, "it ends early (truncated?)") from None
        if seen:
            raise _damaged(path, f"its tar structure is broken after {len(seen)} files ({e})") from None
        raise BackupError(f"{path} is not a Moorage backup archive (not a tar file)") from None
    except (tarfile.TarError, EOFError) as e:
        raise _damaged(path, f"its tar structure is broken ({e})") from None

    if manifest_bytes is None:
        raise _damaged(path, f"it has no {MANIFEST}, which is written last, so it is incomplete (truncated?)")
    try:
        manifest = json.loads(manifest_bytes)
    except ValueError:
        raise _damaged(path, f"its {MANIFEST} is not valid JSON") from None
    if not isinstance(manifest, dict) or manifest.get("kind") != KIND:
        raise BackupError(f"{path} is not a Moorage backup archive (its {MANIFEST} is not one)")
    if manifest.get("format") != FORMAT:
        raise BackupError(f"the archive {path} has format version {manifest.get('format')!r}, and this "
                          f"moorage {__version__} reads format version {FORMAT} only")
    listed = manifest.get("files")
    if not isinstance(listed, list) or not all(isinstance(f, dict) for f in listed):
        raise _damaged(path, f"its {MANIFEST} has no file list")
    files = {str(f.get("name")): f for f in listed}
    for name, entry in files.items():
        got = seen.get(name)
        if got is None:
            raise _damaged(path, f"{name}, listed in its manifest, is missing")
        if got["size"] != entry.get("size"):
            raise _damaged(path, f"{name} has {got['size']} bytes, not the {entry.get('size')} its manifest lists")
        if got["sha256"] != entry.get("sha256"):
            raise _damaged(path, f"the sha256 of {name} does not match its manifest")
    extra = sorted(set(seen) - set(files))
    if extra:
        raise _damaged(path, f"it holds {extra[0]}, which its manifest does not list")
    for required in (SNAPSHOT, CA_CERT, CA_KEY):
        if required not in files:
            raise _damaged(path, f"it lacks {required}")
    if not trailer_ok:
        raise _damaged(path, "etcd's own checksum at the end of the snapshot does not match")
    if _version(manifest.get("etcd_version")) > _version(local_etcd):
        raise BackupError(f"the archive {path} was taken from etcd {manifest.get('etcd_version')}, newer than "
                          f"the etcd {local_etcd} installed here; install etcd "
                          f"{manifest.get('etcd_version')} or newer to restore it")
    return Checked(path, manifest, {n: seen[n] for n in files})


def read_member(checked: Checked, names: Iterable[str]) -> Iterator[tuple[str, IO[bytes]]]:
    """The named files of a checked archive, in archive order, as file objects."""
    wanted = set(names)
    with tarfile.open(checked.path, mode="r:") as tar:
        for member in tar:
            if member.name in wanted:
                f = tar.extractfile(member)
                assert f is not None
                yield member.name, f


def copy_checked(src: IO[bytes], dest: IO[bytes], name: str, checked: Checked,
                 progress: Progress | None = None) -> None:
    """Copy a file out of the archive, checking its sha256 again (the archive could change under us)."""
    sha = hashlib.sha256()
    while chunk := src.read(CHUNK):
        sha.update(chunk)
        dest.write(chunk)
        if progress is not None:
            progress(len(chunk))
    if sha.hexdigest() != checked.files[name]["sha256"]:
        raise _damaged(checked.path, f"{name} changed while it was being restored")


# -- restoring ------------------------------------------------------------------------

def etcd_version() -> str:
    """The installed etcd's version, as `etcd --version` prints it."""
    binary = shutil.which("etcd")
    if binary is None:
        raise BackupError("the etcd binary is not installed (Debian package etcd-server); `make install` "
                          "installs it")
    out = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=30)
    m = re.search(r"etcd Version:\s*(\S+)", out.stdout)
    return m.group(1) if m else "0.0.0"


def restore_snapshot(snapshot: Path, identity: Identity, etcd_dir: Path) -> None:
    """`etcdctl snapshot restore`: a data directory whose only member is this replica, under a new token.

    etcdctl checks the hash etcd appended to the snapshot and keeps every
    key and revision; the membership it writes is what `serve` then starts.
    """
    etcdctl = shutil.which("etcdctl")
    if etcdctl is None:
        raise BackupError("etcdctl is not installed (Debian package etcd-client); restore needs it")
    peer = f"https://{url_host(identity.advertise)}:{identity.etcd_peer_port}"
    cmd = [etcdctl, "snapshot", "restore", str(snapshot), "--name", identity.replica_id,
           "--data-dir", str(etcd_dir), "--initial-cluster", f"{identity.replica_id}={peer}",
           "--initial-cluster-token", identity.cluster_token, "--initial-advertise-peer-urls", peer]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600,
                         env={**os.environ, "ETCDCTL_API": "3"})
    if out.returncode != 0:
        last = (out.stderr.strip().splitlines() or ["no output"])[-1]
        raise BackupError(f"etcdctl snapshot restore failed: {last[:300]}")
    os.chmod(etcd_dir, 0o700)


async def forget_old_cluster(client: EtcdClient) -> tuple[int, list[str]]:
    """Delete the old replicas' records and the upload sessions in flight, once the lone member leads.

    The old replicas are not part of the new cluster; the uploads' data
    lived in the old storage, outside the archive. Returns the revision the
    new cluster starts from and the replica ids dropped.
    """
    deadline = time.monotonic() + LEADER_SECONDS
    while True:
        try:
            _, records = await client.range_prefix(keys.REPLICA)
            dropped = sorted(kv.key[len(keys.REPLICA):].decode(errors="replace") for kv in records)
            result = await client.txn([], [op_delete(keys.REPLICA, prefix=True),
                                           op_delete(keys.UPLOAD, prefix=True)])
            return result.revision, dropped
        except EtcdUnavailable as e:
            if time.monotonic() > deadline:
                raise BackupError(f"the restored etcd member accepted no write within {LEADER_SECONDS:.0f}s "
                                  f"({e}); see DATA_DIR/etcd.log") from None
            await asyncio.sleep(0.2)


def install_ca(checked: Checked, data_dir: Path) -> None:
    pems = {}
    for name, f in read_member(checked, (CA_CERT, CA_KEY)):
        buf = io.BytesIO()
        copy_checked(f, buf, name, checked)
        pems[name] = buf.getvalue()
    try:
        pki.install_ca(pki.Paths(data_dir), pems[CA_CERT], pems[CA_KEY])
    except pki.PkiError as e:
        raise BackupError(f"the archive's cluster CA cannot be used: {e}") from None


async def restore_blobs(checked: Checked, storage: BlobDriver, progress: Progress | None = None) -> tuple[int, int]:
    """Put the archive's blobs into the storage: each one an upload, checked, then committed
    (the driver makes it appear whole or not at all), as a push would.

    A blob already there is kept (blobs are content-addressed and immutable).
    Returns (written, already present).
    """
    written = present = 0
    for name, f in read_member(checked, checked.blobs):
        digest = digest_of(name)
        assert digest is not None
        size = checked.files[name]["size"]
        if await storage.exists(digest) == size:
            present += 1
            if progress is not None:
                progress(size)
            continue
        upload = storage.new_upload_id()
        sha = hashlib.sha256()
        appender = await storage.open_upload(upload, 0, sha)
        try:
            while chunk := f.read(CHUNK):  # a local archive: the command has nothing else to do meanwhile
                await appender.write(chunk)
                if progress is not None:
                    progress(len(chunk))
            await appender.finish()
            # Checked again: the archive could have changed since it was checked.
            if sha.hexdigest() != checked.files[name]["sha256"]:
                raise _damaged(checked.path, f"{name} changed while it was being restored")
            await storage.commit_upload(upload, digest)
        except BaseException:
            await appender.abort()
            await storage.delete_upload(upload)
            raise
        written += 1
    return written, present
