"""The API's exception handlers: every error answers ``{"error": code, "detail": text}``.

Our own errors (:mod:`celery_app.errors`) carry their code and status; the framework's
(validation, unknown route, wrong method) are given one of SPEC §6's codes; an unreachable
Redis or broker is a 503 ``backend_unavailable``. The only 5xx is 503.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import kombu.exceptions
import redis.exceptions
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from celery_app.errors import BackendUnavailable, CTFError, InvalidRequest, InvalidTeamId

log = logging.getLogger(__name__)

_HTTP_CODES = {404: "not_found", 405: "method_not_allowed", 413: "payload_too_large"}


def error_response(
    status: int, code: str, detail: str, headers: Mapping[str, str] | None = None
) -> JSONResponse:
    """Return the JSON answer of one error (SPEC §6 shape)."""
    return JSONResponse({"error": code, "detail": detail}, status_code=status, headers=headers)


def _validation_error(exc: RequestValidationError) -> CTFError:
    problems = []
    for err in exc.errors():
        loc = [str(p) for p in err.get("loc", ())]
        if loc[:1] == ["path"] and loc[-1:] == ["team_id"]:
            return InvalidTeamId(
                "the team id is invalid: use 1 to 63 characters, letters, digits, '_' or '-', "
                "starting with a letter or digit"
            )
        problems.append(f"{' '.join(loc)}: {err.get('msg', 'invalid')}")
    return InvalidRequest("; ".join(problems)[:500] or "the request is invalid")


async def _ctf_error(_request: Request, exc: Exception) -> Response:
    assert isinstance(exc, CTFError)
    return error_response(exc.status, exc.code, exc.detail)


async def _request_validation_error(_request: Request, exc: Exception) -> Response:
    assert isinstance(exc, RequestValidationError)
    err = _validation_error(exc)
    return error_response(err.status, err.code, err.detail)


async def _http_error(_request: Request, exc: Exception) -> Response:
    assert isinstance(exc, StarletteHTTPException)
    code = _HTTP_CODES.get(exc.status_code, "invalid_request")
    status = exc.status_code if exc.status_code < 500 else 503
    detail = {
        404: "no such route; see /openapi.json for the API",
        405: "this route does not take that method; see /openapi.json",
    }.get(exc.status_code, str(exc.detail))
    return error_response(status, code, detail, headers=exc.headers)


async def _backend_error(_request: Request, exc: Exception) -> Response:
    log.warning("backend unavailable: %s: %s", type(exc).__name__, exc)
    err = BackendUnavailable(
        "Redis (the state store, broker or result backend) cannot be reached; "
        "try again shortly"
    )
    return error_response(err.status, err.code, err.detail)


def install_error_handlers(app: FastAPI) -> None:
    """Register the handlers above on ``app``."""
    app.add_exception_handler(CTFError, _ctf_error)
    app.add_exception_handler(RequestValidationError, _request_validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    for cls in (redis.exceptions.RedisError, kombu.exceptions.OperationalError,
                ConnectionError, TimeoutError):
        app.add_exception_handler(cls, _backend_error)
