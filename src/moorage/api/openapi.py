"""The OpenAPI 3.0 description of Moorage's whole HTTP API, served at /openapi.json.

It is written by hand, next to the routes, because the routes are regular
expressions matched from the right (repository names contain slashes),
which no generator understands. tests/test_openapi.py checks that every
route of the Dispatcher and of the admin API appears here, so the two
cannot drift apart silently; tests/test_fuzz.py sends generated requests to
every operation and checks the answers against it.

OpenAPI path parameters cannot contain "/", so `{name}` documents a one-
component repository name; longer names (`team/app`) match the same routes.
"""

from __future__ import annotations

from functools import cache
from typing import Any

import msgspec

from moorage.registry.audit import KINDS as AUDIT_KINDS, MAX_LIMIT as AUDIT_MAX_LIMIT

# -- vocabulary ---------------------------------------------------------------

_COMPONENT = r"[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*"
NAME_PATTERN = rf"^{_COMPONENT}(?:/{_COMPONENT})*$"
TAG_PATTERN = r"^[a-zA-Z0-9_][a-zA-Z0-9._-]{0,127}$"
DIGEST_PATTERN = r"^(sha256:[a-f0-9]{64}|sha512:[a-f0-9]{128})$"

MANIFEST_TYPES = [
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.v2+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
]

JSON = "application/json"
REF = "#/components"


def _ref(kind: str, name: str) -> dict:
    return {"$ref": f"{REF}/{kind}/{name}"}


def _path_param(name: str, schema: dict, description: str, example: str) -> dict:
    return {"name": name, "in": "path", "required": True, "schema": schema,
            "description": description, "example": example}


def _query(name: str, schema: dict, description: str, required: bool = False) -> dict:
    return {"name": name, "in": "query", "required": required, "schema": schema,
            "description": description}


def _header(name: str, schema: dict, description: str, required: bool = False) -> dict:
    return {"name": name, "in": "header", "required": required, "schema": schema,
            "description": description}


NAME = _path_param("name", {"type": "string", "pattern": NAME_PATTERN, "maxLength": 255},
                   "Repository name (the spec's grammar; may contain slashes).", "library/alpine")
REFERENCE = _path_param("reference", {"type": "string", "maxLength": 150},
                        "A tag or a digest.", "latest")
DIGEST = _path_param("digest", {"type": "string", "pattern": DIGEST_PATTERN}, "A content digest.",
                     "sha256:" + "0" * 64)
UPLOAD = _path_param("uuid", {"type": "string", "pattern": "^[0-9a-f]{32}$"},
                     "Upload session id, from the Location of the upload's last response.",
                     "0123456789abcdef0123456789abcdef")
STATE = _query("_state", {"type": "string"}, "Opaque upload state from the Location header.")
PAGE = [_query("n", {"type": "integer", "minimum": 0}, "Page size."),
        _query("last", {"type": "string"}, "Last item of the previous page.")]

V2_SECURITY = [{"bearer": []}, {"basic": []}, {}]  # anonymous only pulls public repositories
ADMIN_SECURITY = [{"basic": []}]


def _resp(description: str, *, content: dict | None = None, headers: list[str] = ()) -> dict:
    out: dict[str, Any] = {"description": description}
    if content:
        out["content"] = content
    if headers:
        out["headers"] = {h: _ref("headers", h) for h in headers}
    return out


def _err(description: str) -> dict:
    return _ref("responses", description)


# The error statuses every /v2/ operation may answer, by when they happen.
_AUTH_ERRORS = {"401": _err("Unauthorized"), "403": _err("Denied"), "429": _err("TooManyRequests")}
_READ_ERRORS = {"400": _err("BadRequest"), "404": _err("NotFound"), "405": _err("MethodNotAllowed"),
                **_AUTH_ERRORS}
_WRITE_ERRORS = {**_READ_ERRORS, "408": _err("RequestTimeout"), "413": _err("TooLarge"),
                 "503": _err("Unavailable")}


def _v2_op(summary: str, op_id: str, responses: dict, params: list[dict] = (), errors: dict = None,
           body: dict | None = None) -> dict:
    op = {"summary": summary, "operationId": op_id, "tags": ["distribution"],
          "parameters": list(params), "security": V2_SECURITY,
          "responses": {**(errors if errors is not None else _READ_ERRORS), **responses}}
    if body is not None:
        op["requestBody"] = body
    return op


_BLOB_BODY = {"required": False, "content": {"application/octet-stream": {
    "schema": {"type": "string", "format": "binary"}}}}
_UPLOAD_HEADERS = ["Location", "Range", "Docker-Upload-UUID"]
_CREATED_HEADERS = ["Location", "Docker-Content-Digest"]


def _distribution() -> dict:
    manifest_content = {t: {"schema": _ref("schemas", "Manifest")} for t in MANIFEST_TYPES}
    upload_range = _header("Content-Range", {"type": "string", "pattern": r"^\d+-\d+$"},
                           "The chunk's inclusive byte range; must start at the upload's offset.")
    return {
        "/v2/": {"get": _v2_op("API version check", "v2Base", {
            "200": _resp("The registry speaks distribution v2.", content={JSON: {"schema": {"type": "object"}}})},
            errors=_AUTH_ERRORS)},
        "/v2/_catalog": {"get": _v2_op("List the repositories the caller may see", "catalog", {
            "200": _resp("A page of repository names.", content={JSON: {"schema": _ref("schemas", "Catalog")}},
                         headers=["Link"])}, PAGE, errors={"400": _err("BadRequest"), **_AUTH_ERRORS})},
        "/v2/{name}/tags/list": {"get": _v2_op("List a repository's tags", "listTags", {
            "200": _resp("A page of tags.", content={JSON: {"schema": _ref("schemas", "TagList")}},
                         headers=["Link"])}, [NAME, *PAGE])},
        "/v2/{name}/manifests/{reference}": {
            "get": _v2_op("Pull a manifest", "getManifest", {
                "200": _resp("The manifest, byte for byte as pushed.",
                             content={t: {"schema": {}} for t in MANIFEST_TYPES},
                             headers=["Docker-Content-Digest"])},
                [NAME, REFERENCE, _header("Accept", {"type": "string"}, "Manifest media types accepted.")]),
            "head": _v2_op("Check a manifest exists", "headManifest", {
                "200": _resp("It exists.", headers=["Docker-Content-Digest"])}, [NAME, REFERENCE]),
            "put": _v2_op("Push a manifest (tag or digest)", "putManifest", {
                "201": _resp("Stored.", headers=[*_CREATED_HEADERS, "OCI-Subject"])},
                [NAME, REFERENCE], errors=_WRITE_ERRORS,
                body={"required": True, "content": manifest_content}),
            "delete": _v2_op("Delete a manifest or untag", "deleteManifest", {
                "202": _resp("Deleted.")}, [NAME, REFERENCE], errors=_WRITE_ERRORS),
        },
        "/v2/{name}/blobs/{digest}": {
            "get": _v2_op("Pull a blob", "getBlob", {
                "200": _resp("The blob.", content={"application/octet-stream": {
                    "schema": {"type": "string", "format": "binary"}}}, headers=["Docker-Content-Digest"]),
                "206": _resp("A range of the blob."),
                "416": _err("RangeNotSatisfiable")},
                [NAME, DIGEST, _header("Range", {"type": "string"}, "bytes=START-END")]),
            "head": _v2_op("Check a blob exists", "headBlob", {
                "200": _resp("It exists.", headers=["Docker-Content-Digest"])}, [NAME, DIGEST]),
            "delete": _v2_op("Delete a blob from a repository", "deleteBlob", {
                "202": _resp("Deleted.")}, [NAME, DIGEST], errors=_WRITE_ERRORS),
        },
        "/v2/{name}/blobs/uploads/": {"post": _v2_op(
            "Start an upload, push a whole blob (?digest=) or mount one (?mount=&from=)", "startUpload", {
                "201": _resp("Blob stored or mounted.", headers=_CREATED_HEADERS),
                "202": _resp("Upload session started.", headers=_UPLOAD_HEADERS)},
            [NAME, _query("digest", {"type": "string", "pattern": DIGEST_PATTERN}, "Monolithic push."),
             _query("mount", {"type": "string", "pattern": DIGEST_PATTERN}, "Digest to mount."),
             _query("from", {"type": "string", "pattern": NAME_PATTERN}, "Repository to mount from.")],
            errors=_WRITE_ERRORS, body=_BLOB_BODY)},
        "/v2/{name}/blobs/uploads/{uuid}": {
            "get": _v2_op("Upload status", "uploadStatus", {
                "204": _resp("Where the upload stands.", headers=_UPLOAD_HEADERS)}, [NAME, UPLOAD, STATE]),
            "patch": _v2_op("Send a chunk", "patchUpload", {
                "202": _resp("Chunk accepted.", headers=_UPLOAD_HEADERS),
                "416": _err("RangeNotSatisfiable")},
                [NAME, UPLOAD, STATE, upload_range], errors=_WRITE_ERRORS, body=_BLOB_BODY),
            "put": _v2_op("Close an upload (with an optional last chunk)", "finishUpload", {
                "201": _resp("Blob stored.", headers=_CREATED_HEADERS),
                "416": _err("RangeNotSatisfiable")},
                [NAME, UPLOAD, STATE,
                 _query("digest", {"type": "string", "pattern": DIGEST_PATTERN}, "The blob's digest.",
                        required=True), upload_range], errors=_WRITE_ERRORS, body=_BLOB_BODY),
            "delete": _v2_op("Cancel an upload", "cancelUpload", {
                "204": _resp("Cancelled.")}, [NAME, UPLOAD, STATE], errors=_WRITE_ERRORS),
        },
        "/v2/{name}/referrers/{digest}": {"get": _v2_op("Manifests whose subject is a digest", "referrers", {
            "200": _resp("An image index of descriptors.", content={
                "application/vnd.oci.image.index.v1+json": {"schema": _ref("schemas", "Index")}})},
            [NAME, DIGEST, _query("artifactType", {"type": "string"}, "Filter by artifact type.")])},
    }


def _service() -> dict:
    token_ok = _resp("A token.", content={JSON: {"schema": _ref("schemas", "Token")}})
    plain_errors = {"400": _err("AdminError"), "401": _err("Unauthorized"), "429": _err("TooManyRequests"),
                    "503": _err("Unavailable")}
    return {
        "/token": {
            "get": {"summary": "Docker token endpoint (Basic credentials or anonymous)", "operationId": "getToken",
                    "tags": ["auth"], "security": [{"basic": []}, {}],
                    "parameters": [_query("service", {"type": "string"}, "The service (moorage)."),
                                   _query("scope", {"type": "string"},
                                          "repository:NAME:ACTIONS; may repeat."),
                                   _query("account", {"type": "string"}, "The user name."),
                                   _query("offline_token", {"type": "string"}, "true: also a refresh token."),
                                   _query("client_id", {"type": "string"}, "The client's name.")],
                    "responses": {"200": token_ok, **plain_errors}},
            "post": {"summary": "OAuth2 token endpoint (password and refresh_token grants)",
                     "operationId": "postToken", "tags": ["auth"], "security": [{}],
                     "requestBody": {"required": True, "content": {"application/x-www-form-urlencoded": {
                         "schema": _ref("schemas", "TokenForm")}}},
                     "responses": {"200": token_ok, **plain_errors}},
        },
        "/ca": {"get": {"summary": "The cluster CA certificate (bootstraps trust)", "operationId": "getCa",
                        "tags": ["cluster"], "security": [{}],
                        "responses": {"200": _resp("PEM certificate.", content={
                            "application/x-pem-file": {"schema": {"type": "string"}}}),
                            "404": _err("PlainNotFound")}}},
        "/_ping": {
            "get": {"summary": "Load balancer health check", "operationId": "ping", "tags": ["cluster"],
                    "security": [{}],
                    "parameters": [_query("reads", {"type": "string"},
                                          "Non-empty: healthy while reads can be served, without quorum.")],
                    "responses": {"200": _resp("Healthy.", content={JSON: {"schema": _ref("schemas", "Ping")}}),
                                  "503": _resp("No quorum: writes are refused.",
                                               content={JSON: {"schema": _ref("schemas", "Ping")}})}},
            "head": {"summary": "Load balancer health check", "operationId": "pingHead", "tags": ["cluster"],
                     "security": [{}], "responses": {"200": _resp("Healthy."), "503": _resp("No quorum.")}},
        },
        "/metrics": {"get": {"summary": "This replica's Prometheus metrics (docs/monitoring.md)",
                             "operationId": "metrics", "tags": ["cluster"],
                             "security": [{"metricsToken": []}, {"basic": []}],
                             "responses": {"200": _resp("The Prometheus text format.", content={
                                 "text/plain": {"schema": {"type": "string"}}}),
                                 "401": _resp("Neither the metrics token nor an admin's credentials."),
                                 "403": _resp("The user is not a cluster admin."),
                                 "429": _resp("Logins from here are slowed down.")}}},
        "/health": {"get": {"summary": "This replica's state", "operationId": "health", "tags": ["cluster"],
                            "security": [{}],
                            "responses": {"200": _resp("State.", content={JSON: {"schema": {"type": "object"}}})}}},
        "/openapi.json": {"get": {"summary": "This document", "operationId": "openapi", "tags": ["cluster"],
                                  "security": [{}],
                                  "responses": {"200": _resp("OpenAPI 3.0.", content={
                                      JSON: {"schema": {"type": "object"}}})}}},
    }


# -- the admin API ----------------------------------------------------------------

def _admin_op(summary: str, op_id: str, params: list[dict] = (), body: dict | None = None,
              ok: dict | None = None, tag: str = "admin") -> dict:
    op = {"summary": summary, "operationId": op_id, "tags": [tag], "security": ADMIN_SECURITY,
          "parameters": list(params),
          "responses": {"200": ok or _resp("Done.", content={JSON: {"schema": {"type": "object"}}}),
                        **{s: _err("AdminError") for s in ("400", "401", "403", "404", "405", "408", "409",
                                                           "429", "503")}}}
    if body is not None:
        op["requestBody"] = {"required": True, "content": {JSON: {"schema": body}}}
    return op


def _obj(required: list[str] = (), **props: dict) -> dict:
    return {"type": "object", "properties": props, "required": list(required)}


_S = {"type": "string"}
_BINARY = {"type": "string", "format": "binary"}
_SEG = {"type": "string", "pattern": "^[^/]+$"}
ROLE = {"type": "string", "enum": ["read", "write", "admin"]}


def _admin() -> dict:
    user = _path_param("user", _SEG, "User name.", "alice")
    team = _path_param("team", _SEG, "Team name.", "devs")
    key = _path_param("key", {"type": "string", "pattern": r"^[a-z0-9_.]{1,64}$"}, "Setting name.",
                      "token.lifetime_seconds")
    replica = _path_param("replica", {"type": "string", "pattern": r"^[0-9a-f]{1,64}$"}, "Replica id.", "0a1b")
    subject = {"user": _S, "team": _S, "repo": _S}
    webhook = _path_param("name", {"type": "string", "pattern": r"^[a-z0-9][a-z0-9_.-]{0,62}$"}, "Endpoint name.",
                          "ci")
    return {
        "/_admin/cluster/status": {"get": _admin_op("Cluster members and replicas", "clusterStatus")},
        "/_admin/cluster/join": {"post": _admin_op(
            "Add a replica's etcd member (as a learner); returns the CA", "clusterJoin",
            body=_obj(["replica_id", "peer_url"], replica_id=_S, peer_url=_S))},
        "/_admin/cluster/promote": {"post": _admin_op("Promote a caught-up learner", "clusterPromote",
                                                      body=_obj(["member_id"], member_id={"type": "integer"}))},
        "/_admin/cluster/abandon": {"post": _admin_op("Drop a learner that never caught up", "clusterAbandon",
                                                      body=_obj(["member_id"], member_id={"type": "integer"}))},
        "/_admin/cluster/replicas/{replica}": {"delete": _admin_op(
            "Remove a replica", "clusterRemove",
            [replica, _query("force", {"type": "string"}, "1: even if it still answers.")])},
        "/_admin/config": {"get": _admin_op("Cluster settings", "configList")},
        "/_admin/config/{key}": {
            "put": _admin_op("Set a setting", "configSet", [key], body=_obj(["value"], value={})),
            "delete": _admin_op("Reset a setting to its default", "configUnset", [key]),
        },
        "/_admin/audit": {"get": _admin_op("Audit log of writes and refusals", "auditQuery", [
            _query("since", _S, "Earliest time (Unix seconds)."), _query("until", _S, "Latest time."),
            _query("user", _S, "Only this user."), _query("repo", _S, "Only this repository."),
            _query("kind", {"type": "string", "enum": list(AUDIT_KINDS)},
                   "Only this kind. Without it, every kind but `challenged` (requests without credentials "
                   "answered with a token challenge), which the answer's `challenged` counts instead."),
            _query("limit", {"type": "integer", "minimum": 1, "maximum": AUDIT_MAX_LIMIT},
                   "At most this many entries; page older ones with `until`.")])},
        "/_admin/gc": {
            "post": _admin_op("Start a garbage collection on this replica (409 while one runs); its run record",
                              "gcStart", body=_obj([], dry_run={"type": "boolean"}), tag="gc"),
            "get": _admin_op("Every kept garbage collection run, newest first", "gcHistory", tag="gc"),
        },
        "/_admin/gc/{run}": {"get": _admin_op(
            "One garbage collection run: state, phase, counts marked and swept, bytes freed", "gcRun",
            [_path_param("run", {"type": "string", "pattern": r"^[0-9A-Za-z-]{1,64}$"}, "Run id.",
                         "20260101T000000Z-0a1b2c")], tag="gc")},
        "/_admin/webhooks": {
            "get": _admin_op("Webhook endpoints: pending events, deliverer, delivery state (no secrets)",
                             "webhookList", tag="webhooks"),
            "post": _admin_op("Add a webhook endpoint (409 if the name is taken)", "webhookAdd", tag="webhooks",
                              body=_obj(["name", "url"], name=_S, url=_S,
                                        events={"type": "array", "items": {
                                            "type": "string", "enum": ["push", "pull", "delete", "gc"]}},
                                        repositories={"type": "array", "items": _S},
                                        headers={"type": "object", "additionalProperties": _S},
                                        secret=_S, ca_pem=_S, timeout={"type": "number"},
                                        max_pending={"type": "integer"}, backoff_max={"type": "number"})),
        },
        "/_admin/webhooks/{name}": {"delete": _admin_op(
            "Remove a webhook endpoint and its pending events", "webhookRemove", [webhook], tag="webhooks")},
        "/_admin/webhooks/{name}/test": {"post": _admin_op(
            "Send one test event to an endpoint now", "webhookTest", [webhook], tag="webhooks")},
        "/_admin/users": {"get": _admin_op("List users", "userList", tag="access")},
        "/_admin/users/{user}": {
            "put": _admin_op("Create a user", "userAdd", [user],
                             body=_obj(["password"], password=_S, admin={"type": "boolean"}), tag="access"),
            "delete": _admin_op("Remove a user", "userRemove", [user], tag="access"),
        },
        "/_admin/users/{user}/password": {"put": _admin_op("Set a user's password", "userPassword", [user],
                                                           body=_obj(["password"], password=_S), tag="access")},
        "/_admin/teams": {"get": _admin_op("List teams", "teamList", tag="access")},
        "/_admin/teams/{team}": {
            "put": _admin_op("Create a team", "teamAdd", [team], tag="access"),
            "delete": _admin_op("Remove a team", "teamRemove", [team], tag="access"),
        },
        "/_admin/teams/{team}/members/{user}": {
            "put": _admin_op("Add a member", "teamMemberAdd", [team, user], tag="access"),
            "delete": _admin_op("Remove a member", "teamMemberRemove", [team, user], tag="access"),
        },
        "/_admin/grants": {
            "get": _admin_op("List grants", "grantList", [
                _query("user", _S, "Only this user's."), _query("team", _S, "Only this team's."),
                _query("repo", _S, "Only on this repository or namespace.")], tag="access"),
            "put": _admin_op("Grant a role (user or team) on a repository, NAMESPACE/* or *", "grantAdd",
                             body=_obj(["repo", "role"], **subject, role=ROLE), tag="access"),
            "delete": _admin_op("Revoke a grant", "grantRemove", body=_obj(["repo"], **subject), tag="access"),
        },
        "/_admin/visibility": {
            "get": _admin_op("List repository visibility", "visibilityList", tag="access"),
            "put": _admin_op("Make a repository or namespace public, private or inherit", "visibilitySet",
                             body=_obj(["repo", "visibility"], repo=_S,
                                       visibility={"type": "string", "enum": ["public", "private", "inherit"]}),
                             tag="access"),
        },
        "/_admin/backup/snapshot": {"get": _admin_op(
            "A consistent etcd snapshot, streamed (size, sha256, revision and etcd version in "
            "X-Moorage-* headers)", "backupSnapshot", tag="backup",
            ok=_resp("The snapshot.", content={"application/octet-stream": {"schema": _BINARY}}))},
        "/_admin/backup/info": {"get": _admin_op(
            "The cluster CA (key included) and the blobs a snapshot's revision knows", "backupInfo",
            [_query("revision", {"type": "integer", "minimum": 0}, "The snapshot's revision."),
             _query("through", {"type": "integer", "minimum": 0},
                    "The revision read after the snapshot: blobs at either are listed.")], tag="backup")},
        "/_admin/backup/blobs/{digest}": {"get": _admin_op(
            "One blob's bytes, for a backup with blobs", "backupBlob",
            [_path_param("digest", {"type": "string", "pattern": "^sha(256|384|512):[0-9a-f]{64,128}$"},
                         "The blob's digest.", "sha256:" + "0" * 64)], tag="backup",
            ok=_resp("The blob.", content={"application/octet-stream": {"schema": _BINARY}}))},
        "/_admin/access": {"get": _admin_op("What a user (or anonymous) may do on a repository", "accessExplain",
                                            [_query("repo", _S, "The repository.", required=True),
                                             _query("user", _S, "The user; anonymous if absent.")],
                                            tag="access")},
    }


# -- components ----------------------------------------------------------------------

def _oci_error(description: str) -> dict:
    return _resp(description, content={JSON: {"schema": _ref("schemas", "ErrorBody")}})


def _components() -> dict:
    descriptor = _obj(["mediaType", "digest", "size"], mediaType=_S, digest=_S,
                      size={"type": "integer", "minimum": 0}, artifactType=_S,
                      annotations={"type": "object", "additionalProperties": _S})
    return {
        "securitySchemes": {
            "bearer": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT",
                       "description": "A token from /token, as docker gets one after a 401 challenge."},
            "basic": {"type": "http", "scheme": "basic",
                      "description": "User name and password; the admin API takes only this."},
            "metricsToken": {"type": "http", "scheme": "bearer",
                             "description": "The cluster setting metrics.token (what Prometheus sends)."},
        },
        "headers": {
            "Location": {"schema": _S, "description": "Where the resource, or the upload's next request, is."},
            "Range": {"schema": _S, "description": "Bytes received so far: 0-LAST."},
            "Docker-Upload-UUID": {"schema": _S, "description": "The upload session's id."},
            "Docker-Content-Digest": {"schema": _S, "description": "The content's digest."},
            "OCI-Subject": {"schema": _S, "description": "The subject digest a manifest refers to."},
            "Link": {"schema": _S, "description": "RFC 5988 link to the next page."},
            "WWW-Authenticate": {"schema": _S, "description": "Bearer challenge: realm, service, scope."},
        },
        "schemas": {
            "ErrorBody": _obj(["errors"], errors={"type": "array", "minItems": 1, "items": _obj(
                ["code", "message"], code=_S, message=_S, detail={})}),
            "AdminError": _obj(["error"], error=_S),
            "Catalog": _obj(["repositories"], repositories={"type": "array", "items": _S}),
            "TagList": _obj(["name", "tags"], name=_S, tags={"type": "array", "items": _S}),
            "Descriptor": descriptor,
            "Manifest": {**_obj(["schemaVersion"], schemaVersion={"type": "integer"}, mediaType=_S,
                                artifactType=_S, config=descriptor, subject=descriptor,
                                layers={"type": "array", "items": descriptor},
                                manifests={"type": "array", "items": descriptor})},
            "Index": _obj(["schemaVersion", "manifests"], schemaVersion={"type": "integer"}, mediaType=_S,
                          manifests={"type": "array", "items": descriptor}),
            "Token": _obj(["token"], token=_S, access_token=_S, expires_in={"type": "integer"},
                          issued_at=_S, refresh_token=_S),
            "TokenForm": _obj(["grant_type"], grant_type={"type": "string", "enum": ["password", "refresh_token"]},
                              service=_S, scope=_S, client_id=_S, username=_S, password=_S,
                              refresh_token=_S, access_type=_S),
            "Ping": _obj(["ok"], ok={"type": "boolean"}, writes={"type": "boolean"}, reason=_S),
        },
        "responses": {
            "BadRequest": _oci_error("Invalid name, digest, reference, manifest or parameter."),
            "Unauthorized": {**_oci_error("No or bad credentials; the challenge says where to get a token."),
                             "headers": {"WWW-Authenticate": _ref("headers", "WWW-Authenticate")}},
            "Denied": _oci_error("The caller lacks the permission."),
            "NotFound": _oci_error("Unknown repository, manifest, blob or upload."),
            "MethodNotAllowed": _oci_error("Method not allowed here, or the registry is read-only."),
            "RequestTimeout": _oci_error("The body stalled or came too slowly; the connection is closed."),
            "TooLarge": _oci_error("Body over the manifest or blob size limit."),
            "RangeNotSatisfiable": _oci_error("A chunk that does not start at the upload's offset."),
            "TooManyRequests": _oci_error("Too many failed logins; try again later."),
            "Unavailable": _oci_error("No etcd quorum: writes are refused."),
            "AdminError": _resp("One sentence in `error`.", content={JSON: {"schema": _ref("schemas", "AdminError")}}),
            "PlainNotFound": _resp("Not found.", content={JSON: {"schema": {"type": "object"}}}),
        },
    }


def document() -> dict:
    """The whole description, as a dict (a new one each call; callers may change it)."""
    return {
        "openapi": "3.0.3",
        "info": {"title": "Moorage", "version": "1.0",
                 "description": "A private OCI registry: the OCI distribution API, its token "
                                "endpoint, health checks and the admin API under /_admin/."},
        "paths": {**_distribution(), **_service(), **_admin()},
        "components": _components(),
    }


@cache
def document_json() -> bytes:
    """The served bytes: built once, the document never changes while a replica runs."""
    return msgspec.json.encode(document())
