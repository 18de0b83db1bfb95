"""
h2 clients of shard ports: one L{H2FrontConnection} per client connection that negotiated
``h2``, whichever protocol the shard speaks.  Each client stream is read and checked (RFC 9113
8.2-8.3), passes the gate (token, rate limits) exactly as on ``http/1.1`` ports, and is opened
towards the shard only after the whole read it came in has been handled.  On an ``h2`` port it
becomes a stream of the client connection's own h2c connection to the shard
(L{twisted_gateway.http.h2.stream}); on an ``http/1.1`` port an HTTP/1.1 request through the
pool (L{twisted_gateway.http.h2.to_h1}).

The connection also bounds what a client may cost it: a budget of streams reset before their
response (the "rapid reset", CVE-2023-44487), a bound on PING and SETTINGS frames acknowledged
while the client is not reading, and an idle and a stalled-reader timeout.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import h2.errors
import h2.events
import h2.exceptions
from hpack.struct import NeverIndexedHeaderTuple
from twisted.internet.interfaces import IDelayedCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from twisted_gateway import metrics
from twisted_gateway.directory.model import Route
from twisted_gateway.http.context import HTTPRouteContext
from twisted_gateway.http.errors import render_error
from twisted_gateway.http.framing import authority_host, h2_field_problem, h2_target_problem
from twisted_gateway.http.h2.fields import (
    COMMON_METHODS, CONNECTION_FIELDS, REQUEST_PSEUDO, field_name_ok, field_value_ok, origin_path_ok,
    trailers_problem,
)
from twisted_gateway.http.h2.flow import (
    H2Peer, Pipe, new_connection, protocol_error_kind,
)
from twisted_gateway.http.h2.shard import ShardConnection
from twisted_gateway.http.h2.stream import ClientStream, ShardStream
from twisted_gateway.http.h2.to_h1 import H1StreamExchange
from twisted_gateway.http.policy import (
    Answer, RequestState, access_log, gate, header_value_ok, request_token, strip_cookie,
)
from twisted_gateway.http.upstream import IUpstream
from twisted_gateway.limits import TokenBucket

# gRPC status codes (grpc/doc/statuscodes.md) for the errors the gateway answers itself.
_GRPC_STATUS = {400: 13, 401: 16, 403: 7, 404: 12, 413: 8, 429: 8, 502: 14, 503: 14, 504: 4}


class H2FrontConnection(H2Peer):
    """An h2 client connection to an ``h2`` shard port, proxied stream by stream."""

    log = Logger()

    def __init__(self, route: Route, ctx: HTTPRouteContext, max_header_bytes: int, idle_timeout: float,
                 server_name: str | None = None, pool: IUpstream | None = None) -> None:
        super().__init__()
        self.route = route
        self.ctx = ctx
        self.reactor = ctx.reactor
        self.max_header_bytes = max_header_bytes
        self.idle_timeout = idle_timeout
        self.server_name = (server_name or "").lower().rstrip(".").encode()
        self.pool = pool
        """The upstream of an ``http/1.1`` port (the HTTP/1.1 pool); None: the shard speaks h2c."""
        limits = ctx.limits
        self.resets = TokenBucket(float(limits.h2_reset_rate), float(limits.h2_reset_burst), self.reactor.seconds)
        self.max_pending_control = limits.h2_max_pending_control
        self.pending_control = 0
        self.to_open: list[tuple[ClientStream, Callable[[], None]]] = []
        self.exchanges: dict[int, ClientStream] = {}
        self.shard: ShardConnection | None = None
        self.shards: set[ShardConnection] = set()
        self.replay_held = 0
        """Bytes of request bodies kept for replay, over all streams (L{REPLAY_CONNECTION_LIMIT})."""
        self.closing = False
        self._last_authority: bytes | None = None
        self._peer_ip: str | None = None
        self._flush_call: IDelayedCall | None = None
        self._last_host: bytes | None = None
        self._idle: IDelayedCall | None = None
        self._stall: IDelayedCall | None = None
        self.lost = False

    # -- connection ------------------------------------------------------------------------------

    def connectionMade(self) -> None:
        metrics.count_route(self.route, connections=1)
        self.h2 = new_connection(client_side=False, max_header_bytes=self.max_header_bytes)
        assert self.transport is not None
        self.transport.registerProducer(self, True)
        self.flush()
        self._arm_idle()

    def dataReceived(self, data: bytes) -> None:
        try:
            events = self.h2.receive_data(data)
        except h2.exceptions.ProtocolError as e:
            metrics.HTTP2_PROTOCOL_ERRORS.labels(peer="client").inc()
            self.log.info("h2 client {client} broke the protocol: {error}", client=self._client_ip(),
                          error=protocol_error_kind(e))
            self.flush()  # the GOAWAY h2 prepared
            assert self.transport is not None  # it is connected while it reads
            self.transport.loseConnection()
            return
        for event in events:
            if self.transport is None:
                return
            if isinstance(event, h2.events.RequestReceived):
                self._request(event.stream_id, event.headers, event.stream_ended is not None)
            elif isinstance(event, h2.events.DataReceived):
                exchange = self.exchanges.get(event.stream_id)
                if exchange is not None:
                    exchange.client_data(event.data, event.flow_controlled_length)
                else:
                    self.ack(event.stream_id, event.flow_controlled_length)
            elif isinstance(event, h2.events.StreamEnded):
                exchange = self.exchanges.get(event.stream_id)
                if exchange is not None:
                    exchange.client_ended()
            elif isinstance(event, h2.events.TrailersReceived):
                exchange = self.exchanges.get(event.stream_id)
                if exchange is not None:
                    trailers = list(event.headers)
                    if trailers_problem(trailers) is None:
                        exchange.client_ended(trailers)
                    else:
                        # RFC 9113 8.1.1: malformed, a stream error; never sent on.
                        metrics.HTTP_REJECTED.labels(reason="bad_request").inc()
                        self.reset(event.stream_id, h2.errors.ErrorCodes.PROTOCOL_ERROR)
                        exchange.client_reset()
            elif isinstance(event, h2.events.StreamReset):
                exchange = self.exchanges.get(event.stream_id)
                if exchange is not None:
                    premature = not exchange.response_ended
                    exchange.client_reset()
                    if premature and not self._take_reset():
                        self._calm_down("rapid_reset")
                        return
            elif isinstance(event, h2.events.WindowUpdated):
                self.pump_stream(event.stream_id)
            elif isinstance(event, h2.events.RemoteSettingsChanged):
                self.pump_all()
                if not self._count_control():
                    return
            elif isinstance(event, h2.events.PingReceived):
                if not self._count_control():
                    return
            elif isinstance(event, h2.events.ConnectionTerminated):
                self.closing = True
                if not self.exchanges:
                    self.flush()
                    self.transport.loseConnection()
        # Streams are opened towards the shard only after the whole read was handled, so a
        # stream the client reset in the same read never reaches the shard (CVE-2023-44487).
        to_open, self.to_open = self.to_open, []
        for exchange, open_ in to_open:
            if not exchange.finished:
                open_()
        self.flush_both()

    def flush_later(self) -> None:
        """
        What a shard's answer prepared for this client goes out once the reactor has handled
        every socket of its current pass (C{callLater(0)} runs right after), so the answers
        that several shard connections of one client bring in one pass share one TLS record
        and one send.  A reactor that is not running (a test's clock) gets the write at once.
        """
        if self._flush_call is not None or self.transport is None:
            return
        if not getattr(self.reactor, "running", False):
            self.flush()
            return
        self._flush_call = self.reactor.callLater(0, self._flush_now)

    def _flush_now(self) -> None:
        self._flush_call = None
        self.flush()

    def _take_reset(self) -> bool:
        """Spend one reset of the client's budget; False when none is left."""
        return self.resets.take()

    def _count_control(self) -> bool:
        """A PING or SETTINGS that h2 acknowledges: bounded while the client reads nothing."""
        if not self.write_paused:
            return True
        self.pending_control += 1
        if self.pending_control > self.max_pending_control:
            self._calm_down("control_flood")
            return False
        return True

    def _calm_down(self, kind: str) -> None:
        """GOAWAY ENHANCE_YOUR_CALM and close: the client abuses the protocol."""
        metrics.H2_ABUSE.labels(kind=kind).inc()
        self.log.info("h2 client {client} closed: {kind}", client=self._client_ip(), kind=kind)
        self.to_open = []
        try:
            self.h2.close_connection(error_code=h2.errors.ErrorCodes.ENHANCE_YOUR_CALM)
            self.flush()
        except h2.exceptions.ProtocolError:
            pass
        assert self.transport is not None  # called from dataReceived
        if kind == "control_flood":
            self.transport.abortConnection()  # it does not read: nothing more would go out
        else:
            self.transport.loseConnection()
        for exchange in list(self.exchanges.values()):
            exchange.client_reset()

    def resumeProducing(self) -> None:
        self.pending_control = 0
        if self._stall is not None and self._stall.active():
            self._stall.cancel()
        self._stall = None
        super().resumeProducing()

    def pauseProducing(self) -> None:
        super().pauseProducing()
        if self._stall is None and self.transport is not None:
            self._stall = self.reactor.callLater(self.idle_timeout, self._stalled)

    def _stalled(self) -> None:
        """The client has read nothing for limits.http_idle_timeout: let its streams go."""
        self._stall = None
        if self.transport is not None:
            self.log.info("h2 client {client} stopped reading: closing", client=self._client_ip())
            self.transport.abortConnection()

    def connectionLost(self, reason: Failure | None = None) -> None:
        self.lost = True
        self._cancel_idle()
        if self._flush_call is not None:
            if self._flush_call.active():
                self._flush_call.cancel()
            self._flush_call = None
        if self._stall is not None and self._stall.active():
            self._stall.cancel()
        for exchange in list(self.exchanges.values()):
            exchange.client_reset()
        for shard in list(self.shards):
            shard.close()
        self.shards.clear()
        self.shard = None
        self.transport = None

    def drain(self) -> None:
        """The gateway is stopping: GOAWAY, then close once the open streams have finished."""
        if self.transport is None or self.closing:
            return
        self.closing = True
        self.h2.close_connection()
        self.flush()
        if not self.exchanges:
            self.transport.loseConnection()

    def _arm_idle(self) -> None:
        self._cancel_idle()
        if self.idle_timeout and not self.exchanges and not self.lost:
            self._idle = self.reactor.callLater(self.idle_timeout, self.drain)

    def _cancel_idle(self) -> None:
        if self._idle is not None and self._idle.active():
            self._idle.cancel()
        self._idle = None

    # -- requests ----------------------------------------------------------------------------------

    def _request(self, stream_id: int, headers: list[tuple[bytes, bytes]], ended: bool) -> None:
        self._cancel_idle()
        private = not self.route.port.public
        pseudo: dict[bytes, bytes] = {}
        regular: list[tuple[bytes, bytes]] = []
        authorization = accept = content_type = content_length = None
        hosts: list[bytes] = []
        cookies: list[bytes] = []
        forwarded_for: list[bytes] = []
        forwarded: list[bytes] = []
        problem: str | None = None
        regular_seen = False
        for field in headers:
            name, value = field[0], field[1]
            if name[:1] == b":":
                # RFC 9113 8.3: the request pseudo-fields, each once, before every other field.
                if regular_seen or name not in REQUEST_PSEUDO or name in pseudo:
                    problem = problem or "a misplaced, repeated or unknown pseudo-field"
                pseudo[name] = value
                continue
            regular_seen = True
            if problem is None and (field_name_ok(name) is None or field_value_ok(value) is None):
                problem = h2_field_problem(name, value) or "a field name or value h2 forbids (RFC 9113 8.2.1)"
            if name in CONNECTION_FIELDS or (name == b"te" and value != b"trailers"):
                problem = problem or "a connection-specific field (RFC 9113 8.2.2)"
            if name == b"authorization":
                authorization = value
                if private:
                    continue  # the token never reaches the shard
            elif name == b"cookie":
                cookies.append(value)
                if private:
                    value = strip_cookie(value, self.ctx.cookie_name)
                    if not value:
                        continue
            elif name == b"accept":
                accept = value
            elif name == b"content-type":
                content_type = value
            elif name == b"x-forwarded-for":
                forwarded_for.append(value)
                continue
            elif name == b"forwarded":
                forwarded.append(value)
                continue
            elif name == b"host":
                hosts.append(value)
                continue
            elif name in (b"x-forwarded-proto", b"x-forwarded-host", b"http2-settings") or name.startswith(b"proxy-"):
                continue
            elif name == b"expect" and self.pool is not None:
                continue
            elif name == b"content-length":
                content_length = value
                if self.pool is not None:
                    continue  # the HTTP/1.1 upstream writes its own framing
            elif name in (b"te", b"trailer") and self.pool is not None:
                continue  # hop-by-hop on an HTTP/1.1 hop ("te: trailers" means nothing there)
            # The field itself goes on: one the client sent never-indexed stays so (RFC 7541
            # 7.1.3; hpack_out keeps the representation), a stripped cookie included.
            if value is field[1]:
                regular.append(field)
            elif isinstance(field, NeverIndexedHeaderTuple):
                regular.append(NeverIndexedHeaderTuple(name, value))
            else:
                regular.append((name, value))
        method = pseudo.get(b":method")
        path = pseudo.get(b":path")
        authority = pseudo.get(b":authority", b"")
        if method is None or (method != b"CONNECT" and (path is None or b":scheme" not in pseudo)):
            problem = problem or "a required pseudo-field is missing (RFC 9113 8.3.1)"
            method, path = method or b"GET", path or b"/"
        elif path is None:
            path = b""
        if problem is None and not (method in COMMON_METHODS and origin_path_ok(path) is not None):
            problem = h2_target_problem(method, path)
        if problem is None and pseudo.get(b":scheme", b"https") not in (b"https", b"http"):
            problem = ":scheme is not https"
        if problem is None and len(hosts) > 1:
            problem = "more than one host field"
        if problem is None and hosts and authority and hosts[0] != authority:
            problem = "host differs from :authority"
        if problem is not None:
            # RFC 9113 8.1.1: a malformed request is a stream error, never a request upstream.
            metrics.HTTP_REJECTED.labels(reason="bad_request").inc()
            self.log.info("h2 request from {client} refused: {problem}", client=self._client_ip(), problem=problem)
            self.reset(stream_id, h2.errors.ErrorCodes.PROTOCOL_ERROR)
            if not self.exchanges:
                self._arm_idle()  # a refused stream is no activity
            return
        authority = authority or (hosts[0] if hosts else b"")
        declared = int(content_length) if content_length is not None and content_length.isdigit() else None
        request = RequestState(
            method, path, authority, "2", self._client_ip(),
            token=request_token(authorization, cookies, self.ctx.cookie_name) if private else None,
            accept=accept, declared_length=declared, grpc=(content_type or b"").startswith(b"application/grpc"),
            forwarded_for=tuple(forwarded_for), forwarded=tuple(forwarded))
        self._start(stream_id, request, pseudo.get(b":scheme", b"https"), regular, ended)

    def _start(self, stream_id: int, request: RequestState, scheme: bytes, regular: list[tuple[bytes, bytes]],
               ended: bool) -> None:
        """A well-formed request: answered here (its authority, CONNECT, the gate), or queued to
        be sent to the shard once the whole read it came in has been handled."""
        method, path, authority = request.method, request.target, request.authority
        exchange: ClientStream
        if self.pool is None:
            exchange = shard_stream = ShardStream(self, stream_id, request)
        else:
            exchange = h1_stream = H1StreamExchange(self, stream_id, request, self.pool)
        self.exchanges[stream_id] = exchange
        # A connection's requests name one authority, nearly always: its host is worked out once.
        if authority == self._last_authority:
            host = self._last_host
        else:
            host = authority_host(authority)
            self._last_authority, self._last_host = authority, host
        if host is None or (self.server_name and host != self.server_name):
            metrics.HTTP_REJECTED.labels(reason="misdirected" if host else "bad_request").inc()
            self.answer(exchange, Answer(421 if host else 400, (), (
                "misdirected" if host else "bad_request",
                ":authority names another host than the TLS name" if host else "no valid :authority")))
            return
        if method == b"CONNECT":
            self.answer(exchange, Answer(405, ((b"allow", b"GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS"),),
                                         ("method_not_allowed", "CONNECT is not proxied to shards")))
            return
        verdict = gate(self.ctx, self.route, request)
        if isinstance(verdict, Answer):
            self.answer(exchange, verdict)
            return
        if self.pool is not None:
            fields = [(b"host", authority)] + regular + list(verdict.forwarding)
            opener = functools.partial(h1_stream.begin, fields, request.declared_length, ended)
            self.to_open.append((exchange, opener))
            return
        out = [(b":method", method), (b":scheme", scheme), (b":authority", authority), (b":path", path)]
        out += regular
        out += verdict.forwarding
        shard_stream.headers_only = ended
        shard_stream.request_headers = out

        def open_on_shard() -> None:
            shard = self.shard_connection()
            shard_stream.shard = shard
            shard.open(shard_stream, out, end_stream=ended)
        self.to_open.append((exchange, open_on_shard))

    def _client_ip(self) -> str:
        # The peer of a connection does not change (with the PROXY protocol, the transport gives
        # the address its header named from the start): looked up once.
        if self._peer_ip is None:
            if self.transport is None:
                return "?"
            self._peer_ip = str(getattr(self.transport.getPeer(), "host", "?"))
        return self._peer_ip

    def shard_connection(self) -> ShardConnection:
        """The connection new streams go to (a new one once the last is going away)."""
        if self.shard is None or not self.shard.usable:
            route = self.route
            self.shard = ShardConnection(self.reactor, route.shard.address, route.port.target_port,
                                         self.ctx.connect_timeout, self._shard_lost)
            self.shard.partner = self
            self.shards.add(self.shard)
        return self.shard

    def _shard_lost(self, shard: ShardConnection) -> None:
        self.shards.discard(shard)
        if self.shard is shard:
            self.shard = None
        if self.transport is not None:
            self.flush()

    def flush_both(self) -> None:
        # Besides the current shard connection, one that is going away may still be finishing
        # streams, and acknowledgements for those are due too.
        self.flush()
        for shard in list(self.shards):
            shard.flush()

    # -- answers -----------------------------------------------------------------------------------

    def answer(self, exchange: ClientStream, answer: Answer) -> None:
        """Answer a stream without the shard: a refusal, a redirect or an upstream failure."""
        if exchange.finished or self.transport is None:
            return
        exchange.response_started = True
        exchange.request.status = answer.status
        metrics.count_request("proxy", answer.status, exchange.request.method)
        sid = exchange.client_id
        # No field value the gateway writes holds CR, LF or another control byte.
        headers = [(b":status", str(answer.status).encode())] + [
            (name, value) for name, value in answer.headers if header_value_ok(value)]
        body = b""
        if exchange.request.grpc and answer.error is not None:
            # A gRPC client reads the outcome from grpc-status, in a trailers-only response.
            code, message = answer.error
            headers = [(b":status", b"200"), (b"content-type", b"application/grpc"),
                       (b"grpc-status", str(_GRPC_STATUS.get(answer.status, 2)).encode()),
                       (b"grpc-message", _grpc_message(f"{message} ({code})"))]
        elif answer.error is not None:
            metrics.HTTP_ERROR_PAGES.labels(code=str(answer.status)).inc()
            content_type, body = render_error(answer.status, answer.error[0], answer.error[1], exchange.request.accept)
            headers += [(b"content-type", content_type), (b"content-length", str(len(body)).encode()),
                        (b"cache-control", b"no-store")]
        else:
            headers.append((b"content-length", b"0"))
        try:
            self.h2.send_headers(sid, headers, end_stream=not body)
            if body:
                pipe = Pipe(self, sid, lambda size: None)
                pipe.push(body, len(body))
                pipe.finish()
        except h2.exceptions.ProtocolError:
            pass
        exchange.response_ended = True
        if not exchange.request_ended:
            self.after_response(exchange)
        exchange._done("answered")

    def reset(self, stream_id: int, code: Any) -> None:
        if self.transport is None:
            return
        try:
            self.h2.reset_stream(stream_id, code)
        except h2.exceptions.ProtocolError:
            pass

    def after_response(self, exchange: ClientStream) -> None:
        """The response is complete but the client is still sending: stop it (NO_ERROR)."""
        sid = exchange.client_id
        pipe = self.pipes.get(sid)
        if pipe is None:
            self.reset(sid, h2.errors.ErrorCodes.NO_ERROR)
        else:
            pipe.on_done = lambda: self.reset(sid, h2.errors.ErrorCodes.NO_ERROR)

    def exchange_done(self, exchange: ClientStream, outcome: str) -> None:
        self.exchanges.pop(exchange.client_id, None)
        access_log(self.log, self.ctx, self.route, exchange.request, outcome, exchange.received)
        if not self.exchanges:
            if self.closing and self.transport is not None:
                self.flush()
                if not self.pipes:
                    self.transport.loseConnection()
            else:
                self._arm_idle()


def _grpc_message(text: str) -> bytes:
    """Percent-encode a grpc-message value (gRPC over HTTP/2, "Responses")."""
    out = bytearray()
    for byte in text.encode("utf-8"):
        if 0x20 <= byte <= 0x7E and byte != 0x25:
            out.append(byte)
        else:
            out += b"%%%02X" % byte
    return bytes(out)



__all__ = ["H2FrontConnection"]
