"""Instance host names under ``CTF_INSTANCE_DOMAIN`` (SPEC §11).

An instance's label is an HMAC of its (challenge, team) under a key derived from the flag
secret: 80 bits, unguessable without the secret, and computable by any process that shares
the secret (the workers write routes, the API's gate checks cookies). Two more inputs make it
change (issue 22):

- the team's access generation, raised by each revocation (``ctfctl revoke``): every host of
  the team moves, so the access cookies and links of the old host (signed under the old
  host's key) and the old name itself are worth nothing;
- for a TCP instance, a nonce of the instance (its ``started_at``): a TCP instance has no gate
  but its name, which travels in cleartext SNI, so each new instance gets a new name.

An HTTP instance keeps its host for one (challenge, team) until a revocation (SPEC §11).

A Compose instance (SPEC §12) has a host per endpoint: its primary endpoint's is exactly the
label above (the instance's ``url`` is the one a single image would have), every other
endpoint's adds the endpoint (service and container port) to the HMAC input, so each is as
unguessable, and stays the same for one (challenge, team, service, port).
"""

from __future__ import annotations

import base64
import hashlib
import hmac

# Domain separation: the label key is never the flag secret itself.
_LABEL_CONTEXT = b"ctf-instancer ingress label v1"
# 16 base32 characters: 80 bits, a valid DNS label (lowercase letters and digits 2-7).
LABEL_CHARS = 16


def label_key(secret: str) -> bytes:
    """Return the key instance labels are derived with."""
    return hmac.new(secret.encode(), _LABEL_CONTEXT, hashlib.sha256).digest()


def instance_label(secret: str, challenge: str, team_id: str, generation: int = 0,
                   nonce: str = "", endpoint: str = "") -> str:
    """Return the host label of one (challenge, team).

    Args:
        secret: the flag secret (shared by the workers and the API).
        challenge: a catalog id.
        team_id: a valid team id.
        generation: the team's access generation (0: the label from before revocations).
        nonce: the instance's own nonce (TCP instances: their ``started_at``); empty for
            a label that stays the same across instances.
        endpoint: a Compose instance's other endpoint (:func:`endpoint_key`); empty for
            the instance's own (primary) host.

    Returns:
        16 lowercase base32 characters (80 bits).
    """
    message = f"{challenge}/{team_id}"
    if generation:
        message += f"/g{generation}"
    if nonce:
        message += f"/n{nonce}"
    if endpoint:
        message += f"/e{endpoint}"
    digest = hmac.new(label_key(secret), message.encode(), hashlib.sha256)
    return base64.b32encode(digest.digest()).decode().lower()[:LABEL_CHARS]


def endpoint_key(service: str, port: int) -> str:
    """Return the name of a Compose endpoint in its label's input: ``<service>:<port>``."""
    return f"{service}:{port}"


def instance_host(label: str, domain: str) -> str:
    """Return ``<label>.<domain>``."""
    return f"{label}.{domain.strip('.').lower()}"


def label_of_host(host: str) -> str:
    """Return the first DNS label of a ``Host`` header value (port and case dropped)."""
    name = host.strip().lower()
    if name.startswith("["):  # an IPv6 literal is never one of our hosts
        return ""
    name = name.rsplit(":", 1)[0] if ":" in name else name
    return name.split(".", 1)[0]
