"""
The gateway's own REST API, served on the bare hostname (Klein), and the twisted.web site that
serves it (L{api_site}).

Every call needs a control-plane token; what it returns is limited to the tasks the token's
``prefixes`` cover.  A list selector must name the tasks it is about (``task`` or
``task_prefix`` in ``include``) and the token must cover them: the API never enumerates the
whole directory for a caller.

A request body is only read once the request head has shown a valid token and a declared
length within the limit (L{APIRequest}): an anonymous client cannot make the gateway receive,
buffer or spool a body at all.
"""

from __future__ import annotations

import io
import json
from typing import Any, Callable

from klein import Klein
from twisted.web import http
from twisted.web.server import Request, Site

from twisted_gateway import metrics
from twisted_gateway._compat import h2_stream_forgotten, http11_request_line
from twisted_gateway.directory.interfaces import IShardDirectory
from twisted_gateway.directory.model import Shard, shard_to_dict
from twisted_gateway.http.auth import AuthDecision, TokenVerifier, bearer_token, task_covered
from twisted_gateway.names import shard_server_name

_SELECTOR_KEYS = {"include", "exclude"}
_PSEUDO_LABELS = {"task", "task_prefix"}
DEFAULT_MAX_BODY_BYTES = 1024 * 1024
"""The body limit of a request not served through L{api_site} (limits.api_max_body_bytes)."""


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

    def claims_for(self, authorization: bytes | None) -> dict[str, Any]:
        """The claims of the token in an C{Authorization} value; raise L{APIError} if it is
        missing or not valid (or auth is not configured)."""
        if self.verifier is None:
            raise APIError(503, "auth_not_configured", "the API needs auth.* to be configured")
        token = bearer_token(authorization)
        decision = (self.verifier.verify(token) if token else
                    AuthDecision("missing", 401, "a bearer token is required"))
        metrics.AUTH_DECISIONS.labels(outcome=decision.outcome).inc()
        if not decision.allowed:
            raise APIError(decision.status, decision.outcome, decision.message)
        assert decision.claims is not None
        return decision.claims

    def _claims(self, request: Any) -> dict[str, Any]:
        # An APIRequest that carried a body had its token checked from the head already.
        claims = getattr(request, "head_claims", None)
        if claims is not None:
            return claims
        return self.claims_for(request.getHeader(b"authorization"))

    def _body(self, request: Any) -> dict[str, Any]:
        ctype = (request.getHeader(b"content-type") or b"").split(b";")[0].strip().lower()
        if ctype != b"application/json":
            raise APIError(415, "unsupported_media_type", "send the request body as application/json")
        limit = getattr(request, "body_limit", DEFAULT_MAX_BODY_BYTES)
        request.content.seek(0)
        raw = request.content.read(limit + 1)
        if len(raw) > limit:
            raise too_large(limit)
        try:
            doc = json.loads(raw or b"{}")
        except ValueError:
            raise APIError(400, "bad_json", "the request body is not valid JSON") from None
        if not isinstance(doc, dict):
            raise APIError(400, "bad_json", "the request body must be a JSON object")
        return doc

    def error(self, request: Any, error: APIError) -> bytes:
        """Set the status and headers of C{error} on C{request} and return its JSON body."""
        if error.status == 401:
            request.setHeader(b"www-authenticate", b'Bearer realm="twisted-gateway"')
        return self._json(request, error.status, {"error": error.code, "message": error.message})

    def _handle(self, request: Any, fn: Callable[[Any], Any]) -> bytes:
        try:
            status, doc = fn(request)
        except APIError as e:
            return self.error(request, e)
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


def _size(limit: int) -> str:
    for unit, name in ((1024 * 1024, "MiB"), (1024, "KiB")):
        if limit >= unit and limit % unit == 0:
            return f"{limit // unit} {name}"
    return f"{limit} bytes"


def too_large(limit: int) -> APIError:
    return APIError(413, "too_large", f"the request body exceeds {_size(limit)}")


class APIRequest(Request):
    """
    A request of the REST API that is judged on its head, before its body is read.

    twisted.web reads (and past 100 kB spools to a temporary file) the whole body before the
    resource sees the request.  Here the two hooks the channel calls on the way are used
    instead: C{gotLength} (once the head is parsed, with the declared length: RFC 9112 section
    6.3) and C{handleContentChunk} (each piece of the body as it is decoded).  A request that
    carries a body needs a valid token to be read at all (every route that reads a body needs
    one, and no route reads the body of any other request), and the body may not exceed the
    site's C{max_body_bytes}.  A refused request is answered at once, in the API's JSON error
    format, and its body is never kept: HTTP/1.1 is refused before a byte of the body is read
    and the connection is closed (RFC 9112 section 9.6); h2 is judged on its first DATA frame
    (its header block may give content-length before authorization) and the stream is reset
    with NO_ERROR once the answer is out (RFC 9113 section 8.1), so at most the client's first
    flow-control window (64 KiB) arrives and is dropped.
    """

    head_claims: dict[str, Any] | None = None
    """The claims of the token, when it was checked from the head (see L{GatewayAPI._claims})."""

    def __init__(self, channel: Any, *args: Any, **kwargs: Any) -> None:
        # The API reads JSON only: never parse a form body into request.args.
        kwargs.setdefault("parsePOSTFormSubmission", False)
        super().__init__(channel, *args, **kwargs)
        site = channel.site
        self.api: GatewayAPI = site.api
        self.body_limit: int = site.max_body_bytes
        self._declared: int | None = None
        self._received = 0
        self._judged = False
        self._answered = False
        self._deferred_refusal: APIError | None = None
        self._buffer = io.BytesIO()

    # -- the channel's hooks ----------------------------------------------------------------------

    def gotLength(self, length: int | None) -> None:
        # Never a temporary file: a body is at most body_limit bytes.
        self._buffer = io.BytesIO()
        self.content = self._buffer
        self._declared = length
        if isinstance(self.channel, http.HTTPChannel):
            # HTTP/1.1 calls this once all header fields are in (HTTPChannel.allHeadersReceived):
            # chunked (None) or a positive Content-Length means a body follows.  The h2 stream
            # calls it when it meets content-length, maybe before later fields (such as
            # authorization), so h2 is judged on the first DATA frame or at the end of stream.
            self._judge(carries_body=length is None or length > 0, ended=False)

    def handleContentChunk(self, data: bytes) -> None:
        if self._answered or self._deferred_refusal is not None:
            return  # refused: what still arrives is dropped, never kept
        if not self._judged:
            self._judge(carries_body=True, ended=False)
            if self._answered or self._deferred_refusal is not None:
                return
        self._received += len(data)
        if self._received > self.body_limit:
            # A chunked (or h2) body that declared no length, or more than it declared.
            self._refuse(too_large(self.body_limit), ended=False)
            return
        self._buffer.write(data)

    def requestReceived(self, command: bytes, path: bytes, version: bytes) -> None:
        # The whole request is in (for h2: the client ended the stream).
        if self._answered:
            return
        if self._deferred_refusal is not None:
            self._refuse(self._deferred_refusal, ended=True)
            return
        if not self._judged:
            self._judge(carries_body=self._received > 0, ended=True)
            if self._answered:
                return
        super().requestReceived(command, path, version)

    # -- judging and answering ------------------------------------------------------------------

    def _judge(self, carries_body: bool, ended: bool) -> None:
        self._judged = True
        if carries_body:
            # The token before the size: an anonymous client learns nothing about limits.
            try:
                self.head_claims = self.api.claims_for(self.getHeader(b"authorization"))
            except APIError as e:
                self._refuse(e, ended)
                return
        if self._declared is not None and self._declared > self.body_limit:
            self._refuse(too_large(self.body_limit), ended)

    def _learn_request_line(self) -> None:
        # requestReceived sets these from the same values once the body is in; an answer given
        # before that needs them now (the status line's version, HEAD, the metrics' method).
        channel = self.channel
        if isinstance(channel, http.HTTPChannel):
            # Without the channel's record of the request line (see _compat), answer as
            # HTTP/1.1 (which any 1.x client reads; the connection closes after it) to a POST,
            # the only method whose body the API reads.
            self.method, self.uri, self.clientproto = (
                http11_request_line(channel) or (b"POST", b"/", b"HTTP/1.1"))
        else:
            self.method, self.uri, self.clientproto = channel.command, channel.path, b"HTTP/2"
        self.path = self.uri.split(b"?", 1)[0]

    def _refuse(self, error: APIError, ended: bool) -> None:
        """Answer C{error} now; C{ended}: the whole request has arrived."""
        channel = self.channel
        h2_stream = not isinstance(channel, http.HTTPChannel)
        if h2_stream and not ended:
            # Before the end of an h2 stream, answer only if the stream can be reset right
            # after the answer; else the client's later DATA frames would arrive for a stream
            # twisted has forgotten.  Without that hook the body is dropped as it comes and the
            # answer waits for the end of the stream.
            if not _reset_stream_after_response(channel):
                self._deferred_refusal = error
                return
        self._answered = True
        self._deferred_refusal = None
        self._learn_request_line()
        body = self.api.error(self, error)
        self.setHeader(b"content-length", str(len(body)).encode())
        self.setHeader(b"date", http.datetimeToString())
        # A final answer instead of 100 Continue (RFC 9110 section 10.1.1): the channel must not
        # send 100 Continue after it.
        self.requestHeaders.removeHeader(b"expect")
        if not h2_stream:
            channel.persistent = False
            self.setHeader(b"connection", b"close")
        self.write(body)
        self.finish()
        if not h2_stream:
            _stop_reading(channel)


def _stop_reading(channel: http.HTTPChannel) -> None:
    """
    After an HTTP/1.1 answer that closes the connection: drop whatever else arrives.

    The channel would go on decoding the rest of the body (the TLS connection hands over what
    it has already decrypted) and, at its end, look for the request it has just let go; as
    twisted.web does itself for data after a non-persistent request (HTTPChannel.lineReceived),
    the channel's input is replaced by nothing.
    """
    def drop(*args: Any) -> None:
        return None
    # Replacing the channel's methods on the instance is the point (mypy flags method-assign).
    channel.dataReceived = drop  # type: ignore[method-assign]
    channel.rawDataReceived = drop  # type: ignore[method-assign,assignment]
    channel.lineReceived = drop  # type: ignore[method-assign]
    channel.allContentReceived = drop  # type: ignore[method-assign]


def _reset_stream_after_response(stream: Any) -> bool:
    """
    Arrange for an h2 stream to be reset with NO_ERROR as soon as the end of its response has
    been sent (RFC 9113 section 8.1: the client then stops sending the request body); False if
    twisted's h2 connection offers no place to hook it.

    twisted sends a response's frames over later reactor turns and forgets the stream once the
    last is out (L{h2_stream_forgotten}: the stream's cleanup Deferred): the reset must come
    right then, before any further DATA frame of the client is processed.
    """
    found = h2_stream_forgotten(stream)
    if found is None:
        return False
    connection, forgotten = found
    stream_id = stream.streamID

    def reset(result: Any) -> Any:
        from h2.errors import ErrorCodes
        from h2.exceptions import ProtocolError
        try:
            connection.conn.reset_stream(stream_id, error_code=ErrorCodes.NO_ERROR)
        except ProtocolError:
            return result  # the client ended the stream meanwhile: nothing to stop
        transport = connection.transport
        if transport is not None:
            transport.write(connection.conn.data_to_send())
        return result
    forgotten.addCallback(reset)
    return True


class APISite(Site):
    """The REST API's site: requests are L{APIRequest}s, nothing is logged per request by
    twisted.web and no traceback is shown (as L{twisted_gateway.http.errors.quiet_site})."""

    requestFactory = APIRequest
    displayTracebacks = False
    noisy = False

    def __init__(self, api: GatewayAPI, max_body_bytes: int) -> None:
        super().__init__(api.resource())
        self.api = api
        self.max_body_bytes = max_body_bytes
        """The largest request body read; may be changed in place (a reload)."""

    def log(self, request: Any) -> None:
        return None


def api_site(api: GatewayAPI, max_body_bytes: int) -> APISite:
    """The twisted.web site serving C{api}: a request body is read only after the head showed a
    valid token, and at most C{max_body_bytes} of it (limits.api_max_body_bytes; then 413)."""
    if max_body_bytes <= 0:
        raise ValueError("max_body_bytes must be positive")
    return APISite(api, max_body_bytes)


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
                    "400": error, "401": error, "403": error, "413": error, "415": error},
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
                    "400": error, "401": error, "404": error, "413": error, "415": error},
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
