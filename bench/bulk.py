"""
W3 load generator: move N bytes through a tcp route over TLS, upload or download.

    python3 bench/bulk.py upload|download NAME PORT CA_FILE BYTES

Upload sends N bytes, half-closes, and checks the sink's byte count; download reads until the
source closes and checks the count.  Prints one JSON line with bytes and seconds.
"""

from __future__ import annotations

import json
import os
import socket
import ssl
import sys
import time


def main() -> None:
    direction, name, port, cafile, size = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4], int(sys.argv[5])
    ctx = ssl.create_default_context(cafile=cafile)
    raw = socket.create_connection(("127.0.0.1", port), timeout=60)
    raw.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
    raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    tls = ctx.wrap_socket(raw, server_hostname=name)
    started = time.monotonic()
    moved = 0
    if direction == "upload":
        block = memoryview(bytes(1 << 20))
        while moved < size:
            n = min(len(block), size - moved)
            tls.sendall(block[:n])
            moved += n
        # End of the upload: a TCP FIN on the same socket (SSLSocket.shutdown would drop the
        # TLS state needed to read the sink's answer).
        half = socket.socket(fileno=os.dup(tls.fileno()))
        half.shutdown(socket.SHUT_WR)
        half.close()
        reply = b""
        while chunk := tls.recv(65536):
            reply += chunk
        counted = int(reply.strip() or b"0")
        if counted != size:
            sys.exit(f"the sink counted {counted} bytes, expected {size}")
    else:
        buf = bytearray(1 << 20)
        while True:
            n = tls.recv_into(buf)
            if not n:
                break
            moved += n
        if moved != size:
            sys.exit(f"received {moved} bytes, expected {size}")
    print(json.dumps({"bytes": size, "seconds": time.monotonic() - started}))


if __name__ == "__main__":
    main()
