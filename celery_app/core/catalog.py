"""The challenge catalog: the default one (SPEC §1) or a YAML file (SPEC §8)."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from celery_app.core.compose import ComposeApp, load_compose
from celery_app.core.config_files import describe, read_yaml
from celery_app.errors import CatalogError, SharedInstance, UnknownChallenge
from celery_app.settings import Settings
from celery_app.vocab.limits import ALLOWED_CAPS, CATALOG_SIZE_RE, check_size
from celery_app.vocab.limits import catalog_size_bytes as _size_bytes
from celery_app.vocab.models import InstanceKey
from celery_app.vocab.naming import CHALLENGE_ID_RE, GLOBAL_TEAM, check_team_id, container_name

# docker run --user: a uid or name, optionally ":" and a gid or group name.
_USER_RE = re.compile(r"^(\d{1,10}|[a-z_][a-z0-9_.-]{0,31})(:(\d{1,10}|[a-z_][a-z0-9_.-]{0,31}))?$")


class Solver(BaseModel):
    """A challenge's solver (SPEC §14): a container run against its canary at each interval.

    It passes when it exits 0 within ``timeout`` seconds and prints the canary's flag.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    image: str = Field(min_length=1, max_length=512)
    command: list[str] | None = Field(None, min_length=1)
    interval: float = Field(300, ge=10, le=86400)
    timeout: float = Field(60, gt=0, le=3600)
    # The flag the run must print is the app's own in-app flag of this name (OWASP Juice
    # Shop's: the hex HMAC-SHA1 of the name under the key the canary got in ``flag_env``),
    # not the key itself, which the app never shows.
    flag_name: str | None = Field(None, min_length=1, max_length=200)
    # The solver receives the flag it must print in ``CTF_FLAG``: for an app that never shows
    # its flag to a script (the To-Do app keeps it in its environment, for a player with code
    # execution); the run then proves only what the solver checks before printing it.
    given_flag: bool = False


class Challenge(BaseModel):
    """One challenge of the catalog; ``None`` fields take the settings' defaults."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str = ""
    name: str = ""
    # One image (SPEC §8), or a Compose file of several services (SPEC §12): exactly one.
    compose: str | None = Field(None, min_length=1)
    image: str = Field("", validate_default=True)
    # The Compose file as read at start-up (build_catalog fills it in; never from the YAML).
    app: ComposeApp | None = None
    port: int | None = Field(None, ge=1, le=65535)
    protocol: Literal["http", "tcp"] = "http"
    health_path: str = "/"
    ttl: int | None = Field(None, gt=0)
    max_lifetime: int | None = Field(None, gt=0)
    memory: str = "512m"
    cpus: float = Field(1.0, gt=0, le=64)
    pids: int = Field(256, ge=16, le=65536)
    env: dict[str, str] = Field(default_factory=dict)
    flag_env: str | None = None
    start_timeout: float = Field(180, gt=0, le=3600)
    cap_add: list[str] = Field(default_factory=list)
    command: list[str] | None = None
    # What the instance may reach beyond its team network (SPEC §7): nothing, or the internet.
    egress: Literal["none", "internet"] = "none"
    # What an instance may write (a shell must not fill the host's disk): a read-only root
    # filesystem and size-limited tmpfs mounts by default; ``storage`` limits the writable
    # layer instead where the engine supports it (overlay2 on xfs with pquota).
    read_only: bool = True
    tmpfs: dict[str, str] = Field(default_factory=lambda: {"/tmp": "64m"})  # noqa: S108
    storage: str | None = None
    # The bound of a writable root filesystem on every engine (read_only: false; the default
    # is CTF_DEFAULT_DISK): the janitor stops an instance whose writable layer grew past it.
    disk: str | None = None
    # The user the process runs as: "uid", "uid:gid" or a user (and group) name of the image.
    user: str | None = None
    # Instances kept booted, unclaimed, on each host; a start claims one (issue 14, pool.py).
    pool: int = Field(0, ge=0, le=250)
    # SPEC §13: a correct flag check stops the team's instance (frees capacity once solved).
    stop_on_solve: bool = False
    # One instance per team (the default), or one for every team (SPEC §13): team id "global",
    # started and kept running by the workers, never expired, its flag one for all.
    share: Literal["team", "global"] = "team"
    # A solver proving the challenge still works, run against a canary instance (SPEC §14).
    solver: Solver | None = None

    @field_validator("memory")
    @classmethod
    def _check_memory(cls, value: str) -> str:
        text = str(value).strip().lower()
        if not CATALOG_SIZE_RE.match(text) or _size_bytes(text) < 6 * 1024**2:
            raise ValueError("must be a size of at least 6m, like 256m or 1g")
        return text

    @field_validator("tmpfs")
    @classmethod
    def _check_tmpfs(cls, value: dict[str, str]) -> dict[str, str]:
        checked = {}
        for path, size in value.items():
            if not path.startswith("/") or path == "/" or ".." in path.split("/") \
                    or "," in path or ":" in path:
                raise ValueError(f"{path!r} must be an absolute path below / (like /tmp)")
            checked[path] = check_size(size, f"size of {path}", 1024**2)
        return checked

    @field_validator("storage")
    @classmethod
    def _check_storage(cls, value: str | None) -> str | None:
        return None if value is None else check_size(value, "storage", 64 * 1024**2)

    @field_validator("disk")
    @classmethod
    def _check_disk(cls, value: str | None) -> str | None:
        return None if value is None else check_size(value, "disk", 16 * 1024**2)

    @field_validator("user")
    @classmethod
    def _check_user(cls, value: str | None) -> str | None:
        if value is not None and not _USER_RE.fullmatch(str(value)):
            raise ValueError("must be a uid, uid:gid or user name (like 1000, 1000:1000 or "
                             "node), as docker run --user takes it")
        return None if value is None else str(value)

    @field_validator("image")
    @classmethod
    def _check_image(cls, value: str, info: ValidationInfo) -> str:
        compose = info.data.get("compose")  # validated first: declared before image
        if compose is not None and value:
            raise ValueError("set either 'image' (one container) or 'compose' (a Compose file "
                             "of several services), not both")
        if compose is None and not value:
            raise ValueError("set 'image' (the challenge's image) or 'compose' (a Compose file, "
                             "relative to the catalog file)")
        return value

    @model_validator(mode="after")
    def _check_kind(self) -> Challenge:
        if self.compose is not None and self.port is not None:
            raise ValueError("a Compose challenge's ports are its services' 'ports:' in the "
                             "Compose file; remove 'port'")

        if self.solver is not None and self.solver.flag_name and not self.flag_env:
            # The app computes its in-app flags from the key it gets in flag_env.
            raise ValueError("the solver's 'flag_name' needs 'flag_env' (the variable the app "
                             "reads its key from, juice-shop: CTF_KEY); set it or remove "
                             "'flag_name'")
        if self.compose is not None and self.command is not None:
            raise ValueError("a Compose challenge's commands are its services' 'command:' in "
                             "the Compose file; remove 'command'")
        if self.compose is not None and self.egress != "none":
            # Never the whole group: a database or a bot beside the service that needs the
            # internet must not get it by the way (SPEC §12).
            raise ValueError("a Compose challenge's egress is chosen per service: put "
                             "'x-ctf-egress: internet' on the service that needs the internet "
                             "in the Compose file, and remove 'egress'")
        if self.share == "global" and self.compose is not None:
            raise ValueError("'share: global' takes a single image for now; a Compose "
                             "challenge is one instance per team: remove 'share' or use 'image'")
        if self.share == "global" and self.pool > 0:
            raise ValueError("'share: global' runs one instance that never expires: a warm "
                             "pool has nothing to serve; set pool: 0")
        if self.share == "global" and self.stop_on_solve:
            # One team's solve must not take the one instance down for every other team.
            raise ValueError("'stop_on_solve' stops a team's own instance; a 'share: global' "
                             "challenge's one instance serves every team: remove one of them")
        if self.compose is not None and self.storage is not None:
            raise ValueError("'storage' is not applied to Compose services yet; use 'disk' "
                             "(with read_only: false) or the services' read_only and tmpfs")
        return self

    @property
    def is_group(self) -> bool:
        """Whether an instance is several services (a Compose file, SPEC §12)."""
        return self.app is not None

    @property
    def is_global(self) -> bool:
        """Whether one instance serves every team (``share: global``, SPEC §13)."""
        return self.share == "global"

    def holder(self, team_id: str) -> str:
        """The team id of ``team_id``'s instance of this challenge: its own, or ``global``."""
        return GLOBAL_TEAM if self.share == "global" else team_id

    @property
    def containers(self) -> int:
        """How many containers one instance is: what it uses of the capacity limits.

        One per service of a Compose file (a one-shot service too: it runs, if briefly, and
        its container stays until the instance goes); one for a single image.
        """
        return 1 if self.app is None else len(self.app.services)

    @model_validator(mode="after")
    def _check_writable(self) -> Challenge:
        if self.storage is not None and self.read_only:
            raise ValueError("'storage' limits a writable root filesystem: set read_only: false")
        if self.disk is not None and self.read_only:
            raise ValueError("'disk' bounds a writable root filesystem: set read_only: false "
                             "(a read-only one writes only to its tmpfs sizes)")
        return self

    @property
    def disk_bytes(self) -> int | None:
        """The bound of the writable root filesystem in bytes (``None``: read-only)."""
        return None if self.disk is None or self.read_only else _size_bytes(self.disk)

    @property
    def tmpfs_bytes(self) -> dict[str, int]:
        """The tmpfs mounts: path -> size in bytes."""
        return {path: _size_bytes(size) for path, size in self.tmpfs.items()}

    @property
    def storage_bytes(self) -> int | None:
        """The writable layer's size limit in bytes, when set."""
        return None if self.storage is None else _size_bytes(self.storage)

    @field_validator("health_path")
    @classmethod
    def _check_health_path(cls, value: str) -> str:
        if not value.startswith("/"):
            raise ValueError("must start with '/'")
        return value

    @field_validator("cap_add")
    @classmethod
    def _check_caps(cls, value: list[str]) -> list[str]:
        caps = [cap.upper().removeprefix("CAP_") for cap in value]
        bad = sorted(set(caps) - ALLOWED_CAPS)
        if bad:
            raise ValueError(f"{bad} may not be added; allowed: {sorted(ALLOWED_CAPS)}")
        return caps

    @property
    def memory_bytes(self) -> int:
        """The memory limit in bytes."""
        return _size_bytes(self.memory)

    @property
    def has_flag(self) -> bool:
        """Whether each team's instance holds its own flag (SPEC §13, the catalog listing).

        True when ``flag_env`` is set (the team's flag, or the key of an app's in-app flags
        such as Juice Shop's) or a service of its Compose file uses ``${CTF_FLAG}``. Without
        it no container ever holds the flag, so a per-team flag check can never be solved.
        """
        if self.flag_env:
            return True
        return self.app is not None and any(s.uses_flag for s in self.app.services)

    def public_view(self) -> dict[str, Any]:
        """Return what players may see of the challenge: id, name, protocol, ttl, share, flag."""
        return {
            "id": self.id,
            "name": self.name,
            "protocol": self.protocol,
            "ttl": self.ttl,
            "max_lifetime": self.max_lifetime,
            "share": self.share,
            "flag": self.has_flag,
        }


DEFAULT_CATALOG: dict[str, dict[str, Any]] = {
    "todo-app": {
        "name": "Java To-Do App",
        "image": "pasapples/apjctf-todo-java-app:latest",
        "port": 8080,
        "protocol": "http",
        "health_path": "/",
        "memory": "512m",
        "env": {"JAVA_OPTS": "-Xmx256m"},
        # Each team's own flag, in the app's environment (SPEC §13: the plugin's default
        # per-team flag must be solvable); the app itself runs as before.
        "flag_env": "FLAG",
        # Writes in its own folders: a read-only root would break it (README, "Disk").
        "read_only": False,
        # SPEC §14: the app answers and shows its page (examples/solvers/todo-app). The app
        # shows no flag to a script, so the solver is given the one it prints.
        "solver": {"image": "ctf-example/todo-app-solver:1", "interval": 300, "timeout": 60,
                   "given_flag": True},
    },
    "juice-shop": {
        "name": "OWASP Juice Shop",
        "image": "bkimminich/juice-shop:latest",
        "port": 3000,
        "protocol": "http",
        "health_path": "/rest/admin/application-version",
        "memory": "512m",
        "env": {"NODE_ENV": "ctf"},
        "flag_env": "CTF_KEY",
        # Writes its database and logs inside /juice-shop (README, "Disk").
        "read_only": False,
        # SPEC §14: solves "Score Board" and prints the flag the shop shows for it
        # (examples/solvers/juice-shop).
        "solver": {"image": "ctf-example/juice-shop-solver:1", "interval": 300, "timeout": 60,
                   "flag_name": "Score Board"},
    },
}


class Catalog:
    """The challenges an instance can be started of, keyed by id."""

    def __init__(self, challenges: dict[str, Challenge]) -> None:
        self._challenges = dict(challenges)

    def __iter__(self) -> Iterator[Challenge]:
        return iter(self._challenges.values())

    def __len__(self) -> int:
        return len(self._challenges)

    def ids(self) -> list[str]:
        """Return the challenge ids, in catalog order."""
        return list(self._challenges)

    def get(self, challenge: object) -> Challenge:
        """Return the challenge named ``challenge``.

        Raises:
            UnknownChallenge: when the catalog has no such challenge.
        """
        if isinstance(challenge, str) and challenge in self._challenges:
            return self._challenges[challenge]
        known = ", ".join(self._challenges) or "(none)"
        raise UnknownChallenge(
            f"challenge {str(challenge)[:80]!r} is not in the catalog; known challenges: {known}"
        )

    def key(self, challenge: object, team_id: object, *, admin: bool = False) -> InstanceKey:
        """Validate a request's team and challenge into the key every layer below accepts.

        Args:
            challenge: the challenge id the caller sent.
            team_id: the team id the caller sent.
            admin: the organisers ask: they may name a ``share: global`` challenge's
                instance by its own team id, ``global`` (SPEC §13); nobody else may.

        Returns:
            The instance's key.

        Raises:
            InvalidTeamId: the team id breaks SPEC §3's rule (checked first).
            UnknownChallenge: the catalog has no such challenge.
        """
        if admin and team_id == GLOBAL_TEAM and self.get(challenge).is_global:
            return InstanceKey(self.get(challenge).id, GLOBAL_TEAM)
        team = check_team_id(team_id)
        return InstanceKey(self.get(challenge).id, team)


def shared_key(catalog: Catalog, key: InstanceKey, actor: str, acts: bool) -> InstanceKey:
    """Return the instance a team's request is about: its own, or a global challenge's one.

    Every team's request about a ``share: global`` challenge (SPEC §13) is about its one
    instance (team id ``global``); a team may start it (it runs already, or comes up) and read
    it, but only the organisers may act on it otherwise.

    Args:
        catalog: the challenges.
        key: the request, validated (:meth:`Catalog.key`).
        actor: who asks: ``admin`` or ``team:<team_id>`` (``celery_app.core.audit``).
        acts: the request stops, extends or restarts the instance.

    Raises:
        SharedInstance: a team acts on a global instance.
    """
    ch = catalog.get(key.challenge)
    if not ch.is_global:
        return key
    if acts and actor != "admin":
        raise SharedInstance(
            f"challenge {ch.id} has one instance for every team (share: global): only the "
            "organisers stop, extend or restart it; it never expires")
    return InstanceKey(ch.id, GLOBAL_TEAM)


def build_catalog(raw: object, settings: Settings, source: str = "catalog",
                  base: Path | None = None) -> Catalog:
    """Validate a raw ``{"challenges": {...}}`` mapping and fill in the defaults.

    Args:
        raw: the parsed YAML document.
        settings: supplies the default ttl and max lifetime.
        source: names the file in error messages.
        base: the folder ``compose:`` paths are relative to (the catalog file's; the
            current directory by default).

    Returns:
        The catalog.

    Raises:
        CatalogError: naming the challenge and field that is wrong.
    """
    if not isinstance(raw, dict) or not isinstance(raw.get("challenges"), dict):
        raise CatalogError(f"{source}: expected a mapping with a 'challenges:' mapping inside")
    entries: dict[str, Any] = raw["challenges"]
    if not entries:
        raise CatalogError(f"{source}: 'challenges:' is empty; add at least one challenge")
    challenges: dict[str, Challenge] = {}
    for cid, entry in entries.items():
        if not isinstance(cid, str) or not CHALLENGE_ID_RE.fullmatch(cid):
            raise CatalogError(
                f"{source}: challenge id {cid!r} is invalid: use letters, digits, '_' or '-'"
            )
        if not isinstance(entry, dict):
            raise CatalogError(f"{source}: challenge {cid!r} must be a mapping of fields")
        if "app" in entry:
            raise CatalogError(f"{source}: challenge {cid!r}, field 'app': unknown field; "
                               "name a Compose file with 'compose:'")
        try:
            challenge = Challenge.model_validate({**entry, "id": cid})
        except ValidationError as exc:
            raise CatalogError(describe(source, "challenge", cid, exc)) from None
        ttl = challenge.ttl or settings.default_ttl
        max_lifetime = challenge.max_lifetime or max(settings.default_max_lifetime, ttl)
        if max_lifetime < ttl:
            raise CatalogError(
                f"{source}: challenge {cid!r}, field 'max_lifetime': {max_lifetime} is shorter "
                f"than ttl {ttl}; make it at least the ttl"
            )
        update: dict[str, Any] = {"name": challenge.name or cid, "ttl": ttl,
                                  "max_lifetime": max_lifetime}
        if not challenge.read_only and challenge.disk is None:
            update["disk"] = settings.default_disk  # every writable instance is bounded
        if challenge.compose is not None:
            # Read now, at start-up: a mistake in the file is refused before any team starts.
            path = (base or Path.cwd()) / challenge.compose
            update["app"] = load_compose(path, cid, protocol=challenge.protocol,
                                         health_path=challenge.health_path)
            if challenge.pool > 0:
                _check_poolable(update["app"], cid, source)
        challenges[cid] = challenge.model_copy(update=update)
    _check_names_unambiguous(list(challenges), source)
    return Catalog(challenges)


def _check_poolable(app: ComposeApp, cid: str, source: str) -> None:
    """Refuse ``pool: N`` for a Compose file that uses ``${CTF_TEAM}`` (a pooled group's team).

    A pooled group boots before any team claims it, and a claim changes no container's
    environment or command: the team id cannot be filled in. (``${CTF_FLAG}`` can: a pooled
    group boots with its slot's flag, bound to the team at the claim.)
    """
    for service in app.services:
        keys = service.keys_using("CTF_TEAM")
        if keys:
            raise CatalogError(
                f"{source}: challenge {cid!r}, service {service.name!r}, key {keys[0]!r}: "
                "uses ${CTF_TEAM}, which a warm pool cannot fill in (its groups boot before "
                "any team claims them); set pool: 0, or drop ${CTF_TEAM} from the Compose file"
            )


def name_clash(short: str, long: str) -> str | None:
    """Return a team id whose ``short`` instance is named like another team's ``long`` one.

    Container names are ``ctf-<challenge>-<team>`` (SPEC §4). Two different instances share
    one name exactly when ``long`` is ``short + "-" + rest`` and team ``rest + "-" + t`` is a
    valid team id for some team ``t``: that needs ``rest`` to start with a letter or digit
    (a team id's first character); its length always fits, since ids are at most 63
    characters. Then ``ctf-<short>-<rest>-t`` is both team ``rest-t``'s ``short`` and team
    ``t``'s ``long``.

    Args:
        short: one challenge id.
        long: another, longer one.

    Returns:
        An example team id that clashes (``rest + "-x"``), or ``None`` when none can.

    """
    prefix = short + "-"
    if not long.startswith(prefix) or len(long) == len(prefix):
        return None
    rest = long[len(prefix):]
    return f"{rest}-x" if rest[0].isascii() and rest[0].isalnum() else None


def _check_names_unambiguous(ids: list[str], source: str) -> None:
    """Refuse two challenge ids whose instances could get one container name.

    Raises:
        CatalogError: naming both ids and an example of the clash.

    """
    for short in ids:
        for long in ids:
            team = name_clash(short, long) if len(short) < len(long) else None
            if team is not None:
                raise CatalogError(
                    f"{source}: challenge ids {short!r} and {long!r} can give two instances one "
                    f"container name: team {team!r}'s {short} and team 'x''s {long} would both "
                    f"be {container_name(short, team)}; rename one of them "
                    f"(e.g. {long.replace('-', '_')!r})"
                )


def load_catalog(settings: Settings) -> Catalog:
    """Load ``CTF_CHALLENGES_FILE`` when set, else the default catalog.

    Raises:
        CatalogError: when the file cannot be read or has a mistake.
    """
    path = settings.challenges_file
    if path is None:
        return build_catalog({"challenges": DEFAULT_CATALOG}, settings, "default catalog")
    raw = read_yaml(path, "CTF_CHALLENGES_FILE", CatalogError)
    return build_catalog(raw, settings, str(path), Path(path).resolve().parent)
