"""Benchmark of the HTTP API (a script, not a test): ./.venv/bin/python bench/bench_api.py

It makes everything it needs and removes it afterwards: a private redis-server, a busybox
stand-in image, a Celery worker subprocess and the API (uvicorn, in a thread). Everything in
Docker carries the label ctf.test=bench-<pid>.

1. Start latency: ``PUT /api/v1/teams/{t}/instances/web?wait=30`` until running, against the
   raw Docker SDK (``containers.run`` + the same readiness probe) on the same image,
   interleaved. "warm": the team's network exists (another instance of the team runs);
   "cold": the first instance of a team, so the start also creates its network.
2. Status latency with 500 instance records in Redis (plus real containers for the queried
   team): ``GET /api/v1/teams/{t}/instances`` p50 against ``docker ps --filter
   label=ctf.team=t`` in the same run.

Writes the figures to bench/RESULTS-api.md.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import docker
import httpx
import redis
import uvicorn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from celery_app.api import create_app  # noqa: E402
from celery_app.models import Instance, iso, utcnow  # noqa: E402
from celery_app.readiness import wait_ready  # noqa: E402
from celery_app.settings import load_settings  # noqa: E402
from celery_app.state import StateStore  # noqa: E402

RUN = f"bench-{os.getpid()}"
LABEL = {"ctf.test": RUN}
ADMIN_TOKEN = "bench-admin-token"
DOCKERFILE = """FROM scratch
COPY busybox /bin/busybox
COPY index.html /www/index.html
EXPOSE 8080
ENTRYPOINT ["/bin/busybox"]
CMD ["httpd", "-f", "-p", "8080", "-h", "/www"]
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def until(condition: Callable[[], Any], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(0.05)


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


@contextlib.contextmanager
def redis_server(workdir: Path) -> Iterator[str]:
    port = free_port()
    proc = subprocess.Popen(
        [shutil.which("redis-server") or "redis-server", "--port", str(port), "--bind",
         "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", str(workdir)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    client = redis.Redis(port=port)

    def up() -> bool:
        try:
            return bool(client.ping())
        except redis.exceptions.ConnectionError:
            return False

    try:
        until(up, 10, "redis-server")
        yield f"redis://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(10)


def build_image(client: docker.DockerClient) -> str:
    tag = f"ctf-bench/http:{os.getpid()}"
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in {"Dockerfile": DOCKERFILE.encode(),
                           "busybox": Path("/bin/busybox").read_bytes(),
                           "index.html": b"hello from bench\n"}.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mode = 0o755
            tar.addfile(info, io.BytesIO(data))
    buf.seek(0)
    client.images.build(fileobj=buf, custom_context=True, tag=tag, labels=LABEL, rm=True)
    return tag


def cleanup_docker(client: docker.DockerClient) -> None:
    filters = {"label": [f"ctf.test={RUN}"]}
    for c in client.containers.list(all=True, filters=filters):
        with contextlib.suppress(docker.errors.APIError):
            c.remove(force=True)
    for n in client.networks.list(filters=filters):
        with contextlib.suppress(docker.errors.APIError):
            n.remove()


@contextlib.contextmanager
def worker(env: dict[str, str], logfile: Path) -> Iterator[None]:
    with logfile.open("ab") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "celery_app.celery_app:app", "worker",
             "--pool", "threads", "--concurrency", "8", "--loglevel", "INFO",
             "-n", f"{RUN}@%h", "-Q", "celery,ctf.host.local"],
            env={**os.environ, **env}, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
        )
    try:
        until(lambda: b"ready" in logfile.read_bytes() or proc.poll() is not None, 60,
              "the worker")
        if proc.poll() is not None:
            raise RuntimeError(logfile.read_text()[-2000:])
        yield
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()


@contextlib.contextmanager
def api_server(settings: Any) -> Iterator[str]:
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(settings), host="127.0.0.1", port=port,
                                           log_level="warning", access_log=False))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    until(lambda: server.started, 20, "the API")
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)


def raw_start(client: docker.DockerClient, image: str, name: str) -> float:
    """containers.run + readiness on the published port, as a minimal script would do."""
    began = time.perf_counter()
    c = client.containers.run(image, name=name, detach=True, labels=LABEL,
                              ports={"8080/tcp": ("127.0.0.1", None)})
    c.reload()
    port = int(c.attrs["NetworkSettings"]["Ports"]["8080/tcp"][0]["HostPort"])
    if not wait_ready("127.0.0.1", port, "http", "/", 20):
        raise RuntimeError("raw container never answered")
    took = time.perf_counter() - began
    c.remove(force=True)
    return took


def api_start(http: httpx.Client, team: str, challenge: str = "web") -> float:
    began = time.perf_counter()
    r = http.put(f"/api/v1/teams/{team}/instances/{challenge}", params={"wait": 30})
    took = time.perf_counter() - began
    if r.status_code != 200:
        raise RuntimeError(f"PUT answered {r.status_code}: {r.text}")
    return took


def api_stop(http: httpx.Client, team: str, challenge: str = "web") -> None:
    r = http.delete(f"/api/v1/teams/{team}/instances/{challenge}", params={"wait": 60})
    if r.status_code != 200:
        raise RuntimeError(f"DELETE answered {r.status_code}: {r.text}")


def bench_start(http: httpx.Client, client: docker.DockerClient, image: str, n: int
                ) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {"raw": [], "warm": [], "cold": []}
    # An anchor instance keeps the "warm" team's network alive between rounds.
    api_start(http, "warm", "anchor")
    # One untimed round of each, so image and code paths are hot for all three.
    raw_start(client, image, f"{RUN}-raw-x")
    api_start(http, "warm")
    api_stop(http, "warm")
    for i in range(n):
        times["raw"].append(raw_start(client, image, f"{RUN}-raw-{i}"))
        times["warm"].append(api_start(http, "warm"))
        api_stop(http, "warm")
        times["cold"].append(api_start(http, f"cold{i}"))
        api_stop(http, f"cold{i}")
        print(f"  round {i + 1}/{n}: raw {times['raw'][-1] * 1000:.0f} ms, "
              f"api warm {times['warm'][-1] * 1000:.0f} ms, "
              f"api cold {times['cold'][-1] * 1000:.0f} ms", flush=True)
    api_stop(http, "warm", "anchor")
    return times


def bench_status(http: httpx.Client, store: StateStore, records: int, real: int,
                 rounds: int) -> dict[str, list[float]]:
    now = utcnow()
    for i in range(records):
        team = f"fake{i:04d}"
        store.put(Instance(
            team_id=team, challenge="web", status="running", container_name=f"ctf-web-{team}",
            container_id=f"{i:064x}", ports={"8080/tcp": 40000 + i},
            url=f"http://localhost:{40000 + i}", started_at=iso(now),
            expires_at=iso(now + timedelta(hours=2)),
        ))
    for challenge in ("web", "web2", "web3")[:real]:
        api_start(http, "query", challenge)
    assert len(http.get("/api/v1/teams/query/instances").json()["instances"]) == real
    times: dict[str, list[float]] = {"api": [], "api_all": [], "docker_ps": []}
    for _ in range(rounds):
        began = time.perf_counter()
        http.get("/api/v1/teams/query/instances").raise_for_status()
        times["api"].append(time.perf_counter() - began)
    for _ in range(max(10, rounds // 20)):
        began = time.perf_counter()
        http.get("/api/v1/instances").raise_for_status()
        times["api_all"].append(time.perf_counter() - began)
        began = time.perf_counter()
        subprocess.run(["docker", "ps", "--filter", "label=ctf.team=query"], check=True,
                       capture_output=True)
        times["docker_ps"].append(time.perf_counter() - began)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("-n", type=int, default=15, help="start rounds (default 15)")
    parser.add_argument("--records", type=int, default=500)
    parser.add_argument("--rounds", type=int, default=300, help="status requests")
    args = parser.parse_args()

    client = docker.from_env()
    work = Path(tempfile.mkdtemp(prefix=f"{RUN}-"))
    try:
        print(f"building the stand-in image ({RUN})", flush=True)
        image = build_image(client)
        catalog = work / "challenges.yaml"
        entry = f"image: {image}\n    port: 8080\n    ttl: 600\n    start_timeout: 20"
        catalog.write_text("challenges:\n" + "".join(
            f"  {cid}:\n    {entry}\n" for cid in ("web", "web2", "web3", "anchor")))
        with redis_server(work) as url:
            env = {
                "CELERY_BROKER_URL": f"{url}/0", "CELERY_RESULT_BACKEND": f"{url}/1",
                "CTF_REDIS_URL": f"{url}/2", "CTF_CHALLENGES_FILE": str(catalog),
                "CTF_DATA_DIR": str(work / "data"), "CTF_EXTRA_LABELS": json.dumps(LABEL),
                "CTF_TEAM_SUBNET_POOL": "10.215.0.0/16", "CTF_RATE_LIMIT_COUNT": "100000",
                "CTF_MAX_INSTANCES": "2000", "CTF_MAX_INSTANCES_PER_TEAM": "5",
                "CTF_ADMIN_TOKEN": ADMIN_TOKEN,
            }
            settings = load_settings(
                broker_url=env["CELERY_BROKER_URL"], result_backend=env["CELERY_RESULT_BACKEND"],
                redis_url=env["CTF_REDIS_URL"], challenges_file=catalog,
                data_dir=work / "data", admin_token=ADMIN_TOKEN,
            )
            with worker(env, work / "worker.log"), api_server(settings) as base, \
                    httpx.Client(base_url=base, timeout=120,
                                 headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}) as http:
                print(f"1. start latency, {args.n} interleaved rounds", flush=True)
                start = bench_start(http, client, image, args.n)
                print(f"2. status latency with {args.records} records", flush=True)
                status = bench_status(http, StateStore.from_url(env["CTF_REDIS_URL"]),
                                      args.records, 3, args.rounds)
        report(start, status, args)
    finally:
        cleanup_docker(client)
        with contextlib.suppress(docker.errors.APIError):
            client.images.remove(f"ctf-bench/http:{os.getpid()}", force=True)
        client.close()
        shutil.rmtree(work, ignore_errors=True)


def report(start: dict[str, list[float]], status: dict[str, list[float]],
           args: argparse.Namespace) -> None:
    raw = statistics.median(start["raw"])
    warm = statistics.median(start["warm"])
    cold = statistics.median(start["cold"])
    api_p50 = statistics.median(status["api"])
    ps_p50 = statistics.median(status["docker_ps"])
    lines = [
        f"# API benchmark ({time.strftime('%Y-%m-%d')}, `bench/bench_api.py -n {args.n}`)",
        "",
        f"Machine: {os.cpu_count()} CPUs, Docker {docker.from_env().version()['Version']}, "
        "busybox httpd stand-in image.",
        "",
        "## 1. Start until running (median of interleaved rounds)",
        "",
        "| path | median | p90 | ratio to raw |",
        "|---|---|---|---|",
        f"| raw SDK `containers.run` + readiness probe | {raw * 1000:.0f} ms | "
        f"{pct(start['raw'], 0.9) * 1000:.0f} ms | 1.00 |",
        f"| `PUT …?wait=30`, team network exists (warm) | {warm * 1000:.0f} ms | "
        f"{pct(start['warm'], 0.9) * 1000:.0f} ms | {warm / raw:.2f} |",
        f"| `PUT …?wait=30`, first instance of a team (cold: creates its network) | "
        f"{cold * 1000:.0f} ms | {pct(start['cold'], 0.9) * 1000:.0f} ms | {cold / raw:.2f} |",
        "",
        f"## 2. Status with {args.records} instance records in Redis",
        "",
        "| query | p50 | p90 |",
        "|---|---|---|",
        f"| `GET /api/v1/teams/query/instances` ({len(status['api'])} requests) | "
        f"{api_p50 * 1000:.2f} ms | {pct(status['api'], 0.9) * 1000:.2f} ms |",
        f"| `GET /api/v1/instances` (all {args.records + 3}) | "
        f"{statistics.median(status['api_all']) * 1000:.1f} ms | "
        f"{pct(status['api_all'], 0.9) * 1000:.1f} ms |",
        f"| `docker ps --filter label=ctf.team=query` | {ps_p50 * 1000:.1f} ms | "
        f"{pct(status['docker_ps'], 0.9) * 1000:.1f} ms |",
        "",
        f"The team route is **{ps_p50 / api_p50:.0f}x** faster than `docker ps` "
        f"(target ≥ 10x, p50 ≤ 10 ms).",
        "",
        "Notes: the API ran under uvicorn on 127.0.0.1 with a keep-alive httpx client; the "
        "worker was a real `celery worker --pool threads` subprocess. The 500 records were "
        "written straight into Redis (StateStore.put); the queried team has 3 real "
        "containers. `docker ps` had only this run's few containers to filter, so with 500 "
        "real containers it would be slower still.",
    ]
    text = "\n".join(lines) + "\n"
    print("\n" + text)
    (ROOT / "bench" / "RESULTS-api.md").write_text(text)


if __name__ == "__main__":
    main()
