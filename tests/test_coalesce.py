"""Coalescing a stream whose reader falls behind (engine replica), and the ingress relaying joined chunks."""

from __future__ import annotations

import asyncio
import json

import pytest

from deployments.api.http import relay_sse
from deployments.api.trace import Trace
from deployments.engine.coalesce import coalesced
from deployments.settings import SLOSettings


async def _chunks(n: int, gap_s: float = 0.0, fail: bool = False, seen: list | None = None):
    try:
        for i in range(n):
            if gap_s:
                await asyncio.sleep(gap_s)
            yield f"data: {i}\n\n"
        if fail:
            raise RuntimeError("engine died")
    finally:
        if seen is not None:
            seen.append("closed")


def test_a_reader_that_keeps_up_gets_every_chunk_alone():
    async def go():
        return [item async for item in coalesced(_chunks(5, gap_s=0.01))]
    assert asyncio.run(go()) == [f"data: {i}\n\n" for i in range(5)]


def test_chunks_ready_behind_a_slow_reader_go_as_one_in_order():
    async def go():
        out = []
        async for item in coalesced(_chunks(20, gap_s=0.001)):
            out.append(item)
            await asyncio.sleep(0.02)  # the handle is busy: chunks pile up
        return out
    items = asyncio.run(go())
    assert "".join(items) == "".join(f"data: {i}\n\n" for i in range(20))
    assert len(items) < 10


def test_at_most_max_items_are_joined():
    async def go():
        out = []
        async for item in coalesced(_chunks(10), max_items=3):
            out.append(item)
            await asyncio.sleep(0.01)
        return out
    items = asyncio.run(go())
    assert "".join(items) == "".join(f"data: {i}\n\n" for i in range(10))
    assert max(item.count("data:") for item in items) == 3


def test_an_error_comes_after_the_chunks_made_before_it():
    async def go():
        out = []
        with pytest.raises(RuntimeError, match="engine died"):
            async for item in coalesced(_chunks(3, fail=True)):
                out.append(item)
                await asyncio.sleep(0.01)
        return out
    assert "".join(asyncio.run(go())) == "data: 0\n\ndata: 1\n\ndata: 2\n\n"


def test_closing_the_reader_cancels_the_source():
    """The client left: the engine's generator is cancelled where it waits (vLLM aborts the request)."""
    seen: list[str] = []

    async def go():
        stream = coalesced(_chunks(100, gap_s=0.01, seen=seen))
        assert await anext(stream) == "data: 0\n\n"
        await stream.aclose()
        await asyncio.sleep(0.05)
    asyncio.run(go())
    assert seen == ["closed"]


def test_the_ingress_relays_joined_chunks_event_by_event():
    """An item holding several SSE events: every event reaches the client unchanged, the usage event gets the
    timing breakdown, each token event counts as a gap, [DONE] ends the request."""
    usage = json.dumps({"id": "x", "choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 3}},
                       separators=(",", ":"))  # as vLLM writes it
    tokens = [f"data: {json.dumps({'id': 'x', 'choices': [{'text': t}]})}\n\n" for t in ("a", "b", "c")]
    items = [tokens[1] + tokens[2], f"data: {usage}\n\ndata: [DONE]\n\n"]

    async def rest():
        for item in items:
            yield item

    async def go():
        trace = Trace(request_id="t", model="m")
        return [c async for c in relay_sse(tokens[0], rest(), trace, False, SLOSettings())], trace

    out, trace = asyncio.run(go())
    text = "".join(out)
    assert text.startswith("".join(tokens)) and text.endswith("data: [DONE]\n\n")
    [usage_event] = [e for e in text.split("\n\n") if '"usage"' in e]
    assert "pdserve_timing" in json.loads(usage_event[len("data: "):])
    assert len(trace.token_gaps_s) == 2 and trace.finished_at is not None
