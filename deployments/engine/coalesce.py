"""Coalescing a token stream when its reader falls behind.

Every item a replica yields through a Serve handle is one Ray object: a fixed cost per item in the replica, the
ingress and the proxy, whatever its size. When the replica's event loop is busy (many streams, a loaded core) the
engine's SSE chunks queue up; sending the queued ones as one item costs one item's overhead instead of several, and
loses no latency (they are all ready). A reader that keeps up gets every chunk alone, as soon as it is made.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

_END = object()


async def coalesced(source: AsyncIterator[str], max_items: int = 64) -> AsyncIterator[str]:
    """``source``'s strings, each joined with those (at most ``max_items`` in all) that were ready behind it.

    The source is read by its own task so that chunks accumulate while the caller is busy. Closing this
    generator (the client left) cancels that task, which cancels the source where it waits (vLLM then aborts the
    request); an error of the source is raised here, after the chunks made before it."""
    queue: asyncio.Queue = asyncio.Queue()

    async def pump() -> None:
        try:
            async for item in source:
                queue.put_nowait(item)
        except Exception as exc:  # handed to the reader; CancelledError (we were closed) is not
            queue.put_nowait(exc)
        else:
            queue.put_nowait(_END)

    task = asyncio.create_task(pump())
    pending = None  # the end or an error, met while joining: handled after the chunks before it
    try:
        while True:
            item, pending = (pending if pending is not None else await queue.get()), None
            if item is _END:
                return
            if isinstance(item, Exception):
                raise item
            parts = [item]
            while len(parts) < max_items and not queue.empty():
                nxt = queue.get_nowait()
                if not isinstance(nxt, str):
                    pending = nxt
                    break
                parts.append(nxt)
            yield parts[0] if len(parts) == 1 else "".join(parts)
    finally:
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
