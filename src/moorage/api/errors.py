"""OCI error bodies and the statuses the spec pairs with each code."""

from __future__ import annotations

import msgspec
from aiohttp import web

from moorage.api.http import BodyTimeout
from moorage.registry.errors import BadParameter, MetadataUnavailable, RangeInvalid, RegistryError, TooLarge

STATUS = {
    "BLOB_UNKNOWN": 404,
    "BLOB_UPLOAD_INVALID": 400,
    "BLOB_UPLOAD_UNKNOWN": 404,
    "DIGEST_INVALID": 400,
    "MANIFEST_BLOB_UNKNOWN": 400,
    "MANIFEST_INVALID": 400,
    "MANIFEST_UNKNOWN": 404,
    "NAME_INVALID": 400,
    "NAME_UNKNOWN": 404,
    "SIZE_INVALID": 400,
    "UNAUTHORIZED": 401,
    "DENIED": 403,
    "UNSUPPORTED": 405,
    "TOOMANYREQUESTS": 429,
}


def status_of(error: RegistryError) -> int:
    if isinstance(error, BodyTimeout):
        return 408
    if isinstance(error, RangeInvalid):
        return 416
    if isinstance(error, TooLarge):
        return 413
    if isinstance(error, MetadataUnavailable):
        return 503
    if isinstance(error, BadParameter):
        return 400
    return STATUS.get(error.code, 400)


def error_response(status: int, code: str, message: str, detail=None,
                   headers: dict[str, str] | None = None) -> web.Response:
    err = {"code": code, "message": message}
    if detail is not None:
        err["detail"] = detail
    return web.Response(status=status, body=msgspec.json.encode({"errors": [err]}),
                        content_type="application/json", headers=headers)


def from_error(error: RegistryError, headers: dict[str, str] | None = None) -> web.Response:
    response = error_response(status_of(error), error.code, error.message, error.detail, headers)
    if isinstance(error, BodyTimeout):
        # The rest of the body may still come, or never: the connection cannot be reused.
        response.force_close()
    return response
