"""Errors the engine raises to its callers; the services map them to status codes."""

from __future__ import annotations


class EngineError(Exception):
    """Base class of the engine's caller-facing errors."""


class InvalidRequestError(EngineError, ValueError):
    """A request the engine can never serve. `field` names the offending input."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.description = message


class QueueFullError(EngineError):
    """Too many requests of this class are waiting; retry later."""


class EngineStoppedError(EngineError):
    """The engine is shutting down or has failed and takes no new requests."""
