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


def in_app_flag(key: str, name: str) -> str:
    """Return the flag an app such as OWASP Juice Shop shows for its challenge ``name``.

    Juice Shop started with ``CTF_KEY=<key>`` computes each in-app flag as the hex
    HMAC-SHA1 of the challenge's name under that key (its ``lib/utils.ts`` ``ctfFlag``).

    Args:
        key: the app's key: the value our ``flag_env`` gave the team's container.
        name: the app's own challenge name, exactly as the app spells it ("Score Board").

    Returns:
        40 lowercase hex characters.
    """
    return hmac.new(key.encode(), name.encode(), hashlib.sha1).hexdigest()


def check_in_app_flag(
    secret: str, challenge: str, team_id: str, name: str, submitted: str,
    fmt: str = "CTF{{{digest}}}",
) -> bool:
    """Return whether ``submitted`` is the team's in-app flag of ``name`` (constant time).

    The key is the one the team's container received in its ``flag_env`` variable
    (:func:`team_flag`), so it is this team's flag and no other's; hex case is ignored.
    """
    expected = in_app_flag(team_flag(secret, challenge, team_id, fmt), name)
    return hmac.compare_digest(expected.encode(), submitted.strip().lower().encode())
