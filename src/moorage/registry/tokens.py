"""Bearer tokens: HS256 JWTs in the shape Docker's token specification describes.

Every replica signs and verifies with the same cluster secret
(`MetaStore.secret("token-signing")`), so a token issued by one replica is
good on all of them without a network round trip. Verified tokens are cached
by their string until they expire: a manifest GET, the hottest request,
then costs a dictionary lookup instead of an HMAC and a JSON decode.

Replicas' clocks may disagree by minutes (no NTP, a VM paused and resumed).
A token names the replica that issued it (`rep`), and a verifier that knows
that replica's clock offset (cluster/clock.py, from its heartbeats) checks
the token's times on the issuer's clock: expiry stays exact whatever the skew.
While the offset is unknown (the verifier just started), it allows
CLOCK_SKEW_SECONDS either side instead.

Three kinds of token, told apart by their audience so that none can stand in
for another: access tokens (audience = the service, short-lived, carrying
`access`), refresh tokens (audience = "<service>:refresh", long-lived,
carrying no access at all, only who the subject is) and the web console's
session tokens (audience = "<service>:console", the access tokens' lifetime,
naming the user and the session).
"""

from __future__ import annotations

import secrets
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime, timezone

import jwt

ISSUER = "moorage"
SERVICE = "moorage"
REPO_ACTIONS = frozenset({"pull", "push", "delete"})
CATALOG = ("registry", "catalog")
REFRESH_SECONDS = 30 * 24 * 3600
# A token is valid from a moment before it was issued: the issuer's clock as
# another replica estimates it may be that much behind the truth.
BACKDATE_SECONDS = 10
# The leeway on a token's times while its issuer's clock offset is unknown: the
# usual bound on clock skew (Kerberos's). What a token lets a caller do is
# checked per request anyway.
CLOCK_SKEW_SECONDS = 300
CACHE_SIZE = 8192
_ALGORITHMS = ["HS256"]


class TokenError(Exception):
    """A token that is malformed, forged, of the wrong kind or expired; says why."""


@dataclass(frozen=True, slots=True)
class Scope:
    """One resource and the actions asked for (or granted) on it."""

    type: str           # "repository" or "registry"
    name: str           # a repository name, or "catalog"
    actions: frozenset[str]

    def __str__(self) -> str:
        return f"{self.type}:{self.name}:{','.join(sorted(self.actions))}"


@dataclass(frozen=True, slots=True)
class Claims:
    """What a verified access token says, shaped for the per-request check."""

    subject: str | None                      # None: an anonymous token
    repositories: Mapping[str, frozenset[str]]
    catalog: bool
    expires: float                           # epoch seconds on the verifier's clock: good until then


@dataclass(frozen=True, slots=True)
class SessionClaims:
    """What a verified console session token says."""

    subject: str
    session_id: str      # stays the same when the console renews the token
    version: str         # the user's password version when signing in
    signed_in: float     # epoch seconds of the sign-in the session started with
    expires: float


@dataclass(frozen=True, slots=True)
class Issued:
    token: str
    expires_in: int
    issued_at: str                           # RFC 3339, as the spec's response has it


def _rfc3339(t: float) -> str:
    return datetime.fromtimestamp(t, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _access_claim(scopes: Iterable[Scope]) -> list[dict]:
    return [{"type": s.type, "name": s.name, "actions": sorted(s.actions)} for s in scopes if s.actions]


def _claims(payload: dict, expires: float) -> Claims:
    repos: dict[str, frozenset[str]] = {}
    catalog = False
    access = payload.get("access")
    if not isinstance(access, list):
        raise TokenError("the token's access claim is not a list")
    for entry in access:
        if not isinstance(entry, dict):
            raise TokenError("the token's access claim holds a non-object")
        kind, name, actions = entry.get("type"), entry.get("name"), entry.get("actions")
        if not isinstance(name, str) or not isinstance(actions, list):
            raise TokenError("the token's access claim holds a malformed entry")
        if kind == "repository":
            repos[name] = repos.get(name, frozenset()) | (REPO_ACTIONS & set(actions))
        elif (kind, name) == CATALOG and "*" in actions:
            catalog = True
    subject = payload.get("sub")
    if not isinstance(subject, str):
        raise TokenError("the token has no subject")
    return Claims(subject or None, repos, catalog, expires)


class Tokens:
    """Issues and verifies this cluster's tokens.

    `lifetime` is read on every issue, so a change of the cluster setting
    applies to the next token without a restart. `offset(replica)` is that
    replica's clock minus ours (None while unknown); `replica` is ours.
    """

    def __init__(self, secret: bytes, lifetime: Callable[[], int], service: str = SERVICE,
                 cache_size: int = CACHE_SIZE, clock: Callable[[], float] = time.time,
                 replica: str = "", offset: Callable[[str], float | None] = lambda replica: None):
        self.secret = secret
        self.lifetime = lifetime
        self.service = service
        self.refresh_audience = f"{service}:refresh"
        self.session_audience = f"{service}:console"
        self.cache_size = cache_size
        self.clock = clock
        self.replica = replica
        self.offset = offset
        self._cache: OrderedDict[str, Claims] = OrderedDict()

    # -- issuing ---------------------------------------------------------------

    def _sign(self, audience: str, subject: str, lifetime: int, extra: dict) -> tuple[str, float]:
        now = int(self.clock())
        payload = {"iss": ISSUER, "aud": audience, "sub": subject, "iat": now,
                   "nbf": now - BACKDATE_SECONDS, "exp": now + lifetime,
                   "jti": secrets.token_urlsafe(12), "rep": self.replica, **extra}
        return jwt.encode(payload, self.secret, algorithm="HS256"), now

    def issue(self, subject: str | None, granted: Iterable[Scope]) -> Issued:
        """An access token for `subject` (None: anonymous) carrying `granted`."""
        lifetime = int(self.lifetime())
        token, now = self._sign(self.service, subject or "", lifetime, {"access": _access_claim(granted)})
        return Issued(token, lifetime, _rfc3339(now))

    def issue_refresh(self, subject: str, version: str) -> str:
        """A long-lived refresh token; `version` ties it to the user's current password."""
        return self._sign(self.refresh_audience, subject, REFRESH_SECONDS, {"ver": version})[0]

    def issue_session(self, subject: str, session_id: str, version: str, signed_in: float) -> Issued:
        """A console session token of the configured lifetime (the console renews it while in use)."""
        lifetime = int(self.lifetime())
        token, now = self._sign(self.session_audience, subject, lifetime,
                                {"sid": session_id, "ver": version, "sat": signed_in})
        return Issued(token, lifetime, _rfc3339(now))

    # -- verifying ---------------------------------------------------------------

    def verify(self, token: str) -> Claims:
        """The claims of a valid access token, from the cache when seen before."""
        cache = self._cache
        claims = cache.get(token)
        if claims is not None:
            if claims.expires > self.clock():
                cache.move_to_end(token)
                return claims
            del cache[token]
            raise TokenError("the token has expired")
        payload, expires = self._decode(token, self.service)
        claims = _claims(payload, expires)
        cache[token] = claims
        if len(cache) > self.cache_size:
            cache.popitem(last=False)
        return claims

    def verify_refresh(self, token: str) -> tuple[str, str]:
        """(subject, password version) of a valid refresh token."""
        payload, _ = self._decode(token, self.refresh_audience)
        subject, version = payload.get("sub"), payload.get("ver")
        if not isinstance(subject, str) or not subject or not isinstance(version, str):
            raise TokenError("the refresh token names no user")
        return subject, version

    def verify_session(self, token: str) -> SessionClaims:
        payload, expires = self._decode(token, self.session_audience)
        subject, sid, version, signed_in = payload.get("sub"), payload.get("sid"), payload.get("ver"), \
            payload.get("sat")
        if not (isinstance(subject, str) and subject and isinstance(sid, str) and isinstance(version, str)
                and isinstance(signed_in, (int, float))):
            raise TokenError("the session token is malformed")
        return SessionClaims(subject, sid, version, float(signed_in), expires)

    def _decode(self, token: str, audience: str) -> tuple[dict, float]:
        """The payload of a valid token, and until when (our clock) it stays valid."""
        try:
            payload = jwt.decode(token, self.secret, algorithms=_ALGORITHMS, audience=audience, issuer=ISSUER,
                                 options={"require": ["exp", "iat", "nbf", "sub", "aud", "iss"],
                                          # Times are checked below, against our clock: PyJWT
                                          # would refuse a token whose iat is a moment ahead
                                          # of this replica's clock (issued by a replica whose
                                          # clock runs a little fast).
                                          "verify_exp": False, "verify_nbf": False, "verify_iat": False})
        except jwt.InvalidAudienceError:
            raise TokenError("the token is not meant for this use") from None
        except jwt.PyJWTError as e:
            raise TokenError(f"the token is not valid: {e}") from None
        exp, nbf = payload["exp"], payload["nbf"]
        if not isinstance(exp, (int, float)) or not isinstance(nbf, (int, float)):
            raise TokenError("the token's times are not numbers")
        issuer = payload.get("rep")
        offset = self.offset(issuer) if isinstance(issuer, str) and issuer else None
        if issuer == self.replica:
            offset = 0.0
        # On the issuer's clock when we know it, else with the leeway of the largest skew we allow.
        early, late = (BACKDATE_SECONDS, 0.0) if offset is not None else (CLOCK_SKEW_SECONDS,) * 2
        now = self.clock() + (offset or 0.0)
        if exp + late <= now:
            raise TokenError("the token has expired")
        if nbf > now + early:
            raise TokenError("the token is not valid yet")
        return payload, exp + late - (offset or 0.0)
