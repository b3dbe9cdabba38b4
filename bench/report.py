"""Run directories: write and read them, and render Markdown tables and PNG plots.

A run directory holds ``summary.json`` (settings, machine, one summary per stage),
``requests.jsonl`` (one record per request), ``report.md`` and the plots
``latency_vs_throughput.png``, ``ttft_cdf.png`` and ``tpot_cdf.png``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from bench.client import RequestRecord
from bench.metrics import tpot_s


@dataclass
class Run:
    label: str
    meta: dict
    stages: list[dict]  # summaries, each with a "stage" label
    requests: list[dict]  # RequestRecord.as_dict() rows


def write_run(out: Path, meta: dict, stages: list[dict], records: list[RequestRecord]) -> Run:
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps({"meta": meta, "stages": stages}, indent=1))
    with open(out / "requests.jsonl", "w") as f:
        for record in records:
            f.write(json.dumps(record.as_dict()) + "\n")
    run = Run(meta.get("label") or out.name, meta, stages, [r.as_dict() for r in records])
    (out / "report.md").write_text(run_markdown(run) + "\n")
    plot_runs([run], out)
    return run


def read_run(path: Path) -> Run:
    summary = json.loads((path / "summary.json").read_text())
    lines = (path / "requests.jsonl").read_text().splitlines()
    requests = [json.loads(line) for line in lines if line]
    return Run(
        summary["meta"].get("label") or path.name, summary["meta"], summary["stages"], requests
    )


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}" if value >= 100 else f"{value:.1f}"


def _share(shares: dict[str, float]) -> str:
    return ", ".join(f"{model} {share:.0%}" for model, share in shares.items()) or "-"


HEADER = (
    "| stage | done / failed | req/s | out tok/s | goodput req/s | TTFT mean / p50 / p99 ms "
    "| TPOT p50 / p99 ms | ITL p50 ms | E2E p50 / p99 ms | errors | served by |"
)


def separator(header: str) -> str:
    return "|---" * (header.count("|") - 1) + "|"


def stage_row(s: dict, prefix: str = "") -> str:
    goodput = "-" if s["goodput"] is None else f"{s['goodput']:.2f}"
    errors = ", ".join(f"{k}: {v}" for k, v in s["errors_by_status"].items()) or "-"
    return (
        f"| {prefix}{s['stage']} | {s['completed']} / {s['failed']} | {s['request_throughput']:.2f} "
        f"| {s['output_throughput']:.0f} | {goodput} "
        f"| {_ms(s['mean_ttft_ms'])} / {_ms(s['p50_ttft_ms'])} / {_ms(s['p99_ttft_ms'])} "
        f"| {_ms(s['p50_tpot_ms'])} / {_ms(s['p99_tpot_ms'])} | {_ms(s['p50_itl_ms'])} "
        f"| {_ms(s['p50_e2el_ms'])} / {_ms(s['p99_e2el_ms'])} | {errors} | {_share(s['served_share'])} |"
    )


def run_markdown(run: Run) -> str:
    meta = run.meta
    lines = [
        f"# {run.label}",
        "",
        f"- server: {meta.get('url')} model `{meta.get('model')}`",
        f"- profile `{meta.get('profile')}`, workload `{meta.get('workload')}`, "
        f"output tokens {meta.get('output_tokens')}, SLO {meta.get('slo') or '-'}",
        f"- machine: {meta.get('machine')}",
        "",
        HEADER,
        separator(HEADER),
    ]
    lines += [stage_row(stage) for stage in run.stages]
    return "\n".join(lines)


def plot_runs(runs: list[Run], out: Path) -> list[Path]:
    """Latency vs throughput (one point per stage), TTFT and TPOT CDFs (one line per run)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    paths = []
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for run in runs:
        x = [s["request_throughput"] for s in run.stages]
        for ax, key in zip(axes, ("ttft", "e2el"), strict=True):
            ax.plot(
                x,
                [s[f"p50_{key}_ms"] or np.nan for s in run.stages],
                "o-",
                label=f"{run.label} p50",
            )
            ax.plot(
                x,
                [s[f"p99_{key}_ms"] or np.nan for s in run.stages],
                "x--",
                label=f"{run.label} p99",
            )
    for ax, title in zip(axes, ("TTFT", "end-to-end latency"), strict=True):
        ax.set(xlabel="completed requests/s", ylabel="ms", title=f"{title} vs throughput")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    paths.append(_save(fig, out / "latency_vs_throughput.png"))

    for name, values in (("ttft", _ttfts), ("tpot", _tpots)):
        fig, ax = plt.subplots(figsize=(6, 4))
        for run in runs:
            ms = np.sort(np.asarray(values(run.requests)) * 1000)
            if len(ms):
                ax.plot(ms, np.arange(1, len(ms) + 1) / len(ms), label=run.label)
        ax.set(xlabel=f"{name.upper()} ms", ylabel="share of requests", title=f"{name.upper()} CDF")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        paths.append(_save(fig, out / f"{name}_cdf.png"))
    return paths


def _records(rows: list[dict]) -> list[RequestRecord]:
    return [r for r in (RequestRecord(**row) for row in rows) if r.success]


def _ttfts(rows: list[dict]) -> list[float]:
    return [r.ttft_s for r in _records(rows)]


def _tpots(rows: list[dict]) -> list[float]:
    return [tpot_s(r) for r in _records(rows) if r.output_tokens > 1]


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path
