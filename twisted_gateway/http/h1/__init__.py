"""HTTP/1.1: clients of shard ports read and proxied request by request, and the keep-alive pool
the gateway speaks HTTP/1.1 to shards with."""
