"""
W2/W2r load generator: one TLS connection per HTTP request, for a bounded time.

    python3 bench/handshakes.py NAME PORT CA_FILE SECONDS RESUME(0|1)

Prints one JSON line: connections made, seconds, and how many handshakes were resumptions.
"""

from __future__ import annotations

import json
import socket
import ssl
import sys
import time


def main() -> None:
    name, port, cafile, seconds, resume = sys.argv[1], int(sys.argv[2]), sys.argv[3], float(sys.argv[4]), sys.argv[5] == "1"
    ctx = ssl.create_default_context(cafile=cafile)
    request = f"GET /100b HTTP/1.1\r\nHost: {name}\r\nConnection: close\r\n\r\n".encode()
    session = None
    count = resumed = 0
    started = time.monotonic()
    deadline = started + seconds
    while time.monotonic() < deadline:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
            with ctx.wrap_socket(raw, server_hostname=name, session=session if resume else None) as tls:
                tls.sendall(request)
                while tls.recv(65536):
                    pass
                if tls.session_reused:
                    resumed += 1
                if resume:
                    session = tls.session
        count += 1
    print(json.dumps({"connections": count, "seconds": time.monotonic() - started, "resumed": resumed}))


if __name__ == "__main__":
    main()
