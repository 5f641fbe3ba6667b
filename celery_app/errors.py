"""Every error the instancer raises, in one tree.

```
CTFError                        base: has an API ``code``, an HTTP ``status`` and ``transient``
├── TaskFailed                task_failed           503  (a task died of a bug or crash)
├── PermanentError              a retry cannot fix it; fail at once, say what to do
│   ├── Unauthorized            unauthorized          401  (no token, or not a valid one)
│   ├── Forbidden               forbidden             403  (a valid token, not its holder's)
│   │   └── SharedInstance      shared_instance       403  (a team acting on a global instance)
│   ├── InvalidRequest          invalid_request       422
│   │   └── InvalidTeamId       invalid_team_id       422
│   ├── UnknownChallenge        unknown_challenge     404
│   ├── InstanceNotFound        instance_not_found    404
│   ├── TaskNotFound            task_not_found        404
│   ├── TeamQuotaExceeded       team_quota_exceeded   409
│   ├── MaxLifetimeReached      max_lifetime_reached  409
│   ├── RateLimited             rate_limited          429
│   ├── CapacityExhausted       capacity_exhausted    503
│   ├── CatalogError            catalog_error         422  (bad catalog file, at start-up)
│   ├── HostsFileError          hosts_file_error      422  (bad CTF_HOSTS_FILE or CTF_HOST)
│   ├── ImageNotFound           image_not_found       422
│   │   └── ImagePullFailed     image_pull_failed     422  (registry unreachable or refused)
│   ├── Superseded              superseded            409  (a later stop/start replaced it)
│   ├── StartFailed             start_failed          503  (exited or never answered)
│   └── EgressUnprotected       egress_unprotected    503  (the egress firewall is not in place)
│       └── FirewallRefused     egress_unprotected    503  (nft refused a command)
└── TransientError              retry with backoff; may work a moment later
    ├── InstanceBusy            instance_busy         409  (gave up: its lock stayed held)
    └── BackendUnavailable      backend_unavailable   503
        ├── DockerUnavailable   the engine cannot be reached or answered 5xx
        └── RedisUnavailable    Redis cannot be reached
```

Every class has a code of its own (``tests/unit/test_error_codes.py``): a client tells the
kinds apart by code alone.

"Not on this host" and "busy, try later" are control signals, not errors
(:mod:`celery_app.vocab.signals`): the tasks carry such a request on. Only a request that can no
longer be carried on (its waits or hand-overs ran out) ends with ``InstanceBusy`` here.

The classes take a single message argument so Celery's JSON result backend can carry them
to any client and rebuild them there.
"""

from __future__ import annotations

from typing import ClassVar


class CTFError(Exception):
    """Base of every error the instancer raises on purpose."""

    code: ClassVar[str] = "internal_error"
    status: ClassVar[int] = 503
    transient: ClassVar[bool] = False

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail

    def to_dict(self) -> dict[str, str]:
        """Return the SPEC's JSON error body ``{"error", "detail"}``."""
        return {"error": self.code, "detail": self.detail}


class PermanentError(CTFError):
    """Raised when retrying cannot help: the request itself must change."""


class TaskFailed(CTFError):
    """Raised when a task failed with an error that is not one of ours (a bug or a crash)."""

    code = "task_failed"
    status = 503


class Unauthorized(PermanentError):
    """Raised when a request carries no token, or one that is not valid."""

    code = "unauthorized"
    status = 401


class Forbidden(PermanentError):
    """Raised when a valid token asks for something its holder may not do."""

    code = "forbidden"
    status = 403


class SharedInstance(Forbidden):
    """Raised when a team stops, extends or restarts a ``share: global`` challenge's instance.

    That one instance serves every team (SPEC §13): only the organisers act on it.
    """

    code = "shared_instance"


class InvalidRequest(PermanentError):
    """Raised when a request is malformed (bad field, bad value)."""

    code = "invalid_request"
    status = 422


class InvalidTeamId(InvalidRequest):
    """Raised when a team id does not match ``^[A-Za-z0-9][A-Za-z0-9_-]{0,62}$``."""

    code = "invalid_team_id"


class UnknownChallenge(PermanentError):
    """Raised when a challenge id is not a key of the catalog."""

    code = "unknown_challenge"
    status = 404


class InstanceNotFound(PermanentError):
    """Raised when a (challenge, team) pair has no instance."""

    code = "instance_not_found"
    status = 404


class TaskNotFound(PermanentError):
    """Raised when a task id is unknown to the result backend."""

    code = "task_not_found"
    status = 404


class TeamQuotaExceeded(PermanentError):
    """Raised when a team already runs ``CTF_MAX_INSTANCES_PER_TEAM`` instances."""

    code = "team_quota_exceeded"
    status = 409


class MaxLifetimeReached(PermanentError):
    """Raised when an extension would pass ``started_at + max_lifetime``."""

    code = "max_lifetime_reached"
    status = 409


class RateLimited(PermanentError):
    """Raised when a team starts or stops faster than the per-team rate limit allows."""

    code = "rate_limited"
    status = 429


class CapacityExhausted(PermanentError):
    """Raised when the global limit, the port range or the subnet pool is used up."""

    code = "capacity_exhausted"
    status = 503


class CatalogError(PermanentError):
    """Raised when the challenge catalog file has a mistake (names challenge and field)."""

    code = "catalog_error"
    status = 422


class HostsFileError(PermanentError):
    """Raised when ``CTF_HOSTS_FILE`` has a mistake (names host and field) or lacks CTF_HOST."""

    code = "hosts_file_error"
    status = 422


class ImageNotFound(PermanentError):
    """Raised when a challenge image is missing and cannot (or may not) be pulled."""

    code = "image_not_found"
    status = 422


class ImagePullFailed(ImageNotFound):
    """Raised when the engine answered but could not pull: registry unreachable or refusing.

    Retrying as if the engine were down cannot help; the image must be made present.
    """

    code = "image_pull_failed"


class Superseded(PermanentError):
    """Raised when a later request of the opposite kind (stop after start) replaced this one."""

    code = "superseded"
    status = 409


class StartFailed(PermanentError):
    """Raised when a container exits or does not answer within the challenge's start_timeout."""

    code = "start_failed"
    status = 503


class EgressUnprotected(PermanentError):
    """Raised when the egress firewall cannot be installed, so instances would reach our hosts."""

    code = "egress_unprotected"
    status = 503


class FirewallRefused(EgressUnprotected):
    """Raised when nft refuses a command: no such table or element, or a rule it rejects."""


class TransientError(CTFError):
    """Raised when a dependency failed in a way that may pass: retry with backoff."""

    transient = True


class InstanceBusy(TransientError):
    """Raised when a request gave up waiting for an instance another operation holds.

    The wait itself is a control signal (:class:`celery_app.vocab.signals.InstanceBusy`,
    retried later by the tasks); this error ends the request once the retries, or the
    hand-overs between hosts, are used up. It keeps the name and code clients know.
    """

    code = "instance_busy"
    status = 409


class BackendUnavailable(TransientError):
    """Raised when Docker or Redis cannot be reached or answers with a server error."""

    code = "backend_unavailable"
    status = 503


class DockerUnavailable(BackendUnavailable):
    """Raised when the Docker engine cannot be reached or answers 5xx."""


class RedisUnavailable(BackendUnavailable):
    """Raised when Redis cannot be reached."""
