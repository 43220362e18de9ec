"""Docker's token authentication, client side, as an httpx.Auth.

It does what `docker` and containers/image do: send the request; on a 401
with a `Bearer` challenge, GET the challenge's realm with its service and
scope (and Basic credentials, unless anonymous), then retry once with the
token. Tokens are cached per scope, and the scope a request will need is
worked out from its method and path the way the registry words its
challenges, so later requests go out with the right token at once. A request
whose body cannot be sent twice (a generator) gets its token before it goes
(after a `GET /v2/` to learn the realm, if no challenge has named it yet).
"""

from __future__ import annotations

import base64
import re
import threading
from collections.abc import Generator
from urllib.parse import unquote

import httpx

_PARAM = re.compile(r'(\w+)="([^"]*)"')
_REPO_PATH = re.compile(r"^/v2/(.+?)/(?:manifests|blobs|tags|referrers)/")


def parse_challenge(header: str) -> dict[str, str] | None:
    """The parameters of a `Bearer` challenge, or None for any other scheme."""
    scheme, _, rest = header.partition(" ")
    if scheme.lower() != "bearer":
        return None
    return dict(_PARAM.findall(rest))


def scopes_for(method: str, path: str, params: httpx.QueryParams) -> tuple[str, ...]:
    """The scopes a request needs, worded as the registry's challenge words them."""
    if path == "/v2/_catalog":
        return ("registry:catalog:*",)
    m = _REPO_PATH.match(path)
    if m is None:
        return ()
    name = unquote(m.group(1))
    if method in ("GET", "HEAD") and "/blobs/uploads/" not in path:
        return (f"repository:{name}:pull",)
    if method == "DELETE" and "/blobs/uploads/" not in path:
        return (f"repository:{name}:delete",)
    scopes = (f"repository:{name}:pull,push",)
    if params.get("mount") and params.get("from"):
        scopes += (f"repository:{params['from']}:pull",)
    return scopes


class BearerAuth(httpx.Auth):
    """Bearer tokens fetched with Basic credentials (or anonymously when `username` is None)."""

    def __init__(self, username: str | None = None, password: str | None = None):
        self.basic = None
        if username is not None:
            raw = f"{username}:{password or ''}".encode()
            self.basic = "Basic " + base64.b64encode(raw).decode()
        self.tokens: dict[tuple[str, ...], str] = {}
        self.realm: tuple[str, str] | None = None  # (realm URL, service) from the first challenge
        self.fetches = 0                            # token requests made, for tests of the cache
        self._lock = threading.Lock()

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        scopes = scopes_for(request.method, request.url.path, request.url.params)
        with self._lock:
            token = self.tokens.get(scopes)
        replayable = isinstance(request.stream, httpx.ByteStream)
        if token is None and not replayable and scopes:
            if self.realm is None:
                # As docker starts: `GET /v2/` answers with the challenge naming the realm.
                ping = yield httpx.Request("GET", request.url.copy_with(path="/v2/", query=None))
                challenge = parse_challenge(ping.headers.get("WWW-Authenticate", ""))
                if challenge is not None and "realm" in challenge:
                    self.realm = (challenge["realm"], challenge.get("service", ""))
            if self.realm is not None:
                token = yield from self._fetch(*self.realm, scopes)
        if token is not None:
            request.headers["Authorization"] = f"Bearer {token}"
        response = yield request
        if response.status_code != 401 or not replayable:
            return
        challenge = parse_challenge(response.headers.get("WWW-Authenticate", ""))
        if challenge is None or "realm" not in challenge:
            return
        self.realm = (challenge["realm"], challenge.get("service", ""))
        wanted = tuple(dict.fromkeys(((challenge["scope"],) if "scope" in challenge else ()) + scopes))
        token = yield from self._fetch(challenge["realm"], challenge.get("service", ""), wanted)
        if token is None:
            request.headers.pop("Authorization", None)  # the registry's own answer, once more
        else:
            request.headers["Authorization"] = f"Bearer {token}"
            with self._lock:
                self.tokens[scopes] = token
        yield request

    def _fetch(self, realm: str, service: str, scopes: tuple[str, ...]
               ) -> Generator[httpx.Request, httpx.Response, str | None]:
        params = [("service", service)] + [("scope", s) for s in scopes]
        headers = {"Authorization": self.basic} if self.basic else {}
        response = yield httpx.Request("GET", realm, params=params, headers=headers)
        response.read()
        self.fetches += 1
        if response.status_code != 200:
            return None
        token = response.json()["token"]
        with self._lock:
            self.tokens[scopes] = token
        return token


def fetch_token(client: httpx.Client, scopes: list[str] | tuple[str, ...] = (),
                username: str | None = None, password: str | None = None) -> httpx.Response:
    """One GET of the token endpoint, for tests that handle tokens themselves."""
    params = [("service", "moorage")] + [("scope", s) for s in scopes]
    auth = (username, password or "") if username is not None else None
    return client.get("/token", params=params, auth=auth)
