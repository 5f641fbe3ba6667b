"""Three teams each run the shop (SPEC §12) on the real engine, started by name.

Each team's instance is its own network: its services find each other by service name, its
database holds its own team's flag, and nothing of one team's instance (web, db, by address
or by container name) is reached from another's. The shipped example, its images built for
this run, served by a real worker with default settings but the test run's.
"""

from __future__ import annotations

import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from itertools import permutations
from pathlib import Path
from typing import Any

import docker
import pytest
from conftest import RedisServer, private_label
from test_compose_docker import (  # noqa: F401  # module fixtures, one instance per module
    Setup,
    compose_catalog,
    compose_redis,
    compose_world,
    shop_images,
)

from celery_app.core.flags import team_flag

pytestmark = [pytest.mark.docker, pytest.mark.redis]

LABEL = private_label("compose-teams")
POOL = "10.247.0.0/17"  # this file's instance networks (test_compose_faults has the other half)
TEAMS = ("tx", "ty", "tz")


class TeamsSetup(Setup):
    """:class:`Setup` whose objects carry this file's label."""

    def containers(self, challenge: str, team: str) -> list[Any]:
        """The run's containers of the team's instance of ``challenge``."""
        labels = {**LABEL, "ctf.team": team, "ctf.challenge": challenge}
        return self.docker.containers.list(ignore_removed=True,
            all=True, filters={"label": [f"{k}={v}" for k, v in labels.items()]})


@pytest.fixture(scope="module")
def teams_setup(compose_redis: RedisServer, compose_catalog: Path,  # noqa: F811
                docker_client: docker.DockerClient,
                tmp_path_factory: pytest.TempPathFactory) -> Iterator[TeamsSetup]:
    """A worker (default settings but the test run's), a platform client and the API."""
    with compose_world(compose_redis, compose_catalog, docker_client,
                       tmp_path_factory.mktemp("compose-teams"), LABEL, POOL,
                       TeamsSetup) as world:
        assert isinstance(world, TeamsSetup)
        yield world


def _ip(container: Any) -> str:
    return str(next(iter(container.attrs["NetworkSettings"]["Networks"].values()))["IPAddress"])


def _get(container: Any, target: str, port: int) -> bytes:
    """What ``container`` gets from ``target:port`` for a GET (busybox nc, 2 s timeout)."""
    request = "printf 'GET /cgi-bin/stock HTTP/1.0\\r\\n\\r\\n'"
    _, out = container.exec_run(
        ["/bin/busybox", "sh", "-c", f"{request} | /bin/busybox nc -w 2 {target} {port}"])
    return bytes(out)


def test_three_teams_each_reach_their_own_shop_and_nothing_of_the_others(
    teams_setup: TeamsSetup,
) -> None:
    """Three shops: DNS by service name, each db its team's flag, no reach across teams."""
    setup = teams_setup
    flags = {team: team_flag(setup.secret, "shop", team).encode() for team in TEAMS}
    with ThreadPoolExecutor(len(TEAMS)) as pool:
        started = dict(zip(TEAMS, pool.map(lambda t: setup.start("shop", t), TEAMS),
                           strict=True))
    assert {inst["status"] for inst in started.values()} == {"running"}, started
    services = {team: {c.labels["ctf.service"]: c for c in setup.containers("shop", team)}
                for team in TEAMS}
    assert all(set(found) == {"web", "db", "bot"} for found in services.values())

    for team in TEAMS:
        web = services[team]["web"]
        # Service names resolve inside the instance: web's page asks "db" for the stock.
        port = started[team]["ports"]["8080/tcp"]
        page = urllib.request.urlopen(f"http://127.0.0.1:{port}/cgi-bin/stock", timeout=10).read()
        assert flags[team] in page
        assert not any(flags[other] in page for other in TEAMS if other != team)
        # The bot reaches web by its service name too.
        assert b"200 OK" in _get(services[team]["bot"], "web", 8080)
        # The db's own flag is the team's (its environment, filled in at the start).
        assert f"FLAG={flags[team].decode()}" in services[team]["db"].attrs["Config"]["Env"]
        assert flags[team] in _get(web, "db", 5432)

    # Across teams: no web reaches another team's db or web, by address or by name.
    probes = []
    for team, other in permutations(TEAMS, 2):
        web, theirs = services[team]["web"], services[other]
        probes += [(web, _ip(theirs["db"]), 5432), (web, _ip(theirs["web"]), 8080),
                   (web, theirs["db"].name, 5432), (web, theirs["web"].name, 8080)]
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda p: _get(*p), probes))
    for (web, target, port), answer in zip(probes, answers, strict=True):
        assert not any(flag in answer for flag in flags.values()), (web.name, target, port)
        assert b"HTTP/" not in answer, (web.name, target, port, answer)

    for team in TEAMS:
        assert setup.stop("shop", team)["status"] == "stopped"
        assert setup.containers("shop", team) == []
        assert setup.network("shop", team) is None
