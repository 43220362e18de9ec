"""Who is signed in to the console: the session cookie, CSRF tokens and origin checks.

A session is a cookie holding a signed token (registry/tokens.py, its own
audience) of the cluster's `token.lifetime_seconds`, renewed while the
console is used and never past MAX_SESSION_SECONDS after sign-in. Nothing is
kept on the server, so any replica serves any session; and as for the API,
the user is looked up on every request: a removed user, or one whose
password changed, is signed out at once on every replica. Signing out
records the session as revoked in etcd (leased: the record goes once the
token would have expired anyway), so a copy of the cookie is worthless too.

Cookies are HttpOnly and SameSite=Strict. Over HTTPS they are Secure and
named with the `__Host-` prefix (no Domain, Path=/, Secure: no other host
or plain-HTTP page can set or shadow them). Over `--insecure-http`, which
serves only loopback, they cannot be Secure (a browser would not send them
back over http://), so they are plain-named: loopback traffic never leaves
the machine.

Every state-changing request is a POST carrying a CSRF token, an HMAC of the
session id (or, for the sign-in form, of a random pre-session cookie), and
an Origin (or Referer) naming this very host.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import time
from dataclasses import dataclass
from urllib.parse import urlsplit

from aiohttp import web

from moorage.api.auth import Auth, Denied, password_version
from moorage.registry.access import Access
from moorage.registry.tokens import BACKDATE_SECONDS, SessionClaims, TokenError

# However active, a session ends this long after its sign-in.
MAX_SESSION_SECONDS = 12 * 3600
PRE_SESSION_SECONDS = 3600
MAX_COOKIE = 4096


@dataclass(slots=True)
class Session:
    user: str
    session_id: str
    admin: bool
    csrf: str
    renewed: str | None = None     # a fresh token for the cookie, when the one presented was past half-life
    lifetime: int = 0


class SignInRefused(Exception):
    """Sign-in refused; `message` is what the form says, `status` what the response is."""

    def __init__(self, message: str, status: int = 401, retry_after: str | None = None):
        super().__init__(message)
        self.message = message
        self.status = status
        self.retry_after = retry_after


def _cookie_names(request: web.BaseRequest) -> tuple[str, str]:
    """(session cookie, pre-session cookie) for this request's scheme."""
    if request.secure:
        return "__Host-moorage-session", "__Host-moorage-csrf"
    return "moorage-session", "moorage-csrf"


def same_origin(request: web.BaseRequest) -> bool:
    """Whether the request says it comes from a page of this very host (Origin, else Referer).

    Browsers send Origin on every POST; a request with neither is refused,
    so a form on another site can never post here, even where SameSite
    cookies are not enforced.
    """
    source = request.headers.get("Origin")
    if source is None or source == "null":
        source = request.headers.get("Referer")
    if not source:
        return False
    parts = urlsplit(source)
    return parts.scheme == request.scheme and parts.netloc.lower() == request.host.lower()


class Sessions:
    def __init__(self, auth: Auth, access: Access, clock=time.time):
        self.auth = auth
        self.tokens = auth.tokens
        self.access = access
        self.clock = clock
        # CSRF tokens are MACs under a key of their own, derived from the cluster's signing secret.
        self._csrf_key = hmac.new(self.tokens.secret, b"moorage console csrf", hashlib.sha256).digest()

    # -- the signed-in user ----------------------------------------------------------

    def current(self, request: web.BaseRequest) -> Session | None:
        """The session this request's cookie holds, if it is valid now and its user still exists."""
        token = request.cookies.get(_cookie_names(request)[0])
        if not token or len(token) > MAX_COOKIE:
            return None
        try:
            claims = self.tokens.verify_session(token)
        except TokenError:
            return None
        record = self.access.user(claims.subject)
        now = self.clock()
        if record is None or password_version(record) != claims.version \
                or now - claims.signed_in > MAX_SESSION_SECONDS or self.access.session_revoked(claims.session_id):
            return None
        session = Session(claims.subject, claims.session_id, record.admin, self.csrf(claims.session_id))
        lifetime = int(self.tokens.lifetime())
        if claims.expires - now < lifetime / 2:
            session.renewed, session.lifetime = self._issue(claims), lifetime
        return session

    def _issue(self, claims: SessionClaims) -> str:
        return self.tokens.issue_session(claims.subject, claims.session_id, claims.version, claims.signed_in).token

    async def sign_in(self, request: web.BaseRequest, name: str, password: str) -> Session:
        """Check the password (with the API's verification and login slowdown); raises SignInRefused."""
        if not name or not password:
            raise SignInRefused("Enter your user name and password.", 400)
        try:
            user = await self.auth.login(request, name, password)
        except Denied as e:
            raise SignInRefused(e.message or "Too many failed sign-ins; try again later.", e.response.status,
                                e.response.headers.get("Retry-After")) from None
        record = self.access.user(name) if user is not None else None
        if record is None:
            raise SignInRefused("Incorrect user name or password.")
        sid = secrets.token_urlsafe(16)
        issued = self.tokens.issue_session(name, sid, password_version(record), self.clock())
        return Session(name, sid, record.admin, self.csrf(sid), issued.token, issued.expires_in)

    async def sign_out(self, session: Session) -> None:
        """Revoke the session everywhere until its token (renewed at most now) has expired."""
        await self.access.revoke_session(session.session_id, int(self.tokens.lifetime()) + 2 * BACKDATE_SECONDS)

    # -- cookies -----------------------------------------------------------------------

    def set_cookie(self, response: web.StreamResponse, request: web.BaseRequest, session: Session) -> None:
        if session.renewed is not None:
            response.set_cookie(_cookie_names(request)[0], session.renewed, max_age=session.lifetime,
                                path="/", httponly=True, secure=request.secure, samesite="Strict")

    def clear_cookie(self, response: web.StreamResponse, request: web.BaseRequest) -> None:
        response.del_cookie(_cookie_names(request)[0], path="/", secure=request.secure,
                            httponly=True, samesite="Strict")

    # -- CSRF --------------------------------------------------------------------------

    def csrf(self, session_id: str) -> str:
        return self._mac(b"session:" + session_id.encode())

    def sign_in_csrf(self, request: web.BaseRequest) -> tuple[str, str | None]:
        """The sign-in form's CSRF token, bound to a random pre-session cookie; and the
        cookie's value when there was none yet (to set with `set_pre_session`)."""
        nonce = request.cookies.get(_cookie_names(request)[1], "")
        new = None
        if not 16 <= len(nonce) <= 64:
            nonce = new = secrets.token_urlsafe(24)
        return self._mac(b"sign-in:" + nonce.encode()), new

    def set_pre_session(self, response: web.StreamResponse, request: web.BaseRequest, nonce: str) -> None:
        response.set_cookie(_cookie_names(request)[1], nonce, max_age=PRE_SESSION_SECONDS, path="/",
                            httponly=True, secure=request.secure, samesite="Strict")

    def _mac(self, message: bytes) -> str:
        mac = hmac.new(self._csrf_key, message, hashlib.sha256).digest()
        return base64.urlsafe_b64encode(mac).decode().rstrip("=")

    @staticmethod
    def csrf_matches(expected: str, given: str | None) -> bool:
        return bool(given) and hmac.compare_digest(expected.encode(), (given or "").encode())
