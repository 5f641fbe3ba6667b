"""A Compose instance behind the ingress (SPEC §11 + §12) on the fake engine: a route per endpoint.

Traefik is not here (tests/test_compose_ingress.py runs the real one): the probe through the
ingress is replaced by one that reads the route file Traefik would load and asks whether a
running container of the fake engine is at the address it names.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from celery_app.core.service import InstanceService
from celery_app.errors import StartFailed
from celery_app.ingress import Ingress, routes, tokens
from celery_app.ingress.labels import endpoint_key, instance_label, label_of_host
from celery_app.vocab.naming import endpoint_route_name, route_container
from ctf_testkit.fake_driver import FakeDriver
from tests.unit.conftest import CATALOG, LABELS

SECRET = "unit-test-flag-secret-0123456789abcdefgh"
DOMAIN = "instances.test"
COMPOSE = """
services:
  web:
    image: ctf-test/ing-web:unit
    ports: ["8080"]
    depends_on: [db]
  api:
    image: ctf-test/ing-api:unit
    ports: ["9000", "9001"]
    x-ctf-protocol: tcp
  db:
    image: ctf-test/ing-db:unit
"""


def _routed_address(ingress: Ingress, label: str) -> str | None:
    """The backend address of the route file whose router serves ``label`` (what Traefik has)."""
    router = routes.router_name(label)
    for path in ingress.dynamic_dir.glob("*.yml"):
        config = yaml.safe_load(path.read_text())
        for kind in ("http", "tcp"):
            service = (config.get(kind) or {}).get("services", {}).get(router)
            if service:
                server = service["loadBalancer"]["servers"][0]
                return str(server.get("url") or server.get("address")).removeprefix("http://")
    return None


@pytest.fixture
def shop(make_service: Callable[..., InstanceService], driver: FakeDriver, tmp_path: Path,
         monkeypatch: pytest.MonkeyPatch) -> InstanceService:
    """The unit catalog plus ``shop`` (web, a two-port TCP api, db), with CTF_INGRESS=traefik."""
    folder = tmp_path / "shop-catalog"
    folder.mkdir()
    (folder / "compose.yaml").write_text(COMPOSE)
    catalog = folder / "challenges.yaml"
    catalog.write_text(CATALOG + "  shop:\n    compose: compose.yaml\n    start_timeout: 5\n")
    for service in ("web", "api", "db"):
        driver.add_image(f"ctf-test/ing-{service}:unit", None)

    def probe(self: Ingress, challenge: str, team_id: str, protocol: str, health_path: str,
              *, started_at: str, endpoint: str = "") -> Callable[[float], bool]:
        label = self.label(challenge, team_id, protocol, started_at, endpoint=endpoint)

        def check(_timeout: float) -> bool:
            address = _routed_address(self, label)
            return address is not None and any(
                f"{c.ip}:" in address and c.state == "running"
                for c in driver.list_containers(LABELS))

        return check

    monkeypatch.setattr(Ingress, "probe", probe)
    return make_service(challenges_file=catalog, ingress="traefik", flag_secret=SECRET,
                        instance_domain=DOMAIN)


def test_an_endpoint_label_is_its_own_and_the_primary_keeps_the_instances() -> None:
    """Each (service, port) gets a stable 80-bit label; the primary's is the single-image one."""
    primary = instance_label(SECRET, "shop", "alpha")
    api = instance_label(SECRET, "shop", "alpha", endpoint=endpoint_key("api", 9000))
    assert api == instance_label(SECRET, "shop", "alpha", endpoint=endpoint_key("api", 9000))
    assert len(api) == 16 and api.isalnum() and api.islower()
    others = {primary, instance_label(SECRET, "shop", "alpha", endpoint="api:9001"),
              instance_label(SECRET, "shop", "alpha", endpoint="web:9000"),
              instance_label(SECRET, "shop", "bravo", endpoint="api:9000"),
              instance_label(SECRET, "shop", "alpha", 1, endpoint="api:9000")}
    assert api not in others and len(others) == 5


def test_route_names_of_endpoints_map_back_to_their_container() -> None:
    """The primary's route is named after its container; the others add ``@<port>``."""
    assert endpoint_route_name("ctf-shop-alpha") == "ctf-shop-alpha"
    assert endpoint_route_name("ctf-shop-alpha.api", 9000) == "ctf-shop-alpha.api@9000"
    assert route_container("ctf-shop-alpha.api@9000") == "ctf-shop-alpha.api"
    assert route_container("ctf-shop-alpha") == "ctf-shop-alpha"


def test_every_endpoint_gets_a_route_and_a_url_of_its_own(shop: InstanceService,
                                                         driver: FakeDriver) -> None:
    """Web on the HTTP entry points, each TCP port by TLS+SNI; the db has no route; no port."""
    inst = shop.start(shop.catalog.key("shop", "alpha"))
    assert inst.status == "running"
    ingress = shop.ingress
    https_port = routes.bind_parts(shop.settings.ingress_https_bind)[1]
    http_port = routes.bind_parts(shop.settings.ingress_http_bind)[1]
    web_label = instance_label(SECRET, "shop", "alpha")
    assert inst.url == f"http://{web_label}.{DOMAIN}:{http_port}/"  # a single image's
    views = {(e.service, e.port): e for e in inst.endpoints or []}
    assert set(views) == {("web", 8080), ("api", 9000), ("api", 9001)}
    assert views[("web", 8080)].url == inst.url
    for port in (9000, 9001):
        label = instance_label(SECRET, "shop", "alpha", nonce=inst.started_at,
                               endpoint=f"api:{port}")
        assert views[("api", port)].url == f"tls://{label}.{DOMAIN}:{https_port}"
    assert sorted(p.name for p in ingress.dynamic_dir.glob("*.yml")) == [
        "ctf-shop-alpha.api@9000.yml", "ctf-shop-alpha.api@9001.yml", "ctf-shop-alpha.yml"]
    found = {c.labels["ctf.service"]: c for c in driver.list_containers(
        {**LABELS, "ctf.team": "alpha"})}
    assert _routed_address(ingress, web_label) == f"{found['web'].ip}:8080"
    api_label = label_of_host(views[("api", 9001)].url.split("://", 1)[1])  # type: ignore[union-attr]
    assert _routed_address(ingress, api_label) == f"{found['api'].ip}:9001"
    assert all(not c.ports for c in found.values())  # nothing published
    assert not any(spec.publish for spec in driver.specs.values())


def test_each_http_endpoint_gets_its_own_access_link(shop: InstanceService) -> None:
    """with_access adds an access_url per HTTP endpoint, signed for that endpoint's host."""
    inst = shop.start(shop.catalog.key("shop", "alpha"))
    shown: dict[str, Any] = shop.ingress.with_access(inst.public())
    key = tokens.gate_key(SECRET)
    for ep in shown["endpoints"]:
        if ep["protocol"] == "tcp":
            assert "access_url" not in ep
            continue
        label = label_of_host(ep["url"].split("://", 1)[1])
        token = ep["access_url"].rsplit("/", 1)[1]
        assert tokens.verify(key, "link", label, token).principal == "alpha"
    assert shown["access_url"].startswith(shown["url"].rstrip("/"))
    assert shown["endpoints"][0]["url"] == shown["url"]  # the primary: the instance's host


def test_stop_removes_every_endpoints_route(shop: InstanceService) -> None:
    """After a stop no route file of the instance is left (its hosts answer 404)."""
    shop.start(shop.catalog.key("shop", "alpha"))
    shop.stop(shop.catalog.key("shop", "alpha"))
    assert list(shop.ingress.dynamic_dir.glob("*.yml")) == []


def test_route_repair_rebuilds_lost_endpoint_routes_and_sweeps_stale_ones(
        shop: InstanceService) -> None:
    """sync_routes writes a lost endpoint route back and removes one no endpoint has."""
    shop.start(shop.catalog.key("shop", "alpha"))
    ingress = shop.ingress
    lost = ingress.route_file("ctf-shop-alpha.api@9000")
    before = lost.read_text()
    lost.unlink()
    stale = ingress.route_file("ctf-shop-alpha.api@9999")
    stale.write_text("{}\n")
    old = time.time() - shop.settings.orphan_grace - 5
    os.utime(stale, (old, old))
    shop.sync_routes()
    assert lost.read_text() == before
    assert not stale.exists()
    assert sorted(ingress.route_names()) == [
        "ctf-shop-alpha", "ctf-shop-alpha.api@9000", "ctf-shop-alpha.api@9001"]


def test_a_revocation_moves_every_endpoints_host_and_route(shop: InstanceService) -> None:
    """After ctfctl revoke the route repair moves each endpoint's route and URL to a new host."""
    inst = shop.start(shop.catalog.key("shop", "alpha"))
    before = {(e.service, e.port): e.url for e in inst.endpoints or []}
    shop.store.revoke_access("alpha")
    shop.sync_routes()
    moved = shop.get(shop.catalog.key("shop", "alpha"))
    after = {(e.service, e.port): e.url for e in moved.endpoints or []}
    assert set(after) == set(before)
    assert all(after[k] != before[k] for k in before)
    assert moved.url == after[("web", 8080)]
    for url in after.values():
        assert url is not None
        label = label_of_host(url.split("://", 1)[1])
        assert _routed_address(shop.ingress, label) is not None  # the new host is routed
    for url in before.values():
        assert url is not None
        assert _routed_address(shop.ingress, label_of_host(url.split("://", 1)[1])) is None


def test_a_failed_start_leaves_no_route(shop: InstanceService, driver: FakeDriver,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """An endpoint whose service dies during the start takes every route of the group along."""
    real_probe = Ingress.probe

    def dying(self: Ingress, challenge: str, team_id: str, protocol: str, health_path: str,
              *, started_at: str, endpoint: str = "") -> Callable[[float], bool]:
        check = real_probe(self, challenge, team_id, protocol, health_path,
                           started_at=started_at, endpoint=endpoint)
        if not endpoint.startswith("api:"):
            return check

        def never(_timeout: float) -> bool:
            for c in driver.list_containers({**LABELS, "ctf.service": "api"}):
                if c.state == "running":
                    driver.exit(c.id, 2, output="api crashed\n")
            return False

        return never

    monkeypatch.setattr(Ingress, "probe", dying)
    with pytest.raises(StartFailed, match="service api"):
        shop.start(shop.catalog.key("shop", "alpha"))
    assert list(shop.ingress.dynamic_dir.glob("*.yml")) == []
