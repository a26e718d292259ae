"""The KV hand-off protocol: the prefill request and the decode request, shaped side by side from the client's.

Both are copies; the client's body is never changed. The prefill request computes the prompt's KV and one
token for a remote decode engine, so everything about the *output* is dropped or reset (one token, one
sequence, no logprobs, no streaming, no structured output); everything that shapes the *prompt* (messages,
chat template, tools, special tokens, truncation, cache salt) is kept, so that both engines tokenize the
prompt identically. The decode request is the client's request plus the typed hand-off.

Only requests whose output the hand-off can carry are disaggregated: one prompt, one sequence, no beam search,
no echo, no prompt logprobs (the decode engine does not compute the prompt when it pulls its KV). Others are
prefilled on the decode replica, exactly as in colocated mode.

``kv_transfer_params`` and ``ec_transfer_params`` are pdserve's to set: a client that sends them, at the top
level or inside ``vllm_xargs`` (which vLLM merges into the same engine-side dictionary), is refused.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

from .handoff import Handoff

INTERNAL_FIELDS = frozenset({"kv_transfer_params", "ec_transfer_params"})
# The request fields that ask for structured output (a spec the engine compiles into a grammar).
STRUCTURED_OUTPUT_FIELDS = ("structured_outputs", "response_format", "tools", "guided_json", "guided_regex",
                            "guided_grammar", "guided_choice", "structural_tag")

# Output-side fields a prefill-only run must not inherit (e.g. min_tokens > max_tokens=1 is refused by vLLM).
_PREFILL_DROPS = frozenset({
    "n", "best_of", "min_tokens", "use_beam_search", "length_penalty", "logprobs", "top_logprobs", "prompt_logprobs",
    "echo", "stream", "stream_options", "response_format", "structured_outputs", "max_completion_tokens",
    "logprob_token_ids", "thinking_token_budget", "repetition_detection", "stream_interval", "min_p",
    "bad_words", "allowed_token_ids", "logit_bias", "stop", "stop_token_ids", "include_stop_str_in_output",
})


def internal_fields_in(body: dict) -> list[str]:
    """Where a client body carries fields only pdserve may set, as dotted paths."""
    found = [name for name in sorted(INTERNAL_FIELDS) if name in body]
    xargs = body.get("vllm_xargs")
    if isinstance(xargs, dict):
        found += [f"vllm_xargs.{name}" for name in sorted(INTERNAL_FIELDS) if name in xargs]
    return found


def _num_prompts(prompt) -> int:
    """A completions ``prompt``: a string, a list of token ids (one prompt each), or a list of either (many)."""
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
        return len(prompt)
    return 1


def not_transferable(endpoint: str, body: dict) -> str | None:
    """Why the hand-off cannot carry this request (it is then prefilled locally), or None if it can."""
    if endpoint == "completions" and _num_prompts(body.get("prompt")) > 1:
        return "several prompts"
    n = body.get("n")
    if isinstance(n, int) and n > 1:
        return "n > 1"
    best_of = body.get("best_of")
    if isinstance(best_of, int) and best_of > 1:
        return "best_of > 1"
    if body.get("use_beam_search"):
        return "beam search"
    if body.get("echo"):
        return "echo"
    if body.get("prompt_logprobs") is not None:
        return "prompt logprobs"
    return None


# ``kv_transfer_params`` of a prefill request: produce KV for a remote decode engine.
_PRODUCE_KV = {"do_remote_decode": True, "do_remote_prefill": False, "remote_engine_id": None,
               "remote_block_ids": None}


@dataclass(frozen=True)
class PhaseRequest:
    """What one engine runs: the endpoint, a request body of its own, and what pdserve attaches: an order to
    produce the prompt's KV for a remote decode engine (prefill), or the hand-off to pull it from (decode)."""

    endpoint: str
    body: dict
    produce_kv: bool = False
    handoff: Handoff | None = None

    @property
    def kv_transfer_params(self) -> dict | None:
        """What the engine gives vLLM's KV connector for this request (None: nothing moves)."""
        if self.produce_kv:
            return dict(_PRODUCE_KV)
        return self.handoff.for_engine() if self.handoff else None


def prefill_request(endpoint: str, body: dict) -> PhaseRequest:
    shaped = {k: copy.deepcopy(v) for k, v in body.items() if k not in _PREFILL_DROPS}
    shaped["max_tokens"] = 1
    return PhaseRequest(endpoint, shaped, produce_kv=True)


def decode_request(endpoint: str, body: dict, handoff: Handoff | None = None) -> PhaseRequest:
    return PhaseRequest(endpoint, copy.deepcopy(body), handoff=handoff)
