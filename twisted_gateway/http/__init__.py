"""HTTP handlers: error pages, the gateway's own API and (later) the reverse proxy."""
