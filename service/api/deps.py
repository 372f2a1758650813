"""What routes get injected (``Annotated`` dependencies over ``app.state``), and API-key checks."""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Depends, HTTPException, Request

from service.engine import Engine
from service.metrics import Metrics
from service.registry import ModelRegistry
from service.settings import Settings


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_metrics(request: Request) -> Metrics:
    return request.app.state.metrics


def get_registry(request: Request) -> ModelRegistry:
    registry = getattr(request.app.state, "registry", None)
    if registry is None:
        raise HTTPException(503, "models are not loaded yet", headers={"Retry-After": "5"})
    return registry


def get_engine(request: Request) -> Engine:
    engine = getattr(request.app.state, "engine", None)
    if engine is None:
        raise HTTPException(503, "the engine is not running", headers={"Retry-After": "5"})
    return engine


SettingsDep = Annotated[Settings, Depends(get_settings)]
MetricsDep = Annotated[Metrics, Depends(get_metrics)]
RegistryDep = Annotated[ModelRegistry, Depends(get_registry)]
EngineDep = Annotated[Engine, Depends(get_engine)]


def key_is_valid(given: str, keys: list[bytes]) -> bool:
    """Constant-time comparison against every key (no early exit on a match)."""
    given_b = given.encode()
    ok = False
    for key in keys:
        ok |= hmac.compare_digest(given_b, key)
    return ok


def check_key(request: Request, settings: Settings) -> None:
    keys = settings.key_values()
    if not keys:
        return
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not key_is_valid(token.strip(), keys):
        raise HTTPException(401, "missing or invalid API key (Authorization: Bearer <key>)",
                            headers={"WWW-Authenticate": "Bearer"})


def require_key(request: Request, settings: SettingsDep) -> None:
    check_key(request, settings)


def require_metrics_key(request: Request, settings: SettingsDep) -> None:
    if settings.metrics_require_key:
        check_key(request, settings)
