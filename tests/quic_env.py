"""
Real QUIC peers for the tests: aioquic HTTP/3 servers, each a subprocess with its own
certificate (from a CA made per test, whose keys the gateway never sees), and an aioquic HTTP/3
client run in the test's thread with its own asyncio loop.

A server answers ``/who`` with what it saw of the client (its own name, the ALPN the TLS
handshake chose, the client's max_idle_timeout transport parameter), which only an endpoint that
completed the handshake with the client itself can know, and ``/big`` with 1 MiB of a known
pattern.

Run as a script it is the server: ``python3 quic_env.py serve CERT KEY NAME`` prints
``READY <port>`` once it listens on 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import datetime
import hashlib
import json
import os
import ssl
import subprocess
import sys
from typing import Any

BIG_SIZE = 1024 * 1024


def big_body() -> bytes:
    """1 MiB whose every 32-byte block is the SHA-256 of its index: a corrupted, lost or
    reordered block shows."""
    return b"".join(hashlib.sha256(i.to_bytes(4, "big")).digest() for i in range(BIG_SIZE // 32))


# -- certificates -------------------------------------------------------------------------------

def make_certificates(directory: str, names: list[str]) -> dict[str, Any]:
    """A CA and one leaf certificate per name (ECDSA P-256): {"ca": path, name: (cert, key)}."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "quic test CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - datetime.timedelta(minutes=5))
          .not_valid_after(now + datetime.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .sign(ca_key, hashes.SHA256()))
    out: dict[str, Any] = {"ca": os.path.join(directory, "quic-ca.pem")}
    with open(out["ca"], "wb") as f:
        f.write(ca.public_bytes(serialization.Encoding.PEM))
    for i, name in enumerate(names):
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (x509.CertificateBuilder()
                .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
                .issuer_name(ca_name).public_key(key.public_key())
                .serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(minutes=5))
                .not_valid_after(now + datetime.timedelta(days=1))
                .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
                .sign(ca_key, hashes.SHA256()))
        cert_path = os.path.join(directory, f"quic-server-{i}.pem")
        key_path = os.path.join(directory, f"quic-server-{i}-key.pem")
        with open(cert_path, "wb") as f:
            f.write(cert.public_bytes(serialization.Encoding.PEM))
        with open(key_path, "wb") as f:
            f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                      serialization.NoEncryption()))
        out[name] = (cert_path, key_path)
    return out


# -- the server ---------------------------------------------------------------------------------

class H3Server:
    """An aioquic HTTP/3 server subprocess on 127.0.0.1."""

    def __init__(self, cert: str, key: str, ident: str, *options: str) -> None:
        """C{options}: ``retry`` (answer every first Initial with a Retry), ``v1`` (support
        QUIC v1 only, so a v2 client gets Version Negotiation), ``v2`` (QUIC v2 only)."""
        self.ident = ident
        self.proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "serve", cert, key, ident,
                                      *options],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()  # the server prints READY at once, or exits
        if not line.startswith("READY "):
            self.proc.kill()
            raise AssertionError(f"aioquic server did not start: {line!r} {self.proc.stderr.read()}")
        self.port = int(line.split()[1])

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        for stream in (self.proc.stdout, self.proc.stderr):
            if stream is not None:
                stream.close()


def _serve(cert: str, key: str, ident: str, *options: str) -> None:
    from aioquic.asyncio import QuicConnectionProtocol, serve
    from aioquic.h3.connection import H3_ALPN, H3Connection
    from aioquic.h3.events import HeadersReceived
    from aioquic.quic.configuration import QuicConfiguration
    from aioquic.quic.events import ProtocolNegotiated, QuicEvent

    big = big_body()

    class Handler(QuicConnectionProtocol):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.h3: H3Connection | None = None

        def quic_event_received(self, event: QuicEvent) -> None:
            if isinstance(event, ProtocolNegotiated):
                self.h3 = H3Connection(self._quic)
            if self.h3 is None:
                return
            for h3_event in self.h3.handle_event(event):
                if isinstance(h3_event, HeadersReceived):
                    self.answer(h3_event)

        def answer(self, event: HeadersReceived) -> None:
            assert self.h3 is not None
            path = dict(event.headers).get(b":path", b"/").decode()
            if path == "/big":
                body = big
            else:
                quic = self._quic
                body = json.dumps({
                    "ident": ident,
                    "alpn": quic.tls.alpn_negotiated,
                    "client_max_idle_timeout": quic._remote_max_idle_timeout,
                    "version": quic._version,
                    "server_name": quic.tls.client_server_name if hasattr(quic.tls, "client_server_name") else None,
                }).encode()
            self.h3.send_headers(event.stream_id, [(b":status", b"200"),
                                                   (b"content-length", str(len(body)).encode())])
            self.h3.send_data(event.stream_id, body, end_stream=True)
            self.transmit()

    async def main() -> None:
        configuration = QuicConfiguration(is_client=False, alpn_protocols=H3_ALPN, idle_timeout=30)
        if "v1" in options:
            configuration.supported_versions = [0x00000001]
        if "v2" in options:
            configuration.supported_versions = [0x6B3343CF]
        configuration.load_cert_chain(cert, key)
        server = await serve("127.0.0.1", 0, configuration=configuration, create_protocol=Handler,
                             retry="retry" in options)
        port = server._transport.get_extra_info("sockname")[1]
        print(f"READY {port}", flush=True)
        await asyncio.Event().wait()

    asyncio.run(main())


# -- the client ---------------------------------------------------------------------------------

async def _h3_get(port: int, server_name: str, path: str, cafile: str, idle_timeout: float,
                  extra_alpn: list[str], local_port: int, version: int | None) -> tuple[int, bytes]:
    from aioquic.asyncio import QuicConnectionProtocol, connect
    from aioquic.h3.connection import H3_ALPN, H3Connection
    from aioquic.h3.events import DataReceived, HeadersReceived
    from aioquic.quic.configuration import QuicConfiguration
    from aioquic.quic.events import QuicEvent

    class Client(QuicConnectionProtocol):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.h3 = H3Connection(self._quic)
            self.status = 0
            self.body = bytearray()
            self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()

        def quic_event_received(self, event: QuicEvent) -> None:
            for h3_event in self.h3.handle_event(event):
                if isinstance(h3_event, HeadersReceived):
                    self.status = int(dict(h3_event.headers)[b":status"])
                    if h3_event.stream_ended and not self.done.done():
                        self.done.set_result(None)
                elif isinstance(h3_event, DataReceived):
                    self.body += h3_event.data
                    if h3_event.stream_ended and not self.done.done():
                        self.done.set_result(None)

        async def get(self, authority: str, path: str) -> tuple[int, bytes]:
            stream_id = self._quic.get_next_available_stream_id()
            self.h3.send_headers(stream_id, [(b":method", b"GET"), (b":scheme", b"https"),
                                             (b":authority", authority.encode()), (b":path", path.encode())],
                                 end_stream=True)
            self.transmit()
            await self.done
            return self.status, bytes(self.body)

    configuration = QuicConfiguration(is_client=True, alpn_protocols=H3_ALPN + extra_alpn,
                                      server_name=server_name, idle_timeout=idle_timeout)
    configuration.load_verify_locations(cafile)
    configuration.verify_mode = ssl.CERT_REQUIRED
    if version is not None:
        configuration.original_version = version
    async with connect("127.0.0.1", port, configuration=configuration, create_protocol=Client,
                       wait_connected=True, local_port=local_port) as client:
        assert isinstance(client, Client)
        return await client.get(server_name, path)


def h3_get(port: int, server_name: str, path: str, cafile: str, timeout: float = 15,
           idle_timeout: float = 7.25, extra_alpn: list[str] | None = None,
           local_port: int = 0, version: int | None = None) -> tuple[int, bytes]:
    """GET C{path} over HTTP/3 from 127.0.0.1:C{port} with SNI C{server_name}, verifying the
    server's certificate against C{cafile}; raise on failure or after C{timeout} seconds."""
    async def bounded() -> tuple[int, bytes]:
        return await asyncio.wait_for(
            _h3_get(port, server_name, path, cafile, idle_timeout, extra_alpn or [], local_port, version),
            timeout)
    return asyncio.run(bounded())


if __name__ == "__main__":
    if sys.argv[1:2] == ["serve"]:
        _serve(*sys.argv[2:])
