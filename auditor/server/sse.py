"""Server-sent events: the wire encoding and an in-process fan-out of alerts to subscribers.

Each subscriber gets a bounded queue; a subscriber that falls behind loses the
oldest events (and is told so by a ``dropped`` count on the next event) rather
than slowing the auditor down. The audit log stays the complete record.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from typing import Any

__all__ = ["Broadcaster", "sse_event", "sse_comment", "SSE_HEADERS"]

#: Response headers for an event stream (no proxy buffering, no caching).
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def sse_event(data: Any, *, event: str | None = None, id: str | None = None) -> bytes:
    """One event: optional ``event:`` / ``id:`` lines and a JSON (or raw string) ``data:`` line."""
    payload = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
    lines = []
    if event is not None:
        lines.append(f"event: {event}")
    if id is not None:
        lines.append(f"id: {id}")
    lines.extend(f"data: {line}" for line in payload.split("\n"))
    return ("\n".join(lines) + "\n\n").encode()


def sse_comment(text: str = "keepalive") -> bytes:
    """A comment line; clients ignore it, proxies see traffic."""
    return f": {text}\n\n".encode()


# Put in a subscriber's queue by Broadcaster.close(): the stream ends.
_CLOSED: dict[str, Any] = {}


class _Subscriber:
    def __init__(self, maxsize: int, accept: Callable[[dict[str, Any]], bool]) -> None:
        self.queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue(maxsize)
        self.accept = accept
        self.dropped = 0


class Broadcaster:
    """Fan published dicts out to async subscribers (all on one event loop)."""

    def __init__(self, maxsize: int = 256) -> None:
        self.maxsize = maxsize
        self._subs: set[_Subscriber] = set()
        self._closed = False

    @property
    def subscribers(self) -> int:
        return len(self._subs)

    def publish(self, item: dict[str, Any]) -> None:
        """Offer ``item`` to every subscriber whose filter accepts it; never waits."""
        for sub in list(self._subs):
            if not sub.accept(item):
                continue
            if sub.queue.full():
                sub.queue.get_nowait()
                sub.dropped += 1
            sub.queue.put_nowait(item)

    def close(self) -> None:
        """End every subscription (each stream finishes) and every later one at once: the server
        is shutting down, and it waits for open responses, which an event stream never ends by
        itself (a browser's ``EventSource`` reconnects to the next server)."""
        self._closed = True
        for sub in list(self._subs):
            if sub.queue.full():
                sub.queue.get_nowait()
            sub.queue.put_nowait(_CLOSED)

    async def subscribe(
        self, accept: Callable[[dict[str, Any]], bool] = lambda _item: True, *, keepalive_s: float = 15.0
    ) -> AsyncIterator[bytes]:
        """Yield SSE-encoded ``alert`` events (and keepalive comments) until the client goes away."""
        if self._closed:
            return
        sub = _Subscriber(self.maxsize, accept)
        self._subs.add(sub)
        try:
            yield sse_comment("subscribed")
            while True:
                try:
                    item = await asyncio.wait_for(sub.queue.get(), keepalive_s)
                except asyncio.TimeoutError:
                    yield sse_comment()
                    continue
                if item is _CLOSED:
                    return
                if sub.dropped:
                    item = {**item, "dropped_before": sub.dropped}
                    sub.dropped = 0
                yield sse_event(item, event="alert", id=str(item.get("id", "")))
        finally:
            self._subs.discard(sub)
