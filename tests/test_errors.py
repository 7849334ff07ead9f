"""Every bad input raises a fastllm exception naming the problem and the fix; the CLI prints one line, exits 1."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

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
    with pytest.raises(fastllm.ModelLoadError, match="onnxruntime could not load.*re-export"):
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
    with pytest.raises(fastllm.InvalidPromptError, match=r"outside the vocabulary \[0, 512\): \[9999\]"):
        engines["GPT2LMHeadModel"].generate([5, 9999])


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
    (["--max-new-tokens", "1000"], "exceeds the model's context of 256"),
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
