"""Every endpoint of a Compose instance (SPEC §12) where users look, and status verify.

The verify read (``InstanceService.status(verify=True)``: status reads while the event
follower is not live) checks every service of a group, not only the primary; ctfctl's table
and the CTFd plugin's player view list each endpoint with its own link.
"""

from __future__ import annotations

import importlib.util
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import pytest
from rich.console import Console

from celery_app.cli import _instance_table
from celery_app.core.service import InstanceService
from ctf_testkit.fake_driver import FakeDriver
from tests.unit.conftest import CATALOG, LABELS


def _plugin_client() -> ModuleType:
    """The CTFd plugin's client module (it needs no CTFd), loaded from its file."""
    path = Path(__file__).resolve().parents[2] / "integrations/ctfd/ctf_instancer/client.py"
    spec = importlib.util.spec_from_file_location("ctf_instancer_client_unit", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


plugin = _plugin_client()

COMPOSE = """
services:
  web:
    image: ctf-test/shop-web:unit
    ports: ["8080"]
    depends_on: [db]
  admin:
    image: ctf-test/shop-web:unit
    ports: ["1337"]
    x-ctf-protocol: tcp
  db:
    image: ctf-test/shop-db:unit
"""
ONE_SHOT = """
services:
  web:
    image: ctf-test/shop-web:unit
    ports: ["8080"]
    depends_on:
      migrate: {condition: service_completed_successfully}
  migrate:
    image: ctf-test/shop-db:unit
"""


@pytest.fixture
def shop(make_service: Callable[..., InstanceService], driver: FakeDriver,
         tmp_path: Path) -> InstanceService:
    """The service with the unit catalog plus ``shop`` (web http, admin tcp, db) and ``setup``."""
    (tmp_path / "compose.yaml").write_text(COMPOSE)
    (tmp_path / "one-shot.yaml").write_text(ONE_SHOT)
    catalog = tmp_path / "challenges.yaml"
    catalog.write_text(CATALOG + "  shop:\n    compose: compose.yaml\n    start_timeout: 5\n"
                                 "  setup:\n    compose: one-shot.yaml\n    start_timeout: 10\n")
    for service in ("web", "db"):
        driver.add_image(f"ctf-test/shop-{service}:unit", None)
    return make_service(challenges_file=catalog)


def _start_with_migrate_exiting(svc: InstanceService, driver: FakeDriver, code: int) -> None:
    """Start ``setup``; its one-shot ``migrate`` exits with ``code`` once it is made."""

    def finish() -> None:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            found = driver.list_containers({**LABELS, "ctf.service": "migrate"})
            if found:
                driver.exit(found[0].id, code)
                return
            time.sleep(0.01)

    helper = threading.Thread(target=finish)
    helper.start()
    try:
        assert svc.start(svc.catalog.key("setup", "team1")).status == "running"
    finally:
        helper.join()


def _service(driver: FakeDriver, name: str) -> str:
    found = driver.list_containers({**LABELS, "ctf.service": name})
    assert len(found) == 1
    return found[0].id


def _verified(svc: InstanceService, challenge: str = "shop") -> str:
    (inst,) = svc.status("team1", challenge, verify=True)
    return f"{inst.status}: {inst.error}"


def test_verify_sees_a_removed_service_of_a_group(shop: InstanceService,
                                                  driver: FakeDriver) -> None:
    """A group whose db was removed behind our back is reported failed, naming db."""
    inst = shop.start(shop.catalog.key("shop", "team1"))
    assert inst.status == "running"
    assert _verified(shop) == "running: None"
    driver.remove_container(_service(driver, "db"))
    assert _verified(shop) == "failed: service db: the container is gone"
    assert shop.store.get("shop", "team1").status == "running"  # type: ignore[union-attr]


def test_verify_sees_a_stopped_service(shop: InstanceService, driver: FakeDriver) -> None:
    """A service that exited (the tcp one here) fails the group, naming it."""
    shop.start(shop.catalog.key("shop", "team1"))
    driver.exit(_service(driver, "admin"), 2)
    assert _verified(shop) == "failed: service admin: the container is no longer running"


def test_verify_spares_a_finished_one_shot(shop: InstanceService, driver: FakeDriver) -> None:
    """A one-shot service others waited for, that exited 0, did its work: still running."""
    _start_with_migrate_exiting(shop, driver, 0)
    assert _verified(shop, "setup") == "running: None"
    driver.remove_container(_service(driver, "migrate"))
    assert _verified(shop, "setup") == "failed: service migrate: the container is gone"


def test_verify_of_a_single_image_instance_is_unchanged(svc: InstanceService,
                                                        driver: FakeDriver) -> None:
    """One image: running while its container runs, failed once it is gone, as before."""
    inst = svc.start(svc.catalog.key("web", "team1"))
    assert [i.status for i in svc.status("team1", verify=True)] == ["running"]
    driver.remove_container(inst.container_id)
    (seen,) = svc.status("team1", verify=True)
    assert (seen.status, seen.error) == ("failed", "the container is no longer running")


def test_ctfctl_shows_each_endpoint_on_its_own_line(shop: InstanceService) -> None:
    """Ctfctl status's table: one line per endpoint, with its service, port and address."""
    inst = shop.start(shop.catalog.key("shop", "team1")).public()
    console = Console(record=True, width=200)
    console.print(_instance_table([inst]))
    lines = console.export_text().splitlines()
    web, admin = inst["endpoints"]
    assert admin["url"].startswith("tcp://localhost:")
    assert [ln for ln in lines if f"web:8080 {web['url']}" in ln]
    assert [ln for ln in lines if f"admin:1337 {admin['url']}" in ln]


def test_the_ctfd_player_view_links_each_endpoint() -> None:
    """The plugin's endpoint list: a link per web endpoint (its access_url first), tcp as text."""
    inst = {"url": "http://h:1", "access_url": "http://a/?t=1", "endpoints": [
        {"service": "web", "port": 8080, "protocol": "http", "url": "http://h:1",
         "access_url": "http://web.t.ctf/?t=2"},
        {"service": "admin", "port": 1337, "protocol": "tcp", "url": "tcp://h:2"},
        {"service": "api", "port": 9000, "protocol": "http", "url": "http://h:3"}]}
    assert plugin.endpoint_links(inst) == [
        {"service": "web", "port": 8080, "protocol": "http", "address": "http://h:1",
         "web": True},
        {"service": "admin", "port": 1337, "protocol": "tcp", "address": "h:2", "web": False},
        {"service": "api", "port": 9000, "protocol": "http", "address": "http://h:3",
         "web": True}]
    assert plugin.link_target(inst, 0) == "http://web.t.ctf/?t=2"
    assert plugin.link_target(inst, 1) is None  # tcp: nothing a browser opens
    assert plugin.link_target(inst, 2) == "http://h:3"
    assert plugin.link_target(inst, 7) is None
    assert plugin.link_target(inst) == "http://a/?t=1"  # the primary, as before
    single = {"url": "http://h:9"}
    assert plugin.endpoint_links(single) == [] and plugin.link_target(single, 0) == "http://h:9"
