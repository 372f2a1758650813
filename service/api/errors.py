"""Every error the API answers, in one of two shapes: the native ``{"detail": …}`` (422 naming each
field) or, under ``/v1/``, OpenAI's ``{"error": {"message", "type", "param", "code"}}`` (400 for
what is invalid). Never a plain-text 500 for anything a client can send."""

from __future__ import annotations

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from diffusion import SAMPLERS
from service.api.middleware import GENERATION_PATHS, BodyTooLarge
from service.images import TooLarge

OPENAI_PREFIX = "/v1/"

# OpenAI's error types by status (its API answers 401 and 404 as invalid requests too).
_OPENAI_TYPES = {401: "invalid_request_error", 429: "rate_limit_error"}
_OPENAI_CODES = {401: "invalid_api_key", 413: "payload_too_large", 429: "rate_limit_exceeded",
                 503: "service_unavailable", 504: "timeout"}


def is_openai(request: Request) -> bool:
    return request.url.path.startswith(OPENAI_PREFIX)


def openai_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    kind = _OPENAI_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": code or _OPENAI_CODES.get(status)}}


def openai_error(status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict | None = None) -> JSONResponse:
    return JSONResponse(openai_body(status, message, param, code), status_code=status, headers=headers)


def _field(loc) -> str:
    parts = [str(p) for p in loc[1:]] if loc and loc[0] == "body" else [str(p) for p in loc]
    return ".".join(parts) or "body"


def field_items(exc: RequestValidationError) -> list[dict]:
    """One ``{"field", "msg", "type", "loc"}`` per invalid field (malformed JSON included); never echoes input."""
    items = []
    for err in exc.errors():
        loc = list(err.get("loc", ()))
        msg, kind = err.get("msg", "invalid"), err.get("type", "value_error")
        if kind == "json_invalid":  # loc is ["body", character offset]
            reason = (err.get("ctx") or {}).get("error", "")
            loc, msg = ["body"], f"malformed JSON at character {loc[-1]}{': ' + reason if reason else ''}"
        # A union (class_label: int | str) reports one error per member type: name the field once.
        union = len(loc) > 2 and loc[0] == "body" and loc[-1] in ("int", "str")
        if union or (loc[:2] == ["body", "class_label"] and kind in ("int_type", "string_type")):
            loc, msg, kind = loc[:2], "must be an integer (class index) or a string (class name)", "type_error"
        item = {"field": _field(loc), "msg": msg, "type": kind, "loc": loc}
        if item not in items:
            items.append(item)
    return items


def _openai_invalid(items: list[dict]) -> JSONResponse:
    first = items[0] if items else {"field": "body", "msg": "invalid request", "type": "value_error"}
    field, kind = first["field"], first["type"]
    if field == "body":
        return openai_error(400, f"We could not parse the JSON body of your request: {first['msg']}.",
                            code="invalid_json")
    if kind == "missing":
        return openai_error(400, f"Missing required parameter: '{field}'.", field, "missing_required_parameter")
    if kind == "extra_forbidden":
        return openai_error(400, f"Unknown parameter: '{field}'.", field, "unknown_parameter")
    return openai_error(400, f"Invalid value for '{field}': {first['msg']}.", field, "invalid_value")


async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    """422 naming each field and its reason; under /v1/, OpenAI's 400 naming the first."""
    items = field_items(exc)
    if request.url.path in GENERATION_PATHS:
        _label_invalid(request, exc.body)
    if is_openai(request):
        return _openai_invalid(items)
    return JSONResponse({"detail": items}, status_code=422)


async def too_large(request: Request, exc: TooLarge | BodyTooLarge) -> JSONResponse:
    """413 for an image file or a whole body over the service's limits, in the path's shape."""
    field = getattr(exc, "field", None)
    if is_openai(request):
        return openai_error(413, f"{exc}.", field)
    return JSONResponse({"detail": [{"field": field or "body", "msg": str(exc), "type": "too_large",
                                     "loc": ["body", *([field] if field else [])]}]}, status_code=413)


async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
    """HTTP errors raised by routes, dependencies and routing (404, 405), in the path's shape. A body
    that FastAPI could not even decode (not UTF-8, nested too deep) is malformed JSON like any other;
    one it stopped reading at the size limit is a 413."""
    if isinstance(exc.__cause__, BodyTooLarge):
        return await too_large(request, exc.__cause__)
    headers = getattr(exc, "headers", None)
    if exc.status_code == 400 and exc.__cause__ is not None and not is_openai(request):
        item = {"field": "body", "msg": "malformed JSON: the body could not be decoded", "type": "json_invalid",
                "loc": ["body"]}
        if request.url.path in GENERATION_PATHS:
            _label_invalid(request, None)
        return JSONResponse({"detail": [item]}, status_code=422)
    if is_openai(request):
        if exc.status_code == 400 and exc.__cause__ is not None:
            return openai_error(400, "We could not parse the JSON body of your request.", code="invalid_json")
        if exc.status_code == 422 and isinstance(exc.detail, list):  # field errors raised by a route
            return _openai_invalid(exc.detail)
        detail = exc.detail if isinstance(exc.detail, dict) else {"message": str(exc.detail)}
        if exc.status_code == 404 and not isinstance(exc.detail, dict):
            detail = {"message": f"Invalid URL ({request.method} {request.url.path})"}
        return openai_error(exc.status_code, detail["message"], detail.get("param"), detail.get("code"), headers)
    return JSONResponse({"detail": exc.detail}, status_code=exc.status_code, headers=headers)


def _label_invalid(request: Request, body) -> None:
    """Metric labels for a request that failed parsing: only known model and scheduler names."""
    info = getattr(request.state, "log", None)
    registry = getattr(request.app.state, "registry", None)
    if info is None or registry is None:
        return
    body = body if isinstance(body, dict) else {}
    model, scheduler = body.get("model"), body.get("scheduler", "ddim")
    if model is None:
        info["model"] = registry.default
    else:  # any JSON value: only a known name (a string) is a label
        info["model"] = model if isinstance(model, str) and model in registry else "unknown"
    info["scheduler"] = scheduler if isinstance(scheduler, str) and scheduler in SAMPLERS else "unknown"
