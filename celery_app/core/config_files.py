"""Reading the organiser's YAML files (catalog, hosts) with errors that name what is wrong."""

from __future__ import annotations

from pathlib import Path

import yaml
from pydantic import ValidationError

from celery_app.errors import PermanentError


def read_yaml(path: Path, setting: str, error: type[PermanentError]) -> object:
    """Parse the YAML file that ``setting`` names.

    Raises:
        error: the file cannot be read or is not valid YAML (the message says which).
    """
    try:
        return yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise error(f"{setting} {str(path)!r} cannot be read: {exc}") from exc
    except yaml.YAMLError as exc:
        raise error(f"{setting} {str(path)!r} is not valid YAML: {exc}") from exc


def describe(source: str, kind: str, name: str, exc: ValidationError) -> str:
    """Say which entry (``kind`` ``name``) of ``source`` has which bad fields, and why."""
    problems = [
        f"field {'.'.join(str(p) for p in err['loc']) or '(whole entry)'!r}: {err['msg']}"
        for err in exc.errors()
    ]
    return f"{source}: {kind} {name!r}, " + "; ".join(problems)
