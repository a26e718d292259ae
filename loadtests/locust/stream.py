"""One streaming OpenAI request, timed: time to first token, every inter-token gap, end-to-end time, usage.

Tokens are timed per server-sent event that carries text (``choices[0].delta.content`` for chat,
``choices[0].text`` for completions); the role-only first chunk of a chat stream carries none and is not counted.
Token counts come from the final ``usage`` chunk (``stream_options.include_usage``).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable

import requests

from .report import RequestSample

DONE = object()


class StreamError(Exception):
    """A failed request: ``kind`` groups errors in the report (http_429, connection_error, stream_error, ...)."""

    def __init__(self, kind: str, message: str):
        super().__init__(f"{kind}: {message}")
        self.kind, self.message = kind, message


def parse_sse_line(line: str | bytes):
    """``data: {json}`` → the object; ``data: [DONE]`` → DONE; blank lines, comments, other fields → None."""
    if isinstance(line, bytes):
        line = line.decode("utf-8", errors="replace")
    line = line.strip()
    if not line.startswith("data:"):
        return None
    payload = line[len("data:"):].strip()
    if payload == "[DONE]":
        return DONE
    try:
        return json.loads(payload)
    except ValueError:
        raise StreamError("bad_stream", f"undecodable event: {payload[:200]}") from None


def chunk_text(chunk: dict, endpoint: str) -> str:
    choices = chunk.get("choices") or []
    if not choices:
        return ""
    if endpoint == "chat":
        return (choices[0].get("delta") or {}).get("content") or ""
    return choices[0].get("text") or ""


def _http_error(resp: requests.Response) -> StreamError:
    try:
        message = resp.json()["error"]["message"]
    except (ValueError, KeyError, TypeError):
        message = resp.text[:300]
    retry = f" (retry-after {resp.headers['retry-after']})" if "retry-after" in resp.headers else ""
    return StreamError(f"http_{resp.status_code}", f"{message}{retry}")


def _record_chunk(sample: RequestSample, at: float, start: float, last: float | None,
                  on_token: Callable[[str, float], None] | None) -> None:
    """A text-bearing chunk arrived at ``at``: the first sets TTFT, each later one adds an inter-token gap."""
    if last is None:
        sample.ttft_s = at - start
        if on_token:
            on_token("TTFT", sample.ttft_s)
    else:
        sample.itl_s.append(at - last)
        if on_token:
            on_token("ITL", sample.itl_s[-1])
    sample.num_chunks += 1


def _finish(sample: RequestSample, done: bool, start: float, finish_at: float | None) -> RequestSample:
    """After the stream: fail a stream without [DONE], else fill what the chunks did not say and mark it ok."""
    if not done:
        raise StreamError("incomplete_stream", "the stream ended without data: [DONE]")
    if sample.ttft_s is None:  # an empty answer (EOS first): its first "token" is the finishing chunk
        sample.ttft_s = (finish_at - start) if finish_at is not None else sample.e2e_s
    if not sample.num_output_tokens:  # no usage chunk: count the text-bearing chunks
        sample.num_output_tokens = sample.num_chunks
    sample.ok = True
    return sample


def stream_request(session: requests.Session, url: str, body: dict, sample: RequestSample, *, timeout_s: float,
                   on_token: Callable[[str, float], None] | None = None) -> RequestSample:
    """Send one streaming request and fill ``sample``; ``on_token("TTFT"|"ITL", seconds)`` as tokens arrive.

    Raises StreamError (after filling what was measured) when the request fails.
    """
    endpoint = sample.endpoint
    start = time.perf_counter()
    last = None
    finish_at = None
    done = False
    try:
        with session.post(url, json=body, stream=True, timeout=(10, timeout_s)) as resp:
            sample.route = resp.headers.get("x-pdserve-route", "")
            sample.route_reason = resp.headers.get("x-pdserve-route-reason", "")
            sample.request_id = resp.headers.get("x-pdserve-request-id", "")
            if resp.status_code != 200:
                raise _http_error(resp)
            for line in resp.iter_lines(chunk_size=None):  # None: yield data as it arrives, not in 512-byte reads
                event = parse_sse_line(line)
                if event is None:
                    continue
                if event is DONE:
                    done = True
                    break
                if "error" in event:
                    err = event["error"] if isinstance(event["error"], dict) else {"message": event["error"]}
                    raise StreamError("stream_error", str(err.get("message", err)))
                now = time.perf_counter()
                if event.get("usage"):
                    sample.num_prompt_tokens = int(event["usage"].get("prompt_tokens") or 0)
                    sample.num_output_tokens = int(event["usage"].get("completion_tokens") or 0)
                    sample.transfer_s = (event.get("pdserve_timing") or {}).get("transfer_s")
                if chunk_text(event, endpoint):
                    _record_chunk(sample, now, start, last, on_token)
                    last = now
                elif finish_at is None and any(c.get("finish_reason") for c in event.get("choices") or []):
                    finish_at = now
                if now - start > timeout_s:
                    raise StreamError("timeout", f"no end of stream after {timeout_s} s")
    except requests.exceptions.Timeout as exc:
        raise StreamError("timeout", str(exc)) from None
    except requests.exceptions.ConnectionError as exc:
        raise StreamError("connection_error", str(exc)) from None
    except requests.exceptions.RequestException as exc:
        raise StreamError("request_error", f"{type(exc).__name__}: {exc}") from None
    finally:
        sample.e2e_s = time.perf_counter() - start
    return _finish(sample, done, start, finish_at)
