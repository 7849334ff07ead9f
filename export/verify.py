"""Stage: check an exported model directory against the PyTorch reference, through the fastllm runtime itself.

PyTorch decodes a batch of prompts of different lengths (left padded) greedily. fastllm's logits of each whole
prompt (prefill) and of every following decode step through the KV cache, fed the reference's tokens, are compared
with the reference's, and fastllm's greedy tokens for the batch must equal the reference's greedy tokens (EOS
ignored on both sides so the full length is compared).
"""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

import fastllm
from fastllm.errors import VerificationError
from fastllm.score import prompt_logits

FP32_RTOL = 1e-4  # max |Δlogits| <= FP32_RTOL * max(1, max |logit|)


@dataclass(frozen=True)
class VerifyReport:
    max_abs_diff: float  # over prefill (real positions) and every decode step
    max_abs_logit: float
    rtol: float  # the tolerance relative to max(1, max |logit|)
    tolerance: float
    worst_step: str  # "prefill" or "decode N"
    greedy_match: bool
    first_mismatch: int | None  # first position where greedy tokens differ
    prompt_lengths: tuple[int, ...]
    decode_steps: int
    new_tokens: int

    @property
    def passed(self) -> bool:
        return self.max_abs_diff <= self.tolerance and self.greedy_match

    def to_dict(self) -> dict:
        return {"reference": "transformers eager, float32", **asdict(self), "passed": self.passed}


def probe_prompts(vocab_size: int, lengths, seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    low = min(4, vocab_size - 1)  # stay clear of the first ids, where tokenizers keep their special tokens
    return [rng.integers(low, vocab_size, size=n).tolist() for n in lengths]


def left_pad(prompts: list[list[int]], pad: int) -> tuple[np.ndarray, np.ndarray]:
    width = max(len(p) for p in prompts)
    ids = np.full((len(prompts), width), pad, dtype=np.int64)
    mask = np.zeros_like(ids)
    for row, p in enumerate(prompts):
        ids[row, width - len(p) :] = p
        mask[row, width - len(p) :] = 1
    return ids, mask


@torch.no_grad()
def reference_steps(hf_model, ids: np.ndarray, mask: np.ndarray, steps: int) -> tuple[list[np.ndarray], np.ndarray]:
    """Greedy decoding with the PyTorch model. Returns logits per step ((B,S,V) prefill, then (B,1,V)) and tokens."""
    ids_t, mask_t = torch.from_numpy(ids), torch.from_numpy(mask)
    positions = (mask_t.cumsum(-1) - 1).clamp(min=0)
    out = hf_model(input_ids=ids_t, attention_mask=mask_t, position_ids=positions, use_cache=True)
    logits, tokens = [out.logits.float().numpy()], []
    for _ in range(steps):
        token = out.logits[:, -1:].argmax(-1)  # (B, 1)
        tokens.append(token.numpy())
        mask_t = torch.cat([mask_t, torch.ones_like(token)], dim=1)
        positions = positions[:, -1:] + 1
        out = hf_model(input_ids=token, attention_mask=mask_t, position_ids=positions,
                       past_key_values=out.past_key_values, use_cache=True)
        logits.append(out.logits.float().numpy())
    return logits, np.concatenate(tokens, axis=1)


def verify(hf_model, model_dir: Path, *, prompt_lengths=(5, 11), decode_steps: int = 8, new_tokens: int = 32,
           seed: int = 0, threads: int | None = None, rtol: float = FP32_RTOL) -> VerifyReport:
    """Compare the exported directory with `hf_model`. Raises VerificationError naming the failing step."""
    with warnings.catch_warnings():  # fp16 is verified on the CPU knowingly
        warnings.filterwarnings("ignore", message=".*meant for CUDA", category=RuntimeWarning)
        engine = fastllm.load(model_dir, threads=threads)
    manifest = engine.manifest
    prompts = probe_prompts(manifest.vocab_size, prompt_lengths, seed)
    pad = manifest.pad_token_id if manifest.pad_token_id is not None else 0
    ids, mask = left_pad(prompts, pad)
    steps = max(decode_steps, new_tokens)
    ref_logits, ref_tokens = reference_steps(hf_model.float().eval(), ids, mask, steps)

    # fastllm side: each prompt followed by the reference's tokens, through the runtime's scoring path: the prompt
    # prefilled, then one token per decode step through the KV cache (the batched, padded path is checked by the
    # greedy generation below).
    width, vocab = ids.shape[1], ref_logits[0].shape[-1]
    worst, worst_step, max_logit = 0.0, "prefill", 0.0
    for row, p in enumerate(prompts):
        got = prompt_logits(engine, p + ref_tokens[row].tolist(), decode_after=len(p))  # (len(p) + steps, V)
        if got.shape[-1] != vocab:
            raise VerificationError(f"logits have {got.shape[-1]} entries per position, the reference {vocab}")
        # prefill: the left-padded reference's real positions; decode step i: the reference's (B, 1, V) step i
        pairs = [("prefill", got[: len(p)], ref_logits[0][row, width - len(p) :])]
        pairs += [(f"decode {i}", got[len(p) + i - 1], ref_logits[i][row, 0]) for i in range(1, steps + 1)]
        for step, out, ref in pairs:
            diff = float(np.abs(out - ref).max())
            max_logit = max(max_logit, float(np.abs(ref).max()))
            if diff > worst:
                worst, worst_step = diff, step

    greedy = engine.generate(prompts, fastllm.SamplingParams(max_new_tokens=new_tokens, ignore_eos=True))
    ours = np.array([c.token_ids for c in greedy])  # (B, new_tokens)
    theirs = ref_tokens[:, :new_tokens]
    mismatch = np.nonzero((ours != theirs).any(axis=0))[0]
    report = VerifyReport(
        max_abs_diff=worst, max_abs_logit=max_logit, rtol=rtol, tolerance=rtol * max(1.0, max_logit),
        worst_step=worst_step, greedy_match=mismatch.size == 0,
        first_mismatch=int(mismatch[0]) if mismatch.size else None,
        prompt_lengths=tuple(prompt_lengths), decode_steps=steps, new_tokens=new_tokens,
    )
    if report.max_abs_diff > report.tolerance:
        raise VerificationError(f"verification failed at {worst_step}: max |Δlogits| = {worst:.3g} exceeds the "
                                f"tolerance {report.tolerance:.3g} (max |logit| {max_logit:.3g})")
    if not report.greedy_match:
        raise VerificationError(f"verification failed at greedy decoding: tokens differ from the reference from "
                                f"new token {report.first_mismatch} (max |Δlogits| {worst:.3g})")
    return report
