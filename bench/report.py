"""results.json and results.md: the raw record of a run, and the table people read (ratios against eager fp32)."""

from __future__ import annotations

import json
from pathlib import Path

MB = 1e6


def write_json(results: dict, path: Path) -> Path:
    path.write_text(json.dumps(results, indent=1) + "\n")
    return path


def _ms(stat: dict) -> str:
    return f"{stat['median'] * 1e3:.2f} [{stat['min'] * 1e3:.2f}–{stat['max'] * 1e3:.2f}]"


def _ratio(row: dict, reference: dict | None, metric: str) -> str:
    if reference is None or "error" in reference or "error" in row:
        return "–"
    return f"{row['summary'][metric]['median'] / reference['summary'][metric]['median']:.2f}"


def _same_tokens(row: dict, reference: dict | None) -> str:
    """How many leading new tokens of row 0 equal the reference's: same weights and prompt give the same greedy ids
    up to rounding (bf16 drifts earlier than fp32)."""
    if reference is None or "error" in reference or "error" in row:
        return "–"
    same = 0
    for a, b in zip(row["tokens"], reference["tokens"]):
        if a != b:
            break
        same += 1
    return f"{same}/{len(reference['tokens'])}"


HEADER = ("| engine | prompt | batch | TTFT ms [min–max] | TTFT ratio | TPOT p50 ms [min–max] | TPOT p90 ms | "
          "TPOT ratio | decode tok/s | peak RSS MB | load s | cold start s | size MB | same tokens |")


def table(shape: dict, reference_name: str) -> list[str]:
    sizes = {e["label"]: e["model_size_bytes"] for e in shape["engines"]}
    refs = {(r["prompt_length"], r["batch"]): r for r in shape["results"] if r["engine"] == reference_name}
    lines = [HEADER, "|" + "---|" * HEADER.count(" | ") + "---|"]
    for row in sorted(shape["results"], key=lambda r: (r["prompt_length"], r["batch"])):
        ref = refs.get((row["prompt_length"], row["batch"]))
        size = sizes.get(row["label"])
        size_text = _size(size, unit=False)
        if "error" in row:
            lines.append(f"| {row['label']} | {row['prompt_length']} | {row['batch']} | FAILED: {row['error']} |"
                         + " |" * 10)
            continue
        s = row["summary"]
        lines.append(
            f"| {row['label']} | {row['prompt_length']} | {row['batch']} | {_ms(s['ttft_s'])} | "
            f"{_ratio(row, ref, 'ttft_s')} | {_ms(s['tpot_p50_s'])} | {s['tpot_p90_s']['median'] * 1e3:.2f} | "
            f"{_ratio(row, ref, 'tpot_p50_s')} | {s['decode_tok_s']['median']:.1f} | "
            f"{row['peak_rss_bytes'] / MB:.0f} | {row['load_s']:.2f} | {row['cold_start_s']:.2f} | {size_text} | "
            f"{_same_tokens(row, ref)} |")
    return lines


def markdown(results: dict) -> str:
    m, v, w = results["machine"], results["versions"], results["workload"]
    memory = f"{m['memory_bytes'] / 2**30:.0f} GiB RAM" if m.get("memory_bytes") else "memory unknown"
    packages = ", ".join(f"{k} {v[k]}" for k in ("fastllm", "torch", "transformers", "onnxruntime", "optimum",
                                                 "onnxruntime-genai") if k in v)
    ref = next((e["label"] for s in results["shapes"] for e in s["engines"] if e["name"] == results["reference"]),
               results["reference"])
    machine_line = (f"- Machine: {m['cpu']} ({', '.join(m['cpu_flags']) or 'no AVX flags read'}), "
                    f"{m['usable_cores']} usable cores of {m['logical_cores']}, {memory}; {m['os']}, "
                    f"Python {m['python']}")
    workload_line = (f"- Workload: {w['threads']} threads per engine; {w['new_tokens']} new tokens per row, greedy, "
                     f"EOS ignored; random prompt ids (seed {w['seed']}), the same for every engine; each engine x "
                     f"case in its own process, {w['warmup']} warm-up run(s) then {w['runs']} timed run(s): "
                     "medians, [min–max] over runs")
    ratio_line = (f"- Ratios: engine ÷ {ref} on the same case (below 1.00 is faster). TPOT is the time per decode "
                  "step; decode tok/s = batch × steps / decode time. Load and cold start count from process start "
                  "(interpreter and imports included) to engine ready / first token. Same tokens: leading new "
                  "tokens of row 0 equal to the reference's.")
    lines = ["# fastllm bench", "", machine_line, f"- Packages: {packages}", workload_line, ratio_line,
             f"- Run: {results['created']}, {results.get('elapsed_s', 0):.0f} s"]
    for shape in results["shapes"]:
        engines = "; ".join(
            f"{e['label']} ({'skipped' if e['skipped'] else _size(e['model_size_bytes'])})" for e in shape["engines"])
        title = (f"## {shape['name']}: {shape['architecture']}, {shape['parameters'] / 1e6:.1f} M parameters "
                 f"(random weights), context {shape['max_context']}, {w['threads']} threads")
        lines += ["", title, "", f"Engines (size on disk): {engines}", ""]
        lines += table(shape, results["reference"])
    if results["notes"]:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in results["notes"]]
    return "\n".join(lines) + "\n"


def _size(size: int | None, *, unit: bool = True) -> str:
    if not size:
        return "–"
    return f"{size / MB:.{0 if size >= 10 * MB else 2}f}" + (" MB" if unit else "")


def write_markdown(results: dict, path: Path) -> Path:
    path.write_text(markdown(results))
    return path
