"""
Log observers for text and JSON lines, filtered by level, with secrets redacted.

Events are twisted.logger events; the JSON form carries the event's own fields (those that are
JSON-serializable) so that log pipelines can filter on ``event_kind``, ``shard`` and so on.
Twisted's own chatter about factories and ports ("Starting factory <...Factory object at
0x...>", "Site starting on 28317", "(TCP Port 28317 Closed)") is dropped at every level: the
gateway logs each listener's real address itself, and these lines name only Python objects
and bare port numbers, once per connection for client factories.
"""

from __future__ import annotations

import json
import re
import sys
import time
from typing import IO, Any, cast

from twisted.logger import (
    FilteringLogObserver, ILogFilterPredicate, ILogObserver, LogLevel, LogLevelFilterPredicate,
    PredicateResult, formatEvent,
)
from twisted.application.service import MultiService
from zope.interface import implementer

_LEVELS = {"debug": LogLevel.debug, "info": LogLevel.info, "warn": LogLevel.warn,
           "error": LogLevel.error, "critical": LogLevel.critical}

# Field names whose values are never logged, and patterns scrubbed from formatted messages.
SECRET_FIELDS = frozenset({"token", "authorization", "cookie", "password", "secret", "private_key"})
_SECRET_PATTERNS = [
    re.compile(r"(?i)(bearer\s+)[A-Za-z0-9._~+/=-]+"),
    re.compile(r"(?i)((?:token|__host-[a-z0-9_-]+|authorization|cookie)=)[^\s;&\"]+"),
    re.compile(r"eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]*"),
]


# What each pattern needs to match at all, looked for first: an access line (one per connection,
# with several "=" and no secret) then skips the regular expressions' scans.
_BEARER, _KEY_WORDS, _JWT = _SECRET_PATTERNS
_KEY_PREFIXES = ("token=", "__host-", "authorization=", "cookie=")


def _hide(m: re.Match[str]) -> str:
    return (m.group(1) if m.groups() else "") + "[redacted]"


def redact(text: str) -> str:
    if not text.isascii():
        # Case-insensitive matching also takes letters such as U+017F and U+0131 for s and i:
        # no shortcut.
        for pattern in _SECRET_PATTERNS:
            text = pattern.sub(_hide, text)
        return text
    lowered = text.lower()
    if "bearer" in lowered:
        text = _BEARER.sub(_hide, text)
        lowered = text.lower()
    if "=" in text and any(k in lowered for k in _KEY_PREFIXES):
        text = _KEY_WORDS.sub(_hide, text)
    if "eyJ" in text:
        text = _JWT.sub(_hide, text)
    return text


# Twisted's connection errors often carry another Failure's repr in their message (an endpoint
# that failed every attempt, an HTTP client's ResponseNeverReceived): a multi-line
# "[Failure instance: Traceback (failure with no frames): <class 'x.Y'>: text\n]".
_FAILURE_REPR = re.compile(r"\[Failure instance: Traceback \(failure with no frames\): "
                           r"<class '(?:[\w]+\.)*(\w+)'>: ([^\n]*)\n\]")


_FAILURE_OBJECT = re.compile(r"<twisted\.python\.failure\.Failure (?:\w+\.)*(\w+): ([^>\n]*)>")


def error_text(failure: Any) -> str:
    """One line saying what went wrong in C{failure}, for a log line: the reasons of an HTTP
    client's failure (ResponseFailed, ResponseNeverReceived) in their own words, and a Failure's
    repr inside a message (a connection that failed every attempt) as its class and text."""
    value = getattr(failure, "value", failure)
    reasons = getattr(value, "reasons", None)
    if isinstance(reasons, list) and reasons:
        return "; ".join(error_text(reason) for reason in reasons)
    text = failure.getErrorMessage() if hasattr(failure, "getErrorMessage") else str(value)
    text = _FAILURE_REPR.sub(lambda m: f"{m.group(1)}: {m.group(2)}", text)
    text = _FAILURE_OBJECT.sub(lambda m: f"{m.group(1)}: {m.group(2)}", text)
    return " ".join(text.split()) or type(value).__name__


def _format(event: dict[str, Any]) -> str:
    """C{formatEvent(event)}, with the common case at C speed: a text format without Twisted's
    call syntax (C{"{name()}"}) is C{str.format_map} over the event, which is what Twisted's
    formatter computes for it (measured: 28 to 9 µs per access line); anything else, or a format
    that fails, goes to Twisted's formatEvent and its own error text."""
    fmt = event.get("log_format")
    if type(fmt) is str and "()" not in fmt and "log_flattened" not in event:
        try:
            return fmt.format_map(event)
        except Exception:  # noqa: BLE001 - Twisted's formatter says what went wrong
            pass
    return formatEvent(event) or ""


def _message(event: dict[str, Any]) -> str:
    if SECRET_FIELDS.isdisjoint(event):
        text = _format(event)
    else:
        text = _format({k: ("[redacted]" if k in SECRET_FIELDS else v) for k, v in event.items()})
    failure = event.get("log_failure")
    if failure is not None:
        text = f"{text}\n{failure.getTraceback()}" if text else failure.getTraceback()
    return redact(text)


_stamp_second = -1
_stamp_text = ""


def _stamp(when: float) -> str:
    """The event's time to the second, as text; formatted once per second."""
    global _stamp_second, _stamp_text
    second = int(when)
    if second != _stamp_second:
        _stamp_text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        _stamp_second = second
    return _stamp_text


@implementer(ILogObserver)
class TextObserver:
    def __init__(self, out: IO[str]) -> None:
        self.out = out

    def __call__(self, event: dict[str, Any]) -> None:
        level = event.get("log_level", LogLevel.info)
        stamp = _stamp(event.get("log_time") or time.time())
        worker = event.get("worker")
        tag = f" worker={worker}" if worker is not None else ""
        self.out.write(f"{stamp}Z {level.name:<5} [{event.get('log_namespace', '-')}]{tag} {_message(event)}\n")
        self.out.flush()


@implementer(ILogObserver)
class JSONObserver:
    def __init__(self, out: IO[str]) -> None:
        self.out = out

    def __call__(self, event: dict[str, Any]) -> None:
        record: dict[str, Any] = {
            "time": event.get("log_time", time.time()),
            "level": event.get("log_level", LogLevel.info).name,
            "namespace": event.get("log_namespace", "-"),
            "message": _message(event),
        }
        for key, value in event.items():
            if key.startswith("log_") or key in record or key in ("format", "message", "system", "isError", "printed", "why"):
                continue
            if key in SECRET_FIELDS:
                record[key] = "[redacted]"
            elif isinstance(value, (str, int, float, bool)) or value is None:
                record[key] = redact(value) if isinstance(value, str) else value
        self.out.write(json.dumps(record, default=str) + "\n")
        self.out.flush()


# Factory.doStart/doStop (twisted.internet.protocol), by format: the namespace is the class of
# each factory, the gateway's own included.
_FACTORY_FORMATS = frozenset({"Starting factory {factory!r}", "Stopping factory {factory!r}"})
# Ports still log through the legacy log.msg (namespace "log_legacy"): tcp/unix/udp Port
# startListening ("<factory log prefix> starting on <port>"), connectionLost
# ("(TCP Port <port> Closed)"), and a datagram protocol's doStart/doStop.
_PORT_TEXT = re.compile(r"\S+ starting on (\d+|'[^']*')|\(\w+ Port [^\n]+ Closed\)"
                        r"|(Starting|Stopping) protocol <[^\n]*>")


def is_twisted_chatter(event: dict[str, Any]) -> bool:
    """Whether C{event} is one of Twisted's factory or port lines (see the module docstring)."""
    if event.get("log_format") in _FACTORY_FORMATS:
        return "factory" in event
    if event.get("log_namespace") == "log_legacy" and not event.get("isError"):
        text = event.get("log_text")
        return isinstance(text, str) and _PORT_TEXT.fullmatch(text) is not None
    return False


def _drop_chatter(event: dict[str, Any]) -> PredicateResult:
    return PredicateResult.no if is_twisted_chatter(event) else PredicateResult.maybe


# twistd's lines about itself (its banner at start, its goodbye at stop): a supervised worker
# leaves them to the supervisor, which prints them once.
_TWISTD_FORMATS = frozenset({"twistd {version} ({exe} {pyVersion}) starting up.",
                             "reactor class: {reactor}.", "Main loop terminated.",
                             "Server Shut Down."})


def _drop_twistd_lines(event: dict[str, Any]) -> PredicateResult:
    return PredicateResult.no if event.get("log_format") in _TWISTD_FORMATS else PredicateResult.maybe


@implementer(ILogObserver)
class _WorkerField:
    """Every event of a supervised worker process carries its index as C{worker}."""

    def __init__(self, observer: ILogObserver, index: int) -> None:
        self.observer = observer
        self.index = index

    def __call__(self, event: dict[str, Any]) -> None:
        self.observer({**event, "worker": self.index})


def make_observer(fmt: str, level: str, out: IO[str] | None = None,
                  worker: int | None = None) -> ILogObserver:
    """The gateway's observer; C{worker}: the index of a supervised worker process, whose lines
    then carry it and which leaves twistd's own lines to the supervisor."""
    out = out or sys.stdout
    base: ILogObserver = JSONObserver(out) if fmt == "json" else TextObserver(out)
    predicate = LogLevelFilterPredicate(defaultLogLevel=_LEVELS[level])
    # A plain function is a predicate too (FilteringLogObserver calls each one).
    predicates: list[ILogFilterPredicate] = [predicate, cast(ILogFilterPredicate, _drop_chatter)]
    if worker is not None:
        base = _WorkerField(base, worker)
        predicates.append(cast(ILogFilterPredicate, _drop_twistd_lines))
    observer = FilteringLogObserver(base, predicates)
    observer.level_predicate = predicate  # type: ignore[attr-defined]  # read back by set_level
    return observer


def set_level(observer: ILogObserver, level: str) -> None:
    """Change the lowest level an observer from L{make_observer} lets through."""
    predicate = getattr(observer, "level_predicate", None)
    if predicate is not None:
        predicate.defaultLogLevel = _LEVELS[level]


class LoggingRoot(MultiService):
    """A root service that, parented to a twistd Application, makes C{observer} its log observer."""

    def __init__(self, observer: ILogObserver) -> None:
        super().__init__()
        self.observer = observer

    def setServiceParent(self, parent: Any) -> None:
        super().setServiceParent(parent)
        if hasattr(parent, "setComponent"):
            parent.setComponent(ILogObserver, self.observer)
