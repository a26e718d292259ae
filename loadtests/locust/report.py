"""The load-test report: per-request samples → SLO attainment, goodput, latency percentiles, throughput, errors.

Definitions (those of ``vllm bench serve`` where it has one):
- TTFT: request sent → first text-bearing event; ITL: the gap between consecutive text-bearing events (pooled over
  all requests); E2E: request sent → ``[DONE]``;
- TPOT = (E2E - TTFT) / (output_tokens - 1), with output_tokens from the usage chunk; 0 for answers of <= 1 token
  (they meet any TPOT target), and left out of the TPOT percentiles;
- a request meets the SLO when it succeeded with TTFT <= ``slo_ttft_s`` and TPOT <= ``slo_tpot_s``;
  SLO attainment = such requests / all requests (failed ones included); goodput = such requests / duration_s;
- requests/s and tokens/s count successful requests over ``duration_s``: from the start of the run until the
  requests in flight at its end were drained.
Percentiles interpolate linearly between order statistics (numpy's default).
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

PERCENTILES = (50, 90, 99)
LONG_PROMPT_TOKENS = 1000  # prompts at least this long are marked in the ITL-over-time plot
SUMMARY_FILE, MARKDOWN_FILE, SAMPLES_FILE = "summary.json", "report.md", "requests.jsonl"


@dataclass
class RequestSample:
    """What one request measured; times in seconds, ``sent_at_s`` since the start of the run."""

    category: str
    endpoint: str
    sent_at_s: float
    num_estimated_prompt_tokens: int = 0
    ok: bool = False
    ttft_s: float | None = None
    e2e_s: float | None = None
    itl_s: list[float] = field(default_factory=list)
    num_prompt_tokens: int = 0
    num_output_tokens: int = 0
    num_chunks: int = 0
    route: str = ""
    route_reason: str = ""
    transfer_s: float | None = None  # pdserve's own timing of the KV hand-off (pdserve_timing in the usage chunk)
    request_id: str = ""
    error_kind: str = ""
    error_message: str = ""

    @property
    def is_long_prompt(self) -> bool:
        return max(self.num_prompt_tokens, self.num_estimated_prompt_tokens) >= LONG_PROMPT_TOKENS

    def token_times_s(self) -> list[float]:
        """When each gap of ``itl_s`` ended, in seconds since the start of the run."""
        if self.ttft_s is None:
            return []
        t, times = self.sent_at_s + self.ttft_s, []
        for gap in self.itl_s:
            t += gap
            times.append(t)
        return times


def tpot_s(sample: RequestSample) -> float | None:
    """Time per output token after the first; None for failed requests, 0 for answers of <= 1 token."""
    if not sample.ok or sample.ttft_s is None or sample.e2e_s is None:
        return None
    if sample.num_output_tokens <= 1:
        return 0.0
    return (sample.e2e_s - sample.ttft_s) / (sample.num_output_tokens - 1)


def meets_slo(sample: RequestSample, slo_ttft_s: float, slo_tpot_s: float) -> bool:
    tpot = tpot_s(sample)
    return tpot is not None and sample.ttft_s <= slo_ttft_s and tpot <= slo_tpot_s


def percentile(values: Sequence[float], q: float) -> float | None:
    """The q-th percentile (0-100), linear interpolation between closest ranks; None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100.0
    lo, hi = math.floor(rank), math.ceil(rank)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (rank - lo)


def latency_stats(values: Sequence[float]) -> dict:
    stats = {"count": len(values), "mean": sum(values) / len(values) if values else None}
    stats |= {f"p{q}": percentile(values, q) for q in PERCENTILES}
    stats["max"] = max(values) if values else None
    return stats


def _metrics(samples: list[RequestSample], duration_s: float, slo_ttft_s: float, slo_tpot_s: float) -> dict:
    ok = [s for s in samples if s.ok]
    num_good = sum(meets_slo(s, slo_ttft_s, slo_tpot_s) for s in samples)
    tpots = [tpot_s(s) for s in ok if s.num_output_tokens > 1]
    num_output = sum(s.num_output_tokens for s in ok)
    num_prompt = sum(s.num_prompt_tokens for s in ok)
    per_s = (lambda n: n / duration_s) if duration_s > 0 else (lambda n: 0.0)
    return {
        "num_requests": len(samples), "num_ok": len(ok), "num_failed": len(samples) - len(ok), "num_good": num_good,
        "slo_attainment": num_good / len(samples) if samples else 0.0,
        "goodput_rps": per_s(num_good), "requests_per_s": per_s(len(ok)),
        "output_tokens_per_s": per_s(num_output), "prompt_tokens_per_s": per_s(num_prompt),
        "num_output_tokens": num_output, "num_prompt_tokens": num_prompt,
        "latency_s": {"ttft": latency_stats([s.ttft_s for s in ok]),
                      "itl": latency_stats([g for s in ok for g in s.itl_s]),
                      "tpot": latency_stats(tpots),
                      "e2e": latency_stats([s.e2e_s for s in ok]),
                      "transfer": latency_stats([s.transfer_s for s in ok
                                                 if s.route == "disaggregated" and s.transfer_s is not None])},
        "errors": dict(Counter(s.error_kind for s in samples if not s.ok).most_common()),
        "routes": dict(Counter(s.route for s in ok if s.route).most_common()),
        "route_reasons": dict(Counter(f"{s.route}/{s.route_reason}" for s in ok if s.route).most_common()),
    }


def summarize(samples: Iterable[RequestSample], duration_s: float, slo_ttft_s: float, slo_tpot_s: float,
              run: dict | None = None) -> dict:
    """The whole report as one JSON-able dict: totals, then the same metrics per request category."""
    samples = list(samples)
    summary = {"run": dict(run or {}), "duration_s": duration_s,
               "slo": {"ttft_s": slo_ttft_s, "tpot_s": slo_tpot_s}}
    summary |= _metrics(samples, duration_s, slo_ttft_s, slo_tpot_s)
    categories = sorted({s.category for s in samples})
    summary["by_category"] = {c: _metrics([s for s in samples if s.category == c], duration_s, slo_ttft_s, slo_tpot_s)
                              for c in categories}
    examples = {}
    for s in samples:
        if not s.ok and s.error_kind not in examples:
            examples[s.error_kind] = s.error_message[:300]
    summary["error_examples"] = examples
    return summary


def _fmt(value, digits: int = 3) -> str:
    if value is None:
        return "-"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def render_markdown(summary: dict, plots: dict[str, str] | None = None) -> str:
    run, slo = summary["run"], summary["slo"]
    lines = ["# pdserve load test", ""]
    if run:
        lines += ["| setting | value |", "|---|---|"] + [f"| {k} | {v} |" for k, v in run.items()] + [""]
    lines += ["## Results", "", "| metric | value |", "|---|---|",
              f"| duration (s) | {_fmt(summary['duration_s'], 1)} |",
              f"| requests (ok / failed) | {summary['num_requests']} ({summary['num_ok']} / {summary['num_failed']}) |",
              f"| SLO (TTFT <= {slo['ttft_s']} s and TPOT <= {slo['tpot_s']} s) attainment | "
              f"{100 * summary['slo_attainment']:.1f} % ({summary['num_good']} requests) |",
              f"| goodput (req/s) | {_fmt(summary['goodput_rps'])} |",
              f"| requests/s | {_fmt(summary['requests_per_s'])} |",
              f"| output tokens/s | {_fmt(summary['output_tokens_per_s'], 1)} |",
              f"| prompt tokens/s | {_fmt(summary['prompt_tokens_per_s'], 1)} |", "",
              "## Latency (s)", "", "| | count | mean | p50 | p90 | p99 | max |", "|---|---|---|---|---|---|---|"]
    for name, st in summary["latency_s"].items():
        lines.append(f"| {name.upper()} | {st['count']} | " + " | ".join(
            _fmt(st[k], 4) for k in ("mean", "p50", "p90", "p99", "max")) + " |")
    lines += ["", "## By request category", "",
              "| category | requests | failed | attainment | TTFT p50 | TTFT p99 | TPOT p50 | TPOT p99 | E2E p99 |",
              "|---|---|---|---|---|---|---|---|---|"]
    for cat, m in summary["by_category"].items():
        lat = m["latency_s"]
        lines.append(f"| {cat} | {m['num_requests']} | {m['num_failed']} | {100 * m['slo_attainment']:.1f} % | "
                     f"{_fmt(lat['ttft']['p50'])} | {_fmt(lat['ttft']['p99'])} | {_fmt(lat['tpot']['p50'], 4)} | "
                     f"{_fmt(lat['tpot']['p99'], 4)} | {_fmt(lat['e2e']['p99'])} |")
    lines += ["", "## Errors", ""]
    if summary["errors"]:
        lines += ["| kind | count | example |", "|---|---|---|"]
        lines += [f"| {k} | {n} | {summary['error_examples'].get(k, '').replace('|', '/')} |"
                  for k, n in summary["errors"].items()]
    else:
        lines.append("none")
    if summary["routes"]:
        lines += ["", "## Routes (x-pdserve-route)", "", "| route | requests |", "|---|---|"]
        lines += [f"| {k} | {n} |" for k, n in summary["routes"].items()]
    if plots:
        lines += ["", "## Plots", ""] + [f"![{title}]({Path(path).name})" for title, path in plots.items()]
    return "\n".join(lines) + "\n"


def write_report(samples: list[RequestSample], summary: dict, report_dir: str | Path, with_plots: bool = True) -> dict:
    """Write summary.json, report.md, requests.jsonl and the PNG plots; return {file kind: path}."""
    report_dir = Path(report_dir)
    report_dir.mkdir(parents=True, exist_ok=True)
    plots: dict[str, str] = {}
    if with_plots:
        from .plots import plot_itl_over_time, plot_latency_cdfs

        plots = {"Latency CDFs by request category": str(plot_latency_cdfs(samples, report_dir / "latency_cdf.png")),
                 "Inter-token latency over time": str(plot_itl_over_time(samples, report_dir / "itl_over_time.png"))}
    files = {"summary": str(report_dir / SUMMARY_FILE), "markdown": str(report_dir / MARKDOWN_FILE),
             "samples": str(report_dir / SAMPLES_FILE)} | {f"plot_{Path(p).stem}": p for p in plots.values()}
    summary = summary | {"files": files}
    Path(files["summary"]).write_text(json.dumps(summary, indent=2) + "\n")
    Path(files["markdown"]).write_text(render_markdown(summary, plots))
    with open(files["samples"], "w") as f:
        for s in samples:
            f.write(json.dumps(asdict(s)) + "\n")
    return files
