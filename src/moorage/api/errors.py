"""OCI error bodies: every error a client hears becomes a response here, by the registry's one table."""

from __future__ import annotations

import msgspec
from aiohttp import web

from moorage.api.bodies import BodyTimeout
from moorage.registry.errors import BELOW, RegistryError, from_below

# Every error answered by `from_error`: the registry's, and those of the layers below it.
ERRORS = (RegistryError, *BELOW)


def error_response(status: int, code: str, message: str, detail=None,
                   headers: dict[str, str] | None = None) -> web.Response:
    err = {"code": code, "message": message}
    if detail is not None:
        err["detail"] = detail
    return web.Response(status=status, body=msgspec.json.encode({"errors": [err]}),
                        content_type="application/json", headers=headers)


def as_registry_error(error: BaseException) -> RegistryError:
    """One of ERRORS, as the registry error a client hears."""
    return error if isinstance(error, RegistryError) else from_below(error)  # type: ignore[arg-type]


def from_error(error: BaseException, headers: dict[str, str] | None = None) -> web.Response:
    """The response to one of ERRORS: its code, the status its code is registered with, its message."""
    e = as_registry_error(error)
    response = error_response(e.status, e.code, e.message, e.detail, headers)
    if isinstance(e, BodyTimeout):
        # The rest of the body may still come, or never: the connection cannot be reused.
        response.force_close()
    return response
