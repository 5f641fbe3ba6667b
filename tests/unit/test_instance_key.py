"""A request's team and challenge are validated once, at the edge, into an InstanceKey."""

from __future__ import annotations

import pytest

from celery_app.core.catalog import build_catalog
from celery_app.errors import InvalidTeamId, UnknownChallenge
from celery_app.settings import Settings


def test_a_request_is_validated_once_into_an_instance_key() -> None:
    """Catalog.key checks the team first, then the challenge, and spells <challenge>/<team>."""
    catalog = build_catalog({"challenges": {"web": {"image": "web:1", "port": 80}}}, Settings())
    key = catalog.key("web", "team-1")
    assert (key.challenge, key.team, str(key)) == ("web", "team-1", "web/team-1")
    with pytest.raises(InvalidTeamId):
        catalog.key("nope", "bad team")
    with pytest.raises(UnknownChallenge, match="known challenges"):
        catalog.key("nope", "team-1")
