"""The egress firewall: what an instance container may reach (SPEC §7), enforced by nftables.

One nftables table of our own per subnet pool, ``inet ctf_egress_<pool>``, holds the whole
policy. It hooks ``input`` (traffic to the host's own addresses: every bridge gateway,
``docker0``, the host's public address, Redis, the API, the Docker API) and ``forward``
(traffic through the host) at a priority just before Docker's own filter chains. A drop in
any nftables base chain is final, so nothing Docker (or anyone) accepts later can undo it;
and as the table is ours alone, Docker never rewrites it: an engine restart leaves it as it
is, and nothing of anyone else's is touched. From our pool's subnets and our team bridges:

- replies of connections made *to* an instance (published ports, the readiness probe,
  the ingress proxy) pass: ``ct state established,related``;
- traffic inside one team network passes (same bridge in and out);
- an instance whose container carries ``ctf.egress=internet`` reaches any address outside
  the private, link-local, CGNAT, loopback, multicast and reserved ranges (so never
  169.254.169.254) and outside ``CTF_EGRESS_DENY`` and the addresses of our own services;
- everything else from our pool is dropped, IPv6 included.

Towards our pool, from anywhere else (a LAN neighbour or a peered network that routes the
pool via this host): only replies and Docker's DNAT of a published port pass; every other
new connection into a team subnet is dropped, so the gate and ``CTF_PUBLISH_IP`` are the
only ways in.

The per-challenge part is two sets kept in step with Docker (labels are the truth): the
team bridges (``iifname``, so a container that forges its source address is still caught)
and the (bridge, IPv4 address) pairs of running containers labelled ``ctf.egress=internet``:
an address counts only on the bridge it belongs to, so a container that forges an internet
instance's address from another bridge gains nothing. The worker admits a container right
after it starts (a recycled address is taken out of the internet set before anything
else), releases it before removing it, and re-syncs every few seconds.

Where the engine runs decides who can prove the rules are in force (:func:`engine_place`):
an engine on this machine (``unix://``, or ``tcp://`` at a loopback address) is kept by the
worker itself; for any other engine the proof is a heartbeat in Redis that
``ctfctl firewall keep`` on the engine's own machine writes, keyed by the engine's ID. A
start without that proof is refused (:class:`EgressUnprotected`), unless the organiser
opted out with ``CTF_EGRESS_FIREWALL=off``.

The worker installs the table when it starts and keeps it (a reboot, ``nft flush ruleset``
or a deleted table is repaired within :data:`KEEP_INTERVAL`); installing is one atomic
``nft -f`` transaction that replaces the table, so it never duplicates a rule.
``ctfctl firewall remove`` deletes it; ``ctfctl firewall status`` and ``ctfctl check`` say
whether it is in place.
"""

from __future__ import annotations

import contextlib
import hashlib
import ipaddress
import json
import logging
import os
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from celery_app.engine.driver import ContainerInfo, Driver, NetworkInfo
from celery_app.errors import CTFError, EgressUnprotected, FirewallRefused
from celery_app.settings import Settings
from celery_app.state.egress import BEACON_TTL, KeeperBeacon
from celery_app.vocab.naming import LABEL_EGRESS, LABEL_MANAGED

__all__ = ["BEACON_TTL", "EgressFirewall", "EgressGuard", "KeeperBeacon",
           "Policy", "engine_place", "host_addresses", "table_name"]

log = logging.getLogger(__name__)

# Never reachable from an instance, whatever its egress: RFC 1918, CGNAT, link-local (with
# the cloud metadata address 169.254.169.254), loopback, "this network", IETF protocol
# assignments, benchmarking, multicast and the reserved block (with the broadcast address).
BLOCKED_RANGES = (
    "0.0.0.0/8", "10.0.0.0/8", "100.64.0.0/10", "127.0.0.0/8", "169.254.0.0/16",
    "172.16.0.0/12", "192.0.0.0/24", "192.168.0.0/16", "198.18.0.0/15", "224.0.0.0/4",
    "240.0.0.0/4",
)
METADATA_ADDRESS = "169.254.169.254"
# Just before Docker's filter chains (priority 0), so our drops come first.
PRIORITY = "filter - 10"
# Seconds between the keeper's passes: the longest a deleted table stays missing.
KEEP_INTERVAL = 5.0
# Seconds a successful check stays good enough for a start to go ahead without another.
VERIFIED_FOR = 10.0
_POLICY_VERSION = "2"
_CHAIN_RULES = {"input": 4, "forward": 9}
Pair = tuple[str, str]  # (bridge interface, IPv4 address): one instance allowed the internet


def table_name(pool: ipaddress.IPv4Network) -> str:
    """Return the nftables table name of a subnet pool (``ctf_egress_10_213_0_0_16``)."""
    return "ctf_egress_" + str(pool).replace(".", "_").replace("/", "_")


@dataclass(frozen=True)
class Policy:
    """The fixed part of the policy: our pool and what internet egress may never reach."""

    pool: ipaddress.IPv4Network
    blocked: tuple[ipaddress.IPv4Network, ...]

    @classmethod
    def from_settings(cls, settings: Settings, extra: Iterable[str] = ()) -> Policy:
        """Build the policy of ``settings``: its pool, the blocked ranges, our services.

        Args:
            settings: the pool (``CTF_TEAM_SUBNET_POOL``), ``CTF_EGRESS_DENY`` and the URLs of
                Redis, the API and the Docker engine, whose addresses are blocked too.
            extra: more host names or addresses to block (the hosts file's hosts).
        """
        nets = [ipaddress.IPv4Network(r) for r in BLOCKED_RANGES]
        nets += settings.egress_deny_networks
        hosts = [urlsplit(u).hostname for u in (settings.broker_url, settings.result_backend,
                                                settings.state_redis_url,
                                                settings.docker_host or "")]
        hosts += [settings.api_bind.rpartition(":")[0].strip("[]"), *extra]
        nets += [ipaddress.IPv4Network(a) for h in hosts if h for a in _ipv4_of(h)]
        blocked = tuple(ipaddress.collapse_addresses(nets))
        return cls(ipaddress.IPv4Network(settings.team_subnet_pool), blocked)

    @property
    def table(self) -> str:
        """The table's name."""
        return table_name(self.pool)

    @property
    def digest(self) -> str:
        """A short hash of the rules: the table's comment, compared by :meth:`state`."""
        text = render(self, set(), set())
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def host_addresses(hosts: Iterable[Any]) -> list[str]:
    """The names and addresses of every host of the hosts file (its engine, its players' side).

    Args:
        hosts: the ``HostConfig`` entries (``docker_url``, ``public_host``, ``publish_ip``).
    """
    found = []
    for cfg in hosts:
        for name in (urlsplit(cfg.docker_url or "").hostname, cfg.public_host, cfg.publish_ip):
            if name:
                found.append(str(name))
    return found


def _ipv4_of(host: str) -> list[str]:
    """The IPv4 addresses of a host name or address (none when it does not resolve)."""
    try:
        return [str(ipaddress.IPv4Address(host))]
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None, socket.AF_INET, socket.SOCK_STREAM)
    except OSError:
        return []
    return sorted({str(info[4][0]) for info in infos})


def _marker(digest: str) -> str:
    return f"policy_v{_POLICY_VERSION}_{digest or 'x'}"


def _elements(values: Iterable[str]) -> str:
    return ", ".join(sorted(values))


def _bridge_elements(bridges: Iterable[str]) -> str:
    return _elements(json.dumps(b) for b in bridges)


def _link_elements(bridges: Iterable[str]) -> str:
    # Same bridge in and out: traffic inside one team network.
    return _elements(f"{json.dumps(b)} . {json.dumps(b)}" for b in bridges)


def _pair_elements(pairs: Iterable[Pair]) -> str:
    # An internet instance's address, valid only when it arrives on its own bridge.
    return _elements(f"{json.dumps(b)} . {ip}" for b, ip in pairs)


def render(policy: Policy, bridges: set[str], internet: set[Pair], digest: str = "") -> str:
    """Return the nft script that replaces our table in one transaction.

    Args:
        policy: the fixed part.
        bridges: our team networks' bridge interfaces.
        internet: (bridge, address) of each instance allowed the internet.
        digest: written into the table's comment (empty while computing it).
    """
    t = policy.table
    bridge_elems, link_elems = _bridge_elements(bridges), _link_elements(bridges)
    lines = [
        f"table inet {t}",
        f"delete table inet {t}",
        f"table inet {t} {{",
        f'  comment "ctf-instancer egress policy v{_POLICY_VERSION} {digest}"',
        # nft -j does not show a table's comment: this empty set's name carries the digest.
        f"  set {_marker(digest)} {{ type ipv4_addr; }}",
        f"  set pool {{ type ipv4_addr; flags interval; elements = {{ {policy.pool} }}; }}",
        "  set blocked { type ipv4_addr; flags interval; elements = { "
        + _elements(str(n) for n in policy.blocked) + " }; }",
        "  set bridges { type ifname; "
        + (f"elements = {{ {bridge_elems} }}; " if bridges else "") + "}",
        "  set links { type ifname . ifname; "
        + (f"elements = {{ {link_elems} }}; " if bridges else "") + "}",
        "  set internet { type ifname . ipv4_addr; "
        + (f"elements = {{ {_pair_elements(internet)} }}; " if internet else "") + "}",
        "  chain input {",
        f"    type filter hook input priority {PRIORITY}; policy accept;",
        "    ip saddr @pool ct state established,related accept",
        "    iifname @bridges ct state established,related accept",
        "    ip saddr @pool counter drop",
        "    iifname @bridges counter drop",
        "  }",
        "  chain forward {",
        f"    type filter hook forward priority {PRIORITY}; policy accept;",
        "    ip saddr @pool ct state established,related accept",
        "    iifname @bridges ct state established,related accept",
        "    iifname . oifname @links accept",
        "    iifname . ip saddr @internet ip daddr != @blocked accept",
        "    ip saddr @pool counter drop",
        "    iifname @bridges counter drop",
        # Into the pool from elsewhere (a neighbour routing it via us): replies, and the
        # DNAT of a published port; nothing else reaches a team subnet directly.
        "    ip daddr @pool ct state established,related accept",
        "    ip daddr @pool ct status dnat accept",
        "    ip daddr @pool counter drop",
        "  }",
        "}",
    ]
    return "\n".join(lines) + "\n"


@dataclass
class FirewallState:
    """What the table holds now."""

    present: bool
    current: bool = False
    bridges: set[str] = field(default_factory=set)
    internet: set[Pair] = field(default_factory=set)
    detail: str = ""


class Nft:
    """Runs the ``nft`` command (nftables), the only thing here that touches the kernel."""

    def __init__(self, binary: str | None = None) -> None:
        self.binary = binary or shutil.which("nft") or shutil.which("nft", path="/usr/sbin:/sbin")

    def run(self, *args: str, script: str | None = None) -> str:
        """Run ``nft args`` (``-f -`` with ``script`` on stdin); return its output.

        Raises:
            EgressUnprotected: nft is missing, not permitted, or refused the script.
        """
        if not self.binary:
            raise EgressUnprotected(
                "the egress firewall needs nftables: install it (apt-get install nftables; "
                "./setup-celery.sh does) or set CTF_EGRESS_FIREWALL=off and firewall yourself"
            )
        cmd = [self.binary, *args] + (["-f", "-"] if script is not None else [])
        try:
            done = subprocess.run(cmd, input=script, capture_output=True, text=True,
                                  timeout=30, check=False)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise EgressUnprotected(f"cannot run nft: {exc}") from exc
        if done.returncode != 0:
            message = done.stderr.strip()[-500:]
            if "Operation not permitted" in message or "Permission denied" in message:
                raise EgressUnprotected(
                    "the egress firewall needs root (CAP_NET_ADMIN) to install its nftables "
                    "rules: run the worker as root, or set CTF_EGRESS_FIREWALL=off and run "
                    "`sudo ctfctl firewall keep` next to it"
                )
            raise FirewallRefused(message)
        return done.stdout


class EgressFirewall:
    """Installs, reads, updates and removes our table.

    Args:
        policy: the fixed part of the policy.
        nft: the nft runner.
    """

    def __init__(self, policy: Policy, nft: Nft | None = None) -> None:
        self.policy = policy
        self.nft = nft or Nft()
        self._digest = policy.digest

    @property
    def table(self) -> str:
        """The table's name."""
        return self.policy.table

    def install(self, bridges: set[str], internet: set[Pair]) -> None:
        """Replace the table (one transaction: never a duplicate, never a gap)."""
        self.nft.run(script=render(self.policy, bridges, internet, self._digest))

    def remove(self) -> bool:
        """Delete the table; ``False`` when there was none."""
        try:
            self.nft.run("delete", "table", "inet", self.table)
        except FirewallRefused as exc:
            if "No such file or directory" in str(exc):
                return False
            raise
        return True

    def state(self) -> FirewallState:
        """Read the table: present, current (our exact rules), and its two sets."""
        try:
            raw = self.nft.run("-j", "list", "table", "inet", self.table)
        except FirewallRefused as exc:
            if "No such file or directory" in str(exc):
                return FirewallState(present=False, detail=f"table inet {self.table} is missing")
            raise
        items = [next(iter(i.items())) for i in json.loads(raw).get("nftables", [])]
        found = FirewallState(present=True)
        rules: dict[str, int] = {}
        hooks: dict[str, str] = {}
        for kind, item in items:
            if kind == "set" and item.get("name") == _marker(self._digest):
                found.current = True
            elif kind == "chain":
                hooks[item["name"]] = str(item.get("hook", ""))
            elif kind == "rule":
                rules[item["chain"]] = rules.get(item["chain"], 0) + 1
            elif kind == "set" and item.get("name") == "bridges":
                found.bridges = {str(_element(e)) for e in item.get("elem", [])}
            elif kind == "set" and item.get("name") == "internet":
                found.internet = {_pair(_element(e)) for e in item.get("elem", [])}
        expected_hooks = {name: name for name in _CHAIN_RULES}
        if not found.current:
            found.detail = "its rules are from another version or were changed"
        elif hooks != expected_hooks or rules != _CHAIN_RULES:
            found.current = False
            found.detail = f"its chains differ (rules {rules}, hooks {hooks})"
        return found

    def update(self, *, add_bridges: Iterable[str] = (), drop_bridges: Iterable[str] = (),
               add_internet: Iterable[Pair] = (), drop_internet: Iterable[Pair] = ()) -> None:
        """Change the two sets in one transaction (removals first)."""
        t = f"inet {self.table}"
        changes = [
            ("delete", "internet", _pair_elements(drop_internet)),
            ("delete", "bridges", _bridge_elements(drop_bridges)),
            ("delete", "links", _link_elements(drop_bridges)),
            ("add", "bridges", _bridge_elements(add_bridges)),
            ("add", "links", _link_elements(add_bridges)),
            ("add", "internet", _pair_elements(add_internet)),
        ]
        lines = [f"{verb} element {t} {name} {{ {elems} }}" for verb, name, elems in changes
                 if elems]
        if lines:
            self.nft.run(script="\n".join(lines) + "\n")


def _element(value: Any) -> Any:
    """One set element of ``nft -j`` output: a string, or a list for a concatenation."""
    if isinstance(value, dict) and "elem" in value:
        value = value["elem"].get("val")
    if isinstance(value, dict) and "concat" in value:
        return [str(v) for v in value["concat"]]
    return str(value)


def _pair(value: Any) -> Pair:
    """A (bridge, address) element of the internet set."""
    bridge, address = value
    return str(bridge), str(address)


Place = Literal["local", "loopback", "remote"]


def engine_place(docker_url: str | None) -> Place:
    """Where an engine runs, as far as its firewall goes.

    Args:
        docker_url: the engine's URL; ``None`` or empty follows ``DOCKER_HOST`` as the
            Docker SDK (so the driver) does.

    Returns:
        ``local`` (a socket of this machine), ``loopback`` (``tcp://`` at a loopback
        address: this machine's nftables hold its containers too) or ``remote`` (any other
        address, ``ssh://``: only that machine's own ``ctfctl firewall keep`` can prove it).
    """
    url = docker_url or os.environ.get("DOCKER_HOST", "")
    if url == "" or url.startswith(("unix://", "npipe://")):
        return "local"
    if url.startswith(("tcp://", "http://", "https://")) and _is_loopback(urlsplit(url).hostname):
        return "loopback"
    return "remote"


def _is_loopback(host: str | None) -> bool:
    if not host:
        return False
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class EgressGuard:
    """Keeps one Docker host's egress policy true: installed, current and in step with Docker.

    Args:
        firewall: the table, kept here; ``None`` when it is not ours to keep on this machine.
        driver: the engine whose containers and networks are the truth.
        why_not: said when ``firewall`` is ``None`` (logged by the keeper).
        beacon: the keepers' heartbeats: written after each good pass here, and, for a
            remote engine (``firewall`` ``None``), the proof a start asks for.
        place: where the engine runs (:func:`engine_place`).
        pool: the subnet pool (with ``firewall``, its policy's).
    """

    def __init__(self, firewall: EgressFirewall | None, driver: Driver,
                 why_not: str = "", *, beacon: KeeperBeacon | None = None,
                 place: Place = "local", pool: ipaddress.IPv4Network | None = None) -> None:
        self.firewall = firewall
        self.driver = driver
        self.why_not = why_not
        self.beacon = beacon
        self.place = place
        self.pool = firewall.policy.pool if firewall is not None else pool
        self._lock = threading.RLock()
        self._verified_at = -1e9
        self._bridges: set[str] = set()
        self._internet: set[Pair] = set()
        self._engine_id = ""

    @classmethod
    def for_settings(cls, settings: Settings, driver: Driver, extra_hosts: Iterable[str] = (),
                     docker_url: str | None = None) -> EgressGuard:
        """The guard a worker of ``settings`` runs.

        An engine on this machine (a socket, or ``tcp://`` at a loopback address): the worker
        installs and keeps the rules. Any other engine: starts need the heartbeat of
        ``ctfctl firewall keep`` on that engine's machine. ``CTF_EGRESS_FIREWALL=off``: none.

        Args:
            settings: the worker's settings.
            driver: its engine.
            extra_hosts: more addresses to block (the hosts file's hosts).
            docker_url: the engine's URL (``None``: ``DOCKER_HOST``, as the driver).
        """
        if settings.egress_firewall == "off":
            return cls(None, driver, "CTF_EGRESS_FIREWALL=off: egress is left to you")
        place = engine_place(docker_url or settings.docker_host)
        beacon = KeeperBeacon(settings.state_redis_url)
        if place == "remote":
            return cls(None, driver, (
                "the Docker engine is on another machine: starts go ahead only while "
                "`ctfctl firewall keep` runs on that machine (docs/DEPLOYMENT.md)"
            ), beacon=beacon, place=place, pool=ipaddress.IPv4Network(settings.team_subnet_pool))
        return cls(EgressFirewall(Policy.from_settings(settings, extra_hosts)), driver,
                   beacon=beacon, place=place)

    @property
    def enforced(self) -> bool:
        """Whether this guard installs and keeps the rules."""
        return self.firewall is not None

    def engine_id(self) -> str:
        """The engine's ID (asked once: Docker keeps it in its data root)."""
        if not self._engine_id:
            self._engine_id = self.driver.engine_id()
        return self._engine_id

    def require(self) -> None:
        """Make sure the rules are in force for this engine before an instance starts.

        Raises:
            EgressUnprotected: they are not and cannot be installed here, or (a remote
                engine) no keeper on its machine has reported lately; say what to do.
            RedisUnavailable: a remote engine's heartbeat cannot be read now.
            DockerUnavailable: the engine's ID cannot be read now.
        """
        if self.firewall is None:
            if self.place == "remote" and self.beacon is not None:
                self._require_keeper(self.beacon)
            return
        if time.monotonic() - self._verified_at < VERIFIED_FOR:
            return
        with self._lock:  # a burst of starts checks once, not once per thread
            if time.monotonic() - self._verified_at >= VERIFIED_FOR:
                self.keep()

    def _require_keeper(self, beacon: KeeperBeacon) -> None:
        assert self.pool is not None
        engine = self.engine_id()
        if beacon.read(engine, self.pool) is None:
            raise EgressUnprotected(
                f"the egress firewall is not known to be in force on this host's Docker engine "
                f"(ID {engine[:12]}), which runs on another machine: no `ctfctl firewall keep` "
                f"there has reported for pool {self.pool} in the last {beacon.ttl:g} s. Run "
                "`sudo ctfctl firewall keep` on the engine's machine with the same "
                "CTF_TEAM_SUBNET_POOL and CTF_REDIS_URL (docs/DEPLOYMENT.md), or set "
                "CTF_EGRESS_FIREWALL=off if you firewall it yourself"
            )

    def keep(self) -> str:
        """Check the table, reinstall it when missing or changed, sync its sets with Docker.

        Returns:
            What was done ("ok", "installed", "synced").

        Raises:
            EgressUnprotected: nft is missing, not permitted or refused the rules.
        """
        fw = self.firewall
        if fw is None:
            return "off"
        try:
            outcome = self._keep(fw)
        except FirewallRefused as exc:
            # Callers (and Celery's result backend) know the public class only.
            raise EgressUnprotected(f"nft refused the egress rules: {exc.detail}") from exc
        self._beat(fw)
        return outcome

    def _beat(self, fw: EgressFirewall) -> None:
        """Tell workers that drive this engine from elsewhere that the rules are in force."""
        if self.beacon is None:
            return
        try:
            self.beacon.beat(self.engine_id(), fw.policy.pool, fw.table)
        except CTFError as exc:
            # The rules hold all the same; only remote workers' starts wait for the next beat.
            log.warning("egress firewall: %s", exc.detail)

    def _keep(self, fw: EgressFirewall) -> str:
        with self._lock:
            state = fw.state()
            bridges, internet = self._truth()
            if not state.current:
                fw.install(bridges, internet)
                if state.present:
                    log.warning("egress firewall: table %s was changed (%s); reinstalled",
                                fw.table, state.detail)
                else:
                    log.info("egress firewall: installed table inet %s (pool %s)",
                             fw.table, fw.policy.pool)
                outcome = "installed"
            else:
                fw.update(add_bridges=bridges - state.bridges,
                          drop_bridges=state.bridges - bridges,
                          add_internet=internet - state.internet,
                          drop_internet=state.internet - internet)
                changed = bridges != state.bridges or internet != state.internet
                outcome = "synced" if changed else "ok"
            self._bridges, self._internet = bridges, internet
            self._verified_at = time.monotonic()
            return outcome

    def _truth(self) -> tuple[set[str], set[Pair]]:
        """Our pool's bridges, and (bridge, address) of running ``egress: internet`` instances."""
        pool = self.firewall.policy.pool if self.firewall else None
        assert pool is not None
        nets = [n for n in self.driver.list_networks()
                if n.bridge and any(_within(s, pool) for s in n.subnets)]
        internet = set()
        for c in self.driver.list_containers({LABEL_MANAGED: "true", LABEL_EGRESS: "internet"}):
            if c.state == "running" and c.ip and _within(c.ip, pool):
                bridge = _bridge_of(c.ip, nets)
                if bridge:
                    internet.add((bridge, c.ip))
        return {n.bridge for n in nets}, internet

    def admit(self, info: ContainerInfo, network: NetworkInfo) -> None:
        """Give a just-started container its egress: its bridge known, internet or not.

        An address last used by an ``egress: internet`` container that died is taken out of
        the internet set first, so a recycled address never inherits the internet.

        Raises:
            EgressUnprotected: nft refused, or the engine at a loopback address is not on
                this machine after all (the caller removes the container).
        """
        fw = self.firewall
        if fw is None or not info.ip:
            return
        if self.place == "loopback" and network.bridge \
                and not Path(f"/sys/class/net/{network.bridge}").exists():
            raise EgressUnprotected(
                f"the Docker engine at a loopback address is not on this machine (its bridge "
                f"{network.bridge} is not here: a tunnel?), so this machine's egress rules do "
                "not hold its containers: give it as a remote engine (its own address or "
                "ssh://) and run `sudo ctfctl firewall keep` on its machine"
            )
        internet = info.labels.get(LABEL_EGRESS) == "internet"
        if internet and not network.bridge:
            raise EgressUnprotected(
                f"cannot give {info.name} the internet: its network {network.name} is not a "
                "bridge the egress firewall can name")
        pair = (network.bridge, info.ip)
        with self._lock:
            add_bridges = {network.bridge} - self._bridges if network.bridge else set()
            add = {pair} - self._internet if internet else set()
            drop = {p for p in self._internet if p[1] == info.ip and not (internet and p == pair)}
            try:
                fw.update(add_bridges=add_bridges, add_internet=add, drop_internet=drop)
            except FirewallRefused:
                self._verified_at = -1e9
                self.keep()  # our view was stale (or the table vanished): repair from Docker
                if (pair in self._internet) != internet:
                    raise EgressUnprotected(
                        f"cannot set the egress of {info.name} ({info.ip}) in the firewall"
                    ) from None
            self._bridges |= add_bridges
            self._internet = (self._internet | add) - drop

    def release(self, info: ContainerInfo) -> None:
        """Take a container's address out of the internet set before it is removed."""
        fw = self.firewall
        if fw is None or not info.ip:
            return
        with self._lock:
            drop = {p for p in self._internet if p[1] == info.ip}
            if not drop:
                return
            try:
                fw.update(drop_internet=drop)
            except CTFError as exc:
                # Harmless: the next start on this address or the keeper's pass removes it.
                log.warning("egress firewall: cannot release %s yet: %s", info.ip, exc)
            self._internet -= drop


def _bridge_of(address: str, nets: Iterable[NetworkInfo]) -> str:
    """The bridge of the network whose subnet holds ``address`` ("" when none does)."""
    ip = ipaddress.ip_address(address)
    for net in nets:
        for subnet in net.subnets:
            with contextlib.suppress(ValueError):
                if ip in ipaddress.ip_network(subnet, strict=False):
                    return net.bridge
    return ""


def _within(address: str, pool: ipaddress.IPv4Network) -> bool:
    try:
        return ipaddress.ip_network(address, strict=False).subnet_of(pool)  # type: ignore[arg-type]
    except (ValueError, TypeError):
        return False

