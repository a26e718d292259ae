"""The ingress's own count of what it sent to each engine replica, for the routing policies of every pool."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import replace

from .policies import ReplicaLoad


class Ledger:
    """What this ingress replica has in flight on each engine: its streams, how many of them still wait for their
    first token, and the prompt tokens the engine has yet to prefill.

    Exact and current, where the engines' own load reports lag by up to a second or two (a request that just
    finished still shows, and every request sent since the last report is missing: ranking by the reports alone
    sends a whole second's requests to the one replica that looked least loaded). Streams and prompt tokens come
    from the ledger, KV cache usage and measured ITL from the reports. With several ingress replicas, each
    balances the requests it sends.

    An engine works through the prompts it holds one after the other, so the ledger also notes since when it works
    on what it holds now (its first prompt's booking, or the last prompt it finished): given the prefill speed,
    that much is taken as done (``loads``)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.streams: dict[str, int] = {}
        self.waiting: dict[str, int] = {}
        self.prompt_tokens: dict[str, int] = {}
        self.prefilling_since: dict[str, float] = {}
        self.clock = clock

    def add(self, replica: str | None, streams: int = 0, waiting: int = 0, prompt_tokens: int = 0) -> None:
        if replica is None:
            return
        if prompt_tokens < 0 or (prompt_tokens > 0 and replica not in self.prompt_tokens):
            self.prefilling_since[replica] = self.clock()  # a prompt finished, or an idle engine got one
        for book, delta in ((self.streams, streams), (self.waiting, waiting), (self.prompt_tokens, prompt_tokens)):
            if delta:
                book[replica] = book.get(replica, 0) + delta
                if book[replica] <= 0:
                    del book[replica]
        if replica not in self.prompt_tokens:
            self.prefilling_since.pop(replica, None)

    def loads(self, reported: Mapping[str, ReplicaLoad], tokens_per_s: float | None = None) -> dict[str, ReplicaLoad]:
        """The live engines (those reported): decoding streams as running, the others as waiting. With
        ``tokens_per_s`` (the measured prefill speed), the prompt tokens an engine had time to prefill since it
        started on what it holds are not counted as outstanding: a long prompt sent 2 s ago to an idle engine is
        mostly done, one sent just now to an engine busy with another is not started."""
        now, out = self.clock(), {}
        for rid, load in reported.items():
            waiting, tokens = self.waiting.get(rid, 0), self.prompt_tokens.get(rid, 0)
            if tokens and tokens_per_s:
                tokens = max(0, tokens - int((now - self.prefilling_since[rid]) * tokens_per_s))
            out[rid] = replace(load, num_running=max(0, self.streams.get(rid, 0) - waiting), num_waiting=waiting,
                               num_outstanding_prompt_tokens=tokens)
        return out
