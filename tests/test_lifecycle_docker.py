"""Lifecycle, limits, hardening, flags and pulls on the real engine and Redis (issue 3)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import threading
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import docker
import pytest
import redis
from celery import Celery
from conftest import (
    BUSYBOX,
    HTTP_DOCKERFILE,
    RUN_ID,
    TEST_LABEL,
    build_image,
    cleanup_docker,
    containers_of,
    free_port,
    janitor_pass,
    private_label,
    wait_for,
)
from fastapi.testclient import TestClient

from celery_app.api.app import create_app
from celery_app.core.flags import check_flag, team_flag
from celery_app.errors import (
    CapacityExhausted,
    ImageNotFound,
    MaxLifetimeReached,
    RateLimited,
    TeamQuotaExceeded,
)
from celery_app.loops import janitor as janitor_module
from celery_app.vocab.models import Instance, iso, parse_iso, utcnow
from celery_app.worker.context import Context

pytestmark = [pytest.mark.docker, pytest.mark.redis]


_containers = containers_of

def _networks(docker_client: Any) -> list[Any]:
    return docker_client.networks.list(filters={"label": [f"ctf.test={RUN_ID}"]})


# -- expiry and the janitor -------------------------------------------------------------------


@pytest.mark.usefixtures("clean_worker_state")
def test_beat_reaps_an_instance_when_its_ttl_passes(
    celery_client: Celery, docker_client: Any
) -> None:
    """An instance with a 3 s ttl is removed by the running beat's janitor, network too."""
    inst = celery_client.send_task("celery_app.tasks.start_container",
                                   args=["short", "ephemeral"]).get(timeout=60)
    assert inst["status"] == "running"
    wait_for(lambda: not _containers(docker_client, **{"ctf.team": "ephemeral"}), 30, 0.2,
             "the janitor to remove the expired container")
    wait_for(lambda: not docker_client.networks.list(names=["ctf-team-ephemeral"]), 15, 0.2,
             "the janitor to remove the team network")


def test_extend_pushes_expiry_up_to_max_lifetime(ctx: Context) -> None:
    """Extend adds the ttl to the expiry and stops at started_at + max_lifetime."""
    inst = ctx.service.start(ctx.service.catalog.key("short", "ext"))  # ttl 3, max_lifetime 8
    assert inst.expires - inst.started == timedelta(seconds=3)
    first = ctx.service.extend(ctx.service.catalog.key("short", "ext"))
    assert first.expires > inst.expires
    second = ctx.service.extend(ctx.service.catalog.key("short", "ext"))
    assert second.expires == inst.started + timedelta(seconds=8)
    with pytest.raises(MaxLifetimeReached, match="maximum lifetime"):
        ctx.service.extend(ctx.service.catalog.key("short", "ext"))
    assert ctx.service.get(ctx.service.catalog.key("short", "ext")).expires_at == second.expires_at


def test_janitor_removes_expired_instances(ctx: Context, docker_client: Any) -> None:
    """A janitor pass after the expiry removes the container and the record."""
    ctx.service.start(ctx.service.catalog.key("web", "old"))
    ctx.service.start(ctx.service.catalog.key("web", "young"))
    summary = janitor_pass(ctx, utcnow() + timedelta(seconds=601))
    assert sorted(summary.expired) == ["web/old", "web/young"]
    assert _containers(docker_client) == []
    assert ctx.service.status() == []
    # A second janitor (or a racing stop) finds nothing and reports nothing: harmless.
    assert janitor_pass(ctx, utcnow() + timedelta(seconds=601)).removed == 0
    # What it removed is counted for Prometheus.
    with TestClient(create_app(ctx.settings)) as api:
        text = api.get("/metrics").text
    line = next(ln for ln in text.splitlines()
                if ln.startswith('ctf_janitor_removed_total{kind="expired"}'))
    assert float(line.split()[-1]) >= 2


@pytest.fixture
def own_janitor_ctx(
    make_ctx: Callable[..., Context], docker_client: Any, redis_server: Any
) -> Iterator[Context]:
    """A context with its own label and Redis db, out of the session worker's janitor's reach."""
    label = private_label("netbudget")
    redis.Redis.from_url(f"{redis_server.url}/3").flushdb()
    try:
        yield make_ctx(extra_labels=label, redis_url=f"{redis_server.url}/3")
    finally:
        cleanup_docker(docker_client, label)


def _record_removals(
    ctx: Context, monkeypatch: pytest.MonkeyPatch,
    on_container: Callable[[], None] = lambda: None,
    on_network: Callable[[], None] = lambda: None,
) -> list[str]:
    removed: list[str] = []
    remove_container, remove_network = ctx.driver.remove_container, ctx.driver.remove_network

    def container(ref: str) -> bool:
        removed.append("container")
        on_container()
        return remove_container(ref)

    def network(ref: str) -> bool:
        removed.append("network")
        on_network()
        return remove_network(ref)

    monkeypatch.setattr(ctx.driver, "remove_container", container)
    monkeypatch.setattr(ctx.driver, "remove_network", network)
    return removed


def _team_networks(docker_client: Any, teams: list[str]) -> list[str]:
    names = {f"ctf-team-{t}" for t in teams}
    return sorted(n.name for n in docker_client.networks.list() if n.name in names)


def test_janitor_removes_emptied_networks_while_expired_containers_are_still_going(
    own_janitor_ctx: Context, docker_client: Any, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A team's network goes once its last expired container is gone, beside the other expiries."""
    ctx = own_janitor_ctx
    teams = ["nb1", "nb2", "nb3"]
    started = {team: ctx.service.start(ctx.service.catalog.key("web", team)) for team in teams}
    remove_container, remove_network = ctx.driver.remove_container, ctx.driver.remove_network
    a_network_went = threading.Event()
    seen: dict[str, bool] = {}

    def container(ref: str) -> bool:
        if ref == started["nb3"].container_id:
            # issue 27: a network removal runs while this expired container is still there
            seen["network before nb3's container"] = a_network_went.wait(30)
        return remove_container(ref)

    def network(ref: str) -> bool:
        done = remove_network(ref)
        a_network_went.set()
        return done

    monkeypatch.setattr(ctx.driver, "remove_container", container)
    monkeypatch.setattr(ctx.driver, "remove_network", network)
    # No time for the pass's later network step: the expiries' own networks go regardless.
    monkeypatch.setattr(janitor_module, "NETWORK_BUDGET", 0.0)
    first = janitor_pass(ctx, utcnow() + timedelta(seconds=601))
    assert sorted(first.expired) == [f"web/{t}" for t in teams]
    assert seen == {"network before nb3's container": True}
    assert sorted(first.orphan_networks) == [f"ctf-team-{t}" for t in teams]
    assert _team_networks(docker_client, teams) == []


def _three_expiring_and_one_later(ctx: Context, prefix: str) -> tuple[Instance, datetime]:
    """Three empty team networks left behind (<prefix>1-3), and <prefix>4 running; a moment.

    <prefix>1-3 are stopped with their networks kept, as a pass with no time left for
    networks leaves them; the moment is ten minutes on; <prefix>4 expires a day after it.
    """
    for i in (1, 2, 3):
        key = ctx.service.catalog.key("web", f"{prefix}{i}")
        ctx.service.start(key)
        ctx.service.stop(key, count_rate=False, keep_network=True)
    late = ctx.service.start(ctx.service.catalog.key("exposed", f"{prefix}4"))
    later = utcnow() + timedelta(seconds=601)
    late = late.model_copy(update={"expires_at": iso(later + timedelta(days=1))})
    ctx.store.put(late)
    return late, later


def test_janitor_network_removal_yields_to_a_newly_expired_instance(
    own_janitor_ctx: Context, docker_client: Any, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An instance expiring while networks are removed stops the pass; the next reaps it first."""
    ctx = own_janitor_ctx
    late, later = _three_expiring_and_one_later(ctx, "ny")
    # Expiring before this pass's clock passes its own "now": a few ms after the first network.
    ny4_expiry = later + timedelta(milliseconds=1)

    def expire_ny4_once() -> None:
        if removed.count("network") == 1:
            ctx.store.put(late.model_copy(update={"expires_at": iso(ny4_expiry)}))

    removed = _record_removals(ctx, monkeypatch, on_network=expire_ny4_once)
    monkeypatch.setattr(janitor_module, "NETWORK_MINIMUM", 1)
    first = janitor_pass(ctx, later)
    assert first.expired == []
    assert len(first.orphan_networks) == 1  # then it gave way
    second = janitor_pass(ctx, later + timedelta(seconds=1))
    assert second.expired == ["exposed/ny4"]
    assert len(second.orphan_networks) == 3  # ny4's, emptied by its expiry, and the two left
    assert removed == ["network"] + ["container"] + ["network"] * 3
    assert _team_networks(docker_client, ["ny1", "ny2", "ny3", "ny4"]) == []


def test_a_stream_of_expiries_does_not_starve_network_removal(
    own_janitor_ctx: Context, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Even with a new expiry waiting from the first network on, a pass removes its minimum."""
    ctx = own_janitor_ctx
    late, later = _three_expiring_and_one_later(ctx, "nm")

    def expire_nm4_at_the_first_network() -> None:
        ctx.store.put(late.model_copy(update={"expires_at": iso(later)}))

    removed = _record_removals(ctx, monkeypatch, on_network=expire_nm4_at_the_first_network)
    monkeypatch.setattr(janitor_module, "NETWORK_MINIMUM", 2)
    first = janitor_pass(ctx, later)
    assert first.expired == []  # nm4 expired after the pass judged expiries
    assert len(first.orphan_networks) == 2  # then it gave way to nm4
    assert removed == ["network"] * 2


def test_an_instance_the_janitor_cannot_remove_does_not_stall_network_removal(
    own_janitor_ctx: Context, docker_client: Any, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An expired instance whose lock someone holds is skipped, and emptied networks still go."""
    ctx = own_janitor_ctx
    for team in ("ns1", "ns2"):
        ctx.service.start(ctx.service.catalog.key("web", team))
    lock = ctx.store.instance_lock("web", "ns2", timeout=60)
    assert lock.acquire(blocking=False)
    try:
        summary = janitor_pass(ctx, utcnow() + timedelta(seconds=601))
    finally:
        lock.release()
    assert summary.expired == ["web/ns1"]
    assert summary.orphan_networks == ["ctf-team-ns1"]
    assert _team_networks(docker_client, ["ns1", "ns2"]) == ["ctf-team-ns2"]


def test_janitor_passes_do_not_pile_up(ctx: Context) -> None:
    """A pass that finds another pass of the same host running skips instead of queueing."""
    lock = ctx.store.redis.lock("ctf:janitor:local", timeout=30)
    # The session worker's janitor shares this Redis and host: wait out a pass of its own.
    wait_for(lambda: lock.acquire(blocking=False), 30, 0.05, "the janitor lock free")
    try:
        assert ctx.janitor.run_once().skipped
    finally:
        lock.release()
    assert janitor_pass(ctx) is not None  # a pass runs again once the lock is free


def test_janitor_removes_orphan_container_and_network(ctx: Context, docker_client: Any,
                                                      images: dict[str, str]) -> None:
    """Labelled containers and networks that no instance accounts for are removed."""
    labels = {**TEST_LABEL, "ctf.managed": "true", "ctf.team": "ghost", "ctf.challenge": "web"}
    orphan = docker_client.containers.run(images["http"], detach=True, labels=labels,
                                          name=f"stray-{RUN_ID}")
    # The low-level call: the SDK's networks.create reads the network back, and the session
    # worker's janitor may already have removed it (networks have no grace period).
    net_name = f"ctf-team-lonely-{RUN_ID}"
    docker_client.api.create_network(net_name, labels={**TEST_LABEL, "ctf.managed": "true",
                                                       "ctf.team": "lonely"})
    kept = ctx.service.start(ctx.service.catalog.key("web", "alive"))
    summary = janitor_pass(ctx, utcnow() + timedelta(seconds=60))
    # The session's worker runs a janitor too: whichever gets there first removes them.
    assert set(summary.orphan_containers) <= {f"stray-{RUN_ID}"}
    assert set(summary.orphan_networks) <= {net_name}
    assert summary.errors == []
    assert [c.id for c in _containers(docker_client)] == [kept.container_id]
    assert {n.name for n in _networks(docker_client)} == {"ctf-team-alive"}
    with pytest.raises(docker.errors.NotFound):
        docker_client.containers.get(orphan.id)


def test_flushall_then_reconcile_restores_everything(ctx: Context, redis_server: Any) -> None:
    """After Redis loses everything, reconcile rebuilds status and expiry from Docker labels."""
    a = ctx.service.start(ctx.service.catalog.key("web", "keep1"))
    b = ctx.service.start(ctx.service.catalog.key("exposed", "keep2"))
    redis.Redis.from_url(f"{redis_server.url}/2").flushall()
    assert ctx.service.status() == []
    summary = ctx.service.reconcile()
    # The session worker's janitor reconciles an emptied index too: either may adopt them.
    assert set(summary.adopted) <= {"exposed/keep2", "web/keep1"}
    restored = {i.key: i for i in ctx.service.status()}
    assert restored["web/keep1"].container_id == a.container_id
    assert restored["web/keep1"].status == "running"
    assert restored["web/keep1"].expires_at == a.expires_at
    assert restored["exposed/keep2"].url == b.url


def test_janitor_after_flushall_adopts_instead_of_deleting(ctx: Context, redis_server: Any,
                                                          docker_client: Any) -> None:
    """A janitor pass on an emptied Redis reconciles first: nothing running is removed."""
    inst = ctx.service.start(ctx.service.catalog.key("web", "survivor"))
    redis.Redis.from_url(f"{redis_server.url}/2").flushall()
    summary = janitor_pass(ctx, utcnow() + timedelta(seconds=30))
    assert summary.reconciled
    assert summary.orphan_containers == []
    assert [c.id for c in _containers(docker_client)] == [inst.container_id]


def test_reconcile_leaves_an_instance_busy_in_another_operation(own_janitor_ctx: Context,
                                                                 redis_server: Any) -> None:
    """Reconcile does not adopt a container whose (challenge, team) lock someone holds."""
    # Out of the session worker's reach: its janitor would adopt the container the moment
    # the lock is released, before this test's own reconcile looks.
    ctx = own_janitor_ctx
    inst = ctx.service.start(ctx.service.catalog.key("web", "inflight"))
    redis.Redis.from_url(f"{redis_server.url}/3").flushdb()
    lock = ctx.service.store.instance_lock("web", "inflight", timeout=30)
    assert lock.acquire(blocking=False)
    try:
        assert ctx.service.reconcile().adopted == []
        assert ctx.service.store.get("web", "inflight") is None
    finally:
        lock.release()
    assert ctx.service.reconcile().adopted == ["web/inflight"]
    adopted = ctx.service.store.get("web", "inflight")
    assert adopted is not None and adopted.container_id == inst.container_id


def test_reconcile_does_not_record_a_container_removed_after_the_listing(
    ctx: Context, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A container removed between reconcile's listing and its decision gets no record."""
    ctx.service.start(ctx.service.catalog.key("web", "vanish"))
    listing = ctx.driver.list_containers

    def list_then_remove(labels: Any = None) -> Any:
        found = listing(labels)
        # its container and record go meanwhile
        ctx.service.stop(ctx.service.catalog.key("web", "vanish"))
        return found

    monkeypatch.setattr(ctx.driver, "list_containers", list_then_remove)
    summary = ctx.service.reconcile()
    assert summary.adopted == []
    assert ctx.service.store.get("web", "vanish") is None


def test_reconcile_keeps_a_record_whose_container_appeared_after_the_listing(
    ctx: Context, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An instance started between reconcile's listing and its decision stays recorded."""
    listing = ctx.driver.list_containers

    def list_then_start(labels: Any = None) -> Any:
        found = listing(labels)
        ctx.service.start(ctx.service.catalog.key("web", "late"))
        return found

    monkeypatch.setattr(ctx.driver, "list_containers", list_then_start)
    summary = ctx.service.reconcile()
    assert summary.forgotten == []
    late = ctx.service.store.get("web", "late")
    assert late is not None and late.status == "running"


# -- limits -----------------------------------------------------------------------------------


def test_team_quota(make_ctx: Callable[..., Context], docker_client: Any) -> None:
    """A team at CTF_MAX_INSTANCES_PER_TEAM gets team_quota_exceeded and nothing more runs."""
    ctx = make_ctx(max_instances_per_team=1)
    ctx.service.start(ctx.service.catalog.key("web", "greedy"))
    with pytest.raises(TeamQuotaExceeded, match="stop one"):
        ctx.service.start(ctx.service.catalog.key("exposed", "greedy"))
    assert len(_containers(docker_client, **{"ctf.team": "greedy"})) == 1
    assert [i.challenge for i in ctx.service.status(team_id="greedy")] == ["web"]


def test_global_limit(make_ctx: Callable[..., Context], docker_client: Any) -> None:
    """At CTF_MAX_INSTANCES the next start gets capacity_exhausted; nothing is left half-made."""
    ctx = make_ctx(max_instances=2)
    ctx.service.start(ctx.service.catalog.key("web", "g1"))
    ctx.service.start(ctx.service.catalog.key("web", "g2"))
    with pytest.raises(CapacityExhausted, match="CTF_MAX_INSTANCES"):
        ctx.service.start(ctx.service.catalog.key("web", "g3"))
    assert len(_containers(docker_client)) == 2
    assert not docker_client.networks.list(names=["ctf-team-g3"])


def test_rate_limit_on_start_stop_loop(make_ctx: Callable[..., Context]) -> None:
    """A start/stop loop is cut off by the per-team rate limit with a clear wait time."""
    ctx = make_ctx(rate_limit_count=3, rate_limit_window=60)
    ctx.service.start(ctx.service.catalog.key("web", "loop"))
    ctx.service.stop(ctx.service.catalog.key("web", "loop"))
    ctx.service.start(ctx.service.catalog.key("web", "loop"))
    with pytest.raises(RateLimited, match=r"wait \d+ s"):
        ctx.service.stop(ctx.service.catalog.key("web", "loop"))
    # Another team is not affected.
    assert ctx.service.start(ctx.service.catalog.key("web", "calm")).status == "running"


def _two_free_ports() -> str:
    for _ in range(50):
        lo = free_port()
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", lo + 1))
            except OSError:
                continue
        return f"{lo}-{lo + 1}"
    raise AssertionError("no two adjacent free ports")


def test_port_range_exhausted(make_ctx: Callable[..., Context], docker_client: Any) -> None:
    """With a range of 2 ports the third start fails clearly and leaks nothing."""
    port_range = _two_free_ports()
    ctx = make_ctx(port_range=port_range)
    lo, hi = (int(p) for p in port_range.split("-"))
    a = ctx.service.start(ctx.service.catalog.key("web", "p1"))
    b = ctx.service.start(ctx.service.catalog.key("web", "p2"))
    assert {a.ports["8080/tcp"], b.ports["8080/tcp"]} == {lo, hi}
    with pytest.raises(CapacityExhausted, match="CTF_PORT_RANGE"):
        ctx.service.start(ctx.service.catalog.key("web", "p3"))
    assert not _containers(docker_client, **{"ctf.team": "p3"})
    assert not docker_client.networks.list(names=["ctf-team-p3"])
    assert ctx.service.store.get("web", "p3") is None


def test_subnet_pool_exhausted(make_ctx: Callable[..., Context], docker_client: Any) -> None:
    """A pool with room for one team network refuses the second team clearly."""
    ctx = make_ctx(team_subnet_pool="10.214.250.0/28", team_subnet_prefix=28)
    ctx.service.start(ctx.service.catalog.key("web", "first"))
    with pytest.raises(CapacityExhausted, match="CTF_TEAM_SUBNET_POOL"):
        ctx.service.start(ctx.service.catalog.key("web", "second"))
    assert not _containers(docker_client, **{"ctf.team": "second"})
    assert ctx.service.store.get("web", "second") is None


# -- hardening and flags ----------------------------------------------------------------------


def test_containers_are_hardened(ctx: Context, docker_client: Any) -> None:
    """Docker inspect shows caps dropped, no-new-privileges, memory/CPU/pids limits, loopback."""
    # memory 64m, cpus 0.5, pids 64
    inst = ctx.service.start(ctx.service.catalog.key("web", "hard"))
    hc = docker_client.api.inspect_container(inst.container_id)["HostConfig"]
    assert hc["CapDrop"] == ["ALL"]
    assert not hc["CapAdd"]
    assert "no-new-privileges:true" in hc["SecurityOpt"]
    assert hc["Memory"] == 64 * 1024**2
    assert hc["MemorySwap"] == 64 * 1024**2
    assert hc["NanoCpus"] == 500_000_000
    assert hc["PidsLimit"] == 64
    assert hc["Privileged"] is False
    assert hc["PortBindings"]["8080/tcp"][0]["HostIp"] == "127.0.0.1"


def test_flags_differ_per_team_and_survive_restart(ctx: Context, docker_client: Any) -> None:
    """flag_env gets a per-team flag: teams differ, a restart gives the same flag, it checks."""

    def flag_in(inst: Any) -> str:
        env = docker_client.api.inspect_container(inst.container_id)["Config"]["Env"]
        return next(e.split("=", 1)[1] for e in env if e.startswith("FLAG="))

    a = ctx.service.start(ctx.service.catalog.key("web", "fa"))
    b = ctx.service.start(ctx.service.catalog.key("web", "fb"))
    flag_a, flag_b = flag_in(a), flag_in(b)
    assert flag_a != flag_b
    assert flag_a.startswith("CTF{")
    ctx.service.stop(ctx.service.catalog.key("web", "fa"))
    assert flag_in(ctx.service.start(ctx.service.catalog.key("web", "fa"))) == flag_a
    secret = ctx.settings.flag_secret_value()
    assert flag_a == team_flag(secret, "web", "fa")
    assert check_flag(secret, "web", "fa", flag_a)
    assert not check_flag(secret, "web", "fb", flag_a)


# -- pulls ------------------------------------------------------------------------------------


@pytest.fixture
def registry(tmp_path: Path) -> Iterator[str]:
    """A real registry (Debian's docker-registry) on a free loopback port."""
    exe = shutil.which("docker-registry")
    assert exe, "docker-registry is missing: apt-get install docker-registry"
    port = free_port()
    config = tmp_path / "registry.yml"
    config.write_text(
        "version: 0.1\nstorage:\n  filesystem:\n    rootdirectory: "
        f"{tmp_path / 'store'}\nhttp:\n  addr: 127.0.0.1:{port}\n"
    )
    proc = subprocess.Popen([exe, "serve", str(config)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)

    def up() -> bool:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return True
        except OSError:
            return False

    try:
        wait_for(up, 15, message="the registry to listen")
        yield f"127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.mark.slow
def test_pull_from_registry_reports_progress(
    make_ctx: Callable[..., Context], docker_client: Any, registry: str, tmp_path: Path,
) -> None:
    """A missing image is pulled from the registry, with layer and byte progress reported."""
    remote = f"{registry}/ctf-test/pulled:{RUN_ID}"
    # A layer of fresh random bytes, so the engine really has something to download.
    build_image(docker_client, remote, HTTP_DOCKERFILE + "COPY noise.bin /noise.bin\n",
                {"busybox": BUSYBOX, "index.html": b"hello from ctf\n",
                 "noise.bin": os.urandom(2 * 1024 * 1024)})
    for _ in docker_client.images.push(remote, stream=True, decode=True):
        pass
    docker_client.images.remove(remote, force=True)
    catalog = tmp_path / "pull.yaml"
    catalog.write_text(f"challenges:\n  pulled:\n    image: {remote}\n    port: 8080\n")
    ctx = make_ctx(challenges_file=catalog)
    events: list[dict[str, Any]] = []
    try:
        inst = ctx.service.start(ctx.service.catalog.key("pulled", "puller"),
                                 progress=events.append)
        assert inst.status == "running"
        pulls = [e for e in events if e.get("phase") == "pulling"]
        assert pulls, events
        assert pulls[-1]["layers_total"] >= 1
        assert pulls[-1]["layers_done"] == pulls[-1]["layers_total"]
        assert pulls[-1]["bytes_done"] > 0
        assert [e["phase"] for e in events][-1] == "running"
    finally:
        ctx.service.stop(ctx.service.catalog.key("pulled", "puller"), count_rate=False)
        docker_client.images.remove(remote, force=True)


def test_pull_policy_never_refuses_missing_image(make_ctx: Callable[..., Context],
                                                  tmp_path: Path) -> None:
    """With CTF_PULL_POLICY=never a missing image is a clear error, not a pull."""
    catalog = tmp_path / "missing.yaml"
    catalog.write_text("challenges:\n  gone:\n    image: ctf-test/absent:nope\n    port: 80\n")
    ctx = make_ctx(challenges_file=catalog, pull_policy="never")
    with pytest.raises(ImageNotFound, match="CTF_PULL_POLICY"):
        ctx.service.start(ctx.service.catalog.key("gone", "team1"))


def test_unknown_image_in_registry_is_permanent(make_ctx: Callable[..., Context],
                                                registry: str, tmp_path: Path) -> None:
    """An image the registry does not have fails with ImageNotFound (no retry loop)."""
    catalog = tmp_path / "nope.yaml"
    catalog.write_text(f"challenges:\n  nope:\n    image: {registry}/no/such:img\n    port: 80\n")
    ctx = make_ctx(challenges_file=catalog)
    with pytest.raises(ImageNotFound):
        ctx.service.start(ctx.service.catalog.key("nope", "team1"))


def test_started_at_and_expiry_are_consistent(ctx: Context) -> None:
    """expires_at is started_at plus the challenge ttl."""
    inst = ctx.service.start(ctx.service.catalog.key("web", "times"))
    assert parse_iso(inst.expires_at) - parse_iso(inst.started_at) == timedelta(seconds=600)
