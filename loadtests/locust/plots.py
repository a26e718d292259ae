"""PNG plots of a load test (matplotlib, Agg backend): latency CDFs by request category; ITL over time."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from .report import RequestSample, tpot_s  # noqa: E402


def _ecdf(ax, values: list[float], label: str) -> None:
    ordered = sorted(values)
    n = len(ordered)
    ax.step(ordered, [(i + 1) / n for i in range(n)], where="post", label=f"{label} (n={n})")


def plot_latency_cdfs(samples: list[RequestSample], path: str | Path) -> Path:
    """Four panels (TTFT, ITL, TPOT, E2E), one CDF per request category, of successful requests."""
    ok = [s for s in samples if s.ok]
    panels = [("TTFT", "time to first token (s)", "fraction of requests", lambda s: [s.ttft_s]),
              ("ITL", "inter-token gap (s)", "fraction of gaps", lambda s: s.itl_s),
              ("TPOT", "time per output token (s)", "fraction of requests",
               lambda s: [tpot_s(s)] if s.num_output_tokens > 1 else []),
              ("E2E", "end-to-end latency (s)", "fraction of requests", lambda s: [s.e2e_s])]
    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    for ax, (title, xlabel, ylabel, values_of) in zip(axes.flat, panels, strict=True):
        drawn = False
        for category in sorted({s.category for s in ok}):
            values = [v for s in ok if s.category == category for v in values_of(s)]
            if values:
                _ecdf(ax, values, category)
                drawn = True
        if drawn:
            ax.legend(loc="lower right")
        else:
            ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
        ax.set(title=f"{title} CDF", xlabel=xlabel, ylabel=ylabel, ylim=(0, 1.02))
        ax.grid(alpha=0.3)
    fig.suptitle(f"Latency CDFs by request category ({len(ok)} successful requests)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)


def plot_itl_over_time(samples: list[RequestSample], path: str | Path) -> Path:
    """Every inter-token gap at the time it ended, coloured by category; a dashed line where a long prompt was sent."""
    fig, ax = plt.subplots(figsize=(12, 5))
    categories = sorted({s.category for s in samples})
    drawn = False
    for category in categories:
        times, gaps = [], []
        for s in samples:
            if s.category == category and s.itl_s:
                ends = s.token_times_s()
                times += ends
                gaps += s.itl_s[:len(ends)]
        if gaps:
            ax.scatter(times, gaps, s=6, alpha=0.6, label=f"{category} gaps")
            drawn = True
    # Marked only among shorter ones (in the prefix profile every prompt is long, and mostly cached).
    long_sent = sorted(s.sent_at_s for s in samples if s.is_long_prompt) if any(
        not s.is_long_prompt for s in samples) else []
    for i, t in enumerate(long_sent):
        ax.axvline(t, color="red", linestyle="--", linewidth=0.8, alpha=0.6,
                   label=f"long prompt sent ({len(long_sent)})" if i == 0 else None)
    if drawn or long_sent:
        ax.legend(loc="upper right")
    if not drawn:
        ax.text(0.5, 0.5, "no inter-token gaps", ha="center", va="center", transform=ax.transAxes)
    ax.set(title="Inter-token latency over time (dashed: arrival of a long prompt)",
           xlabel="time since start of the run (s)", ylabel="inter-token gap (s)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)
