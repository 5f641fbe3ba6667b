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
# A size like 64m or 1g; Compose files also write 64mb and 1GB.
SIZE_RE: Final = re.compile(r"^(\d+)\s*([bkmg]?)b?$", re.IGNORECASE)
_UNITS: Final = {"": 1, "b": 1, "k": 1024, "m": 1024**2, "g": 1024**3}


def size_bytes(value: object) -> int | None:
    """Return the size ``value`` (like ``64m``, ``1g``, ``128mb``) in bytes; None if it is none."""
    match = SIZE_RE.match(str(value).strip())
    if not match:
        return None
    return int(match.group(1)) * _UNITS[match.group(2).lower()]
