"""Celery settings, as plain module variables (SPEC §2).

``CELERY_BROKER_URL`` and ``CELERY_RESULT_BACKEND`` override the two Redis URLs;
``CTF_JANITOR_INTERVAL`` sets how often the beat runs the janitor (at most every 10 s).
Each worker runs its own beat (``-B``), whose janitor task goes to the queue of the worker's
own Docker host (``CTF_HOST``), so every host is reaped by its own worker (SPEC §10).
"""

import os

from celery_app.routing import host_queue

broker_url = os.environ.get("CELERY_BROKER_URL", "redis://localhost:6379/0")
result_backend = os.environ.get("CELERY_RESULT_BACKEND", "redis://localhost:6379/1")

task_serializer = "json"
result_serializer = "json"
accept_content = ["json"]
result_accept_content = ["json"]
result_expires = 86400  # one day

timezone = "UTC"
enable_utc = True

# A task is acknowledged only when it finished, and redelivered when its worker died:
# every task is idempotent, so a redelivery finishes the work instead of doubling it.
task_acks_late = True
task_reject_on_worker_lost = True
worker_prefetch_multiplier = 1
task_track_started = True
result_extended = True
broker_connection_retry_on_startup = True
# Unacknowledged tasks of a killed worker come back after this long.
broker_transport_options = {
    "visibility_timeout": int(os.environ.get("CTF_VISIBILITY_TIMEOUT", "600")),
}
result_backend_transport_options = {"retry_policy": {"timeout": 5.0}}

worker_send_task_events = True
task_send_sent_event = True

beat_schedule = {
    "reap-expired": {
        "task": "celery_app.tasks.reap_expired",
        "schedule": min(float(os.environ.get("CTF_JANITOR_INTERVAL", "5")), 10.0),
        "options": {"expires": 30, "queue": host_queue(os.environ.get("CTF_HOST", "local"))},
    },
}
