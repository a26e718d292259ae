"""The structured-output gate over a fake compile (no vLLM): a spec compiles in a worker thread, off the event loop,
within the time limit; one that fails or runs past it is a 400; a compiled spec is not compiled again."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

from deployments.engine.structured import StructuredOutputGate


@dataclass
class FakeSpec:  # the fields vLLM's StructuredOutputsParams has that matter here
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None


@dataclass
class FakeParams:
    structured_outputs: FakeSpec | None = field(default_factory=FakeSpec)


class FakeRequest:
    def __init__(self, params):
        self.params = params
        self.structured_outputs = params.structured_outputs  # as vLLM's request models carry it

    def to_sampling_params(self, max_tokens, defaults):
        return self.params


def _gate(compile_s: float, fail: bool = False, timeout_s: float = 0.3):
    gate, compiled = StructuredOutputGate(timeout_s), []

    def fake_compile(params):  # stands in for vLLM's xgrammar check
        time.sleep(compile_s)
        compiled.append(params.structured_outputs.regex)
        if fail:
            raise ValueError("bad regex")

    gate._original = fake_compile
    return gate, compiled


def test_a_spec_compiles_off_the_loop_once():
    gate, compiled = _gate(compile_s=0.1)
    params = FakeParams(FakeSpec(regex="a+"))

    async def run():
        ticks = 0

        async def ticker():
            nonlocal ticks
            while True:
                await asyncio.sleep(0.01)
                ticks += 1

        task = asyncio.create_task(ticker())
        first = await gate.precheck(FakeRequest(params), None)
        task.cancel()
        return first, ticks, await gate.precheck(FakeRequest(params), None)

    first, ticks, second = asyncio.run(run())
    assert first is None and second is None
    assert ticks >= 5  # the loop kept running while the spec compiled
    assert compiled == ["a+"]  # remembered: not compiled twice
    gate._check(params)  # vLLM's check for a remembered spec: no compile
    assert compiled == ["a+"]


def test_a_spec_past_the_time_limit_or_failing_is_a_400():
    slow, _ = _gate(compile_s=1.0, timeout_s=0.1)
    reply = asyncio.run(slow.precheck(FakeRequest(FakeParams(FakeSpec(regex="slow"))), None))
    assert reply.status == 400 and "did not compile within" in reply.message
    bad, _ = _gate(compile_s=0, fail=True)
    reply = asyncio.run(bad.precheck(FakeRequest(FakeParams(FakeSpec(regex="(("))), None))
    assert reply.status == 400 and "bad regex" in reply.message


def test_requests_without_a_spec_pass_untouched():
    gate, compiled = _gate(compile_s=0)
    assert asyncio.run(gate.precheck(FakeRequest(FakeParams(None)), None)) is None
    assert compiled == []
