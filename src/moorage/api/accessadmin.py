"""The admin API's users, teams, grants and visibility (routes for AdminApi).

    GET    /_admin/users                          {"users": [{name, admin, created, teams}]}
    PUT    /_admin/users/<name>                   {password, admin?}: create; 409 if it exists
    PUT    /_admin/users/<name>/password          {password}: set a new password
    DELETE /_admin/users/<name>                   with its memberships and grants; 409 for the last admin
    GET    /_admin/teams                          {"teams": [{name, created, members}]}
    PUT    /_admin/teams/<name>                   create; 409 if it exists
    DELETE /_admin/teams/<name>                   with its memberships and grants
    PUT    /_admin/teams/<team>/members/<user>    add (idempotent)
    DELETE /_admin/teams/<team>/members/<user>    remove; 404 if not a member
    GET    /_admin/grants[?user=|team=|repo=]     {"grants": [{user|team, repo, role}]}
    PUT    /_admin/grants                         {user|team, repo, role}: grant or change the role
    DELETE /_admin/grants                         {user|team, repo}: revoke; 404 if there is none
    GET    /_admin/visibility                     {"visibility": [{repo, visibility}]}
    PUT    /_admin/visibility                     {repo, visibility: public|private|inherit}
    GET    /_admin/access?repo=R[&user=U]         {user, repo, public, actions}: what U (or anonymous) may do

`repo` is a repository name, `NAMESPACE/*` or `*`. AdminApi checks the
caller is a cluster admin and turns AccessError into {"error": sentence}
with 400 (invalid), 404 (unknown) or 409 (refused). Passwords are never
echoed back.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from moorage.api.routes import ADMIN, Route, route
from moorage.registry.access import TEAM, USER, Access, AccessError

_SEGMENT = r"([^/]+)"


def access_routes(access: Access) -> list[Route]:
    a = access
    users = a.users

    async def put_user(request: web.BaseRequest, body: dict, name: str) -> dict:
        admin = body.get("admin", False)
        if not isinstance(admin, bool):
            raise AccessError("invalid", "admin takes true or false")
        record = await users.add(name, body.get("password"), admin)  # type: ignore[arg-type]
        return {"name": name, "admin": record.admin, "created": record.created}

    async def put_password(request: web.BaseRequest, body: dict, name: str) -> dict:
        await users.set_password(name, body.get("password"))  # type: ignore[arg-type]
        return {"name": name, "password_changed": True}

    async def delete_user(request: web.BaseRequest, body: dict, name: str) -> dict:
        await users.remove(name)
        return {"name": name, "removed": True}

    async def put_team(request: web.BaseRequest, body: dict, name: str) -> dict:
        return await a.create_team(name)

    async def delete_team(request: web.BaseRequest, body: dict, name: str) -> dict:
        await a.delete_team(name)
        return {"name": name, "removed": True}

    async def put_member(request: web.BaseRequest, body: dict, team: str, user: str) -> dict:
        await a.add_member(team, user)
        return {"team": team, "user": user, "member": True}

    async def delete_member(request: web.BaseRequest, body: dict, team: str, user: str) -> dict:
        await a.remove_member(team, user)
        return {"team": team, "user": user, "member": False}

    async def get_grants(request: web.BaseRequest, body: dict) -> dict:
        q = request.query
        return {"grants": await a.list_grants(q.get("user"), q.get("team"), q.get("repo"))}

    async def put_grant(request: web.BaseRequest, body: dict) -> dict:
        kind, name = _subject(body)
        return await a.grant(kind, name, body.get("repo"), body.get("role"))  # type: ignore[arg-type]

    async def delete_grant(request: web.BaseRequest, body: dict) -> dict:
        kind, name = _subject(body)
        repo = body.get("repo")
        await a.revoke(kind, name, repo)  # type: ignore[arg-type]
        return {kind: name, "repo": repo, "revoked": True}

    async def put_visibility(request: web.BaseRequest, body: dict) -> dict:
        choice = body.get("visibility")
        if choice not in ("public", "private", "inherit"):
            raise AccessError("invalid", "visibility takes public, private or inherit")
        return await a.set_visibility(body.get("repo"),  # type: ignore[arg-type]
                                      None if choice == "inherit" else choice == "public")

    async def get_access(request: web.BaseRequest, body: dict) -> dict:
        return await a.explain(request.query.get("user") or None, request.query.get("repo", ""))

    return [
        route("GET", r"^/_admin/users$", lambda r, b: _wrap("users", a.list_users()), ADMIN),
        route("PUT", rf"^/_admin/users/{_SEGMENT}$", _body(put_user), ADMIN),
        route("DELETE", rf"^/_admin/users/{_SEGMENT}$", _body(delete_user), ADMIN),
        route("PUT", rf"^/_admin/users/{_SEGMENT}/password$", _body(put_password), ADMIN),
        route("GET", r"^/_admin/teams$", lambda r, b: _wrap("teams", a.list_teams()), ADMIN),
        route("PUT", rf"^/_admin/teams/{_SEGMENT}$", _body(put_team), ADMIN),
        route("DELETE", rf"^/_admin/teams/{_SEGMENT}$", _body(delete_team), ADMIN),
        route("PUT", rf"^/_admin/teams/{_SEGMENT}/members/{_SEGMENT}$", _body(put_member), ADMIN),
        route("DELETE", rf"^/_admin/teams/{_SEGMENT}/members/{_SEGMENT}$", _body(delete_member), ADMIN),
        route("GET", r"^/_admin/grants$", _body(get_grants), ADMIN),
        route("PUT", r"^/_admin/grants$", _body(put_grant), ADMIN),
        route("DELETE", r"^/_admin/grants$", _body(delete_grant), ADMIN),
        route("GET", r"^/_admin/visibility$", lambda r, b: _wrap("visibility", a.list_visibility()), ADMIN),
        route("PUT", r"^/_admin/visibility$", _body(put_visibility), ADMIN),
        route("GET", r"^/_admin/access$", _body(get_access), ADMIN),
    ]


def _body(handler: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
    """Refuse a body that is not a JSON object before the handler sees it."""

    async def checked(request: web.BaseRequest, body: Any, *groups: str) -> Any:
        if not isinstance(body, dict):
            raise AccessError("invalid", "the request body must be a JSON object")
        return await handler(request, body, *groups)

    return checked


async def _wrap(field: str, listing: Awaitable[list]) -> dict:
    return {field: await listing}


def _subject(body: dict) -> tuple[str, str]:
    """("user", name) or ("team", name) from a grant's body: exactly one of the two."""
    user, team = body.get(USER), body.get(TEAM)
    if (user is None) == (team is None):
        raise AccessError("invalid", "a grant names exactly one of user or team")
    return (USER, user) if user is not None else (TEAM, team)
