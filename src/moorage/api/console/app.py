"""The console's dispatcher: its routes, who may reach each, forms, CSRF, errors and headers.

Every decision about access is the registry's own: the repository pages ask
`Auth` and `Access` exactly as the distribution API does, and the admin
pages run the admin API's own routes (`AdminApi.dispatch`) for the
signed-in admin, so validation, errors and audit entries are the same as
over `/_admin/` and the CLI.
"""

from __future__ import annotations

import base64
import hmac
import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, quote

import msgspec
from aiohttp import web
from yarl import URL

from moorage.api.admin import AdminApi
from moorage.api.audit import USER_KEY, RequestAudit
from moorage.api.auth import Auth, Caller
from moorage.api.console.render import STATIC_PREFIX, Renderer, secure_headers
from moorage.api.console.session import Session, Sessions, same_origin
from moorage.api.errors import ERRORS, as_registry_error
from moorage.api.bodies import read_bounded
from moorage.api.routes import ADMIN, ANYONE, Route, Routes
from moorage.registry.access import Access
from moorage.registry.browse import Browser
from moorage.registry.errors import TooLarge
from moorage.registry.repositories import Repositories

log = logging.getLogger(__name__)

MAX_FORM = 64 << 10
PREFIX = "/console"


class Refused(Exception):
    """A request the console answers with an error page (or JSON for fetches)."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(slots=True)
class Ctx:
    """One request to the console, as its handler sees it."""

    console: "Console"
    request: web.BaseRequest
    session: Session | None
    form: dict[str, str] = field(default_factory=dict)

    @property
    def user(self) -> str:
        assert self.session is not None
        return self.session.user

    @property
    def caller(self) -> Caller:
        """The signed-in user as the distribution API's authorization sees a Basic-authenticated one."""
        return Caller(self.session.user if self.session else None, None, self.session is not None)

    def may(self, repo: str, action: str) -> bool:
        return self.console.auth.may(self.caller, repo, action)

    def query(self, name: str, default: str = "", limit: int = 256) -> str:
        return self.request.query.get(name, default)[:limit]

    def page(self, template: str, status: int = 200, **context: Any) -> web.Response:
        flash = self.console.read_flash(self.request)
        session = self.session
        context.setdefault("section", "")
        response = self.console.renderer.page(
            template, status, user=session.user if session else None, admin=bool(session and session.admin),
            csrf=session.csrf if session else "", flash=flash, path=self.request.path,
            errors=context.pop("errors", {}), values=context.pop("values", {}), **context)
        if flash is not None:
            self.console.clear_flash(response, self.request)
        return response

    def redirect(self, location: str, flash: str | None = None) -> web.Response:
        response = web.Response(status=303, headers={"Location": location})
        if flash:
            self.console.set_flash(response, self.request, flash)
        return response

    async def admin_call(self, method: str, path: str, body: Any = None,
                         query: dict[str, str] | None = None) -> tuple[int, Any]:
        """An admin API route, run for the signed-in admin; (status, decoded JSON answer).

        Changes are audited as the admin API audits them: the same method and path.
        """
        sub = self.request.clone(method=method, rel_url=URL.build(path=path, query=query or {}))
        sub[USER_KEY] = self.user
        response = await self.console.admin.dispatch(sub, path, body if body is not None else {})
        if method != "GET" and self.console.audit is not None:
            self.console.audit.admin(sub, response)
        try:
            answer = msgspec.json.decode(response.body) if isinstance(response.body, bytes) else {}
        except msgspec.DecodeError:
            answer = {}
        return response.status, answer


def admin_error(answer: Any) -> str:
    if isinstance(answer, dict) and isinstance(answer.get("error"), str):
        return answer["error"]
    return "the change was refused"


class Console:
    def __init__(self, repositories: Repositories, auth: Auth, access: Access, admin: AdminApi,
                 audit: RequestAudit | None, refuse_writes: Callable[[], web.Response | None]):
        self.repositories = repositories
        self.auth = auth
        self.access = access
        self.admin = admin
        self.audit = audit
        self.refuse_writes = refuse_writes
        self.renderer = Renderer()
        self.sessions = Sessions(auth, access)
        self.browser = Browser(repositories)
        self._flash_key = hmac.new(auth.tokens.secret, b"moorage console flash", "sha256").digest()
        # Each route's need is who may reach it: anyone, a signed-in user, or a cluster admin.
        self.routes = Routes()

    def add(self, routes: list[Route]) -> None:
        self.routes.add(routes)

    # -- dispatch ---------------------------------------------------------------------

    async def __call__(self, request: web.BaseRequest, path: str) -> web.StreamResponse:
        started = time.perf_counter()
        try:
            response = await self._route(request, path)
        except Refused as e:
            response = self._refused(request, e)
        except ERRORS as e:
            error = as_registry_error(e)
            if error.status >= 500:  # the metadata store or the blob storage failed, not the request
                response = self._error_page(request, error.status, f"The cluster cannot do this now: {error.message}")
            else:
                response = self._error_page(request, 404 if "UNKNOWN" in error.code else 400, error.message)
        except Exception:
            log.exception("console error", extra={"method": request.method, "path": path[:200]})
            response = self._error_page(request, 500, "Something went wrong; the replica's log has the details.")
        secure_headers(response, started)
        return response

    async def _route(self, request: web.BaseRequest, path: str) -> web.StreamResponse:
        if path in ("/", PREFIX):
            if request.method not in ("GET", "HEAD"):
                raise Refused(405, "Only GET is allowed here.")
            return web.Response(status=302, headers={"Location": PREFIX + "/"}, content_type="text/html",
                                text=f'<!doctype html><title>Moorage</title><a href="{PREFIX}/">The web console</a>\n')
        if path.startswith(STATIC_PREFIX) and request.method in ("GET", "HEAD"):
            found = self.renderer.static_response(path[len(STATIC_PREFIX):])
            if found is None:
                raise Refused(404, "No such file.")
            return found
        found, m, allowed = self.routes.match(request.method, path)
        if found is not None:
            assert m is not None
            return await self._run(request, found, m)
        if allowed:
            raise Refused(405, f"{request.method} is not allowed here.")
        raise Refused(404, "There is no such page.")

    async def _run(self, request: web.BaseRequest, route: Route, m: re.Match) -> web.StreamResponse:
        session = self.sessions.current(request)
        request[USER_KEY] = session.user if session else None
        ctx = Ctx(self, request, session)
        if route.need != ANYONE and session is None:
            if request.method == "GET" and not _json_path(request):
                target = request.rel_url.raw_path_qs
                return web.Response(status=303, headers={"Location": f"{PREFIX}/sign-in?next={quote(target)}"})
            raise Refused(401, "Your session has ended; sign in again.")
        if route.need == ADMIN and not (session and session.admin):
            if self.audit is not None:
                self.audit.denied(request, 403, "the console's admin pages need a cluster admin")
            raise Refused(403, "This page is for cluster admins.")
        if request.method == "POST":
            ctx.form = await self._form(request)
            # The sign-in form's token is bound to its pre-session cookie; every other form's to the session.
            expected = self.sessions.sign_in_csrf(request)[0] if route.need == ANYONE or session is None \
                else session.csrf
            if not same_origin(request) or not self.sessions.csrf_matches(expected, ctx.form.get("csrf")):
                if self.audit is not None:
                    self.audit.denied(request, 403, "console: cross-site request or missing CSRF token")
                raise Refused(403, "This form was not sent from this console (or it is too old); "
                                   "reload the page and try again.")
        response = await route.handler(ctx, *m.groups())
        if session is not None and session.renewed is not None:
            self.sessions.set_cookie(response, request, session)
        return response

    @staticmethod
    async def _form(request: web.BaseRequest) -> dict[str, str]:
        if request.content_type != "application/x-www-form-urlencoded":
            raise Refused(415, "Forms must be sent as application/x-www-form-urlencoded.")
        try:
            raw = await read_bounded(request, MAX_FORM)
            fields = parse_qs(raw.decode(), keep_blank_values=True, max_num_fields=100)
        except (TooLarge, UnicodeDecodeError, ValueError):
            raise Refused(400, f"The form must be UTF-8 and at most {MAX_FORM // 1024} KiB.") from None
        return {k: v[0] for k, v in fields.items()}

    # -- errors -------------------------------------------------------------------------

    def _refused(self, request: web.BaseRequest, e: Refused) -> web.Response:
        if _json_path(request):
            return web.json_response({"error": e.message}, status=e.status)
        return self._error_page(request, e.status, e.message)

    def _error_page(self, request: web.BaseRequest, status: int, message: str) -> web.Response:
        try:
            session = self.sessions.current(request)
            return Ctx(self, request, session).page("error.html", status, title=_TITLES.get(status, "Error"),
                                                    message=message, code=status)
        except Exception:  # the page itself failed: say it plainly rather than not at all
            log.exception("console error page failed", extra={"status": status})
            return web.Response(status=status, text=message + "\n")

    # -- flash messages: one line shown on the page a form redirects to -----------------

    def _flash_cookie(self, request: web.BaseRequest) -> str:
        return "__Host-moorage-flash" if request.secure else "moorage-flash"

    def set_flash(self, response: web.StreamResponse, request: web.BaseRequest, message: str) -> None:
        data = base64.urlsafe_b64encode(message[:300].encode()).decode()
        mac = hmac.new(self._flash_key, data.encode(), "sha256").hexdigest()[:32]
        response.set_cookie(self._flash_cookie(request), f"{data}.{mac}", max_age=60, path="/", httponly=True,
                            secure=request.secure, samesite="Strict")

    def read_flash(self, request: web.BaseRequest) -> str | None:
        data, _, mac = request.cookies.get(self._flash_cookie(request), "").partition(".")
        if not data or len(data) > 500:
            return None
        if not hmac.compare_digest(mac, hmac.new(self._flash_key, data.encode(), "sha256").hexdigest()[:32]):
            return None
        try:
            return base64.urlsafe_b64decode(data.encode()).decode()
        except (ValueError, UnicodeDecodeError):
            return None

    def clear_flash(self, response: web.StreamResponse, request: web.BaseRequest) -> None:
        response.del_cookie(self._flash_cookie(request), path="/", secure=request.secure, httponly=True,
                            samesite="Strict")


# A place to send the browser next: a console page of this host, nothing else (no scheme, no
# other host, no header-breaking characters).
_LOCAL = re.compile(r"^/console/[A-Za-z0-9._~/%:@!$&'()*+,;=?-]*$")


def console_path(value: str, default: str = PREFIX + "/") -> str:
    return value if _LOCAL.match(value) and "//" not in value and len(value) < 2048 else default


def _json_path(request: web.BaseRequest) -> bool:
    """The pages' own fetches (cluster.json, gc.json) get JSON, errors included, never a redirect."""
    return request.path.endswith(".json")


_TITLES = {400: "Bad request", 401: "Signed out", 403: "Not allowed", 404: "Not found",
           405: "Not allowed", 415: "Bad request", 503: "Unavailable", 500: "Error"}
