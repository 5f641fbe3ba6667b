"""Settings: one pydantic-settings class, read from the environment (SPEC §9).

Build it with :func:`load_settings` and pass it in; nothing here is created at import, so
tests can build any configuration they like.
"""

from __future__ import annotations

import ipaddress
import os
import secrets
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

from pydantic import (
    AliasChoices,
    Field,
    SecretStr,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, SettingsConfigDict

from celery_app.vocab.limits import check_size

PullPolicy = Literal["if-not-present", "always", "never"]
# Shorter secrets can be brute-forced offline from one team token or flag (HMAC keys).
MIN_SECRET_LENGTH = 32
GENERATE_SECRET = "python3 -c 'import secrets; print(secrets.token_urlsafe(32))'"  # noqa: S105
IngressMode = Literal["ports", "traefik"]
IngressGate = Literal["plugin", "forwardauth"]
IngressAuth = Literal["team", "none"]


class Settings(BaseSettings):
    """Every setting of the instancer; environment names are in each field's alias."""

    # hide_input_in_errors: a refused secret must not be echoed into a log by the error.
    model_config = SettingsConfigDict(env_prefix="CTF_", populate_by_name=True, extra="ignore",
                                      hide_input_in_errors=True)

    broker_url: str = Field(
        "redis://localhost:6379/0", validation_alias=AliasChoices("CELERY_BROKER_URL", "broker_url")
    )
    result_backend: str = Field(
        "redis://localhost:6379/1",
        validation_alias=AliasChoices("CELERY_RESULT_BACKEND", "result_backend"),
    )
    # Where the instance index, locks and rate counters live; the broker's Redis by default.
    redis_url: str | None = None
    docker_host: str | None = Field(
        None, validation_alias=AliasChoices("DOCKER_HOST", "docker_host")
    )
    challenges_file: Path | None = None
    hosts_file: Path | None = None
    # Which host of CTF_HOSTS_FILE this worker serves ("local" without a hosts file).
    host: str = "local"
    # A worker refreshes its host's heartbeat every third of this; gone after this long.
    heartbeat_ttl: float = Field(15.0, ge=1, le=300)
    admin_token: SecretStr | None = None
    flag_secret: SecretStr | None = None
    # With it, GET /metrics asks for `Authorization: Bearer <it>` (or the admin token); without
    # it /metrics answers anyone (SPEC §6).
    metrics_token: SecretStr | None = None
    flag_format: str = "CTF{{{digest}}}"
    api_bind: str = "127.0.0.1:8000"
    public_host: str = "localhost"
    # Safe by default: instances answer on loopback until the organiser opens them up.
    publish_ip: str = "127.0.0.1"
    port_range: str | None = None
    team_subnet_pool: str = "10.213.0.0/16"
    team_subnet_prefix: int = Field(28, ge=16, le=29)
    default_ttl: int = Field(7200, gt=0)
    default_max_lifetime: int = Field(14400, gt=0)
    # The bound of a writable instance's root filesystem (catalog ``disk``), on every engine:
    # the janitor measures each running instance's writable layer and stops one over it.
    default_disk: str = "1g"
    max_instances_per_team: int = Field(3, gt=0)
    max_instances: int = Field(500, gt=0)
    rate_limit_count: int = Field(10, gt=0)
    rate_limit_window: int = Field(60, gt=0)
    # The audit trail (SPEC §13) keeps about this many newest events (a Redis stream trimmed by
    # whole blocks, ~100 B each: ~60 MB). Sized for a two-day event: 1,000 teams making ~250
    # recorded actions each (starts, stops, extends, flag checks) is 250,000.
    audit_max_events: int = Field(500_000, ge=100)
    pull_policy: PullPolicy = "if-not-present"
    janitor_interval: float = Field(5.0, gt=0, le=10)
    # Expired instances removed at once per pass; Docker's forced removal dominates the time.
    janitor_concurrency: int = Field(8, ge=1, le=64)
    # Grace before a container with our labels but no record is an orphan (a start in flight).
    orphan_grace: float = Field(30.0, ge=0)
    data_dir: Path = Path(".data")
    # Extra labels put on everything we create (tests use it to tag what they must remove).
    extra_labels: dict[str, str] = Field(default_factory=dict)
    worker_concurrency: int = Field(16, gt=0)
    # How long a request waits, in all, for an instance another operation holds (its task
    # retries meanwhile instead of parking a worker thread).
    lock_wait: float = Field(240.0, gt=0)
    # A task message taken by a worker that died comes back after this long. Live workers keep
    # the messages they hold fresh (celery_app.worker.inflight), so no long task is ever redelivered
    # while it runs, and a killed worker's requests are redone within about this long.
    visibility_timeout: float = Field(30.0, ge=10, le=3600)
    # Celery task events (task-received, -started, -succeeded): two broker publishes on every
    # task's path that only a monitor reads. Off by default; Flower turns them on in the
    # running workers by itself (its enable_events broadcast), and this starts them on.
    task_events: bool = False
    # One log line per HTTP request (uvicorn's access log). Off by default: status polls are the
    # API's hottest path and the line cost ~0.4 ms of a ~2 ms answer (PERFORMANCE.md §8);
    # /metrics counts requests per route and status either way.
    api_access_log: bool = False
    # The egress firewall (celery_app.engine.firewall): "auto" installs and keeps it when the engine
    # runs on this machine (and refuses starts when it cannot), and for an engine elsewhere
    # refuses starts until that machine's `ctfctl firewall keep` reports; "off": egress is yours.
    egress_firewall: Literal["auto", "off"] = "auto"
    # More IPv4 addresses or CIDRs (comma-separated) no instance may reach, even with
    # ``egress: internet``: other Docker hosts, Redis, the API when they have public addresses.
    egress_deny: str = ""
    # Requests of one team (and of everyone) the API holds waiting at once (?wait=N); more
    # are refused at once (429 / 503) before anything is sent. A wait holds no thread.
    api_max_waits_per_team: int = Field(8, ge=1)
    api_max_waits: int = Field(500, ge=1)
    # -- ingress (SPEC §11): instances behind Traefik, one host name each ---------------
    # ports: published host ports (SPEC §4); traefik: no published port, one host per instance.
    ingress: IngressMode = "ports"
    ingress_http_bind: str = "127.0.0.1:8080"
    ingress_https_bind: str = "127.0.0.1:8443"
    # Traefik's own API (route checks, ping) on loopback; never expose it.
    ingress_status_bind: str = "127.0.0.1:8082"
    # Browsers resolve *.localhost to loopback: works on the organiser's machine unchanged.
    instance_domain: str = "instances.localhost"
    ingress_auth: IngressAuth = "team"
    # plugin: Traefik checks the access cookie itself (our local plugin) and asks the API only
    # about links, denials and bearer tokens; forwardauth: Traefik asks the API every request.
    ingress_gate: IngressGate = "plugin"
    ingress_cert_file: Path | None = None
    ingress_key_file: Path | None = None
    # Where Traefik reaches the gate (forwardAuth); from CTF_API_BIND when not set.
    ingress_gate_url: str | None = None
    # Front proxies (IPv4/IPv6 addresses or CIDRs, comma-separated) that terminate TLS in front
    # of Traefik: only their X-Forwarded-Proto is believed (Traefik's forwardedHeaders and the
    # gate plugin), so players behind them get https:// redirects and a Secure __Host- cookie.
    ingress_trusted_proxies: str = ""
    # Seconds an access link (access_url) stays valid; the cookie it sets lives longer.
    ingress_link_ttl: int = Field(300, ge=10, le=3600)
    # Where the 401 page sends players: the dashboard (from CTF_API_BIND when not set).
    dashboard_url: str | None = None

    @field_validator("port_range")
    @classmethod
    def _check_port_range(cls, value: str | None) -> str | None:
        if value in (None, ""):
            return None
        assert value is not None
        try:
            lo, hi = (int(part) for part in value.split("-", 1))
        except ValueError:
            raise ValueError(f"CTF_PORT_RANGE must look like 30000-31000, got {value!r}") from None
        if not 1 <= lo <= hi <= 65535:
            raise ValueError(f"CTF_PORT_RANGE {value!r} must satisfy 1 <= lo <= hi <= 65535")
        return f"{lo}-{hi}"

    @field_validator("team_subnet_pool")
    @classmethod
    def _check_pool(cls, value: str) -> str:
        try:
            return str(ipaddress.IPv4Network(value, strict=True))
        except ValueError as exc:
            raise ValueError(
                f"CTF_TEAM_SUBNET_POOL must be an IPv4 CIDR like 10.213.0.0/16: {exc}"
            ) from None

    @field_validator("publish_ip")
    @classmethod
    def _check_publish_ip(cls, value: str) -> str:
        try:
            return str(ipaddress.ip_address(value))
        except ValueError:
            raise ValueError(f"CTF_PUBLISH_IP must be an IP address, got {value!r}") from None

    @field_validator("ingress_trusted_proxies")
    @classmethod
    def _check_trusted_proxies(cls, value: str) -> str:
        for part in (p.strip() for p in value.split(",")):
            if part:
                try:
                    ipaddress.ip_network(part, strict=False)
                except ValueError:
                    raise ValueError(
                        "CTF_INGRESS_TRUSTED_PROXIES must list IP addresses or CIDRs separated "
                        f"by commas (the front proxies that terminate TLS), got {part!r}"
                    ) from None
        return value

    @field_validator("default_disk")
    @classmethod
    def _check_default_disk(cls, value: str) -> str:
        return check_size(value, "CTF_DEFAULT_DISK", 16 * 1024**2)

    @field_validator("egress_deny")
    @classmethod
    def _check_egress_deny(cls, value: str) -> str:
        for part in (p.strip() for p in value.split(",")):
            if part:
                try:
                    ipaddress.IPv4Network(part, strict=False)
                except ValueError:
                    raise ValueError(
                        f"CTF_EGRESS_DENY must list IPv4 addresses or CIDRs separated by commas, "
                        f"got {part!r}"
                    ) from None
        return value

    @field_validator("admin_token", "flag_secret", "metrics_token")
    @classmethod
    def _check_secret(cls, value: SecretStr | None, info: ValidationInfo) -> SecretStr | None:
        if value is None:
            return None
        length = len(value.get_secret_value().strip())
        if length < MIN_SECRET_LENGTH:
            env = f"CTF_{str(info.field_name).upper()}"
            raise ValueError(
                f"{env} (or CTF_DATA_DIR/{info.field_name}) is {length} characters long; "
                f"it must be at least {MIN_SECRET_LENGTH} (a short secret lets anyone derive "
                f"every team's token and flag). Generate one with: {GENERATE_SECRET}, or "
                f"unset {env} to have one generated into CTF_DATA_DIR/{info.field_name}"
            )
        return value

    @model_validator(mode="after")
    def _check_pool_prefix(self) -> Settings:
        pool = ipaddress.IPv4Network(self.team_subnet_pool)
        if self.team_subnet_prefix < pool.prefixlen:
            raise ValueError(
                f"CTF_TEAM_SUBNET_PREFIX /{self.team_subnet_prefix} is larger than the pool "
                f"{pool}; use a prefix of at least /{pool.prefixlen}"
            )
        return self

    @field_validator("ingress_http_bind", "ingress_https_bind", "ingress_status_bind")
    @classmethod
    def _check_bind(cls, value: str) -> str:
        host, sep, port = value.rpartition(":")
        if not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
            raise ValueError(f"a CTF_INGRESS_*_BIND must look like 0.0.0.0:443, got {value!r}")
        return value

    @field_validator("instance_domain")
    @classmethod
    def _check_domain(cls, value: str) -> str:
        domain = value.strip().strip(".").lower()
        labels = domain.split(".")
        if not domain or any(
            not part or len(part) > 63 or not all(c.isalnum() or c == "-" for c in part)
            for part in labels
        ):
            raise ValueError(
                f"CTF_INSTANCE_DOMAIN must be a DNS name like ctf.example.org, got {value!r}"
            )
        return domain

    @model_validator(mode="after")
    def _check_cert_pair(self) -> Settings:
        if (self.ingress_cert_file is None) != (self.ingress_key_file is None):
            raise ValueError(
                "set both CTF_INGRESS_CERT_FILE and CTF_INGRESS_KEY_FILE (a wildcard "
                "certificate for *.CTF_INSTANCE_DOMAIN and its key), or neither"
            )
        return self

    @property
    def state_redis_url(self) -> str:
        """The Redis URL for instance state: ``CTF_REDIS_URL`` or the broker's."""
        return self.redis_url or self.broker_url

    @property
    def probe_host(self) -> str:
        """The address the worker uses to reach published ports when checking readiness."""
        if self.publish_ip in ("0.0.0.0", "::"):
            return "127.0.0.1"
        return self.publish_ip

    @property
    def ingress_trusted_networks(self) -> list[str]:
        """The networks of ``CTF_INGRESS_TRUSTED_PROXIES``, as CIDR strings."""
        parts = (p.strip() for p in self.ingress_trusted_proxies.split(","))
        return [str(ipaddress.ip_network(p, strict=False)) for p in parts if p]

    @property
    def egress_deny_networks(self) -> list[ipaddress.IPv4Network]:
        """The networks of ``CTF_EGRESS_DENY``."""
        parts = (p.strip() for p in self.egress_deny.split(","))
        return [ipaddress.IPv4Network(p, strict=False) for p in parts if p]

    def unprotected_redis_urls(self) -> list[str]:
        """Return the Redis URLs (host:port only) that point off loopback without a password.

        Whoever reaches such a Redis can send tasks and read every record, so start-up warns.
        """
        found = []
        for url in dict.fromkeys((self.broker_url, self.result_backend, self.state_redis_url)):
            parts = urlsplit(url)
            host = parts.hostname or "localhost"
            if parts.password or host == "localhost" or _is_loopback(host):
                continue
            found.append(f"{host}:{parts.port or 6379}")
        return found

    def admin_token_value(self) -> str:
        """Return the admin token (filled in by :func:`load_settings`)."""
        assert self.admin_token is not None, "build settings with load_settings()"
        return self.admin_token.get_secret_value()

    def flag_secret_value(self) -> str:
        """Return the flag secret (filled in by :func:`load_settings`)."""
        assert self.flag_secret is not None, "build settings with load_settings()"
        return self.flag_secret.get_secret_value()


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name: it may resolve anywhere


def _read_or_create_secret(path: Path) -> str:
    """Return the secret kept in ``path``, creating it (mode 0600) on first use."""
    try:
        return path.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        pass
    value = secrets.token_urlsafe(32)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, value.encode())
    finally:
        os.close(fd)
    return value


def load_settings(**overrides: object) -> Settings:
    """Build the settings from the environment, then fill in missing secrets.

    Secrets that are not set are generated on first run and kept in ``CTF_DATA_DIR``
    (``admin_token``, ``flag_secret``), so a restart keeps them. A secret shorter than
    ``MIN_SECRET_LENGTH`` characters (set or read from its file, empty included) is refused.

    Args:
        **overrides: field values that win over the environment (tests use these).

    Returns:
        The complete settings.

    Raises:
        pydantic.ValidationError: when a setting has an invalid value.

    """
    settings = Settings(**overrides)  # type: ignore[arg-type]
    generated: dict[str, str] = {}
    if settings.admin_token is None:
        generated["admin_token"] = _read_or_create_secret(settings.data_dir / "admin_token")
    if settings.flag_secret is None:
        generated["flag_secret"] = _read_or_create_secret(settings.data_dir / "flag_secret")
    if not generated:
        return settings
    # Built again with the files' values, so a short secret written by hand is refused too.
    return Settings(**{**overrides, **generated})  # type: ignore[arg-type]
