"""Per-team flags (SPEC §7): derived, never stored, identical after a restart."""

from __future__ import annotations

import hashlib
import hmac


def team_flag(secret: str, challenge: str, team_id: str, fmt: str = "CTF{{{digest}}}") -> str:
    """Return the flag of ``team_id`` for ``challenge``.

    It is an HMAC-SHA256 of ``challenge`` and ``team_id`` under ``CTF_FLAG_SECRET``, so two
    teams never share a flag and nobody without the secret can derive one.
    """
    message = f"{challenge}\x00{team_id}".encode()
    digest = hmac.new(secret.encode(), message, hashlib.sha256).hexdigest()[:32]
    return fmt.format(digest=digest)


def check_flag(
    secret: str, challenge: str, team_id: str, submitted: str, fmt: str = "CTF{{{digest}}}"
) -> bool:
    """Return whether ``submitted`` is the team's flag (constant-time comparison)."""
    expected = team_flag(secret, challenge, team_id, fmt)
    return hmac.compare_digest(expected.encode(), submitted.strip().encode())
