"""The CTFd plugin's server-side client: team ids, where settings come from, failures in words.

``integrations/ctfd/ctf_instancer/client.py`` needs no CTFd, so it is loaded on its own here;
the end-to-end test (test_ctfd_plugin.py) drives it through the real CTFd.
"""

from __future__ import annotations

import importlib.util
import re
import sys
import threading
from pathlib import Path
from types import ModuleType
from typing import Any

import ctfd_support
import httpx
import pytest
import uvicorn
from conftest import ROOT, free_port, wait_for

from celery_app.api.app import create_app
from celery_app.vocab.naming import TEAM_ID_RE


def _load() -> ModuleType:
    path = ROOT / "integrations" / "ctfd" / "ctf_instancer" / "client.py"
    spec = importlib.util.spec_from_file_location("ctf_instancer_client", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


client = _load()


def test_team_ids_pass_our_rule_and_never_collide() -> None:
    """CTFd teams and users map to distinct ids that our team-id rule accepts."""
    seen = set()
    for kind in ("t", "u"):
        for number in (1, 2, 10, 11, 99999999999):
            team_id = client.team_id_for("ctfd", kind, number)
            assert TEAM_ID_RE.fullmatch(team_id), team_id
            assert client.parse_team_id("ctfd", team_id) == (kind, number)
            seen.add(team_id)
    assert len(seen) == 10
    assert client.team_id_for("ctfd", "t", 7) == "ctfd-t7"
    assert client.parse_team_id("ctfd", "other-t7") is None  # another platform's team
    assert client.parse_team_id("ctfd", "ctfd-t7x") is None
    longest = client.team_id_for("p" * 41, "u", 10**18)
    assert TEAM_ID_RE.fullmatch(longest)


def test_environment_wins_over_the_admin_page(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """CTF_INSTANCER_* variables win over saved values; a bad prefix falls back to ctfd."""
    for name in ("CTF_INSTANCER_URL", "CTF_INSTANCER_ADMIN_TOKEN",
                 "CTF_INSTANCER_ADMIN_TOKEN_FILE", "CTF_INSTANCER_TEAM_PREFIX"):
        monkeypatch.delenv(name, raising=False)
    stored = {"url": "http://saved:8000/", "token": "saved-token",
              "token_url": "http://saved:8000", "prefix": "event1"}
    conn = client.resolve(stored)
    assert (conn.url, conn.admin_token, conn.prefix) == ("http://saved:8000", "saved-token",
                                                          "event1")
    assert conn.token_source == "the admin page"
    assert (conn.url_env, conn.token_env, conn.prefix_env) == (None, None, None)
    token_file = tmp_path / "admin_token"
    token_file.write_text("")  # an empty file gives no token: the page's field stays usable
    monkeypatch.setenv("CTF_INSTANCER_ADMIN_TOKEN_FILE", str(token_file))
    assert client.resolve(stored).token_env is None
    token_file.write_text("file-token\n")
    monkeypatch.setenv("CTF_INSTANCER_URL", "http://env:9000")
    monkeypatch.setenv("CTF_INSTANCER_ADMIN_TOKEN_FILE", str(token_file))
    monkeypatch.setenv("CTF_INSTANCER_TEAM_PREFIX", "bad prefix!")
    conn = client.resolve(stored)
    assert (conn.url, conn.admin_token, conn.prefix) == ("http://env:9000", "file-token", "ctfd")
    assert "CTF_INSTANCER_ADMIN_TOKEN_FILE" in conn.token_source
    # Each field the environment sets names its variable (the settings page locks it), an
    # invalid prefix too: the page cannot override it either.
    assert (conn.url_env, conn.token_env, conn.prefix_env) == (
        "CTF_INSTANCER_URL", "CTF_INSTANCER_ADMIN_TOKEN_FILE", "CTF_INSTANCER_TEAM_PREFIX")
    monkeypatch.setenv("CTF_INSTANCER_ADMIN_TOKEN", "env-token")
    assert client.resolve(stored).admin_token == "env-token"
    assert client.resolve(stored).token_env == "CTF_INSTANCER_ADMIN_TOKEN"


def test_the_settings_page_goes_by_one_name() -> None:
    """The plugin's messages, pages and docs name its settings page Admin > Instancer > Settings."""
    plugin = ROOT / "integrations" / "ctfd" / "ctf_instancer"
    for path in sorted(plugin.rglob("*")):
        if path.is_file() and path.suffix in {".py", ".js", ".html", ".md"}:
            text = path.read_text(encoding="utf-8")
            for other in ("Plugins > Instancer", "Admin > Instances", "Connection settings",
                          "Instancer settings", "Instances > Settings"):
                assert other not in text, f"{path.name} still says {other!r}"
    assert client.SETTINGS_PAGE == "Admin > Instancer > Settings"
    with pytest.raises(client.NotConfigured, match=re.escape(client.SETTINGS_PAGE)):
        client.InstancerClient(client.Connection(None, "t", "ctfd", "", "", ""))
    with pytest.raises(client.NotConfigured, match=re.escape(client.SETTINGS_PAGE)):
        client.InstancerClient(client.Connection("http://x", None, "ctfd", "", "", ""))


def test_a_saved_token_is_sealed_and_used_only_with_its_url(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The saved token opens only with CTFd's key, unchanged, and goes only to its own URL."""
    for name in ("CTF_INSTANCER_URL", "CTF_INSTANCER_ADMIN_TOKEN",
                 "CTF_INSTANCER_ADMIN_TOKEN_FILE"):
        monkeypatch.delenv(name, raising=False)
    key, token = b"ctfd-secret-key", "the-instancer-admin-token-0123456789"
    sealed = client.seal_token(key, "http://instancer:8000/", token)
    assert token not in sealed
    assert client.open_token(key, sealed) == ("http://instancer:8000", token)
    assert client.open_token(b"another-ctfd-key", sealed) is None
    flipped = sealed[:-3] + ("A" if sealed[-3] != "A" else "B") + sealed[-2:]
    assert client.open_token(key, flipped) is None
    assert client.open_token(key, token) is None  # a plain-text token of an older version
    own = {"url": "http://instancer:8000", "token": token, "token_url": "http://instancer:8000"}
    assert client.resolve(own).admin_token == token
    moved = client.resolve({**own, "url": "http://attacker.example"})
    assert moved.admin_token is None
    assert "saved for another URL" in moved.token_source
    with pytest.raises(client.NotConfigured, match="admin token is not set"):
        client.InstancerClient(moved)


def test_missing_settings_and_a_dead_instancer_say_what_to_do() -> None:
    """No URL or token, or nobody listening: a typed error whose words a player can read."""
    with pytest.raises(client.NotConfigured, match="URL is not set"):
        client.InstancerClient(client.resolve({"token": "t"}))
    with pytest.raises(client.NotConfigured, match="admin token is not set"):
        client.InstancerClient(client.resolve({"url": "http://127.0.0.1:9"}))
    dead = client.InstancerClient(client.resolve({"url": "http://127.0.0.1:9", "token": "t",
                                                  "token_url": "http://127.0.0.1:9"}))
    with pytest.raises(client.InstancerError, match=re.escape(client.UNREACHABLE)) as err:
        dead.instance("ctfd-t1", "web")
    assert err.value.status == 503
    assert dead.check_flag("ctfd-t1", "web", "x" * 300) is False  # over the API's limit


def test_missing_ctfd_source_is_named_in_the_skip_reason(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Without CTFd's source the e2e tests learn why, naming the path and the variable."""
    missing = tmp_path / "no-such-CTFd.tar.gz"
    monkeypatch.setenv("CTF_CTFD_SOURCE", str(missing))
    with pytest.raises(ctfd_support.CtfdUnavailable, match="CTF_CTFD_SOURCE") as err:
        ctfd_support.source()
    assert str(missing) in str(err.value)
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setenv("CTF_CTFD_SOURCE", str(empty))
    monkeypatch.setenv("CTF_CTFD_CACHE", str(tmp_path / "cache"))
    with pytest.raises(ctfd_support.CtfdUnavailable, match="holds no CTFd source"):
        ctfd_support.prepare()


def test_the_link_goes_through_the_ingress_access_url_when_there_is_one() -> None:
    """A click goes to access_url (the ingress's signed link) if present, else to url."""
    url = "http://localhost:32771"
    access = "http://abc.ctf.example.test/_ctf/access?t=signed"
    assert client.link_target({"url": url, "access_url": access}) == access
    assert client.link_target({"url": url}) == url
    assert client.link_target({"url": url, "access_url": None}) == url
    assert client.link_target({"url": "tls://abc.ctf.example.test:443"}) is None
    assert client.link_target(None) is None


def test_after_a_revocation_the_plugin_fetches_the_teams_new_token(
    make_settings: Any,
) -> None:
    """A cached team token refused after `revoke` is fetched anew once, and the call succeeds."""
    settings = make_settings()
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(settings), host="127.0.0.1", port=port,
                                           log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        wait_for(lambda: server.started, 30, 0.05, "the API to serve")
        url = f"http://127.0.0.1:{port}"
        conn = client.Connection(url=url, admin_token=settings.admin_token_value(), prefix="ctfd",
                                 url_source="test", token_source="test", prefix_source="test")
        api = client.InstancerClient(conn)
        team = client.team_id_for("ctfd", "t", 4242)
        assert api.instance(team, "web") is None  # caches the team's token
        old = api.team_token(team)
        revoked = httpx.post(f"{url}/api/v1/teams/{team}/revoke",
                             headers={"Authorization": f"Bearer {settings.admin_token_value()}"})
        assert revoked.status_code == 200
        assert httpx.get(f"{url}/api/v1/teams/{team}/instances",
                         headers={"Authorization": f"Bearer {old}"}).status_code == 401
        assert api.instance(team, "web") is None  # not "refused CTFd's admin token"
        assert api.team_token(team) == revoked.json()["token"] != old
    finally:
        server.should_exit = True
        thread.join(10)
