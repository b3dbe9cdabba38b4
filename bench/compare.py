"""Several runs side by side: one table with ratios to a baseline, one set of plots.

Either existing run directories, or a YAML file that lists variants for the harness to launch
one at a time with the engine CLI (same workload against each, server stopped in between):

    baseline: bf16
    run: {profile: "concurrency:8", workload: product, num_requests: 64, output_tokens: "64"}
    variants:
      - {name: bf16, config: configs/cpu-small.yaml}
      - {name: int8, config: configs/cpu-small-int8.yaml}
      - {name: vllm, url: "http://127.0.0.1:8000", model: qwen3-vl-small}   # already running
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import yaml

from bench.launch import ServerProcess, engine_command, free_port
from bench.report import HEADER, Run, plot_runs, read_run, separator, stage_row
from bench.runner import RunSettings, run_benchmark

RATIOS = (
    ("request_throughput", "req/s"),
    ("output_throughput", "out tok/s"),
    ("p50_ttft_ms", "p50 TTFT"),
    ("p50_tpot_ms", "p50 TPOT"),
)


def _ratio(value: float | None, base: float | None) -> str:
    return "-" if not value or not base else f"{value / base:.2f}x"


def compare_markdown(runs: list[Run], baseline: str) -> str:
    base = next((r for r in runs if r.label == baseline), None)
    if base is None:
        raise ValueError(f"baseline {baseline!r} is not one of {[r.label for r in runs]}")
    ratio_header = (
        "| variant | stage | " + " | ".join(f"{name} vs {baseline}" for _, name in RATIOS) + " |"
    )
    lines = [
        f"# {' vs '.join(r.label for r in runs)}",
        "",
        HEADER.replace("| stage |", "| variant: stage |"),
        separator(HEADER),
    ]
    for run in runs:
        lines += [stage_row(stage, prefix=f"{run.label}: ") for stage in run.stages]
    lines += ["", ratio_header, separator(ratio_header)]
    for run in runs:
        for i, stage in enumerate(run.stages):
            reference = base.stages[i] if i < len(base.stages) else {}
            cells = [_ratio(stage[key], reference.get(key)) for key, _ in RATIOS]
            lines.append(f"| {run.label} | {stage['stage']} | " + " | ".join(cells) + " |")
    ready = [(r.label, r.meta["server_ready_s"]) for r in runs if r.meta.get("server_ready_s")]
    if ready:
        lines += ["", "Server start to healthy: " + ", ".join(f"{n} {s:.0f} s" for n, s in ready)]
    lines += ["", f"Machine: {runs[0].meta.get('machine')}"]
    return "\n".join(lines)


def compare_runs(run_dirs: list[Path], out: Path, baseline: str | None = None) -> str:
    runs = [read_run(path) for path in run_dirs]
    return write_comparison(runs, out, baseline or runs[0].label)


def write_comparison(runs: list[Run], out: Path, baseline: str) -> str:
    out.mkdir(parents=True, exist_ok=True)
    table = compare_markdown(runs, baseline)
    (out / "compare.md").write_text(table + "\n")
    plot_runs(runs, out)
    return table


def compare_variants(spec_path: Path, out: Path, progress: bool = True) -> str:
    """Launch (or reach) each variant in turn, run the same workload(s), write the comparison.
    ``run`` may be one settings mapping or a list (e.g. concurrency 1 and 32): each variant is
    launched once and runs them all; each gets its own table (``out/<i>/compare.md``).
    ``rounds: N`` repeats it all N times, the variants' order reversed every other round
    (``out/round-<r>/``), and adds the mean over rounds of each same-round ratio."""
    spec = yaml.safe_load(spec_path.read_text())
    rounds = int(spec.get("rounds", 1))
    baseline = spec.get("baseline") or spec["variants"][0]["name"]
    if rounds == 1:
        return _variants_round(spec, out, baseline, spec["variants"], progress)[0]
    tables, all_runs = [], []
    for number in range(1, rounds + 1):
        order = spec["variants"] if number % 2 else spec["variants"][::-1]
        table, runs = _variants_round(spec, out / f"round-{number}", baseline, order, progress)
        tables.append(f"## round {number}\n\n{table}")
        all_runs.append(runs)
    summary = mean_ratios(all_runs, baseline)
    (out / "summary.md").write_text(summary + "\n")
    return "\n\n".join([*tables, summary])


def mean_ratios(rounds: list[list[list[Run]]], baseline: str) -> str:
    """Per variant and workload: the mean over rounds of its ratio to the baseline's run in the
    same round (and the range), for each of ``RATIOS``."""
    header = "| variant | stage | " + " | ".join(f"{n} vs {baseline}" for _, n in RATIOS) + " |"
    lines = [f"## mean of {len(rounds)} rounds (range)", "", header, separator(header)]
    for plan in range(len(rounds[0])):
        labels = [r.label for r in rounds[0][plan]]
        for label in labels:
            for stage in range(len(rounds[0][plan][0].stages)):
                cells = []
                for key, _ in RATIOS:
                    values = []
                    for one in rounds:
                        runs = {r.label: r for r in one[plan]}
                        value, base = (
                            runs[label].stages[stage][key],
                            runs[baseline].stages[stage][key],
                        )
                        if value and base:
                            values.append(value / base)
                    cells.append(
                        f"{sum(values) / len(values):.2f}x ({min(values):.2f}-{max(values):.2f})"
                        if values
                        else "-"
                    )
                name = rounds[0][plan][0].stages[stage]["stage"]
                lines.append(f"| {label} | {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _variants_round(
    spec: dict, out: Path, baseline: str, variants: list[dict], progress: bool
) -> tuple[str, list[list[Run]]]:
    plans = spec.get("run", {})
    plans = plans if isinstance(plans, list) else [plans]
    runs: list[list[Run]] = [[] for _ in plans]

    def play(base_url: str, model: str, name: str, extra: dict) -> None:
        for i, plan in enumerate(plans):
            run_dir = out / name if len(plans) == 1 else out / str(i) / name
            settings = RunSettings(
                url=base_url, model=model, label=name, progress=progress, extra_meta=extra, **plan
            )
            runs[i].append(run_benchmark(settings, run_dir))

    for variant in variants:
        name = variant["name"]
        if "config" not in variant:
            play(variant["url"], variant["model"], name, {})
            continue
        from engine.config import load_config

        config_path = Path(variant["config"])
        model = variant.get("model") or load_config(config_path).primary.name
        port = free_port()
        with tempfile.TemporaryDirectory() as tmp:
            server = ServerProcess(
                engine_command(config_path, port),
                f"http://127.0.0.1:{port}",
                Path(tmp) / "server.log",
            )
            try:
                extra = {"server_ready_s": round(server.ready_s, 1), "config": str(config_path)}
                play(server.base_url, model, name, extra)
            finally:
                server.stop()
    order = [v["name"] for v in spec["variants"]]  # tables in the spec's order, every round
    runs = [sorted(r, key=lambda run: order.index(run.label)) for r in runs]
    if len(plans) == 1:
        return write_comparison(runs[0], out, baseline), runs
    tables = [write_comparison(r, out / str(i), baseline) for i, r in enumerate(runs)]
    return "\n\n".join(tables), runs
