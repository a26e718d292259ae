"""A stand-in for pdserve's streaming OpenAI API, to test the load-test tooling without engines.

    python -m loadtests.locust.fake_server --port 8011
    locust -f loadtests/locust/locustfile.py --host http://127.0.0.1:8011    # then, in another shell

It streams ``max_tokens`` one-word tokens (``token_delay_s`` apart, the first after ``ttft_delay_s``) with the
chunk shapes of vLLM/pdserve (a role-only first chunk for chat, a usage chunk, ``[DONE]``), and counts the
requests it completed (``GET /stats``). The model name picks a failure to inject: ``fail-429`` (HTTP 429 with
retry-after), ``fail-midstream`` (an error event after two tokens), ``fail-nodone`` (the stream stops early).
"""

from __future__ import annotations

import argparse
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

MODEL = "fake-model"


FAKE_TRANSFER_S = 0.012  # the KV hand-off time its usage chunk reports (as pdserve_timing does)

class FakeOpenAIHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: FakeOpenAIServer

    def log_message(self, *_args) -> None:
        pass

    def _json(self, status: int, body: dict, headers: dict | None = None) -> None:
        raw = json.dumps(body).encode()
        self.send_response(status)
        for k, v in ({"content-type": "application/json", "content-length": str(len(raw))} | (headers or {})).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(raw)

    def _event(self, payload) -> None:
        data = f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n".encode()
        self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")  # one HTTP chunk per event
        self.wfile.flush()

    def do_GET(self) -> None:
        if self.path.rstrip("/").endswith("/v1/models"):
            self._json(200, {"object": "list", "data": [{"id": MODEL, "object": "model"}]})
        elif self.path == "/stats":
            self._json(200, {"num_completed": self.server.num_completed})
        else:
            self._json(404, {"error": {"message": "not found", "type": "NotFoundError", "code": 404}})

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers.get("content-length", 0))) or b"{}")
        chat = self.path.endswith("/chat/completions")
        model = body.get("model", MODEL)
        if model == "fail-429":
            return self._json(429, {"error": {"message": "server overloaded", "type": "RateLimitError", "code": 429}},
                              {"retry-after": "1"})
        self.send_response(200)
        for k, v in {"content-type": "text/event-stream", "transfer-encoding": "chunked",
                     "x-pdserve-route": "disaggregated", "x-pdserve-request-id": f"fake-{time.monotonic_ns()}"}.items():
            self.send_header(k, v)
        self.end_headers()
        num_tokens = int(body.get("max_tokens") or 16)
        prompt = json.dumps(body.get("messages") or body.get("prompt") or "")
        time.sleep(self.server.ttft_delay_s)
        if chat:
            self._event({"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]})
        for i in range(num_tokens):
            if i:
                time.sleep(self.server.token_delay_s)
            if model == "fail-midstream" and i == 2:
                self._event({"error": {"message": "stream interrupted", "type": "ServiceUnavailable", "code": 503}})
                break
            if model == "fail-nodone" and i == 2:
                break
            piece = {"delta": {"content": f" w{i}"}} if chat else {"text": f" w{i}"}
            self._event({"choices": [{"index": 0, "finish_reason": "length" if i == num_tokens - 1 else None} | piece]})
        else:
            self._event({"choices": [], "usage": {"prompt_tokens": max(1, len(prompt) // 4),
                                                  "completion_tokens": num_tokens},
                         "pdserve_timing": {"route": "disaggregated", "transfer_s": FAKE_TRANSFER_S}})
            with self.server.lock:
                self.server.num_completed += 1
        if model != "fail-nodone":
            self._event("[DONE]")
        self.wfile.write(b"0\r\n\r\n")


class FakeOpenAIServer(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 256  # listen backlog: the default 5 drops bursts of connects (1 s SYN retransmits)

    def __init__(self, port: int = 0, ttft_delay_s: float = 0.02, token_delay_s: float = 0.005):
        super().__init__(("127.0.0.1", port), FakeOpenAIHandler)
        self.ttft_delay_s, self.token_delay_s = ttft_delay_s, token_delay_s
        self.num_completed = 0
        self.lock = threading.Lock()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def start(self) -> FakeOpenAIServer:
        threading.Thread(target=self.serve_forever, daemon=True).start()
        return self


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--port", type=int, default=8011)
    parser.add_argument("--ttft-delay-s", type=float, default=0.02)
    parser.add_argument("--token-delay-s", type=float, default=0.005)
    args = parser.parse_args()
    server = FakeOpenAIServer(args.port, args.ttft_delay_s, args.token_delay_s)
    print(f"fake OpenAI API at {server.base_url}/v1 (model {MODEL})", flush=True)
    server.serve_forever()
