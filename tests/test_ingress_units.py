"""The ingress's pure parts: labels, signed links and cookies, certificates, settings."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from cryptography import x509
from pydantic import ValidationError

from celery_app.errors import InvalidRequest
from celery_app.ingress import Ingress, routes, tokens
from celery_app.ingress.certs import ensure_certificate, self_signed
from celery_app.ingress.gate import split_cookies
from celery_app.ingress.labels import instance_label, label_of_host
from celery_app.ingress.setup import PLUGIN_SOURCE, prepare
from celery_app.settings import load_settings

SECRET = "unit-test-flag-secret-0123456789abcdefgh"
STARTED = "2026-12-03T13:00:00Z"


def test_label_is_stable_80_bits_and_depends_on_secret_challenge_and_team() -> None:
    """Same inputs, same label; any change of secret, challenge or team, another label."""
    label = instance_label(SECRET, "web", "alpha")
    assert label == instance_label(SECRET, "web", "alpha")
    assert len(label) == 16 and set(label) <= set("abcdefghijklmnopqrstuvwxyz234567")
    others = {instance_label(SECRET + "x", "web", "alpha"), instance_label(SECRET, "web2", "alpha"),
              instance_label(SECRET, "web", "alphb"), instance_label(SECRET, "we", "balpha")}
    assert label not in others and len(others) == 4


def test_label_moves_with_the_generation_and_a_tcp_instances_start() -> None:
    """A revocation (generation) moves every label; a TCP instance's also moves per instance."""
    http = Ingress(load_settings(flag_secret=SECRET, admin_token="a" * 40))
    assert http.label("web", "alpha", "http", STARTED) == instance_label(SECRET, "web", "alpha")
    assert http.label("web", "alpha", "http", "2026-12-03T14:00:00Z") \
        == http.label("web", "alpha", "http", STARTED)  # HTTP: the same on every start
    first = http.label("nc", "alpha", "tcp", STARTED)
    assert first != http.label("nc", "alpha", "tcp", "2026-12-03T14:00:00Z")
    revoked = Ingress(http.settings, lambda team: 1 if team == "alpha" else 0)
    assert revoked.label("web", "alpha", "http", STARTED) \
        != http.label("web", "alpha", "http", STARTED)
    assert revoked.label("nc", "alpha", "tcp", STARTED) != first
    assert revoked.label("web", "bravo", "http", STARTED) \
        == http.label("web", "bravo", "http", STARTED)


def test_label_of_host_drops_port_and_case() -> None:
    """The gate reads the label from Host / X-Forwarded-Host whatever the port and case."""
    assert label_of_host("ABCdef.instances.test:8080") == "abcdef"
    assert label_of_host("abc.instances.test") == "abc"
    assert label_of_host("[::1]:80") == ""


def test_tokens_are_bound_to_kind_label_and_time() -> None:
    """A token verifies only for its kind and host label, and only until it expires."""
    key = tokens.gate_key(SECRET)
    link = tokens.issue(key, "link", "abc", "alpha", 60, now=1000)
    assert tokens.verify(key, "link", "abc", link, now=1059).principal == "alpha"
    assert tokens.verify(key, "link", "abc", link, now=1061).reason == "expired"
    assert not tokens.verify(key, "cookie", "abc", link, now=1000).ok
    assert not tokens.verify(key, "link", "abd", link, now=1000).ok
    assert not tokens.verify(tokens.gate_key(SECRET + "x"), "link", "abc", link, now=1000).ok
    for bad in ("", "a.b", "alpha.notanumber.sig", "bad id.1100.sig", link + "x"):
        assert not tokens.verify(key, "link", "abc", bad, now=1000).ok


def test_split_cookies_keeps_every_other_cookie_as_sent() -> None:
    """Only our cookie is taken out; the others keep their text and order."""
    ours, others = split_cookies([b"a=1; ctf_ingress_access=XYZ;b=two words", b"c=3"])
    assert ours == ["XYZ"]
    assert others == [b"a=1", b"b=two words", b"c=3"]
    # The HTTPS name (__Host-) is ours too, and taken out the same way.
    ours, others = split_cookies([b"a=1; __Host-ctf_ingress_access=H; ctf_ingress_access=P"])
    assert ours == ["H", "P"] and others == [b"a=1"]


def test_urls_name_the_entry_points(tmp_path: Path) -> None:
    """http://host:port/ for HTTP (no port on 80), tls://host:port for TCP, https with a cert."""
    settings = load_settings(flag_secret=SECRET, admin_token="a" * 40, data_dir=tmp_path,
                             ingress="traefik", ingress_http_bind="0.0.0.0:80",
                             ingress_https_bind="0.0.0.0:443", instance_domain="Ctf.Example.ORG")
    ing = Ingress(settings)
    host = f"{instance_label(SECRET, 'web', 'alpha')}.ctf.example.org"
    tcp_host = f"{instance_label(SECRET, 'web', 'alpha', nonce=STARTED)}.ctf.example.org"
    assert ing.url("web", "alpha", "http", started_at=STARTED) == f"http://{host}/"
    assert ing.url("web", "alpha", "tcp", started_at=STARTED) == f"tls://{tcp_host}:443"
    link = ing.access_url(ing.url("web", "alpha", "http", started_at=STARTED), "alpha")
    assert link is not None and link.startswith(f"http://{host}/_ctf/access/alpha.")
    assert ing.access_url(ing.url("web", "alpha", "tcp", started_at=STARTED), "alpha") is None


def test_self_signed_certificate_covers_the_wildcard(tmp_path: Path) -> None:
    """Set-up makes a wildcard certificate for the domain, and a new one when it changes."""
    settings = load_settings(flag_secret=SECRET, admin_token="a" * 40, data_dir=tmp_path,
                             instance_domain="one.test")
    cert, key = ensure_certificate(settings, tmp_path)
    names = x509.load_pem_x509_certificate(cert.read_bytes()).extensions.get_extension_for_class(
        x509.SubjectAlternativeName).value.get_values_for_type(x509.DNSName)
    assert "*.one.test" in names and key.stat().st_mode & 0o777 == 0o600
    first = cert.read_bytes()
    assert ensure_certificate(settings, tmp_path)[0].read_bytes() == first  # kept
    other = settings.model_copy(update={"instance_domain": "two.test"})
    assert ensure_certificate(other, tmp_path)[0].read_bytes() != first


def test_organisers_certificate_must_cover_the_domain(tmp_path: Path) -> None:
    """CTF_INGRESS_CERT_FILE for another domain is refused with a message that says why."""
    self_signed("elsewhere.test", tmp_path / "c.pem", tmp_path / "k.pem")
    settings = load_settings(flag_secret=SECRET, admin_token="a" * 40, data_dir=tmp_path,
                             instance_domain="ctf.test", ingress_cert_file=tmp_path / "c.pem",
                             ingress_key_file=tmp_path / "k.pem")
    with pytest.raises(InvalidRequest, match=r"does not cover \*\.ctf\.test"):
        ensure_certificate(settings, tmp_path)


def test_bad_ingress_settings_are_refused(tmp_path: Path) -> None:
    """A bind without a port, a bad domain, or half a certificate pair is a clear error."""
    for bad in ({"ingress_http_bind": "0.0.0.0"}, {"instance_domain": "bad_domain!"},
                {"ingress_cert_file": tmp_path / "c.pem"}, {"ingress": "nginx"}):
        with pytest.raises(ValidationError):
            load_settings(flag_secret=SECRET, admin_token="a" * 40, data_dir=tmp_path, **bad)


def test_without_the_gate_the_route_has_no_middleware_and_access_url_is_the_url(
    tmp_path: Path,
) -> None:
    """CTF_INGRESS_AUTH=none: Traefik routes straight to the container; access_url is url."""
    settings = load_settings(flag_secret=SECRET, admin_token="a" * 40, data_dir=tmp_path,
                             ingress="traefik", ingress_auth="none")
    ing = Ingress(settings)
    ing.add_route("ctf-web-alpha", "web", "alpha", "http", "10.0.0.2", 8080, started_at=STARTED)
    config = yaml.safe_load(ing.route_file("ctf-web-alpha").read_text())
    routers = config["http"]["routers"]
    assert all(r["middlewares"] == [] for r in routers.values())
    url = ing.url("web", "alpha", "http", started_at=STARTED)
    shown = ing.with_access({"status": "running", "url": url, "team_id": "alpha"})
    assert shown["access_url"] == url


def test_prepare_installs_the_gate_plugin_and_declares_it(tmp_path: Path) -> None:
    """Set-up copies the plugin's Go source under plugins-local/ and names it to Traefik."""
    settings = load_settings(flag_secret=SECRET, admin_token="a" * 40, data_dir=tmp_path,
                             ingress="traefik")
    static = yaml.safe_load(prepare(settings).read_text())
    plugin = static["experimental"]["localPlugins"][routes.PLUGIN_NAME]
    folder = tmp_path / "ingress" / "plugins-local" / "src" / plugin["moduleName"]
    manifest = yaml.safe_load((folder / ".traefik.yml").read_text())
    assert manifest["import"] == plugin["moduleName"] and manifest["type"] == "middleware"
    assert (folder / "ctfgate.go").read_bytes() == (PLUGIN_SOURCE / "ctfgate.go").read_bytes()
    assert f'module {plugin["moduleName"]}' in (folder / "go.mod").read_text()
    assert (tmp_path / "ingress" / "dynamic").stat().st_mode & 0o777 == 0o700


def test_a_gated_route_carries_its_own_plugin_with_its_hosts_key(tmp_path: Path) -> None:
    """The route file (0600) names the plugin with the host key, never the gate key."""
    settings = load_settings(flag_secret=SECRET, admin_token="a" * 40, data_dir=tmp_path,
                             ingress="traefik")
    ing = Ingress(settings)
    ing.add_route("ctf-web-alpha", "web", "alpha", "http", "10.0.0.2", 8080, started_at=STARTED)
    path = ing.route_file("ctf-web-alpha")
    assert path.stat().st_mode & 0o777 == 0o600
    config = yaml.safe_load(path.read_text())["http"]
    label = ing.label("web", "alpha", "http", STARTED)
    name = f"{routes.GATE_MIDDLEWARE}-{label}"
    assert all(r["middlewares"] == [name] for r in config["routers"].values())
    plugin = config["middlewares"][name]["plugin"][routes.PLUGIN_NAME]
    key = tokens.gate_key(SECRET)
    assert plugin["key"] == tokens.encode_key(tokens.host_key(key, label))
    assert plugin["gate"] == routes.gate_url(settings) and plugin["label"] == label
    assert tokens.encode_key(key) not in path.read_text() and SECRET not in path.read_text()
    bravo = ing.label("web", "bravo", "http", STARTED)
    assert tokens.host_key(key, label) != tokens.host_key(key, bravo)


def test_forwardauth_setting_uses_the_shared_gate_and_no_plugin(tmp_path: Path) -> None:
    """CTF_INGRESS_GATE=forwardauth: routes use the shared forwardAuth; no plugin is loaded."""
    settings = load_settings(flag_secret=SECRET, admin_token="a" * 40, data_dir=tmp_path,
                             ingress="traefik", ingress_gate="forwardauth")
    static = yaml.safe_load(prepare(settings).read_text())
    assert "experimental" not in static
    ing = Ingress(settings)
    ing.add_route("ctf-web-alpha", "web", "alpha", "http", "10.0.0.2", 8080, started_at=STARTED)
    config = yaml.safe_load(ing.route_file("ctf-web-alpha").read_text())["http"]
    assert "middlewares" not in config
    assert all(r["middlewares"] == [routes.GATE_MIDDLEWARE] for r in config["routers"].values())
    with pytest.raises(ValidationError):
        load_settings(flag_secret=SECRET, admin_token="a" * 40, data_dir=tmp_path,
                      ingress_gate="nginx")
