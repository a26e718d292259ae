"""Locust load test of pdserve's OpenAI-compatible API (streaming chat and completions).

    .venv/bin/locust -f loadtests/locust/locustfile.py --headless --host http://127.0.0.1:8000 -t 60s \\
        --profile mixed --request-rate 2 --report-dir loadtest-report

Every request streams; each reports, as separate locust request events named after its request category
(chat, rag, long, prefix, jsonl): "TTFT" (time to first token), one "ITL" per inter-token gap, and "E2E" (whole
request; a failure carries the error, its response_length is the number of output tokens from the usage chunk).
``--request-rate R > 0`` is open loop: one dispatcher fires requests with exponential inter-arrival times (Poisson,
R req/s), each in its own greenlet, whatever the latency; ``--request-rate 0`` is closed loop: each of the ``-u``
users sends its next request when the previous one ends. At the end of the run the requests still in flight are
drained (``--drain-timeout-s``), and the report (loadtests/locust/report.py) goes to ``--report-dir``. See
docs/loadtests.md.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import random
import sys
import time
from pathlib import Path

import gevent
import requests
from gevent.pool import Group
from locust import User, constant, events, task
from locust import stats as locust_stats

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # `loadtests` as a package, whatever the cwd

from loadtests.locust.report import RequestSample, meets_slo, summarize, write_report  # noqa: E402
from loadtests.locust.stream import StreamError, stream_request  # noqa: E402
from loadtests.locust.workloads import ENDPOINTS, Workload, WorkloadError, request_body  # noqa: E402

logger = logging.getLogger("pdserve.loadtest")
EXIT_BAD_OPTION, EXIT_UNREACHABLE = 2, 3


def _number(kind, minimum: float, strict: bool):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a{'n integer' if kind is int else ' number'}: {text!r}") from None
        if not math.isfinite(value) or value < minimum or (strict and value == minimum):
            raise argparse.ArgumentTypeError(f"must be {'>' if strict else '>='} {minimum}, got {text}")
        return value
    return parse


@events.init_command_line_parser.add_listener
def add_options(parser, **_kw) -> None:
    group = parser.add_argument_group("pdserve load test")
    # The workload profile is locust's own --profile (a label it also shows in its HTML report), checked in on_init:
    # chat (short prompts, medium answers), rag (1-2k-token prompts, short answers), mixed (chat and rag at once),
    # long (80-1,500-token prompts, 64-token answers), prefix (shared long prefixes), jsonl (--prompts-file).
    group.add_argument("--prompts-file", default=None,
                       help="JSONL file, one {\"prompt\": ...} or {\"messages\": [...]} per line (optional "
                            "\"max_tokens\"); implies --profile jsonl")
    group.add_argument("--endpoint", choices=ENDPOINTS, default="chat",
                       help="API to call: /v1/chat/completions, /v1/completions, or both (chosen per request)")
    group.add_argument("--model", default="", help="model name; default: the first one GET /v1/models lists")
    group.add_argument("--request-rate", type=_number(float, 0, False), default=0.0,
                       help="open loop: Poisson arrivals at this many requests/s; 0: closed loop with -u users")
    group.add_argument("--max-tokens", type=_number(int, 1, False), default=None,
                       help="max_tokens of every request (default: drawn per profile)")
    group.add_argument("--ignore-eos", action="store_true", help="send ignore_eos: answers of exactly max_tokens")
    group.add_argument("--seed", type=int, default=0, help="seed of prompts and arrival times")
    group.add_argument("--rag-share", type=_number(float, 0, False), default=0.25,
                       help="mixed profile: share of rag (long-prompt) requests, 0-1")
    group.add_argument("--num-prefixes", type=_number(int, 1, False), default=4,
                       help="prefix profile: number of distinct shared prefixes")
    group.add_argument("--max-model-len", type=_number(int, 256, False), default=2048,
                       help="the server's max_model_len: generated prompt + answer stay below it")
    group.add_argument("--slo-ttft-s", type=_number(float, 0, True), default=5.0, help="SLO: time to first token (s)")
    group.add_argument("--slo-tpot-s", type=_number(float, 0, True), default=0.1,
                       help="SLO: time per output token after the first (s)")
    group.add_argument("--report-dir", default="loadtest-report", help="where summary.json, report.md, plots go")
    group.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    group.add_argument("--drain-timeout-s", type=_number(float, 0, False), default=60.0,
                       help="at the end, wait this long for requests in flight (then cancel them)")
    group.add_argument("--max-in-flight", type=_number(int, 1, False), default=512,
                       help="open loop: arrivals beyond this many requests in flight are dropped (client_overload)")
    group.add_argument("--request-timeout-s", type=_number(float, 0, True), default=300.0,
                       help="per request: longest wait for the next byte and for the whole stream (s)")
    group.add_argument("--progress-interval-s", type=_number(float, 0, False), default=5.0,
                       help="log a progress line this often (0: never)")


class RunState:
    """The current run: options, workload, samples and counters, shared by all users and request greenlets."""

    def __init__(self):
        self.options = None
        self.workload: Workload | None = None
        self.session = requests.Session()
        self.reset()

    def reset(self) -> None:
        self.samples: list[RequestSample] = []
        self.in_flight = Group()
        self.num_sent = 0
        self.started_at = time.perf_counter()
        self.started = self.stopping = self.aborted = self.reported = False
        self.dispatcher: User | None = None
        self.progress_greenlet = None
        self.model = ""
        self.base_url = ""

    def next_index(self) -> int:
        self.num_sent += 1
        return self.num_sent - 1


STATE = RunState()


def api_base(host: str) -> str:
    """``http://h:8000`` or ``http://h:8000/v1`` (or ``.../colocated[/v1]``) → the URL that /models is under."""
    host = host.rstrip("/")
    return host if host.endswith("/v1") else f"{host}/v1"


def _fail(environment, code: int, message: str) -> None:
    logger.error("pdserve load test: %s", message)
    environment.process_exit_code = code


@events.init.add_listener
def on_init(environment, **_kw) -> None:
    opts = environment.parsed_options
    if opts is None:  # used as a library: refused at test_start
        return
    if getattr(opts, "worker", False) or getattr(opts, "master", False):
        _fail(environment, EXIT_BAD_OPTION, "distributed runs are not supported (the report needs all samples)")
        sys.exit(EXIT_BAD_OPTION)
    try:
        STATE.workload = build_workload(environment, opts)
    except WorkloadError as exc:
        _fail(environment, EXIT_BAD_OPTION, str(exc))
        sys.exit(EXIT_BAD_OPTION)
    STATE.options = opts
    adapter = requests.adapters.HTTPAdapter(pool_connections=4, pool_maxsize=max(opts.max_in_flight, 10))
    STATE.session.mount("http://", adapter)
    STATE.session.mount("https://", adapter)
    STATE.session.headers.update(auth_headers())


def build_workload(environment, opts) -> Workload:
    """The run's workload from the options; WorkloadError says which option is wrong."""
    if not environment.host:
        raise WorkloadError("--host is required, e.g. --host http://127.0.0.1:8000")
    if opts.profile is None:
        opts.profile = environment.profile = "jsonl" if opts.prompts_file else "chat"
    return Workload(opts.profile, seed=opts.seed, endpoint=opts.endpoint, max_tokens=opts.max_tokens,
                    rag_share=opts.rag_share, num_prefixes=opts.num_prefixes, max_model_len=opts.max_model_len,
                    prompts_file=opts.prompts_file)


def auth_headers() -> dict[str, str]:
    """``Authorization`` for a server that requires an API key: OPENAI_API_KEY or PDSERVE_API_KEY."""
    key = os.environ.get("OPENAI_API_KEY") or os.environ.get("PDSERVE_API_KEY")
    return {"authorization": f"Bearer {key}"} if key else {}


def check_server(base_url: str, model: str) -> str:
    """GET /v1/models: the model to use, or WorkloadError saying why the server cannot be used."""
    url = f"{base_url}/models"
    try:
        resp = requests.get(url, timeout=10, headers=auth_headers())
    except requests.exceptions.RequestException as exc:
        raise WorkloadError(f"server unreachable: GET {url} failed: {type(exc).__name__}: {exc}") from None
    if resp.status_code != 200:
        raise WorkloadError(f"GET {url} answered HTTP {resp.status_code}: {resp.text[:300]}")
    try:
        names = [m["id"] for m in resp.json()["data"]]
    except (ValueError, KeyError, TypeError):
        raise WorkloadError(f"GET {url} did not answer an OpenAI model list: {resp.text[:300]}") from None
    if not names:
        raise WorkloadError(f"GET {url} lists no model")
    if model and model not in names:
        raise WorkloadError(f"model {model!r} is not served at {base_url}; it serves {', '.join(names)}")
    return model or names[0]


def _summary_so_far() -> str:
    finished = list(STATE.samples)
    num_ok = sum(s.ok for s in finished)
    good = sum(meets_slo(s, STATE.options.slo_ttft_s, STATE.options.slo_tpot_s) for s in finished)
    share = f"{100 * good / len(finished):.1f} %" if finished else "-"
    return (f"{time.perf_counter() - STATE.started_at:.0f} s: sent {STATE.num_sent}, done {num_ok}, "
            f"errors {len(finished) - num_ok}, in flight {len(STATE.in_flight)}, "
            f"SLO attainment {share} ({good}/{len(finished)})")


def _progress_loop(interval_s: float) -> None:
    while True:
        gevent.sleep(interval_s)
        logger.info("progress %s", _summary_so_far())


@events.test_start.add_listener
def on_test_start(environment, **_kw) -> None:
    STATE.reset()
    if STATE.options is None:  # locust as a library: no parsed options
        STATE.aborted = True
        _fail(environment, EXIT_BAD_OPTION, "run this locustfile with the locust command (its options are needed)")
        gevent.spawn(environment.runner.quit)
        return
    STATE.base_url = api_base(environment.host or "")
    code = EXIT_BAD_OPTION
    try:  # options may have changed since init (web UI): rebuild the workload
        STATE.workload = build_workload(environment, STATE.options)
        code = EXIT_UNREACHABLE
        STATE.model = check_server(STATE.base_url, STATE.options.model)
    except WorkloadError as exc:
        STATE.aborted = True
        _fail(environment, code, str(exc))
        gevent.spawn(environment.runner.quit)
        return
    STATE.started, STATE.started_at = True, time.perf_counter()
    mode = f"open loop at {STATE.options.request_rate} req/s" if STATE.options.request_rate > 0 else "closed loop"
    logger.info("pdserve load test: %s, profile %s, model %s, %s", STATE.base_url, STATE.workload.profile,
                STATE.model, mode)
    if STATE.options.progress_interval_s > 0:
        STATE.progress_greenlet = gevent.spawn(_progress_loop, STATE.options.progress_interval_s)


@events.test_stopping.add_listener
def on_test_stopping(**_kw) -> None:
    STATE.stopping = True  # no new requests; those in flight finish in test_stop


def _record_failure(environment, sample: RequestSample, kind: str, message: str) -> None:
    sample.ok, sample.error_kind, sample.error_message = False, kind, message
    environment.events.request.fire(request_type="E2E", name=sample.category, response_time=(sample.e2e_s or 0) * 1000,
                                    response_length=0, exception=StreamError(kind, message), context={})


def run_request(environment, index: int) -> None:
    """One request (its own greenlet): stream it, fire the locust events, keep its sample."""
    prompt = STATE.workload.prompt(index)
    path, body = request_body(prompt, STATE.model, STATE.options.ignore_eos)
    sample = RequestSample(prompt.category, prompt.endpoint, time.perf_counter() - STATE.started_at,
                           num_estimated_prompt_tokens=prompt.num_estimated_tokens)
    fire = environment.events.request.fire

    def on_token(kind: str, seconds: float) -> None:
        fire(request_type=kind, name=prompt.category, response_time=seconds * 1000, response_length=0,
             exception=None, context={})

    try:
        stream_request(STATE.session, STATE.base_url + path, body, sample,
                       timeout_s=STATE.options.request_timeout_s, on_token=on_token)
        fire(request_type="E2E", name=prompt.category, response_time=sample.e2e_s * 1000,
             response_length=sample.num_output_tokens, exception=None,
             context={"route": sample.route, "prompt_tokens": sample.num_prompt_tokens})
    except StreamError as exc:
        _record_failure(environment, sample, exc.kind, exc.message)
    except gevent.GreenletExit:
        _record_failure(environment, sample, "cancelled_at_stop", "still in flight at the end of the run")
        raise
    except Exception as exc:  # a bug or an unexpected reply: count it, keep the run going
        _record_failure(environment, sample, "client_error", f"{type(exc).__name__}: {exc}")
    finally:
        STATE.samples.append(sample)


class OpenAIUser(User):
    """Closed loop: one request after another. Open loop: the first user dispatches Poisson arrivals."""

    wait_time = constant(0)

    @task
    def send(self) -> None:
        if STATE.stopping or STATE.aborted or not STATE.started:
            gevent.sleep(0.5)
            return
        if STATE.options.request_rate > 0:
            if STATE.dispatcher is None:
                STATE.dispatcher = self
                self.dispatch(STATE.options.request_rate)
            else:  # one dispatcher sets the rate; more users would not add load
                gevent.sleep(3600)
            return
        STATE.in_flight.spawn(run_request, self.environment, STATE.next_index()).join()  # survives the user's kill

    def dispatch(self, rate: float) -> None:
        rng = random.Random(f"{STATE.options.seed}/arrivals")
        next_at = time.perf_counter()
        while not STATE.stopping:
            next_at += rng.expovariate(rate)
            gevent.sleep(max(0.0, next_at - time.perf_counter()))
            if STATE.stopping:
                break
            if len(STATE.in_flight) >= STATE.options.max_in_flight:
                index = STATE.next_index()
                prompt = STATE.workload.prompt(index)
                sample = RequestSample(prompt.category, prompt.endpoint, time.perf_counter() - STATE.started_at,
                                       num_estimated_prompt_tokens=prompt.num_estimated_tokens)
                _record_failure(self.environment, sample, "client_overload",
                                f"{STATE.options.max_in_flight} requests already in flight; arrival dropped")
                STATE.samples.append(sample)
                continue
            STATE.in_flight.spawn(run_request, self.environment, STATE.next_index())


def finish_run(environment, drain: bool) -> None:
    """Drain (or cancel) the requests in flight, then write the report, once per run."""
    if not STATE.started or STATE.reported or STATE.aborted:
        return
    STATE.reported = STATE.stopping = True
    opts = STATE.options
    if drain and len(STATE.in_flight) and not STATE.in_flight.join(timeout=opts.drain_timeout_s):
        logger.warning("%d requests still in flight after %s s: cancelled", len(STATE.in_flight),
                       opts.drain_timeout_s)
    STATE.in_flight.kill(block=True, timeout=10)
    duration_s = time.perf_counter() - STATE.started_at
    if STATE.progress_greenlet is not None:
        STATE.progress_greenlet.kill(block=False)
    if getattr(opts, "csv_prefix", None):  # locust rewrites its CSV each second, not at exit: let it see the drain
        gevent.sleep(locust_stats.CSV_STATS_INTERVAL_SEC + 0.2)
    run = {"host": environment.host, "model": STATE.model, "profile": STATE.workload.profile,
           "endpoint": opts.endpoint, "mode": "open_loop" if opts.request_rate > 0 else "closed_loop",
           "request_rate": opts.request_rate, "num_users": opts.num_users if opts.request_rate == 0 else 1,
           "max_tokens": opts.max_tokens, "ignore_eos": opts.ignore_eos, "seed": opts.seed,
           "prompts_file": opts.prompts_file}
    summary = summarize(STATE.samples, duration_s, opts.slo_ttft_s, opts.slo_tpot_s, run)
    files = write_report(STATE.samples, summary, opts.report_dir, with_plots=not opts.no_plots)
    logger.info("pdserve load test done: %s", _summary_so_far().split(": ", 1)[1])
    logger.info("%.2f req/s, goodput %.2f req/s, %.1f output tokens/s; report: %s", summary["requests_per_s"],
                summary["goodput_rps"], summary["output_tokens_per_s"], files["markdown"])


@events.test_stop.add_listener
def on_test_stop(environment, **_kw) -> None:
    finish_run(environment, drain=True)


@events.quitting.add_listener
def on_quitting(environment, **_kw) -> None:
    finish_run(environment, drain=False)  # interrupted (Ctrl-C, SIGTERM) before test_stop: report what finished
