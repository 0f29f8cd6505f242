"""What the spawn page shows while a server starts: one spawn's progress events."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any


class Progress:
    """The events of one spawner's current start, and a way to follow them as they come.

    A spawner owns one for its lifetime; :meth:`clear` begins a new start's list.
    """

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []
        self._changed = asyncio.Event()

    def clear(self) -> None:
        self.events.clear()

    def add(self, message: str, pct: int | None = None) -> None:
        ev: dict[str, Any] = {"message": message}
        if pct is not None:
            ev["progress"] = pct
        self.events.append(ev)
        self._changed.set()

    async def follow(self, done: Callable[[], bool]) -> AsyncIterator[dict[str, Any]]:
        """Every event, old and new, until ``done()`` says the start has ended."""
        sent = 0
        while True:
            while sent < len(self.events):
                yield self.events[sent]
                sent += 1
            if done():
                break
            self._changed.clear()
            try:
                await asyncio.wait_for(self._changed.wait(), 1)
            except TimeoutError:
                pass
