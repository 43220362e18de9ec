"""The repository pages: the list, one repository's tags, one image; deleting and visibility.

What a user sees and may do is decided by `Auth.authorize_catalog` and
`Auth.may`, the calls the distribution API makes for the same user: a
repository missing from `/v2/_catalog` for them is missing here too, and a
button shown here is one whose request the server would carry out (and
refuses anyway when pressed without the right).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from yarl import URL

from moorage.api.audit import error_reason
from moorage.api.console.app import PREFIX, Ctx, Refused, admin_error, console_path
from moorage.api.errors import from_error
from moorage.api.routes import ADMIN, USER, Route, route
from moorage import digest as digests
from moorage.registry.browse import REPO_SORTS, TAG_SORTS
from moorage.registry.errors import NameInvalid, RegistryError
from moorage.registry.names import check_name, is_valid_tag

PER_PAGE = (25, 50, 100)
_HOST = re.compile(r"^[A-Za-z0-9.\-]+(?::\d{1,5})?$|^\[[0-9A-Fa-f:.]+\](?::\d{1,5})?$")
# Well-known artifact types of referrers, grouped the way people look for them.
REFERRER_KINDS: dict[str, str] = {
    "application/vnd.dev.cosign.artifact.sig.v1+json": "Signatures",
    "application/vnd.dev.cosign.simplesigning.v1+json": "Signatures",
    "application/vnd.cncf.notary.signature": "Signatures",
    "application/spdx+json": "SBOMs",
    "text/spdx": "SBOMs",
    "application/vnd.cyclonedx+json": "SBOMs",
    "application/vnd.cyclonedx+xml": "SBOMs",
    "application/vnd.syft+json": "SBOMs",
    "application/vnd.in-toto+json": "Attestations",
    "application/vnd.dsse.envelope.v1+json": "Attestations",
    "application/vnd.dev.sigstore.bundle.v0.3+json": "Attestations",
    "application/vnd.dev.sigstore.bundle+json;version=0.3": "Attestations",
}


@dataclass(frozen=True, slots=True)
class Paging:
    page: int
    per: int
    total: int
    prev_url: str | None
    next_url: str | None

    @property
    def pages(self) -> int:
        return max(1, math.ceil(self.total / self.per))

    @property
    def first(self) -> int:
        return min(self.total, (self.page - 1) * self.per + 1)

    @property
    def last(self) -> int:
        return min(self.total, self.page * self.per)


def paging_args(ctx: Ctx) -> tuple[int, int]:
    per = _int(ctx.query("per"), 50)
    per = per if per in PER_PAGE else 50
    return max(1, min(_int(ctx.query("page"), 1), 1_000_000)), per


def paging(ctx: Ctx, page: int, per: int, total: int) -> Paging:
    url = ctx.request.rel_url
    last = max(1, math.ceil(total / per))
    return Paging(page, per, total,
                  str(url.update_query(page=page - 1)) if page > 1 else None,
                  str(url.update_query(page=page + 1)) if page < last else None)


def sort_args(ctx: Ctx, allowed: tuple[str, ...], default: str = "name") -> tuple[str, bool]:
    sort = ctx.query("sort", default)
    sort = sort if sort in allowed else default
    default_order = "asc" if sort == "name" else "desc"
    return sort, ctx.query("order", default_order) == "desc"


def sort_links(ctx: Ctx, allowed: tuple[str, ...], sort: str, descending: bool) -> dict[str, dict[str, str]]:
    """For each sortable column: the link that sorts by it (reversing when it already does), and aria-sort."""
    url = ctx.request.rel_url
    out = {}
    for key in allowed:
        if key == sort:
            order = "asc" if descending else "desc"
            state = "descending" if descending else "ascending"
        else:
            order, state = ("asc" if key == "name" else "desc"), "none"
        out[key] = {"url": str(url.update_query(sort=key, order=order, page=1)), "aria": state}
    return out


def _int(value: str, default: int) -> int:
    return int(value) if value.isascii() and value.isdigit() and len(value) < 10 else default


def registry_host(ctx: Ctx) -> str:
    """The host the browser reached, as clients name it in image references."""
    host = ctx.request.headers.get("Host", "")
    return host if _HOST.match(host) else "REGISTRY"


def repo_url(name: str) -> str:
    return f"{PREFIX}/r/{name}"


def image_url(name: str, digest: str) -> str:
    return f"{PREFIX}/r/{name}/-/manifest/{digest}"


def pull_commands(host: str, name: str, tag: str | None, digest: str | None = None) -> list[tuple[str, str]]:
    """docker, podman and skopeo commands that pull the image (by tag when there is one)."""
    reference = f"{host}/{name}:{tag}" if tag else f"{host}/{name}@{digest}"
    local = name.rsplit("/", 1)[-1]
    return [("docker", f"docker pull {reference}"),
            ("podman", f"podman pull {reference}"),
            ("skopeo", f"skopeo copy docker://{reference} oci:{local}:{tag or 'latest'}")]


def _check_repo(ctx: Ctx, name: str) -> str:
    try:
        check_name(name)
    except NameInvalid:
        raise Refused(404, "There is no such repository.") from None
    # The API's rule: refusals never depend on whether the repository exists.
    if not ctx.may(name, "pull"):
        raise Refused(403, "You may not pull from this repository, or it does not exist.")
    return name


# -- pages --------------------------------------------------------------------------------

async def repositories(ctx: Ctx) -> web.StreamResponse:
    console = ctx.console
    visible = console.auth.authorize_catalog(ctx.request, ctx.caller)
    query = ctx.query("q", limit=255).strip()
    sort, descending = sort_args(ctx, REPO_SORTS)
    page, per = paging_args(ctx)
    found = await console.browser.repositories(visible, query, sort, descending, (page - 1) * per, per)
    rows = [{"summary": s, "url": repo_url(s.name), "public": console.access.is_public(s.name)}
            for s in found.items]
    return ctx.page("repositories.html", title="Repositories", section="repos", rows=rows, query=query,
                    sort=sort, sorts=sort_links(ctx, REPO_SORTS, sort, descending),
                    paging=paging(ctx, page, per, found.total), per_page=PER_PAGE, per=per)


async def repository(ctx: Ctx, name: str) -> web.StreamResponse:
    console = ctx.console
    _check_repo(ctx, name)
    view = "untagged" if ctx.query("view") == "untagged" else "tags"
    query = ctx.query("q", limit=128).strip()
    sort, descending = sort_args(ctx, TAG_SORTS)
    page, per = paging_args(ctx)
    if view == "tags":
        found = await console.browser.tags(name, query, sort, descending, (page - 1) * per, per)
    else:
        found = await console.browser.manifests(name, True, (page - 1) * per, per)
    summary = console.browser.summary(name)
    host = registry_host(ctx)
    rows = [{"row": r, "url": image_url(name, r.digest),
             "pull": pull_commands(host, name, r.tag, r.digest)} for r in found.items]
    return ctx.page("repository.html", title=name, section="repos", name=name, summary=summary, rows=rows,
                    view=view, query=query, sort=sort, sorts=sort_links(ctx, TAG_SORTS, sort, descending),
                    paging=paging(ctx, page, per, found.total), per_page=PER_PAGE, per=per,
                    public=console.access.is_public(name), can_delete=ctx.may(name, "delete"),
                    untagged_url=str(URL(repo_url(name)).with_query(view="untagged")),
                    tags_url=repo_url(name), host=host)


async def image(ctx: Ctx, name: str, digest: str) -> web.StreamResponse:
    console = ctx.console
    _check_repo(ctx, name)
    if not digests.is_digest(digest):
        raise Refused(404, "That is not a digest.")
    detail = await console.browser.image(name, digest)
    groups: dict[tuple[str, str], list[Any]] = {}
    for r in detail.referrers:
        kind = REFERRER_KINDS.get(r.artifact_type or "", "Other artifacts")
        groups.setdefault((kind, r.artifact_type or "(none)"), []).append(r)
    referrers = [{"kind": kind, "artifact_type": artifact_type, "entries": items}
                 for (kind, artifact_type), items in sorted(groups.items())]
    host = registry_host(ctx)
    subject = detail.record.subject
    return ctx.page(
        "image.html", title=f"{name}@{digest[:19]}", section="repos", name=name, d=detail,
        referrers=referrers, repo_url=repo_url(name), image_url=lambda d: image_url(name, d),
        pull=pull_commands(host, name, detail.tags[0] if detail.tags else None, digest),
        subject_url=image_url(name, subject) if subject else None, config=_config_view(detail.config),
        can_delete=ctx.may(name, "delete"), host=host)


def _config_view(config: dict[str, Any] | None) -> dict[str, Any] | None:
    """The parts of an image configuration people read, each a string or list of strings."""
    if config is None:
        return None
    inner = config.get("config") if isinstance(config.get("config"), dict) else {}

    def strings(value: Any) -> list[str]:
        return [str(v) for v in value] if isinstance(value, list) else []

    labels = inner.get("Labels") if isinstance(inner.get("Labels"), dict) else {}
    history = [h for h in config.get("history") or [] if isinstance(h, dict)] \
        if isinstance(config.get("history"), list) else []
    return {
        "created": str(config.get("created") or ""),
        "platform": "/".join(str(config[k]) for k in ("os", "architecture", "variant") if config.get(k)),
        "entrypoint": strings(inner.get("Entrypoint")), "cmd": strings(inner.get("Cmd")),
        "env": strings(inner.get("Env")), "workdir": str(inner.get("WorkingDir") or ""),
        "user": str(inner.get("User") or ""),
        "ports": sorted(str(p) for p in inner.get("ExposedPorts") or {}) if isinstance(
            inner.get("ExposedPorts"), dict) else [],
        "labels": sorted((str(k), str(v)) for k, v in labels.items()),
        "history": [{"created": str(h.get("created") or ""), "created_by": str(h.get("created_by") or ""),
                     "empty": bool(h.get("empty_layer")), "comment": str(h.get("comment") or "")}
                    for h in history],
    }


# -- changes ------------------------------------------------------------------------------

async def delete(ctx: Ctx, name: str) -> web.StreamResponse:
    """Delete a tag (`tag`) or a manifest with its tags (`digest`), as DELETE /v2/NAME/manifests/REF does."""
    _check_repo(ctx, name)
    tag, digest = ctx.form.get("tag", ""), ctx.form.get("digest", "")
    reference = tag or digest
    if not (tag and is_valid_tag(tag)) and not (digest and digests.is_digest(digest)):
        raise Refused(400, "Name a tag or a manifest digest to delete.")
    back = console_path(ctx.form.get("back", ""), repo_url(name))
    sub = ctx.request.clone(method="DELETE", rel_url=URL.build(path=f"/v2/{name}/manifests/{reference}"))
    if not ctx.may(name, "delete"):
        if ctx.console.audit is not None:
            ctx.console.audit.denied(sub, 403, "the user may not delete in this repository (console)")
        raise Refused(403, "You may not delete in this repository.")
    refused = ctx.console.refuse_writes()
    if refused is not None:
        _audit_v2(ctx, sub, refused)
        raise Refused(refused.status, error_reason(refused) or "writes are refused now")
    try:
        await ctx.console.repositories.delete_manifest(name, reference)
    except RegistryError as e:
        _audit_v2(ctx, sub, from_error(e))
        raise
    _audit_v2(ctx, sub, web.Response(status=202))
    what = f"tag {tag}" if tag else f"manifest {digest[:19]}… and its tags"
    return ctx.redirect(back if tag else repo_url(name), f"Deleted {what} from {name}.")


def _audit_v2(ctx: Ctx, sub: web.BaseRequest, response: web.StreamResponse) -> None:
    """As the distribution API audits the same DELETE."""
    if ctx.console.audit is not None:
        ctx.console.audit.v2(sub, response)


async def visibility(ctx: Ctx, name: str) -> web.StreamResponse:
    _check_repo(ctx, name)
    status, answer = await ctx.admin_call("PUT", "/_admin/visibility",
                                          {"repo": name, "visibility": ctx.form.get("visibility", "")})
    if status >= 400:
        raise Refused(status, admin_error(answer))
    return ctx.redirect(repo_url(name), f"{name} is now {answer.get('visibility', 'changed')}.")


def routes() -> list[Route]:
    return [
        route("GET", r"^/console/$", repositories, USER),
        route("GET", r"^/console/r/(.+)/-/manifest/([^/]+)$", image, USER),
        route("POST", r"^/console/r/(.+)/-/delete$", delete, USER),
        route("POST", r"^/console/r/(.+)/-/visibility$", visibility, ADMIN),
        route("GET", r"^/console/r/(.+)$", repository, USER),
    ]

