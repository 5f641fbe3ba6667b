"""What an instance may write (issue 17): a read-only root and size-limited tmpfs by default."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import docker
import pytest
from conftest import BUSYBOX, HTTP_DOCKERFILE, RUN_ID, build_image, containers_of

from celery_app.errors import CatalogError
from celery_app.worker.context import Context

pytestmark = [pytest.mark.docker, pytest.mark.redis]

MIB = 1024**2


def sh(container: Any, script: str) -> tuple[int, str]:
    """Run ``script`` with the image's busybox sh; return its exit code and output."""
    code, out = container.exec_run(["/bin/busybox", "sh", "-c", script])
    return int(code), out.decode(errors="replace")


def test_default_root_is_read_only_and_tmp_is_limited(ctx: Context, docker_client: Any) -> None:
    """By default the root filesystem refuses writes and /tmp stops at 64 MiB."""
    inst = ctx.service.start(ctx.service.catalog.key("exposed", "fs1"))
    container = docker_client.containers.get(inst.container_id)
    host_config = container.attrs["HostConfig"]
    assert host_config["ReadonlyRootfs"] is True
    assert host_config["Tmpfs"] == {"/tmp": f"rw,nosuid,nodev,size={64 * MIB}"}
    code, out = sh(container, "echo x > /www/planted")
    assert code != 0
    assert "Read-only file system" in out
    code, out = sh(container, "/bin/busybox dd if=/dev/zero of=/tmp/big bs=1048576 count=100")
    assert code != 0
    assert "No space left on device" in out
    _, size = sh(container, "/bin/busybox stat -c %s /tmp/big")
    assert 0 < int(size.strip()) <= 64 * MIB
    # the challenge still serves: read-only does not break the stand-in server
    assert ctx.service.get(ctx.service.catalog.key("exposed", "fs1")).status == "running"


@pytest.fixture
def volume_image(docker_client: docker.DockerClient) -> str:
    """The stand-in server in an image that declares a VOLUME (as many real images do)."""
    files: dict[str, bytes | Path] = {"busybox": BUSYBOX, "index.html": b"hello from ctf\n"}
    return build_image(docker_client, f"ctf-test/volume:{RUN_ID}",
                       HTTP_DOCKERFILE + "VOLUME /data\n", files)


def test_image_volumes_are_size_limited_too(
    make_ctx: Callable[..., Context], volume_image: str, tmp_path: Path, docker_client: Any
) -> None:
    """An image's own VOLUME gets a size-limited tmpfs, not an unbounded volume on disk."""
    catalog = tmp_path / "challenges.yaml"
    catalog.write_text(f"challenges:\n  vol:\n    image: {volume_image}\n    port: 8080\n"
                       "    tmpfs: {/tmp: 16m}\n")
    ctx = make_ctx(challenges_file=catalog)
    inst = ctx.service.start(ctx.service.catalog.key("vol", "fs2"))
    container = docker_client.containers.get(inst.container_id)
    assert container.attrs["HostConfig"]["Tmpfs"] == {
        "/tmp": f"rw,nosuid,nodev,size={16 * MIB}", "/data": f"rw,nosuid,nodev,size={64 * MIB}"}
    assert not [m for m in container.attrs["Mounts"] if m["Type"] == "volume"]


def test_storage_on_an_engine_without_quotas_is_refused_cleanly(
    make_ctx: Callable[..., Context], images: dict[str, str], tmp_path: Path,
    docker_client: Any,
) -> None:
    """``storage`` where the engine cannot limit the layer is a clear error; nothing is left."""
    info = docker_client.info()
    if info.get("Driver") == "overlay2" and "xfs" in str(info.get("DriverStatus")):
        pytest.skip("this engine may support storage_opt size (overlay2 on xfs)")
    catalog = tmp_path / "challenges.yaml"
    catalog.write_text(f"challenges:\n  big:\n    image: {images['http']}\n    port: 8080\n"
                       "    read_only: false\n    storage: 1g\n")
    ctx = make_ctx(challenges_file=catalog)
    with pytest.raises(CatalogError, match=r"field 'storage'.*read_only"):
        ctx.service.start(ctx.service.catalog.key("big", "fs3"))
    assert containers_of(docker_client, **{"ctf.team": "fs3"}) == []
    assert ctx.store.get("big", "fs3") is None


@pytest.mark.parametrize(("body", "expected"), [
    ("tmpfs: {tmp: 64m}", "absolute path"),
    ("tmpfs: {/tmp: lots}", "size of /tmp"),
    ("storage: 1g", "read_only: false"),
    ("read_only: false\n    storage: 1k", "storage must be a size"),
])
def test_filesystem_mistakes_are_refused(
    make_ctx: Callable[..., Context], images: dict[str, str], tmp_path: Path, body: str,
    expected: str,
) -> None:
    """A bad tmpfs path or size, or storage with a read-only root, is refused at load."""
    catalog = tmp_path / "challenges.yaml"
    catalog.write_text(f"challenges:\n  bad:\n    image: {images['http']}\n    {body}\n")
    with pytest.raises(CatalogError, match=expected):
        make_ctx(challenges_file=catalog)
