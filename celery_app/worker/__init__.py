"""The worker wing: what a worker process runs beside its tasks.

The loop base (``loop.py``) and the four loops on it (the host's heartbeat, the egress
firewall keeper, the event follower, the in-flight keeper), the broker transport
(``broker.py``), its quiet log (``logs.py``) and the one place that starts and stops the loops
of a worker process (``machinery.py``), which is handed the worker's context
(:mod:`celery_app.worker.context`, an entry point above this floor).
"""
