"""A prompt graph beside the decode graph (`fastllm quantize --prefill`): prompt chunks run it, decode steps the
quantized graph, both on the same KV buffers. What the model computes is then exactly: the prompt graph's function
for the first token, the decode graph's for the rest; scheduling never changes a result."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

import fastllm
from fastllm.errors import ExportError
from fastllm.export.precision import QuantOptions
from fastllm.export.quantize import quantize_model
from fastllm.manifest import Manifest

PROMPTS = [[5, 17, 33, 2, 90, 41, 7], [11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25], [300, 4]]


@pytest.fixture(scope="module")
def prefilled(exported, tmp_path_factory):
    """The tiny fused Llama in int4, with an fp32 and an int8-dynamic prompt graph, and without one."""
    src = exported["LlamaForCausalLM"][1]
    root = tmp_path_factory.mktemp("prefill")
    out = {"fp32": src}
    for name, prefill in (("int4", None), ("int4+fp32", "fp32"), ("int4+int8-dynamic", "int8-dynamic")):
        quantize_model(src, root / name, QuantOptions("int4", prefill=prefill), force=True)
        out[name] = root / name
    return out


def _first_logprobs(path, prompt):
    engine = fastllm.load(path, threads=1)
    done = engine.generate(prompt, fastllm.SamplingParams(max_new_tokens=1, logprobs=8))
    first = done.logprobs[0]
    return first.token_id, np.array([lp for _, lp in first.top])


def test_the_prompt_graph_is_written_and_described(prefilled):
    m = Manifest.read(prefilled["int4+int8-dynamic"])
    assert m.precision == "int4" and m.graph.prefill["precision"] == "int8"
    assert m.graph.prefill["method"] == "dynamic" and (prefilled["int4+int8-dynamic"] / "prefill.onnx").is_file()
    assert Manifest.read(prefilled["int4"]).graph.prefill is None
    assert not (prefilled["int4"] / "prefill.onnx").exists()


def test_first_token_comes_from_the_prompt_graph(prefilled):
    for prompt in PROMPTS:
        fp32 = _first_logprobs(prefilled["fp32"], prompt)
        with_fp32_prompt = _first_logprobs(prefilled["int4+fp32"], prompt)
        plain_int4 = _first_logprobs(prefilled["int4"], prompt)
        assert fp32[0] == with_fp32_prompt[0]
        np.testing.assert_allclose(with_fp32_prompt[1], fp32[1], atol=1e-5)
        assert np.abs(plain_int4[1] - fp32[1]).max() > 1e-4  # int4 would have given other numbers


def test_decode_steps_run_the_quantized_graph_on_the_prompt_graphs_cache(prefilled):
    """Greedy after the first token: the int4 graph reading KV the fp32 prompt graph wrote. Feeding the prompt and
    the generated tokens through the plain int4 model one token at a time is not the same function (its KV of the
    prompt is int4's), so the check is against itself across scheduling, and against fp32 on agreement."""
    params = fastllm.SamplingParams(max_new_tokens=12, ignore_eos=True)
    engine = fastllm.load(prefilled["int4+fp32"], threads=1, slots=2, prefill_chunk=4)
    alone = [engine.generate(p, params).token_ids for p in PROMPTS]
    together = [c.token_ids for c in engine.generate(PROMPTS * 2, params)]
    assert together == alone * 2
    reuse = fastllm.load(prefilled["int4+fp32"], threads=1, prefix_cache=False)
    assert [reuse.generate(p, params).token_ids for p in PROMPTS] == alone


def test_int8_dynamic_prompt_graph_runs_and_batches_the_same(prefilled):
    params = fastllm.SamplingParams(max_new_tokens=10, ignore_eos=True, temperature=0.8, seed=3)
    engine = fastllm.load(prefilled["int4+int8-dynamic"], threads=1, slots=3)
    # a batch seeds row i with seed + i
    alone = [engine.generate(p, dataclasses.replace(params, seed=3 + i)).token_ids for i, p in enumerate(PROMPTS)]
    assert [c.token_ids for c in engine.generate(PROMPTS, params)] == alone


def test_prefill_options_are_checked(exported, tmp_path):
    with pytest.raises(ExportError, match="--prefill takes"):
        QuantOptions("int4", prefill="int4")
    with pytest.raises(ExportError, match="weight-only"):
        QuantOptions("int8", method="dynamic", prefill="fp32")
    portable = exported["LlamaForCausalLM", "portable"][1]
    with pytest.raises(ExportError, match="fused graph"):
        quantize_model(portable, tmp_path / "out", QuantOptions("int4", prefill="fp32"), force=True)
    assert not (tmp_path / "out").exists()


def test_info_names_the_prompt_graph(prefilled, capsys):
    from fastllm.cli import main

    assert main(["info", str(prefilled["int4+int8-dynamic"])]) == 0
    assert "prompt graph: int8 dynamic, prefill.onnx" in capsys.readouterr().out
