"""On CI a missing part of the machine fails the run instead of skipping tests (issue 17)."""

from __future__ import annotations

import pytest
from ci import unavailable
from conftest import ROOT


@pytest.mark.parametrize("value", ["true", "TRUE", "1"])
def test_missing_part_fails_on_ci(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    """With CI=true, a missing Chromium or second-engine prerequisite fails the test."""
    monkeypatch.setenv("CI", value)
    with pytest.raises(pytest.fail.Exception, match="chromium is missing"):
        unavailable("chromium is missing")


@pytest.mark.parametrize("value", [None, "", "false"])
def test_missing_part_skips_elsewhere(monkeypatch: pytest.MonkeyPatch, value: str | None) -> None:
    """Off CI the same test is skipped, saying what to install."""
    if value is None:
        monkeypatch.delenv("CI", raising=False)
    else:
        monkeypatch.setenv("CI", value)
    with pytest.raises(pytest.skip.Exception, match="chromium is missing"):
        unavailable("chromium is missing")


def test_ci_entry_point_sets_ci() -> None:
    """.ci/run marks its run as CI's, so nothing it needs can be skipped silently."""
    assert 'export CI="${CI:-true}"' in (ROOT / ".ci" / "run").read_text()
