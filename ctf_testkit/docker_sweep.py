"""The one Docker sweeper: remove what a test or benchmark run labelled, pass or fail."""

from __future__ import annotations

import contextlib
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import docker
import docker.errors


def sweep(client: docker.DockerClient, labels: dict[str, str], *,
          images: bool = False) -> dict[str, int]:
    """Remove every container (with its volumes) and network carrying all of ``labels``.

    Args:
        client: the engine's SDK client.
        labels: what the run's objects carry (``ctf.test=<run id>``).
        images: remove the images carrying ``labels`` too.

    Returns:
        How many containers, networks and images were removed.
    """
    flt: dict[str, Any] = {"label": [f"{k}={v}" for k, v in labels.items()]}
    counts = {"containers": 0, "networks": 0, "images": 0}

    def remove(cid: str) -> int:
        with contextlib.suppress(docker.errors.NotFound, docker.errors.APIError):
            client.api.remove_container(cid, force=True, v=True)
            return 1
        return 0

    found = [c["Id"] for c in client.api.containers(all=True, filters=flt)]
    with ThreadPoolExecutor(8) as pool:  # hundreds of containers after the janitor bench
        counts["containers"] = sum(pool.map(remove, found))
    for n in client.api.networks(filters=flt):
        with contextlib.suppress(docker.errors.NotFound, docker.errors.APIError):
            client.api.remove_network(n["Id"])
            counts["networks"] += 1
    if images:
        for image in client.images.list(filters=flt):
            with contextlib.suppress(docker.errors.APIError):
                client.images.remove(image.id, force=True)
                counts["images"] += 1
    return counts
