"""TLS: the server connection engine, certificate sources and per-route contexts."""
