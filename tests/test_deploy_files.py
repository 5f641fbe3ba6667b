"""The deployment files beside the image (issue 28): systemd units, alert rules, dashboard.

The units are checked by ``systemd-analyze verify`` and scored by its offline security
analysis; the alert rules by ``promtool check rules`` and their unit tests
(``promtool test rules``); and every metric the rules and the Grafana dashboard name is
compared with what ``/metrics`` of a real API on a real Redis exports.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from ci import unavailable
from conftest import ADMIN_TOKEN, ROOT

from celery_app.api.client import make_store
from celery_app.settings import load_settings
from celery_app.worker.heartbeat import Heartbeat
from ctf_testkit.support import RedisServer, wait_for

DEPLOY = ROOT / "deploy"
UNITS = sorted((DEPLOY / "systemd").glob("*.service"))
# Prometheus's own series of a scrape job; every other name must come from /metrics.
PROMETHEUS_SERIES = {"up"}


def _tool(name: str, package: str) -> str:
    exe = shutil.which(name)
    if exe is None:
        unavailable(f"{name} is missing: apt-get install {package}")
    return exe


def _installed_units(tmp_path: Path) -> list[Path]:
    """The units as installed (under ``tmp_path``), each template instantiated as ``alpha``."""
    bindir = tmp_path / "opt" / "ctf" / "bin"
    bindir.mkdir(parents=True)
    shutil.copy(DEPLOY / "entrypoint.sh", bindir / "ctf-entrypoint")
    (bindir / "ctf-entrypoint").chmod(0o755)
    out = tmp_path / "units"
    out.mkdir()
    made = []
    for unit in UNITS:
        text = unit.read_text().replace("/opt/ctf/bin/", f"{bindir}/")
        target = out / unit.name.replace("@.service", "@alpha.service")
        target.write_text(text)
        made.append(target)
    return made


def test_systemd_units_verify(tmp_path: Path) -> None:
    """systemd-analyze verify accepts every unit with no warning (an unknown key is one)."""
    exe = _tool("systemd-analyze", "systemd")
    assert {u.name for u in UNITS} >= {"ctf-worker@.service", "ctf-api.service",
                                       "ctf-redis.service"}
    units = _installed_units(tmp_path)
    done = subprocess.run([exe, "verify", "--man=no", *map(str, units)], capture_output=True,
                          text=True, check=False)
    assert done.returncode == 0, done.stderr
    ours = [line for line in done.stderr.splitlines() if "ctf-" in line]
    assert ours == [], "\n".join(ours)


def test_systemd_units_are_hardened(tmp_path: Path) -> None:
    """Every unit scores 'OK' (exposure at most 3.0) in systemd's offline security analysis."""
    exe = _tool("systemd-analyze", "systemd")
    for unit in _installed_units(tmp_path):
        done = subprocess.run([exe, "security", "--offline=yes", "--threshold=30",
                               "--no-pager", str(unit)], capture_output=True, text=True,
                              check=False)
        assert done.returncode == 0, f"{unit.name}:\n{done.stdout[-3000:]}{done.stderr}"
        text = (DEPLOY / "systemd" / unit.name.replace("@alpha", "@")).read_text()
        assert "NoNewPrivileges=yes" in text and "ProtectSystem=strict" in text


def test_alert_rules_pass_promtool() -> None:
    """The rules and scrape config pass `promtool check`, and the rules' unit tests pass."""
    exe = _tool("promtool", "prometheus")
    prom = DEPLOY / "prometheus"
    for args in (["check", "rules", "alerts.yml"], ["check", "config", "prometheus.yml"],
                 ["test", "rules", "alerts.test.yml"]):
        done = subprocess.run([exe, *args], cwd=prom, capture_output=True, text=True,
                              check=False)
        assert done.returncode == 0, f"promtool {' '.join(args)}:\n{done.stdout}{done.stderr}"
    names = {r["alert"] for g in yaml.safe_load((prom / "alerts.yml").read_text())["groups"]
             for r in g["rules"]}
    assert names >= {"CTFHostDown", "CTFRedisDown", "CTFStartErrorRateHigh",
                     "CTFStartLatencyHigh", "CTFCapacityNearFull", "CTFPoolEmpty",
                     "CTFEgressFirewallNotInForce"}


def _exported(text: str) -> set[str]:
    """Every series name an exposition can carry, from its TYPE lines and its samples."""
    names: set[str] = set()
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ", 3)
            names.add(name)
            base = name.removesuffix("_total")
            names.add(f"{base}_created")
            if kind == "histogram":
                names |= {f"{name}_bucket", f"{name}_sum", f"{name}_count"}
        elif line and not line.startswith("#"):
            names.add(re.split(r"[{ ]", line, maxsplit=1)[0])
    return names


def _named(expr: str) -> set[str]:
    """The series names a PromQL expression reads: ours (ctf_*) and Prometheus's ``up``."""
    tokens = set(re.findall(r"(?<![\w:])([a-zA-Z_:][\w:]*)", re.sub(r'"[^"]*"', "", expr)))
    return {t for t in tokens if t.startswith("ctf_")} | (tokens & PROMETHEUS_SERIES)


@pytest.mark.redis
def test_rules_and_dashboard_use_only_exported_metrics(tmp_path: Path) -> None:
    """Each metric the alert rules and the Grafana panels read is one /metrics exports."""
    from fastapi.testclient import TestClient  # noqa: PLC0415

    from celery_app.api.app import create_app  # noqa: PLC0415

    redis = RedisServer(tmp_path)
    redis.start()
    try:
        catalog = tmp_path / "challenges.yaml"
        catalog.write_text("challenges:\n  web: {image: 'example/web:1', port: 8080, pool: 1}\n")
        settings = load_settings(
            broker_url=f"{redis.url}/0", result_backend=f"{redis.url}/1",
            redis_url=f"{redis.url}/2", challenges_file=catalog, data_dir=tmp_path / "data",
            admin_token=ADMIN_TOKEN)
        with TestClient(create_app(settings)) as api:
            first = api.get("/metrics")
            assert first.status_code == 200
            # Host liveness is the heartbeat itself: none yet, then one.
            assert 'ctf_host_up{host="local"} 0.0' in first.text
            assert 'ctf_host_max_instances{host="local"} 500.0' in first.text
            Heartbeat(make_store(settings), "local", 15).beat()

            def scraped_up() -> str | None:
                text = api.get("/metrics").text
                return text if 'ctf_host_up{host="local"} 1.0' in text else None

            # Scrapes read Redis at most every 2 s (api/metrics.py), so the beat shows by then.
            exposition = wait_for(scraped_up, 10, 0.2, "the heartbeat in /metrics")
    finally:
        redis.stop()
    exported = _exported(exposition) | PROMETHEUS_SERIES

    rules = yaml.safe_load((DEPLOY / "prometheus" / "alerts.yml").read_text())
    exprs = {f"rule {r['alert']}": r["expr"] for g in rules["groups"] for r in g["rules"]}
    dashboard = json.loads((DEPLOY / "grafana" / "ctf-instancer.json").read_text())
    for panel in dashboard["panels"]:
        for target in panel["targets"]:
            exprs[f"panel {panel['title']!r} {target['refId']}"] = target["expr"]
    assert len(exprs) > 15
    unknown = {where: sorted(_named(e) - exported) for where, e in exprs.items()
               if _named(e) - exported}
    assert unknown == {}, f"not exported by /metrics: {unknown}"
    # Every panel reads something.
    assert all(_named(e) for e in exprs.values())


def test_wheel_carries_the_dashboard_and_the_gate_plugin(tmp_path: Path) -> None:
    """The wheel the image installs holds the dashboard, the Go gate plugin and ``ctfctl``."""
    import sys  # noqa: PLC0415
    import zipfile  # noqa: PLC0415

    done = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps",
                           "--wheel-dir", str(tmp_path), str(ROOT)],
                          capture_output=True, text=True, check=False, timeout=300)
    assert done.returncode == 0, done.stderr
    (wheel,) = tmp_path.glob("ctf_instancer-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {"celery_app/api/static/index.html", "celery_app/api/static/app.js",
            "celery_app/ingress/plugin/ctfgate/ctfgate.go",
            "celery_app/ingress/plugin/ctfgate/go.mod"} <= names
    entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    assert "ctfctl = celery_app.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()


@pytest.mark.slow
def test_build_makes_an_sdist_and_a_wheel_that_install_a_working_ctfctl(
    tmp_path: Path,
) -> None:
    """``python -m build`` makes both; the wheel installs in a clean venv; ``ctfctl check`` runs."""
    import os  # noqa: PLC0415
    import sys  # noqa: PLC0415
    import tarfile  # noqa: PLC0415
    import zipfile  # noqa: PLC0415

    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("CTF_", "CELERY_", "PYTHON", "VIRTUAL_ENV"))}
    dist = tmp_path / "dist"
    # The sdist first, then the wheel built from it (build's default): what the index gets, and
    # proof the sdist alone is enough to make the wheel. Not from the tree's cwd (its build/).
    built = subprocess.run([sys.executable, "-m", "build", "--outdir", str(dist), str(ROOT)],
                           capture_output=True, text=True, check=False, timeout=600,
                           cwd=str(tmp_path), env=env)
    assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-3000:]
    (sdist,) = dist.glob("ctf_instancer-*.tar.gz")
    (wheel,) = dist.glob("ctf_instancer-*.whl")
    with tarfile.open(sdist) as tar:
        in_sdist = {name.split("/", 1)[1] for name in tar.getnames() if "/" in name}
    carried = {"celery_app/api/static/index.html", "celery_app/api/static/app.js",
               "celery_app/ingress/plugin/ctfgate/ctfgate.go",
               "celery_app/ingress/plugin/ctfgate/go.mod", "celery_app/cli.py"}
    assert carried | {"pyproject.toml", "README.md"} <= in_sdist
    in_wheel = set(zipfile.ZipFile(wheel).namelist())
    assert carried <= in_wheel
    assert not any(n.startswith(("tests/", "deploy/", "build/")) for n in in_wheel)

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120, env=env)
    # The wheel with its dependencies from the package index (pip's cache keeps reruns short).
    installed = subprocess.run([str(venv / "bin" / "pip"), "install", "-q",
                                "--disable-pip-version-check", str(wheel)],
                               capture_output=True, text=True, check=False, timeout=900,
                               cwd=str(tmp_path), env=env)
    assert installed.returncode == 0, installed.stderr[-4000:]
    # ctfctl from the venv, away from the source tree, with no Redis and no Docker: settings
    # and the default catalog (its secrets are generated into CTF_DATA_DIR).
    checked = subprocess.run(
        [str(venv / "bin" / "ctfctl"), "check"], capture_output=True, text=True, check=False,
        timeout=120, cwd=str(tmp_path),
        env={**env, "CTF_DATA_DIR": str(tmp_path / "data"), "CTF_EGRESS_FIREWALL": "off"},
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "ok: " in checked.stderr and "challenge(s) from the default catalog" in checked.stderr
    where = subprocess.run([str(venv / "bin" / "python"), "-c",
                            "import celery_app; print(celery_app.__file__)"],
                           capture_output=True, text=True, check=True, cwd=str(tmp_path),
                           env=env).stdout
    assert where.startswith(str(venv)), where
