"""What a challenge's containers may be given (SPEC §7), shared by the catalog and Compose files."""

from __future__ import annotations

import re
from typing import Final

# Capabilities a challenge may add back after all are dropped; nothing that opens the host.
ALLOWED_CAPS: Final = frozenset(
    {
        "AUDIT_WRITE", "CHOWN", "DAC_OVERRIDE", "FOWNER", "FSETID", "KILL", "MKNOD",
        "NET_BIND_SERVICE", "NET_RAW", "SETFCAP", "SETGID", "SETPCAP", "SETUID", "SYS_CHROOT",
    }
)
# A size in the catalog and the settings: 64m, 1g (digits and one unit letter).
CATALOG_SIZE_RE: Final = re.compile(r"^(\d+)([bkmg]?)$", re.IGNORECASE)
# A size in a Compose file, which also writes 64mb and 1GB.
SIZE_RE: Final = re.compile(r"^(\d+)\s*([bkmg]?)b?$", re.IGNORECASE)
_UNITS: Final = {"": 1, "b": 1, "k": 1024, "m": 1024**2, "g": 1024**3}


def size_bytes(value: object) -> int | None:
    """Return the size ``value`` (like ``64m``, ``1g``, ``128mb``) in bytes; None if it is none."""
    match = SIZE_RE.match(str(value).strip())
    if not match:
        return None
    return int(match.group(1)) * _UNITS[match.group(2).lower()]


def catalog_size_bytes(value: str) -> int:
    """Return a size already checked by :func:`check_size` (like ``64m``) in bytes."""
    match = CATALOG_SIZE_RE.match(value)
    assert match is not None
    return int(match.group(1)) * _UNITS[match.group(2).lower()]


def check_size(value: object, what: str, minimum: int) -> str:
    """Return ``value`` normalised when it is a size (like 64m) of at least ``minimum``.

    Raises:
        ValueError: naming ``what``, when it is no such size.
    """
    text = str(value).strip().lower()
    match = CATALOG_SIZE_RE.match(text)
    if not match or int(match.group(1)) * _UNITS[match.group(2).lower()] < minimum:
        raise ValueError(f"{what} must be a size of at least {minimum // 1024**2}m, like 64m "
                         "or 1g")
    return text
