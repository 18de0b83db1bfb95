"""Real HTTP, h2c and websocket servers on loopback, used as shard upstreams by the HTTP tests."""

from __future__ import annotations

import hashlib
import json
import socket
import subprocess
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from typing import Any

import h2.config
import h2.connection
import h2.events


class RecordingHTTPServer:
    """An HTTP/1.1 server: /big?size=N streams N bytes, /echo returns the body's SHA-256 and
    length, /slow waits, anything else returns the request line; every request's headers are
    recorded."""

    def __init__(self) -> None:
        self.seen: list[dict] = []
        self.body_bytes = 0  # body bytes read so far, across requests
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _record(self):
                outer.seen.append({"method": self.command, "path": self.path,
                                   "headers": {k.lower(): v for k, v in self.headers.items()}})

            def _body(self):
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    while True:
                        size = int(self.rfile.readline().split(b";")[0], 16)
                        if size == 0:
                            while self.rfile.readline() not in (b"\r\n", b""):
                                pass
                            return
                        left = size
                        while left:
                            chunk = self.rfile.read(min(left, 1 << 20))
                            left -= len(chunk)
                            yield chunk
                        self.rfile.readline()
                length = int(self.headers.get("Content-Length", "0"))
                left = length
                while left:
                    chunk = self.rfile.read(min(1 << 20, left))
                    if not chunk:
                        return
                    left -= len(chunk)
                    yield chunk

            def do_GET(self):
                self._record()
                if self.path.startswith("/big"):
                    size = int(self.path.split("size=")[1])
                    self.send_response(200)
                    self.send_header("Content-Type", "application/octet-stream")
                    self.send_header("Content-Length", str(size))
                    self.end_headers()
                    block = bytes(range(256)) * 256
                    left = size
                    while left:
                        n = min(left, len(block))
                        self.wfile.write(block[:n])
                        left -= n
                    return
                if self.path.startswith("/slow"):
                    time.sleep(float(self.path.split("=")[1]))
                body = json.dumps({"method": self.command, "path": self.path}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("X-Upstream", "recording")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_POST(self):
                self._record()
                digest = hashlib.sha256()
                total = 0
                for chunk in self._body():
                    digest.update(chunk)
                    total += len(chunk)
                    outer.body_bytes += len(chunk)
                body = json.dumps({"sha256": digest.hexdigest(), "length": total}).encode()
                self.send_response(201)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        class Server(ThreadingHTTPServer):
            def handle_error(self, request, client_address):
                pass  # clients the tests cut off on purpose
        self.server = Server(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class H2CServer:
    """An h2c (prior knowledge) server answering every request with a body and trailers, the
    shape of a gRPC response.  With C{goaway_first}, its first connection answers its first
    request with GOAWAY (last stream 0: nothing processed) and closes, as a server shutting
    down or reaching its maximum connection age does."""

    def __init__(self, goaway_first: bool = False) -> None:
        self.goaway_first = goaway_first
        self.connections = 0
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        h2conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False))
        h2conn.initiate_connection()
        conn.sendall(h2conn.data_to_send())
        self.connections += 1
        refuse = self.goaway_first and self.connections == 1
        paths: dict[int, str] = {}
        received: dict[int, int] = {}
        digests: dict[int, Any] = {}
        try:
            while True:
                data = conn.recv(65536)
                if not data:
                    return
                for event in h2conn.receive_data(data):
                    if isinstance(event, h2.events.RequestReceived) and refuse:
                        h2conn.close_connection(last_stream_id=0)
                        conn.sendall(h2conn.data_to_send())
                        return
                    if isinstance(event, h2.events.RequestReceived):
                        paths[event.stream_id] = dict(event.headers).get(b":path", b"").decode()
                    if isinstance(event, h2.events.DataReceived):
                        received[event.stream_id] = received.get(event.stream_id, 0) + len(event.data)
                        digests.setdefault(event.stream_id, hashlib.sha256()).update(event.data)
                        h2conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                    if isinstance(event, (h2.events.StreamEnded,)):
                        sid = event.stream_id
                        body = f"h2 upstream answered {paths.get(sid)}".encode()
                        if sid in received:
                            body += f" ({received[sid]} bytes, sha256 {digests[sid].hexdigest()})".encode()
                        h2conn.send_headers(sid, [(":status", "200"), ("content-type", "application/grpc")])
                        h2conn.send_data(sid, body)
                        h2conn.send_headers(sid, [("grpc-status", "0"), ("grpc-message", "ok")], end_stream=True)
                conn.sendall(h2conn.data_to_send())
        except OSError:
            return
        finally:
            conn.close()

    def close(self) -> None:
        self.sock.close()


class WebsocketEchoServer:
    def __init__(self) -> None:
        from websockets.sync.server import serve

        def echo(ws):
            for message in ws:
                ws.send(message)
        self.server = serve(echo, "127.0.0.1", 0)
        self.port = self.server.socket.getsockname()[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()


class GrpcEchoServer:
    """A real gRPC server (grpcio, h2c) with raw-bytes methods of every kind, recording the
    metadata of each call."""

    def __init__(self) -> None:
        from concurrent import futures

        import grpc
        self.metadata: list[dict] = []
        self.cut_short: list[int] = []  # server streams that ended early: messages sent
        outer = self

        def record(context) -> None:
            outer.metadata.append({k: v for k, v in context.invocation_metadata()})

        def unary(request: bytes, context) -> bytes:
            record(context)
            return b"echo:" + request

        def fail(request: bytes, context) -> bytes:
            record(context)
            context.abort(grpc.StatusCode.NOT_FOUND, "no such thing: " + request.decode())

        def slow(request: bytes, context) -> bytes:
            time.sleep(float(request.decode()))
            return b"late"

        def stream(request: bytes, context):
            count, size = (int(x) for x in request.decode().split("x"))
            sent = 0
            try:
                for i in range(count):
                    yield bytes([i % 256]) * size
                    sent += 1
            finally:
                if sent < count:
                    outer.cut_short.append(sent)

        def upload(requests, context) -> bytes:
            digest = hashlib.sha256()
            total = 0
            for message in requests:
                digest.update(message)
                total += len(message)
            return f"{total}:{digest.hexdigest()}".encode()

        def chat(requests, context):
            for message in requests:
                yield message[::-1]

        handlers = {
            "Unary": grpc.unary_unary_rpc_method_handler(unary),
            "Fail": grpc.unary_unary_rpc_method_handler(fail),
            "Slow": grpc.unary_unary_rpc_method_handler(slow),
            "Stream": grpc.unary_stream_rpc_method_handler(stream),
            "Upload": grpc.stream_unary_rpc_method_handler(upload),
            "Chat": grpc.stream_stream_rpc_method_handler(chat),
        }
        options = [("grpc.max_receive_message_length", 64 << 20), ("grpc.max_send_message_length", 64 << 20)]
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=8), options=options)
        self.server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("test.Echo", handlers),))
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()

    def close(self) -> None:
        self.server.stop(grace=None)


class Nghttpd:
    """nghttpd (Debian's nghttp2-server) serving a directory over h2c, echoing uploads."""

    def __init__(self, docroot: str) -> None:
        from support import free_port, wait_for_listener, which
        self.port = free_port()
        self.proc = subprocess.Popen(
            [which("nghttpd"), "--no-tls", "--echo-upload", "-d", docroot, "-a", "127.0.0.1", str(self.port)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for_listener(self.port, "nghttpd", self.proc)

    def close(self) -> None:
        from support import stop_process
        stop_process(self.proc, 5)
