"""Tiny randomly-initialised Hugging Face models of every supported architecture, built locally in seconds.

Used by the tests and the demo: no download, a byte-level BPE tokenizer trained here on the documentation that
ships with Python, and a standard Hugging Face directory that goes through `fastllm export` like any user's model.
"""

from __future__ import annotations

from pathlib import Path

import torch

SPECIAL = ["<|endoftext|>", "<|pad|>"]  # ids 0 (bos/eos) and 1 (pad)
TINY_VOCAB = 512


def corpus(max_chars: int = 400_000) -> list[str]:
    """English text present on every Python install: the pydoc topics, then standard-library docstrings."""
    from pydoc_data.topics import topics

    texts, total = [], 0
    for key in sorted(topics):
        texts.append(topics[key])
        total += len(topics[key])
        if total >= max_chars:
            break
    return texts


def train_tokenizer(vocab_size: int = TINY_VOCAB, texts: list[str] | None = None):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts or corpus(), trainer=trainer)
    return tok


def tiny_config(architecture: str, vocab_size: int, *, max_context: int = 256, init_std: float = 0.2):
    """A two-layer config per architecture, each exercising that architecture's particular features."""
    import transformers as tf

    common = dict(vocab_size=vocab_size, bos_token_id=0, eos_token_id=0, pad_token_id=1, initializer_range=init_std)
    llama_like = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=max_context, **common)
    if architecture == "LlamaForCausalLM":  # Llama 3 style rope scaling, GQA
        rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
        return tf.LlamaConfig(**llama_like, rope_parameters=rope, tie_word_embeddings=False)
    if architecture == "MistralForCausalLM":  # sliding window shorter than prompt + generation
        return tf.MistralConfig(**llama_like, sliding_window=24, head_dim=16)
    if architecture == "Qwen2ForCausalLM":  # q/k/v biases, tied embeddings
        return tf.Qwen2Config(**llama_like, tie_word_embeddings=True)
    if architecture == "Phi3ForCausalLM":  # fused qkv / gate_up, partial rotary
        rope = {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5}
        return tf.Phi3Config(**llama_like, rope_parameters=rope)
    if architecture == "GPT2LMHeadModel":
        return tf.GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=max_context, **common)
    raise ValueError(f"no tiny config for {architecture!r}")


TINY_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Phi3ForCausalLM",
                      "GPT2LMHeadModel")


def build_tiny(architecture: str, out: Path, *, seed: int = 0, tokenizer=None, max_context: int = 256) -> Path:
    """Write a randomly-initialised Hugging Face model directory (config, safetensors, tokenizer, generation)."""
    import transformers as tf

    tokenizer = tokenizer or train_tokenizer()
    config = tiny_config(architecture, tokenizer.get_vocab_size(), max_context=max_context)
    config.architectures = [architecture]
    torch.manual_seed(seed)
    model = getattr(tf, architecture)(config).eval()
    out = Path(out)
    model.save_pretrained(out)
    fast = tf.PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token=SPECIAL[0], eos_token=SPECIAL[0],
                                      pad_token=SPECIAL[1], unk_token=None)
    fast.save_pretrained(out)
    return out
