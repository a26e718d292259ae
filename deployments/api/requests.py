"""A client's request, checked at the ingress before any replica sees it.

The ingress does not import vLLM: the engine validates the body against vLLM's own request models and answers
4xx for what vLLM refuses. What is checked here is what pdserve owns: fields only pdserve may set, the limits
of ``LimitSettings``, the model name, and the plain facts routing needs (prompt size and prefix, whether the
KV hand-off can carry the request). Every check is a pure function of the body.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from ..kv import STRUCTURED_OUTPUT_FIELDS, internal_fields_in, not_transferable
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


def parse_json(raw: bytes, limits: LimitSettings = LimitSettings()):  # noqa: B008 (frozen)
    """The JSON document, or the 400 that refuses it. Python's parser accepts escaped lone surrogates
    (``"\\ud800"``), which are not text: they would fail later, in hashing or tokenizing, as a server error. Nesting
    and size past ``limits`` are refused here, before any code walks the document recursively."""
    try:
        body = json.loads(raw)
    except UnicodeError:
        return ErrorReply(400, "malformed JSON body: not valid Unicode text (a lone surrogate escape?)")
    except (ValueError, RecursionError):
        return ErrorReply(400, "malformed JSON body")
    shape = _shape_error(body, limits)
    if shape is not None:
        return shape
    try:
        json.dumps(body, ensure_ascii=False).encode()
    except UnicodeError:
        return ErrorReply(400, "malformed JSON body: not valid Unicode text (a lone surrogate escape?)")
    return body


def _shape_error(doc, limits: LimitSettings) -> ErrorReply | None:
    """Depth and value count of a parsed document, walked without recursion."""
    stack, count = [(doc, 1)], 0
    while stack:
        value, depth = stack.pop()
        count += 1
        if depth > limits.max_json_depth:
            return ErrorReply(400, f"JSON body nested deeper than {limits.max_json_depth} levels")
        if count > limits.max_json_values:
            return ErrorReply(400, f"JSON body holds more than {limits.max_json_values} values")
        if isinstance(value, dict):
            stack.extend((v, depth + 1) for v in value.values())
        elif isinstance(value, list):
            stack.extend((v, depth + 1) for v in value)
    return None


# Integer fields and their cap: 'n' (a LimitSettings field), 'ctx' (the model's context length). vLLM would coerce
# "64", 64.0 and true into ints; pdserve refuses anything but a JSON integer, so that every cap reads the number
# vLLM will use. Chat's ``logprobs`` is a boolean there (its count is ``top_logprobs``).
_INT_FIELDS = {"n": "max_n", "best_of": "max_n", "logprobs": "max_logprobs", "top_logprobs": "max_logprobs",
               "prompt_logprobs": "max_logprobs", "max_tokens": "ctx", "max_completion_tokens": "ctx",
               "min_tokens": "ctx"}


def _int_field_error(endpoint: Endpoint, body: dict, limits: LimitSettings, max_model_len: int) -> ErrorReply | None:
    for name, cap_name in _INT_FIELDS.items():
        value = body.get(name)
        if value is None or (name == "logprobs" and endpoint == "chat" and isinstance(value, bool)):
            continue
        if not isinstance(value, int) or isinstance(value, bool):
            return ErrorReply(400, f"{name} must be an integer, got {type(value).__name__}", param=name)
        cap = max_model_len if cap_name == "ctx" else getattr(limits, cap_name)
        if value > cap:
            what = f"this model's maximum context length ({cap})" if cap_name == "ctx" else f"the limit {cap}"
            return ErrorReply(400, f"{name} ({value}) exceeds {what}", param=name)
        if cap_name == "max_logprobs" and value < 0:  # vLLM reads -1 as 'the whole vocabulary'
            return ErrorReply(400, f"{name} must be between 0 and {cap}, got {value}", param=name)
    return None


def _structured_output_error(body: dict, limits: LimitSettings) -> ErrorReply | None:
    """Structured-output specs are compiled into grammars by the engine: their size bounds that work."""
    for name in STRUCTURED_OUTPUT_FIELDS:
        value = body.get(name)
        if value is None:
            continue
        size = len(json.dumps(value, ensure_ascii=False))
        if size > limits.max_structured_output_bytes:
            return ErrorReply(400, f"{name} is {size} bytes of JSON; at most {limits.max_structured_output_bytes}",
                              param=name)
    spec = body.get("structured_outputs")
    choices = [body.get("guided_choice"), spec.get("choice") if isinstance(spec, dict) else None]
    for choice in choices:
        if isinstance(choice, list) and len(choice) > limits.max_choices:
            return ErrorReply(400, f"structured output choices: at most {limits.max_choices}, got {len(choice)}",
                              param="structured_outputs")
    return None


def _token_prompt_error(endpoint: Endpoint, body: dict, max_model_len: int) -> ErrorReply | None:
    """A prompt of token ids longer than the model takes is refused before any engine reads it."""
    prompt = body.get("prompt") if endpoint == "completions" else None
    if not isinstance(prompt, list) or not prompt:
        return None
    prompts = [prompt] if all(isinstance(t, int) for t in prompt) else [p for p in prompt if isinstance(p, list)]
    longest = max((len(p) for p in prompts), default=0)
    if longest > max_model_len:
        return ErrorReply(400, f"prompt of {longest} tokens exceeds this model's maximum context length "
                               f"({max_model_len})", param="prompt")
    return None


def check_limits(endpoint: Endpoint, body: dict, limits: LimitSettings, max_model_len: int) -> ErrorReply | None:
    """pdserve's caps, each a 400 naming the field and the limit."""
    refused = _int_field_error(endpoint, body, limits, max_model_len)
    if refused is not None:
        return refused
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
    return _structured_output_error(body, limits) or _token_prompt_error(endpoint, body, max_model_len)


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
