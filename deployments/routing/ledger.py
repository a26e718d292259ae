"""The ingress's own count of what it sent to each engine replica, for the routing policies of every pool."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace

from .policies import ReplicaLoad


class Ledger:
    """What this ingress replica has in flight on each engine: its streams, how many of them still wait for their
    first token, and the prompt tokens the engine has yet to prefill.

    Exact and current, where the engines' own load reports lag by up to a second or two (a request that just
    finished still shows, and every request sent since the last report is missing: ranking by the reports alone
    sends a whole second's requests to the one replica that looked least loaded). Streams and prompt tokens come
    from the ledger, KV cache usage and measured ITL from the reports. With several ingress replicas, each
    balances the requests it sends."""

    def __init__(self) -> None:
        self.streams: dict[str, int] = {}
        self.waiting: dict[str, int] = {}
        self.prompt_tokens: dict[str, int] = {}

    def add(self, replica: str | None, streams: int = 0, waiting: int = 0, prompt_tokens: int = 0) -> None:
        if replica is None:
            return
        for book, delta in ((self.streams, streams), (self.waiting, waiting), (self.prompt_tokens, prompt_tokens)):
            if delta:
                book[replica] = book.get(replica, 0) + delta
                if book[replica] <= 0:
                    del book[replica]

    def loads(self, reported: Mapping[str, ReplicaLoad]) -> dict[str, ReplicaLoad]:
        """The live engines (those reported): decoding streams as running, the others as waiting."""
        out = {}
        for rid, load in reported.items():
            waiting = self.waiting.get(rid, 0)
            out[rid] = replace(load, num_running=max(0, self.streams.get(rid, 0) - waiting), num_waiting=waiting,
                               num_outstanding_prompt_tokens=self.prompt_tokens.get(rid, 0))
        return out
