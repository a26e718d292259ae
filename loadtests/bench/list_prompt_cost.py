"""What local prefill costs a list prompt, measured against a running server (`make run`):
`python -m loadtests.bench.list_prompt_cost`.

pdserve serves a completions request with several prompts by prefilling them on the decode replica (one KV
hand-off carries one prompt). The alternative would be one hand-off per prompt. This compares, for the same
prompts (one long, one short), the list request's time with the time of the same prompts sent as separate,
concurrent requests (the long one disaggregated), each repeated `--repeats` times with fresh prompts.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import httpx

LONG = "Describe the water cycle: evaporation, condensation, precipitation and collection, with examples. " * 20
SHORT = "List the colours of the rainbow."


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--base", default="http://127.0.0.1:8000")
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--max-tokens", type=int, default=16)
    args = p.parse_args(argv)
    key = os.environ.get("PDSERVE_API_KEY")
    url = args.base + "/v1/completions"
    list_s, split_s, routes = [], [], set()
    with httpx.Client(timeout=300, headers={"authorization": f"Bearer {key}"} if key else {}) as client:
        def post(prompt):
            body = {"model": args.model, "prompt": prompt, "max_tokens": args.max_tokens, "temperature": 0}
            resp = client.post(url, json=body)
            resp.raise_for_status()
            return resp

        for _ in range(args.repeats):
            prompts = [f"[{uuid.uuid4().hex[:8]}] {LONG}", f"[{uuid.uuid4().hex[:8]}] {SHORT}"]
            t0 = time.monotonic()
            routes.add(post(prompts).headers["x-pdserve-route"])
            list_s.append(time.monotonic() - t0)
            prompts = [f"[{uuid.uuid4().hex[:8]}] {LONG}", f"[{uuid.uuid4().hex[:8]}] {SHORT}"]
            t0 = time.monotonic()
            with ThreadPoolExecutor(2) as pool:
                for resp in pool.map(post, prompts):
                    routes.add(resp.headers["x-pdserve-route"])
            split_s.append(time.monotonic() - t0)
    result = {"list_request_s_median": round(statistics.median(list_s), 3),
              "separate_requests_s_median": round(statistics.median(split_s), 3),
              "ratio": round(statistics.median(list_s) / statistics.median(split_s), 3),
              "routes_seen": sorted(routes), "repeats": args.repeats, "max_tokens": args.max_tokens}
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
