"""Run one headless locust load test as a subprocess and return its summary (for sweeps and tests).

    from loadtests.locust.runner import run_locust
    summary = run_locust("http://127.0.0.1:8000", "mixed", 2.0, 60, "reports/mixed-2rps", slo_ttft_s=2.0)
    summary["goodput_rps"], summary["latency_s"]["ttft"]["p99"]

Locust's CSV (``locust_*.csv``) and HTML (``locust.html``) reports and its output (``locust.log``) land in the same
folder as summary.json.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from .report import SUMMARY_FILE

LOCUSTFILE = Path(__file__).resolve().parent / "locustfile.py"
ROOT = LOCUSTFILE.parents[2]  # the repository: the run's working directory
LOG_FILE = "locust.log"
EXIT_OK, EXIT_REQUEST_FAILURES = 0, 1  # locust exits 1 when any request failed: the summary is still valid


class LoadTestFailed(RuntimeError):
    """The run wrote no summary: bad option, server unreachable, or a crash; the message carries locust's output."""


def _option(name: str) -> str:
    return "--" + name.replace("_", "-")


def locust_command(base_url: str, profile: str, rate: float, duration_s: float, report_dir: str | Path,
                   *, num_users: int = 1, **options) -> list[str]:
    """The locust command line: ``options`` are the locustfile's own (max_tokens=16 → --max-tokens 16;
    True → a bare flag; None or False → left out)."""
    report_dir = Path(report_dir)
    cmd = [sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless", "--only-summary",
           "--host", base_url, "--profile", profile, "--request-rate", str(rate),
           "-t", f"{max(1, round(duration_s))}s", "-u", str(num_users), "-r", str(max(1, num_users)),
           "--report-dir", str(report_dir), "--csv", str(report_dir / "locust"),
           "--html", str(report_dir / "locust.html")]
    for name, value in options.items():
        if value is None or value is False:
            continue
        cmd += [_option(name)] if value is True else [_option(name), str(value)]
    return cmd


def run_locust(base_url: str, profile: str = "chat", rate: float = 1.0, duration_s: float = 60,
               report_dir: str | Path = "loadtest-report", *, num_users: int = 1, timeout_s: float | None = None,
               **options) -> dict:
    """Run the load test; return the parsed summary.json, plus ``exit_code`` and ``log`` (locust's output).

    ``rate`` > 0: open loop at that many req/s; 0: closed loop with ``num_users`` users. ``options``: any other
    locustfile option, e.g. ``slo_ttft_s=2.0, slo_tpot_s=0.05, max_tokens=64, ignore_eos=True, seed=1``.
    Raises LoadTestFailed when locust wrote no summary or exited with another code than 0 or 1.
    """
    report_dir = Path(report_dir)
    report_dir.mkdir(parents=True, exist_ok=True)
    summary_path = report_dir / SUMMARY_FILE
    summary_path.unlink(missing_ok=True)  # never return a previous run's summary
    cmd = locust_command(base_url, profile, rate, duration_s, report_dir, num_users=num_users, **options)
    drain_s = float(options.get("drain_timeout_s") or 60)
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT,
                          timeout=timeout_s or duration_s + drain_s + 120)
    log_path = report_dir / LOG_FILE
    log_path.write_text(proc.stderr + proc.stdout)  # locust logs (progress lines) go to stderr, its tables to stdout
    if proc.returncode not in (EXIT_OK, EXIT_REQUEST_FAILURES) or not summary_path.exists():
        errors = [line for line in proc.stderr.splitlines() if "/ERROR/" in line or "error:" in line]
        raise LoadTestFailed(f"locust exited {proc.returncode}: " + ("\n".join(errors[-5:]) or proc.stderr[-3000:])
                             + f"\n(command: {' '.join(cmd)})")
    summary = json.loads(summary_path.read_text())
    return summary | {"exit_code": proc.returncode, "log": str(log_path)}
