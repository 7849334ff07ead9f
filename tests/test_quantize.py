"""Quantization of the project's trained model (int8 weight-only and dynamic, int4, mixed precision, quantized
embedding): quality within the stated budgets, the report in the manifest, and the gate refusing a bad setting
without writing anything."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper, numpy_helper

import fastllm
from fastllm.cli import main
from fastllm.export.corpus import held_out_text, split
from fastllm.export.precision import QuantOptions
from fastllm.export.quantize import quantize_model
from fastllm.export.quantized_embedding import quantize_embedding
from fastllm.export.quantized_graph import lm_head

TEXT = held_out_text()[:60_000]  # ~17k tokens: enough for a stable perplexity, quick
# Stated tolerances against the fp32 model (measured on this text: int8 +0.06% perplexity, mean KL 8e-4; dynamic
# int8 +0.48%, 3e-3; int4 +2.5%, 5e-2, each with the embedding quantized too)
CONFIGS = {"int8": QuantOptions("int8"), "int8-dynamic": QuantOptions("int8", method="dynamic"),
           "int4": QuantOptions("int4")}
LIMITS = {"int8": {"ppl": 0.01, "mean_kl": 5e-3, "agreeing_prefix": 12},
          "int8-dynamic": {"ppl": 0.01, "mean_kl": 1e-2, "agreeing_prefix": 8},
          "int4": {"ppl": 0.05, "mean_kl": 1e-1, "agreeing_prefix": 2}}


@pytest.fixture(scope="module", params=list(CONFIGS))
def quantized(request, bundled_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("q") / request.param
    return request.param, quantize_model(bundled_dir, out, CONFIGS[request.param], text=TEXT), out


def test_quality_within_the_stated_tolerances(quantized):
    precision, manifest, _ = quantized
    report, limits = manifest.quantization["quality"], LIMITS[precision]
    assert report["gate"]["passed"] and not report["gate"]["forced"]
    assert abs(report["perplexity"]["relative_increase"]) <= limits["ppl"]
    assert report["logits"]["mean_kl"] <= limits["mean_kl"]
    assert report["greedy"]["mean_agreeing_prefix"] >= limits["agreeing_prefix"]


def test_quantized_graph_and_manifest(quantized, bundled_dir):
    config, manifest, out = quantized
    options = CONFIGS[config]
    assert manifest.precision == options.precision and manifest.quantization["bits"] == options.bits
    assert manifest.quantization["method"] == options.method
    graph = onnx.load(str(out / "model.onnx"), load_external_data=False).graph
    matmuls = 4 * manifest.num_layers + 1  # qkv, o, gate|up, down per layer, and the LM head
    if options.method == "dynamic":
        assert sum(n.op_type in ("DynamicQuantizeMatMul", "MatMulIntegerToFloat") for n in graph.node) == matmuls
    else:
        nbits = [n for n in graph.node if n.op_type == "MatMulNBits"]
        assert len(nbits) == matmuls
        assert all(next(a.i for a in n.attribute if a.name == "bits") == options.bits for n in nbits)
    assert not any(n.op_type == "MatMul" for n in graph.node)
    # the embedding lookup is quantized; tied to a MatMulNBits LM head it reads the head's own bytes
    lookup = next(n for n in graph.node if n.op_type == "GatherBlockQuantized")
    head = next(n for n in graph.node if "logits" in n.output)
    assert (lookup.input[0] == head.input[1]) == (options.method == "weight-only")
    assert manifest.quantization["embedding"]["shared_with_lm_head"] == (options.method == "weight-only")
    fp32 = [t.name for t in graph.initializer if t.data_type == onnx.TensorProto.FLOAT
            and sorted(t.dims) == sorted([manifest.vocab_size, manifest.hidden_size])]
    assert fp32 == []  # no fp32 (vocab, hidden) matrix left
    size = sum(p.stat().st_size for p in out.iterdir())
    assert size < 0.5 * sum(p.stat().st_size for p in bundled_dir.iterdir())
    reloaded = fastllm.load(out)
    assert reloaded.manifest.quantization == manifest.quantization
    c = reloaded.generate("A decorator is", fastllm.SamplingParams(max_new_tokens=8, ignore_eos=True))
    assert c.completion_tokens == 8 and c.text


def test_info_summarises_the_quantization(quantized, capsys):
    config, manifest, out = quantized
    assert main(["info", str(out)]) == 0
    text = capsys.readouterr().out
    assert f"quantized:    {CONFIGS[config].method}" in text
    assert f"matmuls:      {4 * manifest.num_layers + 1} {CONFIGS[config].precision}; LM head" in text
    assert "embedding:    int" in text and "gate passed" in text and "(its fp32 source)" in text


def test_mixed_precision_keeps_the_most_sensitive_matmuls(bundled_dir, tmp_path):
    budget = 0.01  # all-int4 costs +2.5%: some MatMuls must stay in int8
    manifest = quantize_model(bundled_dir, tmp_path / "mixed", QuantOptions("int4", mixed="int8",
                                                                            max_ppl_increase=budget), text=TEXT)
    q = manifest.quantization
    mixed, report = q["mixed_precision"], q["quality"]
    k, measured = mixed["kept_count"], {int(c): v for c, v in mixed["calibration_ppl_increase"].items()}
    assert 0 < k < mixed["candidates"] == 4 * manifest.num_layers + 1
    assert measured[0] > budget and measured[k] <= budget  # all-int4 misses the budget, the choice meets it
    assert k - 1 in measured and measured[k - 1] > budget  # and one fewer kept would not
    kl = list(mixed["kl"].values())
    assert kl == sorted(kl, reverse=True) and mixed["kept"] == list(mixed["kl"])[:k]  # the most sensitive
    assert q["matmuls"] == {"int8": k, "int4": mixed["candidates"] - k}
    graph = onnx.load(str(tmp_path / "mixed" / "model.onnx"), load_external_data=False).graph
    bits = [next(a.i for a in n.attribute if a.name == "bits") for n in graph.node if n.op_type == "MatMulNBits"]
    assert sorted(bits) == [4] * (mixed["candidates"] - k) + [8] * k
    assert report["gate"]["passed"] and report["perplexity"]["relative_increase"] <= budget


def test_a_tied_embedding_stays_with_an_fp32_lm_head(bundled_dir, tmp_path):
    """With the LM head kept fp32 the lookup keeps reading that matrix: a quantized copy would only add bytes."""
    manifest = quantize_model(bundled_dir, tmp_path / "head", QuantOptions("int4", lm_head=False), text=TEXT)
    q = manifest.quantization
    assert q["lm_head"] == "fp32" and q["embedding"] == {"quantized": False, "reason": "tied to the fp32 LM head"}
    graph = onnx.load(str(tmp_path / "head" / "model.onnx"), load_external_data=False).graph
    assert not any(n.op_type == "GatherBlockQuantized" for n in graph.node)
    matrices = [t.name for t in graph.initializer if sorted(t.dims) == sorted([manifest.vocab_size,
                                                                                 manifest.hidden_size])]
    assert len(matrices) == 1  # stored once, read by the lookup and the head


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("tied", [True, False])
def test_quantized_embedding_reads_what_the_lm_head_multiplies(bits, symmetric, tied):
    """The lookup of token t equals column t of the quantized LM head (exactly: same bytes, or the same routine),
    including a hidden size that is not a multiple of the block size."""
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    vocab, hidden = 300, 80
    weight = np.random.default_rng(bits).standard_normal((hidden, vocab)).astype(np.float32)  # (hidden, vocab)
    inits = [numpy_helper.from_array(weight, "head")]
    if tied:
        nodes = [helper.make_node("Gather", ["head", "input_ids"], ["cols"], axis=1),
                 helper.make_node("Transpose", ["cols"], ["embedded"], perm=[1, 2, 0])]
    else:
        inits.append(numpy_helper.from_array(weight.T.copy(), "embedding"))
        nodes = [helper.make_node("Gather", ["embedding", "input_ids"], ["embedded"], axis=0)]
    nodes.append(helper.make_node("MatMul", ["x", "head"], ["logits"], name="lm_head"))
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("input_ids", onnx.TensorProto.INT64, ["b", "s"]),
                     helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["n", hidden])],
        [helper.make_tensor_value_info("embedded", onnx.TensorProto.FLOAT, ["b", "s", hidden]),
         helper.make_tensor_value_info("logits", onnx.TensorProto.FLOAT, ["n", vocab])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    quantizer = MatMulNBitsQuantizer(model, bits=bits, block_size=32, is_symmetric=symmetric, accuracy_level=0)
    quantizer.process()
    model = quantizer.model.model
    info = quantize_embedding(model, bits=bits, block_size=32, symmetric=symmetric,
                              shared_head=lm_head(model) if tied else None)
    assert info["quantized"] and info["shared_with_lm_head"] == tied
    assert not any(t.name in ("head", "embedding") for t in model.graph.initializer)  # fp32 matrices gone
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    ids = np.array([[0, 7, 299], [150, 150, 3]], np.int64)
    embedded, head_columns = session.run(None, {"input_ids": ids, "x": np.eye(hidden, dtype=np.float32)})
    np.testing.assert_allclose(embedded, head_columns.T[ids], rtol=0, atol=1e-6)
    step = np.abs(weight).max() / (2 ** (bits - 1) - 1)
    assert np.abs(embedded - weight.T[ids]).max() <= step  # and it is the fp32 embedding, quantized


def test_gate_refuses_a_bad_setting_and_writes_nothing(bundled_dir, tmp_path):
    out = tmp_path / "bad"
    with pytest.raises(fastllm.ExportError, match=r"quality gate: perplexity rose .* more than the int4 budget of "
                                                  r"0\.10%; nothing was written"):
        quantize_model(bundled_dir, out, QuantOptions("int4", block_size=256, max_ppl_increase=0.001), text=TEXT)
    assert list(tmp_path.iterdir()) == []


def test_force_writes_and_records_the_failed_gate(bundled_dir, tmp_path):
    manifest = quantize_model(bundled_dir, tmp_path / "forced", QuantOptions("int4", max_ppl_increase=0.0),
                              text=TEXT, force=True)
    gate = manifest.quantization["quality"]["gate"]
    assert gate["forced"] and not gate["passed"]


def test_only_fp32_models_are_quantized(quantized, tmp_path):
    _, _, out = quantized
    with pytest.raises(fastllm.ExportError, match="quantize from an fp32 export"):
        quantize_model(out, tmp_path / "again", QuantOptions("int8"), text=TEXT)


@pytest.mark.parametrize("kw, message", [({"precision": "int2"}, "precision must be one of int8, int4"),
                                         ({"precision": "int4", "block_size": 48}, "power of two"),
                                         ({"precision": "int4", "method": "dynamic"}, "not available for int4"),
                                         ({"precision": "int8", "mixed": "int8"}, "choose fp32"),
                                         ({"precision": "int8", "method": "dynamic", "mixed": "fp32"},
                                          "weight-only quantization")])
def test_bad_options(kw, message):
    with pytest.raises(fastllm.ExportError, match=message):
        QuantOptions(**kw)


def test_cli_exports_straight_to_mixed_int4(tmp_path, capsys):
    """`fastllm export SRC OUT --precision int4 --mixed int8`: fp32 export, sensitivity, selection, quantization,
    report and gate in one command; only OUT is left behind."""
    from fastllm.train.bundled import BUNDLED

    text, calibration = tmp_path / "held_out.txt", tmp_path / "calibration.txt"
    text.write_text(TEXT[:30_000])
    calibration.write_text("\n\n".join(split()[0])[:40_000])  # training text: all-int4 costs it ~5%
    out = tmp_path / "out"
    assert main(["export", str(BUNDLED), str(out), "--precision", "int4", "--mixed", "int8", "--max-ppl-increase",
                 "0.03", "--text", str(text), "--calibration-text", str(calibration)]) == 0
    printed = capsys.readouterr()
    assert "mixed: keeping" in printed.err and f"{out}: LlamaForCausalLM, fused graph, int4" in printed.out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["calibration.txt", "held_out.txt", "out"]
    mixed = fastllm.load(out).manifest.quantization["mixed_precision"]
    assert mixed["budget"] == 0.03 and mixed["kept_count"] > 0 and mixed["met_on_calibration"]


def test_cli_refuses_options_that_do_not_go_together(bundled_dir, tmp_path, capsys):
    assert main(["quantize", str(bundled_dir), str(tmp_path / "q"), "--precision", "int4", "--method", "dynamic"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("fastllm: error: method 'dynamic' is not available for int4") and err.count("\n") == 1
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("config", ["int4", "int8-dynamic"])
def test_every_architecture_and_graph_quantizes(exported, variant, config, tmp_path):
    """Both methods on every tiny architecture and graph kind: every weight MatMul rewritten, the embedding lookup
    quantized (shared with a tied LM head under weight-only), and the result loads and generates (random weights:
    the quality figures are only checked for being measured)."""
    _, src = exported[variant]
    options = CONFIGS[config]
    manifest = quantize_model(src, tmp_path / "q", options, text=TEXT[:10_000], force=True)
    q = manifest.quantization
    graph = onnx.load(str(tmp_path / "q" / "model.onnx"), load_external_data=False).graph
    assert not any(n.op_type == "MatMul" and n.input[1] in {t.name for t in graph.initializer} for n in graph.node)
    assert sum(q["matmuls"].values()) == q["matmuls"]["int8" if config == "int8-dynamic" else "int4"]
    assert sum(n.op_type == "GatherBlockQuantized" for n in graph.node) == 1 and q["embedding"]["quantized"]
    report = q["quality"]
    assert np.isfinite(report["logits"]["mean_kl"]) and report["greedy"]["prompts"] == 8
    c = fastllm.load(tmp_path / "q").generate("def main():", fastllm.SamplingParams(max_new_tokens=6,
                                                                                       ignore_eos=True))
    assert c.completion_tokens == 6


def test_blocks_are_never_longer_than_a_row(exported, tmp_path):
    """int8's default blocks of 128 on a model of hidden size 64: every MatMulNBits and the embedding lookup take
    blocks of 64 (the largest power of two that fits the row), none is padding."""
    import onnx

    from fastllm.export.precision import QuantOptions, fit_block
    from fastllm.export.quantize import quantize_model

    assert [fit_block(128, k) for k in (64, 100, 128, 576, 8)] == [64, 64, 128, 128, 16]
    src = exported["LlamaForCausalLM"][1]
    out = tmp_path / "int8"
    manifest = quantize_model(src, out, QuantOptions("int8"), force=True)
    model = onnx.load(str(out / "model.onnx"), load_external_data=False)
    for node in model.graph.node:
        if node.op_type in ("MatMulNBits", "GatherBlockQuantized"):
            a = {x.name: x.i for x in node.attribute}
            k = a.get("K", 64)
            assert a["block_size"] <= k, (node.name, a)
    total = manifest.quantization["matmuls"]["int8"]
    # rows of 64 everywhere but the two down projections (intermediate size 128)
    assert manifest.quantization["blocks"] == {"int8 blocks of 64": total - 2, "int8 blocks of 128": 2}
