"""The streamed responses in the OpenAPI document: a ``text/event-stream`` entry describes one event
(its name, and its data as JSON of a named model), and the event models join the document's
components, so that docs and the contract fuzzer know every event a stream may send."""

from __future__ import annotations

from fastapi import FastAPI
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

REF = "#/components/schemas/{model}"


def event_stream(events: dict[str, type[BaseModel]]) -> dict:
    """The ``content`` entry of a response that is a stream of these events (name -> data model)."""
    return {"text/event-stream": {"schema": {"oneOf": [
        {"type": "object", "required": ["event", "data"], "properties": {
            "event": {"const": name},
            "data": {"type": "string", "contentMediaType": "application/json",
                     "contentSchema": {"$ref": REF.format(model=model.__name__)}}}}
        for name, model in events.items()]}}}


def add_models(app: FastAPI, models: list[type[BaseModel]]) -> None:
    """Put ``models`` (and the models they use) among the document's component schemas."""
    original = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is None:
            schema = original()
            _, defs = models_json_schema([(m, "serialization") for m in models], ref_template=REF)
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            for name, definition in defs.get("$defs", {}).items():
                components.setdefault(name, definition)
        return app.openapi_schema

    app.openapi = openapi
