"""The catalog's ``compose:`` key (SPEC §12): read at start-up, mistakes refused by name."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from celery_app.core.catalog import DEFAULT_CATALOG, build_catalog, load_catalog
from celery_app.errors import CatalogError
from celery_app.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
SHOP = ROOT / "examples" / "shop" / "compose.yaml"


def catalog_at(tmp_path: Path, text: str) -> Path:
    """Write a catalog file beside a copy of the example's Compose file; return its path."""
    (tmp_path / "shop").mkdir()
    (tmp_path / "shop" / "compose.yaml").write_text(SHOP.read_text())
    path = tmp_path / "challenges.yaml"
    path.write_text(text)
    return path


def refusal(entry: dict[str, object], tmp_path: Path) -> str:
    (tmp_path / "compose.yaml").write_text(SHOP.read_text())
    with pytest.raises(CatalogError) as caught:
        build_catalog({"challenges": {"shop": entry}}, Settings(), "cat.yaml", tmp_path)
    return str(caught.value)


def test_a_compose_challenge_is_read_relative_to_the_catalog_file(tmp_path: Path) -> None:
    """``compose:`` is read at start-up from beside the catalog file, services in order."""
    path = catalog_at(tmp_path, "challenges:\n  shop:\n    compose: shop/compose.yaml\n"
                                "    memory: 128m\n    ttl: 900\n")
    catalog = load_catalog(Settings(challenges_file=path))
    ch = catalog.get("shop")
    assert ch.is_group and ch.app is not None
    assert [s.name for s in ch.app.services] == ["db", "web", "bot"]
    assert ch.app.primary.service == "web" and ch.app.primary.port == 8080
    assert ch.image == "" and ch.ttl == 900 and ch.memory == "128m"


def test_a_single_image_challenge_is_no_group(tmp_path: Path) -> None:
    """An ``image:`` challenge stays one container: no Compose app."""
    catalog = build_catalog({"challenges": {"web": {"image": "web:1", "port": 80}}}, Settings())
    assert not catalog.get("web").is_group


def test_both_image_and_compose_are_refused(tmp_path: Path) -> None:
    """A challenge is one image or a Compose file, and the message says so."""
    message = refusal({"image": "web:1", "compose": "compose.yaml"}, tmp_path)
    assert "'shop'" in message and "either 'image'" in message and "not both" in message


def test_neither_image_nor_compose_is_refused(tmp_path: Path) -> None:
    """A challenge without image or compose is refused, naming both keys."""
    message = refusal({"name": "x"}, tmp_path)
    assert "'shop'" in message and "'image'" in message and "'compose'" in message


def test_a_pool_of_a_compose_file_that_uses_the_team_id_is_refused(tmp_path: Path) -> None:
    """The shop's bot reads ${CTF_TEAM}: ``pool: 2`` is refused, naming service and key."""
    message = refusal({"compose": "compose.yaml", "pool": 2}, tmp_path)
    assert "'shop'" in message and "pool: 0" in message
    assert "'bot'" in message and "'environment.TEAM'" in message and "CTF_TEAM" in message


def test_a_pool_of_a_compose_file_without_the_team_id_is_accepted(tmp_path: Path) -> None:
    """Without ${CTF_TEAM} a Compose challenge may have a warm pool of whole groups."""
    (tmp_path / "compose.yaml").write_text(
        SHOP.read_text().replace("TEAM: ${CTF_TEAM}", "TEAM: nobody"))
    catalog = build_catalog({"challenges": {"shop": {"compose": "compose.yaml", "pool": 2}}},
                            Settings(), "cat.yaml", tmp_path)
    assert catalog.get("shop").pool == 2 and catalog.get("shop").is_group


def test_a_port_on_a_compose_challenge_is_refused(tmp_path: Path) -> None:
    """Ports of a Compose challenge are its services'; ``port:`` is refused."""
    message = refusal({"compose": "compose.yaml", "port": 8080}, tmp_path)
    assert "'port'" in message


def test_a_missing_compose_file_is_refused(tmp_path: Path) -> None:
    """A ``compose:`` path that is not there names the challenge and the file."""
    message = refusal({"compose": "nope.yaml"}, tmp_path)
    assert "'shop'" in message and "nope.yaml" in message


def test_a_refused_key_in_the_file_names_challenge_service_and_key(tmp_path: Path) -> None:
    """A key outside SPEC §12 in the file refuses the catalog at start-up."""
    (tmp_path / "bad.yaml").write_text("services:\n  web:\n    image: w:1\n    ports: ['80']\n"
                                       "    privileged: true\n")
    with pytest.raises(CatalogError) as caught:
        build_catalog({"challenges": {"shop": {"compose": "bad.yaml"}}}, Settings(), "c",
                      tmp_path)
    assert "'shop'" in str(caught.value) and "'web'" in str(caught.value)
    assert "'privileged'" in str(caught.value)


def test_the_app_field_cannot_be_written_in_the_catalog(tmp_path: Path) -> None:
    """``app`` is what the file becomes, never a catalog field."""
    message = refusal({"image": "web:1", "app": {}}, tmp_path)
    assert "'app'" in message


def test_the_challenge_defaults_reach_the_services(tmp_path: Path) -> None:
    """Section 8's protocol and health_path are the defaults of services without x-ctf keys."""
    (tmp_path / "two.yaml").write_text("services:\n  a:\n    image: a:1\n    ports: ['80']\n"
                                       "  b:\n    image: b:1\n    ports: ['81']\n"
                                       "    x-ctf-protocol: http\n    x-ctf-health-path: /ok\n")
    catalog = build_catalog({"challenges": {"two": {
        "compose": "two.yaml", "protocol": "tcp", "health_path": "/h"}}}, Settings(), "c",
        tmp_path)
    app = catalog.get("two").app
    assert app is not None
    assert [(e.service, e.protocol) for e in app.endpoints] == [("a", "tcp"), ("b", "http")]
    assert app.endpoints[1].health_path == "/ok"


def test_a_compose_challenge_behind_the_ingress_is_accepted(tmp_path: Path) -> None:
    """With CTF_INGRESS=traefik a Compose challenge loads: its endpoints get hosts (SPEC §12)."""
    (tmp_path / "compose.yaml").write_text(SHOP.read_text())
    catalog = build_catalog({"challenges": {"shop": {"compose": "compose.yaml"}}},
                            Settings(ingress="traefik"), "cat.yaml", tmp_path)
    app = catalog.get("shop").app
    assert app is not None and [e.service for e in app.endpoints] == ["web"]


def test_command_and_storage_on_a_compose_challenge_are_refused(tmp_path: Path) -> None:
    """Keys that mean one container (command) or are not applied yet (storage) are refused."""
    assert "'command'" in refusal({"compose": "compose.yaml", "command": ["sh"]}, tmp_path)
    assert "'storage'" in refusal({"compose": "compose.yaml", "read_only": False,
                                   "storage": "1g"}, tmp_path)


def test_egress_internet_for_the_whole_group_is_refused(tmp_path: Path) -> None:
    """The catalog's egress cannot open a whole group: the message names x-ctf-egress."""
    message = refusal({"compose": "compose.yaml", "egress": "internet"}, tmp_path)
    assert "'shop'" in message and "x-ctf-egress: internet" in message
    assert build_catalog({"challenges": {"shop": {"compose": "compose.yaml", "egress": "none"}}},
                         Settings(), "cat.yaml", tmp_path).get("shop").egress == "none"


def test_the_catalog_listing_says_which_challenges_carry_a_team_flag(tmp_path: Path) -> None:
    """``flag`` is true for flag_env, for a Compose file using ${CTF_FLAG}, false otherwise."""
    (tmp_path / "compose.yaml").write_text(SHOP.read_text())
    plain = SHOP.read_text().replace("${CTF_FLAG}", "fixed")
    (tmp_path / "plain.yaml").write_text(plain)
    catalog = build_catalog({"challenges": {
        "shop": {"compose": "compose.yaml"},
        "plain": {"compose": "plain.yaml"},
        "web": {"image": "web:1", "port": 80},
        "keyed": {"image": "web:1", "port": 80, "flag_env": "FLAG"},
    }}, Settings(), "cat.yaml", tmp_path)
    assert {ch.id: ch.public_view()["flag"] for ch in catalog} == {
        "shop": True, "plain": False, "web": False, "keyed": True}


def test_every_shipped_challenge_carries_a_team_flag() -> None:
    """The default catalog's todo-app and juice-shop hold each team's flag (FLAG, CTF_KEY)."""
    catalog = build_catalog({"challenges": DEFAULT_CATALOG}, Settings(), "default catalog")
    assert {ch.id: (ch.flag_env, ch.public_view()["flag"]) for ch in catalog} == {
        "todo-app": ("FLAG", True), "juice-shop": ("CTF_KEY", True)}
    shipped = yaml.safe_load((ROOT / "deploy" / "challenges.yaml").read_text())["challenges"]
    assert shipped["todo-app"]["flag_env"] == "FLAG"
