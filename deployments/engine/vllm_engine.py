"""The only module that imports vLLM: one async vLLM engine plus vLLM's own OpenAI serving layer.

A replica (prefill, decode or colocated) owns one ``VLLMEngine``. Requests arrive as the client's JSON body;
they are validated into vLLM's protocol models, run through vLLM's ``OpenAIServingChat`` /
``OpenAIServingCompletion`` (chat templates, SSE chunk format and usage come from vLLM), and come back as
``JsonReply``, ``ErrorReply`` or SSE strings.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from pydantic import ValidationError

from ..kv import Handoff, PhaseRequest, PullDeadline, internal_fields_in
from ..outcomes import Failure
from ..replies import EngineStats, ErrorReply, HandoffFailed, JsonReply, PullRecomputed
from ..roles import ROLES, Role
from ..settings import EngineSettings, KVConnectorSettings
from .coalesce import coalesced
from .structured import StructuredOutputGate

logger = logging.getLogger("ray.serve.pdserve.engine")  # under Serve's logger: lands in the replica log

Endpoint = Literal["chat", "completions"]


@dataclass
class EngineSpec:
    """Everything one engine needs: the resolved model, its role and settings, and its process env."""

    model: str
    served_model_name: str
    role: Role
    engine: EngineSettings
    kv_connector: KVConnectorSettings
    engine_id: str
    num_gpus: float = 0
    kv_lease_s: int = 30
    kv_pull_timeout_s: float = 10  # the pull deadline's upper bound (pull_deadline.cap_s)
    pull_deadline: PullDeadline = field(default_factory=PullDeadline)
    env: dict[str, str] = field(default_factory=dict)
    structured_output_compile_timeout_s: float = 5  # limits.structured_output_compile_timeout_s

    def cli_args(self) -> list[str]:
        e = self.engine
        args = [
            "--model", self.model, "--served-model-name", self.served_model_name, "--dtype", e.dtype,
            "--max-model-len", str(e.max_model_len), "--max-num-seqs", str(e.max_num_seqs),
            "--enable-prefix-caching" if e.enable_prefix_caching else "--no-enable-prefix-caching",
        ]
        if e.tensor_parallel_size > 1:
            args += ["--tensor-parallel-size", str(e.tensor_parallel_size)]
        if e.block_size is not None:
            args += ["--block-size", str(e.block_size)]
        if e.max_num_batched_tokens is not None:
            args += ["--max-num-batched-tokens", str(e.max_num_batched_tokens)]
        if e.enforce_eager:
            args.append("--enforce-eager")
        args.append("--enable-per-request-metrics")  # engine TTFT in non-streaming responses (timing breakdown)
        if self.num_gpus > 0:
            args += ["--gpu-memory-utilization", str(e.gpu_memory_utilization)]
        if ROLES[self.role].kv_role is not None:
            kv = self.kv_connector
            args += ["--kv-transfer-config", json.dumps({
                "kv_connector": kv.connector, "kv_role": ROLES[self.role].kv_role,
                "kv_buffer_device": kv.kv_buffer_device,
                "engine_id": self.engine_id, "kv_load_failure_policy": kv.kv_load_failure_policy,
                # vLLM's own handshake check hashes the model's *path*, which differs between nodes that hold the
                # same model in different folders; pdserve checks kv_fingerprint (by content) before each pull.
                "kv_connector_extra_config": {"kv_lease_duration": self.kv_lease_s, "enforce_handshake_compat": False},
            })]
        return args + list(e.extra_args)


def kv_fingerprint(model: str, layout: dict) -> str:
    """What must match between a prefill and a decode engine for KV blocks to move between them: the KV layout
    and the model *by content* (a local folder: its config and weight files' names and sizes; else its name), so
    that the same model in different folders on different nodes matches and another model does not."""
    folder = Path(model)
    if folder.is_dir():
        files = sorted(p for p in folder.iterdir() if p.suffix in (".safetensors", ".bin", ".gguf"))
        config = (folder / "config.json").read_bytes() if (folder / "config.json").exists() else b""
        identity = {"config": hashlib.sha256(config).hexdigest(),
                    "weights": [(p.name, p.stat().st_size) for p in files]}
    else:
        identity = {"name": model}
    blob = json.dumps({"model": identity, "layout": layout}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


class KVPullTimeout(RuntimeError):
    pass


@dataclass
class PullOutcome:
    """What became of one request's KV pull, recorded for the request that ran it (``VLLMEngine.generate`` sets
    one per request in ``PULL``; vLLM's serving layer calls the engine client within that request's context)."""

    handoff: Handoff | None = None  # the request's hand-off: the KV to pull (None: nothing to pull)
    timed_out: bool = False  # no first output within the pull deadline: the generation was cancelled
    recomputed: tuple[int, int] | None = None  # the pull failed inside vLLM: (prompt tokens, tokens not computed)


PULL: ContextVar[PullOutcome | None] = ContextVar("pdserve_kv_pull", default=None)


MEASURE_INTERVAL_S = 1.0


class _KVPullDeadline:
    """The engine client handed to vLLM's serving layer, with one addition: a generation that pulls its
    prompt's KV from a prefill engine must produce its first output within its pull deadline (``PullDeadline``:
    from the bytes to move, the pull speed this engine measured, and whether it knows that prefill engine yet).
    vLLM has no deadline of its own there: a frozen prefill engine would hang the request. On timeout the
    generation is cancelled (vLLM aborts the request); the request's ``PullOutcome`` says so, or that the pull
    failed inside vLLM and the prompt was recomputed."""

    def __init__(self, client, deadline: PullDeadline, kv_bytes_per_block: int, read_stats, block_size: int = 1):
        self._client, self._deadline, self._kv_bytes_per_block = client, deadline, kv_bytes_per_block
        self._block_size = block_size
        self._read_stats = read_stats  # () -> {"vllm:...": value}: this engine's own counters
        self.known_engines: set[str] = set()  # prefill engines this engine pulled from (handshake done)
        self.bytes_per_s: float | None = None  # measured pull speed (NIXL's bytes / transfer time)
        self._seen = (0.0, 0.0)
        self._measured_at = float("-inf")  # monotonic: reading the registry walks every metric, so at most 1/s

    def __getattr__(self, name):
        return getattr(self._client, name)

    def generate(self, prompt, sampling_params, request_id, *args, **kwargs):
        stream = self._client.generate(prompt, sampling_params, request_id, *args, **kwargs)
        outcome = PULL.get()  # the request's own, set by VLLMEngine.generate
        if outcome is None or outcome.handoff is None:
            return stream
        handoff = outcome.handoff
        timeout_s = handoff.pull_timeout_s(self._deadline, self._kv_bytes_per_block, self.bytes_per_s,
                                           self.known_engines)
        return self._first_output_deadline(stream, outcome, timeout_s, handoff.remote_engine_id)

    async def _first_output_deadline(self, stream, outcome: PullOutcome, timeout_s: float, remote_engine: str):
        try:
            first = await asyncio.wait_for(anext(stream), timeout_s)
        except TimeoutError:
            outcome.timed_out = True
            raise KVPullTimeout(f"KV pull from the prefill engine timed out after {timeout_s:.1f} s") from None
        if self._pull_delivered(first, outcome):
            self.known_engines.add(remote_engine)
            self._measure()
        yield first
        async for output in stream:
            yield output

    def _pull_delivered(self, first, outcome: PullOutcome) -> bool:
        """Whether the KV arrived: vLLM counts pulled tokens as cached. A pull that failed inside vLLM (handshake
        or transfer error, ``kv_load_failure_policy: recompute``) leaves only local prefix-cache hits, so at least
        one full block of the prompt was computed here."""
        prompt, cached = len(getattr(first, "prompt_token_ids", None) or []), getattr(first, "num_cached_tokens", None)
        if not prompt or cached is None or cached >= prompt - self._block_size:
            return True
        outcome.recomputed = (prompt, cached)
        return False

    def _measure(self) -> None:
        """Pull speed from NIXL's own stats of this engine: bytes over transfer time since the last look. Not on
        every pull: the counters accumulate, so one look a second measures the same speed at a fraction of the cost."""
        if time.monotonic() - self._measured_at < MEASURE_INTERVAL_S:
            return
        self._measured_at = time.monotonic()
        v = self._read_stats()
        now = (v.get("vllm:nixl_bytes_transferred_sum", 0.0), v.get("vllm:nixl_xfer_time_seconds_sum", 0.0))
        moved, took = now[0] - self._seen[0], now[1] - self._seen[1]
        if moved > 0 and took > 0:
            speed = moved / took
            self.bytes_per_s = speed if self.bytes_per_s is None else 0.7 * self.bytes_per_s + 0.3 * speed
            self._seen = now


class RecentMean:
    """The mean of a histogram's observations since the previous reading, from its running ``_sum`` and ``_count``
    (0 when nothing was observed in between)."""

    def __init__(self) -> None:
        self._last = (0.0, 0.0)

    def update(self, total: float, count: float) -> float:
        d_total, d_count = total - self._last[0], count - self._last[1]
        self._last = (total, count)
        return d_total / d_count if d_count > 0 else 0.0


class VLLMEngine:
    def __init__(self, spec: EngineSpec):
        self.spec = spec
        self._stack = AsyncExitStack()
        self._client = None
        self._serving: dict[str, object] = {}
        self._request_models: dict[str, type] = {}
        self.kv_fingerprint = ""
        self._itl = RecentMean()
        self._structured = StructuredOutputGate(spec.structured_output_compile_timeout_s)

    async def start(self) -> None:
        os.environ.update(self.spec.env)
        from starlette.datastructures import State
        from vllm.entrypoints.launchers.api_server.app_state import init_app_state
        from vllm.entrypoints.launchers.cli_args import make_arg_parser, validate_parsed_serve_args
        from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
        from vllm.entrypoints.openai.completion.protocol import CompletionRequest
        from vllm.utils.argparse_utils import FlexibleArgumentParser

        args = make_arg_parser(FlexibleArgumentParser()).parse_args(self.spec.cli_args())
        validate_parsed_serve_args(args)
        real_client = await self._start_client(args)
        self._client = _KVPullDeadline(real_client, self.spec.pull_deadline, self.kv_bytes_per_block,
                                       lambda: self.stats("").values, self.block_size)
        state = State()
        await init_app_state(self._client, state, args, supported_tasks=await self._client.get_supported_tasks())
        self._serving = {"chat": state.openai_serving_chat, "completions": state.openai_serving_completion}
        self._request_models = {"chat": ChatCompletionRequest, "completions": CompletionRequest}
        self._max_model_len = self._client.model_config.max_model_len
        self._structured.install()

    async def _start_client(self, args):
        """vLLM's async engine with two stat loggers: Ray's, which publishes the engine's ``vllm:*`` metrics on
        the node's scrape target labelled with this replica, and the in-process Prometheus one that ``stats()``
        reads for routing. (Order matters: the second one clears the in-process registry first.)"""
        from vllm import __version__ as vllm_version
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.usage.usage_lib import UsageContext
        from vllm.v1.engine.async_llm import AsyncLLM
        from vllm.v1.metrics.loggers import PrometheusStatLogger
        from vllm.v1.metrics.ray_wrappers import RayPrometheusStatLogger

        engine_args = AsyncEngineArgs.from_cli_args(args)
        vllm_config = engine_args.create_engine_config(usage_context=UsageContext.OPENAI_API_SERVER)
        client = AsyncLLM.from_vllm_config(
            vllm_config=vllm_config, usage_context=UsageContext.OPENAI_API_SERVER,
            stat_loggers=[RayPrometheusStatLogger, PrometheusStatLogger],
            enable_log_requests=engine_args.enable_log_requests, disable_log_stats=engine_args.disable_log_stats,
        )
        self._stack.callback(client.shutdown)
        mc, pc = vllm_config.model_config, vllm_config.parallel_config
        self.kv_bytes_per_token = (2 * mc.get_num_layers(pc) * mc.get_num_kv_heads(pc) * mc.get_head_size()
                                   * mc.dtype.itemsize)
        self.block_size = vllm_config.cache_config.block_size
        self.kv_bytes_per_block = self.kv_bytes_per_token * self.block_size
        self.kv_fingerprint = kv_fingerprint(mc.model, {
            "vllm": vllm_version, "dtype": str(mc.dtype), "kv_cache_dtype": str(vllm_config.cache_config.cache_dtype),
            "block_size": vllm_config.cache_config.block_size, "num_layers": mc.get_num_layers(pc),
            "num_kv_heads": mc.get_num_kv_heads(pc), "head_size": mc.get_head_size(),
            "tp_size": pc.tensor_parallel_size})
        return client

    async def shutdown(self) -> None:
        await self._stack.aclose()

    async def check_health(self) -> None:
        await self._client.check_health()

    def validate(self, endpoint: Endpoint, body: dict):
        """Parse a client body into vLLM's request model, or return an ``ErrorReply`` (HTTP 4xx)."""
        model_cls = self._request_models[endpoint]
        known = set(model_cls.model_fields) | {f.alias for f in model_cls.model_fields.values() if f.alias}
        unknown = sorted(set(body) - known)
        if unknown:
            return ErrorReply(400, f"unknown or unsupported field(s): {', '.join(unknown)}", param=unknown[0])
        internal = internal_fields_in(body)  # the ingress refuses these already; an engine never trusts them
        if internal:
            return ErrorReply(400, f"field(s) reserved for the server: {', '.join(internal)}", param=internal[0])
        try:
            request = model_cls.model_validate(body)
        except ValidationError as exc:
            err = exc.errors()[0]
            where = ".".join(str(p) for p in err["loc"]) or None
            return ErrorReply(400, f"invalid request: {where}: {err['msg']}", param=where)
        except Exception as exc:  # vLLM's own validators raise VLLMValidationError past pydantic: the client's fault
            return ErrorReply(400, f"invalid request: {exc}", param=getattr(exc, "parameter", None))
        max_tokens = getattr(request, "max_completion_tokens", None) or request.max_tokens
        if max_tokens is not None and max_tokens > self._max_model_len:
            return ErrorReply(
                400, f"max_tokens ({max_tokens}) exceeds this model's maximum context length ({self._max_model_len})",
                param="max_tokens",
            )
        return request

    async def generate(self, req: PhaseRequest) -> AsyncIterator[JsonReply | ErrorReply | HandoffFailed | str]:
        """Run one request; yields one JsonReply/ErrorReply, or SSE strings when the client asked to stream.

        ``req.kv_transfer_params``: for a prefill-only request (shaped by ``kv.prefill_request``), produce the
        prompt's KV for a remote decode engine; for a decode request, the hand-off: pull the KV instead of
        recomputing the prompt. A pull that misses its deadline yields ``HandoffFailed`` (nothing sent yet).
        """
        request = self.validate(req.endpoint, req.body)
        if isinstance(request, ErrorReply):
            yield request
            return
        serving = self._serving[req.endpoint]
        if refused := await self._structured.precheck(request, serving):
            yield refused
            return
        if (kv_params := req.kv_transfer_params) is not None:  # produce KV for a decode engine, or pull it
            request.kv_transfer_params = kv_params
        request.request_id = uuid.uuid4().hex
        PULL.set(pull := PullOutcome(handoff=req.handoff))  # this request's context: the engine client records here
        create = serving.create_chat_completion if req.endpoint == "chat" else serving.create_completion
        try:
            result = await create(request, raw_request=None)
        except Exception as exc:  # vLLM raises ValueError / VLLMClientError for bad input
            result = serving.create_error_response(exc)
        if isinstance(result, AsyncIterator):
            try:
                first = await anext(result)
            except StopAsyncIteration:
                return
            except Exception as exc:  # refused while starting the stream (vLLM validates lazily): nothing sent yet
                result = serving.create_error_response(exc)
            else:
                if pull.timed_out:
                    yield HandoffFailed(Failure.KV_PULL_TIMEOUT)
                    return
                if pull.recomputed:
                    yield PullRecomputed(*pull.recomputed)
                yield first
                async for chunks in coalesced(result):  # what piled up while the handle was busy goes as one
                    yield chunks
                return
        if pull.timed_out:
            yield HandoffFailed(Failure.KV_PULL_TIMEOUT)
            return
        if pull.recomputed:
            yield PullRecomputed(*pull.recomputed)
        yield self._reply(result)

    @staticmethod
    def _reply(result) -> JsonReply | ErrorReply:
        """A whole (non-streamed) answer of vLLM's serving layer: the response, or its error."""
        payload = result.model_dump(mode="json", exclude_none=False)
        if "error" in payload and "choices" not in payload:
            err = payload["error"]
            return ErrorReply(int(err.get("code") or 500), err.get("message", "engine error"),
                              err.get("type") or "InternalServerError", err.get("param"))
        return JsonReply(payload)

    def load(self) -> dict:
        """The engine's own queue and KV gauges, for routing, and the mean gap between the output tokens it streamed
        since the last call (the routing stats period): what its streams see now."""
        v = self.stats("").values
        return {"num_running": int(v.get("vllm:num_requests_running", 0)),
                "num_waiting": int(v.get("vllm:num_requests_waiting", 0)),
                "kv_cache_usage": float(v.get("vllm:kv_cache_usage_perc", 0.0)),
                "itl_s": self._itl.update(v.get("vllm:inter_token_latency_seconds_sum", 0.0),
                                          v.get("vllm:inter_token_latency_seconds_count", 0.0)),
                "kv_pull_tokens_per_s": self._pull_tokens_per_s()}

    def _pull_tokens_per_s(self) -> float:
        """The KV pull speed NIXL measured on this engine, in prompt tokens per second (0: no pull yet)."""
        bytes_per_s = getattr(self._client, "bytes_per_s", None) or 0.0
        return bytes_per_s / max(1, getattr(self, "kv_bytes_per_token", 0)) if bytes_per_s else 0.0

    def stats(self, replica: str, node: str = "") -> EngineStats:
        """Sum of each ``vllm:*`` sample of this process's Prometheus registry (the engine's own stat logger)."""
        from prometheus_client import REGISTRY

        values: dict[str, float] = {}
        for metric in REGISTRY.collect():
            if not metric.name.startswith("vllm:"):
                continue
            for sample in metric.samples:
                if sample.name.endswith(("_created", "_bucket")):
                    continue
                values[sample.name] = values.get(sample.name, 0.0) + float(sample.value)
        return EngineStats(replica=replica, role=self.spec.role, pid=os.getpid(), node=node,
                           kv_fingerprint=self.kv_fingerprint, values=values)
