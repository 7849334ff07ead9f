"""int8 / int4 weight-only quantization of the project's trained model: quality within the stated budgets, the
report in the manifest, and the gate refusing a bad setting without writing anything."""

from __future__ import annotations

import onnx
import pytest

import fastllm
from export.quantize import QuantOptions, quantize_model
from train.corpus import held_out_text

TEXT = held_out_text()[:60_000]  # ~17k tokens: enough for a stable perplexity, quick
# Stated tolerances against the fp32 model (measured: int8 +0.01% perplexity, mean KL 9e-4; int4 +2.0%, 4e-2)
LIMITS = {"int8": {"ppl": 0.01, "mean_kl": 5e-3, "agreeing_prefix": 12},
          "int4": {"ppl": 0.05, "mean_kl": 1e-1, "agreeing_prefix": 3}}


@pytest.fixture(scope="module", params=["int8", "int4"])
def quantized(request, bundled_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("q") / request.param
    return request.param, quantize_model(bundled_dir, out, QuantOptions(request.param), text=TEXT), out


def test_quality_within_the_stated_tolerances(quantized):
    precision, manifest, _ = quantized
    report, limits = manifest.quantization["quality"], LIMITS[precision]
    assert report["gate"]["passed"] and not report["gate"]["forced"]
    assert abs(report["perplexity"]["relative_increase"]) <= limits["ppl"]
    assert report["logits"]["mean_kl"] <= limits["mean_kl"]
    assert report["greedy"]["mean_agreeing_prefix"] >= limits["agreeing_prefix"]


def test_quantized_graph_and_manifest(quantized, bundled_dir):
    precision, manifest, out = quantized
    bits = {"int8": 8, "int4": 4}[precision]
    assert manifest.precision == precision and manifest.quantization["bits"] == bits
    graph = onnx.load(str(out / "model.onnx"), load_external_data=False).graph
    nbits = [n for n in graph.node if n.op_type == "MatMulNBits"]
    assert len(nbits) == 4 * manifest.num_layers + 1  # qkv, o, gate|up, down per layer, and the LM head
    assert all(next(a.i for a in n.attribute if a.name == "bits") == bits for n in nbits)
    size = sum(p.stat().st_size for p in out.iterdir())
    assert size < 0.75 * sum(p.stat().st_size for p in bundled_dir.iterdir())
    reloaded = fastllm.load(out)
    assert reloaded.manifest.quantization == manifest.quantization
    c = reloaded.generate("A decorator is", fastllm.SamplingParams(max_new_tokens=8, ignore_eos=True))
    assert c.completion_tokens == 8 and c.text


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
                                         ({"precision": "int4", "block_size": 48}, "power of two")])
def test_bad_options(kw, message):
    with pytest.raises(fastllm.ExportError, match=message):
        QuantOptions(**kw)
