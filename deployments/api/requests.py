"""A client's request, checked at the ingress before any replica sees it.

The ingress does not import vLLM: the engine validates the body against vLLM's own request models and answers
4xx for what vLLM refuses. What is checked here is what pdserve owns: fields only pdserve may set, the limits
of ``LimitSettings``, the model name, and the plain facts routing needs (prompt size and prefix, whether the
KV hand-off can carry the request). Every check is a pure function of the body.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from ..kv import internal_fields_in, not_transferable
from ..replies import ErrorReply
from ..routing.policies import prefix_key
from ..settings import LimitSettings

Endpoint = str  # "chat" | "completions"


@dataclass(frozen=True)
class ClientRequest:
    endpoint: Endpoint
    body: dict  # the client's JSON object, never modified
    num_prompt_tokens: int  # an estimate, before tokenization
    prefix_key: str
    not_transferable: str | None  # why the KV hand-off cannot carry it, or None


def prompt_text(body: dict) -> str:
    """The prompt's text, whatever shape the client sent (malformed parts count as nothing: vLLM refuses them)."""
    messages = body.get("messages")
    if isinstance(messages, list):
        parts: list[str] = []
        for m in messages:
            content = m.get("content") if isinstance(m, dict) else None
            if isinstance(content, str):
                parts.append(content)
            elif isinstance(content, list):
                parts += [p["text"] for p in content if isinstance(p, dict) and isinstance(p.get("text"), str)]
        return "\n".join(parts)
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list):
        return " ".join(p if isinstance(p, str) else str(p) for p in prompt)
    return ""


def estimate_prompt_tokens(body: dict) -> int:
    """Token ids count as themselves; text at ~4 characters per token: enough to tell 20 tokens from 2,000."""
    prompt = body.get("prompt")
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt):
        return len(prompt)
    if isinstance(prompt, list) and prompt and all(isinstance(p, list) for p in prompt):
        return sum(len(p) for p in prompt)
    return max(1, len(prompt_text(body)) // 4)


def parse_json(raw: bytes):
    """The JSON document, or the 400 that refuses it. Python's parser accepts escaped lone surrogates
    (``"\\ud800"``), which are not text: they would fail later, in hashing or tokenizing, as a server error."""
    try:
        body = json.loads(raw)
        json.dumps(body, ensure_ascii=False).encode()
    except UnicodeError:
        return ErrorReply(400, "malformed JSON body: not valid Unicode text (a lone surrogate escape?)")
    except (ValueError, RecursionError):
        return ErrorReply(400, "malformed JSON body")
    return body


def _int(body: dict, name: str) -> int | None:
    value = body.get(name)
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def check_limits(endpoint: Endpoint, body: dict, limits: LimitSettings, max_model_len: int) -> ErrorReply | None:
    """pdserve's caps, each a 400 naming the field and the limit."""
    for name in ("n", "best_of"):
        value = _int(body, name)
        if value is not None and value > limits.max_n:
            return ErrorReply(400, f"{name} must be at most {limits.max_n}, got {value}", param=name)
    for name in ("logprobs", "top_logprobs", "prompt_logprobs"):
        value = _int(body, name)
        if value is not None and value > limits.max_logprobs:
            return ErrorReply(400, f"{name} must be at most {limits.max_logprobs}, got {value}", param=name)
    for name in ("stop", "stop_token_ids"):
        value = body.get(name)
        if isinstance(value, list) and len(value) > limits.max_stop_sequences:
            return ErrorReply(400, f"{name} may hold at most {limits.max_stop_sequences} entries, got {len(value)}",
                              param=name)
    prompt = body.get("prompt")
    if endpoint == "completions" and isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)) \
            and len(prompt) > limits.max_prompts:
        return ErrorReply(400, f"prompt may hold at most {limits.max_prompts} prompts, got {len(prompt)}",
                          param="prompt")
    messages = body.get("messages")
    if isinstance(messages, list) and len(messages) > limits.max_messages:
        return ErrorReply(400, f"messages may hold at most {limits.max_messages} messages, got {len(messages)}",
                          param="messages")
    for name in ("max_tokens", "max_completion_tokens"):
        value = _int(body, name)
        if value is not None and value > max_model_len:
            return ErrorReply(400, f"{name} ({value}) exceeds this model's maximum context length ({max_model_len})",
                              param=name)
    return None


def inspect(endpoint: Endpoint, body, model: str, limits: LimitSettings,
            max_model_len: int) -> ClientRequest | ErrorReply:
    """The request as routing sees it, or the client error (4xx) that refuses it."""
    if not isinstance(body, dict):
        return ErrorReply(400, "request body must be a JSON object")
    if body.get("model", model) != model:
        name = body.get("model")
        shown = name if isinstance(name, str) and len(name) <= 256 else "(invalid)"
        return ErrorReply(404, f"The model `{shown}` does not exist; this server serves `{model}`.",
                          "NotFoundError", "model")
    internal = internal_fields_in(body)
    if internal:
        return ErrorReply(400, f"field(s) reserved for the server: {', '.join(internal)}", param=internal[0])
    if endpoint == "chat" and not isinstance(body.get("messages"), list):
        return ErrorReply(400, "messages: a list of messages is required", param="messages")
    if endpoint == "completions" and not isinstance(body.get("prompt"), (str, list)):
        return ErrorReply(400, "prompt: a string, a list of strings or a list of token ids is required",
                          param="prompt")
    refused = check_limits(endpoint, body, limits, max_model_len)
    if refused is not None:
        return refused
    return ClientRequest(endpoint=endpoint, body=body, num_prompt_tokens=estimate_prompt_tokens(body),
                         prefix_key=prefix_key(prompt_text(body)), not_transferable=not_transferable(endpoint, body))
