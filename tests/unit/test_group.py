"""A group's services start in depends_on order, wait on their conditions, all or nothing."""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable

import pytest

from celery_app.core import group
from celery_app.core.group import Condition, Member, start_group
from celery_app.engine.driver import ContainerSpec, Healthcheck
from celery_app.errors import InvalidRequest, StartFailed
from ctf_testkit.fake_driver import FakeDriver
from ctf_testkit.support import wait_for

NET = "ctf-inst-shop-t1"
CHECK = Healthcheck(test=("CMD", "true"), interval=1)


def member(name: str, image: str = "img", healthcheck: Healthcheck | None = None,
           **depends_on: Condition) -> Member:
    """One service of the test group, on the instance network, reached by its name."""
    spec = ContainerSpec(
        name=f"ctf-shop-t1-{name}", image=image, port=None, team_id="t1",
        labels={"ctf.service": name}, env={}, memory_bytes=64 << 20, nano_cpus=10**9,
        pids=64, cap_add=[], publish_ip="127.0.0.1", network=NET, aliases=(name,),
        healthcheck=healthcheck,
    )
    return Member(name, spec, depends_on)


@pytest.fixture
def driver() -> FakeDriver:
    """An engine with the instance's network."""
    fake = FakeDriver()
    fake.add_image("img")
    fake.ensure_named_network(NET, {}, "10.99.0.0/16", 28)
    return fake


def clock_and_pause(on_pause: Callable[[int], None] = lambda _: None,
                    step: float = 1.0) -> tuple[Callable[[], float], Callable[[float], None]]:
    """A clock that moves ``step`` s per pause, and a pause that lets the test act."""
    now = [0.0]
    count = itertools.count()

    def pause(_seconds: float) -> None:
        now[0] += step
        on_pause(next(count))

    return (lambda: now[0]), pause


def by_service(driver: FakeDriver, name: str) -> str:
    """The id of the service's container."""
    return next(i for i, spec in driver.specs.items() if spec.aliases == (name,)
                and i in driver.containers)


def test_a_service_waits_for_its_dependency_to_be_healthy(driver: FakeDriver) -> None:
    """Web is made only once db's healthcheck says healthy; both run on return."""
    seen_when_web_ran: list[str | None] = []
    real_run = driver.run_container

    def run(spec: ContainerSpec) -> object:
        if spec.aliases == ("web",):
            seen_when_web_ran.append(driver.containers[by_service(driver, "db")].health)
        return real_run(spec)

    driver.run_container = run  # type: ignore[method-assign]

    def on_pause(n: int) -> None:
        if n == 2:
            driver.set_health(by_service(driver, "db"), "healthy")

    clock, pause = clock_and_pause(on_pause)
    made = start_group(driver, [member("db", healthcheck=CHECK),
                                member("web", db="service_healthy")],
                       timeout=60, what="shop for team t1", clock=clock, pause=pause)
    assert list(made) == ["db", "web"]
    assert seen_when_web_ran == ["healthy"]
    assert driver.specs[made["web"].id].aliases == ("web",)


def test_an_unhealthy_dependency_leaves_nothing_and_names_the_service(driver: FakeDriver) -> None:
    """Db turning unhealthy removes every container made; the error names db and why."""
    def on_pause(_n: int) -> None:
        driver.logs[by_service(driver, "db")] = "FATAL: cannot open data\n"
        driver.set_health(by_service(driver, "db"), "unhealthy")

    clock, pause = clock_and_pause(on_pause)
    with pytest.raises(StartFailed, match=r"service db is unhealthy.*FATAL: cannot open data"):
        start_group(driver, [member("cache"), member("db", healthcheck=CHECK),
                             member("web", db="service_healthy")],
                    timeout=60, what="shop for team t1", clock=clock, pause=pause)
    assert driver.containers == {}


def test_a_one_shot_service_that_exits_0_is_done_not_dead(driver: FakeDriver) -> None:
    """Migrate exiting 0 lets web start, and the group runs with migrate exited."""
    def on_pause(_n: int) -> None:
        migrate = by_service(driver, "migrate")
        if driver.containers[migrate].state == "running":
            driver.exit(migrate, 0)

    clock, pause = clock_and_pause(on_pause)
    made = start_group(driver, [member("migrate"),
                                member("web", migrate="service_completed_successfully")],
                       timeout=60, what="shop for team t1", clock=clock, pause=pause)
    assert made["migrate"].state == "exited" and made["web"].state == "running"


def test_a_one_shot_that_fails_fails_the_group(driver: FakeDriver) -> None:
    """A one-shot exiting 3 fails the start with its code; nothing is left."""
    clock, pause = clock_and_pause(lambda _n: driver.exit(by_service(driver, "migrate"), 3))
    with pytest.raises(StartFailed, match="service migrate exited with code 3"):
        start_group(driver, [member("migrate"),
                             member("web", migrate="service_completed_successfully")],
                    timeout=60, what="shop", clock=clock, pause=pause)
    assert driver.containers == {}


def test_a_service_never_healthy_fails_at_the_timeout(driver: FakeDriver) -> None:
    """A healthcheck still 'starting' at the deadline fails the group, naming the service."""
    clock, pause = clock_and_pause(step=5.0)
    with pytest.raises(StartFailed, match=r"service web was not up and healthy in time "
                                          r"\(still starting\)"):
        start_group(driver, [member("web", healthcheck=CHECK)], timeout=30, what="shop",
                    clock=clock, pause=pause)
    assert driver.containers == {}


def test_a_service_dying_after_start_fails_the_group(driver: FakeDriver) -> None:
    """A service without healthcheck that exits before the group is up fails it."""
    clock, pause = clock_and_pause()
    real_run = driver.run_container

    def run(spec: ContainerSpec) -> object:
        info = real_run(spec)
        if spec.aliases == ("bot",):
            driver.exit(info.id, 137, oom=True)
        return info

    driver.run_container = run  # type: ignore[method-assign]
    with pytest.raises(StartFailed, match=r"service bot exited with code 137 \(out of memory\)"):
        start_group(driver, [member("web"), member("bot")], timeout=30, what="shop",
                    clock=clock, pause=pause)
    assert driver.containers == {}


def test_the_engine_refusing_a_service_removes_those_made(driver: FakeDriver) -> None:
    """A later service's image missing: the error is the engine's, and nothing is left."""
    clock, pause = clock_and_pause()
    with pytest.raises(InvalidRequest, match="No such image"):
        start_group(driver, [member("db"), member("web", image="missing")], timeout=30,
                    what="shop", clock=clock, pause=pause)
    assert driver.containers == {}


def test_waiting_for_health_of_a_service_without_a_healthcheck_is_refused(
    driver: FakeDriver,
) -> None:
    """depends_on service_healthy on a service with no healthcheck is a clear error."""
    clock, pause = clock_and_pause()
    with pytest.raises(StartFailed, match="service db has no healthcheck"):
        start_group(driver, [member("db"), member("web", db="service_healthy")], timeout=30,
                    what="shop", clock=clock, pause=pause)
    assert driver.containers == {}


def test_a_health_wait_wakes_on_the_engines_event_not_the_next_look(
        driver: FakeDriver, monkeypatch: pytest.MonkeyPatch) -> None:
    """By default db's health event wakes the wait at once; the event follower ends after."""
    monkeypatch.setattr(group, "POLL", 60.0)  # a look would come only after a minute

    def make_db_healthy() -> None:
        wait_for(lambda: any(s.aliases == ("db",) for s in driver.specs.values()), 10,
                 message="db was never made")
        driver.set_health(by_service(driver, "db"), "healthy")

    helper = threading.Thread(target=make_db_healthy)
    began = time.monotonic()
    helper.start()
    made = start_group(driver, [member("db", healthcheck=CHECK),
                                member("web", db="service_healthy")],
                       timeout=120, what="shop for team t1")
    helper.join()
    assert time.monotonic() - began < 30
    assert list(made) == ["db", "web"]
    wait_for(lambda: not any(t.name == "group-events" for t in threading.enumerate()), 10,
             message="the group's event follower still runs")


def test_each_service_is_admitted_as_it_starts_before_the_next_waits(
        driver: FakeDriver) -> None:
    """The ``started`` hook (the egress admission) sees each container before the next starts."""
    events: list[str] = []
    real_run = driver.run_container

    def run(spec: ContainerSpec) -> object:
        events.append(f"run {spec.aliases[0]}")
        return real_run(spec)

    driver.run_container = run  # type: ignore[method-assign]

    def on_pause(_n: int) -> None:
        driver.set_health(by_service(driver, "fetcher"), "healthy")

    clock, pause = clock_and_pause(on_pause)
    start_group(driver, [member("fetcher", healthcheck=CHECK),
                         member("web", fetcher="service_healthy")],
                timeout=60, what="shop for team t1", clock=clock, pause=pause,
                started=lambda info: events.append(f"admit {info.labels['ctf.service']}"))
    assert events == ["run fetcher", "admit fetcher", "run web", "admit web"]


def test_a_refused_admission_leaves_nothing(driver: FakeDriver) -> None:
    """When the egress guard refuses a container, every container made so far is removed."""
    def refuse(info: object) -> None:
        raise InvalidRequest("nft refused")

    with pytest.raises(InvalidRequest):
        start_group(driver, [member("db"), member("web")], timeout=60,
                    what="shop for team t1", started=refuse)
    assert driver.containers == {}
