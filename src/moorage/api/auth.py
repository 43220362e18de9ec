"""Who is asking, and may they: authentication and authorization of every request.

Credentials come three ways: a bearer token from the token endpoint
(verified locally, cached), HTTP Basic (accepted directly, as some clients
send it; verified with argon2id and then cached briefly), or none
(anonymous). Authorization is always the action a route needs, checked
against what the token grants AND what the user may do *now*
(`Access.actions`), so deleting a user or revoking a grant takes effect on
the next request, not when the token expires.

Refusals never depend on whether a repository exists: the decision reads
only credentials and permissions, so a stranger cannot probe for names.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import re
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import msgspec
from aiohttp import web
from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

from moorage.api.errors import error_response
from moorage.api.throttle import LoginThrottle, RemoteThrottle
from moorage.metrics import Metrics
from moorage.registry.tokens import SERVICE, Claims, TokenError, Tokens
from moorage.meta.records import UserRecord

VERIFIED_TTL_SECONDS = 30.0
VERIFIED_MAX = 1024
MAX_CREDENTIAL = 1024            # longer user:password pairs are refused unread
_HOST = re.compile(r"^[A-Za-z0-9.\-]+(?::\d{1,5})?$|^\[[0-9A-Fa-f:.]+\](?::\d{1,5})?$")
_EMPTY: frozenset[str] = frozenset()


class Access(Protocol):
    """What registry/access.py provides: who exists, and what they may do now."""

    def actions(self, user: str | None, repo: str) -> frozenset[str]: ...

    def user(self, name: str) -> UserRecord | None: ...

    def is_admin(self, name: str) -> bool: ...


class Denied(Exception):
    """A refusal, already shaped as the response the client gets."""

    def __init__(self, response: web.Response, message: str = ""):
        super().__init__(response.status)
        self.response = response
        self.message = message  # for callers that answer in their own format (the admin API)


@dataclass(slots=True)  # not frozen: built on every request, and a frozen init costs more
class Caller:
    user: str | None                 # None: anonymous
    claims: Claims | None            # None: not limited by a token (Basic, or no credentials)
    authenticated: bool              # presented valid credentials (any user, or any valid token)


ANONYMOUS = Caller(None, None, False)


def scope_of(repo: str, action: str) -> str:
    """The scope a challenge asks for: docker's wording, pushes with pull (blob checks need it)."""
    return f"repository:{repo}:{'pull,push' if action == 'push' else action}"


# A challenge's scope: a string, or (repository, action) worded only when a
# challenge is actually sent (the hot path never formats one).
Need = str | tuple[str, str] | None


CATALOG_SCOPE = "registry:catalog:*"


def password_version(record: UserRecord) -> str:
    """Changes whenever the password does: refresh tokens carry it, so a new password revokes them."""
    return hashlib.sha256(record.password_hash.encode()).hexdigest()[:16]


def parse_basic(value: str) -> tuple[str, str] | None:
    if len(value) > MAX_CREDENTIAL * 2:
        return None
    try:
        decoded = base64.b64decode(value.strip(), validate=True).decode()
    except (binascii.Error, UnicodeDecodeError, ValueError):
        return None
    name, sep, password = decoded.partition(":")
    if not sep or not name or len(decoded) > MAX_CREDENTIAL:
        return None
    return name, password


class Auth:
    def __init__(self, access: Access, tokens: Tokens, throttle: LoginThrottle | RemoteThrottle | None = None,
                 service: str = SERVICE, clock: Callable[[], float] = time.monotonic,
                 metrics: Metrics | None = None):
        self.access = access
        self.metrics = metrics
        self.tokens = tokens
        self.throttle = throttle or LoginThrottle()
        self.service = service
        self.clock = clock
        # (name, keyed hash of the password) -> (the user's password hash then, valid until)
        self._verified: OrderedDict[tuple[str, bytes], tuple[str, float]] = OrderedDict()
        self._pepper = secrets.token_bytes(32)  # the cache never holds a plain hash of a password
        self._hasher = PasswordHasher()
        self._dummy_hash: str | None = None

    # -- authentication --------------------------------------------------------

    async def authenticate(self, request: web.BaseRequest, scope: Need = None) -> Caller:
        """The caller; raises Denied (401, or 429 while logins are slowed down) for bad credentials.

        `scope` is what the request needs, named in a 401's challenge so the
        client knows what token to come back with.
        """
        caller = self.quick(request, scope)
        if caller is not None:
            return caller
        scheme, _, value = request.headers["Authorization"].partition(" ")
        if scheme.lower() == "basic":
            return Caller(await self.basic(request, value, scope), None, True)
        raise Denied(self.unauthorized(request, f"unsupported authorization scheme {scheme[:20]!r}", scope))

    def quick(self, request: web.BaseRequest, scope: Need = None) -> Caller | None:
        """The caller without awaiting anything (no credentials, or a bearer token);
        None when it takes the slow way (Basic: a cache, else argon2)."""
        header = request.headers.get("Authorization")
        if not header:
            return ANONYMOUS
        if header[:7].lower() != "bearer ":
            return None
        try:
            claims = self.tokens.verify(header[7:].strip())
        except TokenError as e:
            raise Denied(self.unauthorized(request, str(e), scope, "invalid_token")) from None
        if claims.subject is not None and self.access.user(claims.subject) is None:
            raise Denied(self.unauthorized(request, "the token's user no longer exists", scope, "invalid_token"))
        return Caller(claims.subject, claims, True)

    async def basic(self, request: web.BaseRequest, value: str, scope: Need = None) -> str:
        """The user named by Basic credentials; raises Denied (401 or 429)."""
        parsed = parse_basic(value)
        if parsed is None:
            raise Denied(self.unauthorized(request, "malformed basic credentials", scope))
        user = await self.login(request, *parsed)
        if user is None:
            raise Denied(self.unauthorized(request, "incorrect username or password", scope))
        return user

    async def login(self, request: web.BaseRequest, name: str, password: str) -> str | None:
        """`name` if the password is theirs, else None; raises Denied (429) while slowed down."""
        address = request.remote or ""
        wait = await self.throttle.check(address, name)
        if wait:
            if self.metrics is not None:
                self.metrics.logins_refused.labels("throttled").inc()
            message = f"too many failed logins; try again in {wait} seconds"
            raise Denied(error_response(429, "TOOMANYREQUESTS", message, headers={"Retry-After": str(wait)}),
                         message)
        if await self.check_password(name, password):
            await self.throttle.record(address, name, True)
            return name
        await self.throttle.record(address, name, False)
        if self.metrics is not None:
            self.metrics.logins_refused.labels("bad_credentials").inc()
        return None

    async def check_password(self, name: str, password: str) -> bool:
        record = self.access.user(name)
        key = (name, hashlib.blake2b(password.encode(), key=self._pepper, digest_size=32).digest())
        now = self.clock()
        hit = self._verified.get(key)
        if hit is not None:
            if record is not None and hit[0] == record.password_hash and hit[1] > now:
                return True
            del self._verified[key]
        if record is None or not password or len(password) > MAX_CREDENTIAL:
            # An unknown name answers as slowly as a wrong password: no probing for names.
            await self._equal_time(password[:MAX_CREDENTIAL])
            return False
        # Against the replica's in-memory copy of the user (kept current by the
        # watch), not an etcd read: logins keep working while etcd is slow.
        if not await self._verify(record.password_hash, password):
            return False
        self._verified[key] = (record.password_hash, now + VERIFIED_TTL_SECONDS)
        while len(self._verified) > VERIFIED_MAX:
            self._verified.popitem(last=False)
        return True

    async def _verify(self, password_hash: str, password: str) -> bool:
        """argon2id, in a thread: ~50 ms that must not stall the event loop."""
        try:
            return await asyncio.get_running_loop().run_in_executor(
                None, self._hasher.verify, password_hash, password)
        except (VerificationError, InvalidHashError):
            return False

    async def _equal_time(self, password: str) -> None:
        if self._dummy_hash is None:
            self._dummy_hash = await asyncio.get_running_loop().run_in_executor(
                None, self._hasher.hash, secrets.token_hex(16))
        await self._verify(self._dummy_hash, password or "-")

    # -- authorization -----------------------------------------------------------

    def authorize(self, request: web.BaseRequest, caller: Caller, repo: str, action: str) -> None:
        """Raises Denied unless `caller` may do `action` on `repo` now."""
        allowed = self.access.actions(caller.user, repo)
        if action in allowed and (caller.claims is None or action in caller.claims.repositories.get(repo, _EMPTY)):
            return
        raise Denied(self._refusal(request, caller, action in allowed, scope_of(repo, action)))

    def may(self, caller: Caller, repo: str, action: str) -> bool:
        if action not in self.access.actions(caller.user, repo):
            return False
        return caller.claims is None or action in caller.claims.repositories.get(repo, _EMPTY)

    def authorize_catalog(self, request: web.BaseRequest, caller: Caller) -> Callable[[str], bool] | None:
        """Raises Denied unless `caller` may list repositories; returns the filter of what they see
        (None: everything, for a cluster admin)."""
        # Any token (an anonymous one too) that carries the catalog lists what its caller may pull;
        # no credentials at all get the challenge, as pulls do, so clients come back with a token.
        if not caller.authenticated or (caller.claims is not None and not caller.claims.catalog):
            raise Denied(self._refusal(request, caller, True, CATALOG_SCOPE))
        if caller.user is not None and self.access.is_admin(caller.user):
            return None
        user, actions = caller.user, self.access.actions
        return lambda repo: "pull" in actions(user, repo)

    def require_credentials(self, request: web.BaseRequest, caller: Caller) -> None:
        """`GET /v2/`: any valid credentials, a valid anonymous token included."""
        if not caller.authenticated:
            raise Denied(self.unauthorized(request, "authentication required"))

    def _refusal(self, request: web.BaseRequest, caller: Caller, could: bool, scope: str) -> web.Response:
        if caller.claims is not None and could:
            # The user may do it, the token just does not say so: docker asks for a new one.
            return self.unauthorized(request, "the token does not grant this", scope, "insufficient_scope")
        if caller.user is None:
            return self.unauthorized(request, "authentication required", scope)
        return error_response(403, "DENIED", "requested access to the resource is denied",
                              [{"Type": scope.split(":")[0], "Name": scope.split(":")[1],
                                "Action": scope.rsplit(":", 1)[1]}])

    # -- challenges --------------------------------------------------------------

    def realm(self, request: web.BaseRequest) -> str:
        host = request.headers.get("Host", "")
        if not _HOST.match(host):
            # A Host we would not echo into a header: name the address the client reached.
            sock = request.transport.get_extra_info("sockname") if request.transport else None
            if not sock:
                host = "localhost"
            else:
                host = f"[{sock[0]}]:{sock[1]}" if ":" in sock[0] else f"{sock[0]}:{sock[1]}"
        return f"{request.scheme}://{host}/token"

    def challenge(self, request: web.BaseRequest, scope: Need = None, error: str | None = None) -> str:
        if isinstance(scope, tuple):
            scope = scope_of(*scope)
        parts = [f'realm="{self.realm(request)}"', f'service="{self.service}"']
        if scope:
            parts.append(f'scope="{scope}"')
        if error:
            parts.append(f'error="{error}"')
        return "Bearer " + ",".join(parts)

    def unauthorized(self, request: web.BaseRequest, message: str, scope: Need = None,
                     error: str | None = None) -> web.Response:
        return error_response(401, "UNAUTHORIZED", message,
                              headers={"WWW-Authenticate": self.challenge(request, scope, error)})


def oauth_error(status: int, code: str, oauth: str, message: str,
                headers: dict[str, str] | None = None) -> web.Response:
    """An error both kinds of client read: the OCI `errors` list and OAuth2's `error`."""
    body = {"errors": [{"code": code, "message": message}], "error": oauth, "error_description": message}
    return web.Response(status=status, body=msgspec.json.encode(body), content_type="application/json",
                        headers={"Cache-Control": "no-store", **(headers or {})})
