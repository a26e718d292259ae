"""The load-test tooling without a cluster: workloads, JSONL prompts, report math, plots, streaming client, options.

Runs that need a server use loadtests/locust/fake_server.py on 127.0.0.1 (a thread of this process); the
unreachable-server check runs locust against port 9, where nothing listens.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import requests

from loadtests.locust.fake_server import FAKE_TRANSFER_S, MODEL, FakeOpenAIServer
from loadtests.locust.report import (
    RequestSample,
    latency_stats,
    meets_slo,
    percentile,
    render_markdown,
    summarize,
    tpot_s,
    write_report,
)
from loadtests.locust.runner import LOCUSTFILE, run_locust
from loadtests.locust.stream import DONE, StreamError, parse_sse_line, stream_request
from loadtests.locust.workloads import (
    PROMPT_TOKENS,
    TEMPLATE_MARGIN_TOKENS,
    Workload,
    WorkloadError,
    load_prompts_file,
    request_body,
)

ROOT = Path(__file__).resolve().parent.parent
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def fake_server():
    server = FakeOpenAIServer(0, ttft_delay_s=0.02, token_delay_s=0.002).start()
    yield server
    server.shutdown()
    server.server_close()


def _locust(*args: str, timeout_s: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless", "--only-summary",
                           *args], capture_output=True, text=True, timeout=timeout_s, cwd=ROOT)


# ---- workloads --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("profile", ["chat", "rag", "mixed", "long", "prefix"])
def test_workload_is_deterministic_from_its_seed(profile):
    first = [Workload(profile, seed=7).prompt(i) for i in range(20)]
    assert first == [Workload(profile, seed=7).prompt(i) for i in range(20)]
    assert [Workload(profile, seed=7).prompt(i) for i in (19, 3)] == [first[19], first[3]]  # order-independent
    assert first != [Workload(profile, seed=8).prompt(i) for i in range(20)]
    assert len({p.completion_prompt() for p in first}) == 20  # no two requests identical


def test_chat_prompts_are_short_with_medium_answers():
    prompts = [Workload("chat", seed=1).prompt(i) for i in range(50)]
    assert all(p.category == "chat" and p.endpoint == "chat" for p in prompts)
    assert all(10 <= p.num_estimated_tokens <= 200 for p in prompts)
    assert all(64 <= p.max_tokens <= 256 for p in prompts)


def test_rag_prompts_are_1k_to_2k_tokens_and_fit_the_model():
    prompts = [Workload("rag", seed=2).prompt(i) for i in range(50)]
    sizes = [p.num_estimated_tokens for p in prompts]  # ~4 characters per token
    assert all(1000 <= n <= 2000 for n in sizes), (min(sizes), max(sizes))
    assert max(sizes) - min(sizes) > 300  # sizes vary
    assert all(16 <= p.max_tokens <= 64 for p in prompts)
    assert all(p.num_estimated_tokens + p.max_tokens <= 2048 - TEMPLATE_MARGIN_TOKENS + 16 for p in prompts)
    capped = [Workload("rag", seed=2, max_tokens=400).prompt(i) for i in range(50)]
    assert all(p.num_estimated_tokens + 400 <= 2048 - TEMPLATE_MARGIN_TOKENS + 16 for p in capped)


def test_long_profile_spreads_prompts_over_80_to_1500_real_tokens_with_64_token_answers():
    """Estimated at 4 characters per token; the SmolLM2 tokenizer counts ~17% fewer on this text."""
    prompts = [Workload("long", seed=5).prompt(i) for i in range(300)]
    sizes = sorted(p.num_estimated_tokens for p in prompts)
    assert all(p.category == "long" and p.max_tokens == 64 for p in prompts)
    assert 80 <= sizes[0] <= 200 and 1700 <= sizes[-1] <= 1800, (sizes[0], sizes[-1])
    assert 850 <= sum(sizes) / len(sizes) <= 1050  # ~800 real tokens on average
    assert sum(n < 600 for n in sizes) > 50 and sum(n > 1300 for n in sizes) > 50  # spread, not clustered


def test_mixed_profile_sends_both_kinds():
    prompts = [Workload("mixed", seed=3, rag_share=0.3).prompt(i) for i in range(400)]
    counts = Counter(p.category for p in prompts)
    assert set(counts) == {"chat", "rag"}
    assert 0.2 < counts["rag"] / len(prompts) < 0.4
    assert all(p.num_estimated_tokens >= 1000 for p in prompts if p.category == "rag")


def test_prefix_profile_shares_long_prefixes():
    workload = Workload("prefix", seed=4, num_prefixes=3)
    prompts = [workload.prompt(i) for i in range(60)]
    by_prefix = Counter(p.system for p in prompts)
    assert len(by_prefix) == 3 and min(by_prefix.values()) >= 5  # each prefix shared by many requests
    assert all(len(prefix) >= PROMPT_TOKENS["prefix"][0] * 4 for prefix in by_prefix)
    assert len({p.text for p in prompts}) == 60  # each with its own question
    chat_path, chat = request_body(prompts[0], "m")
    assert chat_path == "/chat/completions"
    assert chat["messages"] == [{"role": "system", "content": prompts[0].system},
                                {"role": "user", "content": prompts[0].text}]
    _, completion = request_body(Workload("prefix", seed=4, num_prefixes=3, endpoint="completions").prompt(0), "m")
    assert completion["prompt"].startswith(prompts[0].system)


def test_request_body_is_a_streaming_openai_request():
    prompt = Workload("chat", seed=5, endpoint="completions", max_tokens=16).prompt(0)
    path, body = request_body(prompt, "smollm2-135m-instruct", ignore_eos=True)
    assert path == "/completions"
    assert body == {"model": "smollm2-135m-instruct", "max_tokens": 16, "stream": True,
                    "stream_options": {"include_usage": True}, "prompt": prompt.text, "ignore_eos": True}
    both = Counter(Workload("chat", seed=5, endpoint="both").prompt(i).endpoint for i in range(100))
    assert both["chat"] > 20 and both["completions"] > 20


@pytest.mark.parametrize("kwargs, message", [
    ({"profile": "nope"}, "unknown profile 'nope'"),
    ({"profile": "chat", "endpoint": "embeddings"}, "unknown endpoint"),
    ({"profile": "jsonl"}, "--prompts-file"),
    ({"profile": "mixed", "rag_share": 1.5}, "rag_share"),
    ({"profile": "chat", "max_tokens": 0}, "max_tokens"),
    ({"profile": "chat", "max_tokens": 4000}, "max_model_len"),
])
def test_bad_workload_options_are_refused(kwargs, message):
    with pytest.raises(WorkloadError, match=message.replace("-", r"\-")):
        Workload(**kwargs)


# ---- JSONL prompts ----------------------------------------------------------------------------------------------

def test_jsonl_prompts_are_read_in_order_and_cycled(tmp_path):
    path = tmp_path / "prompts.jsonl"
    lines = [{"prompt": "Say hello.", "max_tokens": 5}, {"messages": [{"role": "user", "content": "Hi"}]}]
    path.write_text(json.dumps(lines[0]) + "\n\n" + json.dumps(lines[1]) + "\n")
    workload = Workload("jsonl", prompts_file=path)
    prompts = [workload.prompt(i) for i in range(4)]
    assert [p.category for p in prompts] == ["jsonl"] * 4
    assert prompts[0].text == "Say hello." and prompts[0].max_tokens == 5
    assert prompts[1].chat_messages() == lines[1]["messages"] and prompts[1].max_tokens == 128
    assert prompts[2] == prompts[0] and prompts[3] == prompts[1]
    assert Workload("jsonl", prompts_file=path, max_tokens=9).prompt(0).max_tokens == 9
    workload = Workload("jsonl", prompts_file=path, endpoint="completions")
    assert request_body(workload.prompt(1), "m")[1]["prompt"] == "Hi"


@pytest.mark.parametrize("content, message", [
    (None, "prompts file not found"),
    ("", "holds no prompts"),
    ('{"prompt": "ok"}\n{not json\n', r":2: not valid JSON"),
    ('["a list"]\n', ":1: each line must be a JSON object"),
    ('{"text": "no prompt key"}\n', ':1: needs a non-empty "prompt"'),
    ('{"messages": [{"role": "user"}]}\n', ':1: needs a non-empty "prompt"'),
    ('{"prompt": "x", "max_tokens": 0}\n', ':1: "max_tokens" must be a positive integer'),
])
def test_bad_jsonl_files_say_what_is_wrong(tmp_path, content, message):
    path = tmp_path / "prompts.jsonl"
    if content is not None:
        path.write_text(content)
    with pytest.raises(WorkloadError, match=message):
        load_prompts_file(path)


# ---- report math ------------------------------------------------------------------------------------------------

def _sample(category="chat", ttft_s=0.5, e2e_s=2.0, num_output_tokens=16, ok=True, error_kind="", sent_at_s=0.0,
            itl_s=None, num_prompt_tokens=100) -> RequestSample:
    return RequestSample(category, "chat", sent_at_s, ok=ok, ttft_s=ttft_s if ok else None,
                         e2e_s=e2e_s,
                         itl_s=itl_s if itl_s is not None else [0.1] * (num_output_tokens - 1) if ok else [],
                         num_prompt_tokens=num_prompt_tokens if ok else 0,
                         num_output_tokens=num_output_tokens if ok else 0, error_kind=error_kind,
                         error_message=f"{error_kind} happened" if error_kind else "")


def test_percentiles_interpolate_linearly():
    values = list(range(100, 0, -1))  # 1..100, unsorted
    assert percentile(values, 50) == pytest.approx(50.5)
    assert percentile(values, 90) == pytest.approx(90.1)
    assert percentile(values, 99) == pytest.approx(99.01)
    assert percentile([3.0], 99) == 3.0 and percentile([], 50) is None
    stats = latency_stats([1.0, 2.0, 3.0, 4.0])
    assert stats == {"count": 4, "mean": 2.5, "p50": 2.5, "p90": pytest.approx(3.7), "p99": pytest.approx(3.97),
                     "max": 4.0}
    assert latency_stats([])["p50"] is None


def test_tpot_and_slo_of_one_request():
    assert tpot_s(_sample(ttft_s=0.5, e2e_s=2.0, num_output_tokens=16)) == pytest.approx(0.1)
    assert tpot_s(_sample(num_output_tokens=1)) == 0.0  # no second token: meets any TPOT target
    assert tpot_s(_sample(ok=False, error_kind="http_429")) is None
    assert meets_slo(_sample(ttft_s=0.5, e2e_s=2.0, num_output_tokens=16), 0.5, 0.1)
    assert not meets_slo(_sample(ttft_s=0.6, e2e_s=2.0, num_output_tokens=16), 0.5, 0.2)
    assert not meets_slo(_sample(ttft_s=0.5, e2e_s=2.1, num_output_tokens=16), 1.0, 0.1)
    assert not meets_slo(_sample(ok=False, error_kind="timeout"), 100, 100)


def test_attainment_goodput_and_throughput_on_known_samples():
    samples = ([_sample(ttft_s=0.2, e2e_s=1.7, num_output_tokens=16) for _ in range(6)]  # TPOT 0.1: good
               + [_sample(ttft_s=3.0, e2e_s=4.5, num_output_tokens=16) for _ in range(2)]  # TTFT too long
               + [_sample("rag", ttft_s=0.2, e2e_s=3.2, num_output_tokens=16)]  # TPOT 0.2: too long
               + [_sample("rag", ok=False, error_kind="http_429", e2e_s=0.01)])
    summary = summarize(samples, duration_s=3.0, slo_ttft_s=1.0, slo_tpot_s=0.1, run={"profile": "mixed"})
    assert (summary["num_requests"], summary["num_ok"], summary["num_failed"], summary["num_good"]) == (10, 9, 1, 6)
    assert summary["slo_attainment"] == pytest.approx(0.6)
    assert summary["goodput_rps"] == pytest.approx(2.0)
    assert summary["requests_per_s"] == pytest.approx(3.0)
    assert summary["output_tokens_per_s"] == pytest.approx(9 * 16 / 3.0)
    assert summary["prompt_tokens_per_s"] == pytest.approx(9 * 100 / 3.0)
    assert summary["errors"] == {"http_429": 1}
    assert summary["error_examples"] == {"http_429": "http_429 happened"}
    lat = summary["latency_s"]
    assert lat["ttft"]["count"] == 9 and lat["ttft"]["p50"] == pytest.approx(0.2)
    assert lat["tpot"]["p50"] == pytest.approx(0.1) and lat["tpot"]["max"] == pytest.approx(0.2)
    assert lat["itl"]["count"] == 9 * 15 and lat["itl"]["p99"] == pytest.approx(0.1)
    assert lat["e2e"]["max"] == pytest.approx(4.5)
    rag = summary["by_category"]["rag"]
    assert (rag["num_requests"], rag["num_failed"], rag["num_good"], rag["slo_attainment"]) == (2, 1, 0, 0.0)
    assert summary["by_category"]["chat"]["slo_attainment"] == pytest.approx(0.75)
    markdown = render_markdown(summary)
    assert "attainment | 60.0 % (6 requests)" in markdown
    assert "| goodput (req/s) | 2.000 |" in markdown and "| http_429 | 1 |" in markdown


def test_summary_of_no_requests_is_zero_not_an_error():
    summary = summarize([], duration_s=0.0, slo_ttft_s=1, slo_tpot_s=1)
    assert summary["num_requests"] == 0 and summary["slo_attainment"] == 0.0 and summary["goodput_rps"] == 0.0
    assert summary["latency_s"]["ttft"]["p99"] is None
    assert "none" in render_markdown(summary)


def test_report_files_and_plots_are_written(tmp_path):
    samples = [_sample(category, ttft_s=0.1 * (i % 7 + 1), e2e_s=1.0 + 0.1 * i, sent_at_s=0.5 * i,
                       num_prompt_tokens=1500 if category == "rag" else 80,
                       itl_s=[0.02 + 0.001 * j for j in range(15)])
               for i, category in enumerate(["chat", "rag", "chat", "chat"] * 5)]
    samples.append(_sample(ok=False, error_kind="stream_error", sent_at_s=3.0))
    summary = summarize(samples, 12.0, 1.0, 0.1)
    files = write_report(samples, summary, tmp_path / "report")
    assert set(files) == {"summary", "markdown", "samples", "plot_latency_cdf", "plot_itl_over_time"}
    written = json.loads(Path(files["summary"]).read_text())
    assert written["num_requests"] == 21 and written["files"] == files
    assert len(Path(files["samples"]).read_text().splitlines()) == 21
    markdown = Path(files["markdown"]).read_text()
    assert "![Latency CDFs by request category](latency_cdf.png)" in markdown and "| stream_error | 1 |" in markdown
    for key in ("plot_latency_cdf", "plot_itl_over_time"):
        data = Path(files[key]).read_bytes()
        assert data.startswith(PNG_SIGNATURE) and len(data) > 10_000, key
    empty = write_report([], summarize([], 0.0, 1, 1), tmp_path / "empty")  # "no data" plots, still valid
    assert Path(empty["plot_latency_cdf"]).read_bytes().startswith(PNG_SIGNATURE)


# ---- streaming client -------------------------------------------------------------------------------------------

def test_sse_lines_are_parsed():
    assert parse_sse_line(b'data: {"a": 1}') == {"a": 1}
    assert parse_sse_line("data: [DONE]\n") is DONE
    assert parse_sse_line("") is None and parse_sse_line(": keep-alive") is None
    with pytest.raises(StreamError, match="bad_stream"):
        parse_sse_line("data: {oops")


@pytest.mark.parametrize("endpoint", ["chat", "completions"])
def test_stream_request_times_every_token(fake_server, endpoint):
    prompt = Workload("chat", seed=1, endpoint=endpoint, max_tokens=6).prompt(0)
    path, body = request_body(prompt, MODEL)
    sample = RequestSample(prompt.category, endpoint, 0.0)
    events = []
    stream_request(requests.Session(), f"{fake_server.base_url}/v1{path}", body, sample, timeout_s=10,
                   on_token=lambda kind, s: events.append(kind))
    assert sample.ok and sample.route == "disaggregated" and sample.request_id.startswith("fake-")
    assert sample.transfer_s == FAKE_TRANSFER_S  # pdserve's own timing, from the usage chunk
    assert sample.num_chunks == 6 and sample.num_output_tokens == 6  # the role-only chat chunk is no token
    assert events == ["TTFT"] + ["ITL"] * 5 and len(sample.itl_s) == 5
    assert 0.02 <= sample.ttft_s <= sample.e2e_s and sample.num_prompt_tokens > 0


@pytest.mark.parametrize("model, kind", [("fail-429", "http_429"), ("fail-midstream", "stream_error"),
                                         ("fail-nodone", "incomplete_stream")])
def test_stream_request_failures_are_classified(fake_server, model, kind):
    sample = RequestSample("chat", "chat", 0.0)
    body = {"model": model, "messages": [{"role": "user", "content": "x"}], "max_tokens": 5, "stream": True}
    with pytest.raises(StreamError) as info:
        stream_request(requests.Session(), f"{fake_server.base_url}/v1/chat/completions", body, sample, timeout_s=10)
    assert info.value.kind == kind and not sample.ok and sample.e2e_s > 0
    if kind == "http_429":
        assert "server overloaded" in info.value.message and "retry-after 1" in info.value.message


def test_stream_request_to_a_closed_port_is_a_connection_error():
    with pytest.raises(StreamError, match="connection_error"):
        stream_request(requests.Session(), "http://127.0.0.1:9/v1/completions", {}, RequestSample("c", "c", 0),
                       timeout_s=5)


# ---- the locustfile, headless -----------------------------------------------------------------------------------

@pytest.mark.integration  # runs locust
def test_unreachable_server_exits_non_zero_with_a_clear_message(tmp_path):
    proc = _locust("--host", "http://127.0.0.1:9", "-t", "3s", "--report-dir", str(tmp_path / "r"))
    assert proc.returncode == 3, proc.stderr[-2000:]
    assert "server unreachable: GET http://127.0.0.1:9/v1/models failed" in proc.stderr
    assert not (tmp_path / "r").exists()


@pytest.mark.integration  # runs locust
@pytest.mark.parametrize("args, message", [
    (["--profile", "nope"], "unknown profile 'nope'; choose one of chat, rag, mixed, long, prefix, jsonl"),
    (["--request-rate", "-1"], "argument --request-rate: must be >= 0, got -1"),
    (["--prompts-file", "/nonexistent/prompts.jsonl"], "prompts file not found: /nonexistent/prompts.jsonl"),
    (["--slo-tpot-s", "0"], "argument --slo-tpot-s: must be > 0, got 0"),
])
def test_bad_options_exit_non_zero_with_a_clear_message(args, message):
    proc = _locust("--host", "http://127.0.0.1:9", "-t", "3s", *args)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert message in proc.stderr


@pytest.mark.integration  # runs locust
def test_open_loop_run_reports_what_the_server_served(fake_server, tmp_path):
    before = fake_server.num_completed
    summary = run_locust(fake_server.base_url, "mixed", 5.0, 4, tmp_path / "run", max_tokens=8, seed=3,
                         progress_interval_s=1, timeout_s=120)
    assert summary["exit_code"] == 0, Path(summary["log"]).read_text()[-3000:]
    assert summary["run"]["mode"] == "open_loop" and summary["run"]["profile"] == "mixed"
    assert 5 <= summary["num_requests"] <= 50  # Poisson at 5 req/s for 4 s
    assert summary["num_ok"] == summary["num_requests"] == fake_server.num_completed - before
    assert summary["num_output_tokens"] == 8 * summary["num_ok"]
    assert summary["latency_s"]["itl"]["count"] == 7 * summary["num_ok"]
    samples = [json.loads(line) for line in (tmp_path / "run" / "requests.jsonl").read_text().splitlines()]
    last_end_s = max(s["sent_at_s"] + s["e2e_s"] for s in samples)
    assert summary["duration_s"] > 3.5 and last_end_s <= summary["duration_s"]  # -t 4s, then the drain
    assert summary["duration_s"] < max(last_end_s, 4.0) + 1.0  # ends with the drain, not with the report
    assert summary["requests_per_s"] == pytest.approx(summary["num_ok"] / summary["duration_s"])
    run_dir = tmp_path / "run"
    assert re.search(r"progress \d+ s: sent \d+, done \d+, errors 0, in flight \d+, SLO attainment [\d.]+ %",
                     (run_dir / "locust.log").read_text())
    for name in ("summary.json", "report.md", "requests.jsonl", "latency_cdf.png", "itl_over_time.png",
                 "locust_stats.csv", "locust.html"):
        assert (run_dir / name).stat().st_size > 0, name
    rows = (run_dir / "locust_stats.csv").read_text().splitlines()
    e2e_counts = [int(r.split(",")[2]) for r in rows if r.startswith("E2E,")]
    assert sum(e2e_counts) == summary["num_requests"]
    assert any(r.startswith("TTFT,") for r in rows) and any(r.startswith("ITL,") for r in rows)


@pytest.mark.integration  # runs locust
def test_closed_loop_run_with_a_prompts_file(fake_server, tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text('{"prompt": "Say hi.", "max_tokens": 3}\n{"messages": [{"role": "user", "content": "Hi"}]}\n')
    before = fake_server.num_completed
    summary = run_locust(fake_server.base_url + "/v1", "jsonl", 0, 2, tmp_path / "run", num_users=2,
                         prompts_file=str(path), endpoint="both", no_plots=True, timeout_s=120)
    assert summary["exit_code"] == 0, Path(summary["log"]).read_text()[-3000:]
    assert summary["run"]["mode"] == "closed_loop" and summary["run"]["num_users"] == 2
    assert summary["num_ok"] == summary["num_requests"] == fake_server.num_completed - before > 2
    assert set(summary["by_category"]) == {"jsonl"}
    tokens = Counter(json.loads(line)["num_output_tokens"]
                     for line in (tmp_path / "run" / "requests.jsonl").read_text().splitlines())
    assert set(tokens) == {3, 128}  # the file's max_tokens, else the default
    assert not (tmp_path / "run" / "latency_cdf.png").exists()
