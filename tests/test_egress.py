"""The egress firewall on the real engine (SPEC §7, issue 16).

An instance reaches its team and, if allowed, the internet; never the host, its bridges,
other hosts or private ranges. Traffic goes only to this machine's own addresses and to
network-namespace hosts the tests make: one at a private address standing in for another
of our hosts, one in 203.0.113.0/24 standing in for the internet. The metadata address is
never probed; its rule is checked. Each test uses a subnet pool of its own, so its nftables
table (named after the pool) is its own too; it is removed at the end, pass or fail.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from conftest import ROOT, private_label, wait_for
from engines import second_engine

from celery_app.context import Context
from celery_app.core.catalog import Challenge, build_catalog
from celery_app.engine.firewall import METADATA_ADDRESS, table_name
from celery_app.errors import CatalogError

pytestmark = [pytest.mark.docker, pytest.mark.redis]

POOL = "10.243.0.0/16"          # the main engine's instances in these tests
ENGINE_POOL = "10.244.0.0/16"   # the second engine's
TAG = f"{os.getpid() % 100000}"

needs_root = pytest.mark.skipif(
    os.geteuid() != 0 or not shutil.which("nft") or not shutil.which("nsenter"),
    reason="the egress firewall needs root, nft and nsenter",
)


def _run(*cmd: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=60)
    if check and done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed: {done.stderr.strip()}")
    return done


# -- listeners and namespace hosts -------------------------------------------------------------

LISTENER = """
import socket, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], int(sys.argv[2]))); s.listen(16)
print("ready", flush=True)
while True:
    c, _ = s.accept()
    with c:
        c.sendall(sys.argv[3].encode() + b"\\n")
"""


@contextlib.contextmanager
def listener(marker: str, netns: str | None = None, bind: str = "0.0.0.0") -> Iterator[int]:
    """A TCP listener answering ``marker`` on every address of the host (or of ``netns``)."""
    port = random.randint(20000, 29999)
    prefix = ["nsenter", f"--net=/var/run/netns/{netns}"] if netns else []
    proc = subprocess.Popen([*prefix, sys.executable, "-c", LISTENER, bind, str(port), marker],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert b"ready" in line, line + proc.stdout.read()
        yield port
    finally:
        proc.kill()
        proc.wait(10)
        if proc.stdout is not None:
            proc.stdout.close()


@dataclass
class NetnsHost:
    """A host in its own network namespace, linked to this machine by a veth pair."""

    name: str
    host_ip: str   # this machine's end of the link
    peer_ip: str   # the namespace host's address

    def start(self) -> None:
        veth, peer = f"{self.name}h", f"{self.name}p"
        inside = ("nsenter", f"--net=/var/run/netns/{self.name}")
        _run("ip", "netns", "add", self.name)
        _run("ip", "link", "add", veth, "type", "veth", "peer", "name", peer)
        _run("ip", "link", "set", peer, "netns", self.name)
        _run("ip", "addr", "add", f"{self.host_ip}/30", "dev", veth)
        _run("ip", "link", "set", veth, "up")
        _run(*inside, "ip", "addr", "add", f"{self.peer_ip}/30", "dev", peer)
        _run(*inside, "ip", "link", "set", peer, "up")
        _run(*inside, "ip", "link", "set", "lo", "up")
        _run(*inside, "ip", "route", "add", "default", "via", self.host_ip)

    def stop(self) -> None:
        _run("ip", "link", "del", f"{self.name}h", check=False)
        _run("ip", "netns", "del", self.name, check=False)


@contextlib.contextmanager
def netns_host(name: str, host_ip: str, peer_ip: str) -> Iterator[NetnsHost]:
    """Make a :class:`NetnsHost`; remove it afterwards, pass or fail."""
    host = NetnsHost(name, host_ip, peer_ip)
    try:
        host.start()
        yield host
    finally:
        host.stop()


def reaches(container: Any, address: str, port: int, marker: str) -> bool:
    """Whether ``container`` gets ``marker`` from ``address:port`` (busybox nc, 2 s)."""
    # An HTTP request: the stand-in challenge answers it, our listeners answer anything.
    _, out = container.exec_run(["/bin/busybox", "sh", "-c",
                                 f"printf 'GET / HTTP/1.0\\r\\n\\r\\n' | "
                                 f"/bin/busybox nc -w 2 {address} {port}"])
    return marker.encode() in out


def host_reaches(address: str, port: int, marker: str) -> bool:
    """Whether this machine itself gets ``marker`` from ``address:port``."""
    try:
        with socket.create_connection((address, port), timeout=3) as s:
            return marker.encode() in s.recv(200)
    except OSError:
        return False


def nft(*args: str, netns: str | None = None) -> subprocess.CompletedProcess[str]:
    """Run nft here (or inside ``netns``) without raising."""
    prefix = ["nsenter", f"--net=/var/run/netns/{netns}"] if netns else []
    return _run(*prefix, "nft", *args, check=False)


def host_address() -> str:
    """Return this machine's own main address (the one its default route leaves by)."""
    out = _run("ip", "-4", "-o", "route", "get", "198.51.100.1").stdout
    return out.split(" src ")[1].split()[0]


def docker0_address() -> str | None:
    out = _run("ip", "-4", "-o", "addr", "show", "dev", "docker0", check=False).stdout
    return out.split(" inet ")[1].split("/")[0] if " inet " in out else None


def ip_of(container: Any) -> str:
    container.reload()
    return str(next(iter(container.attrs["NetworkSettings"]["Networks"].values()))["IPAddress"])


def gateway_of(container: Any) -> str:
    container.reload()
    return str(next(iter(container.attrs["NetworkSettings"]["Networks"].values()))["Gateway"])


def egress_catalog(images: dict[str, str], path: Path) -> Path:
    """A catalog with one challenge of each egress kind (and one that says nothing)."""
    path.write_text(f"""
challenges:
  closed:
    image: {images['http']}
    port: 8080
    egress: none
    start_timeout: 20
  open:
    image: {images['http']}
    port: 8080
    egress: internet
    start_timeout: 20
  quiet:
    image: {images['http']}
    port: 8080
    start_timeout: 20
""")
    return path


# -- the catalog key ------------------------------------------------------------------------------


def test_egress_is_none_unless_the_catalog_says_internet(make_settings: Callable[..., Any]) -> None:
    """`egress` defaults to none, accepts internet, and a wrong value names challenge and field."""
    settings = make_settings()
    catalog = build_catalog({"challenges": {"a": {"image": "x"}, "b": {"image": "x",
                                                                       "egress": "internet"}}},
                            settings)
    assert catalog.get("a").egress == "none"
    assert catalog.get("b").egress == "internet"
    assert Challenge(image="x").egress == "none"
    with pytest.raises(CatalogError, match=r"'c'.*egress"):
        build_catalog({"challenges": {"c": {"image": "x", "egress": "everything"}}}, settings)


def test_settings_warn_about_a_passwordless_redis_off_loopback(
    make_settings: Callable[..., Any],
) -> None:
    """A Redis URL off loopback without a password is reported; loopback or a password is not."""
    assert make_settings().unprotected_redis_urls() == []
    found = make_settings(broker_url="redis://10.0.0.5:6379/0",
                          result_backend="redis://:pw@10.0.0.5:6379/1",
                          redis_url="redis://127.0.0.1:6379/2").unprotected_redis_urls()
    assert found == ["10.0.0.5:6379"]


# -- the main engine ------------------------------------------------------------------------------


@pytest.fixture
def egress_ctx(make_ctx: Callable[..., Context], images: dict[str, str],
               tmp_path: Path) -> Iterator[Context]:
    """A context with the firewall at its default (auto) for POOL; its table removed after."""
    label = private_label("egress")
    ctx = make_ctx(
        challenges_file=egress_catalog(images, tmp_path / "egress.yaml"),
        team_subnet_pool=POOL, egress_firewall="auto", extra_labels=label,
        publish_ip="0.0.0.0",
    )
    try:
        yield ctx
    finally:
        with contextlib.suppress(Exception):
            for inst in ctx.service.status():
                ctx.service.stop(inst.challenge, inst.team_id, rate_limit=False)
        nft("delete", "table", "inet", table_name(ipaddress.IPv4Network(POOL)))


@needs_root
def test_an_instance_reaches_its_team_and_only_allowed_internet(
    egress_ctx: Context, docker_client: Any,
) -> None:
    """Nothing of ours is reachable from an instance; the internet only with egress: internet."""
    ctx = egress_ctx
    marker = f"ours-{TAG}-{random.randint(0, 10**6)}"
    k = random.randint(1, 62)
    table = table_name(ipaddress.IPv4Network(POOL))
    with contextlib.ExitStack() as stack:
        host_port = stack.enter_context(listener(marker))
        other_host = stack.enter_context(
            netns_host(f"ctfeg{TAG}o", f"10.252.{k}.1", f"10.252.{k}.2"))
        internet = stack.enter_context(
            netns_host(f"ctfeg{TAG}i", f"203.0.113.{4 * k + 1}", f"203.0.113.{4 * k + 2}"))
        other_port = stack.enter_context(listener(marker, netns=other_host.name))
        net_port = stack.enter_context(listener(f"internet-{marker}", netns=internet.name))
        # Readiness probe under the rules: start returns only once the port answered.
        closed = ctx.service.start("closed", "eg1")
        opened = ctx.service.start("open", "eg1")
        quiet = ctx.service.start("quiet", "eg1")
        assert {closed.status, opened.status, quiet.status} == {"running"}
        cc, co, cq = (docker_client.containers.get(i.container_id)
                      for i in (closed, opened, quiet))
        assert cq.labels["ctf.egress"] == "none" and co.labels["ctf.egress"] == "internet"
        gateway = gateway_of(cc)
        ours = [gateway, host_address(), *filter(None, [docker0_address()])]
        for address in ours:
            assert host_reaches(address, host_port, marker), f"control: host at {address}"
        assert host_reaches(other_host.peer_ip, other_port, marker)
        assert host_reaches(internet.peer_ip, net_port, "internet-")

        # Without our table (as the issue found it) an instance reaches all of that.
        assert nft("delete", "table", "inet", table).returncode == 0
        for address in ours:
            assert reaches(cc, address, host_port, marker), f"control: no rules, {address}"
        assert reaches(cc, other_host.peer_ip, other_port, marker)
        assert ctx.egress is not None
        assert ctx.egress.keep() == "installed"  # what the keeper does after a flush

        for container in (cc, co, cq):
            for address in ours:
                assert not reaches(container, address, host_port, marker), \
                    f"{container.name} reached the host's listener at {address}"
            assert not reaches(container, other_host.peer_ip, other_port, marker), \
                f"{container.name} reached another host at {other_host.peer_ip}"
        assert reaches(co, internet.peer_ip, net_port, "internet-"), \
            "egress: internet must reach the internet"
        assert not reaches(cc, internet.peer_ip, net_port, "internet-")
        assert not reaches(cq, internet.peer_ip, net_port, "internet-")

        # Inside the team network everything still flows, both ways.
        assert reaches(cc, ip_of(co), 8080, "hello from ctf")
        assert reaches(co, ip_of(cq), 8080, "hello from ctf")

        # Published traffic reaches the instance: on loopback and on the host's address.
        port = closed.ports["8080/tcp"]
        for address in ("127.0.0.1", host_address()):
            body = urllib.request.urlopen(f"http://{address}:{port}/", timeout=5).read()
            assert b"hello from ctf" in body

        # The metadata address is never probed: it is inside the blocked set.
        got = nft("get", "element", "inet", table, "blocked", f"{{ {METADATA_ADDRESS} }}")
        assert got.returncode == 0 and "169.254.0.0/16" in got.stdout
        state = ctx.egress.firewall.state()  # type: ignore[union-attr]
        assert state.current and state.internet == {ip_of(co)}

        # Stopping the internet instance takes its address out before it is reused.
        ctx.service.stop("open", "eg1")
        assert ctx.egress.firewall.state().internet == set()  # type: ignore[union-attr]


@needs_root
def test_install_is_idempotent_and_removal_is_clean(
    egress_ctx: Context, tmp_path: Path,
) -> None:
    """Installing again changes nothing; `ctfctl firewall remove` leaves no table behind."""
    ctx = egress_ctx
    assert ctx.egress is not None and ctx.egress.firewall is not None
    table = ctx.egress.firewall.table
    env = {**os.environ, "CTF_TEAM_SUBNET_POOL": POOL, "CTF_DATA_DIR": str(tmp_path / "d")}
    ctl = [str(ROOT / ".venv/bin/ctfctl")] if (ROOT / ".venv/bin/ctfctl").exists() \
        else [sys.executable, "-m", "celery_app.cli"]

    def ctfctl(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*ctl, *args], env=env, capture_output=True, text=True,
                              timeout=60, check=False)

    status = ctfctl("firewall", "status", "--json")
    assert status.returncode == 1 and json.loads(status.stdout)["present"] is False
    assert ctfctl("firewall", "install").returncode == 0
    before = nft("-a", "list", "table", "inet", table).stdout
    for _ in range(2):
        assert ctfctl("firewall", "install").returncode == 0
    ctx.egress.keep()
    after = nft("list", "table", "inet", table).stdout
    assert after.count("counter") == 4 and after.count("hook input") == 1
    assert nft("list", "tables").stdout.count(table) == 1
    assert before.count("drop") == after.count("drop") == 4
    status = ctfctl("firewall", "status", "--json")
    assert status.returncode == 0 and json.loads(status.stdout)["in_place"] is True
    checked = ctfctl("check")
    assert checked.returncode == 0 and "egress firewall in place" in checked.stderr

    assert ctfctl("firewall", "remove").returncode == 0
    assert table not in nft("list", "tables").stdout
    checked = ctfctl("check")
    assert "egress firewall not in place" in checked.stderr
    assert ctfctl("firewall", "status").returncode == 1


# -- a second engine: its restart, the keeper, the published path -----------------------------


@needs_root
def test_rules_survive_an_engine_restart_and_are_kept(
    make_ctx: Callable[..., Context], images: dict[str, str], tmp_path: Path,
) -> None:
    """The rules outlive an engine restart, come back when deleted, never duplicate."""
    # The Docker host runs `ctfctl firewall keep` (as a remote engine's host does); published
    # and readiness traffic still flow.
    label = private_label("egress-engine")
    marker = f"engine-host-{TAG}-{random.randint(0, 10**6)}"
    table = table_name(ipaddress.IPv4Network(ENGINE_POOL))
    with second_engine(images, label, index=7) as engine:
        assert engine.client is not None
        ctx = make_ctx(
            challenges_file=egress_catalog(images, tmp_path / "egress.yaml"),
            docker_host=engine.tcp_url, public_host=engine.address, publish_ip="0.0.0.0",
            team_subnet_pool=ENGINE_POOL, egress_firewall="auto", extra_labels=label,
        )
        assert ctx.egress is not None and not ctx.egress.enforced  # a remote engine
        env = {**os.environ, "DOCKER_HOST": engine.unix_url,
               "CTF_TEAM_SUBNET_POOL": ENGINE_POOL, "CTF_DATA_DIR": str(tmp_path / "keeper")}
        ctl = [str(ROOT / ".venv/bin/python"), "-m", "celery_app.cli"]
        inside = ["nsenter", f"--net=/var/run/netns/{engine.netns}"]
        keeper: subprocess.Popen[bytes] | None = None
        log = (tmp_path / "keeper.log").open("ab")

        def start_keeper() -> subprocess.Popen[bytes]:
            return subprocess.Popen([*inside, *ctl, "firewall", "keep", "--interval", "1"],
                                    env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                    start_new_session=True)

        def in_place() -> bool:
            done = subprocess.run([*inside, *ctl, "firewall", "status", "--json"], env=env,
                                  cwd=ROOT, capture_output=True, text=True, timeout=60,
                                  check=False)
            return done.returncode == 0 and json.loads(done.stdout)["in_place"]

        def tables() -> int:
            return nft("list", "tables", netns=engine.netns).stdout.count(table)

        try:
            with listener(marker, netns=engine.netns) as port:
                # Published traffic and the probe cross into the namespace: start works.
                inst = ctx.service.start("closed", "eg2")
                c = engine.client.containers.get(inst.container_id)
                gateway = gateway_of(c)
                docker0 = f"172.31.{engine.subnet}.1"
                ours = [gateway, docker0, engine.address]
                assert all(reaches(c, a, port, marker) for a in ours), "control: no rules yet"

                keeper = start_keeper()
                wait_for(in_place, 30, 0.2, "the keeper to install the rules")
                for address in ours:
                    assert not reaches(c, address, port, marker), address

                # The engine restarts (rewriting its own chains); our table is untouched.
                engine.stop_daemon()
                engine.start_daemon()
                assert engine.client is not None
                assert in_place() and tables() == 1
                inst = ctx.service.start("closed", "eg2")  # its old container died
                c = engine.client.containers.get(inst.container_id)
                gateway = gateway_of(c)
                for address in (gateway, docker0, engine.address):
                    assert not reaches(c, address, port, marker), f"after restart: {address}"
                body = urllib.request.urlopen(
                    f"http://{engine.address}:{inst.ports['8080/tcp']}/", timeout=5).read()
                assert b"hello from ctf" in body

                # A reboot or `nft flush ruleset` loses it: the keeper puts it back.
                assert nft("delete", "table", "inet", table, netns=engine.netns).returncode == 0
                wait_for(in_place, 30, 0.2, "the keeper to put the rules back")
                assert not reaches(c, gateway, port, marker)

                # The keeper restarts (as after a reboot): still one table, same rules.
                os.killpg(keeper.pid, signal.SIGTERM)
                keeper.wait(30)
                keeper = start_keeper()
                wait_for(lambda: b"keeping" in (tmp_path / "keeper.log").read_bytes(), 30, 0.2,
                         "the second keeper to start")
                assert in_place() and tables() == 1
                ctx.service.stop("closed", "eg2")
        finally:
            if keeper is not None and keeper.poll() is None:
                os.killpg(keeper.pid, signal.SIGKILL)
                keeper.wait(30)
            log.close()
            removed = subprocess.run([*inside, *ctl, "firewall", "remove"], env=env, cwd=ROOT,
                                     capture_output=True, timeout=60, check=False)
            assert removed.returncode == 0, removed.stderr
            assert tables() == 0


class _Engine:
    """Stands in for the driver's two listings (what Docker holds), nothing else."""

    def __init__(self) -> None:
        self.networks: list[Any] = []
        self.containers: list[Any] = []

    @property
    def is_local(self) -> bool:
        return True

    def list_networks(self, labels: Any = None) -> list[Any]:
        return list(self.networks)

    def list_containers(self, labels: Any = None) -> list[Any]:
        return [c for c in self.containers
                if all(c.labels.get(k) == v for k, v in (labels or {}).items())]


@needs_root
def test_a_recycled_address_never_inherits_the_internet(
    make_settings: Callable[..., Any],
) -> None:
    """An address an internet instance left behind (it died) loses the internet on reuse."""
    from celery_app.engine.docker_driver import ContainerInfo, NetworkInfo  # noqa: PLC0415
    from celery_app.engine.firewall import EgressGuard  # noqa: PLC0415

    pool = "10.246.0.0/16"
    engine = _Engine()
    net = NetworkInfo(id="n1", name="ctf-team-x", labels={}, subnets=["10.246.0.0/28"],
                      containers=1, bridge=f"ctfeg{TAG}b")
    engine.networks = [net]
    guard = EgressGuard.for_settings(make_settings(team_subnet_pool=pool,
                                                   egress_firewall="auto"), engine)  # type: ignore[arg-type]
    assert guard.firewall is not None

    def container(name: str, egress: str) -> ContainerInfo:
        return ContainerInfo(id=name, name=name, state="running", ports={}, ip="10.246.0.2",
                             labels={"ctf.managed": "true", "ctf.egress": egress})

    try:
        assert guard.keep() == "installed"
        first = container("open", "internet")
        engine.containers = [first]
        guard.admit(first, net)
        assert guard.firewall.state().internet == {"10.246.0.2"}
        assert guard.firewall.state().bridges == {net.bridge}
        # It dies without a stop (no release); a none instance gets the same address.
        second = container("closed", "none")
        engine.containers = [second]
        guard.admit(second, net)
        assert guard.firewall.state().internet == set()
        # And the keeper's pass brings the sets in line with Docker on its own.
        engine.containers = [first]
        assert guard.keep() == "synced"
        assert guard.firewall.state().internet == {"10.246.0.2"}
        engine.containers, engine.networks = [], []
        assert guard.keep() == "synced"
        state = guard.firewall.state()
        assert state.current and state.internet == set() and state.bridges == set()
    finally:
        assert guard.firewall.remove()


@needs_root
def test_the_worker_installs_the_rules_at_start_and_keeps_them(
    redis_server: Any, catalog_file: Path, tmp_path: Path,
) -> None:
    """A real worker installs the table when it starts, repairs it, and leaves it for the next."""
    from conftest import Worker, base_env  # noqa: PLC0415

    pool = "10.248.0.0/16"
    table = table_name(ipaddress.IPv4Network(pool))
    env = {**base_env(redis_server, catalog_file, tmp_path / "data"),
           "CTF_TEAM_SUBNET_POOL": pool, "CTF_EXTRA_LABELS": json.dumps(private_label("egw"))}
    del env["CTF_EGRESS_FIREWALL"]  # the default: auto
    worker = Worker(env, tmp_path / "worker.log")

    def rules() -> str:
        return nft("list", "table", "inet", table).stdout

    try:
        worker.start()
        wait_for(lambda: rules().count("drop") == 4, 30, 0.2, "the worker to install the rules")
        assert nft("delete", "table", "inet", table).returncode == 0
        wait_for(lambda: rules().count("drop") == 4, 30, 0.2, "the worker to put them back")
        worker.stop()
        assert rules().count("drop") == 4, "the rules must outlive the worker"
        worker.start()
        wait_for(lambda: worker.log().count(f"keeping table inet {table}") == 2, 30, 0.2,
                 "the restarted worker's keeper")
        assert nft("list", "tables").stdout.count(table) == 1 and rules().count("drop") == 4
    finally:
        worker.stop()
        nft("delete", "table", "inet", table)


def test_starts_fail_closed_when_the_rules_cannot_be_installed(
    make_ctx: Callable[..., Context], images: dict[str, str], tmp_path: Path,
    docker_client: Any,
) -> None:
    """Without nft (or root) a start is refused with a message saying what to do; nothing made."""
    from celery_app.errors import EgressUnprotected  # noqa: PLC0415

    label = private_label("egress-closed")
    ctx = make_ctx(challenges_file=egress_catalog(images, tmp_path / "egress.yaml"),
                   team_subnet_pool="10.246.0.0/16", egress_firewall="auto", extra_labels=label)
    assert ctx.egress is not None and ctx.egress.firewall is not None
    ctx.egress.firewall.nft.binary = None  # as on a host without nftables
    with pytest.raises(EgressUnprotected, match=r"nftables.*CTF_EGRESS_FIREWALL=off"):
        ctx.service.start("closed", "eg3")
    assert docker_client.containers.list(all=True, filters={
        "label": [f"ctf.test={label['ctf.test']}"]}) == []
    assert ctx.store.get("closed", "eg3") is None


@needs_root
def test_check_fails_when_the_firewall_cannot_be_installed(tmp_path: Path) -> None:
    """`ctfctl check` (so run-celery-worker.sh) stops with what to do when nft is not permitted."""
    if not shutil.which("capsh"):
        pytest.skip("capsh is needed to drop CAP_NET_ADMIN")
    env = {**os.environ, "CTF_DATA_DIR": str(tmp_path), "CTF_TEAM_SUBNET_POOL": POOL}
    done = subprocess.run(["capsh", "--drop=cap_net_admin", "--", "-c",
                           f"{sys.executable} -m celery_app.cli check"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 1
    assert "needs root (CAP_NET_ADMIN)" in " ".join(done.stderr.split())
