"""The shard directory: the model, its interface and its providers."""
