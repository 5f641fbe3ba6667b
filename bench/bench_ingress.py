"""Issue 12: what the ingress costs, side by side with the raw thing in one run.

Latency per request (one new connection each, like a probe or a browser's first request):
  direct       GET / on the container's own address (what the proxy itself talks to)
  proxy        GET / through Traefik on a route without the gate (CTF_INGRESS_AUTH=none)
  plugin       GET / through Traefik and the team gate as it is by default
               (CTF_INGRESS_GATE=plugin: our plugin checks the cookie inside Traefik), with a
               valid access cookie: what a player gets
  forwardauth  the same through the fallback gate (CTF_INGRESS_GATE=forwardauth: Traefik asks
               the API, in its own process as ``ctfctl api`` runs it, about every request)
and the three Traefik paths again on one kept-alive connection each (a browser's). All are
interleaved in rounds so none always runs on a warmer machine.

Start latency: ``InstanceService.start`` of the same challenge with ``CTF_INGRESS=traefik``
(route file, no published port, readiness probed through Traefik and the gate) and with
``CTF_INGRESS=ports`` (published port, direct probe), alternating; the team network stays up
(another challenge of each team runs), stops are not timed.

Usage: .venv/bin/python bench/bench_ingress.py [-n 10] [--requests 2000] [--no-start] [--json FILE]
"""

from __future__ import annotations

import argparse
import dataclasses
import http.client
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from _common import ADMIN_TOKEN, ROOT, Bench, bench_run, emit, free_port, machine, pct, wait_for

from celery_app.ingress import probe, routes, tokens
from ctf_testkit.ingress import Traefik
from ctf_testkit.support import stop_process

DOMAIN = "bench.test"


def one_get(host: str, port: int, headers: dict[str, str]) -> float:
    began = time.perf_counter()
    conn = http.client.HTTPConnection(host, port, timeout=10)
    try:
        conn.request("GET", "/", headers=headers)
        r = conn.getresponse()
        r.read()
    finally:
        conn.close()
    took = time.perf_counter() - began
    if r.status != 200:
        raise RuntimeError(f"GET / through {host}:{port} {headers.get('Host')} answered "
                           f"{r.status}")
    return took


class KeepAlive:
    """One persistent client connection (a browser's) to Traefik; GET / on it."""

    def __init__(self, host: str, port: int, headers: dict[str, str]) -> None:
        self.conn = http.client.HTTPConnection(host, port, timeout=10)
        self.headers = headers

    def get(self) -> float:
        began = time.perf_counter()
        self.conn.request("GET", "/", headers=self.headers)
        r = self.conn.getresponse()
        r.read()
        took = time.perf_counter() - began
        if r.status != 200:
            raise RuntimeError(f"keep-alive GET / answered {r.status}")
        return took


def cpu_seconds(pid: int) -> float:
    """User + system CPU a process has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@dataclass
class ClientProc:
    """This process (the measuring client), for the CPU figures' scale."""

    pid: int = dataclasses.field(default_factory=os.getpid)


def stats(values: list[float]) -> dict[str, float]:
    return {"n": len(values), "p50_ms": round(statistics.median(values) * 1000, 3),
            "p99_ms": round(pct(values, 0.99) * 1000, 3)}


def start_api(bench: Bench, env: dict[str, str]) -> subprocess.Popen[bytes]:
    log = (bench.workdir / "api.log").open("ab")
    proc = subprocess.Popen([sys.executable, "-m", "celery_app.cli", "api"],
                            env={**os.environ, **env}, stdout=log, stderr=subprocess.STDOUT,
                            cwd=ROOT)
    host, port = routes.bind_parts(env["CTF_API_BIND"])

    def up() -> bool:
        try:
            conn = http.client.HTTPConnection(host, port, timeout=1)
            conn.request("GET", routes.GATE_PATH)
            conn.getresponse().read()
            conn.close()
        except OSError:
            return proc.poll() is not None
        return True

    wait_for(up, 30, "the API")
    if proc.poll() is not None:
        raise RuntimeError((bench.workdir / "api.log").read_text()[-2000:])
    return proc


def main() -> int:  # one linear script: set-up, two measurements, figures
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-n", type=int, default=10, help="measured starts of each kind")
    parser.add_argument("--requests", type=int, default=2000, help="requests of each path")
    parser.add_argument("--json", type=Path, help="write the figures here")
    parser.add_argument("--no-start", action="store_true", help="measure request latency only")
    args = parser.parse_args()

    with bench_run() as bench:
        http_port, https_port, status_port, api_port = (free_port() for _ in range(4))
        overrides: dict[str, Any] = {
            "ingress": "traefik", "ingress_http_bind": f"127.0.0.1:{http_port}",
            "ingress_https_bind": f"127.0.0.1:{https_port}",
            "ingress_status_bind": f"127.0.0.1:{status_port}",
            "api_bind": f"127.0.0.1:{api_port}", "instance_domain": DOMAIN,
            "admin_token": ADMIN_TOKEN,
        }
        ing = bench.context(**overrides)
        plain = bench.context(admin_token=ADMIN_TOKEN)
        env = bench.env(
            CTF_ADMIN_TOKEN=ADMIN_TOKEN, CTF_API_BIND=f"127.0.0.1:{api_port}",
            CTF_INGRESS="traefik", CTF_INSTANCE_DOMAIN=DOMAIN,
            CTF_INGRESS_HTTP_BIND=f"127.0.0.1:{http_port}",
            CTF_INGRESS_HTTPS_BIND=f"127.0.0.1:{https_port}",
            CTF_INGRESS_STATUS_BIND=f"127.0.0.1:{status_port}",
        )
        traefik = Traefik(ing.settings, bench.workdir / "traefik.log")
        api = None
        try:
            traefik.start()
            api = start_api(bench, env)
            result: dict[str, Any] = {"machine": machine(),
                                      "load": os.getloadavg()[0]}

            # -- latency -----------------------------------------------------------------
            inst = ing.service.start(ing.service.catalog.key("web", "latteam"))
            info = ing.driver.get_container(inst.container_name)
            assert info is not None and info.ip
            label = ing.service.ingress.label("web", "latteam", "http", inst.started_at)
            host = f"{label}.{DOMAIN}"
            cookie = tokens.issue(tokens.gate_key(ing.settings.flag_secret_value()), "cookie",
                                  label, "latteam", 3600)
            # The instance's own route has the plugin (the default); two more routes to the
            # same container: no gate, and the forwardAuth gate.
            fa_cookie = tokens.issue(tokens.gate_key(ing.settings.flag_secret_value()),
                                     "cookie", "benchfa", "latteam", 3600)
            for name, gated in (("benchungated", False), ("benchfa", True)):
                routes.write_atomically(
                    ing.service.ingress.dynamic_dir / f"bench-{name}.yml",
                    routes.route_config(name, f"{name}.{DOMAIN}", "http", info.ip, 8080,
                                        gated=gated))
                wait_for(lambda name=name: probe.route_loaded("127.0.0.1", status_port,
                                                              f"ctf-{name}", "http"),
                         10, f"the {name} route")
            paths = {
                "direct": (info.ip, 8080, {}),
                "proxy": ("127.0.0.1", http_port, {"Host": f"benchungated.{DOMAIN}:{http_port}"}),
                "plugin": ("127.0.0.1", http_port, {
                    "Host": f"{host}:{http_port}",
                    "Cookie": f"{tokens.COOKIE_NAME}={cookie}"}),
                "forwardauth": ("127.0.0.1", http_port, {
                    "Host": f"benchfa.{DOMAIN}:{http_port}",
                    "Cookie": f"{tokens.COOKIE_NAME}={fa_cookie}"}),
            }
            # A browser keeps its connection to Traefik open: the Traefik paths on one
            # persistent connection each (the container's busybox closes every connection,
            # so "direct" has no such variant; Traefik connects to it anew each time too).
            kept = {f"{k}_keepalive": KeepAlive(*paths[k])
                    for k in ("proxy", "plugin", "forwardauth")}
            measures: dict[str, Any] = {
                **{k: (lambda v=v: one_get(*v)) for k, v in paths.items()},
                **{k: v.get for k, v in kept.items()},
            }
            samples: dict[str, list[float]] = {k: [] for k in measures}
            for measure in measures.values():  # warm-up
                for _ in range(50):
                    measure()
            rounds = 20
            per_round = max(1, args.requests // rounds)
            # CPU per request of Traefik and of the API (the gate), which the load of other
            # work on the machine does not inflate the way it inflates latency.
            procs = {"traefik": traefik.proc, "api": api, "client": ClientProc()}
            cpu: dict[str, dict[str, float]] = {k: dict.fromkeys(procs, 0.0) for k in measures}
            for rnd in range(rounds):
                order = list(measures) if rnd % 2 == 0 else list(reversed(measures))
                for name in order:
                    before = {k: cpu_seconds(p.pid) for k, p in procs.items() if p}
                    samples[name].extend(measures[name]() for _ in range(per_round))
                    for k, p in procs.items():
                        if p:
                            cpu[name][k] += cpu_seconds(p.pid) - before[k]
            lat = {k: stats(v) for k, v in samples.items()}
            d50 = statistics.median(samples["direct"])
            others = [k for k in samples if k != "direct"]
            lat["added_p50_ms"] = {
                k: round((statistics.median(samples[k]) - d50) * 1000, 3) for k in others
            }
            lat["added_p99_ms"] = {
                k: round((pct(samples[k], 0.99) - pct(samples["direct"], 0.99)) * 1000, 3)
                for k in others
            }
            lat["gate_p50_ms"] = {
                k: round((statistics.median(samples[k]) - statistics.median(samples[base]))
                         * 1000, 3)
                for k, base in (("plugin", "proxy"), ("forwardauth", "proxy"),
                                ("plugin_keepalive", "proxy_keepalive"),
                                ("forwardauth_keepalive", "proxy_keepalive"))
            }
            lat["cpu_us_per_request"] = {
                k: {p: round(v / len(samples[k]) * 1e6, 1) for p, v in c.items()}
                for k, c in cpu.items()
            }
            result["latency"] = lat

            # -- start ---------------------------------------------------------------------
            if args.no_start:
                result["load_after"] = os.getloadavg()[0]
                emit(result, args.json)
                return 0
            ing.service.start(ing.service.catalog.key("keep", "ingteam"))
            plain.service.start(plain.service.catalog.key("keep", "portteam"))
            starts: dict[str, list[float]] = {"ingress": [], "ports": []}
            sides = {"ingress": (ing, "ingteam"), "ports": (plain, "portteam")}
            for rnd in range(args.n + 1):  # the first round warms up
                order = ["ingress", "ports"] if rnd % 2 == 0 else ["ports", "ingress"]
                for side in order:
                    ctx, team = sides[side]
                    began = time.perf_counter()
                    got = ctx.service.start(ctx.service.catalog.key("web", team))
                    took = time.perf_counter() - began
                    assert got.status == "running", got
                    if rnd:
                        starts[side].append(took)
                    ctx.service.stop(ctx.service.catalog.key("web", team), count_rate=False)
            med = {k: statistics.median(v) for k, v in starts.items()}
            result["start"] = {
                "n": args.n,
                "ingress_median_ms": round(med["ingress"] * 1000, 1),
                "ports_median_ms": round(med["ports"] * 1000, 1),
                "ratio": round(med["ingress"] / med["ports"], 3),
                "ingress_p90_ms": round(pct(starts["ingress"], 0.9) * 1000, 1),
                "ports_p90_ms": round(pct(starts["ports"], 0.9) * 1000, 1),
            }
            result["load_after"] = os.getloadavg()[0]
            emit(result, args.json)
        finally:
            if api is not None:
                stop_process(api)
            traefik.stop()
            ing.driver.close()
            plain.driver.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
