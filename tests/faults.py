"""Helpers of the fault tests on both tiers (the fake-engine Serve tier and the real-vLLM cluster): requests in
bursts, signals to a replica's process group, and what the ingress replica logged."""

from __future__ import annotations

import contextlib
import re
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import psutil

from .conftest import AUTH


def complete(base: str, model: str, prompt: str, max_tokens: int = 12, timeout: float = 120) -> httpx.Response:
    return httpx.post(base + "/completions", timeout=timeout, headers=AUTH,
                      json={"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0})


def text(resp: httpx.Response) -> str:
    assert resp.status_code == 200, resp.text
    return resp.json()["choices"][0]["text"]


def ingress_log() -> str:
    """The pd app's ingress replica log(s) of the running Ray session."""
    logs = sorted(Path("/tmp/ray/session_latest/logs/serve").glob("replica_pdserve_Ingress_*.log"))
    return "".join(log.read_text() for log in logs)


def burst(cluster, prompts, during=None) -> tuple[list[httpx.Response], list[float]]:
    """All prompts at once to the pd application; ``during`` runs while they are in flight."""
    def one(p):
        t0 = time.monotonic()
        r = complete(cluster.pd, cluster.model, p, max_tokens=8, timeout=180)
        return r, time.monotonic() - t0

    with ThreadPoolExecutor(len(prompts)) as pool:
        futures = [pool.submit(one, p) for p in prompts]
        if during:
            during()
        results = [f.result() for f in futures]
    return [r for r, _ in results], [t for _, t in results]


def process_group(pid: int) -> list[psutil.Process]:
    root = psutil.Process(pid)
    return [root, *root.children(recursive=True)]


def signal_all(procs: list[psutil.Process], sig: int) -> None:
    """Each process that still lives (Serve force-stops a replica frozen past its health check timeout)."""
    for p in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.send_signal(sig)


def unanswered_queue_probes(replica: str) -> int:
    """Serve's router asked ``replica`` for its queue length before sending it a call and got no answer in time
    (it then sends the call elsewhere): its warnings in the ingress log."""
    return ingress_log().count(f"Failed to get queue length from Replica(id='{replica}'")


def routing_retry_counts() -> list[int]:
    """Serve's "Failed to route request after N attempts" warnings in the ingress replica's log: N each."""
    return [int(m) for m in re.findall(r"Failed to route request after (\d+) attempts", ingress_log())]
