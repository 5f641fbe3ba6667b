"""``share: global`` (SPEC §13) on the fake engine: the reserved id, the catalog, the janitor."""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import pytest

from celery_app.core.catalog import build_catalog, shared_key
from celery_app.core.service import InstanceService
from celery_app.errors import CatalogError, InvalidTeamId, SharedInstance
from celery_app.ingress import Ingress
from celery_app.ingress.gate import Gate
from celery_app.loops.janitor import Janitor
from celery_app.settings import Settings
from celery_app.state.store import StateStore
from celery_app.vocab.models import NEVER_EXPIRES, InstanceKey, utcnow
from celery_app.vocab.naming import check_team_id
from ctf_testkit.fake_driver import FakeDriver

IMAGE = "ctf-test/http:unit"  # the fake engine's stand-in (tests/unit/conftest.py)
ENTRIES = {
    "shared": {"image": IMAGE, "port": 8080, "share": "global", "flag_env": "FLAG"},
    "web": {"image": IMAGE, "port": 8080},
}


@pytest.fixture
def gsvc(make_settings: Callable[..., Settings], driver: FakeDriver,
         store: StateStore) -> InstanceService:
    """A service whose catalog has a global challenge and a team one."""
    settings = make_settings(max_instances_per_team=1)
    catalog = build_catalog({"challenges": ENTRIES}, settings)
    return InstanceService(settings, catalog, driver, store)


def test_global_is_a_reserved_team_id() -> None:
    """``global`` is refused as a team id, but read from our own labels."""
    with pytest.raises(InvalidTeamId, match="reserved"):
        check_team_id("global")
    assert check_team_id("global", reserved=True) == "global"
    assert check_team_id("globals") == "globals"


@pytest.mark.parametrize(("extra", "words"), [
    ({"pool": 2}, "pool: 0"),
    ({"compose": "x.yaml", "image": "", "port": None}, "single image"),
    ({"stop_on_solve": True}, "remove one of them"),
])
def test_the_catalog_refuses_what_a_global_challenge_cannot_be(
    make_settings: Callable[..., Settings], extra: dict[str, object], words: str,
) -> None:
    """A pool, a Compose file or stop_on_solve with ``share: global`` is refused, saying how."""
    entry = {**ENTRIES["shared"], **extra}
    with pytest.raises(CatalogError, match=words):
        build_catalog({"challenges": {"shared": entry}}, make_settings(), base=Path("/"))


def test_behind_the_ingress_every_teams_link_opens_the_global_host(
    make_settings: Callable[..., Settings],
) -> None:
    """Behind Traefik a global challenge is accepted; each team's link and cookie pass its gate."""
    settings = make_settings(ingress="traefik")
    catalog = build_catalog({"challenges": {"shared": ENTRIES["shared"]}}, settings)
    assert catalog.get("shared").is_global
    ingress = Ingress(settings)
    url = ingress.url("shared", "global", "http", started_at="2026-12-01T00:00:00Z")
    shown = {"team_id": "global", "challenge": "shared", "status": "running", "url": url}
    gate = Gate(settings, settings.admin_token_value())
    host = url.split("://", 1)[1].split("/", 1)[0]
    for team in ("team1", "team2"):
        link = ingress.with_access(shown, team)["access_url"]
        token = link.rsplit("/", 1)[1]
        assert token.startswith(f"{team}.")  # the link names the team it was shown to
        status, headers, _ = gate.decide([(b"x-forwarded-host", host.encode()),
                                          (b"x-forwarded-uri", f"/_ctf/access/{token}".encode())])
        assert status == 302
        cookie = dict(headers)[b"set-cookie"].split(b";", 1)[0]
        status, _, _ = gate.decide([(b"x-forwarded-host", host.encode()), (b"cookie", cookie)])
        assert status == 200
    status, _, _ = gate.decide([(b"x-forwarded-host", host.encode())])
    assert status == 401  # no admission: no cookie


def test_a_teams_request_is_about_the_one_instance(gsvc: InstanceService) -> None:
    """Any team's key of a global challenge is ``global``'s; only the admin acts on it."""
    key = gsvc.catalog.key("shared", "team1")
    assert shared_key(gsvc.catalog, key, "team:team1", False) == InstanceKey("shared", "global")
    assert shared_key(gsvc.catalog, key, "admin", True) == InstanceKey("shared", "global")
    with pytest.raises(SharedInstance):
        shared_key(gsvc.catalog, key, "team:team1", True)
    web = gsvc.catalog.key("web", "team1")
    assert shared_key(gsvc.catalog, web, "team:team1", True) == web
    assert gsvc.catalog.key("shared", "global", admin=True).team == "global"
    with pytest.raises(InvalidTeamId):
        gsvc.catalog.key("web", "global", admin=True)
    with pytest.raises(InvalidTeamId):
        gsvc.catalog.key("shared", "global")


def test_the_janitor_starts_it_and_never_expires_it(gsvc: InstanceService,
                                                    driver: FakeDriver) -> None:
    """A pass starts the global instance; no later pass expires it; no team quota holds it."""
    janitor = Janitor(gsvc)
    summary = janitor.run_once()
    assert summary.started_global == ["shared/global"]
    inst = gsvc.store.get("shared", "global")
    assert inst is not None and inst.status == "running" and inst.expires_at == NEVER_EXPIRES
    assert driver.get_container("ctf-shared-global") is not None
    # A team at its quota of one still has room for its own: the global one is no team's.
    assert gsvc.start(gsvc.catalog.key("web", "team1")).status == "running"
    # Centuries later, it is still there; the listing of any team shows it.
    later = janitor.run_once(utcnow() + timedelta(days=365 * 500))
    assert "shared/global" not in later.expired and later.started_global == []
    assert [i.key for i in gsvc.status("team2")] == ["shared/global"]
    found, _beats = gsvc.view("team2", None, ["local"])
    assert [i.key for i in found] == ["shared/global"]


def test_the_janitor_starts_it_again_once_it_died(gsvc: InstanceService,
                                                  driver: FakeDriver) -> None:
    """A failed global instance is started again by the next pass, in a new container."""
    janitor = Janitor(gsvc)
    janitor.run_once()
    first = gsvc.store.get("shared", "global")
    assert first is not None
    driver.exit(first.container_id, 137)  # killed: the janitor's own pass marks it failed
    assert janitor.run_once().started_global == ["shared/global"]
    again = gsvc.store.get("shared", "global")
    assert again is not None and again.status == "running"
    assert again.container_id != first.container_id
