"""
The one interface the front ends send proxied requests through (L{IUpstream}), implemented by
the HTTP/1.1 keep-alive pool (L{twisted_gateway.http.h1.pool.UpstreamPool}) and by the h2c
bridge of an HTTP/1.1 client of an ``h2`` port (L{twisted_gateway.http.h2.h1bridge.H2Upstream}),
and what crosses it: the response (L{IUpstreamResponse}), its header fields (L{RawHeaders}) and
the failure of a response that broke HTTP (L{BadResponse}).
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred
from zope.interface import Attribute, Interface


class IUpstream(Interface):
    """Where a front end sends a proxied request: an HTTP/1.1 pool or an h2c connection."""

    tunnels = Attribute("Whether a websocket upgrade (C{upgrade=True}) can be sent: a 101 answer "
                        "then hands over the connection (L{IUpstreamResponse})")

    def request(address: str, port: int, method: bytes, path: bytes,
                headers: list[tuple[bytes, bytes]], body: Any = None,
                upgrade: bool = False) -> Deferred[IUpstreamResponse]:
        """
        Send a request whose C{headers} carry no framing field (the upstream adds its own from
        C{body}: None for no body, else an IBodyProducer whose C{length} is a number or
        UNKNOWN_LENGTH).  Fires with an L{IUpstreamResponse}; errbacks with ConnectError,
        ResponseNeverReceived or L{BadResponse}; cancelling it lets go of the request.
        C{upgrade} asks the shard to switch to the websocket protocol, only where C{tunnels}.
        """


class IUpstreamResponse(Interface):
    """A shard's response as an upstream gives it (the part of Agent's IResponse the fronts use)."""

    code = Attribute("The status code")
    phrase = Attribute("The reason phrase (bytes, possibly empty)")
    headers = Attribute("The header fields (L{RawHeaders})")
    length = Attribute("The body's length when the shard declared one, else UNKNOWN_LENGTH")

    def deliverBody(protocol: Any) -> None:
        """
        Stream the body into C{protocol} (C{makeConnection} with a transport whose
        pause/resume/stopProducing reach the shard, C{dataReceived}, then C{connectionLost}
        with ResponseDone, or ResponseFailed when the shard broke off).  After a 101 the
        response also has C{take_tunnel(protocol)}, which hands the connection over.
        """


class BadResponse(Exception):
    """The shard's response broke HTTP/1.1; C{reason} is the metric label."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


class RawHeaders:
    """
    Response header fields as the shard sent them, in order (C{pairs}), and by lower-case
    name when first asked for one: a response's fields are appended to C{pairs} as they are
    parsed, and most are only passed on, so the index is built once, after the last.
    """

    __slots__ = ("_fields", "_indexed", "pairs")

    def __init__(self) -> None:
        self._fields: dict[bytes, list[bytes]] = {}
        self._indexed = 0
        self.pairs: list[tuple[bytes, bytes]] = []
        """The fields in order; appending to it is adding a field."""

    def addRawHeader(self, name: bytes, value: bytes) -> None:
        self.pairs.append((name, value))

    def _index(self) -> dict[bytes, list[bytes]]:
        pairs, fields = self.pairs, self._fields
        if self._indexed != len(pairs):
            for name, value in pairs[self._indexed:]:
                name = name.lower()
                values = fields.get(name)
                if values is None:
                    fields[name] = [value]
                else:
                    values.append(value)
            self._indexed = len(pairs)
        return fields

    def getRawHeaders(self, name: bytes, default: Any = None) -> Any:
        return self._index().get(name.lower(), default)

    def hasHeader(self, name: bytes) -> bool:
        return name.lower() in self._index()

    def getAllRawHeaders(self) -> Any:
        return self._index().items()


__all__ = ["BadResponse", "IUpstream", "IUpstreamResponse", "RawHeaders"]
