"""Train the project's small Llama-style model on the Python documentation corpus, on the CPU.

    python -m fastllm.train.train --out models/pydoc-llama            # the shipped model (see models/pydoc-llama/training.json)

Writes a standard Hugging Face directory (config.json, model.safetensors, tokenizer.json, tokenizer_config.json,
generation_config.json) plus training.json with the command, the figures and the corpus fingerprints, so the
model goes through `fastllm export` like any user's model.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from fastllm.export import corpus
from fastllm.export.tiny import SPECIAL, train_tokenizer

EOS, PAD = 0, 1  # the ids of SPECIAL's two tokens


@dataclass(frozen=True)
class TrainConfig:
    vocab_size: int = 4096
    hidden_size: int = 256
    intermediate_size: int = 768
    num_layers: int = 6
    num_heads: int = 8
    num_kv_heads: int = 2
    max_context: int = 512
    seq_len: int = 256
    batch_size: int = 16
    steps: int = 1600
    lr: float = 2e-3
    min_lr_ratio: float = 0.1
    warmup: int = 60
    weight_decay: float = 0.1
    eval_every: int = 100
    threads: int = 2
    seed: int = 0
    bf16: int = 1  # bfloat16 autocast for the forward pass (fast on AMX / AVX-512 BF16); evaluation stays fp32

    def __post_init__(self):
        if self.hidden_size % self.num_heads or self.num_heads % self.num_kv_heads:
            raise ValueError("hidden_size must divide by num_heads, and num_heads by num_kv_heads")
        if self.seq_len > self.max_context:
            raise ValueError(f"seq_len ({self.seq_len}) must be <= max_context ({self.max_context})")


def encode(tok, texts: list[str]) -> np.ndarray:
    """All documents as one stream of ids, each document followed by EOS."""
    ids = []
    for enc in tok.encode_batch(texts, add_special_tokens=False):
        ids.extend(enc.ids)
        ids.append(EOS)
    return np.array(ids, dtype=np.int64)


def make_model(cfg: TrainConfig):
    import transformers as tf

    config = tf.LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
        head_dim=cfg.hidden_size // cfg.num_heads, max_position_embeddings=cfg.max_context, rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, tie_word_embeddings=True,
        bos_token_id=EOS, eos_token_id=EOS, pad_token_id=PAD, initializer_range=0.02)
    config.architectures = ["LlamaForCausalLM"]
    return tf.LlamaForCausalLM(config)


@torch.no_grad()
def evaluate(model, ids: np.ndarray, seq_len: int, batch_size: int = 16) -> float:
    """Mean cross-entropy over non-overlapping windows of the held-out stream."""
    model.eval()
    n = (len(ids) - 1) // seq_len
    windows = torch.from_numpy(ids[: n * seq_len + 1])
    total, count = 0.0, 0
    for start in range(0, n, batch_size):
        rows = range(start, min(n, start + batch_size))
        x = torch.stack([windows[r * seq_len : (r + 1) * seq_len] for r in rows])
        y = torch.stack([windows[r * seq_len + 1 : (r + 1) * seq_len + 1] for r in rows])
        logits = model(input_ids=x).logits
        total += torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1),
                                                   reduction="sum").item()
        count += y.numel()
    model.train()
    return total / count


def lr_at(step: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def progress_line(step: int, cfg: TrainConfig, loss: float, val: float | None, started: float, tokens: int) -> str:
    elapsed = time.perf_counter() - started
    eta = elapsed / max(step, 1) * (cfg.steps - step)
    val_text = f" | val {val:.3f} (ppl {math.exp(val):.1f})" if val is not None else ""
    return (f"\rstep {step:5d}/{cfg.steps} | loss {loss:.3f}{val_text} | {tokens / elapsed:,.0f} tok/s | "
            f"{elapsed / 60:4.1f} min, eta {eta / 60:4.1f} min ")


def train(cfg: TrainConfig, out: Path, command: str) -> dict:
    torch.manual_seed(cfg.seed)
    torch.set_num_threads(cfg.threads)
    rng = np.random.default_rng(cfg.seed)
    t0 = time.perf_counter()
    train_texts, held_texts = corpus.split()
    print(f"corpus: {len(train_texts)} train / {len(held_texts)} held-out documents, "
          f"{sum(map(len, train_texts)):,} / {sum(map(len, held_texts)):,} characters", file=sys.stderr)
    tok = train_tokenizer(cfg.vocab_size, train_texts)
    train_ids, held_ids = encode(tok, train_texts), encode(tok, held_texts)
    print(f"tokenizer: byte-level BPE, {tok.get_vocab_size()} ids; {len(train_ids):,} train / {len(held_ids):,} "
          f"held-out tokens ({time.perf_counter() - t0:.1f}s)", file=sys.stderr)

    model = make_model(cfg)
    params = sum(p.numel() for p in model.parameters())
    print(f"model: LlamaForCausalLM, {params / 1e6:.2f} M parameters", file=sys.stderr)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    optim = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                               {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.95))
    started, tokens, val, history = time.perf_counter(), 0, None, []
    loss_avg = None
    model.train()
    for step in range(cfg.steps):
        starts = rng.integers(0, len(train_ids) - cfg.seq_len - 1, size=cfg.batch_size)
        batch = torch.from_numpy(np.stack([train_ids[s : s + cfg.seq_len + 1] for s in starts]))
        for group in optim.param_groups:
            group["lr"] = lr_at(step, cfg)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bool(cfg.bf16)):
            loss = _loss(model, batch)  # (B, seq + 1) windows: predict ids 1.. from ids ..-1
        optim.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optim.step()
        tokens += batch[:, :-1].numel()
        loss_avg = loss.item() if loss_avg is None else 0.95 * loss_avg + 0.05 * loss.item()
        if (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps:
            val = evaluate(model, held_ids, cfg.seq_len)
            history.append({"step": step + 1, "train_loss": round(loss_avg, 4), "val_loss": round(val, 4)})
        print(progress_line(step + 1, cfg, loss_avg, val, started, tokens), end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    train_s = time.perf_counter() - started
    return save(model, tok, cfg, out, {
        "command": command, "train_seconds": round(train_s, 1), "total_seconds": round(time.perf_counter() - t0, 1),
        "parameters": params, "tokens_seen": tokens, "val_loss": round(val, 4), "val_ppl": round(math.exp(val), 3),
        "history": history, "config": asdict(cfg),
        "corpus": {"train_documents": len(train_texts), "held_out_documents": len(held_texts),
                   "train_tokens": len(train_ids), "held_out_tokens": len(held_ids),
                   "train_fingerprint": corpus.fingerprint(train_texts),
                   "held_out_fingerprint": corpus.fingerprint(held_texts)},
        "python": platform.python_version(), "torch": torch.__version__, "threads": cfg.threads,
        "machine": platform.processor() or platform.machine(),
    })


def _loss(model, batch):
    logits = model(input_ids=batch[:, :-1]).logits
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))


def save(model, tok, cfg: TrainConfig, out: Path, record: dict) -> dict:
    import transformers as tf

    out.mkdir(parents=True, exist_ok=True)
    model.generation_config = tf.GenerationConfig(bos_token_id=EOS, eos_token_id=EOS, pad_token_id=PAD,
                                                  do_sample=True, temperature=0.8, top_p=0.95)
    model.save_pretrained(out)
    fast = tf.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=SPECIAL[EOS], eos_token=SPECIAL[EOS],
                                      pad_token=SPECIAL[PAD], unk_token=None, model_max_length=cfg.max_context)
    fast.save_pretrained(out)
    (out / "training.json").write_text(json.dumps(record, indent=2) + "\n")
    return record


def main(argv: list[str] | None = None) -> int:
    defaults = TrainConfig()
    p = argparse.ArgumentParser(prog="python -m fastllm.train.train", description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    for name, value in asdict(defaults).items():
        p.add_argument(f"--{name.replace('_', '-')}", type=type(value), default=value)
    args = vars(p.parse_args(argv))
    out = Path(args.pop("out"))
    cfg = TrainConfig(**args)
    command = "python -m fastllm.train.train " + " ".join(sys.argv[1:] if argv is None else argv)
    record = train(cfg, out, command)
    print(f"done: val loss {record['val_loss']} (ppl {record['val_ppl']}), {record['train_seconds'] / 60:.1f} min "
          f"of training -> {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
