"""The quality cost of a quantized model, measured against the fp32 directory it came from, through the runtime,
and the gate that decides whether it is good enough to write.

Measured: perplexity of both models on the same tokens, greedy-token agreement over a set of prompts, |Δlogits| and
the KL divergence of next-token distributions. Perplexity is measured on the held-out text when it gives at least one
window of tokens; otherwise (no tokenizer, or a text too short) on sequences the fp32 model samples itself
(temperature 1, seeded: reproducible and typical of the model), whose fp32 perplexity is the baseline. The gate
limits all three (perplexity increase, mean KL, mean agreeing greedy prefix), and a metric that could not be
measured is an error, never a pass.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

import fastllm
from fastllm.errors import ExportError
from fastllm.export.precision import PRECISIONS
from fastllm.perplexity import perplexity
from fastllm.score import log_softmax, prompt_logits

EVAL_TOKENS = 16384  # perplexity in the report: at most this many held-out tokens (a 49k vocabulary is slow)
# Without usable text: SAMPLES sequences of one window each, sampled from the fp32 model. 8 x 256 = 2048 predicted
# tokens; the two models are scored on the same tokens, so their ratio is steady at that count (on the bundled model
# the self-generated int4 increase moves by a fraction of its own size between seeds).
SAMPLES = 8
SAMPLE_SEED = 0

# Gate defaults per precision. Reference points, bundled model (5.6M parameters, 4096 vocabulary), as
# (perplexity increase on the held-out text | on self-generated sequences, seeds 0-3), mean KL, mean agreeing greedy
# prefix of 32 tokens:
#   int8 weight-only          +0.06% | +0.16%         8.1e-4   21.4
#   int8 dynamic              +0.48% | +0.94..1.27%   3.0e-3   23.0 (18.0..26.8 self-generated)
#   int4, blocks of 32        +2.54% | +7.0..8.4%     5.1e-2    4.0 (3.1..6.2; a small model drifts early in int4)
#   int4, blocks of 256       +5.04% | +9.9%          7.7e-2    4.8
#   int4, asymmetric, 256     +4.77% | +8.1%          7.4e-2    2.6
#   broken int4 (issue 10)                            2.7      ~0 (one repeated token)
#   int4 with its scales halved: +1646% self-generated, KL 2.0, prefix 0.5; zeroed: +14322%, KL 4.7, prefix 0
# On its own samples the fp32 model is scored on its own distribution: the quantized model's log-perplexity exceeds
# it by the mean KL along those samples, so the increase runs ~2-3x the text figure and has its own budget.
# Margins: perplexity budgets ~2x the default setting's result (int4 blocks of 256 sits at the text budget); KL limits
# ~5x the worst good result and >= 8x below a broken model; prefix limits >= 2.5x below the worst good result and
# above the ~0 of a model that lost its weights.
# The limits themselves are the precisions' own (export/precision.py PRECISIONS): on text int8 1%, int4 5%; on
# self-generated sequences 3% / 15%; mean KL 0.02 / 0.25; mean agreeing greedy prefix 4.0 / 1.0 tokens.
FLAGS = {"max_ppl_increase": "--max-ppl-increase", "max_kl": "--max-kl", "min_agreeing_prefix": "--min-agreeing-prefix"}


# -- what is measured on --------------------------------------------------------------------------------------------
def probe_prompts(vocab: int, ids: list[int] | None, count: int = 8, length: int = 24,
                  seed: int = 1) -> list[list[int]]:
    """Prompts for the greedy and logits comparisons: slices of the evaluation text when there is one (what the
    model is for), else random ids."""
    rng = np.random.default_rng(seed)
    if ids is not None and len(ids) > count * length:
        starts = np.linspace(0, len(ids) - length, count).astype(int)
        return [list(ids[s : s + length]) for s in starts]
    return [rng.integers(2, vocab, size=length).tolist() for _ in range(count)]


def self_generated(engine, *, count: int, length: int, seed: int) -> tuple[list[list[int]], str]:
    """`count` sequences of `length` ids sampled from the model (temperature 1, no filter, row i seeded seed + i),
    each starting at the BOS id, or at a random id when the model has none. Returns them and how they start."""
    m = engine.manifest
    if m.bos_token_id is not None:
        starts, start = [[m.bos_token_id]] * count, f"BOS id {m.bos_token_id}"
    else:
        starts, start = [[int(t)] for t in np.random.default_rng(seed).integers(0, m.vocab_size, count)], "random id"
    params = fastllm.SamplingParams(max_new_tokens=length - 1, temperature=1.0, ignore_eos=True, seed=seed)
    return [p + list(c.token_ids) for p, c in zip(starts, engine.generate(starts, params))], start


def sequences_perplexity(engine, sequences: list[list[int]], window: int) -> dict:
    """Perplexity over several sequences, each scored on its own windows (none spans two sequences)."""
    scored = [perplexity(engine, ids, window=window) for ids in sequences]
    tokens = sum(p.tokens for p in scored)
    nll = sum(p.mean_nll * p.tokens for p in scored) / tokens
    return {"ppl": math.exp(nll), "tokens": tokens, "windows": tokens // window}


# -- the measurements -----------------------------------------------------------------------------------------------
def next_token_stats(reference, candidate, prompts) -> dict:
    """|Δlogits| and KL(reference || candidate) of next-token distributions, at every prompt position."""
    diffs, kls, finite = [], [], True
    for ids in prompts:
        ref, cand = prompt_logits(reference, ids), prompt_logits(candidate, ids)
        finite = finite and bool(np.isfinite(ref).all())
        diffs.append(np.abs(cand.astype(np.float64) - ref).ravel())
        log_p, log_q = log_softmax(ref), log_softmax(cand)
        kls.append((np.exp(log_p) * (log_p - log_q)).sum(-1))
    diff, kl = np.concatenate(diffs), np.concatenate(kls)
    return {"mean_abs_dlogits": float(diff.mean()), "max_abs_dlogits": float(diff.max()),
            "mean_kl": float(kl.mean()), "max_kl": float(kl.max()), "prompts": len(prompts),
            "positions": int(kl.size), "reference_finite": finite}


def greedy_agreement(reference, candidate, prompts, new_tokens: int = 32) -> dict:
    params = fastllm.SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)
    first = []
    for ref, cand in zip(reference.generate(prompts, params), candidate.generate(prompts, params)):
        same = [a == b for a, b in zip(ref.token_ids, cand.token_ids)]
        first.append(same.index(False) if False in same else new_tokens)
    return {"prompts": len(prompts), "new_tokens": new_tokens, "identical": sum(f == new_tokens for f in first),
            "first_divergence": first, "mean_agreeing_prefix": float(np.mean(first))}


LOOP_TOKENS, LOOP_SPAN, LOOP_PERIOD = 128, 32, 16


def ends_in_loop(ids: list[int], span: int = LOOP_SPAN, period: int = LOOP_PERIOD) -> bool:
    """The last `span` ids repeat with some period p <= `period`: ids[i] == ids[i - p] for each of them."""
    tail = np.asarray(ids[-(span + period):])
    if len(tail) < span + 1:
        return False
    return any(len(tail) - p >= span and np.array_equal(tail[-span:], tail[-span - p:-p])
               for p in range(1, period + 1))


def loops(reference, candidate, prompts, new_tokens: int = LOOP_TOKENS) -> dict | None:
    """How many greedy continuations of `new_tokens` end in a cycle (ends_in_loop), fp32 and quantized: a
    quantized model that falls into repeating itself where fp32 does not. A model whose context leaves less room
    after the prompts is checked over what fits; None when that is too short to show a loop."""
    new_tokens = min(new_tokens, min(reference.context, candidate.context) - max(len(p) for p in prompts))
    if new_tokens < 2 * LOOP_SPAN:
        return None
    params = fastllm.SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)
    count = {name: sum(ends_in_loop(list(c.token_ids)) for c in engine.generate(prompts, params))
             for name, engine in (("fp32", reference), ("quantized", candidate))}
    return {"prompts": len(prompts), "new_tokens": new_tokens, "span": LOOP_SPAN, "max_period": LOOP_PERIOD,
            **count}


def quality_report(fp32_dir: Path, quant_dir: Path, *, text: str | None, window: int = 256,
                   samples: int = SAMPLES, seed: int = SAMPLE_SEED, progress=lambda line: None) -> dict:
    """Every metric the gate limits, each with what it was measured on ("source": "text" | "self-generated").

    A metric that could not be computed is left out and its reason recorded under "unmeasured"; `gate` refuses
    such a report."""
    reference, candidate = fastllm.load(fp32_dir), fastllm.load(quant_dir)
    m = reference.manifest
    ids = reference.encode(text) if reference.tokenizer and text else None
    text_window = min(window, m.max_context)
    report, unmeasured = {}, {}
    if ids is not None and len(ids) > text_window:
        window, ids = text_window, ids[: EVAL_TOKENS + 1]
        sequences, source = [ids], {"source": "text"}
        prompts = probe_prompts(m.vocab_size, ids)
    else:
        why = ("the model has no tokenizer" if reference.tokenizer is None else "no text was given" if not text else
               f"the text gives {len(ids)} tokens, not more than one window of {text_window}")
        window = min(window, m.max_context - 1)  # a sequence is one window + 1 ids, all within the context
        if window < 2:
            raise ExportError(f"quality gate: cannot measure perplexity: {why}, and the model's context of "
                              f"{m.max_context} tokens leaves no window of 2 tokens to sample and score")
        progress(f"quality: sampling {samples} sequences of {window + 1} tokens from the fp32 model "
                 f"(temperature 1, seed {seed}): {why}")
        sequences, start = self_generated(reference, count=samples, length=window + 1, seed=seed)
        source = {"source": "self-generated", "why": why, "sequences": samples, "seed": seed, "temperature": 1.0,
                  "start": start}
        prompts = [s[:24] for s in sequences]

    progress(f"quality: perplexity of the fp32 model ({source['source']}, windows of {window})")
    ref_ppl = sequences_perplexity(reference, sequences, window)
    progress("quality: perplexity of the quantized model")
    cand_ppl = sequences_perplexity(candidate, sequences, window)
    if math.isfinite(ref_ppl["ppl"]):
        report["perplexity"] = {**source, "fp32": ref_ppl["ppl"], "quantized": cand_ppl["ppl"],
                                "relative_increase": cand_ppl["ppl"] / ref_ppl["ppl"] - 1,
                                "tokens": cand_ppl["tokens"], "windows": cand_ppl["windows"], "window": window}
    else:
        unmeasured["perplexity"] = f"the fp32 model's own perplexity is {ref_ppl['ppl']}: its logits are not finite"

    progress(f"quality: |Δlogits| and KL on {len(prompts)} prompts")
    logits = next_token_stats(reference, candidate, prompts)
    if logits.pop("reference_finite"):
        report["logits"] = {"source": source["source"], **logits}
    else:
        unmeasured["logits"] = "the fp32 model's logits are not finite"
    progress(f"quality: greedy agreement on {len(prompts)} prompts")
    report["greedy"] = {"source": source["source"], **greedy_agreement(reference, candidate, prompts)}
    progress(f"quality: loops in {LOOP_TOKENS} greedy tokens on {len(prompts)} prompts")
    looped = loops(reference, candidate, prompts)
    if looped is not None:  # not gated: a context too short for the check leaves it out
        report["loops"] = looped
    if unmeasured:
        report["unmeasured"] = unmeasured
    return report


# -- the gate -------------------------------------------------------------------------------------------------------
def gate(report: dict, precision: str, *, max_ppl_increase: float | None = None, max_kl: float | None = None,
         min_agreeing_prefix: float | None = None, force: bool = False) -> dict:
    """The gate's decision on a quality report, for the manifest: every limit, the measured value it applies to,
    which limits failed, and `passed`. A limit left None is the precision's default (export/precision.py), the
    perplexity budget for self-generated sequences when perplexity was measured on those.

    Raises ExportError when a gated metric was not measured: a gate that measured nothing does not pass, and
    --force does not skip measurement. A failure is recorded, not raised: `refusal` words it."""
    spec = PRECISIONS.get(precision)
    if spec is None or spec.max_kl is None:
        gated = [name for name, p in PRECISIONS.items() if p.max_kl is not None]
        raise ExportError(f"the quality gate has limits for {', '.join(gated)}, not {precision!r}")
    given = {"max_ppl_increase": max_ppl_increase, "max_kl": max_kl, "min_agreeing_prefix": min_agreeing_prefix}
    source = report.get("perplexity", {}).get("source", "text")
    budget = spec.max_ppl_increase_self_generated if source == "self-generated" else spec.max_ppl_increase
    defaults = {"max_ppl_increase": budget, "max_kl": spec.max_kl, "min_agreeing_prefix": spec.min_agreeing_prefix}
    limits = {name: defaults[name] if value is None else float(value) for name, value in given.items()}
    sections = {"max_ppl_increase": ("perplexity", "relative_increase"), "max_kl": ("logits", "mean_kl"),
                "min_agreeing_prefix": ("greedy", "mean_agreeing_prefix")}
    unmeasured = report.get("unmeasured", {})
    missing = [f"{section} ({unmeasured.get(section, 'not in the report')})"
               for section, key in sections.values() if key not in report.get(section, {})]
    if missing:
        raise ExportError(f"quality gate: could not measure {'; '.join(missing)}. A gate that measured nothing does "
                          "not pass (--force does not skip measurement); nothing was written")
    measured = {key: float(report[section][key]) for section, key in sections.values()}
    # written so that a NaN fails: a quantized model whose outputs are not finite is broken, not unmeasured
    value = {name: measured[key] for name, (_, key) in sections.items()}
    ok = {name: value[name] >= limit if name.startswith("min_") else value[name] <= limit
          for name, limit in limits.items()}
    failed = [name for name in limits if not ok[name]]
    return {"precision": precision, "limits": limits, "measured": measured, "failed": failed,
            "source": source, "passed": not failed, "forced": force}


def refusal(report: dict, *, note: str = "") -> ExportError:
    """The error for a report whose gate failed: every failed metric with its value and limit, and what to try.
    note: said after the perplexity failure (what --mixed met on its calibration text)."""
    g = report["gate"]
    precision, limits, measured = g["precision"], g["limits"], g["measured"]
    said = {
        "max_kl": lambda: f"mean KL {measured['mean_kl']:.3g}, more than the {precision} limit of "
                          f"{limits['max_kl']:.3g}",
        "min_agreeing_prefix": lambda: f"greedy decoding agreed on {measured['mean_agreeing_prefix']:.1f} tokens on "
                                       f"average (of {report['greedy']['new_tokens']}), fewer than the {precision} "
                                       f"limit of {limits['min_agreeing_prefix']:.1f}",
        "max_ppl_increase": lambda: (
            f"perplexity rose {measured['relative_increase']:.2%} ({report['perplexity']['fp32']:.3f} -> "
            f"{report['perplexity']['quantized']:.3f} on {report['perplexity']['tokens']} "
            f"{'held-out' if g['source'] == 'text' else 'self-generated'} tokens), more than the {precision} "
            f"budget of {limits['max_ppl_increase']:.2%}{note}"),
    }
    order = ("max_kl", "min_agreeing_prefix", "max_ppl_increase")  # perplexity last: the --mixed note is about it
    failures = [said[name]() for name in order if name in g["failed"]]
    flags = " / ".join(FLAGS[name] for name in order if name in g["failed"])
    return ExportError(f"quality gate: {'; '.join(failures)}; nothing was written. Try a smaller --block-size, "
                       f"--mixed int8, --keep-lm-head or int8, raise the limit ({flags}), or pass --force")


def describe_report(report: dict) -> str:
    """One line: what was measured, on what, and the gate's limits (reports written before the gate limited KL and
    greedy agreement are described too)."""
    parts = []
    if "perplexity" in report:
        p = report["perplexity"]
        on = "" if "tokens" not in p else (
            f" on {p['tokens']} self-generated tokens ({p['sequences']} sequences, seed {p['seed']})"
            if p.get("source") == "self-generated" else f" on {p['tokens']} tokens of text")
        parts.append(f"perplexity {p['fp32']:.3f} -> {p['quantized']:.3f} ({p['relative_increase']:+.2%}){on}")
    g, lg = report["greedy"], report["logits"]
    parts.append(f"greedy {g['identical']}/{g['prompts']} prompts identical over {g['new_tokens']} tokens "
                 f"(mean agreeing prefix {g['mean_agreeing_prefix']:.1f})")
    parts.append(f"mean KL {lg['mean_kl']:.2e}, mean |Δlogits| {lg['mean_abs_dlogits']:.3f} "
                 f"(max {lg['max_abs_dlogits']:.3f})")
    if "loops" in report:  # reports written before the loop check have none
        lp = report["loops"]
        parts.append(f"loops in {lp['new_tokens']} tokens {lp['fp32']} -> {lp['quantized']} of {lp['prompts']}")
    if "size_bytes" in report:
        s = report["size_bytes"]
        parts.append(f"size {s['fp32'] / 1e6:.1f} -> {s['quantized'] / 1e6:.1f} MB")
    if "gate" in report:
        parts.append(describe_gate(report["gate"]))
    return "quality: " + "; ".join(parts)


def describe_gate(gate: dict) -> str:
    """`gate passed (perplexity <= +5.00%, mean KL <= 0.25, agreeing prefix >= 1.0)`, failed limits marked."""
    verdict = ("passed" if gate.get("passed") else "FAILED") + (", forced" if gate.get("forced") else "")
    if "limits" not in gate:  # a manifest written before KL and greedy agreement were gated
        return f"gate {verdict} (budget {gate['max_ppl_increase']:.2%})"
    limits, failed = gate["limits"], gate.get("failed", [])
    shown = {"max_ppl_increase": f"perplexity <= {limits['max_ppl_increase']:+.2%}",
             "max_kl": f"mean KL <= {limits['max_kl']:.3g}",
             "min_agreeing_prefix": f"agreeing prefix >= {limits['min_agreeing_prefix']:.1f}"}
    return f"gate {verdict} (" + ", ".join(text + (" FAILED" if name in failed else "")
                                          for name, text in shown.items()) + ")"
