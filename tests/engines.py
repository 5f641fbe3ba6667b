"""A second Docker engine for tests: a dockerd in its own network namespace.

Reached over a veth pair at 10.250.<n>.2 (its API on tcp://10.250.<n>.2:2375, only on that
private link). ``ip netns exec`` hides the cgroup mounts from dockerd, so it runs under
``nsenter --net``; it is never started with ``--bridge none`` in the main namespace, which
would delete the machine engine's docker0.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import docker
import pytest
from ci import unavailable
from conftest import RUN_ID, cleanup_docker, wait_for

from ctf_testkit.support import stop_process


def _run(*cmd: str) -> None:
    done = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=60)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({done.returncode}): {done.stderr.strip()}")


@dataclass
class SecondEngine:
    """A dockerd in its own network namespace, at ``address``."""

    netns: str
    veth: str
    address: str
    workdir: Path
    label: dict[str, str]
    proc: subprocess.Popen[bytes] | None = None
    subnet: int = 0
    client: docker.DockerClient | None = None
    tls: bool = False  # API on :2376 with TLS and client certificates (certs in ``tls_dir``)

    @property
    def unix_url(self) -> str:
        return f"unix://{self.workdir}/docker.sock"

    @property
    def tcp_url(self) -> str:
        return f"tcp://{self.address}:{2376 if self.tls else 2375}"

    @property
    def tls_dir(self) -> Path:
        """The CA and server certificates; ``client/`` is a DOCKER_CERT_PATH for workers."""
        return self.workdir / "tls"

    def client_tls(self) -> docker.tls.TLSConfig:
        """The TLS settings of a client holding the CA and a client certificate."""
        client = self.tls_dir / "client"
        return docker.tls.TLSConfig(
            client_cert=(str(client / "cert.pem"), str(client / "key.pem")),
            ca_cert=str(client / "ca.pem"), verify=True,
        )

    def start(self, subnet: int) -> None:
        """Make the namespace and its link, then start the engine in it."""
        self.subnet = subnet
        host_ip = f"10.250.{subnet}.1"
        peer = f"{self.veth}p"
        _run("ip", "netns", "add", self.netns)
        _run("ip", "link", "add", self.veth, "type", "veth", "peer", "name", peer)
        _run("ip", "link", "set", peer, "netns", self.netns)
        _run("ip", "addr", "add", f"{host_ip}/30", "dev", self.veth)
        _run("ip", "link", "set", self.veth, "up")
        inside = ("nsenter", f"--net=/var/run/netns/{self.netns}")
        _run(*inside, "ip", "addr", "add", f"{self.address}/30", "dev", peer)
        _run(*inside, "ip", "link", "set", peer, "up")
        _run(*inside, "ip", "link", "set", "lo", "up")
        self.start_daemon()

    def start_daemon(self) -> None:
        """Start (or start again) the engine in the namespace; wait until it answers."""
        subnet = self.subnet
        inside = ("nsenter", f"--net=/var/run/netns/{self.netns}")
        for sub in ("data", "exec"):
            (self.workdir / sub).mkdir(parents=True, exist_ok=True)
        # A default bridge is fine here: this namespace has its own. --tls=false: the API
        # listens only on the private veth link (and without it dockerd waits 15 s).
        tls_args = ["--tls=false"]
        if self.tls:
            tls = self.tls_dir
            tls_args = ["--tlsverify", f"--tlscacert={tls / 'ca.pem'}",
                        f"--tlscert={tls / 'server-cert.pem'}",
                        f"--tlskey={tls / 'server-key.pem'}"]
        with (self.workdir / "dockerd.log").open("ab") as log:
            self.proc = subprocess.Popen(
                [*inside, "dockerd", "--data-root", str(self.workdir / "data"),
                 "--exec-root", str(self.workdir / "exec"),
                 "--pidfile", str(self.workdir / "docker.pid"),
                 "-H", self.unix_url, "-H", self.tcp_url, *tls_args,
                 "--bip", f"172.31.{subnet}.1/24", "--iptables=true"],
                stdout=log, stderr=subprocess.STDOUT,
            )

        def up() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError("the second dockerd exited: " + self.log()[-2000:])
            try:
                # The client asks the engine's API version when made: only once it is up.
                if self.client is None:
                    self.client = docker.DockerClient(
                        base_url=self.tcp_url, timeout=60, version="1.41",
                        tls=self.client_tls() if self.tls else False,
                    )
                    # Our CA, not a system-wide REQUESTS_CA_BUNDLE (as the driver does).
                    self.client.api.trust_env = False
                return bool(self.client.ping())
            except Exception:  # noqa: BLE001  # refused or not ready yet
                return False

        wait_for(up, 60, 0.2, "the second Docker engine to answer")

    def load(self, image: str) -> None:
        """Copy an image from the machine's engine: ``docker save | docker load``."""
        save = subprocess.Popen(["docker", "save", image], stdout=subprocess.PIPE)
        load = subprocess.run(["docker", "-H", self.unix_url, "load"], stdin=save.stdout,
                              capture_output=True, check=False, timeout=120)
        assert save.stdout is not None
        save.stdout.close()
        assert save.wait(60) == 0 and load.returncode == 0, load.stderr

    def log(self) -> str:
        path = self.workdir / "dockerd.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def stop_daemon(self) -> None:
        """Stop the engine (SIGTERM to the dockerd we started), keeping its namespace."""
        if self.client is not None:
            self.client.close()
            self.client = None
        if self.proc is not None:
            stop_process(self.proc, 60)

    def stop(self) -> None:
        """Remove what the tests left on it, stop it and remove its namespace and files."""
        if self.client is not None:
            with contextlib.suppress(Exception):
                cleanup_docker(self.client, self.label)
        self.stop_daemon()
        subprocess.run(["ip", "link", "del", self.veth], capture_output=True, check=False)
        subprocess.run(["ip", "netns", "del", self.netns], capture_output=True, check=False)
        # Its data root, certificates and log: the machine is shared with later sessions.
        shutil.rmtree(self.workdir, ignore_errors=True)


def make_tls_certs(directory: Path, address: str) -> None:
    """Make a CA, a server certificate for ``address`` and a client certificate.

    As Docker's "Protect the Docker daemon socket" makes them; ``client/`` holds the
    ca/cert/key.pem a worker's DOCKER_CERT_PATH points at.
    """
    client = directory / "client"
    client.mkdir(parents=True)

    def ssl(*args: str) -> None:
        _run("openssl", *args)

    key = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")
    ca, ca_key = str(directory / "ca.pem"), str(directory / "ca-key.pem")
    ssl("req", "-x509", *key, "-keyout", ca_key, "-out", ca, "-days", "2",
        "-subj", "/CN=ctf-test-ca")
    for name, subject, ext in (
        ("server", "/CN=ctf-test-engine",
         f"subjectAltName=IP:{address}\nextendedKeyUsage=serverAuth"),
        ("client", "/CN=ctf-test-worker", "extendedKeyUsage=clientAuth"),
    ):
        csr, extfile = directory / f"{name}.csr", directory / f"{name}.ext"
        extfile.write_text(ext + "\n")
        key_out = client / "key.pem" if name == "client" else directory / "server-key.pem"
        cert_out = client / "cert.pem" if name == "client" else directory / "server-cert.pem"
        ssl("req", *key, "-keyout", str(key_out), "-out", str(csr), "-subj", subject)
        ssl("x509", "-req", "-in", str(csr), "-CA", ca, "-CAkey", ca_key, "-CAcreateserial",
            "-out", str(cert_out), "-days", "2", "-extfile", str(extfile))
    shutil.copy(ca, client / "ca.pem")


@contextlib.contextmanager
def second_engine(images: dict[str, str], label: dict[str, str], index: int = 0,
                  *, tls: bool = False) -> Iterator[SecondEngine]:
    """Start a second engine with the stand-in images loaded; remove it all afterwards.

    With ``tls``, its API is on :2376 and demands a client certificate from our own CA.
    """
    if os.geteuid() != 0 or not shutil.which("dockerd") or not shutil.which("nsenter"):
        unavailable("a second engine needs root, dockerd and nsenter")
    subnet = 20 + (os.getpid() + 37 * index) % 200
    tag = f"{str(os.getpid())[-6:]}{index}"
    engine = SecondEngine(netns=f"ctft{tag}", veth=f"ctfv{tag}", address=f"10.250.{subnet}.2",
                          workdir=Path(tempfile.mkdtemp(prefix=f"ctf-engine-{RUN_ID}-")),
                          label=label, tls=tls)
    try:
        try:
            if tls:
                make_tls_certs(engine.tls_dir, engine.address)
            engine.start(subnet)
        except Exception as exc:  # noqa: BLE001  # say exactly what failed on this machine
            pytest.fail(f"setting up the second Docker host failed: {exc}\n{engine.log()[-3000:]}")
        for image in images.values():
            engine.load(image)
        yield engine
    finally:
        engine.stop()
