"""Credentials the way real clients send them: a Bearer token per repository, fetched once.

docker and containerd answer a 401 by asking the token endpoint, with the
user's basic credentials, for a token scoped to the repository, and then reuse
that token until it expires. The bench does the same, except that it fetches
ahead of time (outside the timed part) instead of after a 401: a registry
must not be charged for the password hash of a login in a throughput figure.

Distribution runs without authentication (its token auth needs an external
token server), so its requests carry nothing.
"""

from __future__ import annotations

import base64
import json
import re
import time
from dataclasses import dataclass, field
from typing import Callable
from urllib.parse import urlencode

REFRESH_MARGIN = 90.0  # seconds: a token is refetched once it has less left than this
# Greedy: in /v2/bench/tags/blobs/uploads/ the repository is bench/tags, not bench.
_REPO = re.compile(r"^/v2/(.+)/(?:manifests|blobs|tags|referrers)/")

# (method, target, headers) -> (status, body); load.py's request, given by the caller (no import cycle)
Fetch = Callable[[str, str, dict[str, str]], tuple[int, bytes]]


def repository_of(target: str) -> str | None:
    """The repository a /v2/ request target is about, if any."""
    m = _REPO.match(target)
    return m.group(1) if m else None


@dataclass
class Credentials:
    """A user's basic credentials and the Bearer tokens fetched with them, per repository."""

    username: str
    password: str
    tokens: dict[str, tuple[str, float]] = field(default_factory=dict)  # repo -> (token, expires at)

    def basic(self) -> str:
        return "Basic " + base64.b64encode(f"{self.username}:{self.password}".encode()).decode()

    def headers(self, repo: str | None, fetch: Fetch) -> dict[str, str]:
        """The Authorization header for a request about `repo` (None: not about a repository)."""
        if repo is None:
            return {"Authorization": self.basic()}
        token, expires = self.tokens.get(repo, ("", 0.0))
        if time.monotonic() > expires - REFRESH_MARGIN:
            token, expires = self._fetch(repo, fetch)
            self.tokens[repo] = token, expires
        return {"Authorization": f"Bearer {token}"}

    def _fetch(self, repo: str, fetch: Fetch) -> tuple[str, float]:
        query = urlencode({"service": "moorage", "scope": f"repository:{repo}:pull,push"})
        started = time.monotonic()
        status, body = fetch("GET", f"/token?{query}", {"Authorization": self.basic()})
        if status != 200:
            raise RuntimeError(f"token for {repo}: HTTP {status} {body[:200]!r}")
        answer = json.loads(body)
        token = answer.get("token") or answer.get("access_token")
        if not token:
            raise RuntimeError(f"token for {repo}: no token in {body[:200]!r}")
        # Docker's spec: a token without expires_in lasts 60 seconds.
        return token, started + float(answer.get("expires_in") or 60)
