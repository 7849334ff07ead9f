"""The quality-per-bit table: llama.cpp's formats applied to a real model directory, measured by the same report
as fastllm's own precisions, and the loop check."""

from __future__ import annotations

import numpy as np
import pytest

import fastllm
from fastllm.export.baselines import fake_quantized_copy, matrix_weights
from fastllm.export.quality import ends_in_loop
from fastllm.export.quality_table import markdown, measure


def test_loop_check():
    assert ends_in_loop([1, 2, 3] * 30)
    assert ends_in_loop(list(range(60)) + [7] * 40)
    assert not ends_in_loop(list(range(100)))
    assert not ends_in_loop([1, 2] * 5)  # too short to tell
    assert not ends_in_loop(list(range(80)) + list(range(17)) * 2)  # a period longer than 16


def test_fake_quantized_copy_is_a_working_fp32_directory_with_llama_cpp_rounding(exported, tmp_path):
    src = exported["LlamaForCausalLM"][1]  # hidden 64: Q4_K's super-blocks of 256 do not fit, Q5_0 stands in
    made = {name: fake_quantized_copy(src, tmp_path / name, name) for name in ("q8_0", "q4_k")}
    assert made["q8_0"]["bits_per_weight"] == 8.5 and set(made["q8_0"]["matrices"]) == {"q8_0"}
    assert set(made["q4_k"]["matrices"]) == {"q5_0"} and made["q4_k"]["bits_per_weight"] == 5.5
    assert made["q8_0"]["weights"] == matrix_weights(src)  # counted from the graph alone, without its data
    ids = [5, 17, 33, 2, 90, 41, 7, 8, 9]
    ref = fastllm.load(src, threads=1).score(ids)
    diff = {name: np.abs(fastllm.load(tmp_path / name, threads=1).score(ids).logprobs - ref.logprobs).max()
            for name in made}
    assert 0 < diff["q8_0"] < diff["q4_k"] < 1  # rounded, 8 bits less than 5
    with pytest.raises(FileExistsError):
        fake_quantized_copy(src, tmp_path / "q8_0", "q8_0")  # never over an existing directory


def test_table_measures_fastllm_and_baselines_side_by_side(exported, tmp_path):
    src = exported["LlamaForCausalLM"][1]
    result = measure(src, tmp_path / "tiny", ["int8", "q8_0"], text="", progress=lambda line: None)
    rows = result["settings"]
    assert set(rows) == {"fp32", "int8", "q8_0"}
    for name in ("int8", "q8_0"):
        assert rows[name]["kl"] >= 0 and 0 <= rows[name]["loops"] <= result["prompts"]
        assert rows[name]["perplexity"]["source"] == "self-generated"  # no text: the fp32 model's own samples
    # blocks fitted to the rows: int8's default of 128 on hidden 64 would be half padding (~16 bits per weight)
    assert 8 < rows["int8"]["bits_per_weight"] < 10
    text = markdown([result])
    assert "| q8_0 | 8.50 |" in text and "| int8 |" in text
