"""Tokens, scopes and the login slowdown, in-process (the matrix in test_permissions covers the wire)."""

from __future__ import annotations

import base64
import json

import jwt
import pytest

from moorage.api.throttle import LoginThrottle
from moorage.api.token_endpoint import BadRequest, parse_scopes
from moorage.registry.tokens import CLOCK_SKEW_SECONDS, Scope, TokenError, Tokens

pytestmark = pytest.mark.security

SECRET = b"s" * 32


class Clock:
    def __init__(self, now: float = 1_800_000_000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


def tokens(clock: Clock | None = None, lifetime: int = 300, **kw) -> Tokens:
    return Tokens(SECRET, lambda: lifetime, clock=clock or Clock(), **kw)


def payload(token: str) -> dict:
    part = token.split(".")[1]
    return json.loads(base64.urlsafe_b64decode(part + "=" * (-len(part) % 4)))


def test_access_token_carries_dockers_claims():
    clock = Clock()
    t = tokens(clock, lifetime=120)
    issued = t.issue("alice", [Scope("repository", "a/b", frozenset({"push", "pull"})),
                               Scope("registry", "catalog", frozenset({"*"})),
                               Scope("repository", "empty", frozenset())])
    p = payload(issued.token)
    assert (p["iss"], p["aud"], p["sub"], p["exp"] - p["iat"]) == ("moorage", "moorage", "alice", 120)
    assert p["nbf"] <= p["iat"] and p["jti"]
    assert p["access"] == [{"type": "repository", "name": "a/b", "actions": ["pull", "push"]},
                           {"type": "registry", "name": "catalog", "actions": ["*"]}]
    assert issued.expires_in == 120 and issued.issued_at.endswith("Z")
    claims = t.verify(issued.token)
    assert claims.subject == "alice" and claims.catalog and claims.repositories == {"a/b": {"pull", "push"}}
    assert t.verify(t.issue(None, []).token).subject is None  # anonymous: sub ""


def test_lifetime_is_read_at_every_issue():
    lifetime = [300]
    t = Tokens(SECRET, lambda: lifetime[0], clock=Clock())
    assert t.issue("a", []).expires_in == 300
    lifetime[0] = 60
    assert t.issue("a", []).expires_in == 60


def test_expiry_applies_to_cached_tokens_too():
    clock = Clock()
    t = tokens(clock, lifetime=60)
    token = t.issue("a", []).token
    t.verify(token)
    clock.now += 61
    with pytest.raises(TokenError, match="expired"):
        t.verify(token)
    with pytest.raises(TokenError, match="expired"):
        t.verify(token)  # and not cached back in


def test_access_and_refresh_tokens_cannot_stand_in_for_each_other():
    t = tokens()
    access, refresh = t.issue("a", []).token, t.issue_refresh("a", "v1")
    assert t.verify_refresh(refresh) == ("a", "v1")
    with pytest.raises(TokenError):
        t.verify(refresh)
    with pytest.raises(TokenError):
        t.verify_refresh(access)


@pytest.mark.parametrize("forge", ["other-secret", "alg-none", "tampered", "garbage", "wrong-issuer"])
def test_forged_tokens_are_refused(forge):
    clock = Clock()
    t = Tokens(SECRET, lambda: 300, clock=clock)
    claims = payload(t.issue("a", [Scope("repository", "x", frozenset({"pull"}))]).token)
    forged = {
        "other-secret": lambda: jwt.encode(claims, b"x" * 32, algorithm="HS256"),
        "alg-none": lambda: jwt.encode(claims, None, algorithm="none"),
        "tampered": lambda: _tamper(jwt.encode(claims, SECRET, algorithm="HS256")),
        "garbage": lambda: "not.a.token",
        "wrong-issuer": lambda: jwt.encode({**claims, "iss": "someone"}, SECRET, algorithm="HS256"),
    }[forge]()
    with pytest.raises(TokenError):
        t.verify(forged)


def _tamper(token: str) -> str:
    head, body, sig = token.split(".")
    p = json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
    p["access"][0]["actions"] = ["pull", "push", "delete"]
    body = base64.urlsafe_b64encode(json.dumps(p).encode()).decode().rstrip("=")
    return f"{head}.{body}.{sig}"


def test_a_token_from_a_replica_whose_clock_runs_minutes_ahead():
    token = tokens(Clock(1000.0), lifetime=60, replica="fast").issue("a", []).token  # exp 1060
    assert payload(token)["rep"] == "fast"
    # A verifier 4 minutes behind that knows it (from heartbeats) checks times on the issuer's clock:
    clock = Clock(760.0)
    knows = tokens(clock, replica="slow", offset=lambda r: 240.0 if r == "fast" else None)
    assert knows.verify(token).subject == "a"
    clock.now = 760.0 + 59
    assert knows.verify(token).subject == "a"
    clock.now = 760.0 + 60  # expired exactly when its lifetime is over, skew or not (cached or not)
    with pytest.raises(TokenError, match="expired"):
        knows.verify(token)
    with pytest.raises(TokenError, match="expired"):
        tokens(clock, replica="slow", offset=lambda r: 240.0).verify(token)
    # Before it knows the offset (just started), it allows CLOCK_SKEW_SECONDS either side.
    assert tokens(Clock(760.0), replica="slow").verify(token).subject == "a"
    assert tokens(Clock(1060.0 + CLOCK_SKEW_SECONDS - 1), replica="slow").verify(token).subject == "a"
    with pytest.raises(TokenError, match="not valid yet"):
        tokens(Clock(1000.0 - 10 - CLOCK_SKEW_SECONDS - 1), replica="slow").verify(token)
    with pytest.raises(TokenError, match="expired"):
        tokens(Clock(1060.0 + CLOCK_SKEW_SECONDS), replica="slow").verify(token)


def test_the_cache_is_bounded():
    t = tokens(cache_size=10)
    for i in range(50):
        t.verify(t.issue(f"u{i}", []).token)
    assert len(t._cache) == 10


def test_scopes_parse_leniently():
    scopes = parse_scopes(["repository:a/b:pull,push", "repository(plugin):c:pull",
                           "registry:catalog:* repository:a/b:delete,bogus", "repository:d:*",
                           "junk", "repository:BAD:pull", "repository::pull", "x:y:z", "registry:catalog:pull",
                           "repository:localhost:5000/e:pull", ":::", ""])
    got = {(s.type, s.name): set(s.actions) for s in scopes}
    assert got == {("repository", "a/b"): {"pull", "push", "delete"}, ("repository", "c"): {"pull"},
                   ("registry", "catalog"): {"*"}, ("repository", "d"): {"pull", "push", "delete"}}
    with pytest.raises(BadRequest):
        parse_scopes([f"repository:r{i}:pull" for i in range(100)])


def test_failed_logins_slow_down_doubling_and_success_resets():
    clock = Clock(0.0)
    th = LoginThrottle(clock=clock)
    for _ in range(4):
        th.failed("1.2.3.4", "bob")
    assert th.retry_after("1.2.3.4", "bob") == 0
    th.failed("1.2.3.4", "bob")
    assert th.retry_after("1.2.3.4", "bob") == 1
    waits = []
    for _ in range(12):
        clock.now += th.retry_after("1.2.3.4", "bob")
        th.failed("1.2.3.4", "bob")
        waits.append(th.retry_after("1.2.3.4", "bob"))
    assert waits[:4] == [2, 4, 8, 16] and max(waits) == 300
    assert th.retry_after("5.6.7.8", "bob") == 0 and th.retry_after("1.2.3.4", "alice") == 0
    th.succeeded("1.2.3.4", "bob")
    assert th.retry_after("1.2.3.4", "bob") == 0
    # Failures spread wider than the window never add up.
    for _ in range(10):
        clock.now += 301
        th.failed("1.2.3.4", "carol")
    assert th.retry_after("1.2.3.4", "carol") == 0


def test_throttle_table_is_bounded():
    th = LoginThrottle(max_entries=100)
    for i in range(1000):
        th.failed(f"10.0.{i // 256}.{i % 256}", "x")
    assert len(th._records) == 100
