"""The admin API: models loaded, unloaded and reloaded while the service runs
(:mod:`service.registry`). Guarded by its own bearer key (``admin_key``), which the user API keys
do not open; with no admin key set, these routes answer 404."""

from __future__ import annotations

import asyncio
import datetime as _dt
from typing import Annotated

from fastapi import APIRouter, Body, Depends, HTTPException, Request
from pydantic import BaseModel, ConfigDict, Field

from service.api.deps import RegistryDep, SettingsDep, key_is_valid
from service.registry import Entry, LoadError, ModelRegistry, UnknownModel
from service.schemas import ErrorResponse

router = APIRouter(prefix="/admin", tags=["admin"])
ERRORS = {401: {"model": ErrorResponse, "description": "No valid admin key"},
          404: {"model": ErrorResponse, "description": "The admin API is off (no admin key set), or the model is "
                "unknown"},
          422: {"model": ErrorResponse, "description": "Invalid body, or the load failed (the error says why)"}}
CHANGES = {**ERRORS, 409: {"model": ErrorResponse, "description": "The default model cannot be unloaded unless "
                           "another default is named"},
           504: {"model": ErrorResponse, "description": "The change is still under way"}}


def require_admin(request: Request, settings: SettingsDep) -> None:
    if settings.admin_key is None:
        raise HTTPException(404, "the admin API is off: set an admin key (DIFFUSION_ADMIN_KEY)")
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not key_is_valid(token.strip(), [settings.admin_key.get_secret_value().encode()]):
        raise HTTPException(401, "missing or invalid admin key (Authorization: Bearer <admin key>)",
                            headers={"WWW-Authenticate": "Bearer"})


class AdminModel(BaseModel):
    name: str
    state: str = Field(description="available (servable, not on the device), loading, resident, failed, unloaded "
                       "(taken out of service until loaded again)")
    default: bool
    aliases: list[str]
    path: str
    error: str | None = Field(description="The last load's or reload's failure (a failed reload keeps the old "
                              "weights serving).")
    bytes: int = Field(description="Bytes of its weights on the device while resident; else the estimate from disk.")
    load_seconds: float | None
    loaded_at: str | None = Field(description="When it was last loaded (ISO 8601, UTC).")
    last_used: str | None = Field(description="When a request last asked for it (ISO 8601, UTC).")
    content_hash: str | None = Field(description="SHA-256 prefix of the checkpoint file (of a folder: its files' "
                                     "names, sizes and times and its configs) at the last load.")
    in_use: int = Field(description="Requests holding it now (prepared, queued or in flight): never evicted then.")
    loads: int


class AdminModels(BaseModel):
    mode: str
    default: str
    budget_bytes: int
    resident_bytes: int
    aliases: dict[str, str]
    models: list[AdminModel]


class Unload(BaseModel):
    model_config = ConfigDict(extra="forbid")
    default: str | None = Field(None, description="The new default model, to unload the default one.")


def _iso(t: float | None) -> str | None:
    return None if not t else _dt.datetime.fromtimestamp(t, _dt.timezone.utc).isoformat(timespec="seconds")


def _describe(e: Entry, registry: ModelRegistry) -> AdminModel:
    return AdminModel(name=e.name, state=e.state, default=e.name == registry.default,
                      aliases=sorted(a for a, t in registry.aliases().items() if t == e.name), path=str(e.path),
                      error=e.error, bytes=e.bytes, load_seconds=e.load_s, loaded_at=_iso(e.loaded_at),
                      last_used=_iso(e.last_used), content_hash=e.content_hash, in_use=e.leases, loads=e.loads)


async def _entry(registry: ModelRegistry, name: str) -> Entry:
    try:
        return registry.entry(name)
    except UnknownModel:  # a model put in the directory since the last look
        await asyncio.to_thread(registry.scan, False, False)
    try:
        return registry.entry(name)
    except UnknownModel as e:
        raise HTTPException(404, str(e)) from None


async def _finish(future, registry: ModelRegistry, name: str, timeout_s: float) -> AdminModel:
    try:
        await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(future)), timeout_s)
    except asyncio.TimeoutError:
        raise HTTPException(504, f"{name!r} is still being changed after {timeout_s:g} s; see GET /admin/models") \
            from None
    except LoadError as e:
        raise HTTPException(422, f"could not load {name!r}: {e}" + (" (the old weights keep serving)"
                                                                     if registry.entry(name).pipe else "")) from None
    return _describe(registry.entry(name), registry)


Admin = [Depends(require_admin)]


@router.get("/models", response_model=AdminModels, dependencies=Admin, responses=ERRORS)
async def admin_models(registry: RegistryDep) -> AdminModels:
    """Every model in the checkpoint directory with its state, load time, device bytes, last use and
    content hash; the budget and what it holds."""
    return AdminModels(mode=registry.mode, default=registry.default, budget_bytes=registry.budget_bytes,
                       resident_bytes=registry.resident_bytes(), aliases=registry.aliases(),
                       models=[_describe(e, registry) for e in registry.entries()])


@router.post("/models/{name}/load", response_model=AdminModel, dependencies=Admin, responses=CHANGES)
async def load(name: str, registry: RegistryDep, settings: SettingsDep) -> AdminModel:
    """Load a model onto the device now (an unloaded one returns to service). Waits for the load;
    422 with the error when it fails."""
    await _entry(registry, name)
    return await _finish(registry.request_load(name), registry, name, settings.max_timeout_s)


@router.post("/models/{name}/reload", response_model=AdminModel, dependencies=Admin, responses=CHANGES)
async def reload(name: str, registry: RegistryDep, settings: SettingsDep) -> AdminModel:
    """Read a model from disk again and swap it in between two engine iterations: requests in flight
    finish on the old weights. A failure (422) keeps the old weights serving."""
    await _entry(registry, name)
    return await _finish(registry.request_reload(name), registry, name, settings.max_timeout_s)


@router.post("/models/{name}/unload", response_model=AdminModel, dependencies=Admin, responses=CHANGES)
async def unload(name: str, registry: RegistryDep, settings: SettingsDep,
                 body: Annotated[Unload | None, Body()] = None) -> AdminModel:
    """Take a model out of service: new requests for it are refused; it leaves the device once the
    ones it has are done. The default model only with another ``default`` named (409 otherwise)."""
    await _entry(registry, name)
    try:
        future = registry.request_unload(name, body.default if body else None)
    except UnknownModel as e:
        raise HTTPException(404, str(e)) from None
    except ValueError as e:
        raise HTTPException(409, str(e)) from None
    return await _finish(future, registry, name, settings.max_timeout_s)


@router.post("/scan", response_model=AdminModels, dependencies=Admin, responses=ERRORS)
async def scan(registry: RegistryDep) -> AdminModels:
    """Look at the checkpoint directory now (new models, ``aliases.json``); in poll mode changed models
    reload too. The explicit mode's way to find new files."""
    await asyncio.to_thread(registry.scan, registry.mode == "poll", False)
    return await admin_models(registry)
