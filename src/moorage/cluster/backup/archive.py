"""The backup archive's format: writing it, checking all of it before anything is restored, reading it back.

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
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import tarfile
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from moorage import __version__

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
MAX_MANIFEST = 1 << 30  # about 200 bytes a file: millions of blobs fit
_BLOB_NAME = re.compile(r"^blobs/(sha256|sha384|sha512)/([0-9a-f]{64,128})$")
_HEX_LENGTH = {"sha256": 64, "sha384": 96, "sha512": 128}

Progress = Callable[[int], None]


class BackupError(Exception):
    """A backup or restore that cannot go on; the message is one sentence."""


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


def damaged(path: Path, what: str) -> BackupError:
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
                    raise damaged(path, f"it holds {name} twice")
                if not member.isfile() or name.startswith("/") or ".." in name.split("/"):
                    raise damaged(path, f"it holds an unexpected entry {name!r}")
                f = tar.extractfile(member)
                assert f is not None
                if name == MANIFEST:
                    if member.size > MAX_MANIFEST:
                        raise damaged(path, f"its {MANIFEST} is {member.size} bytes, past any real one")
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
                        raise damaged(path, f"it holds a blob under a name that is no digest ({name})")
                    want = digest.partition(":")[2]
                    if (other.hexdigest() if other is not None else sha.hexdigest()) != want:
                        raise damaged(path, f"the content of blob {digest} does not match its digest")
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
            raise damaged(path, "it ends early (truncated?)") from None
        if seen:
            raise damaged(path, f"its tar structure is broken after {len(seen)} files ({e})") from None
        raise BackupError(f"{path} is not a Moorage backup archive (not a tar file)") from None
    except (tarfile.TarError, EOFError) as e:
        raise damaged(path, f"its tar structure is broken ({e})") from None

    if manifest_bytes is None:
        raise damaged(path, f"it has no {MANIFEST}, which is written last, so it is incomplete (truncated?)")
    try:
        manifest = json.loads(manifest_bytes)
    except ValueError:
        raise damaged(path, f"its {MANIFEST} is not valid JSON") from None
    if not isinstance(manifest, dict) or manifest.get("kind") != KIND:
        raise BackupError(f"{path} is not a Moorage backup archive (its {MANIFEST} is not one)")
    if manifest.get("format") != FORMAT:
        raise BackupError(f"the archive {path} has format version {manifest.get('format')!r}, and this "
                          f"moorage {__version__} reads format version {FORMAT} only")
    listed = manifest.get("files")
    if not isinstance(listed, list) or not all(isinstance(f, dict) for f in listed):
        raise damaged(path, f"its {MANIFEST} has no file list")
    files = {str(f.get("name")): f for f in listed}
    for name, entry in files.items():
        got = seen.get(name)
        if got is None:
            raise damaged(path, f"{name}, listed in its manifest, is missing")
        if got["size"] != entry.get("size"):
            raise damaged(path, f"{name} has {got['size']} bytes, not the {entry.get('size')} its manifest lists")
        if got["sha256"] != entry.get("sha256"):
            raise damaged(path, f"the sha256 of {name} does not match its manifest")
    extra = sorted(set(seen) - set(files))
    if extra:
        raise damaged(path, f"it holds {extra[0]}, which its manifest does not list")
    for required in (SNAPSHOT, CA_CERT, CA_KEY):
        if required not in files:
            raise damaged(path, f"it lacks {required}")
    if not trailer_ok:
        raise damaged(path, "etcd's own checksum at the end of the snapshot does not match")
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
        raise damaged(checked.path, f"{name} changed while it was being restored")
