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


PEER_HEADER = ("| fastllm | llama.cpp | prompt | sampling | TTFT ms | llama.cpp TTFT ms | TTFT ratio | TPOT p50 ms | "
               "llama.cpp TPOT p50 ms | TPOT ratio |")
PEER_FILE_TYPE = {"fp32": "f32", "int8": "q8_0", "int4": "q4_0"}  # fastllm precision -> llama.cpp file type


def peer_table(shape: dict) -> list[str]:
    """Each fastllm row beside llama.cpp at the same bits (fp32 / f32, int8 / q8_0, int4 / q4_0), same case and
    sampling mode: fastllm ÷ llama.cpp. Empty when llama.cpp did not run."""
    precision = {e["label"]: e["precision"] for e in shape["engines"]}
    peers = {(precision.get(r["label"]), _case(r)): r
             for r in shape["results"] if r["engine"] == "llamacpp" and "error" not in r}
    lines = []
    for row in shape["results"]:
        if row["engine"] != "fastllm" or "error" in row:
            continue
        peer = peers.get((PEER_FILE_TYPE.get(precision.get(row["label"], "")), _case(row)))
        if peer is None:
            continue
        s, q = row["summary"], peer["summary"]
        lines.append(f"| {row['label']} | {peer['label']} | {row['prompt_length']} | {_sampling(row)} | "
                     f"{_ms(s['ttft_s'])} | {_ms(q['ttft_s'])} | {_ratio(row, peer, 'ttft_s')} | "
                     f"{_ms(s['tpot_p50_s'])} | {_ms(q['tpot_p50_s'])} | {_ratio(row, peer, 'tpot_p50_s')} |")
    return [PEER_HEADER, "|" + "---|" * PEER_HEADER.count(" | ") + "---|", *lines] if lines else []


def markdown(results: dict) -> str:
    m, v, w = results["machine"], results["versions"], results["workload"]
    memory = f"{m['memory_bytes'] / 2**30:.0f} GiB RAM" if m.get("memory_bytes") else "memory unknown"
    packages = ", ".join(f"{k} {v[k]}" for k in ("fastllm", "torch", "transformers", "onnxruntime", "optimum",
                                                 "onnxruntime-genai", "llama-cpp-python", "gguf") if k in v)
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
        peer = peer_table(shape)
        if peer:
            heading = f"### {shape['name']}: fastllm ÷ llama.cpp at the same bits per weight (below 1.00 is faster)"
            lines += ["", heading, "", *peer]
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


# -- the serving benchmark (bench.serving_runner) -----------------------------------------------------------------
TOGETHER_HEADER = ("| engine | concurrency | requests (waves) | output tok/s | decode tok/s | decode ÷ 1 stream | "
                   "TTFT p50 ms | TTFT p95 ms | TTFT p95 ÷ 1-stream TTFT | TPOT p50 ms | TPOT p95 ms | load |")
POISSON_HEADER = ("| engine | max in flight | requests | output tok/s | mean in flight | queue p50 ms | queue p95 ms | "
                  "TTFT p50 ms | TTFT p95 ms | TTFT p95 ÷ 1-stream TTFT | TPOT p50 ms | TPOT p95 ms | load |")
TARGETS_HEADER = ("| engine | decode tok/s at {c} ÷ 1 stream | target | TTFT p95 at {c} ÷ 1-stream TTFT | target | "
                  "cached-prefix TTFT ÷ uncached | target |")
PREFIX_HEADER = ("| engine | prompt | cached prefix | uncached TTFT ms | cached TTFT ms | ratio | cached tokens "
                 "reported |")


def _opt(value: float | None, scale: float = 1.0, digits: int = 1) -> str:
    return "–" if value is None else f"{value * scale:.{digits}f}"


def _rule(header: str) -> str:
    return "|" + "---|" * (header.count(" | ") + 1)


def _verdict(value: float | None, target: float | None, met: bool | None, sign: str) -> str:
    if target is None:
        return "–"
    return f"{sign} {target:g}" + ("" if met is None else (" ✓" if met else " ✗ missed"))


def serving_tables(shape: dict, targets: dict) -> list[str]:
    rows = [r for r in shape["results"] if "error" not in r]
    lines = []
    together = [(r, e) for r in rows for e in r.get("together") or []]
    if together:
        lines += ["", f"### {shape['name']}: together (requests of one wave submitted at once)", "",
                  TOGETHER_HEADER, _rule(TOGETHER_HEADER)]
        for r, e in together:
            lines.append(f"| {r['label']} | {e['concurrency']} | {e['requests']} ({e['waves']}) | "
                         f"{_opt(e['output_tok_s'])} | {_opt(e['decode_tok_s'])} | {_opt(e['decode_vs_1'], digits=2)} | "
                         f"{_opt(e['ttft_p50_s'], 1e3)} | {_opt(e['ttft_p95_s'], 1e3)} | "
                         f"{_opt(e['ttft_p95_vs_1'], digits=2)} | {_opt(e['tpot_p50_s'], 1e3, 2)} | "
                         f"{_opt(e['tpot_p95_s'], 1e3, 2)} | {_opt(e.get('load_average'), digits=2)} |")
    poisson = [(r, e) for r in rows for e in r.get("poisson") or []]
    if poisson:
        rate = poisson[0][1]["rate"]
        lines += ["", f"### {shape['name']}: poisson ({rate:g} requests/s on average, at most c in flight)", "",
                  POISSON_HEADER, _rule(POISSON_HEADER)]
        for r, e in poisson:
            lines.append(f"| {r['label']} | {e['concurrency']} | {e['requests']} | {_opt(e['output_tok_s'])} | "
                         f"{_opt(e['mean_in_flight'], digits=2)} | {_opt(e['queue_p50_s'], 1e3)} | "
                         f"{_opt(e['queue_p95_s'], 1e3)} | {_opt(e['ttft_p50_s'], 1e3)} | "
                         f"{_opt(e['ttft_p95_s'], 1e3)} | {_opt(e['ttft_p95_vs_1'], digits=2)} | "
                         f"{_opt(e['tpot_p50_s'], 1e3, 2)} | {_opt(e['tpot_p95_s'], 1e3, 2)} | "
                         f"{_opt(e.get('load_average'), digits=2)} |")
    prefix = [r for r in rows if r.get("prefix")]
    if prefix:
        title = (f"### {shape['name']}: prefix cache (time to first token of a prompt whose first tokens are "
                 "cached, against the same length uncached)")
        lines += ["", title, "", PREFIX_HEADER, _rule(PREFIX_HEADER)]
        for r in prefix:
            p = r["prefix"]
            reported = ", ".join("–" if n is None else str(n) for n in p["cached_tokens"])
            lines.append(f"| {r['label']} | {p['prompt_length']} | {p['prefix_length']} | "
                         f"{_opt(p['uncached_ttft_s'], 1e3)} | {_opt(p['cached_ttft_s'], 1e3)} | "
                         f"{_opt(p['ratio'], digits=3)} | {reported} |")
    with_targets = [r for r in rows if r.get("targets")]
    if with_targets:
        header = TARGETS_HEADER.format(c=targets["concurrency"])
        lines += ["", f"### {shape['name']}: issue 12 targets", "", header, _rule(header)]
        for r in with_targets:
            t = r["targets"]
            lines.append(f"| {r['label']} | {_opt(t['decode_vs_1'], digits=2)} | "
                         f"{_verdict(t['decode_vs_1'], t['decode_vs_1_target'], t['decode_vs_1_met'], '≥')} | "
                         f"{_opt(t['ttft_p95_vs_1'], digits=2)} | "
                         f"{_verdict(t['ttft_p95_vs_1'], targets['ttft_p95_vs_1'], t['ttft_p95_vs_1_met'], '≤')} | "
                         f"{_opt(t['prefix_ttft_ratio'], digits=3)} | "
                         f"{_verdict(t['prefix_ttft_ratio'], targets['prefix_ttft_ratio'], t['prefix_ttft_ratio_met'], '≤')} |")
    return lines


def serving_markdown(results: dict) -> str:
    m, v, w = results["machine"], results["versions"], results["workload"]
    memory = f"{m['memory_bytes'] / 2**30:.0f} GiB RAM" if m.get("memory_bytes") else "memory unknown"
    packages = ", ".join(f"{k} {v[k]}" for k in ("fastllm", "numpy", "onnxruntime") if k in v)
    load = f"load average (1, 5, 15 min) {m.get('load_average_start')} at the start, {m.get('load_average_end')} at the end"
    warmup = ("one request alone and one wave at the largest concurrency untimed first" if w["warmup"]
              else "no warm-up")
    machine_line = (
        f"- Machine: {m['cpu']} ({', '.join(m['cpu_flags']) or 'no AVX flags read'}), {m['usable_cores']} usable cores "
        f"of {m['logical_cores']}, {memory}; {m['os']}, Python {m['python']}; {load}")
    workload_line = (
        f"- Workload: {w['threads']} threads; engine slots {w['engine_slots']}, prefill chunk "
        f"{w.get('prefill_chunk') or 'the engine default'}; every request a random prompt of "
        f"{w['prompt_length']} ids (seed {w['seed']}) and {w['new_tokens']} new tokens, greedy, EOS ignored; "
        f"concurrency {', '.join(map(str, w['concurrency']))}; together: max({w['min_waves']} waves, "
        f"{w['min_requests']} requests) per concurrency; poisson: {w['poisson_requests']} requests at "
        f"{w['rate']:g}/s; {warmup}")
    method_line = (
        "- Each model in a worker process of its own; every request submitted with Engine.submit (api submit; api "
        "steps: an engine without it, one Engine.steps decode loop per request) and read by a thread of its own that "
        "stamps each Step as it arrives. TTFT: submit → first Step. TPOT: a request's (last − first "
        "Step) / (steps − 1); p50/p95 over requests. Output tok/s: every generated token / wall time (first submit to "
        "last Step, summed over waves). Decode tok/s: Steps per second while every request of a wave is decoding "
        "(after the last first token, before the first finish), median over waves. Queue: a Poisson arrival's wait "
        "for one of c in flight to finish (TTFT counts from its submit). Load: the machine's 1-minute load average "
        "when the level finished (other work on the same cores shows there).")
    lines = ["# fastllm bench: serving", "", machine_line, f"- Packages: {packages}", workload_line, method_line,
             f"- Run: {results['created']}, {results.get('elapsed_s', 0):.0f} s"]
    for shape in results["shapes"]:
        title = (f"## {shape['name']}: {shape['architecture']}, {shape['parameters'] / 1e6:.1f} M parameters "
                 f"(random weights), {w['threads']} threads")
        models = "; ".join(f"{r['label']} ({_size(r.get('model_size_bytes'))}"
                           + (f", api {r['api']}, peak RSS {r['peak_rss_bytes'] / MB:.0f} MB)" if "error" not in r
                              else f"): FAILED: {r['error']}") for r in shape["results"])
        lines += ["", title, "", f"Models: {models}"]
        lines += serving_tables(shape, results["targets"])
    if results["notes"]:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in results["notes"]]
    return "\n".join(lines) + "\n"


def write_serving_markdown(results: dict, path: Path) -> Path:
    path.write_text(serving_markdown(results))
    return path
