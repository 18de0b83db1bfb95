"""HTTP/2: flow control, the h2c connection to a shard, h2 clients (to h2c or HTTP/1.1 shards),
and HTTP/1.1 clients of ``h2`` ports."""
