"""The quality gate always measures (issue 10): a model without a tokenizer, or a text shorter than one perplexity
window, is measured on sequences the fp32 model samples itself; KL and greedy agreement are gated beside perplexity;
a quantization that destroys the model is refused; a metric that could not be measured is an error, never a pass.

Tiny random models (context 96, seconds each). int8 keeps them (+0.2% perplexity on their own samples, KL ~4e-3,
greedy prefix >10 of 32); int4 does not: random weights have no redundancy to lose (+50% perplexity, KL ~0.35)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

import fastllm
from fastllm.cli import main, quantization_lines
from fastllm.export import export_model, export_pretrained
from fastllm.export.precision import PRECISIONS, QuantOptions
from fastllm.export.quality import SAMPLES, gate, quality_report, refusal
from fastllm.export.quantize import quantize_model
from fastllm.export.tiny import TINY_VOCAB, build_tiny, tiny_config

CONTEXT = 96  # self-generated: 8 sequences of 96 ids, one window of 95 predicted tokens each
SHORT = "def main():"


@pytest.fixture(scope="module")
def bare(tmp_path_factory):
    """A tiny Llama exported from memory with no tokenizer: token ids only."""
    import torch
    import transformers

    config = tiny_config("LlamaForCausalLM", TINY_VOCAB, max_context=CONTEXT)
    config.architectures = ["LlamaForCausalLM"]
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("bare") / "fp32"
    export_pretrained(transformers.LlamaForCausalLM(config).eval(), out)
    return out


@pytest.fixture(scope="module")
def bare_int8(bare, tmp_path_factory):
    lines = []
    out = tmp_path_factory.mktemp("bare-int8") / "int8"
    return quantize_model(bare, out, QuantOptions("int8"), text=None, progress=lines.append), out, lines


@pytest.fixture(scope="module")
def with_tokenizer(tmp_path_factory, tokenizer):
    root = tmp_path_factory.mktemp("gpt2")
    hf = build_tiny("GPT2LMHeadModel", root / "hf", tokenizer=tokenizer, max_context=CONTEXT)
    export_model(hf, root / "fp32")
    return root / "fp32"


def destroy_weights(src, dst):
    """A copy of the quantized model SRC whose block scales are all zero: every quantized MatMul and the quantized
    embedding lookup output zeros, the model has lost its weights (what a broken quantizer can write)."""
    shutil.copytree(src, dst)
    model = onnx.load(str(dst / "model.onnx"))
    scales = {n.input[2] for n in model.graph.node if n.op_type in ("MatMulNBits", "GatherBlockQuantized")}
    assert scales
    for tensor in model.graph.initializer:
        if tensor.name in scales:
            tensor.CopyFrom(numpy_helper.from_array(np.zeros_like(numpy_helper.to_array(tensor)), tensor.name))
    (dst / "model.onnx.data").unlink()
    onnx.save_model(model, str(dst / "model.onnx"), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="model.onnx.data", size_threshold=1024)
    return dst


def assert_refused(report, precision):
    """The destroyed model fails every limit, and the refusal names each with its value and limit."""
    report["gate"] = gate(report, precision)
    assert report["perplexity"]["source"] == "self-generated"
    assert report["gate"]["failed"] == ["max_ppl_increase", "max_kl", "min_agreeing_prefix"]
    assert not report["gate"]["passed"]
    assert report["greedy"]["mean_agreeing_prefix"] < 1 and report["logits"]["mean_kl"] > 0.5
    message = str(refusal(report))
    limits = report["gate"]["limits"]
    assert f"mean KL {report['logits']['mean_kl']:.3g}, more than the {precision} limit of {limits['max_kl']:.3g}" \
        in message
    assert f"fewer than the {precision} limit of {limits['min_agreeing_prefix']:.1f}" in message
    assert f"self-generated tokens), more than the {precision} budget of {limits['max_ppl_increase']:.2%}" in message
    assert message.endswith("raise the limit (--max-kl / --min-agreeing-prefix / --max-ppl-increase), or pass --force")


# -- (a) no tokenizer -------------------------------------------------------------------------------------------------
def test_a_model_without_a_tokenizer_is_measured_on_its_own_samples(bare, bare_int8, capsys):
    manifest, out, lines = bare_int8
    report = manifest.quantization["quality"]
    p = report["perplexity"]
    assert p["source"] == "self-generated" and p["why"] == "the model has no tokenizer"
    assert (p["sequences"], p["seed"], p["temperature"], p["start"]) == (SAMPLES, 0, 1.0, "BOS id 0")
    assert p["window"] == CONTEXT - 1 and p["windows"] == SAMPLES and p["tokens"] == SAMPLES * (CONTEXT - 1)
    assert 1 < p["fp32"] < TINY_VOCAB and 1 < p["quantized"] < TINY_VOCAB
    assert report["logits"]["source"] == report["greedy"]["source"] == "self-generated"
    g = report["gate"]
    assert g["passed"] and not g["forced"] and g["failed"] == [] and g["source"] == "self-generated"
    assert g["limits"] == {"max_ppl_increase": PRECISIONS["int8"].max_ppl_increase_self_generated, "max_kl": 0.02,
                           "min_agreeing_prefix": 4.0}
    assert g["measured"]["relative_increase"] == p["relative_increase"]
    # each measurement that takes time is announced before it starts
    sampling = "quality: sampling 8 sequences of 96 tokens from the fp32 model (temperature 1, seed 0): the model"
    for start in (sampling + " has no tokenizer", "quality: perplexity of the fp32 model",
                  "quality: perplexity of the quantized", "quality: |Δlogits| and KL on 8 prompts",
                  "quality: greedy agreement on 8 prompts"):
        assert any(line.startswith(start) for line in lines), start
    # seeded: measuring again gives the same numbers
    again = quality_report(bare, out, text=None)
    assert again["perplexity"] == p and again["greedy"] == report["greedy"]
    assert main(["info", str(out)]) == 0
    assert (f"({p['relative_increase']:+.2%}) on {p['tokens']} self-generated tokens" in capsys.readouterr().out)


def test_a_broken_quantization_without_a_tokenizer_is_refused(bare, bare_int8, tmp_path):
    broken = destroy_weights(bare_int8[1], tmp_path / "broken")
    assert_refused(quality_report(bare, broken, text=None), "int8")


def test_int4_that_destroys_a_model_without_a_tokenizer_writes_nothing(bare, tmp_path):
    """End to end through quantize_model: before issue 10 this measured no perplexity and passed."""
    with pytest.raises(fastllm.ExportError, match=r"^quality gate: .*perplexity rose .* self-generated tokens\), "
                                                  r"more than the int4 budget of 15\.00%; nothing was written"):
        quantize_model(bare, tmp_path / "int4", QuantOptions("int4"), text=None)
    assert list(tmp_path.iterdir()) == []


# -- (b) a text shorter than one window -------------------------------------------------------------------------------
def test_a_short_text_is_replaced_by_self_generated_sequences(with_tokenizer, tmp_path):
    manifest = quantize_model(with_tokenizer, tmp_path / "int8", QuantOptions("int8"), text=SHORT)
    report = manifest.quantization["quality"]
    p = report["perplexity"]
    assert p["source"] == "self-generated" and p["tokens"] == SAMPLES * (CONTEXT - 1)
    assert p["why"] == f"the text gives {len(fastllm.load(with_tokenizer).encode(SHORT))} tokens, not more than one " \
                       f"window of {CONTEXT}"
    assert report["gate"]["passed"] and report["gate"]["source"] == "self-generated"
    assert_refused(quality_report(with_tokenizer, destroy_weights(tmp_path / "int8", tmp_path / "broken"),
                                  text=SHORT), "int8")
    # a text of more than one window is measured on the text, against the text budget
    from fastllm.export.tiny import corpus

    on_text = quality_report(with_tokenizer, tmp_path / "int8", text=corpus()[0][:4000])
    assert on_text["perplexity"]["source"] == "text" and on_text["perplexity"]["window"] == CONTEXT
    assert gate(on_text, "int8")["limits"]["max_ppl_increase"] == PRECISIONS["int8"].max_ppl_increase


# -- (c) what could not be measured is an error ------------------------------------------------------------------------
def test_a_report_missing_a_metric_is_not_a_pass(bare_int8):
    """What quality_report wrote for a model without a tokenizer before issue 10: no perplexity."""
    old = {k: v for k, v in bare_int8[0].quantization["quality"].items() if k not in ("perplexity", "gate")}
    for force in (False, True):
        with pytest.raises(fastllm.ExportError, match=r"^quality gate: could not measure perplexity \(not in the "
                                                      r"report\)\. A gate that measured nothing does not pass"):
            gate(old, "int8", force=force)


def test_a_reference_with_non_finite_logits_cannot_be_measured(bare, tmp_path):
    """An fp32 source whose norm weights are NaN: no perplexity or KL can be computed against it, and --force does
    not write the model anyway."""
    src = tmp_path / "nan"
    shutil.copytree(bare, src)
    model = onnx.load(str(src / "model.onnx"))
    norms = [t for t in model.graph.initializer if t.name.endswith("norm.weight")]
    assert norms
    for tensor in norms:
        tensor.CopyFrom(numpy_helper.from_array(np.full(tuple(tensor.dims), np.nan, np.float32), tensor.name))
    (src / "model.onnx.data").unlink()
    onnx.save_model(model, str(src / "model.onnx"), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="model.onnx.data", size_threshold=1024)
    with pytest.raises(fastllm.ExportError, match=r"could not measure perplexity \(the fp32 model's own perplexity "
                                                  r"is nan: its logits are not finite\); logits \(the fp32 model's "
                                                  r"logits are not finite\)"):
        quantize_model(src, tmp_path / "out", QuantOptions("int8"), text=None, force=True)
    assert not (tmp_path / "out").exists()


# -- what `fastllm info` shows --------------------------------------------------------------------------------------
def test_info_shows_each_limit_and_reads_older_manifests(bare_int8):
    quality = bare_int8[0].quantization["quality"]
    line = quantization_lines({"quality": quality})[-1]
    assert line.endswith("gate passed (perplexity <= +3.00%, mean KL <= 0.02, agreeing prefix >= 4.0)")
    failed = {**quality, "gate": {**quality["gate"], "passed": False, "forced": True, "failed": ["max_kl"]}}
    assert quantization_lines({"quality": failed})[-1].endswith(
        "gate FAILED (perplexity <= +3.00%, mean KL <= 0.02 FAILED, agreeing prefix >= 4.0, forced)")
    old = json.loads(json.dumps({k: v for k, v in quality.items() if k != "perplexity"}))
    old["gate"] = {"max_ppl_increase": 0.01, "forced": False, "passed": True}
    assert quantization_lines({"quality": old})[-1].endswith("gate passed (budget 1.00%, perplexity not measured)")


def test_the_kl_and_greedy_limits_are_options_of_the_cli(bare, tmp_path, capsys):
    """--max-kl and --min-agreeing-prefix reach the gate: int8 passes its defaults (above), fails a KL limit of 0."""
    out = tmp_path / "strict"
    assert main(["quantize", str(bare), str(out), "--precision", "int8", "--max-kl", "0"]) == 1
    err = capsys.readouterr().err
    assert "more than the int8 limit of 0" in err and "(--max-kl)" in err and not out.exists()
    assert main(["quantize", str(bare), str(out), "--precision", "int8", "--min-agreeing-prefix", "-1"]) == 1
    assert "min_agreeing_prefix must be a number >= 0, got -1.0" in capsys.readouterr().err
