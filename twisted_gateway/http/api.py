"""
The gateway's own REST API, served on the bare hostname (Klein).

Every call needs a control-plane token; what it returns is limited to the tasks the token's
``prefixes`` cover.  A list selector must name the tasks it is about (``task`` or
``task_prefix`` in ``include``) and the token must cover them: the API never enumerates the
whole directory for a caller.
"""

from __future__ import annotations

import json
from typing import Any, Callable

from klein import Klein

from twisted_gateway import metrics
from twisted_gateway.directory.interfaces import IShardDirectory
from twisted_gateway.directory.model import Shard, shard_to_dict
from twisted_gateway.http.auth import AuthDecision, TokenVerifier, bearer_token, task_covered
from twisted_gateway.names import shard_server_name

_SELECTOR_KEYS = {"include", "exclude"}
_PSEUDO_LABELS = {"task", "task_prefix"}


class APIError(Exception):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


def _labels(doc: Any, where: str) -> dict[str, str]:
    if doc is None:
        return {}
    if not isinstance(doc, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in doc.items()):
        raise APIError(400, "bad_selector", f"{where} must be an object of string labels")
    return doc


def _matches(shard: Shard, labels: dict[str, str]) -> bool:
    for key, value in labels.items():
        if key == "task":
            if shard.task != value:
                return False
        elif key == "task_prefix":
            if not shard.task.startswith(value):
                return False
        elif shard.labels.get(key) != value:
            return False
    return True


def _matches_any(shard: Shard, labels: dict[str, str]) -> bool:
    for key, value in labels.items():
        if _matches(shard, {key: value}):
            return True
    return False


class GatewayAPI:
    app = Klein()

    def __init__(self, directory: IShardDirectory, verifier: TokenVerifier | None, hostname: str,
                 cors_origin: str | None, openapi: Callable[[], dict[str, Any]]) -> None:
        self.directory = directory
        self.verifier = verifier
        self.hostname = hostname
        self.cors_origin = cors_origin
        self.openapi = openapi

    # -- plumbing ---------------------------------------------------------------------------------

    def _json(self, request: Any, status: int, doc: Any) -> bytes:
        request.setResponseCode(status)
        request.setHeader(b"content-type", b"application/json")
        request.setHeader(b"cache-control", b"no-store")
        self._cors(request)
        metrics.count_request("api", status, request.method)
        return json.dumps(doc, sort_keys=True).encode() + b"\n"

    def _cors(self, request: Any) -> None:
        origin = request.getHeader(b"origin")
        if self.cors_origin and origin and origin.decode("latin-1") == self.cors_origin:
            request.setHeader(b"access-control-allow-origin", origin)
            request.setHeader(b"vary", b"Origin")

    def _claims(self, request: Any) -> dict[str, Any]:
        if self.verifier is None:
            raise APIError(503, "auth_not_configured", "the API needs auth.* to be configured")
        token = bearer_token(request.getHeader(b"authorization"))
        decision = (self.verifier.verify(token) if token else
                    AuthDecision("missing", 401, "a bearer token is required"))
        metrics.AUTH_DECISIONS.labels(outcome=decision.outcome).inc()
        if not decision.allowed:
            raise APIError(decision.status, decision.outcome, decision.message)
        assert decision.claims is not None
        return decision.claims

    def _body(self, request: Any) -> dict[str, Any]:
        ctype = (request.getHeader(b"content-type") or b"").split(b";")[0].strip().lower()
        if ctype != b"application/json":
            raise APIError(415, "unsupported_media_type", "send the request body as application/json")
        request.content.seek(0)
        raw = request.content.read(1024 * 1024 + 1)
        if len(raw) > 1024 * 1024:
            raise APIError(413, "too_large", "the request body exceeds 1 MiB")
        try:
            doc = json.loads(raw or b"{}")
        except ValueError:
            raise APIError(400, "bad_json", "the request body is not valid JSON") from None
        if not isinstance(doc, dict):
            raise APIError(400, "bad_json", "the request body must be a JSON object")
        return doc

    def _handle(self, request: Any, fn: Callable[[Any], Any]) -> bytes:
        try:
            status, doc = fn(request)
        except APIError as e:
            if e.status == 401:
                request.setHeader(b"www-authenticate", b'Bearer realm="twisted-gateway"')
            return self._json(request, e.status, {"error": e.code, "message": e.message})
        return self._json(request, status, doc)

    def _describe(self, shard: Shard) -> dict[str, Any]:
        doc = shard_to_dict(shard)
        doc["names"] = {str(p.port): shard_server_name(shard.hostname_label, p.port, self.hostname,
                                                       (shard.key_begin, shard.rclock_begin))
                        for p in shard.ports}
        return doc

    # -- routes -----------------------------------------------------------------------------------

    @app.route("/v1/shards/list", methods=["POST"])
    def list_shards(self, request: Any) -> bytes:
        def run(request: Any) -> tuple[int, Any]:
            claims = self._claims(request)
            body = self._body(request)
            unknown = set(body) - _SELECTOR_KEYS
            if unknown:
                raise APIError(400, "bad_selector", f"unknown selector key {sorted(unknown)[0]!r}")
            include = _labels(body.get("include"), "include")
            exclude = _labels(body.get("exclude"), "exclude")
            scope = include.get("task") or include.get("task_prefix")
            if not scope:
                raise APIError(400, "unauthorized_selector",
                               "the selector's include must carry an authorizing label: task or task_prefix")
            prefixes = claims["prefixes"]
            if not task_covered(scope, prefixes):
                raise APIError(403, "forbidden", f"the token does not cover {scope}")
            shards = [s for s in self.directory.current().shards
                      if _matches(s, include) and not (exclude and _matches_any(s, exclude))
                      and task_covered(s.task, prefixes)]
            return 200, {"shards": [self._describe(s) for s in shards]}
        return self._handle(request, run)

    @app.route("/v1/shards/stat", methods=["POST"])
    def stat_shard(self, request: Any) -> bytes:
        def run(request: Any) -> tuple[int, Any]:
            claims = self._claims(request)
            body = self._body(request)
            shard_id = body.get("id")
            if not isinstance(shard_id, str) or set(body) != {"id"}:
                raise APIError(400, "bad_request", 'send {"id": "<shard id>"}')
            shard = self.directory.current().shard(shard_id)
            # A shard the token does not cover is reported as absent, not as forbidden, so that
            # ids of other tenants cannot be probed.
            if shard is None or not task_covered(shard.task, claims["prefixes"]):
                raise APIError(404, "not_found", f"no shard {shard_id} visible to this token")
            return 200, {"shard": self._describe(shard)}
        return self._handle(request, run)

    @app.route("/v1/openapi.json", methods=["GET"])
    def openapi_document(self, request: Any) -> bytes:
        return self._json(request, 200, self.openapi())

    @app.route("/v1/shards/list", methods=["OPTIONS"], endpoint="preflight_list")
    @app.route("/v1/shards/stat", methods=["OPTIONS"], endpoint="preflight_stat")
    def preflight(self, request: Any) -> bytes:
        self._cors(request)
        if self.cors_origin:
            request.setHeader(b"access-control-allow-methods", b"GET, POST, OPTIONS")
            request.setHeader(b"access-control-allow-headers", b"authorization, content-type")
            request.setHeader(b"access-control-max-age", b"600")
        request.setResponseCode(204)
        metrics.count_request("api", 204, request.method)
        return b""

    @app.handle_errors(Exception)
    def not_found(self, request: Any, failure: Any) -> bytes:
        from werkzeug.exceptions import MethodNotAllowed, NotFound
        if failure.check(NotFound):
            return self._json(request, 404, {"error": "not_found", "message": "the gateway API has no such route"})
        if failure.check(MethodNotAllowed):
            return self._json(request, 405, {"error": "method_not_allowed", "message": "method not allowed"})
        return self._json(request, 500, {"error": "internal", "message": "internal error"})

    def resource(self) -> Any:
        return self.app.resource()


def openapi_document(hostname: str) -> dict[str, Any]:
    shard_schema = {
        "type": "object",
        "required": ["id", "task", "hostname_label", "address", "ports", "primary"],
        "properties": {
            "id": {"type": "string"}, "task": {"type": "string"},
            "hostname_label": {"type": "string"}, "address": {"type": "string"},
            "labels": {"type": "object", "additionalProperties": {"type": "string"}},
            "key_begin": {"type": "integer"}, "rclock_begin": {"type": "integer"},
            "primary": {"type": "boolean"},
            "ports": {"type": "array", "items": {
                "type": "object", "required": ["port", "protocol", "public"],
                "properties": {"port": {"type": "integer"},
                               "protocol": {"type": "string", "enum": ["tcp", "http/1.1", "h2"]},
                               "public": {"type": "boolean"}, "upstream_port": {"type": "integer"}}}},
            "names": {"type": "object", "additionalProperties": {"type": "string"},
                      "description": "The pinned SNI name of each port."},
        },
    }
    error = {"description": "An error", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}
    labels = {"type": "object", "additionalProperties": {"type": "string"}}
    return {
        "openapi": "3.1.0",
        "info": {"title": "twisted-gateway API", "version": "1",
                 "description": "Shards of the directory visible to a control-plane token."},
        "servers": [{"url": f"https://{hostname}"}],
        "security": [{"bearer": []}],
        "paths": {
            "/v1/shards/list": {"post": {
                "operationId": "listShards",
                "summary": "Shards matching a label selector, limited to the token's prefixes.",
                "requestBody": {"required": True, "content": {"application/json": {"schema": {
                    "type": "object", "additionalProperties": False,
                    "properties": {
                        "include": {**labels, "description": "All must match. Must carry task or task_prefix."},
                        "exclude": {**labels, "description": "Shards matching any of these are left out."},
                    }}}}},
                "responses": {
                    "200": {"description": "The matching shards", "content": {"application/json": {"schema": {
                        "type": "object", "properties": {"shards": {"type": "array", "items": {"$ref": "#/components/schemas/Shard"}}}}}}},
                    "400": error, "401": error, "403": error, "415": error},
            }},
            "/v1/shards/stat": {"post": {
                "operationId": "statShard",
                "summary": "One shard by id, if the token covers its task.",
                "requestBody": {"required": True, "content": {"application/json": {"schema": {
                    "type": "object", "required": ["id"], "additionalProperties": False,
                    "properties": {"id": {"type": "string"}}}}}},
                "responses": {
                    "200": {"description": "The shard", "content": {"application/json": {"schema": {
                        "type": "object", "properties": {"shard": {"$ref": "#/components/schemas/Shard"}}}}}},
                    "400": error, "401": error, "404": error, "415": error},
            }},
        },
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT"}},
            "schemas": {
                "Shard": shard_schema,
                "Error": {"type": "object", "required": ["error", "message"],
                          "properties": {"error": {"type": "string"}, "message": {"type": "string"}}},
            },
        },
    }
