"""Every bad input raises a fastllm exception naming the problem and the fix; the CLI prints one line, exits 1."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

import fastllm
from fastllm.cli import main

FASTLLM = [sys.executable, "-m", "fastllm.cli"]


def copy_model(exported, tmp_path, arch="GPT2LMHeadModel"):
    dst = tmp_path / "model"
    shutil.copytree(exported[arch][1], dst)
    return dst


def edit_manifest(path, **changes):
    data = json.loads((path / "fastllm.json").read_text())
    data.update(changes)
    (path / "fastllm.json").write_text(json.dumps(data))


# -- model directory ------------------------------------------------------------------------------------------------
def test_missing_directory(tmp_path):
    with pytest.raises(fastllm.ModelLoadError, match="does not exist.*fastllm export"):
        fastllm.load(tmp_path / "nowhere")


def test_directory_without_manifest(tmp_path):
    with pytest.raises(fastllm.ModelLoadError, match="no fastllm.json.*fastllm export SRC OUT"):
        fastllm.load(tmp_path)


def test_corrupt_manifest(exported, tmp_path):
    model = copy_model(exported, tmp_path)
    (model / "fastllm.json").write_text("{ not json")
    with pytest.raises(fastllm.ManifestError, match="not valid JSON.*re-export"):
        fastllm.load(model)


def test_unknown_manifest_version(exported, tmp_path):
    model = copy_model(exported, tmp_path)
    edit_manifest(model, format_version=99)
    with pytest.raises(fastllm.ManifestError, match="format_version 99.*reads version 1.*re-export"):
        fastllm.load(model)


def test_manifest_that_disagrees_with_the_graph(exported, tmp_path):
    model = copy_model(exported, tmp_path)
    data = json.loads((model / "fastllm.json").read_text())
    data["graph"]["inputs"][0]["name"] = "tokens"
    (model / "fastllm.json").write_text(json.dumps(data))
    with pytest.raises(fastllm.ManifestError, match=r"disagrees.*in manifest only: \['tokens'\].*re-export"):
        fastllm.load(model)


def test_corrupt_graph(exported, tmp_path):
    model = copy_model(exported, tmp_path)
    (model / "model.onnx").write_bytes(b"\x00garbage" * 100)
    with pytest.raises(fastllm.ModelLoadError, match="onnxruntime .*could not load.*re-export"):
        fastllm.load(model)


def test_missing_weights_file(exported, tmp_path):
    model = copy_model(exported, tmp_path)
    os.remove(model / "model.onnx.data")
    with pytest.raises(fastllm.ModelLoadError, match="could not load"):
        fastllm.load(model)


def test_cuda_where_it_cannot_run(exported):
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime has CUDA")
    with pytest.raises(fastllm.DeviceError, match="CUDAExecutionProvider.*fastllm\\[gpu\\]"):
        fastllm.load(exported["GPT2LMHeadModel"][1], device="cuda")


@pytest.mark.parametrize("kw, message", [
    ({"device": "tpu"}, "device must be 'cpu', 'cuda' or 'cuda:N', got 'tpu'"),
    ({"threads": 0}, "threads must be a positive integer"),
])
def test_bad_load_parameters(exported, kw, message):
    with pytest.raises(fastllm.InvalidParameterError, match=message):
        fastllm.load(exported["GPT2LMHeadModel"][1], **kw)


# -- prompts and lengths ----------------------------------------------------------------------------------------
def test_empty_prompts(engines):
    engine = engines["GPT2LMHeadModel"]
    with pytest.raises(fastllm.InvalidPromptError, match="prompt is empty"):
        engine.generate("")
    with pytest.raises(fastllm.InvalidPromptError, match="prompt is empty"):
        engine.generate([])
    with pytest.raises(fastllm.InvalidPromptError, match="prompt 1 is empty"):
        engine.generate(["ok", ""])


def test_token_ids_outside_the_vocabulary(engines):
    with pytest.raises(fastllm.InvalidPromptError,
                       match=r"outside the vocabulary \[0, 512\): \[9999\] at positions \[1\]"):
        engines["GPT2LMHeadModel"].generate([5, 9999])


def test_text_with_a_lone_surrogate_is_refused_naming_the_position(engines):
    # what sys.argv holds for the bytes b"abc\xff"; replacing it would silently change the prompt
    with pytest.raises(fastllm.InvalidPromptError, match=r"prompt is not valid Unicode: '\\udcff' at character 3"):
        engines["GPT2LMHeadModel"].generate("abc\udcff")


@pytest.mark.parametrize("prompt, message", [
    (b"hello", r"prompt is bytes; decode it to str first \(prompt.decode\('utf-8'\)\) or pass token ids"),
    (None, "prompt must be a string, a list of token ids or a 1-D integer numpy array.*got NoneType"),
    (5, "got int"),
    ([5, True], "prompt has True of type bool at position 1; token ids are integers"),
    ([5, 6.0], "prompt has 6.0 of type float at position 1"),
    (["ok", 5], "prompt 1 must be a string"),
    (np.array([5.0, 6.0]), "prompt is an array of float64; token ids must be an integer array"),
    (np.zeros((1, 2, 3), dtype=np.int64), r"prompt is an array of shape \(1, 2, 3\); one prompt is 1-D"),
    (np.array([], dtype=np.int64), r"prompt is an empty array of shape \(0,\)"),
    (np.zeros((2, 0), dtype=np.int64), r"prompt is an empty array of shape \(2, 0\)"),
    (np.array([5, -1]), r"prompt has token ids outside the vocabulary \[0, 512\): \[-1\] at positions \[1\]"),
    (np.array([[5, 6], [7, 512]]), r"prompt 1 has token ids outside the vocabulary \[0, 512\): \[512\]"),
])
def test_bad_prompts_name_what_is_wrong(engines, prompt, message):
    with pytest.raises(fastllm.InvalidPromptError, match=message):
        engines["GPT2LMHeadModel"].generate(prompt)


def test_numpy_token_ids(engines):
    engine, params = engines["GPT2LMHeadModel"], fastllm.SamplingParams(max_new_tokens=5)
    rows = [[5, 6, 7], [8, 9, 10]]
    alone = [engine.generate(r, params) for r in rows]
    assert engine.generate(np.array(rows[0], dtype=np.int32), params).token_ids == alone[0].token_ids  # 1-D: one
    assert [c.token_ids for c in engine.generate(np.array(rows), params)] == [c.token_ids for c in alone]  # (B, S)
    assert [c.token_ids for c in engine.generate(np.array(rows[:1]), params)] == [alone[0].token_ids]  # (1, S): a list


@pytest.mark.parametrize("kw, message", [
    ({"temperature": "0.5"}, "temperature must be >= 0 .*got '0.5' of type str"),
    ({"max_new_tokens": 1.5}, "max_new_tokens must be an integer >= 1, got 1.5 of type float"),
    ({"max_new_tokens": True}, "max_new_tokens must be an integer >= 1, got True of type bool"),
    ({"top_k": True}, "top_k must be an integer >= 0 .*got True of type bool"),
    ({"stop": 5}, "stop must be a string or a list of strings, got 5 of type int"),
    ({"stop_token_ids": [True]}, r"stop_token_ids must be non-negative integers, got \(True,\)"),
    ({"seed": 1.0}, "seed must be a non-negative integer or None, got 1.0 of type float"),
    ({"ignore_eos": 1}, "ignore_eos must be True or False, got 1 of type int"),
    ({"presence_penalty": None}, r"presence_penalty must be in \[-2, 2\], got None of type NoneType"),
])
def test_parameters_of_the_wrong_type_name_field_and_value(kw, message):
    with pytest.raises(fastllm.InvalidParameterError, match=message):
        fastllm.SamplingParams(**kw)


def test_params_as_a_dict_are_sampling_params(engines):
    engine = engines["GPT2LMHeadModel"]
    from_dict = engine.generate("Return", {"max_new_tokens": 6, "temperature": 0.9, "seed": 4})
    expected = engine.generate("Return", fastllm.SamplingParams(max_new_tokens=6, temperature=0.9, seed=4))
    assert from_dict.token_ids == expected.token_ids


@pytest.mark.parametrize("params, message", [
    ({"max_tokens": 5}, "params has unknown field.*'max_tokens'.*fields of SamplingParams are max_new_tokens, temp"),
    (5, "params must be a SamplingParams, a dict of its fields or None, got int"),
    ({"top_p": 2}, r"top_p must be in \(0, 1\], got 2"),
])
def test_bad_params(engines, params, message):
    with pytest.raises(fastllm.InvalidParameterError, match=message):
        engines["GPT2LMHeadModel"].generate("Return", params)


def test_prompt_longer_than_the_context(engines):
    with pytest.raises(fastllm.ContextLengthError, match="300 tokens but the model's context is 256.*at most 255"):
        engines["GPT2LMHeadModel"].generate([5] * 300)


def test_max_new_tokens_that_cannot_fit(engines):
    with pytest.raises(fastllm.ContextLengthError,
                       match=r"\(200 tokens\) \+ max_new_tokens \(100\) exceeds.*256.*max_new_tokens <= 56"):
        engines["GPT2LMHeadModel"].generate([5] * 200, fastllm.SamplingParams(max_new_tokens=100))


# -- the CLI ----------------------------------------------------------------------------------------------------
def run_cli(*args):
    return subprocess.run([*FASTLLM, *map(str, args)], capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("args, message", [
    (["--temperature", "-1"], "temperature must be >= 0"),
    (["--top-p", "0"], r"top_p must be in (0, 1]"),
    (["--top-k", "-2"], "top_k must be an integer >= 0"),
    (["--min-p", "2"], "min_p must be in [0, 1]"),
    (["--repetition-penalty", "0"], "repetition_penalty must be > 0"),
    (["--presence-penalty", "3"], "presence_penalty must be in [-2, 2], got 3.0"),
])
def test_cli_reports_bad_parameters_on_one_line(exported, args, message):
    result = run_cli("generate", exported["GPT2LMHeadModel"][1], "hello", *args)
    assert result.returncode == 1
    assert result.stderr.startswith("fastllm: error:") and message in result.stderr
    assert "Traceback" not in result.stderr and result.stderr.count("\n") == 1


def test_cli_errors_for_model_directory_and_prompt(exported, tmp_path):
    for args, message in [
        (["generate", tmp_path / "missing", "hi"], "does not exist"),
        (["info", tmp_path], "no fastllm.json"),
        (["generate", exported["GPT2LMHeadModel"][1], ""], "prompt is empty"),
        (["export", tmp_path / "missing", tmp_path / "out"], "is not a directory"),
    ]:
        result = run_cli(*args)
        assert result.returncode == 1, (args, result.stderr)
        assert message in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()


def test_cli_unsupported_architecture(renamed_source, tmp_path):
    src = renamed_source("MambaForCausalLM")
    result = run_cli("export", src, tmp_path / "out")
    assert result.returncode == 1
    assert "'MambaForCausalLM' is not supported; supported architectures: GPT2LMHeadModel" in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "out").exists()


def test_cli_in_process_returns_nonzero(tmp_path, capsys):
    assert main(["info", str(tmp_path)]) == 1
    assert "fastllm: error:" in capsys.readouterr().err
