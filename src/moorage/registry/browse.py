"""Browsing what the registry holds, for people: repository summaries, tag rows, image details.

The web console reads here. Lists come from the replica's in-memory index
after one shared `sync()`, so a page out of 10,000 repositories or 10,000
tags costs a filter and a sort of in-memory keys, never an etcd read. What
needs content (platforms, an image's configuration) is read from blob storage
only for the rows shown, and cached by digest: content under a digest never
changes. Repository summaries (size, last push) are cached per repository and
recomputed only when the index says it changed.
"""

from __future__ import annotations

import json
import logging
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from moorage.meta.index import Repo
from moorage.meta.records import ManifestRecord, Referrer
from moorage.registry.errors import ManifestUnknown, NameUnknown
from moorage.registry.manifests import IMAGE_TYPES, INDEX_TYPES
from moorage.registry.names import check_digest
from moorage.registry.repositories import Repositories

log = logging.getLogger(__name__)

REPO_SORTS = ("name", "pushed", "size", "tags")
TAG_SORTS = ("name", "pushed", "size")
# Image configurations larger than this are not read for display (real ones are a few KiB).
MAX_CONFIG_BYTES = 1 << 20
IMAGE_CONFIGS = frozenset({"application/vnd.oci.image.config.v1+json",
                           "application/vnd.docker.container.image.v1+json"})
CACHE_ENTRIES = 100_000

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Page(Generic[T]):
    items: list[T]
    total: int          # how many matched, before paging
    offset: int
    limit: int


@dataclass(frozen=True, slots=True)
class RepoSummary:
    name: str
    tags: int
    manifests: int
    size: int                 # its distinct blobs and its manifests, in bytes
    pushed: float | None      # the newest manifest push
    pushed_by: str | None


@dataclass(frozen=True, slots=True)
class ManifestRow:
    """A tag (or, with tag None, an untagged manifest) as a repository's page lists it."""

    tag: str | None
    digest: str
    media_type: str
    artifact_type: str | None
    subject: str | None
    size: int                 # the manifest with everything it references
    pushed: float
    pushed_by: str | None
    platforms: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Child:
    """A manifest an index lists."""

    digest: str
    media_type: str
    size: int
    platform: str
    artifact_type: str | None
    present: bool             # stored in this repository


@dataclass(slots=True)
class ImageDetail:
    repo: str
    digest: str
    record: ManifestRecord
    tags: list[str]
    manifest_json: str                       # pretty-printed
    manifest: dict[str, Any]
    size: int
    platforms: tuple[str, ...]
    config: dict[str, Any] | None = None     # an image's configuration, when small enough to show
    config_descriptor: dict[str, Any] | None = None
    layers: list[dict[str, Any]] = field(default_factory=list)
    children: list[Child] = field(default_factory=list)
    referrers: list[Referrer] = field(default_factory=list)


class _Lru(Generic[T]):
    def __init__(self, entries: int):
        self._items: OrderedDict[str, T] = OrderedDict()
        self._entries = entries

    def get(self, key: str) -> T | None:
        return self._items.get(key)

    def put(self, key: str, value: T) -> T:
        self._items[key] = value
        if len(self._items) > self._entries:
            self._items.popitem(last=False)
        return value


def platform_of(value: Any) -> str:
    """"os/architecture[/variant]" of a platform object or image configuration; "" if it names none."""
    if not isinstance(value, dict):
        return ""
    os_, arch, variant = value.get("os"), value.get("architecture"), value.get("variant")
    if not isinstance(os_, str) or not isinstance(arch, str) or not os_ or not arch:
        return ""
    if os_ == "unknown" and arch == "unknown":
        return ""  # buildx's attestation manifests
    return f"{os_}/{arch}/{variant}" if isinstance(variant, str) and variant else f"{os_}/{arch}"


class Browser:
    def __init__(self, registry: Repositories, cache_entries: int = CACHE_ENTRIES):
        self.registry = registry  # not "repositories": that is the listing below
        self.index = registry.index
        self._summaries: dict[str, tuple[int, RepoSummary]] = {}
        self._sizes: _Lru[int] = _Lru(cache_entries)
        self._platforms: _Lru[tuple[str, ...]] = _Lru(cache_entries)

    # -- repositories ------------------------------------------------------------

    async def repositories(self, visible: Callable[[str], bool] | None, query: str = "", sort: str = "name",
                           descending: bool = False, offset: int = 0, limit: int = 50) -> Page[RepoSummary]:
        """A page of the repositories `visible` lets through (None: all) whose name holds `query`."""
        await self.index.sync()
        names = self.index.sorted_repos()
        if query:
            query = query.lower()
            names = [n for n in names if query in n]
        if visible is not None:
            names = [n for n in names if visible(n)]
        if sort == "name":
            ordered = names[::-1] if descending else names
            chosen = [self.summary(n) for n in ordered[offset:offset + limit]]
        else:
            summaries = [self.summary(n) for n in names]
            key = _REPO_KEYS.get(sort, _REPO_KEYS["pushed"])
            summaries.sort(key=key, reverse=descending)
            chosen = summaries[offset:offset + limit]
        if len(self._summaries) > 2 * len(self.index.repos) + 1000:
            self._summaries = {k: v for k, v in self._summaries.items() if k in self.index.repos}
        return Page(chosen, len(names), offset, limit)

    def summary(self, name: str) -> RepoSummary:
        repo = self.index.repos.get(name)
        if repo is None:
            return RepoSummary(name, 0, 0, 0, None, None)
        cached = self._summaries.get(name)
        if cached is not None and cached[0] == repo.version:
            return cached[1]
        blobs = self.index.blobs
        size = sum(b.size for d in repo.blobs if (b := blobs.get(d)) is not None)
        size += sum(m.size for m in repo.manifests.values())
        newest = max(repo.manifests.values(), key=lambda m: m.created, default=None)
        found = RepoSummary(name, len(repo.tags), len(repo.manifests), size,
                            newest.created if newest else None, newest.pushed_by if newest else None)
        self._summaries[name] = (repo.version, found)
        return found

    # -- one repository ----------------------------------------------------------

    async def _repo(self, name: str) -> Repo:
        await self.index.sync()
        repo = self.index.repos.get(name)
        if repo is None:
            raise NameUnknown(f"repository {name} not known", {"name": name})
        return repo

    async def tags(self, name: str, query: str = "", sort: str = "name", descending: bool = False,
                   offset: int = 0, limit: int = 50) -> Page[ManifestRow]:
        """A page of the repository's tags whose name holds `query`, platforms filled in."""
        repo = await self._repo(name)
        tags = repo.sorted_tags()
        if query:
            query = query.lower()
            tags = [t for t in tags if query in t.lower()]
        if sort == "name":
            ordered = tags[::-1] if descending else tags
        else:
            manifests, tagged = repo.manifests, repo.tags
            if sort == "size":
                def key(t: str) -> float:
                    record = manifests.get(tagged[t])
                    return self.size(repo, tagged[t], record) if record else 0
            else:
                def key(t: str) -> float:
                    record = manifests.get(tagged[t])
                    return record.created if record else 0.0
            ordered = sorted(tags, key=key, reverse=descending)
        rows = [self._row(repo, t, repo.tags[t]) for t in ordered[offset:offset + limit]]
        return Page(await self._with_platforms(repo, [r for r in rows if r is not None]),
                    len(tags), offset, limit)

    async def manifests(self, name: str, untagged_only: bool = True, offset: int = 0,
                        limit: int = 50) -> Page[ManifestRow]:
        """A page of the repository's manifests (by default those no tag names), newest first."""
        repo = await self._repo(name)
        tagged = set(repo.tags.values()) if untagged_only else set()
        found = sorted(((d, r) for d, r in repo.manifests.items() if d not in tagged),
                       key=lambda item: item[1].created, reverse=True)
        rows = [self._row(repo, None, d) for d, _ in found[offset:offset + limit]]
        return Page(await self._with_platforms(repo, [r for r in rows if r is not None]),
                    len(found), offset, limit)

    def _row(self, repo: Repo, tag: str | None, digest: str) -> ManifestRow | None:
        record = repo.manifests.get(digest)
        if record is None:
            return None
        return ManifestRow(tag, digest, record.media_type, record.artifact_type, record.subject,
                           self.size(repo, digest, record), record.created, record.pushed_by)

    async def _with_platforms(self, repo: Repo, rows: list[ManifestRow]) -> list[ManifestRow]:
        out = []
        for row in rows:
            record = repo.manifests.get(row.digest)
            platforms = await self.platforms(repo, row.digest, record) if record else ()
            out.append(ManifestRow(row.tag, row.digest, row.media_type, row.artifact_type, row.subject,
                                   row.size, row.pushed, row.pushed_by, platforms))
        return out

    def size(self, repo: Repo, digest: str, record: ManifestRecord, depth: int = 0) -> int:
        """The manifest, its config and layers, and (for an index) its children's, in bytes."""
        cached = self._sizes.get(digest)
        if cached is not None:
            return cached
        blobs = self.index.blobs
        total = record.size + sum(b.size for d in record.blobs if (b := blobs.get(d)) is not None)
        if depth < 2:  # an index of indexes, at most
            for child in record.children:
                child_record = repo.manifests.get(child)
                if child_record is not None:
                    total += self.size(repo, child, child_record, depth + 1)
        return self._sizes.put(digest, total)

    async def platforms(self, repo: Repo, digest: str, record: ManifestRecord) -> tuple[str, ...]:
        cached = self._platforms.get(digest)
        if cached is not None:
            return cached
        found: tuple[str, ...] = ()
        try:
            if record.media_type in INDEX_TYPES:
                doc = json.loads(await self.registry.manifest_body(digest))
                entries = doc.get("manifests") if isinstance(doc, dict) else None
                names = [platform_of(e.get("platform")) for e in entries or [] if isinstance(e, dict)]
                found = tuple(dict.fromkeys(n for n in names if n))
            elif record.media_type in IMAGE_TYPES and record.artifact_type in IMAGE_CONFIGS and record.blobs:
                config = await self._config(record.blobs[0])
                found = (platform_of(config),) if platform_of(config) else ()
        except (OSError, ValueError) as e:
            log.debug("cannot read a platform", extra={"digest": digest, "error": str(e)})
            return ()  # not cached: the content may be readable next time
        return self._platforms.put(digest, found)

    async def _config(self, digest: str) -> dict[str, Any] | None:
        body = await self.registry.small_blob(digest, MAX_CONFIG_BYTES)
        doc = json.loads(body) if body is not None else None
        return doc if isinstance(doc, dict) else None

    # -- one image ---------------------------------------------------------------

    async def image(self, name: str, digest: str) -> ImageDetail:
        """A manifest with what people want to know about it: its JSON, config, layers, children, referrers."""
        check_digest(digest)
        repo = await self._repo(name)
        record = repo.manifests.get(digest)
        if record is None:
            raise ManifestUnknown(f"manifest {digest} not found in {name}", {"name": name, "reference": digest})
        body = await self.registry.manifest_body(digest)
        doc = json.loads(body)
        detail = ImageDetail(
            repo=name, digest=digest, record=record,
            tags=sorted(t for t, d in repo.tags.items() if d == digest),
            manifest_json=json.dumps(doc, indent=2, ensure_ascii=False), manifest=doc,
            size=self.size(repo, digest, record), platforms=await self.platforms(repo, digest, record))
        if record.media_type in IMAGE_TYPES:
            config = doc.get("config")
            detail.config_descriptor = config if isinstance(config, dict) else None
            if record.artifact_type in IMAGE_CONFIGS and record.blobs:
                try:
                    detail.config = await self._config(record.blobs[0])
                except (OSError, ValueError) as e:
                    log.debug("cannot read an image config", extra={"digest": digest, "error": str(e)})
            detail.layers = [layer for layer in doc.get("layers") or [] if isinstance(layer, dict)]
        elif record.media_type in INDEX_TYPES:
            for entry in doc.get("manifests") or []:
                if not isinstance(entry, dict) or not isinstance(entry.get("digest"), str):
                    continue
                child = repo.manifests.get(entry["digest"])
                detail.children.append(Child(
                    digest=entry["digest"], media_type=str(entry.get("mediaType", "")),
                    size=self.size(repo, entry["digest"], child) if child else int(entry.get("size") or 0),
                    platform=platform_of(entry.get("platform")),
                    artifact_type=entry.get("artifactType") if isinstance(entry.get("artifactType"), str)
                    else None, present=child is not None))
        detail.referrers = await self.registry.referrers(name, digest, None)
        return detail


_REPO_KEYS: dict[str, Callable[[RepoSummary], Any]] = {
    "pushed": lambda s: s.pushed or 0.0,
    "size": lambda s: s.size,
    "tags": lambda s: s.tags,
}
