"""
Raw TCP upstreams for the benchmarks: a sink (reads and discards, then reports the byte count
when the client half-closes) and a source (sends N bytes, then closes).

    python3 bench/upstream.py SINK_PORT SOURCE_PORT SOURCE_BYTES
"""

from __future__ import annotations

import socket
import sys
import threading


def serve(port: int, handler) -> None:
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", port))
    sock.listen(256)
    while True:
        conn, _ = sock.accept()
        threading.Thread(target=handler, args=(conn,), daemon=True).start()


def sink(conn: socket.socket) -> None:
    buf = bytearray(1 << 20)
    total = 0
    try:
        while True:
            n = conn.recv_into(buf)
            if not n:
                break
            total += n
        conn.sendall(f"{total}\n".encode())
        conn.shutdown(socket.SHUT_WR)
    except OSError:
        pass
    finally:
        conn.close()


def make_source(size: int):
    block = bytes(range(256)) * 4096  # 1 MiB

    def source(conn: socket.socket) -> None:
        try:
            left = size
            while left > 0:
                n = min(left, len(block))
                conn.sendall(block[:n])
                left -= n
            conn.shutdown(socket.SHUT_WR)
            conn.recv(1)
        except OSError:
            pass
        finally:
            conn.close()
    return source


if __name__ == "__main__":
    sink_port, source_port, size = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    threading.Thread(target=serve, args=(sink_port, sink), daemon=True).start()
    serve(source_port, make_source(size))
