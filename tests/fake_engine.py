"""FakeEngine: a stand-in for ``VLLMEngine`` inside real Serve replicas, for the Serve tier of the tests.

The replicas, Serve's router and proxy, the ingress, the breaker and the probes are the real ones; only the engine
is fake: no vLLM, no model, no KV. A replica loads it when its node's environment names it
(``PDSERVE_ENGINE_CLASS=tests.fake_engine:FakeEngine``, see ``deployments/servers/base.py``), so a replica starts in
about a second, and kill and freeze faults (real signals to real replica processes) are tested in seconds.

What it does, as vLLM's OpenAI layer would answer:
- text: words derived from the prompt, so every replica (and every route) answers one prompt alike;
- pace: ``FAKE_PREFILL_S_PER_1K_TOKENS`` for the prompt, ``FAKE_ITL_S`` between tokens (pool env);
- a batch of ``max_num_seqs`` running at once, more waiting (the gauges Serve's router and pdserve's read);
- a prefill-only request returns a hand-off (``kv_transfer_params``) naming this engine; a decode request with a
  hand-off counts one pull and skips the prompt's work.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import time
import uuid
from collections.abc import AsyncIterator

from deployments.engine.vllm_engine import EngineSpec
from deployments.kv import PhaseRequest
from deployments.replies import EngineStats, ErrorReply, JsonReply

FAKE_KV_BYTES_PER_TOKEN = 1024
ITL_ENV, PREFILL_ENV = "FAKE_ITL_S", "FAKE_PREFILL_S_PER_1K_TOKENS"
DEFAULT_MAX_TOKENS = 16


def prompt_text(endpoint: str, body: dict) -> str:
    if endpoint == "chat":
        return " ".join(str(m.get("content", "")) for m in body.get("messages") or [] if isinstance(m, dict))
    prompt = body.get("prompt", "")
    return prompt if isinstance(prompt, str) else json.dumps(prompt)


def fake_words(prompt: str, count: int) -> list[str]:
    """The fake model's greedy answer: the same words for the same prompt, on every engine."""
    seed = hashlib.sha256(prompt.encode()).hexdigest()
    return [f" w{int(seed[(2 * i) % 60:(2 * i) % 60 + 4], 16) % 997}" for i in range(count)]


class FakeEngine:
    """The interface the replicas use of ``VLLMEngine``: start, generate, load, stats, check_health, shutdown."""

    def __init__(self, spec: EngineSpec):
        self.spec = spec
        self.kv_bytes_per_token = FAKE_KV_BYTES_PER_TOKEN
        self.kv_fingerprint = "fake-" + hashlib.sha256(spec.model.encode()).hexdigest()[:12]
        self.num_running = self.num_waiting = 0
        self.counters: dict[str, float] = {}

    async def start(self) -> None:
        os.environ.update(self.spec.env)
        self.itl_s = float(os.environ.get(ITL_ENV, "0.02"))
        self.prefill_s_per_1k = float(os.environ.get(PREFILL_ENV, "0.2"))
        self._slots = asyncio.Semaphore(self.spec.engine.max_num_seqs)

    async def shutdown(self) -> None:
        pass

    async def check_health(self) -> None:
        pass

    def _count(self, name: str, value: float = 1.0) -> None:
        self.counters[name] = self.counters.get(name, 0.0) + value

    async def generate(self, req: PhaseRequest) -> AsyncIterator[JsonReply | ErrorReply | str]:
        body = req.body
        if not isinstance(body.get("model"), str) or ("messages" if req.endpoint == "chat" else "prompt") not in body:
            yield ErrorReply(400, "invalid request: model and a prompt are required")
            return
        prompt = prompt_text(req.endpoint, body)
        num_prompt = max(1, len(prompt) // 4)
        params = req.kv_transfer_params or {}
        self.num_waiting += 1
        try:
            await self._slots.acquire()
        finally:
            self.num_waiting -= 1
        self.num_running += 1
        try:
            if params.get("do_remote_prefill"):
                self._count("vllm:nixl_xfer_time_seconds_count")
            else:
                await asyncio.sleep(self.prefill_s_per_1k * num_prompt / 1000)
            self._count("vllm:prompt_tokens_total", num_prompt)
            if params.get("do_remote_decode"):
                yield JsonReply(self._reply(req, [], num_prompt) | {"kv_transfer_params": self._handoff(num_prompt)})
                return
            count = body.get("max_completion_tokens") or body.get("max_tokens") or DEFAULT_MAX_TOKENS
            words = fake_words(prompt, int(count))
            if body.get("stream"):
                async for event in self._stream(req, words, num_prompt):
                    yield event
                return
            for _ in words:
                await self._step()
            yield JsonReply(self._reply(req, words, num_prompt))
        finally:
            self.num_running -= 1
            self._slots.release()

    async def _step(self) -> None:
        await asyncio.sleep(self.itl_s)
        self._count("vllm:generation_tokens_total")
        self._count("vllm:inter_token_latency_seconds_sum", self.itl_s)
        self._count("vllm:inter_token_latency_seconds_count")

    def _handoff(self, num_prompt: int) -> dict:
        return {"do_remote_prefill": True, "do_remote_decode": False, "remote_engine_id": self.spec.engine_id,
                "remote_request_id": uuid.uuid4().hex, "remote_block_ids": [list(range(1 + num_prompt // 16))],
                "remote_host": "127.0.0.1", "remote_port": 1, "tp_size": 1, "remote_num_tokens": num_prompt}

    def _base(self, req: PhaseRequest) -> dict:
        kind = "chat.completion" if req.endpoint == "chat" else "text_completion"
        return {"id": f"fake-{uuid.uuid4().hex}", "object": kind, "created": int(time.time()),
                "model": self.spec.served_model_name}

    def _choice(self, req: PhaseRequest, text: str, finish: str | None) -> dict:
        if req.endpoint == "chat":
            return {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish}
        return {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}

    @staticmethod
    def _usage(num_prompt: int, num_output: int) -> dict:
        return {"prompt_tokens": num_prompt, "completion_tokens": num_output, "total_tokens": num_prompt + num_output}

    def _reply(self, req: PhaseRequest, words: list[str], num_prompt: int) -> dict:
        usage = self._usage(num_prompt, len(words))
        return self._base(req) | {"choices": [self._choice(req, "".join(words), "length")], "usage": usage}

    async def _stream(self, req: PhaseRequest, words: list[str], num_prompt: int) -> AsyncIterator[str]:
        head = self._base(req) | {"object": "chat.completion.chunk" if req.endpoint == "chat" else "text_completion"}
        for i, word in enumerate(words):
            await self._step()
            finish = "length" if i == len(words) - 1 else None
            choice = ({"index": 0, "delta": {"content": word}, "finish_reason": finish} if req.endpoint == "chat"
                      else {"index": 0, "text": word, "logprobs": None, "finish_reason": finish})
            yield f"data: {json.dumps(head | {'choices': [choice]})}\n\n"
        if (req.body.get("stream_options") or {}).get("include_usage"):
            usage = self._usage(num_prompt, len(words))
            yield f"data: {json.dumps(head | {'choices': [], 'usage': usage}, separators=(',', ':'))}\n\n"
        yield "data: [DONE]\n\n"

    def load(self) -> dict:
        return {"num_running": self.num_running, "num_waiting": self.num_waiting,
                "kv_cache_usage": min(1.0, self.num_running / self.spec.engine.max_num_seqs), "itl_s": self.itl_s}

    def stats(self, replica: str, node: str = "") -> EngineStats:
        values = self.counters | {"vllm:num_requests_running": self.num_running,
                                  "vllm:num_requests_waiting": self.num_waiting,
                                  "vllm:kv_cache_usage_perc": self.load()["kv_cache_usage"]}
        return EngineStats(replica=replica, role=self.spec.role, pid=os.getpid(), node=node,
                           kv_fingerprint=self.kv_fingerprint, values=values)
