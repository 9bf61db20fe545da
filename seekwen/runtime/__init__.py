"""Runtime: KV caches, sampling, generation loops, the batch engine and the server."""
