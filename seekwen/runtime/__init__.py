"""Runtime: KV caches, sampling, generation loops and the batching engine."""
