"""A remote Docker host reached over TLS with client certificates, as DEPLOYMENT.md says."""

from __future__ import annotations

import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import docker
import pytest
import redis
import requests
from conftest import RedisServer, private_label
from engines import SecondEngine, second_engine

from celery_app.settings import Settings
from celery_app.worker.context import build_context

pytestmark = [pytest.mark.docker, pytest.mark.redis, pytest.mark.slow]

LABEL = private_label("tls")
STATE_DB = 12  # away from the session worker's databases


@pytest.fixture(scope="module")
def tls_engine(images: dict[str, str]) -> Iterator[SecondEngine]:
    """A second Docker host whose API is on :2376, TLS with client certificates only."""
    with second_engine(images, LABEL, index=2, tls=True) as engine:
        yield engine


def test_the_tls_engine_refuses_a_client_without_a_certificate(
    tls_engine: SecondEngine,
) -> None:
    """The test engine really demands a client certificate (so the next test proves TLS)."""
    ca_only = docker.tls.TLSConfig(ca_cert=str(tls_engine.tls_dir / "ca.pem"), verify=True)
    client = docker.APIClient(base_url=tls_engine.tcp_url, version="1.41", timeout=10,
                              tls=ca_only)
    client.trust_env = False  # verify with our CA, so only the missing certificate can fail
    try:
        with pytest.raises(requests.exceptions.ConnectionError):
            client.ping()
    finally:
        client.close()


def test_a_host_without_docker_url_reaches_its_engine_through_the_tls_environment(
    tls_engine: SecondEngine, make_settings: Callable[..., Settings], redis_server: RedisServer,
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """DOCKER_HOST/DOCKER_TLS_VERIFY/DOCKER_CERT_PATH route a host's instances to its TLS engine."""
    addr = tls_engine.address
    hosts = tmp_path / "hosts.yaml"
    hosts.write_text(
        f"hosts:\n  beta: {{public_host: {addr}, publish_ip: {addr}, max_instances: 4}}\n"
    )
    # What DEPLOYMENT.md tells the organiser to put in that host's worker's environment.
    monkeypatch.setenv("DOCKER_HOST", tls_engine.tcp_url)
    monkeypatch.setenv("DOCKER_TLS_VERIFY", "1")
    monkeypatch.setenv("DOCKER_CERT_PATH", str(tls_engine.tls_dir / "client"))
    # Set system-wide on many hosts; it must not replace the engine's CA.
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", "/etc/ssl/certs/ca-certificates.crt")
    redis.Redis.from_url(f"{redis_server.url}/{STATE_DB}").flushdb()
    ctx = build_context(make_settings(hosts_file=hosts, host="beta", extra_labels=LABEL,
                                      redis_url=f"{redis_server.url}/{STATE_DB}"))
    engine = tls_engine.client
    assert engine is not None
    try:
        # Remote: instances are probed on the host's public address, not on container IPs
        # (which only its own machine can route to).
        assert not ctx.driver.is_local
        inst = ctx.service.start(ctx.service.catalog.key("web", "tls1"))
        assert inst.status == "running" and inst.host == "beta"
        port = inst.ports["8080/tcp"]
        assert inst.url == f"http://{addr}:{port}"
        with urllib.request.urlopen(inst.url, timeout=5) as answer:  # our own address
            assert b"hello from ctf" in answer.read()
        on_engine = engine.containers.get("ctf-web-tls1")
        assert on_engine.labels["ctf.host"] == "beta"

        ctx.service.stop(ctx.service.catalog.key("web", "tls1"))
        assert engine.containers.list(
                ignore_removed=True, all=True, filters={"name": "ctf-web-tls1"}) == []
        assert engine.networks.list(names=["ctf-team-tls1"]) == []
    finally:
        ctx.driver.close()
