"""One code per error kind, and control signals outside the error tree."""

from __future__ import annotations

from celery_app import errors
from celery_app.errors import CTFError
from celery_app.vocab import signals


def _tree() -> list[type[CTFError]]:
    """Every class of the error tree, the root included."""
    found: list[type[CTFError]] = []
    todo: list[type[CTFError]] = [CTFError]
    while todo:
        cls = todo.pop()
        found.append(cls)
        todo.extend(cls.__subclasses__())
    return [cls for cls in found if cls.__module__ == errors.__name__]


def test_each_error_kind_has_a_code_of_its_own() -> None:
    """No two classes that name a code share it; a subclass without one is its parent's kind."""
    owners: dict[str, list[str]] = {}
    for cls in _tree():
        if "code" in vars(cls):
            owners.setdefault(cls.code, []).append(cls.__name__)
    shared = {code: names for code, names in owners.items() if len(names) > 1}
    assert shared == {}


def test_invalid_request_stays_the_code_of_a_malformed_request() -> None:
    """SPEC §6's invalid_request is InvalidRequest's; the file and image errors have their own."""
    assert (errors.InvalidRequest.code, errors.InvalidRequest.status) == ("invalid_request", 422)
    assert {(c.code, c.status) for c in (errors.CatalogError, errors.HostsFileError,
                                         errors.ImageNotFound)} == {
        ("catalog_error", 422), ("hosts_file_error", 422), ("image_not_found", 422)}


def test_control_signals_are_not_errors() -> None:
    """OnOtherHost and InstanceBusy (the signal) are outside the error tree; no code to show."""
    for signal in (signals.OnOtherHost, signals.InstanceBusy):
        assert issubclass(signal, signals.ControlSignal)
        assert not issubclass(signal, CTFError)
    assert not hasattr(errors, "OnOtherHost")
    moved = signals.OnOtherHost("on b", host="b")
    assert (moved.host, moved.detail) == ("b", "on b")


def test_a_request_that_gives_up_busy_keeps_its_wire_code() -> None:
    """The error a busy request ends with is still instance_busy, 409, and retried by nobody."""
    assert (errors.InstanceBusy.code, errors.InstanceBusy.status) == ("instance_busy", 409)
    assert errors.InstanceBusy("busy").to_dict() == {"error": "instance_busy", "detail": "busy"}
