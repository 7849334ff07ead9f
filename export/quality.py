"""The quality cost of a quantized model, measured against the fp32 directory it came from, through the runtime:
perplexity on held-out text, greedy-token agreement over a set of prompts, |Δlogits| and the KL divergence of
next-token distributions."""

from __future__ import annotations

from pathlib import Path

import numpy as np

import fastllm
from fastllm.perplexity import perplexity

EVAL_TOKENS = 16384  # perplexity in the report: at most this many held-out tokens (a 49k vocabulary is slow)


def probe_prompts(vocab: int, ids: list[int] | None, count: int = 8, length: int = 24,
                  seed: int = 1) -> list[list[int]]:
    """Prompts for the greedy and logits comparisons: slices of the evaluation text when there is one (what the
    model is for), else random ids."""
    rng = np.random.default_rng(seed)
    if ids is not None and len(ids) > count * length:
        starts = np.linspace(0, len(ids) - length, count).astype(int)
        return [list(ids[s : s + length]) for s in starts]
    return [rng.integers(2, vocab, size=length).tolist() for _ in range(count)]


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64) - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def prompt_logits(engine, ids: list[int]) -> np.ndarray:
    """Logits at every position of one prompt, (S, V)."""
    s = engine.session
    cache, binding = s.new_cache(1, len(ids), 0), s.ort.io_binding()
    return s.forward(cache, binding, cache.prefill([ids], 0), logits_to_keep=len(ids))[0]


def next_token_stats(reference, candidate, prompts) -> dict:
    """|Δlogits| and KL(reference || candidate) of next-token distributions, at every prompt position."""
    diffs, kls = [], []
    for ids in prompts:
        ref, cand = prompt_logits(reference, ids), prompt_logits(candidate, ids)
        diffs.append(np.abs(cand.astype(np.float64) - ref).ravel())
        log_p, log_q = log_softmax(ref), log_softmax(cand)
        kls.append((np.exp(log_p) * (log_p - log_q)).sum(-1))
    diff, kl = np.concatenate(diffs), np.concatenate(kls)
    return {"mean_abs_dlogits": float(diff.mean()), "max_abs_dlogits": float(diff.max()),
            "mean_kl": float(kl.mean()), "max_kl": float(kl.max())}


def greedy_agreement(reference, candidate, prompts, new_tokens: int = 32) -> dict:
    params = fastllm.SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)
    first = []
    for ref, cand in zip(reference.generate(prompts, params), candidate.generate(prompts, params)):
        same = [a == b for a, b in zip(ref.token_ids, cand.token_ids)]
        first.append(same.index(False) if False in same else new_tokens)
    return {"prompts": len(prompts), "new_tokens": new_tokens, "identical": sum(f == new_tokens for f in first),
            "first_divergence": first, "mean_agreeing_prefix": float(np.mean(first))}


def quality_report(fp32_dir: Path, quant_dir: Path, *, text: str, window: int = 256) -> dict:
    reference, candidate = fastllm.load(fp32_dir), fastllm.load(quant_dir)
    window = min(window, reference.manifest.max_context)
    ids = reference.encode(text) if reference.tokenizer else None
    report = {}
    if ids is not None and len(ids) > window:
        ids = ids[: EVAL_TOKENS + 1]
        ref_ppl = perplexity(reference, ids, window=window)
        cand_ppl = perplexity(candidate, ids, window=window)
        report["perplexity"] = {"fp32": ref_ppl.ppl, "quantized": cand_ppl.ppl,
                                "relative_increase": cand_ppl.ppl / ref_ppl.ppl - 1, "tokens": cand_ppl.tokens,
                                "window": window}
    prompts = probe_prompts(reference.manifest.vocab_size, ids)
    report["logits"] = next_token_stats(reference, candidate, prompts)
    report["greedy"] = greedy_agreement(reference, candidate, prompts)
    return report


def describe_report(report: dict) -> str:
    parts = []
    if "perplexity" in report:
        p = report["perplexity"]
        parts.append(f"perplexity {p['fp32']:.3f} -> {p['quantized']:.3f} ({p['relative_increase']:+.2%})")
    g, lg = report["greedy"], report["logits"]
    parts.append(f"greedy {g['identical']}/{g['prompts']} prompts identical over {g['new_tokens']} tokens "
                 f"(mean agreeing prefix {g['mean_agreeing_prefix']:.1f})")
    parts.append(f"mean KL {lg['mean_kl']:.2e}, mean |Δlogits| {lg['mean_abs_dlogits']:.3f} "
                 f"(max {lg['max_abs_dlogits']:.3f})")
    if "size_bytes" in report:
        s = report["size_bytes"]
        parts.append(f"size {s['fp32'] / 1e6:.1f} -> {s['quantized'] / 1e6:.1f} MB")
    return "quality: " + "; ".join(parts)
