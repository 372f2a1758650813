"""The HTTP layer: thin routes over the engine (no tensors here)."""

from service.api.app import create_app

__all__ = ["create_app"]
