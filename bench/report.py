"""Markdown tables and the PNG plot of a benchmark report."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

SYSTEMS = (
    ("twolane", "twolane (GenerateStream)"),
    ("twolane_http", "twolane (HTTP /v1/completions, SSE)"),
    ("hf_static", "(2) HF static batching"),
    ("hf_sequential", "(1) HF generate, one at a time"),
)


def ratios(run: dict[str, Any]) -> dict[str, float]:
    """twolane over each baseline: output tokens/s and request throughput."""
    out: dict[str, float] = {}
    ours = run.get("twolane")
    if not isinstance(ours, dict):
        return out
    for key, short in (("hf_sequential", "sequential"), ("hf_static", "static")):
        base = run.get(key)
        if isinstance(base, dict) and base["output_tokens_per_s"]:
            out[f"throughput_vs_{short}"] = (
                ours["output_tokens_per_s"] / base["output_tokens_per_s"]
            )
            out[f"ttft_p50_vs_{short}"] = base["ttft_s"]["p50"] / ours["ttft_s"]["p50"]
    http = run.get("twolane_http")
    if isinstance(http, dict) and ours["output_tokens_per_s"] and http["num_completed"]:
        # HTTP over gRPC: tokens/s below 1, or latencies above 1, are what HTTP costs.
        out["http_vs_grpc_tokens"] = http["output_tokens_per_s"] / ours["output_tokens_per_s"]
        out["http_vs_grpc_ttft_p50"] = http["ttft_s"]["p50"] / ours["ttft_s"]["p50"]
        out["http_vs_grpc_tpot_p50"] = http["tpot_s"]["p50"] / ours["tpot_s"]["p50"]
    lane = run.get("batch_lane")
    if isinstance(lane, dict) and ours["output_tokens_per_s"]:
        out["batch_lane_vs_interactive_tokens"] = (
            lane["output_tokens_per_s"] / ours["output_tokens_per_s"]
        )
    return out


def _ms(value: float) -> str:
    return "-" if value is None or math.isnan(value) else f"{value * 1000:.0f}"


def _pcts(dist: dict[str, float], scale_s: bool = False) -> str:
    if scale_s:
        return " / ".join(
            "-" if math.isnan(dist[p]) else f"{dist[p]:.2f}" for p in ("p50", "p90", "p99")
        )
    return " / ".join(_ms(dist[p]) for p in ("p50", "p90", "p99"))


def rows_table(runs: list[dict[str, Any]]) -> str:
    """Runs measured at a few concurrencies, twolane only (the SmolLM2 rows)."""
    runs = [r for r in runs if "rows" in r]
    if not runs:
        return ""
    w = runs[0]["workload"]
    lines = [
        f"### {runs[0]['model']}: prompts {w['prompt_lens']}, outputs {w['output_lens']}, "
        "twolane (GenerateStream)",
        "",
        "| dtype | in flight | requests | out tok/s | TTFT p50/p90/p99 ms | TPOT p50/p90/p99 ms |",
        "|---|---:|---:|---:|---|---|",
    ]
    for run in runs:
        for concurrency, s in run["rows"].items():
            lines.append(
                f"| {run['dtype']} | {concurrency} | {s['num_completed']}/{s['num_requests']} "
                f"| {s['output_tokens_per_s']:.0f} | {_pcts(s['ttft_s'])} | {_pcts(s['tpot_s'])} |"
            )
    return "\n".join([*lines, ""])


def _floor_note(dtype: str, roof: dict[str, Any]) -> str:
    compute = roof.get("compute_dtype", dtype)
    rate = f"{roof['matmul_flops_per_s'] / 1e9:.0f} GFLOP/s {compute}"
    if compute != dtype:
        native = roof["requested_dtype_matmul_flops_per_s"] / 1e9
        rate += f", the engine's choice here; {dtype} matmuls reach {native:.0f} GFLOP/s"
    return (
        f"compute floor {roof['workload_compute_floor_s']:.1f} s "
        f"({roof['workload_flops'] / 1e12:.2f} TFLOP at {rate}): twolane reaches "
        f"**{roof['twolane_fraction_of_compute_floor']:.0%}**"
    )


def run_table(run: dict[str, Any]) -> str:
    if "rows" in run:
        return ""
    if "error" in run:
        return f"### {run['model']} {run['dtype']}: failed\n\n```\n{run['error']}\n```\n"
    w = run["workload"]
    arrival = (
        f"Poisson {w['rate_per_s']}/s" if w["rate_per_s"] else f"concurrency {w['concurrency']}"
    )
    lines = [
        f"### {run['model']} {run['dtype']}: {w['num_requests']} requests, prompts "
        f"{w['prompt_lens']}, outputs {w['output_lens']}, {arrival}",
        "",
        "| system | req/s | out tok/s | TTFT p50/p90/p99 ms | TPOT p50/p90/p99 ms "
        "| ITL p50/p90/p99 ms | E2E p50/p90/p99 s | done |",
        "|---|---:|---:|---|---|---|---|---:|",
    ]
    for key, label in SYSTEMS:
        s = run.get(key)
        if not isinstance(s, dict):
            continue
        if key == "hf_sequential" and s["num_measured"] < s["num_requests"]:
            label += f" ({s['num_measured']} measured, rest fitted)"
        lines.append(
            f"| {label} | {s['request_throughput_per_s']:.2f} | {s['output_tokens_per_s']:.0f} "
            f"| {_pcts(s['ttft_s'])} | {_pcts(s['tpot_s'])} | {_pcts(s['itl_s'])} "
            f"| {_pcts(s['e2e_s'], scale_s=True)} | {s['num_completed']}/{s['num_requests']} |"
        )
    lane = run.get("batch_lane")
    if isinstance(lane, dict):
        lines.append(
            f"| batch lane (SubmitJob, {lane['num_jobs']} jobs, wait for events) "
            f"| {lane['jobs_per_s']:.2f} | {lane['output_tokens_per_s']:.0f} | - | - | - "
            f"| {lane['duration_s']:.2f} (all) | {lane['num_succeeded']}/{lane['num_jobs']} |"
        )
    r = run.get("ratios", {})
    parts = [f"{k} **{v:.2f}x**" for k, v in r.items()]
    roof = run.get("roofline")
    if isinstance(roof, dict) and "twolane_fraction_of_compute_floor" in roof:
        parts.append(_floor_note(run["dtype"], roof))
    lines += ["", "Ratios: " + "; ".join(parts) if parts else "", ""]
    if isinstance(roof, dict):
        lines += [
            f"Decode roofline (context {roof['context']}; read bandwidth "
            f"{roof['read_bytes_per_s'] / 1e9:.1f} GB/s, matmul "
            f"{roof['matmul_flops_per_s'] / 1e9:.0f} GFLOP/s, measured now):",
            "",
            "| batch | step ms | memory floor ms | compute floor ms | fraction of floor |",
            "|---:|---:|---:|---:|---:|",
        ]
        for d in roof["decode"]:
            lines.append(
                f"| {d['batch']} | {d['step_s'] * 1000:.1f} | {d['memory_floor_s'] * 1000:.1f} "
                f"| {d['compute_floor_s'] * 1000:.1f} | {d['fraction']:.0%} |"
            )
        lines.append("")
    return "\n".join(lines)


def tables(result: dict[str, Any]) -> str:
    head = f"## twolane bench, {result['date']}\n\n`{result['command']}`\n"
    wall = result.get("wall_s")
    if wall is not None:
        head += f"\nwall time {wall:.0f} s\n"
    body = "\n".join(run_table(r) for r in result["runs"])
    return head + "\n" + body + "\n" + rows_table(result["runs"])


def plot(result: dict[str, Any], path: Path) -> None:
    """Throughput, TTFT and decode-roofline panels, one group of bars per model and dtype."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [r for r in result["runs"] if "error" not in r and "rows" not in r]
    fig, axes = plt.subplots(1, 3, figsize=(17, 5))
    labels = [f"{r['model']}\n{r['dtype']}" for r in runs]
    keys = [(k, lab) for k, lab in SYSTEMS] + [("batch_lane", "batch lane")]
    width = 0.8 / len(keys)
    for i, (key, label) in enumerate(keys):
        xs = [j + i * width for j in range(len(runs))]
        tput = [r[key]["output_tokens_per_s"] if isinstance(r.get(key), dict) else 0 for r in runs]
        axes[0].bar(xs, tput, width, label=label)
        if key != "batch_lane":
            ttft = [r[key]["ttft_s"]["p50"] if isinstance(r.get(key), dict) else 0 for r in runs]
            axes[1].bar(xs, ttft, width, label=label)
    for ax, title in ((axes[0], "output tokens/s (log)"), (axes[1], "TTFT p50 (s, log)")):
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(runs))], labels)
        ax.set_title(title)
        ax.legend(fontsize=7)
    axes[0].set_yscale("log")
    axes[1].set_yscale("log")
    for r in runs:
        roof = r.get("roofline")
        if isinstance(roof, dict):
            batches = [d["batch"] for d in roof["decode"]]
            axes[2].plot(
                batches,
                [d["fraction"] for d in roof["decode"]],
                "o-",
                label=f"{r['model']} {r['dtype']}",
            )
    axes[2].set_xscale("log", base=2)
    axes[2].set_ylim(0, 1.05)
    axes[2].set_xlabel("decode batch")
    axes[2].set_title("decode step: fraction of roofline floor")
    axes[2].legend(fontsize=7)
    fig.suptitle(f"twolane bench {result['date']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
