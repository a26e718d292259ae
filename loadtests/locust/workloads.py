"""Workload profiles: prompts generated locally from a seed (no downloads), or read from a JSONL file.

Prompt ``i`` of a profile depends only on (seed, profile, i), so a run is reproducible whatever the order in which
concurrent requests draw their prompts. Sizes are estimated at 4 characters per token; the SmolLM2 tokenizer
counts ~4.8 on this text, so real prompts are ~17% shorter than estimated (a margin below max_model_len).

Profiles:
- ``chat``: short prompts (16-160 tokens), medium answers (64-256 tokens);
- ``rag``: long prompts (1,200-1,900 tokens of documents and a question), short answers (16-64 tokens);
- ``mixed``: chat and rag requests at once (``rag_share`` of them rag): long prefills interfere with decodes;
- ``long``: prompts spread evenly over ~80-1,500 real tokens (mean ~800), answers of 64 tokens: every request
  but the shortest is a long prefill, as in ``vllm bench serve``'s random dataset at those sizes; where elastic
  roles pull KV onto engines that also prefill locally;
- ``prefix``: requests sharing one of ``num_prefixes`` long prefixes (1,200-1,500 tokens), each with its own
  short question, answers of 32-128 tokens;
- ``jsonl``: the prompts of a user-supplied file, in order, cycled.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

CHARS_PER_TOKEN = 4
PROFILES = ("chat", "rag", "mixed", "long", "prefix", "jsonl")
ENDPOINTS = ("chat", "completions", "both")
ENDPOINT_PATHS = {"chat": "/chat/completions", "completions": "/completions"}
TEMPLATE_MARGIN_TOKENS = 64  # chat template and tokenizer slack kept free below max_model_len
DEFAULT_JSONL_MAX_TOKENS = 128

# (min, max) estimated tokens of the prompt and of the answer, per request category.
# ``long``: estimated 96-1,800 are ~80-1,500 real tokens (the estimate runs ~17% high on this text).
PROMPT_TOKENS = {"chat": (16, 160), "rag": (1200, 1900), "long": (96, 1800), "prefix_question": (16, 48),
                 "prefix": (1200, 1500)}
OUTPUT_TOKENS = {"chat": (64, 256), "rag": (16, 64), "long": (64, 64), "prefix": (32, 128)}

_NOUNS = ["valve", "pump", "bridge", "river", "station", "engine", "harbour", "library", "orchard", "tower",
          "market", "sensor", "turbine", "village", "glacier", "forest", "railway", "school", "bakery", "clinic"]
_ADJECTIVES = ["northern", "old", "copper", "quiet", "busy", "narrow", "frozen", "bright", "rusty", "new",
               "eastern", "wooden", "coastal", "small", "central"]
_VERBS = ["was repaired", "was inspected", "reported", "recorded", "lost power", "was expanded", "flooded",
          "reopened", "was measured", "doubled its output"]
_AFTERMATHS = ["and the crew wrote a long report", "so the town council met twice", "which surprised nobody",
               "although the weather stayed calm", "and the numbers rose by 12 percent", "after a week of rain",
               "while the old manager was away", "so the plan for next year changed"]
_MONTHS = ["January", "March", "May", "July", "September", "November"]
_QUESTIONS = ["Why did the {adj} {noun} change?", "What happened to the {adj} {noun} in {month}?",
              "Summarise what the {noun} records say.", "Which {noun} needs attention first, and why?",
              "Explain how the {adj} {noun} works to a new engineer.", "List three risks for the {noun}."]


class WorkloadError(ValueError):
    """A bad workload option or prompts file; the message says which and why."""


def estimate_tokens(text: str) -> int:
    return max(1, round(len(text) / CHARS_PER_TOKEN))


@dataclass(frozen=True)
class Prompt:
    """One request's prompt. ``category`` names its kind (chat, rag, prefix, jsonl): the locust event name."""

    category: str
    endpoint: str  # chat | completions
    text: str  # the user message of a chat request; the prompt of a completion (after ``system``)
    max_tokens: int
    system: str | None = None  # a shared long prefix: the system message of a chat request
    messages: tuple[dict, ...] | None = None  # verbatim chat messages (JSONL)

    def chat_messages(self) -> list[dict]:
        if self.messages is not None:
            return [dict(m) for m in self.messages]
        head = [{"role": "system", "content": self.system}] if self.system else []
        return head + [{"role": "user", "content": self.text}]

    def completion_prompt(self) -> str:
        if self.messages is not None:
            return "\n\n".join(str(m.get("content", "")) for m in self.messages)
        return f"{self.system}\n\n{self.text}" if self.system else self.text

    @property
    def num_estimated_tokens(self) -> int:
        return estimate_tokens(self.completion_prompt())


def request_body(prompt: Prompt, model: str, ignore_eos: bool = False) -> tuple[str, dict]:
    """The API path (under /v1) and the streaming OpenAI body of a prompt."""
    body: dict = {"model": model, "max_tokens": prompt.max_tokens, "stream": True,
                  "stream_options": {"include_usage": True}}
    if prompt.endpoint == "chat":
        body["messages"] = prompt.chat_messages()
    else:
        body["prompt"] = prompt.completion_prompt()
    if ignore_eos:
        body["ignore_eos"] = True
    return ENDPOINT_PATHS[prompt.endpoint], body


def _sentence(rng: random.Random) -> str:
    return (f"The {rng.choice(_ADJECTIVES)} {rng.choice(_NOUNS)} by the {rng.choice(_ADJECTIVES)} "
            f"{rng.choice(_NOUNS)} {rng.choice(_VERBS)} in {rng.choice(_MONTHS)}, {rng.choice(_AFTERMATHS)}.")


def passage(rng: random.Random, num_tokens: int) -> str:
    """Varied sentences of about ``num_tokens`` estimated tokens, cut at a word boundary."""
    num_chars = num_tokens * CHARS_PER_TOKEN
    parts: list[str] = []
    size = 0
    while size < num_chars:
        parts.append(_sentence(rng))
        size += len(parts[-1]) + 1
    text = " ".join(parts)[:num_chars]
    return text.rsplit(" ", 1)[0] if len(text) == num_chars and " " in text else text


def question(rng: random.Random) -> str:
    return rng.choice(_QUESTIONS).format(adj=rng.choice(_ADJECTIVES), noun=rng.choice(_NOUNS),
                                         month=rng.choice(_MONTHS))


def load_prompts_file(path: str | Path) -> list[dict]:
    """JSONL lines ``{"prompt": str}`` or ``{"messages": [{"role", "content"}, ...]}``, optional ``max_tokens``."""
    path = Path(path)
    if not path.is_file():
        raise WorkloadError(f"prompts file not found: {path}")
    items = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except ValueError as exc:
            raise WorkloadError(f"{path}:{lineno}: not valid JSON: {exc}") from None
        if not isinstance(item, dict):
            raise WorkloadError(f"{path}:{lineno}: each line must be a JSON object")
        has_prompt = isinstance(item.get("prompt"), str) and item["prompt"] != ""
        msgs = item.get("messages")
        has_messages = isinstance(msgs, list) and msgs and all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in msgs)
        if not (has_prompt or has_messages):
            raise WorkloadError(f"{path}:{lineno}: needs a non-empty \"prompt\" string or a \"messages\" list "
                                "of {\"role\", \"content\"} objects")
        max_tokens = item.get("max_tokens")
        if max_tokens is not None and (not isinstance(max_tokens, int) or isinstance(max_tokens, bool)
                                       or max_tokens < 1):
            raise WorkloadError(f"{path}:{lineno}: \"max_tokens\" must be a positive integer")
        items.append(item)
    if not items:
        raise WorkloadError(f"prompts file holds no prompts: {path}")
    return items


class Workload:
    """The prompts of a run: ``prompt(i)`` is the i-th request's prompt."""

    def __init__(self, profile: str = "chat", *, seed: int = 0, endpoint: str = "chat", max_tokens: int | None = None,
                 rag_share: float = 0.25, num_prefixes: int = 4, max_model_len: int = 2048,
                 prompts_file: str | Path | None = None):
        if profile not in PROFILES:
            raise WorkloadError(f"unknown profile {profile!r}; choose one of {', '.join(PROFILES)}")
        if endpoint not in ENDPOINTS:
            raise WorkloadError(f"unknown endpoint {endpoint!r}; choose one of {', '.join(ENDPOINTS)}")
        if max_tokens is not None and max_tokens < 1:
            raise WorkloadError(f"max_tokens must be >= 1, got {max_tokens}")
        if not 0.0 <= rag_share <= 1.0:
            raise WorkloadError(f"rag_share must be within [0, 1], got {rag_share}")
        if num_prefixes < 1:
            raise WorkloadError(f"num_prefixes must be >= 1, got {num_prefixes}")
        longest_output = max_tokens or max(hi for _, hi in OUTPUT_TOKENS.values())
        if max_model_len - TEMPLATE_MARGIN_TOKENS - longest_output < PROMPT_TOKENS["chat"][1]:
            raise WorkloadError(f"max_model_len {max_model_len} leaves no room for prompts of "
                                f"{PROMPT_TOKENS['chat'][1]} tokens and answers of {longest_output} tokens")
        if (profile == "jsonl") != (prompts_file is not None):
            raise WorkloadError("a prompts file (--prompts-file) goes with profile 'jsonl', and only with it")
        self.profile, self.seed, self.endpoint = profile, seed, endpoint
        self.max_tokens, self.rag_share, self.max_model_len = max_tokens, rag_share, max_model_len
        self.items = load_prompts_file(prompts_file) if prompts_file is not None else []
        self.prefixes = [self._prefix(k) for k in range(num_prefixes)] if profile == "prefix" else []

    def _rng(self, *key) -> random.Random:
        return random.Random("/".join(str(k) for k in (self.seed, self.profile, *key)))

    def _prefix(self, k: int) -> str:
        rng = self._rng("prefix", k)
        lo, hi = PROMPT_TOKENS["prefix"]
        return f"Reference manual {k} (edition {rng.randint(1, 9)}):\n" + passage(rng, rng.randint(lo, hi))

    def _output_tokens(self, rng: random.Random, category: str) -> int:
        lo, hi = OUTPUT_TOKENS[category]
        drawn = rng.randint(lo, hi)  # drawn even when overridden, so that prompts do not depend on max_tokens
        return self.max_tokens or drawn

    def _fit(self, num_tokens: int, max_tokens: int) -> int:
        """Cap a prompt so that prompt + answer stays below max_model_len."""
        return min(num_tokens, self.max_model_len - TEMPLATE_MARGIN_TOKENS - max_tokens)

    def prompt(self, index: int) -> Prompt:
        rng = self._rng(index)
        endpoint = self.endpoint if self.endpoint != "both" else rng.choice(("chat", "completions"))
        if self.profile == "jsonl":
            item = self.items[index % len(self.items)]
            messages = tuple(item["messages"]) if "messages" in item else None
            max_tokens = self.max_tokens or item.get("max_tokens") or DEFAULT_JSONL_MAX_TOKENS
            return Prompt("jsonl", endpoint, item.get("prompt", ""), max_tokens, messages=messages)
        category = self.profile
        if self.profile == "mixed":
            category = "rag" if rng.random() < self.rag_share else "chat"
        max_tokens = self._output_tokens(rng, category)
        if category == "chat":
            lo, hi = PROMPT_TOKENS["chat"]
            size = self._fit(rng.randint(lo, hi), max_tokens)
            ask = question(rng)
            context = passage(rng, max(1, size - estimate_tokens(ask) - 4))
            return Prompt("chat", endpoint, f"{context}\n{ask}", max_tokens)
        if category == "long":
            lo, hi = PROMPT_TOKENS["long"]
            ask = f"Question: {question(rng)} Answer in detail."
            size = self._fit(rng.randint(lo, hi), max_tokens) - estimate_tokens(ask) - 4
            return Prompt("long", endpoint, f"{passage(rng, max(1, size))}\n\n{ask}", max_tokens)
        if category == "rag":
            lo, hi = PROMPT_TOKENS["rag"]
            ask = f"Question: {question(rng)} Answer briefly."
            size = self._fit(rng.randint(lo, hi), max_tokens) - estimate_tokens(ask) - 8
            docs = [f"Document {d + 1} (ref {rng.randint(10000, 99999)}): {passage(rng, size // 3)}" for d in range(3)]
            return Prompt("rag", endpoint, "\n\n".join(docs) + f"\n\n{ask}", max_tokens)
        prefix = self.prefixes[rng.randrange(len(self.prefixes))]
        lo, hi = PROMPT_TOKENS["prefix_question"]
        text = f"Request {index}: {passage(rng, rng.randint(lo, hi) // 2)} {question(rng)}"
        max_tokens = min(max_tokens, self.max_model_len - TEMPLATE_MARGIN_TOKENS - estimate_tokens(prefix + text))
        return Prompt("prefix", endpoint, text, max(1, max_tokens), system=prefix)
