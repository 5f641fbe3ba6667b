"""ctf-instancer: per-team CTF challenge containers on demand (Celery, Redis, Docker)."""

__version__ = "0.1.0"
