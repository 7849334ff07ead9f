"""Quality per bit: fastllm's int8 / int4 / mixed int4 beside llama.cpp's Q8_0 / Q4_0 / Q4_K (export/baselines.py,
fake-quantized in numpy on the same weights), all measured by the same quality report on the same tokens.

    .venv/bin/python -m fastllm.export.quality_table FP32_DIR [FP32_DIR ...] --out DIR [--settings ...]

Each FP32_DIR is an fp32 fastllm model directory. Its quantized copies are written under DIR/<model name>/<setting>
(DIR must not hold them yet), results to DIR/quality.json and DIR/quality.md. Besides the quality report's
perplexity, mean KL and greedy agreement, its loop count: of the probe prompts, how many greedy continuations of
128 tokens end in a cycle (the last 32 tokens repeat with a period of at most 16), fp32 and each setting. Bits
per weight: of the matrices quantized (MatMul weights, LM head, embedding), with their scales; for fastllm from
the sizes on disk, for the baselines from the format.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict
from pathlib import Path

from fastllm.export.baselines import fake_quantized_copy, matrix_weights
from fastllm.export.corpus import held_out_text
from fastllm.export.precision import QuantOptions
from fastllm.export.quality import quality_report
from fastllm.export.quantize import directory_size, quantize_model

# the defaults (fitted scales, activation-aware), the same with ONNX Runtime's round-to-nearest and no calibration
# (the defaults before them), blocks of 64 (int4 at Q4_0's bits), and mixed int4
FASTLLM = {"int8": QuantOptions("int8"), "int8-rtn": QuantOptions("int8", fit_scales=False, activation_aware=False),
           "int4": QuantOptions("int4"), "int4-rtn": QuantOptions("int4", fit_scales=False, activation_aware=False),
           "int4-b64": QuantOptions("int4", block_size=64), "int4-mixed": QuantOptions("int4", mixed="int8")}
BASELINES = ("q8_0", "q4_0", "q4_k")
def measure(fp32_dir: Path, out: Path, settings: list[str], text: str, progress=print) -> dict:
    fp32_dir = Path(fp32_dir)
    prompts = 0
    fp32_size = directory_size(fp32_dir)
    rows = {"fp32": {"bits_per_weight": 32.0, "size_bytes": fp32_size}}
    weights = matrix_weights(fp32_dir)
    for setting in settings:
        target = out / setting
        t0 = time.perf_counter()
        progress(f"{fp32_dir.name}: {setting} -> {target}")
        if setting in BASELINES:
            made = fake_quantized_copy(fp32_dir, target, setting)
            report = quality_report(fp32_dir, target, text=text)
            # what the file would hold: the matrices at the format's bits, everything else as in fp32
            size = fp32_size - 4 * made["weights"] + made["weights"] * made["bits_per_weight"] / 8
            row = {"bits_per_weight": made["bits_per_weight"], "size_bytes": int(size), "formats": made["matrices"]}
        else:
            manifest = quantize_model(fp32_dir, target, FASTLLM[setting], text=text, force=True)
            report = manifest.quantization["quality"]
            row = {"size_bytes": directory_size(target), "options": asdict(FASTLLM[setting]),
                   "kept": (manifest.quantization.get("mixed_precision") or {}).get("kept_count")}
        row.update(perplexity=report["perplexity"], kl=report["logits"]["mean_kl"], greedy=report["greedy"],
                   loops=report.get("loops", {}).get("quantized"), seconds=time.perf_counter() - t0)
        rows["fp32"]["loops"] = report.get("loops", {}).get("fp32")  # the same in every report: same prompts
        prompts = report.get("loops", {}).get("prompts", 0)
        rows[setting] = row
    for setting, row in rows.items():
        if "bits_per_weight" not in row:  # fastllm: the quantized bytes spent on the matrices, per weight
            row["bits_per_weight"] = 8 * (row["size_bytes"] - (fp32_size - 4 * weights)) / weights
    return {"model": str(fp32_dir), "prompts": prompts, "matrix_weights": weights, "settings": rows}


def _loops(row: dict, result: dict) -> str:
    return "–" if row.get("loops") is None else f"{row['loops']}/{result['prompts']}"


def markdown(results: list[dict]) -> str:
    header = ("| model | setting | bits/weight | size MB | perplexity (Δ) | mean KL | greedy identical / agreeing "
              "prefix (of 32) | loops in 128 tokens |")
    lines = [header, "|---|---|---|---|---|---|---|---|"]
    for r in results:
        name = Path(r["model"]).name
        for setting, row in r["settings"].items():
            if setting == "fp32":
                lines.append(f"| {name} | fp32 | 32 | {row['size_bytes'] / 1e6:.1f} | – | – | – | "
                             f"{_loops(row, r)} |")
                continue
            p, g = row["perplexity"], row["greedy"]
            lines.append(f"| {name} | {setting} | " + quality_cells(
                row["bits_per_weight"], row["size_bytes"], p["quantized"], p["relative_increase"], row["kl"],
                g["identical"], g["prompts"], g["mean_agreeing_prefix"], _loops(row, r)))
    return "\n".join(lines) + "\n"


def quality_cells(bits: float, size_bytes: int, ppl: float, increase: float, kl: float, identical: int,
                  prompts: int, agreeing_prefix: float, loops: str) -> str:
    """The table's cells from bits/weight to loops, as every quality table here writes them."""
    return (f"{bits:.2f} | {size_bytes / 1e6:.1f} | {ppl:.3f} ({increase:+.2%}) | {kl:.2e} | "
            f"{identical}/{prompts}, {agreeing_prefix:.1f} | {loops} |")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m fastllm.export.quality_table", description=__doc__.splitlines()[0])
    p.add_argument("fp32_dirs", nargs="+", type=Path)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--settings", default=",".join([*FASTLLM, *BASELINES]),
                   help=f"comma-separated, from {', '.join([*FASTLLM, *BASELINES])}")
    args = p.parse_args(argv)
    settings = [s.strip() for s in args.settings.split(",") if s.strip()]
    unknown = [s for s in settings if s not in FASTLLM and s not in BASELINES]
    if unknown:
        p.error(f"unknown settings {unknown}; choose from {', '.join([*FASTLLM, *BASELINES])}")
    if (args.out / "quality.json").exists():
        p.error(f"{args.out} already holds quality.json; choose another --out")
    taken = [args.out / d.name for d in args.fp32_dirs if (args.out / d.name).exists()]
    if taken:
        p.error(f"{taken[0]} already exists; choose another --out")
    text = held_out_text()
    results = [measure(d, args.out / d.name, settings, text) for d in args.fp32_dirs]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "quality.json").write_text(json.dumps(results, indent=1, default=str) + "\n")
    table = markdown(results)
    (args.out / "quality.md").write_text(table)
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

