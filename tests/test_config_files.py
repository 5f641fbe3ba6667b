"""The organiser's YAML files: mistakes are refused naming the entry and the field."""

from __future__ import annotations

from pathlib import Path

import pytest

from celery_app.core.catalog import Catalog, load_catalog, name_clash
from celery_app.errors import CatalogError, HostsFileError
from celery_app.hosts.hostsfile import load_hosts
from celery_app.settings import Settings
from celery_app.vocab.naming import TEAM_ID_RE, container_name


def _settings(tmp_path: Path, **fields: object) -> Settings:
    return Settings(data_dir=tmp_path, **fields)  # type: ignore[arg-type]


@pytest.mark.parametrize(("body", "expected"), [
    ("challenges:\n  web:\n    image: x\n    memory: lots\n",
     r"challenge 'web', field 'memory': .*at least 6m"),
    ("challenges:\n  web:\n    image: x\n    colour: red\n", r"challenge 'web', field 'colour'"),
    ("challenges:\n  web:\n    port: 80\n", r"challenge 'web', field 'image'"),
    ("challenges:\n  web:\n    image: x\n    ttl: 100\n    max_lifetime: 50\n",
     r"challenge 'web', field 'max_lifetime'"),
    ("challenges: [web\n", r"is not valid YAML"),
    ("challenges: {}\n", r"add at least one challenge"),
    ("challenges:\n  web:\n    image: x\n    disk: 1g\n",
     r"challenge 'web', field .*'disk' bounds a writable root filesystem: set read_only: false"),
    ("challenges:\n  web:\n    image: x\n    read_only: false\n    disk: lots\n",
     r"challenge 'web', field 'disk': .*at least 16m"),
    ("challenges:\n  web:\n    image: x\n    user: 'root; rm -rf /'\n",
     r"challenge 'web', field 'user': .*uid, uid:gid or user name"),
])
def test_catalog_mistakes_name_challenge_and_field(tmp_path: Path, body: str,
                                                   expected: str) -> None:
    """A catalog with a mistake is refused with a message naming the challenge and field."""
    path = tmp_path / "challenges.yaml"
    path.write_text(body)
    with pytest.raises(CatalogError, match=expected):
        load_catalog(_settings(tmp_path, challenges_file=path))


def test_missing_catalog_file_says_which_setting(tmp_path: Path) -> None:
    """A catalog file that cannot be read names CTF_CHALLENGES_FILE and the path."""
    with pytest.raises(CatalogError, match=r"CTF_CHALLENGES_FILE .*cannot be read"):
        load_catalog(_settings(tmp_path, challenges_file=tmp_path / "nope.yaml"))


def test_default_catalog_has_the_two_spec_challenges(tmp_path: Path) -> None:
    """Without a file the catalog is SPEC §1's: todo-app on 8080, juice-shop per-team CTF_KEY."""
    catalog = load_catalog(_settings(tmp_path))
    assert catalog.ids() == ["todo-app", "juice-shop"]
    assert catalog.get("todo-app").port == 8080
    shop = catalog.get("juice-shop")
    assert (shop.port, shop.flag_env, shop.env["NODE_ENV"]) == (3000, "CTF_KEY", "ctf")


def test_every_writable_challenge_gets_a_disk_bound(tmp_path: Path) -> None:
    """Both shipped challenges write (read_only: false) and get CTF_DEFAULT_DISK (1g)."""
    catalog = load_catalog(_settings(tmp_path))
    for challenge in catalog:
        assert not challenge.read_only
        assert challenge.disk_bytes == 1024**3
    path = tmp_path / "challenges.yaml"
    path.write_text("challenges:\n  w: {image: x, read_only: false}\n"
                    "  own: {image: x, read_only: false, disk: 200m}\n  ro: {image: x}\n")
    custom = load_catalog(_settings(tmp_path, challenges_file=path, default_disk="512m"))
    assert custom.get("w").disk_bytes == 512 * 1024**2
    assert custom.get("own").disk_bytes == 200 * 1024**2
    assert custom.get("ro").disk_bytes is None  # read-only: its tmpfs sizes bound it


def test_bad_default_disk_is_refused(tmp_path: Path) -> None:
    """CTF_DEFAULT_DISK that is not a size of at least 16m is refused, naming the variable."""
    with pytest.raises(ValueError, match="CTF_DEFAULT_DISK must be a size"):
        _settings(tmp_path, default_disk="huge")


def _catalog_of(tmp_path: Path, *ids: str) -> Catalog:
    path = tmp_path / "challenges.yaml"
    path.write_text("challenges:\n" + "".join(f"  {cid}: {{image: x}}\n" for cid in ids))
    return load_catalog(_settings(tmp_path, challenges_file=path))


@pytest.mark.parametrize(("first", "second"), [
    ("web", "web-2"), ("web-2", "web"), ("a", "a-b-c"), ("web", "web-X_y"),
])
def test_catalog_with_ids_that_can_share_a_container_name_is_refused(
    tmp_path: Path, first: str, second: str
) -> None:
    """``web`` and ``web-2`` are refused: team 2-x's web and team x's web-2 share one name."""
    with pytest.raises(CatalogError) as caught:
        _catalog_of(tmp_path, first, second, "other")
    message = caught.value.detail
    assert repr(first) in message
    assert repr(second) in message
    assert "rename" in message


@pytest.mark.parametrize("ids", [("web", "web_2"), ("web", "webapp"), ("web", "web--2"),
                                 ("web", "web-_2"), ("web-", "web")])
def test_catalog_with_ids_that_never_share_a_name_is_accepted(
    tmp_path: Path, ids: tuple[str, ...]
) -> None:
    """Ids that are prefixes of one another but can never give one name are accepted."""
    assert _catalog_of(tmp_path, *ids).ids() == list(ids)


def test_clash_rule_matches_an_exhaustive_search() -> None:
    """The refusal rule agrees with every id pair and team id over a small alphabet."""
    alphabet = "a1-_"

    def words(max_len: int) -> list[str]:
        found = [""]
        for _ in range(max_len):
            found += [w + c for w in found if len(w) == len(found[-1]) for c in alphabet]
        return sorted({w for w in found if TEAM_ID_RE.fullmatch(w)})

    ids, teams = words(3), words(5)
    names = {cid: {container_name(cid, team) for team in teams} for cid in ids}
    for short in ids:
        for long in ids:
            if len(short) >= len(long):
                continue
            clash = bool(names[short] & names[long])
            example = name_clash(short, long)
            assert (example is not None) == clash, (short, long)
            if example is not None:
                assert container_name(short, example) == container_name(long, "x")


@pytest.mark.parametrize(("body", "expected"), [
    ("hosts:\n  beta: {public_host: h, max_instances: -1}\n",
     r"host 'beta', field 'max_instances'"),
    ("hosts:\n  beta: {public_host: h, colour: red}\n", r"host 'beta', field 'colour'"),
    ("hosts: [\n", r"CTF_HOSTS_FILE .*is not valid YAML"),
])
def test_hosts_file_mistakes_name_host_and_field(tmp_path: Path, body: str,
                                                 expected: str) -> None:
    """A hosts file with a mistake is refused with a message naming the host and field."""
    path = tmp_path / "hosts.yaml"
    path.write_text(body)
    with pytest.raises(HostsFileError, match=expected):
        load_hosts(_settings(tmp_path, hosts_file=path))
