"""CTFd plugin: per-team challenge instances from the CTF instancer, and per-team flags.

Installed by copying or linking this folder into ``CTFd/plugins/`` (see README.md). It adds:

- the challenge type ``instanced``: the organiser picks one of the instancer's catalog
  challenges; each team starts, extends, restarts and stops its own instance from the challenge's
  modal, and sees its link and a live countdown to its expiry;
- the flag type ``instancer``: a submission is checked by the instancer against the
  submitting team's own flag (or, given a Juice Shop challenge name, that team's in-app
  flag), so a flag copied from another team is wrong;
- the admin menu entry "Instancer", with two tabs: Instances (every instance with Stop and
  Extend, flags one team submitted that were another's) and Settings (where the instancer is,
  fields set by the environment read-only; a warning for a per-team flag that no container
  holds);
- "each team's own flag" in the Flag column of CTFd's admin flag list, for an instancer flag;
- a refusal of a static flag beside an ``instanced`` challenge's per-team flag.

Every call to the instancer is made here, server-side; browsers only ever talk to CTFd.
"""

from __future__ import annotations

import math
import os
from datetime import UTC, datetime
from typing import Any

from CTFd.exceptions.challenges import ChallengeCreateException, ChallengeUpdateException
from CTFd.models import Challenges, Flags, Solves, Teams, Users, db
from CTFd.plugins import (
    register_admin_plugin_menu_bar,
    register_admin_plugin_script,
    register_plugin_assets_directory,
)
from CTFd.plugins.challenges import CHALLENGE_CLASSES, BaseChallenge
from CTFd.plugins.flags import FLAG_CLASSES, BaseFlag, FlagException
from CTFd.utils.config import is_teams_mode
from CTFd.utils.dates import ctf_paused, ctftime
from CTFd.utils.decorators import admins_only, authed_only, require_verified_emails
from CTFd.utils.modules import can_access_challenge
from CTFd.utils.user import get_current_team, get_current_user, is_admin
from flask import (
    Blueprint,
    abort,
    current_app,
    jsonify,
    redirect,
    render_template,
    request,
    url_for,
)

from .client import (
    PREFIX_RE,
    SEALED_PREFIX,
    Connection,
    InstancerClient,
    InstancerError,
    connection_lines,
    endpoint_links,
    link_target,
    open_token,
    parse_team_id,
    resolve,
    seal_token,
    team_id_for,
)

PLUGIN = "ctf_instancer"
ASSETS = f"/plugins/{PLUGIN}/assets/"
TYPE_ID = "instanced"
FLAG_TYPE = "instancer"
MENU = "Instancer"  # the admin menu entry; its tabs are Instances and Settings (SETTINGS_PAGE)


# -- storage ----------------------------------------------------------------------------------


class InstancedChallenge(Challenges):
    """A challenge whose teams each get their own instance of a catalog challenge."""

    __tablename__ = "ctf_instancer_challenges"
    __mapper_args__ = {"polymorphic_identity": TYPE_ID}  # noqa: RUF012  # SQLAlchemy's
    id = db.Column(db.Integer, db.ForeignKey("challenges.id", ondelete="CASCADE"),
                   primary_key=True)
    instancer_challenge = db.Column(db.String(200), nullable=False, default="")


class InstancerSetting(db.Model):
    """The plugin's settings from its admin page.

    They are kept out of CTFd's ``configs`` table, whose admin API would hand the token
    to a browser.
    """

    __tablename__ = "ctf_instancer_settings"
    key = db.Column(db.String(64), primary_key=True)
    value = db.Column(db.Text, nullable=False, default="")


def _secret() -> bytes:
    """CTFd's SECRET_KEY, which seals the saved admin token (it is not in the database)."""
    key = current_app.config["SECRET_KEY"]
    return key if isinstance(key, bytes) else str(key).encode()


def stored_settings() -> dict[str, str]:
    """Return the values saved on the admin page, the admin token opened.

    The table holds the token sealed (:func:`~.client.seal_token`) with the URL it was saved
    for; ``token`` and ``token_url`` are that token and URL, or absent when there is none or
    it cannot be opened. A token an older version saved in plain text is removed (it would
    be in CTFd's backup export): the organiser enters it again.
    """
    values = {row.key: row.value for row in InstancerSetting.query.all()}
    sealed = values.pop("token", "")
    if sealed:
        opened = open_token(_secret(), sealed)
        if opened is not None:
            values["token_url"], values["token"] = opened
        elif not sealed.startswith(SEALED_PREFIX):
            save_setting("token", "")
    return values


def save_token(url: str, token: str) -> None:
    """Save ``token`` sealed, bound to ``url``: it is sent to that URL only."""
    save_setting("token", seal_token(_secret(), url, token))


def save_setting(key: str, value: str) -> None:
    """Save one setting (an empty value removes it)."""
    row = InstancerSetting.query.get(key)
    if not value:
        if row is not None:
            db.session.delete(row)
    elif row is None:
        db.session.add(InstancerSetting(key=key, value=value))
    else:
        row.value = value
    db.session.commit()


def connection() -> Connection:
    """Return where the instancer is, from the environment or the admin page."""
    return resolve(stored_settings())


def instancer() -> InstancerClient:
    """Return a client of the instancer (raises ``NotConfigured`` when it is not set)."""
    return InstancerClient(connection())


# -- who is asking ------------------------------------------------------------------------------


class NoTeam(Exception):
    """Raised when a player in teams mode has no team yet."""


def current_team_id() -> str:
    """Return the instancer team id of the current player's CTFd team (or user).

    Teams mode: ``<prefix>-t<team id>``; users mode: ``<prefix>-u<user id>``. CTFd's ids are
    unique and never reused for another account, so two CTFd teams never share an instance.

    Raises:
        NoTeam: in teams mode, when the player has not joined a team.
    """
    prefix = connection().prefix
    if is_teams_mode():
        team = get_current_team()
        if team is None:
            raise NoTeam("Join or create a team first: instances belong to teams.")
        return team_id_for(prefix, "t", team.id)
    user = get_current_user()
    if user is None:
        raise NoTeam("Log in first.")
    return team_id_for(prefix, "u", user.id)


def account_name(prefix: str, team_id: str) -> dict[str, Any]:
    """Return the CTFd account behind an instancer team id (or nothing for other ids)."""
    parsed = parse_team_id(prefix, team_id)
    if parsed is None:
        return {"account": None, "account_url": None}
    kind, number = parsed
    model, endpoint = (Teams, "admin.teams_detail") if kind == "t" else \
        (Users, "admin.users_detail")
    account = model.query.filter_by(id=number).first()
    if account is None:
        return {"account": f"(deleted {'team' if kind == 't' else 'user'} {number})",
                "account_url": None}
    arg = {"team_id": number} if kind == "t" else {"user_id": number}
    return {"account": account.name, "account_url": url_for(endpoint, **arg)}


# -- the challenge type -----------------------------------------------------------------------


def _catalog_ids() -> list[str]:
    return [str(ch.get("id")) for ch in instancer().catalog()]


def _check_catalog_id(value: Any, error: type[Exception]) -> str:
    catalog_id = str(value or "").strip()
    if not catalog_id:
        raise error("Pick the instancer challenge each team gets an instance of.")
    try:
        known = _catalog_ids()
    except InstancerError as exc:
        raise error(f"Cannot check the instancer challenge: {exc.detail}") from None
    if catalog_id not in known:
        raise error(f"The instancer has no challenge {catalog_id!r}; "
                    f"its catalog has: {', '.join(known) or '(none)'}.")
    return catalog_id


class InstancedChallengeType(BaseChallenge):
    """The ``instanced`` challenge type: a per-team instance of a catalog challenge."""

    id = TYPE_ID
    name = TYPE_ID
    templates = {  # noqa: RUF012  # CTFd's plugin interface: plain class attributes
        "create": f"{ASSETS}create.html",
        "update": f"{ASSETS}update.html",
        "view": f"{ASSETS}view.html",
    }
    scripts = {  # noqa: RUF012
        "create": f"{ASSETS}create.js",
        "update": f"{ASSETS}update.js",
        "view": f"{ASSETS}view.js",
    }
    route = ASSETS
    blueprint = Blueprint(TYPE_ID, __name__, template_folder="templates",
                          static_folder="assets")
    challenge_model = InstancedChallenge

    @classmethod
    def create(cls, request):  # CTFd's signature
        """Create the challenge and, with ``instancer_flag``, its per-team ``instancer`` flag.

        The form's box sends ``instancer_flag=1`` when ticked and nothing when not (so an
        absent field means no flag; API callers pass ``"instancer_flag": "1"``).
        """
        data = dict(request.form or request.get_json() or {})
        add_flag = str(data.pop("instancer_flag", "")).lower() in ("1", "true", "on", "yes")
        data["instancer_challenge"] = _check_catalog_id(data.get("instancer_challenge"),
                                                        ChallengeCreateException)
        data.pop("scheduled_at", None)
        challenge = cls.challenge_model(**data)
        db.session.add(challenge)
        db.session.commit()
        if add_flag:
            db.session.add(Flags(challenge_id=challenge.id, type=FLAG_TYPE, content="",
                                 data=""))
            db.session.commit()
        return challenge

    @classmethod
    def read(cls, challenge):
        """Return the challenge's data, with the catalog challenge it instances."""
        data = super().read(challenge)
        data["instancer_challenge"] = getattr(challenge, "instancer_challenge", "")
        return data

    @classmethod
    def update(cls, challenge, request):
        """Update the challenge; a new catalog challenge must exist in the catalog."""
        data = request.form or request.get_json() or {}
        if "instancer_challenge" in data and \
                data["instancer_challenge"] != challenge.instancer_challenge:
            _check_catalog_id(data["instancer_challenge"], ChallengeUpdateException)
        return super().update(challenge, request)


# -- the flag type ----------------------------------------------------------------------------


def catalog_id_of_flag(flag: Flags) -> str:
    """Return the catalog challenge a flag is checked against.

    The flag's ``data`` names it; when empty, it is the catalog challenge of the CTFd
    challenge the flag belongs to (an ``instanced`` one).
    """
    if flag.data:
        return str(flag.data)
    chal = InstancedChallenge.query.filter_by(id=flag.challenge_id).first()
    return str(chal.instancer_challenge) if chal is not None else ""


class InstancerFlag(BaseFlag):
    """The ``instancer`` flag type: right only for the submitting team's own flag.

    ``content``: empty for the team's flag (the catalog's ``flag_env``), or the name of an
    in-app challenge (OWASP Juice Shop's, e.g. "Score Board") for that app's own flag.
    ``data``: the catalog challenge; empty means this CTFd challenge's own.
    """

    name = FLAG_TYPE
    templates = {  # noqa: RUF012
        "create": f"{ASSETS}flag-create.html",
        "update": f"{ASSETS}flag-edit.html",
    }

    @staticmethod
    def compare(chal_key_obj, provided):  # CTFd's signature
        """Ask the instancer whether ``provided`` is the submitting team's flag."""
        catalog_id = catalog_id_of_flag(chal_key_obj)
        if not catalog_id:
            raise FlagException("This flag names no instancer challenge; tell the organisers.")
        try:
            team_id = current_team_id()
        except NoTeam as exc:
            raise FlagException(str(exc)) from None
        try:
            return instancer().check_flag(team_id, catalog_id, provided,
                                          chal_key_obj.content or None)
        except InstancerError as exc:
            raise FlagException(f"The flag cannot be checked right now: {exc.detail}") \
                from None


# -- a static flag beside the per-team flag ----------------------------------------------------

STATIC_REFUSED = (
    "This instanced challenge is scored with each team's own flag (its instancer flag). A "
    "{kind} flag beside it would be accepted from any team, so it is refused. To score with "
    "one flag for everyone, delete the instancer flag first.")


def static_flag_refusal(challenge_id: Any, flag_type: str) -> str | None:
    """Return why a ``flag_type`` flag may not be added to a challenge, or ``None``.

    A flag of any other type on an ``instanced`` challenge that has a per-team ``instancer``
    flag would be right for every team: one team's shared answer (or a flag that leaked)
    would score for all, silently defeating the per-team flag.
    """
    if flag_type == FLAG_TYPE:
        return None
    try:
        number = int(challenge_id)
    except (TypeError, ValueError):
        return None
    if InstancedChallenge.query.filter_by(id=number).first() is None:
        return None
    if Flags.query.filter_by(challenge_id=number, type=FLAG_TYPE).first() is None:
        return None
    return STATIC_REFUSED.format(kind=flag_type or "static")


def refuse_static_flags() -> Any:
    """Refuse, at CTFd's flag API, a non-instancer flag beside an instancer flag.

    CTFd 3.8.7 offers plugins no hook on flag creation (``POST /api/v1/flags`` loads the
    schema and commits), so this runs before every request and answers only that route and
    ``PATCH /api/v1/flags/<id>`` (a type changed later), in CTFd's own error shape.
    """
    path = request.path
    if request.method == "POST" and path == "/api/v1/flags":
        body = request.get_json(silent=True) or {}
        if not isinstance(body, dict):
            return None
        challenge_id = body.get("challenge_id", body.get("challenge"))
        flag_type = str(body.get("type") or "static")
    elif request.method == "PATCH" and path.startswith("/api/v1/flags/"):
        body = request.get_json(silent=True) or {}
        flag = Flags.query.filter_by(id=path.rsplit("/", 1)[1]).first() \
            if path.rsplit("/", 1)[1].isdigit() else None
        if flag is None or not isinstance(body, dict) or "type" not in body \
                or body["type"] == flag.type:
            return None
        challenge_id, flag_type = flag.challenge_id, str(body["type"])
        if flag.type == FLAG_TYPE:
            # Changing the instancer flag itself: refused only if another one remains.
            others = Flags.query.filter(Flags.challenge_id == challenge_id,
                                        Flags.type == FLAG_TYPE, Flags.id != flag.id).first()
            if others is None:
                return None
    else:
        return None
    reason = static_flag_refusal(challenge_id, flag_type)
    if reason is None or not is_admin():
        return None
    response = jsonify({"success": False, "errors": {"type": [reason]}})
    response.status_code = 400
    return response


# -- player routes ----------------------------------------------------------------------------

player = Blueprint(f"{PLUGIN}_player", __name__, url_prefix=f"/plugins/{PLUGIN}")
admin = Blueprint(f"{PLUGIN}_admin", __name__, template_folder="templates")


def _error(detail: str, status: int, code: str) -> Any:
    response = jsonify({"success": False, "error": {"code": code, "detail": detail}})
    response.status_code = status
    return response


def _player_challenge(challenge_id: int) -> InstancedChallenge:
    """Return the instanced challenge if the current player may use it, else 404/403."""
    chal = InstancedChallenge.query.filter_by(id=challenge_id).first()
    if chal is None:
        abort(404)
    if is_admin():
        return chal
    if chal.state in ("hidden", "locked"):
        abort(404)
    user = get_current_user()
    if not can_access_challenge(chal, user):
        abort(404)
    prereqs = set((chal.requirements or {}).get("prerequisites", []))
    if prereqs:
        solved = {cid for (cid,) in Solves.query.with_entities(Solves.challenge_id)
                  .filter_by(account_id=user.account_id).all()}
        existing = {cid for (cid,) in Challenges.query.with_entities(Challenges.id).all()}
        if not solved >= prereqs & existing:
            abort(403)
    return chal


def _seconds_left(expires_at: str | None) -> int | None:
    if not expires_at:
        return None
    try:
        when = datetime.fromisoformat(expires_at.replace("Z", "+00:00"))
    except ValueError:
        return None
    return max(0, math.floor((when - datetime.now(UTC)).total_seconds()))


def player_view(chal: InstancedChallenge, inst: dict[str, Any] | None) -> dict[str, Any]:
    """Return what a player sees of their instance: no token, no container internals."""
    if inst is None:
        return {"status": "none", "challenge_id": chal.id}
    url = inst.get("url")
    view: dict[str, Any] = {
        "challenge_id": chal.id,
        "status": inst.get("status", "starting"),
        "address": url,
        "web": isinstance(url, str) and url.startswith(("http://", "https://")),
        "open_url": url_for(f"{PLUGIN}_player.open_instance", challenge_id=chal.id),
        "expires_at": inst.get("expires_at"),
        "expires_in": _seconds_left(inst.get("expires_at")),
        "reason": inst.get("reason") or inst.get("error"),
        # A TCP instance: the lines a player copies (nc, ncat --ssl, openssl, pwntools).
        "connect": connection_lines(url),
    }
    # A Compose instance (SPEC §12): every endpoint with its own link (web) or address (tcp).
    links = endpoint_links(inst)
    if len(links) > 1:
        # (The query is spelled out: url_for's own first parameter is called ``endpoint``.)
        # Each TCP endpoint's lines to copy, in endpoint_links' order (it skips non-objects).
        urls = [ep.get("url") for ep in inst.get("endpoints") or [] if isinstance(ep, dict)]
        view["endpoints"] = [
            {**link, "open_url": f"{view['open_url']}?endpoint={i}" if link["web"] else None,
             "connect": connection_lines(url)}
            for i, (link, url) in enumerate(zip(links, urls, strict=True))]
    if inst.get("host_up") is False:
        view["status_note"] = "Its server is unreachable right now; it is not lost."
    return view


def _progress(client: InstancerClient, team_id: str, task_id: str) -> dict[str, Any]:
    try:
        task = client.task(team_id, task_id)
    except InstancerError:
        return {}
    out: dict[str, Any] = {"state": task.get("state")}
    if isinstance(task.get("progress"), dict):
        out["progress"] = task["progress"]
    if isinstance(task.get("error"), dict):
        out["error"] = task["error"].get("detail") or task["error"].get("error")
    return out


def _player_action(challenge_id: int, action: str) -> Any:
    if not ctftime() and not is_admin():
        return _error("The CTF is not running now: instances can be used only during it.",
                      403, "not_ctf_time")
    chal = _player_challenge(challenge_id)
    try:
        team_id = current_team_id()
    except NoTeam as exc:
        return _error(str(exc), 403, "no_team")
    if action != "status" and ctf_paused() and not is_admin():
        return _error("The CTF is paused; instances cannot be changed now.", 403, "paused")
    try:
        client = instancer()
        catalog_id = chal.instancer_challenge
        extra: dict[str, Any] = {}
        if action == "start":
            started = client.start(team_id, catalog_id)
            extra["task_id"] = started.get("task_id")
            inst = client.instance(team_id, catalog_id) or \
                {k: v for k, v in started.items() if k != "task_id"}
        elif action == "restart":  # a fresh instance, followed like a start's task
            restarted = client.restart(team_id, catalog_id)
            extra["task_id"] = restarted.get("task_id")
            inst = client.instance(team_id, catalog_id) or \
                {k: v for k, v in restarted.items() if k != "task_id"}
        elif action == "stop":
            client.stop(team_id, catalog_id)
            inst = None
        elif action == "extend":
            inst = client.extend(team_id, catalog_id)
            if "status" not in inst:
                inst = client.instance(team_id, catalog_id)
        else:
            inst = client.instance(team_id, catalog_id)
            task_id = request.args.get("task", "")
            if task_id and len(task_id) <= 200:
                extra.update(_progress(client, team_id, task_id))
    except InstancerError as exc:
        return _error(exc.detail, exc.status if 400 <= exc.status < 600 else 503, exc.code)
    return jsonify({"success": True, "data": {**player_view(chal, inst), **extra}})


@player.route("/api/<int:challenge_id>", methods=["GET"])
@authed_only
@require_verified_emails
def instance_status(challenge_id: int) -> Any:
    """The player's instance of an instanced challenge (``?task=`` adds start progress)."""
    return _player_action(challenge_id, "status")


@player.route("/api/<int:challenge_id>/start", methods=["POST"])
@authed_only
@require_verified_emails
def start_instance(challenge_id: int) -> Any:
    """Start the player's team's instance (idempotent); answers at once with a task id."""
    return _player_action(challenge_id, "start")


@player.route("/api/<int:challenge_id>/stop", methods=["POST"])
@authed_only
@require_verified_emails
def stop_instance(challenge_id: int) -> Any:
    """Stop and remove the player's team's instance."""
    return _player_action(challenge_id, "stop")


@player.route("/api/<int:challenge_id>/restart", methods=["POST"])
@authed_only
@require_verified_emails
def restart_instance(challenge_id: int) -> Any:
    """Replace the team's instance with a fresh one (same flag); answers with a task id."""
    return _player_action(challenge_id, "restart")


@player.route("/api/<int:challenge_id>/extend", methods=["POST"])
@authed_only
@require_verified_emails
def extend_instance(challenge_id: int) -> Any:
    """Push the team's instance's expiry out by its ttl, up to its maximum lifetime."""
    return _player_action(challenge_id, "extend")


@player.route("/open/<int:challenge_id>", methods=["GET"])
@authed_only
@require_verified_emails
def open_instance(challenge_id: int) -> Any:
    """Send the player to their instance through a fresh link.

    The ingress's ``access_url`` is short-lived, so it is fetched when the player clicks
    rather than put in a page that may stay open longer than the link lives. ``?endpoint=N``
    opens the instance's N-th endpoint (a Compose instance's, SPEC §12) instead of its primary.
    """
    if not ctftime() and not is_admin():
        abort(403)
    chal = _player_challenge(challenge_id)
    try:
        inst = instancer().instance(current_team_id(), chal.instancer_challenge)
    except (InstancerError, NoTeam):
        inst = None
    wanted = request.args.get("endpoint", "")
    endpoint = int(wanted) if wanted.isdigit() and len(wanted) < 4 else None
    target = link_target(inst, endpoint)
    if target is None:
        return redirect(url_for("challenges.listing") + f"#{chal.name}-{chal.id}")
    return redirect(target)


# -- admin routes -----------------------------------------------------------------------------


@admin.route("/admin/ctf_instancer", methods=["GET"])
@admins_only
def admin_instances_page() -> Any:
    """Instancer > Instances: every instance the instancer runs, with Stop and Extend."""
    return render_template("ctf_instancer_admin.html", tab="instances")


@admin.route("/admin/ctf_instancer/api/instances", methods=["GET"])
@admins_only
def admin_instances() -> Any:
    """Every instance, with the CTFd team or user each belongs to."""
    conn = connection()
    try:
        found = InstancerClient(conn).all_instances()
    except InstancerError as exc:
        return _error(exc.detail, exc.status if 400 <= exc.status < 600 else 503, exc.code)
    titles = {c.instancer_challenge: c.name for c in InstancedChallenge.query.all()}
    rows = []
    for inst in found:
        team_id = str(inst.get("team_id", ""))
        rows.append({
            "team_id": team_id,
            "challenge": inst.get("challenge"),
            "challenge_name": titles.get(str(inst.get("challenge"))),
            "status": inst.get("status"),
            "url": inst.get("url"),
            "host": inst.get("host"),
            "started_at": inst.get("started_at"),
            "expires_at": inst.get("expires_at"),
            "expires_in": _seconds_left(inst.get("expires_at")),
            **account_name(conn.prefix, team_id),
        })
    rows.sort(key=lambda r: (str(r["challenge"]), str(r["team_id"])))
    return jsonify({"success": True, "data": rows})


@admin.route("/admin/ctf_instancer/api/instances/<team_id>/<challenge>/<action>",
             methods=["POST"])
@admins_only
def admin_instance_action(team_id: str, challenge: str, action: str) -> Any:
    """Stop or extend any team's instance."""
    if action not in ("stop", "extend"):
        abort(404)
    try:
        client = instancer()
        result = client.admin_stop(team_id, challenge) if action == "stop" \
            else client.admin_extend(team_id, challenge)
    except InstancerError as exc:
        return _error(exc.detail, exc.status if 400 <= exc.status < 600 else 503, exc.code)
    return jsonify({"success": True, "data": {k: result.get(k) for k in
                                              ("team_id", "challenge", "status",
                                               "expires_at")}})


@admin.route("/admin/ctf_instancer/api/catalog", methods=["GET"])
@admins_only
def admin_catalog() -> Any:
    """The instancer's catalog, for the challenge creation form."""
    try:
        return jsonify({"success": True, "data": instancer().catalog()})
    except InstancerError as exc:
        return _error(exc.detail, exc.status if 400 <= exc.status < 600 else 503, exc.code)


def flag_warnings(catalog: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Return the instanced challenges whose per-team flag can never be solved.

    Each has an ``instancer`` flag (the create form ticks it by default) for a catalog
    challenge the instancer lists with ``flag: false``: none of its containers holds the
    team's flag (no ``flag_env``, no ``${CTF_FLAG}``). An instancer that does not say
    (older than the ``flag`` field) is given the benefit of the doubt.
    """
    flagless = {str(ch.get("id")) for ch in catalog if ch.get("flag") is False}
    found = []
    for chal in InstancedChallenge.query.order_by(InstancedChallenge.id).all():
        flags = Flags.query.filter_by(challenge_id=chal.id, type=FLAG_TYPE).all()
        if any(catalog_id_of_flag(f) in flagless for f in flags):
            found.append({"id": chal.id, "name": chal.name,
                          "instancer_challenge": chal.instancer_challenge,
                          "url": url_for("admin.challenges_detail", challenge_id=chal.id)})
    return found


@admin.route("/admin/ctf_instancer/api/warnings", methods=["GET"])
@admins_only
def admin_warnings() -> Any:
    """Instanced challenges scored by a per-team flag that no container of theirs holds."""
    try:
        catalog = instancer().catalog()
    except InstancerError as exc:
        return _error(exc.detail, exc.status if 400 <= exc.status < 600 else 503, exc.code)
    return jsonify({"success": True, "data": flag_warnings(catalog)})


@admin.route("/admin/ctf_instancer/api/shared_flags", methods=["GET"])
@admins_only
def admin_shared_flags() -> Any:
    """Flags one team submitted that were another's (SPEC §13), with the CTFd accounts."""
    conn = connection()
    try:
        events = InstancerClient(conn).shared_flags()
    except InstancerError as exc:
        return _error(exc.detail, exc.status if 400 <= exc.status < 600 else 503, exc.code)
    titles = {c.instancer_challenge: c.name for c in InstancedChallenge.query.all()}
    rows = []
    for event in events:
        submitter, owner = str(event.get("team_id", "")), str(event.get("owner", ""))
        by, of = account_name(conn.prefix, submitter), account_name(conn.prefix, owner)
        rows.append({
            "time": event.get("time"), "challenge": event.get("challenge"),
            "challenge_name": titles.get(str(event.get("challenge"))),
            "team_id": submitter, "account": by["account"], "account_url": by["account_url"],
            "owner": owner, "owner_account": of["account"], "owner_url": of["account_url"],
        })
    return jsonify({"success": True, "data": rows})


# The settings page's fields: (form field, label, the Connection attribute naming the
# environment variable that sets it, when one does).
SETTINGS_FIELDS = (("url", "Instancer URL", "url_env"), ("token", "Admin token", "token_env"),
                   ("prefix", "Team id prefix", "prefix_env"))


def save_settings_form(form: Any) -> tuple[str | None, str | None, list[tuple[str, str]]]:
    """Save what the settings form sent; return ``(message, problem, ignored)``.

    A field set by an environment variable is shown read-only and is never saved from a
    post (a crafted one included): what the page holds then would silently come back into
    use the day the variable is removed. ``ignored`` lists each such field that was sent
    anyway, as ``(label, variable)``.
    """
    conn = connection()
    locked = {field: getattr(conn, attr) for field, _, attr in SETTINGS_FIELDS}
    ignored = [(label, locked[field]) for field, label, _ in SETTINGS_FIELDS
               if locked[field] and form.get(field, "").strip()]
    url = "" if locked["url"] else form.get("url", "").strip()
    prefix = "" if locked["prefix"] else form.get("prefix", "").strip()
    token = "" if locked["token"] else form.get("token", "").strip()
    if url and not url.startswith(("http://", "https://")):
        return None, "The URL must start with http:// or https://.", ignored
    if prefix and not PREFIX_RE.fullmatch(prefix):
        return None, ("The prefix must be 1 to 41 letters, digits, '_' or '-', starting "
                      "with a letter or digit."), ignored
    if not locked["url"]:
        save_setting("url", url)
    if not locked["prefix"]:
        save_setting("prefix", prefix)
    if form.get("clear_token"):
        save_setting("token", "")
    elif token:
        # Bound to the URL in use now (the environment's wins over the page's).
        save_token(resolve({"url": url}).url or "", token)
    message = "Saved."
    if not token and stored_settings().get("token") and connection().admin_token is None:
        message = ("Saved. The admin token was saved for another URL and is not sent "
                   "to this one: enter it again.")
    return message, None, ignored


@admin.route("/admin/ctf_instancer/settings", methods=["GET", "POST"])
@admins_only
def admin_settings() -> Any:
    """Instancer > Settings: URL, admin token (write-only) and team-id prefix.

    A field an environment variable sets is shown read-only, naming the variable.
    """
    message, problem, ignored = None, None, []
    if request.method == "POST":
        message, problem, ignored = save_settings_form(request.form)
    conn = connection()
    health: dict[str, Any] | None = None
    catalog: list[dict[str, Any]] = []
    try:
        client = InstancerClient(conn)
        status, body = client.health()
        health = {"status": status, **body}
        catalog = client.catalog()
    except InstancerError as exc:
        health = {"error": exc.detail}
    stored = stored_settings()
    return render_template(
        "ctf_instancer_settings.html", tab="settings", conn=conn,
        warnings=flag_warnings(catalog), stored_url=stored.get("url", ""),
        stored_prefix=stored.get("prefix", ""), token_stored=bool(stored.get("token")),
        health=health, catalog=catalog, message=message, problem=problem, ignored=ignored,
        token_file=os.environ.get(conn.token_env, "").strip()
        if conn.token_env and conn.token_env.endswith("_FILE") else None,
    )


# -- load ---------------------------------------------------------------------------------------


def load(app: Any) -> None:
    """Register the challenge type, the flag type, the routes and the admin menu entry."""
    app.db.create_all()
    CHALLENGE_CLASSES[TYPE_ID] = InstancedChallengeType
    FLAG_CLASSES[FLAG_TYPE] = InstancerFlag
    register_plugin_assets_directory(app, base_path=ASSETS)
    app.register_blueprint(player)
    app.register_blueprint(admin)
    app.before_request(refuse_static_flags)
    # One menu entry, "Instancer", whose page has two tabs: Instances and Settings.
    register_admin_plugin_menu_bar(MENU, "/admin/ctf_instancer")
    # CTFd's admin flag list shows a flag's content, which an instancer flag leaves empty.
    register_admin_plugin_script(f"{ASSETS}flag-list.js")
