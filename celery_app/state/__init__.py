"""The Redis store: it owns the keyspace (keys.py) and the index, locks and counters."""
