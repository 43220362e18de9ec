"""From HTTP requests to audit events: the one place that knows which parts of a request to keep.

Callers stay one line: `audit.v2(request, response)`,
`audit.denied(request, status, reason)`, `audit.login_failed(request, name, reason)`.
Nothing here blocks: events go to the AuditLog's in-memory queue.
Query strings are never logged whole (upload URLs carry state tokens).
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Mapping
from datetime import datetime, timezone

import msgspec
from aiohttp import web

from moorage.api.auth import parse_basic
from moorage.registry.audit import (CHALLENGED, KINDS, MAX_DETAIL, MAX_LIMIT, MAX_PATH, AuditEvent, AuditLog, AuditQuery,
                                    bounded)

USER_KEY = "moorage.user"  # set by authentication: the user's name, None for anonymous
# The user name a refused login claimed to be (set by the token endpoint).
CLAIMED_KEY = "moorage.claimed"

# The repository part of a distribution API path (names hold slashes, so anchored at the right).
_REPO = re.compile(r"^/v2/(.+)/(?:manifests/[^/]+|tags/list|referrers/[^/]+"
                   r"|blobs/uploads/?[^/]*|blobs/[^/]+)$")


def repo_of(path: str) -> str | None:
    m = _REPO.match(path)
    return bounded(m.group(1)) if m else None


def claimed_name(request: web.BaseRequest) -> str | None:
    """The user name in a Basic Authorization header, unverified (the password is never read here)."""
    header = request.headers.get("Authorization", "")
    parsed = parse_basic(header[6:]) if header.startswith("Basic ") else None
    return bounded(parsed[0]) if parsed else None


class RequestAudit:
    def __init__(self, log: AuditLog):
        self.log = log

    async def query(self, params: Mapping[str, str]) -> dict:
        """`GET /_admin/audit`: the cluster's events, newest first. Raises ValueError on a bad parameter."""
        q = parse_query(params)
        found = await self.log.query(q)
        return {"events": found.events, "count": len(found.events), "truncated": found.more,
                "challenged": found.challenged, "dropped_here": self.log.dropped}

    def event(self, request: web.BaseRequest, kind: str, status: int, *, repo: str | None = None,
              detail: str | None = None, claimed: str | None = None) -> AuditEvent:
        path = request.rel_url.raw_path
        user = request.get(USER_KEY)
        headers = request.headers
        return AuditEvent(
            time=time.time(), replica=self.log.replica, kind=kind, method=bounded(request.method, 16),
            path=bounded(path, MAX_PATH), status=status, user=user,
            claimed=None if user is not None else (claimed or claimed_name(request)),
            remote=request.remote, via=_via(request), forwarded=bounded(headers.get("X-Forwarded-For")),
            agent=bounded(headers.get("User-Agent")),
            repo=repo if repo is not None else repo_of(path), detail=bounded(detail, MAX_DETAIL))

    def record(self, request: web.BaseRequest, kind: str, status: int, **kw) -> None:
        self.log.record(self.event(request, kind, status, **kw))

    def v2(self, request: web.BaseRequest, response: web.StreamResponse, detail: str | None = None) -> None:
        """A distribution API request worth keeping: a write (whatever its outcome), or a refusal."""
        if response.status in (401, 403):
            return self.denied(request, response.status, error_reason(response))
        if detail is None:
            detail = response.headers.get("Docker-Content-Digest") or _digest_param(request)
            if response.status >= 400:
                detail = error_reason(response) or detail
        self.record(request, "write", response.status, detail=detail)

    def denied(self, request: web.BaseRequest, status: int, reason: str | None = None, *,
               repo: str | None = None) -> None:
        """A request refused for want of credentials (401) or permission (403).

        Every client sends its first request to a repository without a token
        and fetches one from the 401's challenge; such a refusal cannot be
        told from an anonymous probe when it happens, so it is kept, as its
        own kind (`challenged`), which queries leave out unless asked for:
        the `denied` ones are the refusals of credentials that were sent.
        """
        if "Authorization" not in request.headers and status == 401:
            self.record(request, CHALLENGED, status, detail=reason, repo=repo)
            return
        self.record(request, "denied", status, detail=reason, repo=repo)

    def login_failed(self, request: web.BaseRequest, name: str | None, reason: str,
                     status: int = 401) -> None:
        """Credentials refused at the token endpoint; `name` is the user they claimed to be."""
        self.record(request, "login-failed", status, detail=reason, claimed=bounded(name))

    def admin(self, request: web.BaseRequest, response: web.StreamResponse) -> None:
        """A call of the admin API that changes something, or one refused for credentials."""
        if response.status in (401, 403):
            return self.denied(request, response.status, error_reason(response))
        detail = error_reason(response) if response.status >= 400 else None
        self.record(request, "admin", response.status, detail=detail)


def _via(request: web.BaseRequest) -> str | None:
    """The load balancer's address, when it named the client in a PROXY protocol header."""
    peer = request.transport.get_extra_info("peername") if request.transport is not None else None
    if isinstance(peer, tuple) and peer and str(peer[0]) != request.remote:
        return str(peer[0])
    return None


def _digest_param(request: web.BaseRequest) -> str | None:
    return bounded(request.rel_url.query.get("digest"), 200)


def error_reason(response: web.StreamResponse) -> str | None:
    """The error message of a JSON error body we built ourselves (OAuth2, admin or OCI shape)."""
    body = getattr(response, "body", None)
    if not isinstance(body, (bytes, bytearray)) or len(body) > 8192:
        return None
    try:
        data = msgspec.json.decode(body)
    except msgspec.DecodeError:
        return None
    if isinstance(data, dict):
        if isinstance(data.get("error_description"), str):  # OAuth2's sentence; "error" is its code
            return data["error_description"]
        if isinstance(data.get("error"), str):
            return data["error"]
        errors = data.get("errors")
        if isinstance(errors, list) and errors and isinstance(errors[0], dict):
            e = errors[0]
            return f"{e.get('code', '')}: {e.get('message', '')}".strip(": ")
    return None


def parse_time(value: str, name: str) -> float:
    """Epoch seconds, or an ISO 8601 time (UTC unless it says otherwise)."""
    try:
        ts = float(value)
    except ValueError:
        try:
            dt = datetime.fromisoformat(value)
        except ValueError:
            raise ValueError(f"{name} takes epoch seconds or an ISO 8601 time, not {value[:40]!r}") from None
        if dt.tzinfo is None:
            dt = dt.replace(tzinfo=timezone.utc)
        ts = dt.timestamp()
    if not math.isfinite(ts):
        raise ValueError(f"{name} must be a finite time")
    return ts


def parse_query(params: Mapping[str, str]) -> AuditQuery:
    unknown = set(params) - {"since", "until", "user", "repo", "kind", "limit"}
    if unknown:
        raise ValueError(f"unknown parameter {sorted(unknown)[0][:40]!r}; "
                         "known: since, until, user, repo, kind, limit")
    kind = params.get("kind") or None
    if kind is not None and kind not in KINDS:
        raise ValueError(f"kind must be one of {', '.join(KINDS)}")
    limit = params.get("limit") or "100"
    if not (limit.isascii() and limit.isdigit() and len(limit) <= 6 and 1 <= int(limit) <= MAX_LIMIT):
        raise ValueError(f"limit must be an integer from 1 to {MAX_LIMIT}")
    since = parse_time(params["since"], "since") if params.get("since") else None
    until = parse_time(params["until"], "until") if params.get("until") else None
    return AuditQuery(since=since, until=until, user=params.get("user") or None,
                      repo=params.get("repo") or None, kind=kind, limit=int(limit))
