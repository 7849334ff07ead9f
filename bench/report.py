"""results.json and results.md: the raw record of a run, and the tables people read (ratios against eager fp32, and
each engine's sampled TPOT beside its greedy TPOT)."""

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
    up to rounding (bf16 drifts earlier than fp32). Sampled ids differ by engine (each has its own RNG): "–"."""
    if reference is None or "error" in reference or "error" in row or _sampling(row) != "greedy":
        return "–"
    same = 0
    for a, b in zip(row["tokens"], reference["tokens"]):
        if a != b:
            break
        same += 1
    return f"{same}/{len(reference['tokens'])}"


HEADER = ("| engine | prompt | batch | sampling | TTFT ms [min–max] | TTFT ratio | TPOT p50 ms [min–max] | "
          "TPOT p90 ms | TPOT ratio | decode tok/s | peak RSS MB | load s | cold start s | size MB | same tokens |")
SAMPLING_HEADER = "| engine | prompt | batch | greedy TPOT p50 ms | sampled TPOT p50 ms | sampled/greedy TPOT |"


def _sampling(row: dict) -> str:
    return row.get("sampling", "greedy")  # results written before sampling modes were all greedy


def _case(row: dict) -> tuple[int, int, str]:
    return row["prompt_length"], row["batch"], _sampling(row)


def table(shape: dict, reference_name: str, order: list[str]) -> list[str]:
    """One row per engine x case x sampling mode; ratios against the reference engine in the same case and mode."""
    sizes = {e["label"]: e["model_size_bytes"] for e in shape["engines"]}
    refs = {_case(r): r for r in shape["results"] if r["engine"] == reference_name}
    lines = [HEADER, "|" + "---|" * HEADER.count(" | ") + "---|"]
    rank = {name: i for i, name in enumerate(order)}
    for row in sorted(shape["results"], key=lambda r: (r["prompt_length"], r["batch"], rank.get(_sampling(r), 0))):
        ref = refs.get(_case(row))
        size = sizes.get(row["label"])
        size_text = _size(size, unit=False)
        if "error" in row:
            lines.append(f"| {row['label']} | {row['prompt_length']} | {row['batch']} | {_sampling(row)} | "
                         f"FAILED: {row['error']} |" + " |" * 10)
            continue
        s = row["summary"]
        lines.append(
            f"| {row['label']} | {row['prompt_length']} | {row['batch']} | {_sampling(row)} | {_ms(s['ttft_s'])} | "
            f"{_ratio(row, ref, 'ttft_s')} | {_ms(s['tpot_p50_s'])} | {s['tpot_p90_s']['median'] * 1e3:.2f} | "
            f"{_ratio(row, ref, 'tpot_p50_s')} | {s['decode_tok_s']['median']:.1f} | "
            f"{row['peak_rss_bytes'] / MB:.0f} | {row['load_s']:.2f} | {row['cold_start_s']:.2f} | {size_text} | "
            f"{_same_tokens(row, ref)} |")
    return lines


def sampling_table(shape: dict) -> list[str]:
    """Each engine's sampled TPOT beside its greedy TPOT on the same case: what sampling costs per token. Empty when
    only one mode ran."""
    runs = {(r["label"], _case(r)): r for r in shape["results"] if "error" not in r}
    lines = []  # (prompt length, batch, line)
    for (label, (length, batch, mode)), greedy in runs.items():
        sampled = runs.get((label, (length, batch, "sampled")))
        if mode != "greedy" or sampled is None:
            continue
        g, s = greedy["summary"]["tpot_p50_s"]["median"], sampled["summary"]["tpot_p50_s"]["median"]
        line = (f"| {label} | {length} | {batch} | {_ms(greedy['summary']['tpot_p50_s'])} | "
                f"{_ms(sampled['summary']['tpot_p50_s'])} | {s / g:.2f} |")
        lines.append((length, batch, line))
    if not lines:
        return []
    lines.sort(key=lambda line: line[:2])  # stable: engines in run order within a case
    return [SAMPLING_HEADER, "|" + "---|" * SAMPLING_HEADER.count(" | ") + "---|", *(line for *_, line in lines)]


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
    modes = w.get("sampling") or {"greedy": {"temperature": 0.0}}
    sampling_text = "; ".join(_mode(name, mode) for name, mode in modes.items())
    workload_line = (f"- Workload: {w['threads']} threads per engine; {w['new_tokens']} new tokens per row, "
                     f"EOS ignored; sampling: {sampling_text} (seed {w['seed']}); random prompt ids (seed "
                     f"{w['seed']}), the same for every engine; each engine x case x sampling in its own process, "
                     f"{w['warmup']} warm-up run(s) then {w['runs']} timed run(s): medians, [min–max] over runs")
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
        lines += table(shape, results["reference"], list(modes))
        cost = sampling_table(shape)
        if cost:
            lines += ["", f"### {shape['name']}: sampled ÷ greedy TPOT (each engine against itself, same case)", "",
                      *cost]
    if results["notes"]:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in results["notes"]]
    return "\n".join(lines) + "\n"


def _mode(name: str, mode: dict) -> str:
    if not mode.get("temperature"):
        return f"{name} (argmax)"
    return (f"{name} (temperature {mode['temperature']}, top_p {mode['top_p']}, repetition penalty "
            f"{mode['repetition_penalty']})")


def _size(size: int | None, *, unit: bool = True) -> str:
    if not size:
        return "–"
    return f"{size / MB:.{0 if size >= 10 * MB else 2}f}" + (" MB" if unit else "")


def write_markdown(results: dict, path: Path) -> Path:
    path.write_text(markdown(results))
    return path
