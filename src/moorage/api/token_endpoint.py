"""The token endpoint: `GET /token` (Docker's token protocol) and `POST /token` (its OAuth2 form).

What a token grants, for each repository asked for, is every action the
caller may do there (the request itself is checked against the permission
at that moment too, auth.py); asking for more is not an error (Docker's
spec: the token server grants what it can, possibly nothing). Scopes are parsed leniently: a
malformed scope, a type we do not serve or an invalid name is ignored rather
than failing the whole request, since clients send what their user typed.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from urllib.parse import parse_qs

import msgspec
from aiohttp import web

from moorage.api.audit import CLAIMED_KEY, RequestAudit, error_reason
from moorage.api.auth import Auth, Denied, oauth_error, parse_basic, password_version
from moorage.api.bodies import read_bounded
from moorage.registry.errors import NameInvalid, TooLarge
from moorage.registry.names import check_name
from moorage.registry.tokens import CATALOG, REPO_ACTIONS, Scope, TokenError, Tokens

MAX_FORM = 16 << 10
MAX_SCOPES = 64
# "repository", "repository(plugin)": the class in parentheses is Docker's, and changes nothing here.
_TYPE = re.compile(r"^([a-z0-9]+)(?:\([a-z0-9_-]*\))?$")


class BadRequest(ValueError):
    pass


def parse_scopes(values: Iterable[str]) -> list[Scope]:
    """Docker scopes (`type:name:action,action`), merged per resource, junk ignored."""
    merged: dict[tuple[str, str], set[str]] = {}
    for value in values:
        for text in value.split():
            head, sep, actions = text.rpartition(":")
            kind, sep2, name = head.partition(":")
            m = _TYPE.match(kind)
            if not sep or not sep2 or m is None:
                continue
            wanted = set(actions.split(","))
            if m.group(1) == "repository":
                try:
                    check_name(name)
                except NameInvalid:
                    continue
                key, granted = ("repository", name), (REPO_ACTIONS if "*" in wanted else wanted & REPO_ACTIONS)
            elif (m.group(1), name) == CATALOG:
                key, granted = CATALOG, wanted & {"*"}
            else:
                continue
            merged.setdefault(key, set()).update(granted)
            if len(merged) > MAX_SCOPES:
                raise BadRequest(f"at most {MAX_SCOPES} scopes per token")
    return [Scope(kind, name, frozenset(actions)) for (kind, name), actions in merged.items()]


class TokenEndpoint:
    def __init__(self, auth: Auth, tokens: Tokens, audit: RequestAudit | None = None):
        self.auth = auth
        self.tokens = tokens
        self.access = auth.access
        self.audit = audit

    async def __call__(self, request: web.BaseRequest) -> web.Response:
        try:
            if request.method == "GET":
                return await self._get(request)
            if request.method == "POST":
                return await self._post(request)
            return oauth_error(405, "UNSUPPORTED", "invalid_request", "the token endpoint takes GET or POST",
                               {"Allow": "GET, POST"})
        except Denied as e:
            e.response.headers["Cache-Control"] = "no-store"
            if self.audit is not None and e.response.status in (401, 429):
                self.audit.login_failed(request, request.get(CLAIMED_KEY), error_reason(e.response),
                                        e.response.status)
            return e.response
        except BadRequest as e:
            return oauth_error(400, "UNSUPPORTED", "invalid_request", str(e))

    async def _get(self, request: web.BaseRequest) -> web.Response:
        """Docker's token protocol: Basic credentials (or none, for an anonymous token)."""
        query = request.query
        self._check_service(query.get("service") or None)
        scopes = parse_scopes(query.getall("scope", ()))
        user = None
        header = request.headers.get("Authorization")
        if header:
            scheme, _, value = header.partition(" ")
            if scheme.lower() != "basic":
                raise Denied(self._bad_login("the token endpoint takes Basic credentials, or none"))
            parsed = parse_basic(value)
            request[CLAIMED_KEY] = parsed[0] if parsed else None
            if parsed is None or await self.auth.login(request, *parsed) is None:
                raise Denied(self._bad_login("incorrect username or password"))
            user = parsed[0]
        offline = user is not None and query.get("offline_token", "").lower() in ("true", "1")
        return self._answer(user, scopes, offline, oauth=False)

    async def _post(self, request: web.BaseRequest) -> web.Response:
        """The OAuth2 form: grant_type=password or grant_type=refresh_token."""
        if request.content_type != "application/x-www-form-urlencoded":
            raise BadRequest("POST /token takes an application/x-www-form-urlencoded form")
        try:
            raw = await read_bounded(request, MAX_FORM)
            form = parse_qs(raw.decode(), keep_blank_values=True, max_num_fields=200)
        except (TooLarge, UnicodeDecodeError, ValueError):
            raise BadRequest(f"the form must be UTF-8 and at most {MAX_FORM} bytes") from None

        def field(name: str) -> str:
            return form.get(name, [""])[0]

        self._check_service(field("service") or None)
        scopes = parse_scopes(form.get("scope", ()))
        grant = field("grant_type")
        if grant == "password":
            name, password = field("username"), field("password")
            request[CLAIMED_KEY] = name
            if not name:
                raise BadRequest("grant_type=password needs username and password")
            if await self.auth.login(request, name, password) is None:
                raise Denied(self._bad_login("incorrect username or password", "invalid_grant"))
            user = name
        elif grant == "refresh_token":
            user = self._refreshed(field("refresh_token"))
        else:
            return oauth_error(400, "UNSUPPORTED", "unsupported_grant_type",
                               "grant_type must be password or refresh_token")
        return self._answer(user, scopes, field("access_type") == "offline", oauth=True)

    def _refreshed(self, token: str) -> str:
        if not token:
            raise BadRequest("grant_type=refresh_token needs refresh_token")
        try:
            user, version = self.tokens.verify_refresh(token)
        except TokenError as e:
            raise Denied(oauth_error(401, "UNAUTHORIZED", "invalid_grant", str(e))) from None
        record = self.access.user(user)
        if record is None or password_version(record) != version:
            raise Denied(oauth_error(401, "UNAUTHORIZED", "invalid_grant",
                                     "the refresh token was revoked (user removed or password changed)"))
        return user

    def _answer(self, user: str | None, scopes: list[Scope], offline: bool, oauth: bool) -> web.Response:
        granted = [Scope(s.type, s.name, self._granted(user, s)) for s in scopes]
        granted = [s for s in granted if s.actions]
        issued = self.tokens.issue(user, granted)
        body: dict = {"token": issued.token, "access_token": issued.token,
                      "expires_in": issued.expires_in, "issued_at": issued.issued_at}
        if oauth:
            body["scope"] = " ".join(str(s) for s in granted)
        if offline and user is not None:
            record = self.access.user(user)
            if record is not None:
                body["refresh_token"] = self.tokens.issue_refresh(user, password_version(record))
        return web.Response(body=msgspec.json.encode(body), content_type="application/json",
                            headers={"Cache-Control": "no-store", "Pragma": "no-cache"})

    def _granted(self, user: str | None, scope: Scope) -> frozenset[str] | set[str]:
        """What a token carries for a scope asked: for a repository, every action the caller may do
        there, whichever were asked; for the catalog, listing (its answer is filtered by caller).

        A token is only half of a check: every request also needs the permission at that moment
        (auth.py), so a token that carries what its user may do anyway grants nothing new. It
        spares clients that answer a pull's challenge and then push with the same token (oras-py
        asks for a new one only after a 403) a push that fails on insufficient_scope.
        """
        if scope.type == "repository":
            return self.access.actions(user, scope.name)
        # Anyone may list repositories: the list holds what the caller may pull (public ones, anonymously).
        return scope.actions & {"*"}

    def _check_service(self, service: str | None) -> None:
        if service is not None and service != self.auth.service:
            raise BadRequest(f"this token endpoint serves {self.auth.service!r}, not {service[:64]!r}")

    @staticmethod
    def _bad_login(message: str, oauth: str = "invalid_client") -> web.Response:
        return oauth_error(401, "UNAUTHORIZED", oauth, message, {"WWW-Authenticate": 'Basic realm="moorage"'})
