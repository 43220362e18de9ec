"""Signing in and out of the console."""

from __future__ import annotations


from aiohttp import web

from moorage.api.console.app import PREFIX, Ctx, console_path
from moorage.api.console.session import SignInRefused
from moorage.api.routes import ANYONE, USER, Route, route

MAX_NAME = 64


async def sign_in_page(ctx: Ctx) -> web.StreamResponse:
    if ctx.session is not None:
        return ctx.redirect(console_path(ctx.query("next", limit=2048)))
    return _form(ctx, 200)


def _form(ctx: Ctx, status: int, error: str | None = None, name: str = "",
          retry_after: str | None = None) -> web.Response:
    token, nonce = ctx.console.sessions.sign_in_csrf(ctx.request)
    response = ctx.page("sign_in.html", status, title="Sign in", sign_in_csrf=token, error=error,
                        name=name, next=console_path(ctx.form.get("next") or ctx.query("next", limit=2048)))
    if nonce is not None:
        ctx.console.sessions.set_pre_session(response, ctx.request, nonce)
    if retry_after:
        response.headers["Retry-After"] = retry_after
    return response


async def sign_in(ctx: Ctx) -> web.StreamResponse:
    name = ctx.form.get("username", "").strip()[:MAX_NAME]
    sessions = ctx.console.sessions
    try:
        session = await sessions.sign_in(ctx.request, name, ctx.form.get("password", ""))
    except SignInRefused as e:
        if ctx.console.audit is not None and e.status in (401, 429):
            ctx.console.audit.login_failed(ctx.request, name or None, f"console: {e.message}", e.status)
        return _form(ctx, e.status, e.message, name, e.retry_after)
    response = ctx.redirect(console_path(ctx.form.get("next", "")))
    sessions.set_cookie(response, ctx.request, session)
    return response


async def sign_out(ctx: Ctx) -> web.StreamResponse:
    assert ctx.session is not None  # the route needs a signed-in user
    await ctx.console.sessions.sign_out(ctx.session)
    ctx.session.renewed = None  # a renewal due now must not set the cookie again
    response = ctx.redirect(f"{PREFIX}/sign-in", "You are signed out.")
    ctx.console.sessions.clear_cookie(response, ctx.request)
    return response


def routes() -> list[Route]:
    return [
        route("GET", r"^/console/sign-in$", sign_in_page, ANYONE),
        route("POST", r"^/console/sign-in$", sign_in, ANYONE),
        route("POST", r"^/console/sign-out$", sign_out, USER),
    ]
