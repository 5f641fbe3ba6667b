"""Celery settings, as plain module variables (SPEC §2).

They come from the one :class:`~celery_app.settings.Settings` class, read from the
environment: ``CELERY_BROKER_URL`` and ``CELERY_RESULT_BACKEND`` override the two Redis URLs,
``CTF_JANITOR_INTERVAL`` sets how often the beat runs the janitor (at most every 10 s; a larger
value is refused, not clamped) and ``CTF_VISIBILITY_TIMEOUT`` how long a dead worker's task
messages take to come back. Each worker runs its own beat (``-B``), whose janitor task goes to
the queue of the worker's own Docker host (``CTF_HOST``), so every host is reaped by its own
worker (SPEC §10).
"""

from celery_app.hosts.routing import host_queue
from celery_app.settings import Settings
from celery_app.worker.broker import transport_for

# Built from the environment when Celery loads this module; no secret is read or created here.
_settings = Settings()

broker_url = _settings.broker_url
# Our Redis transport (same URL, password and TLS options): it consumes without the instant in
# which kombu's has popped a message but not yet recorded it, so a killed worker loses none
# (celery_app.worker.broker). Publishing is kombu's, unchanged.
broker_transport = transport_for(broker_url)
result_backend = _settings.result_backend

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
# A redelivered message whose task already succeeded (its worker died after storing the result
# and before acknowledging) is not run again: the stored result stands.
worker_deduplicate_successful_tasks = True
# Unacknowledged messages of a dead worker come back after this long. Kombu's Redis transport
# looks for them only every ~100 s on its own; celery_app.worker.inflight looks every few seconds
# and keeps the messages of live workers fresh, so a short timeout never redelivers running work.
broker_transport_options = {"visibility_timeout": _settings.visibility_timeout}
result_backend_transport_options = {"retry_policy": {"timeout": 5.0}}

# Task events cost broker publishes on every task's path (status reads included); only a
# monitor reads them, and Flower switches them on in running workers by itself.
worker_send_task_events = _settings.task_events
task_send_sent_event = _settings.task_events

beat_schedule = {
    "reap-expired": {
        "task": "celery_app.tasks.reap_expired",
        "schedule": _settings.janitor_interval,
        "options": {"expires": 30, "queue": host_queue(_settings.host)},
    },
    # Warm pools (issue 14): refilled in the background, one pass at a time per host.
    "refill-pools": {
        "task": "celery_app.tasks.refill_pools",
        "schedule": _settings.janitor_interval,
        "options": {"expires": 30, "queue": host_queue(_settings.host)},
    },
}
