"""The Compose reader (SPEC §12): what an organiser's file becomes, and what it may not say."""

from __future__ import annotations

from pathlib import Path

import pytest

from celery_app.core.compose import load_compose, parse_compose
from celery_app.errors import CatalogError

SHOP = """
name: shop
x-common: &limits
  mem_limit: 128m
services:
  web:
    image: ctf-test/shop-web:1
    command: httpd -f -p 8080 -h /www
    environment:
      FLAG: ${CTF_FLAG}
      TEAM: "team=$CTF_TEAM"
      PRICE: "$$5"
      DEBUG: false
    ports: ["8080", {target: 9000, protocol: tcp}]
    depends_on:
      db: {condition: service_healthy}
      bot:
        condition: service_started
    <<: *limits
  bot:
    image: ctf-test/shop-bot:1
    depends_on: [db]
    x-ctf-protocol: tcp
    deploy: {resources: {limits: {cpus: "0.5", memory: 64mb, pids: 32}}}
    tmpfs: ["/tmp:size=8m", /run]
    read_only: true
    cap_add: [NET_BIND_SERVICE]
    user: "1000:1000"
    ports: ["1337"]
  db:
    image: ctf-test/shop-db:1
    expose: ["5432"]
    healthcheck:
      test: ["CMD", "nc", "-z", "127.0.0.1", "5432"]
      interval: 1s
      timeout: 500ms
      retries: 30
"""


def read(text: str) -> object:
    return parse_compose(text, "shop")


def refusal(text: str) -> str:
    with pytest.raises(CatalogError) as caught:
        parse_compose(text, "shop")
    return str(caught.value)


def test_services_start_in_dependency_order() -> None:
    """A service starts after those it depends on; independent ones keep file order."""
    app = parse_compose(SHOP, "shop")
    assert [s.name for s in app.services] == ["db", "bot", "web"]
    assert app.service("web").depends_on == {"db": "service_healthy", "bot": "service_started"}
    assert app.service("bot").depends_on == {"db": "service_started"}


def test_endpoints_in_file_order_with_per_service_protocol() -> None:
    """Every container port under ports is an endpoint; the first in file order is primary."""
    app = parse_compose(SHOP, "shop", protocol="http", health_path="/ready")
    assert [(e.service, e.port, e.protocol, e.health_path) for e in app.endpoints] == [
        ("web", 8080, "http", "/ready"), ("web", 9000, "http", "/ready"),
        ("bot", 1337, "tcp", "/ready"),
    ]
    assert app.primary.service == "web"
    assert app.service("db").expose == (5432,)


def test_limits_and_hardening_keys_are_read() -> None:
    """mem_limit (through a YAML merge), deploy limits, tmpfs, caps and user reach the model."""
    app = parse_compose(SHOP, "shop")
    web, bot = app.service("web"), app.service("bot")
    assert web.memory_bytes == 128 * 1024**2
    assert (bot.memory_bytes, bot.cpus, bot.pids) == (64 * 1024**2, 0.5, 32)
    assert bot.tmpfs == {"/tmp": 8 * 1024**2, "/run": 64 * 1024**2}
    assert (bot.read_only, bot.cap_add, bot.user) == (True, ("NET_BIND_SERVICE",), "1000:1000")
    assert app.service("db").memory_bytes is None  # the challenge's default applies


def test_healthcheck_and_command_forms() -> None:
    """A string command is split like a shell; durations become seconds."""
    app = parse_compose(SHOP, "shop")
    assert app.service("web").command == ("httpd", "-f", "-p", "8080", "-h", "/www")
    check = app.service("db").healthcheck
    assert check is not None
    assert check.test == ("CMD", "nc", "-z", "127.0.0.1", "5432")
    assert (check.interval, check.timeout, check.retries) == (1.0, 0.5, 30)


def test_flag_and_team_are_filled_in_per_team() -> None:
    """${CTF_FLAG} and ${CTF_TEAM} become the team's values, $$ a dollar sign."""
    web = parse_compose(SHOP, "shop").service("web")
    assert web.uses_flag
    mine = web.for_team("flag{abc}", "team1")
    assert mine.environment == {"FLAG": "flag{abc}", "TEAM": "team=team1", "PRICE": "$5",
                                "DEBUG": "false"}
    assert web.environment["FLAG"] == "${CTF_FLAG}"  # the catalog's copy is unchanged
    assert not parse_compose(SHOP, "shop").service("db").uses_flag


@pytest.mark.parametrize(
    ("service", "key"),
    [
        ("volumes: ['/:/host']", "volumes"),
        ("privileged: true", "privileged"),
        ("network_mode: host", "network_mode"),
        ("pid: host", "pid"),
        ("ipc: host", "ipc"),
        ("devices: ['/dev/kmsg']", "devices"),
        ("security_opt: ['seccomp:unconfined']", "security_opt"),
        ("build: .", "build"),
        ("networks: [backend]", "networks"),
        ("restart: always", "restart"),
        ("container_name: mine", "container_name"),
        ("cap_add: [SYS_ADMIN]", "cap_add"),
    ],
)
def test_keys_outside_the_subset_are_refused_naming_challenge_service_and_key(
    service: str, key: str
) -> None:
    """Each refused key's message names the challenge, the service and the key."""
    message = refusal(f"services:\n  web:\n    image: x\n    ports: ['80']\n    {service}\n")
    assert "'shop'" in message
    assert "'web'" in message
    assert key in message


@pytest.mark.parametrize(
    "ports", ["['8080:80']", "['127.0.0.1:8080:80']", "[{target: 80, published: 8080}]",
              "[{target: 80, host_ip: 0.0.0.0}]"],
)
def test_a_host_port_or_address_is_refused(ports: str) -> None:
    """The instancer publishes endpoints itself: a host port or address in ports is refused."""
    message = refusal(f"services:\n  web:\n    image: x\n    ports: {ports}\n")
    assert "host address or host port" in message
    assert "'ports'" in message


@pytest.mark.parametrize("value", ["${HOME}", "$USER", "${CTF_FLAG:-x}", "${CTF_FLAG", "a $ b"])
def test_other_variables_are_refused_at_start_up(value: str) -> None:
    """Nothing is read from the environment: only CTF_FLAG, CTF_TEAM and $$ may appear."""
    message = refusal(
        f"services:\n  web:\n    image: x\n    ports: ['80']\n    environment: {{A: '{value}'}}\n"
    )
    assert "'web'" in message
    assert "nothing is read from the environment" in message


def test_a_variable_without_value_is_refused() -> None:
    """A bare KEY in environment (Compose would read the shell's) is refused."""
    message = refusal("services:\n  web:\n    image: x\n    ports: ['80']\n"
                      "    environment: [SECRET]\n")
    assert "'SECRET' has no value" in message


def test_top_level_volumes_and_networks_are_refused() -> None:
    """An instance is its services on its own network: no volumes, secrets, networks."""
    for key in ("volumes: {data: {}}", "networks: {back: {}}", "secrets: {s: {file: ./s}}"):
        message = refusal(f"services:\n  web:\n    image: x\n    ports: ['80']\n{key}\n")
        assert key.split(":")[0] in message


def test_an_invalid_compose_file_is_refused_with_the_parsers_position() -> None:
    """A file the Compose Specification rejects is refused with the library's own words."""
    message = refusal("services:\n  web:\n    image: x\n    ports: ['80']\n    cpus: many\n")
    assert "not a valid Compose file" in message
    assert "float" in message


def test_dependency_errors() -> None:
    """An unknown dependency and a circle are refused, naming the services."""
    unknown = refusal("services:\n  web:\n    image: x\n    ports: ['80']\n"
                      "    depends_on: [db]\n")
    assert "no service 'db'" in unknown
    circle = refusal(
        "services:\n  a:\n    image: x\n    ports: ['80']\n    depends_on: [b]\n"
        "  b:\n    image: x\n    depends_on: [a]\n"
    )
    assert "circle" in circle


def test_a_file_with_no_endpoint_is_refused() -> None:
    """A challenge players could not reach at all is refused, saying how to fix it."""
    assert "no service has 'ports:'" in refusal("services:\n  web:\n    image: x\n")


def test_udp_ports_and_ranges_are_refused() -> None:
    """Endpoints are TCP ports, one each."""
    assert "only TCP" in refusal("services:\n  w:\n    image: x\n    ports: ['53/udp']\n")
    assert "ranges" in refusal("services:\n  w:\n    image: x\n    ports: ['80-90']\n")


def test_load_compose_names_an_unreadable_file(tmp_path: Path) -> None:
    """A missing file is named in the error."""
    with pytest.raises(CatalogError, match="cannot be read"):
        load_compose(tmp_path / "missing.yaml", "shop")


def test_the_shipped_example_reads_as_documented() -> None:
    """examples/shop: db starts first, web is the one endpoint, db alone holds the flag."""
    path = Path(__file__).resolve().parents[2] / "examples" / "shop" / "compose.yaml"
    app = load_compose(path, "shop")
    assert [s.name for s in app.services] == ["db", "web", "bot"]
    assert [(e.service, e.port) for e in app.endpoints] == [("web", 8080)]
    assert [s.name for s in app.services if s.uses_flag] == ["db"]
    assert app.service("web").depends_on == {"db": "service_healthy"}
