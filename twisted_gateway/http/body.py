"""
The bodies of a request in flight through an upstream (L{twisted_gateway.http.upstream.IUpstream}):
the request body passed on as it arrives from the client, holding only a bounded amount while
the upstream connection is being set up (L{StreamingBody}); the response body on its way to the
client (L{ResponseRelay}, which each front end completes); and letting go of both (L{abandon}).
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IPushProducer
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone
from twisted.web.iweb import UNKNOWN_LENGTH, IBodyProducer
from zope.interface import implementer


@implementer(IBodyProducer)
class StreamingBody:
    """
    A request body passed to the shard as it arrives.  Until the upstream connection takes it
    (startProducing), at most C{_HOLD} bytes are held and the client is paused beyond that;
    afterwards the upstream transport's flow control pauses the client directly.
    """

    _HOLD = 256 * 1024

    def __init__(self, length: int | None, pause: Any, resume: Any) -> None:
        self.length = UNKNOWN_LENGTH if length is None else length
        self._pause, self._resume = pause, resume
        self._consumer: Any = None
        self._held: list[bytes] = []
        self._held_bytes = 0
        self._paused = False
        self._finished = False
        self._discarding = False
        self._done: Deferred[None] | None = None

    def write(self, data: bytes) -> None:
        if self._discarding:
            return
        if self._consumer is not None:
            self._consumer.write(data)
            return
        self._held.append(data)
        self._held_bytes += len(data)
        if self._held_bytes > self._HOLD and not self._paused:
            self._paused = True
            self._pause()

    def finish(self) -> None:
        self._finished = True
        if self._done is not None and not self._done.called:
            self._done.callback(None)

    def discard(self) -> None:
        """The shard is gone: swallow the rest of the body."""
        self._discarding = True
        self._held = []
        if self._paused:
            self._paused = False
            self._resume()

    def startProducing(self, consumer: Any) -> Deferred[None]:
        self._consumer = consumer
        held, self._held = self._held, []
        for chunk in held:
            consumer.write(chunk)
        self._held_bytes = 0
        if self._paused:
            self._paused = False
            self._resume()
        self._done = Deferred()
        if self._finished:
            self._done.callback(None)
        return self._done

    def pauseProducing(self) -> None:
        if not self._paused:
            self._paused = True
            self._pause()

    def resumeProducing(self) -> None:
        if self._paused:
            self._paused = False
            self._resume()

    def stopProducing(self) -> None:
        # The upstream request was abandoned; its Deferred must not fire afterwards.
        self.discard()
        self._consumer = None


class ResponseRelay(Protocol):
    """
    A shard's response body on its way to the client, as an upstream's C{deliverBody} hands it
    over: the front end's subclass passes each chunk on and is told C{body_ended(complete)} once
    (C{complete}: it ended where its framing said; otherwise the shard broke off mid-body);
    C{stop()} lets go of it first, after which nothing more is passed on.
    """

    done = False
    transport: IPushProducer | None  # type: ignore[assignment]  # deliverBody gives a producer, not an ITransport

    def body_ended(self, complete: bool) -> None:
        raise NotImplementedError

    def connectionLost(self, reason: Failure | None = None) -> None:
        if self.done:
            return
        self.done = True
        # isinstance, not Failure.check: check() computes the qualified name of every class it
        # is given (reflect.qual), once per response here.
        self.body_ended(reason is None or isinstance(reason.value, ResponseDone))

    def stop(self) -> None:
        if not self.done:
            self.done = True
            if self.transport is not None:
                self.transport.stopProducing()


def abandon(body: StreamingBody | None, relay: ResponseRelay | None, deferred: Deferred[Any] | None) -> None:
    """Let go of a request in flight: the rest of its body is swallowed, its response relay
    stopped and its Deferred cancelled (which makes the upstream drop its connection)."""
    if body is not None:
        body.discard()
    if relay is not None:
        relay.stop()
    if deferred is not None and not deferred.called:
        deferred.cancel()


__all__ = ["ResponseRelay", "StreamingBody", "abandon"]
