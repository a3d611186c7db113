"""Generation stack: exit decisions, sampling, KV caches and decoding methods."""
