"""Rendering ``vocoder-bench`` results: the Markdown table and the bar chart."""

from __future__ import annotations


def _maybe(value) -> str:
    return "-" if value is None else f"{value:.2g}"


def _label(row: dict) -> str:
    backend = row.get("backend", "torch")
    return row["model"] if backend == "torch" else f"{row['model']} ({backend})"


def stream_table(rows: list[dict]) -> str:
    """The streaming rows of ``bench.json``: latency and real-time factor per chunk size."""
    lines = ["| model | chunk frames | lookahead frames | exact | algorithmic latency ms "
             "| first audio after (compute) ms | streamed RTF | samples/s |",
             "|---|---:|---:|---|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['chunk_frames']} | {r['lookahead_frames']} | "
                     f"{'yes' if r['exact'] else 'no'} | {r['algorithmic_latency_ms']:.0f} | "
                     f"{r['first_audio_ms']:.1f} | {r['real_time_factor']:.4f} | "
                     f"{r['samples_per_s']:,.0f} |")
    return "\n".join(lines) + "\n"


def markdown_table(rows: list[dict], ratios: dict, env: dict,
                   stream_rows: list[dict] | None = None) -> str:
    lines = [
        "| model | device | dtype | batch | audio s | samples/s | RTF | peak MB | params (M) "
        "| MACs/sample | bytes/sample | matmul floor | bandwidth floor | of floor "
        "| rel. error vs fp32 | log-mel L1 vs fp32 |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {_label(r)} | {r['device']} | {r['dtype']} | {r['batch']} | "
            f"{r['audio_seconds']:.2f} | {r['samples_per_s']:,.0f} | {r['real_time_factor']:.4f} | "
            f"{r['peak_memory_mb']:.0f} | {r['parameters'] / 1e6:.2f} | "
            f"{r['macs_per_sample'] / 1e3:,.1f} k | {r.get('bytes_per_sample', 0) / 1e3:,.1f} kB | "
            f"{r.get('matmul_floor_samples_per_s', 0):,.0f} | "
            f"{r.get('bandwidth_floor_samples_per_s', 0):,.0f} | "
            f"{r.get('fraction_of_floor', 0):.0%} | {_maybe(r.get('rel_audio_error_vs_fp32'))} | "
            f"{_maybe(r.get('log_mel_l1_vs_fp32'))} |"
        )
    lines.append("")
    if stream_rows:
        lines.append(stream_table(stream_rows))
    for k, v in ratios.items():
        lines.append(f"- {k.replace('_', ' ')}: {v:,.1f}x")
    lines.append("")
    lines.append(
        f"- machine: {env.get('gpu', env.get('cpu'))}, {env['threads']} thread(s); "
        f"torch {env['torch']}, python {env['python']}"
    )
    rates = env.get("rates", {})
    if rates:
        lines.append("- measured rates: " + ", ".join(
            f"{k.replace('matmul_gmacs_', 'matmul ')} {v:,.1f} "
            f"{'GB/s' if k == 'copy_gbps' else 'GMAC/s'}".replace("copy_gbps", "copy")
            for k, v in rates.items()))
        lines.append("- matmul floor: samples/s if the model's MACs ran at the square-matmul "
                     "rate; bandwidth floor: if its eager ops' bytes moved at the copy rate "
                     "(cache-resident intermediates can beat it); "
                     "of floor: measured over the lower of the two")
    return "\n".join(lines) + "\n"


def bar_chart(rows: list[dict], path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3))
    names = [f"{_label(r)}\n{r['dtype']} b{r['batch']}" for r in rows]
    values = [r["samples_per_s"] for r in rows]
    bars = ax.bar(names, values, color=["#4c72b0", "#dd8452", "#55a868", "#c44e52"][: len(rows)])
    ax.set_yscale("log")
    ax.set_ylabel("samples / s (log)")
    ax.set_title(f"synthesis speed on {rows[0]['device']}")
    for b, v in zip(bars, values, strict=True):
        ax.text(b.get_x() + b.get_width() / 2, v, f"{v:,.0f}", ha="center", va="bottom", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
