"""The unit suite: no Docker, no Redis (see conftest.py)."""
