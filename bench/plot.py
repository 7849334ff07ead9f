"""results.png: per shape, TTFT against prompt length and TPOT p50 against prompt length, one line per engine and
sampling mode (solid for the smallest batch, dashed for the largest), with min–max bars over runs. Needs matplotlib (the `bench`
extra); without it the plot is skipped with a note."""

from __future__ import annotations

from pathlib import Path

PANELS = (("ttft_s", "TTFT (ms)", "time to first token"), ("tpot_p50_s", "TPOT p50 (ms)", "time per output token"))


def write_plot(results: dict, path: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    shapes = results["shapes"]
    fig, axes = plt.subplots(len(shapes), len(PANELS), figsize=(12, 4.2 * len(shapes)), squeeze=False)
    threads = results["workload"]["threads"]
    for row_axes, shape in zip(axes, shapes):
        ok = [r for r in shape["results"] if "error" not in r]
        batches = sorted({r["batch"] for r in ok})
        styles = {b: "-" if b == batches[0] else (0, (4, 2 + 2 * i)) for i, b in enumerate(batches)}
        labels = list(dict.fromkeys((r["label"], r.get("sampling", "greedy")) for r in ok))
        colors = {label: f"C{i}" for i, label in enumerate(labels)}
        for ax, (metric, ylabel, title) in zip(row_axes, PANELS):
            for label in labels:
                for batch in batches:
                    points = sorted((r for r in ok if (r["label"], r.get("sampling", "greedy")) == label
                                     and r["batch"] == batch), key=lambda r: r["prompt_length"])
                    if not points:
                        continue
                    x = [r["prompt_length"] for r in points]
                    med = [r["summary"][metric]["median"] * 1e3 for r in points]
                    low = [m - r["summary"][metric]["min"] * 1e3 for m, r in zip(med, points)]
                    high = [r["summary"][metric]["max"] * 1e3 - m for m, r in zip(med, points)]
                    ax.errorbar(x, med, yerr=[low, high], color=colors[label], linestyle=styles[batch], marker="o",
                                markersize=4, capsize=3, label=f"{label[0]}, {label[1]}, batch {batch}")
            ax.set_xscale("log", base=2)
            lengths = sorted({r["prompt_length"] for r in ok})
            ax.set_xticks(lengths, [str(n) for n in lengths])
            ax.minorticks_off()
            ax.set_ylim(bottom=0)
            ax.set_xlabel("prompt length (tokens)")
            ax.set_ylabel(ylabel)
            ax.set_title(f"{shape['name']}: {title}, {threads} threads")
            ax.grid(True, alpha=0.3)
            ax.legend(fontsize=7)
    fig.suptitle(f"fastllm bench, {results['machine']['cpu']}, {results['workload']['new_tokens']} new tokens")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# -- the serving benchmark ------------------------------------------------------------------------------------------
SERVING_PANELS = (("throughput", "tokens/s", "aggregate tokens/s"), ("ttft", "TTFT (ms)", "time to first token"),
                  ("tpot", "TPOT (ms)", "time per output token"))


def write_serving_plot(results: dict, path: Path) -> Path | None:
    """Per shape, against concurrency (log 2): aggregate tokens/s (together: decode solid, output dashed; poisson
    output dotted), TTFT and TPOT p50 (solid) and p95 (dashed) of the together workload; one colour per model."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    shapes = results["shapes"]
    fig, axes = plt.subplots(len(shapes), len(SERVING_PANELS), figsize=(15, 4.4 * len(shapes)), squeeze=False)
    threads = results["workload"]["threads"]
    for row_axes, shape in zip(axes, shapes):
        rows = [r for r in shape["results"] if "error" not in r]
        levels = sorted({e["concurrency"] for r in rows for e in (r.get("together") or r.get("poisson") or [])})
        for i, row in enumerate(rows):
            together, poisson = row.get("together") or [], row.get("poisson") or []
            for ax, entries, key, scale, style, what in (
                    (row_axes[0], together, "decode_tok_s", 1, "-", "together decode"),
                    (row_axes[0], together, "output_tok_s", 1, "--", "together output"),
                    (row_axes[0], poisson, "output_tok_s", 1, ":", "poisson output"),
                    (row_axes[1], together, "ttft_p50_s", 1e3, "-", "p50"),
                    (row_axes[1], together, "ttft_p95_s", 1e3, "--", "p95"),
                    (row_axes[2], together, "tpot_p50_s", 1e3, "-", "p50"),
                    (row_axes[2], together, "tpot_p95_s", 1e3, "--", "p95")):
                points = [(e["concurrency"], e[key] * scale) for e in entries if e.get(key) is not None]
                if points:
                    ax.plot(*zip(*points), color=f"C{i}", linestyle=style, marker="o", markersize=4,
                            label=f"{row['label']}, {what}")
        for ax, (_, ylabel, title) in zip(row_axes, SERVING_PANELS):
            ax.set_xscale("log", base=2)
            if levels:
                ax.set_xticks(levels, [str(c) for c in levels])
            ax.minorticks_off()
            ax.set_ylim(bottom=0)
            ax.set_xlabel("concurrent requests")
            ax.set_ylabel(ylabel)
            ax.set_title(f"{shape['name']}: {title}, {threads} threads")
            ax.grid(True, alpha=0.3)
            ax.legend(fontsize=7)
    w = results["workload"]
    fig.suptitle(f"fastllm serving, {results['machine']['cpu']}, prompt {w['prompt_length']}, "
                 f"{w['new_tokens']} new tokens, greedy")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
