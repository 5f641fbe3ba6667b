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
import threading
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import docker
import pytest
import redis
from ci import unavailable
from conftest import ROOT, RedisServer, cleanup_docker, private_label, wait_for
from engines import second_engine

from celery_app.core.catalog import Challenge, build_catalog
from celery_app.engine.firewall import METADATA_ADDRESS, table_name
from celery_app.errors import CatalogError
from celery_app.worker.context import Context

pytestmark = [pytest.mark.docker, pytest.mark.redis]

POOL = "10.243.0.0/16"          # the main engine's instances in these tests
ENGINE_POOL = "10.244.0.0/16"   # the second engine's
TAG = f"{os.getpid() % 100000}"

def firewall_tools() -> None:
    """Skip without root, nft and nsenter; on CI, fail (CI must run every firewall test)."""
    if os.geteuid() != 0 or not shutil.which("nft") or not shutil.which("nsenter"):
        unavailable("the egress firewall needs root, nft and nsenter")


@pytest.fixture
def nft_root() -> None:
    """Root, nft and nsenter are here (skip without them; fail on CI)."""
    firewall_tools()


needs_root = pytest.mark.usefixtures("nft_root")


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


def reaches(container: Any, address: str, port: int, marker: str,
            send: str = "GET / HTTP/1.0\\r\\n\\r\\n") -> bool:
    """Whether ``container`` gets ``marker`` from ``address:port`` (busybox nc, 2 s)."""
    # An HTTP request: the stand-in challenge answers it, our listeners answer anything.
    _, out = container.exec_run(["/bin/busybox", "sh", "-c",
                                 f"printf '{send}' | /bin/busybox nc -w 2 {address} {port}"])
    return marker.encode() in out


def netns_http(netns: str, address: str, port: int) -> int | None:
    """The HTTP status a host in ``netns`` gets from ``address:port`` (None: no answer, 3 s)."""
    done = _run("nsenter", f"--net=/var/run/netns/{netns}", sys.executable, "-c",
                "import sys, urllib.request\n"
                "try:\n"
                "    print(urllib.request.urlopen(sys.argv[1], timeout=3).status)\n"
                "except Exception as exc:\n"
                "    print('none', exc)\n", f"http://{address}:{port}/", check=False)
    word = done.stdout.split()[0] if done.stdout.split() else "none"
    return int(word) if word.isdigit() else None


def send_udp(container: Any, address: str, port: int, payload: str,
             source: str | None = None) -> None:
    """Send one UDP datagram from inside ``container``'s network namespace.

    With ``source``, that address is added to the container's interface first and the
    datagram leaves with it: what a challenge granted NET_RAW (or NET_ADMIN) can do.
    """
    container.reload()
    inside = ("nsenter", f"--net=/proc/{container.attrs['State']['Pid']}/ns/net")
    if source is not None:
        _run(*inside, "ip", "addr", "replace", f"{source}/32", "dev", "eth0")
    _run(*inside, sys.executable, "-c",
         "import socket, sys\n"
         "s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
         "if sys.argv[4]: s.bind((sys.argv[4], 0))\n"
         "s.sendto(sys.argv[3].encode(), (sys.argv[1], int(sys.argv[2])))\n",
         address, str(port), payload, source or "")


UDP_LISTENER = """
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind(("0.0.0.0", int(sys.argv[1])))
print("ready", flush=True)
while True:
    data, _ = s.recvfrom(2048)
    print(data.decode(errors="replace"), flush=True)
"""


@contextlib.contextmanager
def udp_listener(netns: str) -> Iterator[tuple[int, Callable[[], str]]]:
    """A UDP listener in ``netns``; yields its port and a function returning what it got."""
    port = random.randint(20000, 29999)
    out = Path(f"/tmp/ctf-udp-{netns}-{port}.log")
    with out.open("wb") as sink:
        proc = subprocess.Popen(["nsenter", f"--net=/var/run/netns/{netns}", sys.executable,
                                 "-c", UDP_LISTENER, str(port)],
                                stdout=sink, stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: "ready" in out.read_text(errors="replace"), 10, 0.05,
                 "the UDP listener")
        yield port, lambda: out.read_text(errors="replace")
    finally:
        proc.kill()
        proc.wait(10)
        out.unlink(missing_ok=True)


@contextlib.contextmanager
def docker_over_tcp(bind: str = "127.0.0.1") -> Iterator[int]:
    """Reach this machine's engine over tcp://<bind>:<port> too (a byte pump)."""
    path = os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock").removeprefix("unix://")
    server = socket.socket()
    server.bind((bind, 0))
    server.listen(64)

    def pump(src: socket.socket, dst: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := src.recv(65536):
                dst.sendall(data)
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)

    def pair(client: socket.socket) -> None:
        engine = socket.socket(socket.AF_UNIX)
        try:
            engine.connect(path)
            back = threading.Thread(target=pump, args=(engine, client), daemon=True)
            back.start()
            pump(client, engine)
            back.join()
        finally:
            client.close()
            engine.close()

    def serve() -> None:
        while True:
            try:
                client, _ = server.accept()
            except OSError:
                return
            threading.Thread(target=pair, args=(client,), daemon=True).start()

    threading.Thread(target=serve, daemon=True).start()
    try:
        yield server.getsockname()[1]
    finally:
        with contextlib.suppress(OSError):
            server.shutdown(socket.SHUT_RDWR)  # wakes the accepting thread
        server.close()


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


def bridge_of(docker_client: Any, container: Any) -> str:
    """The host interface of the (one) bridge network ``container`` is on."""
    container.reload()
    net_id = next(iter(container.attrs["NetworkSettings"]["Networks"].values()))["NetworkID"]
    net = docker_client.networks.get(net_id)
    return str(net.attrs["Options"].get("com.docker.network.bridge.name")
               or f"br-{net.id[:12]}")


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


@contextlib.contextmanager
def egress_context(make_ctx: Callable[..., Context], images: dict[str, str], tmp_path: Path,
                   **overrides: Any) -> Iterator[Context]:
    """A context with the firewall at its default (auto) for POOL; its table removed after."""
    label = private_label("egress")
    settings = {"challenges_file": egress_catalog(images, tmp_path / "egress.yaml"),
                "team_subnet_pool": POOL, "egress_firewall": "auto", "extra_labels": label,
                "publish_ip": "0.0.0.0", **overrides}
    ctx = make_ctx(**settings)
    try:
        yield ctx
    finally:
        with contextlib.suppress(Exception):
            for inst in ctx.service.status():
                with contextlib.suppress(Exception):
                    ctx.service.stop(ctx.service.catalog.key(inst.challenge, inst.team_id),
                                     count_rate=False)
        # make_ctx sweeps TEST_LABEL only: what a failed stop left under this private label
        # would otherwise run on into the next test, its address still in the internet set.
        with contextlib.closing(docker.from_env()) as client:
            cleanup_docker(client, label)
        nft("delete", "table", "inet", table_name(ipaddress.IPv4Network(POOL)))


@pytest.fixture
def egress_ctx(make_ctx: Callable[..., Context], images: dict[str, str],
               tmp_path: Path) -> Iterator[Context]:
    """A context with the firewall at its default (auto) for POOL; its table removed after."""
    with egress_context(make_ctx, images, tmp_path) as ctx:
        yield ctx


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
        closed = ctx.service.start(ctx.service.catalog.key("closed", "eg1"))
        opened = ctx.service.start(ctx.service.catalog.key("open", "eg1"))
        quiet = ctx.service.start(ctx.service.catalog.key("quiet", "eg1"))
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
        assert state.current and state.internet == {(bridge_of(docker_client, co), ip_of(co))}

        # Stopping the internet instance takes its address out before it is reused.
        ctx.service.stop(ctx.service.catalog.key("open", "eg1"))
        assert ctx.egress.firewall.state().internet == set()  # type: ignore[union-attr]


@needs_root
def test_no_instance_reaches_metadata_a_host_redis_other_teams_or_denied_addresses(
    make_ctx: Callable[..., Context], images: dict[str, str], tmp_path: Path,
    docker_client: Any,
) -> None:
    """Real probes: metadata, a Redis on the host's address, other teams, CTF_EGRESS_DENY."""
    marker = f"probe-{TAG}-{random.randint(0, 10**6)}"
    k = random.randint(1, 62)
    with contextlib.ExitStack() as stack:
        # A host answering at the cloud metadata address (its own namespace: nothing real).
        metadata = stack.enter_context(
            netns_host(f"ctfeg{TAG}m", "169.254.169.253", METADATA_ADDRESS))
        internet = stack.enter_context(
            netns_host(f"ctfeg{TAG}i", f"203.0.113.{4 * k + 1}", f"203.0.113.{4 * k + 2}"))
        denied = stack.enter_context(
            netns_host(f"ctfeg{TAG}d", f"198.51.100.{4 * k + 1}", f"198.51.100.{4 * k + 2}"))
        meta_port = stack.enter_context(listener(marker, netns=metadata.name))
        net_port = stack.enter_context(listener(f"internet-{marker}", netns=internet.name))
        denied_port = stack.enter_context(listener(marker, netns=denied.name))
        # A Redis bound to the host's own address, as a deployment's Redis would be.
        host_redis = RedisServer(tmp_path, bind=host_address())
        host_redis.start()
        stack.callback(host_redis.stop)
        ping = "PING\\r\\n"
        ctx = stack.enter_context(egress_context(make_ctx, images, tmp_path,
                                                 egress_deny=f"{denied.peer_ip}/32"))
        assert ctx.egress is not None
        key, start = ctx.service.catalog.key, ctx.service.start
        a_open, a_closed = start(key("open", "pa1")), start(key("closed", "pa1"))
        b_open, b_closed = start(key("open", "pb1")), start(key("closed", "pb1"))
        ca_open, ca_closed, cb_open, cb_closed = (
            docker_client.containers.get(i.container_id)
            for i in (a_open, a_closed, b_open, b_closed))
        b_published = b_closed.ports["8080/tcp"]
        # The probes are real: with the table deleted an instance reaches every one of them.
        table = table_name(ipaddress.IPv4Network(POOL))
        assert nft("delete", "table", "inet", table).returncode == 0
        assert reaches(ca_open, METADATA_ADDRESS, meta_port, marker), "control: metadata"
        assert reaches(ca_open, host_address(), host_redis.port, "PONG", ping), "control: Redis"
        assert reaches(ca_open, denied.peer_ip, denied_port, marker), "control: denied"
        assert reaches(ca_open, internet.peer_ip, net_port, "internet-"), "control: internet"
        assert ctx.egress.keep() == "installed"

        for c in (ca_open, ca_closed):
            assert not reaches(c, METADATA_ADDRESS, meta_port, marker), c.name
            assert not reaches(c, host_address(), host_redis.port, "PONG", ping), c.name
            assert not reaches(c, denied.peer_ip, denied_port, marker), c.name
            # Other teams: their addresses, and their published port through the host.
            for other in (cb_open, cb_closed):
                assert not reaches(c, ip_of(other), 8080, "hello from ctf"), (c.name, other.name)
            assert not reaches(c, host_address(), b_published, "hello from ctf"), c.name
        # The internet instance still has the internet: the drops above are the policy's.
        assert reaches(ca_open, internet.peer_ip, net_port, "internet-")
        assert not reaches(ca_closed, internet.peer_ip, net_port, "internet-")
        # And its team: both ways.
        assert reaches(ca_open, ip_of(ca_closed), 8080, "hello from ctf")
        assert reaches(ca_closed, ip_of(ca_open), 8080, "hello from ctf")


@needs_root
def test_a_forged_internet_address_from_another_bridge_is_dropped(
    egress_ctx: Context, docker_client: Any,
) -> None:
    """The internet set holds (bridge, address) pairs: team B forging A's address gets nowhere."""
    ctx = egress_ctx
    k = random.randint(1, 62)
    with netns_host(f"ctfeg{TAG}f", f"203.0.113.{4 * k + 1}", f"203.0.113.{4 * k + 2}") as net, \
            udp_listener(net.name) as (port, received):
        key = ctx.service.catalog.key
        a = docker_client.containers.get(ctx.service.start(key("open", "fa1")).container_id)
        b = docker_client.containers.get(ctx.service.start(key("closed", "fb1")).container_id)
        assert ctx.egress is not None and ctx.egress.firewall is not None
        state = ctx.egress.firewall.state()
        assert state.internet == {(bridge_of(docker_client, a), ip_of(a))}
        tag = random.randint(0, 10**6)
        # Team B's container sends with team A's address (a challenge given NET_RAW can),
        # then team A's container sends for real: its datagram arrives, the forged one not.
        send_udp(b, net.peer_ip, port, f"forged-{tag}", source=ip_of(a))
        send_udp(a, net.peer_ip, port, f"real-{tag}")
        wait_for(lambda: f"real-{tag}" in received(), 10, 0.05, "the internet instance's datagram")
        assert f"forged-{tag}" not in received(), "a forged source passed as the internet instance"


@needs_root
def test_a_neighbour_routing_the_pool_via_the_host_reaches_only_published_ports(
    make_ctx: Callable[..., Context], images: dict[str, str], tmp_path: Path,
    docker_client: Any,
) -> None:
    """A LAN host with a route to the pool via us gets no container directly; published: yes."""
    k = random.randint(1, 62)
    with netns_host(f"ctfeg{TAG}n", f"10.252.{k}.5", f"10.252.{k}.6") as neighbour, \
            egress_context(make_ctx, images, tmp_path, publish_ip=neighbour.host_ip) as ctx:
        # The neighbour's default route (via this machine) covers the pool, as a LAN host's
        # or a peered network's route to 10.213.0.0/16 would.
        inst = ctx.service.start(ctx.service.catalog.key("closed", "nb1"))
        address = ip_of(docker_client.containers.get(inst.container_id))
        published = inst.ports["8080/tcp"]
        assert netns_http(neighbour.name, neighbour.host_ip, published) == 200  # CTF_PUBLISH_IP
        assert netns_http(neighbour.name, address, 8080) is None, "reached a team subnet"
        # The control: without our table the neighbour gets the container (the issue).
        assert ctx.egress is not None
        table = table_name(ipaddress.IPv4Network(POOL))
        assert nft("delete", "table", "inet", table).returncode == 0
        assert netns_http(neighbour.name, address, 8080) == 200, "control: no table"
        assert ctx.egress.keep() == "installed"
        assert netns_http(neighbour.name, address, 8080) is None
        assert netns_http(neighbour.name, neighbour.host_ip, published) == 200


@needs_root
def test_a_loopback_tcp_engine_is_refused_without_the_firewall_and_guarded_with_it(
    make_ctx: Callable[..., Context], images: dict[str, str], tmp_path: Path,
    docker_client: Any, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An engine over tcp://127.0.0.1: no start while the rules cannot be in force; then kept."""
    from celery_app.errors import EgressUnprotected  # noqa: PLC0415

    marker = f"loopback-{TAG}-{random.randint(0, 10**6)}"
    with contextlib.ExitStack() as stack:
        port = stack.enter_context(docker_over_tcp())
        url = f"tcp://127.0.0.1:{port}"
        host_port = stack.enter_context(listener(marker))
        # A machine without nftables: the rules cannot be put in force.
        with monkeypatch.context() as patch:
            patch.setattr("shutil.which", lambda *_a, **_k: None)
            bare = stack.enter_context(egress_context(make_ctx, images, tmp_path,
                                                      docker_host=url))
        with pytest.raises(EgressUnprotected, match=r"nftables.*CTF_EGRESS_FIREWALL=off"):
            bare.service.start(bare.service.catalog.key("closed", "lb1"))
        # Nothing of the refused start is left (the label is shared with earlier tests'
        # contexts, whose containers the run's sweep removes: look at this instance's only).
        label = {**bare.settings.extra_labels, "ctf.team": "lb1", "ctf.challenge": "closed"}
        assert docker_client.containers.list(ignore_removed=True, all=True, filters={
            "label": [f"{k}={v}" for k, v in label.items()]}) == []
        assert bare.store.get("closed", "lb1") is None

        ctx = stack.enter_context(egress_context(make_ctx, images, tmp_path, docker_host=url))
        key = ctx.service.catalog.key
        opened = docker_client.containers.get(ctx.service.start(key("open", "lb1")).container_id)
        closed = docker_client.containers.get(ctx.service.start(key("closed", "lb1")).container_id)
        ours = [gateway_of(closed), host_address(), *filter(None, [docker0_address()])]
        for address in ours:
            assert host_reaches(address, host_port, marker), f"control: host at {address}"
        for c in (opened, closed):
            for address in ours:
                assert not reaches(c, address, host_port, marker), f"{c.name} reached {address}"


@needs_root
def test_a_worker_on_an_engine_elsewhere_refuses_starts_by_name_until_a_keeper_reports(
    catalog_file: Path, tmp_path: Path, docker_client: Any,
) -> None:
    """A real worker, starts by name: egress_unprotected until `ctfctl firewall keep` reports."""
    from conftest import Worker, base_env  # noqa: PLC0415

    from ctf_testkit.support import close_platform_client, platform_client  # noqa: PLC0415

    k = random.randint(1, 62)
    label = private_label("egress-byname")
    table = table_name(ipaddress.IPv4Network(POOL))
    marker = f"byname-{TAG}-{random.randint(0, 10**6)}"
    with contextlib.ExitStack() as stack:
        # This machine's engine at an address that is not loopback (a private link of the
        # test's own): by its URL, an engine elsewhere, as tcp://10.0.0.6:2376 would be.
        link = stack.enter_context(netns_host(f"ctfeg{TAG}r", f"10.252.{k}.9", f"10.252.{k}.10"))
        port = stack.enter_context(docker_over_tcp(bind=link.host_ip))
        (tmp_path / "redis").mkdir()
        server = RedisServer(tmp_path / "redis")
        server.start()
        stack.callback(server.stop)
        env = {**base_env(server, catalog_file, tmp_path / "data"),
               "DOCKER_HOST": f"tcp://{link.host_ip}:{port}", "CTF_TEAM_SUBNET_POOL": POOL,
               "CTF_EXTRA_LABELS": json.dumps(label)}
        del env["CTF_EGRESS_FIREWALL"]  # the default: auto
        stack.callback(nft, "delete", "table", "inet", table)
        worker = Worker(env, tmp_path / "worker.log")
        worker.start()
        stack.callback(worker.stop)
        client = platform_client(env["CELERY_BROKER_URL"], env["CELERY_RESULT_BACKEND"])
        stack.callback(close_platform_client, client)
        start = "celery_app.tasks.start_container"

        result = client.send_task(start, args=["web", "rb1"])
        with pytest.raises(Exception, match="ctfctl firewall keep") as info:
            result.get(timeout=60)
        assert type(info.value).__name__ == "EgressUnprotected"
        assert docker_client.containers.list(ignore_removed=True, all=True, filters={
            "label": [f"{k}={v}" for k, v in label.items()]}) == []

        # The keeper on the engine's machine (this one: the same engine, so the same ID).
        keeper_env = {**os.environ, "CTF_REDIS_URL": env["CTF_REDIS_URL"],
                      "CTF_TEAM_SUBNET_POOL": POOL, "CTF_DATA_DIR": str(tmp_path / "keeper")}
        keeper = subprocess.Popen([str(ROOT / ".venv/bin/python"), "-m", "celery_app.cli",
                                   "firewall", "keep", "--interval", "1"], env=keeper_env,
                                  cwd=ROOT, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL, start_new_session=True)

        @stack.callback
        def stop_keeper() -> None:
            os.killpg(keeper.pid, signal.SIGKILL)
            keeper.wait(30)

        beats = redis.Redis.from_url(env["CTF_REDIS_URL"])
        stack.callback(beats.close)
        wait_for(lambda: beats.keys("ctf:egresskeeper:*"), 30, 0.2, "the keeper's heartbeat")
        done = client.send_task(start, args=["web", "rb1"]).get(timeout=90)
        assert done["status"] == "running"
        c = docker_client.containers.get(done["container_id"])
        host_port = stack.enter_context(listener(marker))
        for address in (gateway_of(c), host_address()):
            assert host_reaches(address, host_port, marker), f"control: {address}"
            assert not reaches(c, address, host_port, marker), address
        client.send_task("celery_app.tasks.stop_container", args=["web", "rb1"]).get(timeout=60)


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
    assert after.count("counter") == 5 and after.count("hook input") == 1
    assert nft("list", "tables").stdout.count(table) == 1
    assert before.count("drop") == after.count("drop") == 5
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
def test_a_remote_engine_starts_only_while_its_machines_keeper_reports(
    make_ctx: Callable[..., Context], images: dict[str, str], tmp_path: Path,
) -> None:
    """A tcp:// engine elsewhere: starts refused until `ctfctl firewall keep` there reports."""
    # The second engine stands for SPEC §10's tcp://10.0.0.6:2376: its own machine (network
    # namespace), reached over TCP. Its keeper runs there and reports in Redis; the rules
    # outlive an engine restart, come back when deleted, never duplicate; published and
    # readiness traffic still flow.
    from celery_app.errors import EgressUnprotected  # noqa: PLC0415
    from celery_app.state import keys  # noqa: PLC0415

    label = private_label("egress-engine")
    marker = f"engine-host-{TAG}-{random.randint(0, 10**6)}"
    table = table_name(ipaddress.IPv4Network(ENGINE_POOL))
    with contextlib.ExitStack() as stack:
        engine = stack.enter_context(second_engine(images, label, index=7))
        assert engine.client is not None
        # A Redis the engine's machine reaches (its side of the private link).
        server = RedisServer(tmp_path, bind=f"10.250.{engine.subnet}.1")
        server.start()
        stack.callback(server.stop)
        state_url = f"{server.url}/3"

        def engine_ctx(firewall: str) -> Context:
            return make_ctx(
                challenges_file=egress_catalog(images, tmp_path / "egress.yaml"),
                docker_host=engine.tcp_url, public_host=engine.address, publish_ip="0.0.0.0",
                team_subnet_pool=ENGINE_POOL, egress_firewall=firewall, extra_labels=label,
                redis_url=state_url,
            )

        ctx = engine_ctx("auto")  # the default
        assert ctx.egress is not None and ctx.egress.place == "remote"
        assert not ctx.egress.enforced  # not this machine's to install
        # No keeper there: refused, saying what to do, before anything is made.
        with pytest.raises(EgressUnprotected,
                           match=r"ctfctl firewall keep.*CTF_EGRESS_FIREWALL=off"):
            ctx.service.start(ctx.service.catalog.key("closed", "eg2"))
        assert engine.client.containers.list(ignore_removed=True, all=True) == []
        assert ctx.store.get("closed", "eg2") is None

        env = {**os.environ, "DOCKER_HOST": engine.unix_url, "CTF_REDIS_URL": state_url,
               "CTF_TEAM_SUBNET_POOL": ENGINE_POOL, "CTF_DATA_DIR": str(tmp_path / "keeper")}
        ctl = [str(ROOT / ".venv/bin/python"), "-m", "celery_app.cli"]
        inside = ["nsenter", f"--net=/var/run/netns/{engine.netns}"]
        keeper: subprocess.Popen[bytes] | None = None
        log = stack.enter_context((tmp_path / "keeper.log").open("ab"))

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

        @stack.callback
        def remove() -> None:
            if keeper is not None and keeper.poll() is None:
                os.killpg(keeper.pid, signal.SIGKILL)
                keeper.wait(30)
            removed = subprocess.run([*inside, *ctl, "firewall", "remove"], env=env, cwd=ROOT,
                                     capture_output=True, timeout=60, check=False)
            assert removed.returncode == 0, removed.stderr
            assert tables() == 0

        port = stack.enter_context(listener(marker, netns=engine.netns))
        # The control: with the firewall off (the organiser's explicit choice) a start goes
        # ahead, and its instance reaches the engine's machine.
        off = engine_ctx("off").service
        inst = off.start(off.catalog.key("closed", "eg2"))
        c = engine.client.containers.get(inst.container_id)
        gateway = gateway_of(c)
        docker0 = f"172.31.{engine.subnet}.1"
        ours = [gateway, docker0, engine.address]
        assert all(reaches(c, a, port, marker) for a in ours), "control: no rules yet"

        keeper = start_keeper()
        wait_for(in_place, 30, 0.2, "the keeper to install the rules")
        for address in ours:
            assert not reaches(c, address, port, marker), address
        # Its heartbeat, keyed by the engine's own ID, lets starts go ahead; it expires.
        engine_id = engine.client.info()["ID"]
        key = keys.egresskeeper(engine_id, ENGINE_POOL)
        beats = redis.Redis.from_url(state_url)
        stack.callback(beats.close)
        wait_for(lambda: beats.exists(key), 30, 0.2, "the keeper's heartbeat")
        assert 0 < beats.pttl(key) <= 30_000
        inst = ctx.service.start(ctx.service.catalog.key("closed", "eg3"))
        c3 = engine.client.containers.get(inst.container_id)
        assert not reaches(c3, gateway_of(c3), port, marker)
        ctx.service.stop(ctx.service.catalog.key("closed", "eg3"))

        # The engine restarts (rewriting its own chains); our table is untouched.
        engine.stop_daemon()
        engine.start_daemon()
        assert engine.client is not None
        assert in_place() and tables() == 1
        inst = ctx.service.start(ctx.service.catalog.key("closed", "eg2"))  # its old container died
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
        ctx.service.stop(ctx.service.catalog.key("closed", "eg2"))


class _Engine:
    """Stands in for the driver's two listings (what Docker holds), nothing else."""

    def __init__(self) -> None:
        self.networks: list[Any] = []
        self.containers: list[Any] = []

    @property
    def is_local(self) -> bool:
        return True

    def engine_id(self) -> str:
        return f"stand-in-{TAG}"

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
        assert guard.firewall.state().internet == {(net.bridge, "10.246.0.2")}
        assert guard.firewall.state().bridges == {net.bridge}
        # It dies without a stop (no release); a none instance gets the same address.
        second = container("closed", "none")
        engine.containers = [second]
        guard.admit(second, net)
        assert guard.firewall.state().internet == set()
        # And the keeper's pass brings the sets in line with Docker on its own.
        engine.containers = [first]
        assert guard.keep() == "synced"
        assert guard.firewall.state().internet == {(net.bridge, "10.246.0.2")}
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
        wait_for(lambda: rules().count("drop") == 5, 30, 0.2, "the worker to install the rules")
        assert nft("delete", "table", "inet", table).returncode == 0
        wait_for(lambda: rules().count("drop") == 5, 30, 0.2, "the worker to put them back")
        worker.stop()
        assert rules().count("drop") == 5, "the rules must outlive the worker"
        worker.start()
        wait_for(lambda: worker.log().count(f"keeping table inet {table}") == 2, 30, 0.2,
                 "the restarted worker's keeper")
        assert nft("list", "tables").stdout.count(table) == 1 and rules().count("drop") == 5
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
        ctx.service.start(ctx.service.catalog.key("closed", "eg3"))
    assert docker_client.containers.list(ignore_removed=True, all=True, filters={
        "label": [f"ctf.test={label['ctf.test']}"]}) == []
    assert ctx.store.get("closed", "eg3") is None


@needs_root
def test_check_fails_when_the_firewall_cannot_be_installed(tmp_path: Path) -> None:
    """`ctfctl check` (so run-celery-worker.sh) stops with what to do when nft is not permitted."""
    if not shutil.which("capsh"):
        unavailable("capsh is needed to drop CAP_NET_ADMIN")
    env = {**os.environ, "CTF_DATA_DIR": str(tmp_path), "CTF_TEAM_SUBNET_POOL": POOL}
    done = subprocess.run(["capsh", "--drop=cap_net_admin", "--", "-c",
                           f"{sys.executable} -m celery_app.cli check"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 1
    assert "needs root (CAP_NET_ADMIN)" in " ".join(done.stderr.split())
