"""``ctfctl``: the organisers' command line (typer + rich).

Like the API, it talks to the workers through Celery (``send_task``) and reads instance
state from Redis, so it works from any machine that reaches Redis. ``--json`` prints
machine-readable output for scripts.

Exit codes: 0 ok, 1 error, 2 bad input (usage, invalid team id, bad settings), 3 not found
(instance, challenge, task), 4 a limit (quota, lifetime, rate), 5 Redis/Docker unavailable,
6 still running when the wait ended.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from typing import Annotated, Any, NoReturn

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    SpinnerColumn,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table

from celery_app.api.client import Dispatcher, TaskView
from celery_app.core.audit import ADMIN, MAX_LIMIT
from celery_app.core.catalog import load_catalog
from celery_app.errors import CatalogError, CTFError, HostsFileError
from celery_app.hosts.hostsfile import load_hosts
from celery_app.hosts.routing import DEFAULT_QUEUE, host_queue, queues_for
from celery_app.settings import Settings, load_settings
from celery_app.state.audit import KINDS
from celery_app.vocab.models import Instance, parse_iso
from celery_app.vocab.naming import check_team_id

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_NOT_FOUND, EXIT_LIMIT, EXIT_BACKEND, EXIT_PENDING = range(7)

app = typer.Typer(
    name="ctfctl",
    help="Run and watch the CTF instancer: per-team challenge containers on demand.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
out = Console()
err = Console(stderr=True)

JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")]
WaitOpt = Annotated[bool, typer.Option("--wait/--no-wait", help="Wait for the worker.")]
TimeoutOpt = Annotated[float, typer.Option(min=1, max=3600, help="Seconds to wait at most.")]


# -- helpers ----------------------------------------------------------------------------------


def exit_code_for(exc: CTFError) -> int:
    """Return the exit code of an error (see the module docstring)."""
    if exc.status == 404:
        return EXIT_NOT_FOUND
    if exc.status in (409, 429):
        return EXIT_LIMIT
    if exc.status == 422:
        return EXIT_USAGE
    if exc.code == "backend_unavailable":
        return EXIT_BACKEND
    return EXIT_ERROR


def _fail(exc: CTFError) -> NoReturn:
    # escape: a failed start quotes the container's output, which is not ours to style
    err.print(f"[bold red]error[/] ({exc.code}): {escape(exc.detail)}", highlight=False)
    raise typer.Exit(exit_code_for(exc))


@contextlib.contextmanager
def _errors() -> Iterator[None]:
    """Turn our errors and bad settings into a message and a meaningful exit code."""
    try:
        yield
    except CTFError as exc:
        _fail(exc)
    except ValidationError as exc:
        err.print(f"[bold red]invalid settings[/]: {escape(str(exc))}", highlight=False)
        raise typer.Exit(EXIT_USAGE) from None


def _settings() -> Settings:
    with _errors():
        return load_settings()


def _dispatcher() -> Dispatcher:
    with _errors():
        return Dispatcher(_settings())


def _print_json(data: Any) -> None:
    # Plain print: rich would wrap long lines and break the JSON for scripts.
    print(json.dumps(data, indent=2, sort_keys=True))


def _in(moment: str) -> str:
    """Format how long until ``moment`` (``1h 05m``; ``expired`` when past)."""
    seconds = int((parse_iso(moment) - datetime.now(UTC)).total_seconds())
    if seconds <= 0:
        return "expired"
    hours, rest = divmod(seconds, 3600)
    return f"{hours}h {rest // 60:02d}m" if hours else f"{rest // 60}m {rest % 60:02d}s"


_STATUS_STYLE = {"running": "green", "starting": "yellow", "stopping": "yellow", "failed": "red"}


def _instance_table(instances: list[dict[str, Any]], title: str | None = None) -> Table:
    table = Table(title=title)
    for column in ("team", "challenge", "status", "expires in", "host"):
        table.add_column(column)
    # The URL is what organisers copy: fold it rather than cut it with an ellipsis.
    table.add_column("url", overflow="fold")
    for inst in instances:
        status = str(inst.get("status", ""))
        # Every value is escaped: an error quotes container output, which may look like markup.
        table.add_row(
            escape(str(inst.get("team_id", ""))), escape(str(inst.get("challenge", ""))),
            f"[{_STATUS_STYLE.get(status, 'white')}]{escape(status)}[/]",
            _in(inst["expires_at"]) if inst.get("expires_at") else "-",
            escape(str(inst.get("host", "")))
            + ("" if inst.get("host_up", True) else " [red](down)[/]"),
            # A failed instance may keep the url it had: why it failed is what to show.
            escape(str((status == "failed" and inst.get("error")) or _urls(inst)
                       or inst.get("error") or "-")),
        )
    return table


def _urls(inst: dict[str, Any]) -> str | None:
    """The instance's URL; a Compose instance of several endpoints: each, with its service."""
    endpoints = inst.get("endpoints") or []
    if len(endpoints) < 2:  # one endpoint is the url itself
        return inst.get("url")
    return "\n".join(f"{e.get('service')}:{e.get('port')} {e.get('url') or '-'}"
                     for e in endpoints)


def _show(data: dict[str, Any], as_json: bool, title: str | None = None) -> None:
    if as_json:
        _print_json(data)
    elif "container_name" in data:
        out.print(_instance_table([data], title))
    else:
        out.print(data)


def _wait_with_progress(disp: Dispatcher, task_id: str, timeout: float, label: str,
                        quiet: bool) -> TaskView:
    """Wait for a task, showing its PROGRESS meta as a spinner or a download bar."""
    if quiet:
        return disp.wait(task_id, timeout)
    columns = (SpinnerColumn(), TextColumn("{task.description}"), BarColumn(),
               DownloadColumn(), TimeElapsedColumn())
    with Progress(*columns, console=err, transient=True) as progress:
        bar: TaskID = progress.add_task(label, total=None)

        def update(view: TaskView) -> None:
            meta = view.progress
            phase = str(meta.get("phase") or view.state.lower())
            detail = meta.get("image") or meta.get("container") or ""
            total = meta.get("bytes_total") or None
            progress.update(bar, description=f"{label}: {phase} {detail}".rstrip(),
                            total=total, completed=meta.get("bytes_done") or 0)

        return disp.wait(task_id, timeout, on_progress=update)


def _finish(view: TaskView, task_id: str, as_json: bool) -> Any:
    """Return the task's result, or exit with its error or 'still running'."""
    if view.error is not None:
        _fail(view.error)
    if not view.ready:
        if as_json:
            _print_json({"task_id": task_id, "state": view.state})
        else:
            err.print(f"still running (task {task_id}); check later with [bold]ctfctl status[/]")
        raise typer.Exit(EXIT_PENDING)
    return view.result


# -- instances --------------------------------------------------------------------------------


@app.command()
def challenges(as_json: JsonOpt = False) -> None:
    """List the challenges of the catalog."""
    with _errors():
        catalog = load_catalog(_settings())
    rows = [ch.public_view() | {"image": ch.image, "port": ch.port} for ch in catalog]
    health = _solver_health([ch.id for ch in catalog if ch.solver is not None])
    for row in rows:
        if row["id"] in health:
            row["health"] = health[row["id"]]
    if as_json:
        _print_json({"challenges": rows})
        return
    table = Table(title="challenges")
    columns = ["id", "name", "protocol", "port", "ttl", "max lifetime", "image"]
    for column in columns + (["health"] if health else []):
        table.add_column(column)
    for row in rows:
        cells = [row["id"], row["name"], row["protocol"], str(row["port"] or "-"),
                 f"{row['ttl']} s", f"{row['max_lifetime']} s", row["image"]]
        if health:
            state = row.get("health", "-")
            cells.append("[bold red]BROKEN[/]" if state == "broken" else state)
        table.add_row(*cells)
    out.print(table)


def _solver_health(checked: list[str]) -> dict[str, str]:
    """Each solver's last verdict (SPEC §14): ok, broken or unknown (Redis unreachable too)."""
    if not checked:
        return {}
    try:
        disp = Dispatcher(_settings())
        try:
            rows = disp.store.solvers.report(checked)
        finally:
            disp.close()
    except (CTFError, ValidationError):
        return dict.fromkeys(checked, "unknown")
    return {row["challenge"]: row["state"] for row in rows}


def _send_then_show(
    disp: Dispatcher, send: Callable[[], tuple[str, dict[str, Any]]], wait: bool,
    timeout: float, label: str, as_json: bool, done: Callable[[Any], None],
) -> None:
    """Send a start, stop or restart; show what was sent, or wait and hand ``done`` the result.

    Args:
        disp: the Dispatcher that sent it (and waits for it).
        send: sends the request; returns the task id and the instance so far.
        wait: wait for the task (else the task id and the instance so far are shown).
        timeout: how long to wait, in seconds.
        label: what the progress line says meanwhile.
        as_json: print JSON, and no progress line.
        done: shows the task's result.

    Raises:
        typer.Exit: the request was refused, the task failed, or it is still running.

    """
    with _errors():
        task_id, so_far = send()
        if not wait:
            _show({"task_id": task_id, **so_far}, as_json)
            return
        view = _wait_with_progress(disp, task_id, timeout, label, as_json)
    done(_finish(view, task_id, as_json))


@app.command()
def start(
    challenge: str, team: str, wait: WaitOpt = True, timeout: TimeoutOpt = 300,
    as_json: JsonOpt = False,
) -> None:
    """Start TEAM's instance of CHALLENGE (idempotent) and show it once it runs."""
    disp = _dispatcher()
    _send_then_show(disp, lambda: disp.start(disp.key(challenge, team, ADMIN)), wait, timeout,
                    f"starting {challenge} for {team}", as_json,
                    lambda result: _show(result, as_json, "started"))


@app.command()
def stop(
    challenge: str, team: str, wait: WaitOpt = True, timeout: TimeoutOpt = 120,
    as_json: JsonOpt = False,
) -> None:
    """Stop and remove TEAM's instance of CHALLENGE."""
    def stopped(result: Any) -> None:
        if as_json:
            _print_json(result)
        else:
            out.print(f"[green]stopped[/] {challenge} for team {team}")

    disp = _dispatcher()
    _send_then_show(disp, lambda: disp.stop(disp.key(challenge, team, ADMIN)), wait, timeout,
                    f"stopping {challenge} for {team}", as_json, stopped)


@app.command()
def restart(
    challenge: str, team: str, wait: WaitOpt = True, timeout: TimeoutOpt = 300,
    as_json: JsonOpt = False,
) -> None:
    """Replace TEAM's instance of CHALLENGE with a fresh one (same flag, new expiry)."""
    disp = _dispatcher()
    _send_then_show(disp, lambda: disp.restart(disp.key(challenge, team, ADMIN)), wait, timeout,
                    f"restarting {challenge} for {team}", as_json,
                    lambda result: _show(result, as_json, "restarted"))


@app.command()
def extend(challenge: str, team: str, as_json: JsonOpt = False) -> None:
    """Push the expiry of TEAM's instance out by the challenge's ttl (up to its maximum)."""
    disp = _dispatcher()
    with _errors():
        task_id = disp.extend(disp.key(challenge, team, ADMIN))
        view = disp.wait(task_id, 30)
    _show(_finish(view, task_id, as_json), as_json, "extended")


@app.command()
def status(
    team: Annotated[str | None, typer.Option(help="Only this team's instances.")] = None,
    challenge: Annotated[str | None, typer.Option(help="Only this challenge's.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Show instances (from the Redis index), filtered by team and challenge."""
    disp = _dispatcher()
    with _errors():
        if team is not None:
            check_team_id(team, reserved=True)  # the organisers may list the global ones
        if challenge is not None:
            disp.catalog.get(challenge)
        found: list[Instance] = disp.store.list(team_id=team, challenge=challenge)
        instances = disp.present(found)
    if as_json:
        _print_json({"instances": instances})
    elif not instances:
        out.print("no instances")
    else:
        out.print(_instance_table(instances, f"{len(instances)} instance(s)"))


@app.command()
def hosts(as_json: JsonOpt = False) -> None:
    """Show the Docker hosts: instances used/max, room, and whether their worker is alive."""
    disp = _dispatcher()
    with _errors():
        loads = [h.as_dict() for h in disp.host_loads()]
    if as_json:
        _print_json({"hosts": loads})
        return
    table = Table(title=f"{len(loads)} host(s) from {disp.hosts.source}")
    for column in ("host", "worker", "used", "max", "room", "public host", "queue"):
        table.add_column(column)
    for h in loads:
        table.add_row(h["name"], "[green]alive[/]" if h["alive"] else "[red]gone[/]",
                      str(h["used"]), str(h["max"]), str(h["room"]), h["public_host"],
                      h["queue"])
    out.print(table)
    if loads and not any(h["alive"] for h in loads):
        err.print("[yellow]no worker heartbeat at all[/]: are the workers running?")


@app.command()
def token(team: str, as_json: JsonOpt = False) -> None:
    """Print TEAM's API token (it acts on that team's routes only)."""
    disp = _dispatcher()
    with _errors():
        value = disp.team_token(team)  # the team's current access generation's (Redis)
    if as_json:
        _print_json({"team_id": team, "token": value})
    else:
        print(value)  # bare, for $(ctfctl token t1)


@app.command()
def revoke(team: str, as_json: JsonOpt = False) -> None:
    """Revoke TEAM's token, access links and cookies (a member left, a link leaked).

    The old token is refused at once; the new one is printed. Within the janitor's interval
    each running instance of the team moves to a new host name: the old one answers 404 and
    the team opens its instances again from the dashboard.
    """
    disp = _dispatcher()
    with _errors():
        revoked = disp.revoke_access(team)
    if as_json:
        _print_json(revoked)
        return
    err.print(f"team {revoked['team_id']}: token, links and cookies revoked (generation "
              f"{revoked['generation']}); its instances move to new host names within "
              f"{revoked['hosts_move_within_s']:g} s. New token:")
    print(revoked["token"])


_OUTCOME_STYLE = {"ok": "green", "correct": "green", "wrong": "yellow"}


@app.command()
def audit(
    team: Annotated[str | None, typer.Option(help="Only this team's events.")] = None,
    challenge: Annotated[str | None, typer.Option(help="Only this challenge's events.")] = None,
    kind: Annotated[str | None, typer.Option(help=f"Only one kind: {', '.join(KINDS)}.")] = None,
    since: Annotated[str | None, typer.Option(
        help="Only events at or after this ISO 8601 UTC time (2026-12-03T18:00:00Z).")] = None,
    limit: Annotated[int, typer.Option(min=1, max=MAX_LIMIT, help="At most this many.")] = 100,
    as_json: JsonOpt = False,
) -> None:
    """Print the audit trail, newest first: who started, stopped, extended, checked flags."""
    disp = _dispatcher()
    with _errors():
        events = disp.auditor.read(team=team, challenge=challenge, kind=kind, since=since,
                                   limit=limit)
    if as_json:
        _print_json({"events": events})
        return
    table = Table(title=f"{len(events)} event(s), newest first")
    for column in ("time", "kind", "team", "challenge", "actor", "outcome", "more"):
        table.add_column(column)
    for e in events:
        more = " ".join(f"{k}={e[k]}" for k in ("owner", "action", "name") if e.get(k))
        outcome = str(e.get("outcome") or "")
        style = _OUTCOME_STYLE.get(outcome, "red")
        table.add_row(*(escape(str(e.get(k) or "-")) for k in
                        ("time", "kind", "team_id", "challenge", "actor")),
                      f"[{style}]{escape(outcome)}[/]", escape(more))
    out.print(table)


@app.command()
def pull(
    host: Annotated[str | None, typer.Option(help="Pull on this host's worker.")] = None,
    timeout: TimeoutOpt = 3600,
    as_json: JsonOpt = False,
) -> None:
    """Pull every catalog image on a worker ahead of the event, with a progress bar."""
    disp = _dispatcher()
    with _errors():
        queue = host_queue(host) if host else DEFAULT_QUEUE
        task_id = disp.send("prefetch_images", [], None, queue)
        view = _wait_with_progress(disp, task_id, timeout, "pulling images", as_json)
    result = _finish(view, task_id, as_json)
    if as_json:
        _print_json(result)
    else:
        for image in result.get("images", []):
            out.print(f"[green]present[/] {image}")


# -- running the service ----------------------------------------------------------------------


@app.command()
def worker(
    host: Annotated[str | None, typer.Option(help="Docker host to serve (CTF_HOST).")] = None,
    concurrency: Annotated[int | None, typer.Option(min=1)] = None,
    loglevel: Annotated[str, typer.Option()] = "INFO",
) -> None:
    """Run the Celery worker with the janitor (beat), as run-celery-worker.sh does."""
    settings = _settings()
    name = host or settings.host
    os.environ["CTF_HOST"] = name
    schedule = settings.data_dir / f"celerybeat-schedule-{name}"
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    argv = [
        sys.executable, "-m", "celery", "-A", "celery_app.celery_app:app", "worker", "-B",
        "--pool", "threads", "--concurrency", str(concurrency or settings.worker_concurrency),
        "--loglevel", loglevel, "-n", f"ctf-{name}@%h", "-Q", ",".join(queues_for(name)),
        "-s", str(schedule),
    ]
    os.execv(sys.executable, argv)  # noqa: S606  # replace ourselves: signals reach celery


def _split_bind(bind: str) -> tuple[str, int]:
    host, _, port = bind.rpartition(":")
    try:
        return host.strip("[]") or "127.0.0.1", int(port)
    except ValueError:
        err.print(f"[bold red]error[/]: CTF_API_BIND {bind!r} must look like 127.0.0.1:8000")
        raise typer.Exit(EXIT_USAGE) from None


@app.command()
def api(
    bind: Annotated[str | None, typer.Option(help="host:port (default CTF_API_BIND).")] = None,
) -> None:
    """Run the HTTP API and dashboard (it needs Redis, not Docker)."""
    import uvicorn  # noqa: PLC0415  # only this command needs the server

    from celery_app.api.app import create_app  # noqa: PLC0415

    settings = _settings()
    host, port = _split_bind(bind or settings.api_bind)
    with _errors():
        application = create_app(settings)
    shown = f"[{host}]" if ":" in host else host
    token_from = ("the CTF_ADMIN_TOKEN environment variable" if os.environ.get("CTF_ADMIN_TOKEN")
                  else str((settings.data_dir / "admin_token").resolve()))
    err.print(f"[bold]CTF instancer API[/] on http://{shown}:{port}  "
              f"(dashboard /, docs /api/docs, health /healthz, metrics /metrics)")
    err.print(f"admin token: in {token_from}")
    for where in settings.unprotected_redis_urls():
        err.print(f"[yellow]warning[/]: Redis at {where} is off loopback and the URL has no "
                  "password: anyone who reaches it can send tasks", highlight=False)
    uvicorn.run(application, host=host, port=port, log_level="info", proxy_headers=False,
                access_log=settings.api_access_log)


@app.command()
def janitor(
    once: Annotated[bool, typer.Option("--once", help="Run one pass and exit.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Remove expired instances and orphans on this machine's Docker host."""
    from celery_app.worker.context import build_context  # noqa: PLC0415  # needs Docker

    settings = _settings()
    with _errors():
        ctx = build_context(settings)
    try:
        while True:
            with _errors():
                summary = ctx.janitor.run_once()
            data = summary.as_dict()
            if as_json:
                _print_json(data)
            elif once or summary.removed or summary.errors:
                out.print(
                    f"janitor: {len(summary.expired)} expired, "
                    f"{len(summary.orphan_containers)} orphan container(s), "
                    f"{len(summary.orphan_networks)} orphan network(s) removed in "
                    f"{summary.seconds:.2f} s" + (" (reconciled first)" if summary.reconciled
                                                  else "")
                )
                for line in summary.errors:
                    err.print(f"[yellow]warning[/]: {escape(line)}")
            if once:
                raise typer.Exit(EXIT_ERROR if summary.errors else EXIT_OK)
            time.sleep(settings.janitor_interval)
    except KeyboardInterrupt:
        raise typer.Exit(EXIT_OK) from None
    finally:
        ctx.driver.close()


@app.command()
def check() -> None:
    """Check the settings and the catalog; exit 1 with a clear message on a mistake."""
    try:
        settings = load_settings()
        catalog = load_catalog(settings)
        known = load_hosts(settings)
        if settings.hosts_file is not None:
            known.get_host(settings.host)
    except CatalogError as exc:
        err.print(f"[bold red]catalog error[/]: {escape(exc.detail)}", highlight=False)
        raise typer.Exit(EXIT_ERROR) from None
    except HostsFileError as exc:
        err.print(f"[bold red]hosts file error[/]: {escape(exc.detail)}", highlight=False)
        raise typer.Exit(EXIT_ERROR) from None
    except ValidationError as exc:
        err.print(f"[bold red]settings error[/]: {escape(str(exc))}", highlight=False)
        raise typer.Exit(EXIT_ERROR) from None
    source = settings.challenges_file or "the default catalog"
    err.print(f"ok: {len(catalog)} challenge(s) from {source}: {', '.join(catalog.ids())}",
              highlight=False)
    for where in settings.unprotected_redis_urls():
        err.print(f"[yellow]warning[/]: Redis at {where} is off loopback and the URL has no "
                  "password: anyone who reaches it can send tasks. Set requirepass and use "
                  "redis://:PASSWORD@host:port/db", highlight=False)
    _check_firewall(settings, known)


def _check_firewall(settings: Settings, known: Any) -> None:
    """Say whether the egress firewall is in force; exit 1 when it cannot be installed."""
    from celery_app.engine.docker_driver import DockerDriver  # noqa: PLC0415  # no client is made
    from celery_app.engine.firewall import EgressGuard, host_addresses  # noqa: PLC0415

    docker_url = known.get_host(settings.host).docker_url
    guard = EgressGuard.for_settings(settings, DockerDriver(docker_url),
                                     host_addresses(known.values()), docker_url=docker_url)
    if guard.firewall is None:
        if guard.place == "remote" and guard.beacon is not None:
            try:
                guard.require()
            except CTFError as exc:
                err.print(f"[yellow]note[/]: {escape(exc.detail)}", highlight=False)
                return
            err.print("ok: egress firewall in force on the engine's machine (its "
                      "`ctfctl firewall keep` reported lately)", highlight=False)
            return
        err.print(f"[yellow]note[/]: egress firewall not enforced here: {guard.why_not}",
                  highlight=False)
        return
    try:
        state = guard.firewall.state()
    except CTFError as exc:
        err.print(f"[bold red]egress firewall error[/]: {exc.detail}", highlight=False)
        raise typer.Exit(EXIT_ERROR) from None
    table = f"table inet {guard.firewall.table}"
    if state.current:
        err.print(f"ok: egress firewall in place ({table}: {len(state.bridges)} team "
                  f"network(s), {len(state.internet)} instance(s) with internet)",
                  highlight=False)
    else:
        err.print(f"[yellow]note[/]: egress firewall not in place ({state.detail}); the "
                  "worker installs it when it starts, `ctfctl firewall install` does it now",
                  highlight=False)


@app.command()
def queues(
    host: Annotated[str, typer.Option(help="The Docker host's name.")] = "local",
) -> None:
    """Print the comma-separated Celery queues the worker of HOST consumes."""
    print(",".join(queues_for(host)))  # read by run-celery-worker.sh


# -- the egress firewall -----------------------------------------------------------------------

firewall_app = typer.Typer(
    help="The egress firewall of this machine's Docker host (nftables; docs/SECURITY.md).",
    no_args_is_help=True,
)
app.add_typer(firewall_app, name="firewall")


def _guard(beacon_ttl: float | None = None) -> Any:
    from celery_app.engine.docker_driver import DockerDriver  # noqa: PLC0415  # needs Docker
    from celery_app.engine.firewall import (  # noqa: PLC0415
        BEACON_TTL,
        EgressFirewall,
        EgressGuard,
        KeeperBeacon,
        Policy,
        host_addresses,
    )

    settings = _settings()
    with _errors():
        known = load_hosts(settings)
        driver = DockerDriver(known.get_host(settings.host).docker_url)
        policy = Policy.from_settings(settings, host_addresses(known.values()))
    # Asked for by name: act even when the worker would not (a remote engine's own host).
    # Each good pass says so in Redis, where the workers driving this engine look for it.
    beacon = KeeperBeacon(settings.state_redis_url, beacon_ttl or BEACON_TTL)
    return EgressGuard(EgressFirewall(policy), driver, beacon=beacon)


@firewall_app.command("install")
def firewall_install() -> None:
    """Install (or repair) the rules for CTF_TEAM_SUBNET_POOL now; idempotent."""
    guard = _guard()
    with _errors():
        outcome = guard.keep()
    err.print(f"egress firewall {outcome}: table inet {guard.firewall.table}", highlight=False)


@firewall_app.command("keep")
def firewall_keep(
    interval: Annotated[float, typer.Option(min=1, max=300, help="Seconds between checks.")]
    = 5.0,
) -> None:
    """Install the rules and keep them in step with Docker (for a host without our worker).

    Each good pass writes a heartbeat into Redis (CTF_REDIS_URL) that lasts three intervals
    (at least 30 s): workers that drive this engine from another machine start instances
    only while it is fresh.
    """
    from celery_app.engine.firewall import BEACON_TTL  # noqa: PLC0415

    guard = _guard(max(BEACON_TTL, 3 * interval))
    err.print(f"keeping table inet {guard.firewall.table} every {interval:g} s (Ctrl-C stops; "
              "the rules stay)", highlight=False)
    try:
        while True:
            try:
                guard.keep()
            except CTFError as exc:
                err.print(f"[yellow]warning[/]: {exc.detail}", highlight=False)
            time.sleep(interval)
    except KeyboardInterrupt:
        raise typer.Exit(EXIT_OK) from None


@firewall_app.command("remove")
def firewall_remove() -> None:
    """Remove the rules: instances reach everything Docker lets them reach."""
    guard = _guard()
    with _errors():
        removed = guard.firewall.remove()
    err.print(f"egress firewall {'removed' if removed else 'was not installed'}: table inet "
              f"{guard.firewall.table}", highlight=False)


@firewall_app.command("status")
def firewall_status(as_json: JsonOpt = False) -> None:
    """Say whether the rules are in place; exit 1 when they are not."""
    guard = _guard()
    with _errors():
        state = guard.firewall.state()
    data = {"table": f"inet {guard.firewall.table}", "pool": str(guard.firewall.policy.pool),
            "present": state.present, "in_place": state.current, "detail": state.detail,
            "bridges": sorted(state.bridges),
            "internet": [list(pair) for pair in sorted(state.internet)]}
    if as_json:
        _print_json(data)
    else:
        shown = "in place" if state.current else f"NOT in place ({state.detail})"
        out.print(f"egress firewall {shown}: table inet {guard.firewall.table}, pool "
                  f"{data['pool']}, {len(state.bridges)} team network(s), "
                  f"{len(state.internet)} instance(s) with internet", highlight=False)
    raise typer.Exit(EXIT_OK if state.current else EXIT_ERROR)


# -- warm pools (issue 14) --------------------------------------------------------------------

pool_app = typer.Typer(help="Warm pools: containers booted ahead, claimed by starts.",
                       invoke_without_command=True)
app.add_typer(pool_app, name="pool")


def _pool_rows(disp: Dispatcher) -> list[dict[str, Any]]:
    from celery_app.core.pool import pool_status  # noqa: PLC0415  # light --help

    return pool_status(disp.store.pools, disp.catalog, list(disp.hosts))


@pool_app.callback()
def pool_show(ctx: typer.Context, as_json: JsonOpt = False) -> None:
    """Show each pool of each host: size, containers, ready, claims, misses."""
    if ctx.invoked_subcommand is not None:
        return
    disp = _dispatcher()
    with _errors():
        rows = _pool_rows(disp)
    if as_json:
        _print_json({"pools": rows})
        return
    if not rows:
        out.print("no pools: set pool: N on a challenge of the catalog")
        return
    table = Table(title=f"{len(rows)} pool(s)")
    for column in ("host", "challenge", "size", "containers", "ready", "claims", "misses"):
        table.add_column(column)
    for r in rows:
        table.add_row(r["host"], r["challenge"], str(r["size"]), str(r["containers"]),
                      str(r["ready"]), str(r["claims"]), str(r["misses"]))
    out.print(table)


@pool_app.command("drain")
def pool_drain(
    challenge: str, wait: WaitOpt = True, timeout: TimeoutOpt = 120, as_json: JsonOpt = False,
) -> None:
    """Remove CHALLENGE's unclaimed pool containers (after pulling a new image): they refill."""
    disp = _dispatcher()
    with _errors():
        ch = disp.catalog.get(challenge)
        keys = disp.store.pools
        mark = keys.drain(ch.id)
        disp.auditor.try_record("admin", None, ch.id, ADMIN, "ok", action="drain")
        # Each host's next pass removes them; the members made before the mark are known by
        # slot only, so wait until none of the slots seen now is left.
        before = {k for k, v in keys.members().items() if v == ch.id}
        deadline = time.monotonic() + timeout
        while wait and before & set(keys.members()) and time.monotonic() < deadline:
            time.sleep(0.5)
        left = len(before & {k for k, v in keys.members().items() if v == ch.id})
    if as_json:
        _print_json({"challenge": ch.id, "drained_at": mark, "left": left})
    elif left:
        err.print(f"{left} container(s) of {ch.id} not removed yet: is a worker running?")
        raise typer.Exit(EXIT_PENDING)
    else:
        out.print(f"[green]drained[/] {ch.id}: its pools refill from the current image")


@pool_app.command("warm")
def pool_warm(
    challenge: str,
    size: Annotated[int | None, typer.Argument(
        min=0, help="Containers kept ready on each host; omitted with --reset.")] = None,
    reset: Annotated[bool, typer.Option(
        "--reset", help="Go back to the catalog's pool: size.")] = False,
    wait: WaitOpt = True, timeout: TimeoutOpt = 600, as_json: JsonOpt = False,
) -> None:
    """Bring CHALLENGE's pool on each host to SIZE ahead of the opening (replaces pool:).

    The size holds until --reset (the catalog's pool: again); each host's pool pass starts
    at once and refills as starts claim. With --wait, waits until every host holds SIZE
    ready containers (capacity limits may keep it below: the pools never refuse a start).
    """
    from celery_app.core.pool import MAX_WARM  # noqa: PLC0415  # light --help

    disp = _dispatcher()
    if (size is None) == (not reset):
        err.print("give a SIZE (containers kept ready on each host) or --reset, not both")
        raise typer.Exit(EXIT_USAGE)
    if size is not None and size > MAX_WARM:
        err.print(f"SIZE {size} is above {MAX_WARM} per host; the host limits "
                  "(max_instances) bound a pool anyway")
        raise typer.Exit(EXIT_USAGE)
    with _errors():
        ch = disp.catalog.get(challenge)
        keys = disp.store.pools
        keys.set_size(ch.id, size)
        disp.auditor.try_record("admin", None, ch.id, ADMIN, "ok",
                                action=f"pool warm {size if size is not None else 'reset'}")
        hosts = list(disp.hosts)
        for host in hosts:  # each host's pass now, not at its next beat
            disp.send("refill_pools", [], None, host_queue(host))
        target = ch.pool if size is None else size
        deadline = time.monotonic() + timeout

        def ready() -> dict[str, int]:
            return {host: len(keys.ready(host, ch.id)) for host in hosts}

        kicked = time.monotonic()
        while wait and min(ready().values(), default=target) < target \
                and time.monotonic() < deadline:
            time.sleep(0.5)
            if time.monotonic() - kicked >= 2.0:  # one pass boots a few: keep them coming
                kicked = time.monotonic()
                for host in hosts:
                    disp.send("refill_pools", [], None, host_queue(host))
        now = ready()
    short = {host: n for host, n in now.items() if n < target}
    if as_json:
        _print_json({"challenge": ch.id, "size": target, "warmed": size is not None,
                     "ready": now})
    elif wait and short:
        err.print(f"{ch.id}: {', '.join(f'{h} has {n}' for h, n in short.items())} of "
                  f"{target} ready after {timeout:.0f} s: is a worker running, or is the "
                  "host at its max_instances?")
    else:
        out.print(f"[green]pool[/] {ch.id}: {target} per host"
                  + (f", ready: {now}" if wait else " (filling)"), highlight=False)
    if wait and short:
        raise typer.Exit(EXIT_PENDING)


def main() -> None:
    """Run ``ctfctl``."""
    app()


if __name__ == "__main__":
    main()
