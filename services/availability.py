"""Whether NATS answers, as one process sees it; health checks follow it."""

from __future__ import annotations

from collections.abc import Callable


class Availability:
    """Whether NATS answers, as the process sees it: a connection that dropped, or a
    JetStream call that timed out, makes it False until NATS answers again."""

    def __init__(self) -> None:
        self.available = True
        self._listeners: list[Callable[[bool], None]] = []

    def listen(self, listener: Callable[[bool], None]) -> None:
        self._listeners.append(listener)
        listener(self.available)

    def set(self, available: bool) -> None:
        if available != self.available:
            self.available = available
            for listener in self._listeners:
                listener(available)
