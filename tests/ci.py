"""What a test does when a part of the machine it needs is missing: skip, or fail on CI.

On a developer's machine a missing Chromium or second-engine prerequisite skips the tests
that need it. With ``CI=true`` the same thing fails the run: CI installs everything, so a
missing part there is a broken set-up, and a green run must mean every test ran.
"""

from __future__ import annotations

import os
from typing import NoReturn

import pytest


def on_ci() -> bool:
    """Whether this run is CI's (``CI=true``, as GitHub Actions, GitLab CI and .ci/run set)."""
    return os.environ.get("CI", "").strip().lower() in ("true", "1", "yes")


def unavailable(reason: str) -> NoReturn:
    """Skip the test for ``reason``, or fail it when running on CI.

    Raises:
        pytest.skip.Exception: not on CI.
        pytest.fail.Exception: on CI.

    """
    if on_ci():
        pytest.fail(f"{reason} (CI=true: the suite does not skip what CI must run)")
    pytest.skip(reason)
