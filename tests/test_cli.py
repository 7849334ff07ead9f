"""The `fastllm` command: prompt sources, flags and their defaults, clamping to the context, exit codes.

Exit status: 0 done, 1 an error, 2 a usage error; either error is one line `fastllm: error: ...` on stderr.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import onnxruntime
import pytest

import fastllm
from fastllm.cli import main, parser

GPT2 = "GPT2LMHeadModel"


@pytest.fixture(scope="module")
def model(exported):
    return exported[GPT2][1]


@pytest.fixture(scope="module")
def engine(engines):
    return engines[GPT2]


@pytest.fixture(scope="module")
def ids_only(exported, tmp_path_factory):
    """A copy of the GPT-2 model without a tokenizer (token ids in, token ids out)."""
    dst = tmp_path_factory.mktemp("ids-only") / "model"
    shutil.copytree(exported[GPT2][1], dst)
    os.remove(dst / "tokenizer.json")
    edit_manifest(dst, tokenizer=None)
    return dst


@pytest.fixture(scope="module")
def sampling_model(exported, tmp_path_factory):
    """A copy of the GPT-2 model without a tokenizer whose generation config samples."""
    dst = tmp_path_factory.mktemp("sampling") / "model"
    shutil.copytree(exported[GPT2][1], dst)
    os.remove(dst / "tokenizer.json")
    edit_manifest(dst, tokenizer=None, generation={"do_sample": True, "temperature": 1.3, "top_k": 40})
    return dst


def edit_manifest(path, **changes):
    data = json.loads((path / "fastllm.json").read_text())
    data.update(changes)
    (path / "fastllm.json").write_text(json.dumps(data))


def run(*args, stdin: bytes | None = None) -> subprocess.CompletedProcess:
    """`python -m fastllm ARGS` with bytes in and out (argv items may be bytes that are not UTF-8)."""
    argv = [sys.executable, "-m", "fastllm", *(a if isinstance(a, bytes) else os.fsencode(str(a)) for a in args)]
    return subprocess.run(argv, input=stdin or b"", capture_output=True, timeout=120, check=False)


def cli(capsys, *args) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(err: str, message: str) -> None:
    assert err.startswith("fastllm: error: ") and err.count("\n") == 1 and err.endswith("\n"), err
    assert message in err and "Traceback" not in err, err


def ids_text(ids) -> str:
    return ",".join(map(str, ids))


# -- entry points -----------------------------------------------------------------------------------------------------
def test_python_dash_m_fastllm_prints_the_versions():
    result = run("--version")
    assert (result.returncode, result.stdout.decode()) == (
        0, f"fastllm {fastllm.__version__} (onnxruntime {onnxruntime.__version__})\n")


def test_python_dash_m_fastllm_generates_like_the_api(model, engine):
    result = run("generate", model, "Return the", "--max-new-tokens", "6", "--ignore-eos")
    expected = engine.generate("Return the", fastllm.SamplingParams(max_new_tokens=6, ignore_eos=True)).text
    assert (result.returncode, result.stdout.decode()) == (0, expected + "\n")


def test_speculative_generates_the_same_text(capsys, model):
    args = ("generate", model, "Return the value. Return the", "--max-new-tokens", "24", "--ignore-eos")
    assert cli(capsys, *args, "--speculative")[:2] == cli(capsys, *args)[:2]


# -- prompt sources ---------------------------------------------------------------------------------------------------
def test_ids_give_the_same_text_as_the_prompt(capsys, model, engine):
    ids = engine.encode("Return the")
    assert cli(capsys, "generate", model, "--ids", ids_text(ids), "--max-new-tokens", "6", "--ignore-eos")[:2] == \
        cli(capsys, "generate", model, "Return the", "--max-new-tokens", "6", "--ignore-eos")[:2]


@pytest.mark.parametrize("stream", [True, False])
def test_a_model_without_tokenizer_prints_token_ids(capsys, ids_only, engine, stream):
    expected = engine.generate([5, 6, 7], fastllm.SamplingParams(max_new_tokens=8, ignore_eos=True)).token_ids
    code, out, _ = cli(capsys, "generate", ids_only, "--ids", "5,6,7", "--max-new-tokens", "8", "--ignore-eos",
                       *([] if stream else ["--no-stream"]))
    assert (code, out) == (0, ids_text(expected) + "\n")


def test_text_prompt_for_a_model_without_tokenizer(capsys, ids_only):
    code, _, err = cli(capsys, "generate", ids_only, "hello")
    assert code == 1
    assert_one_line_error(err, "has no tokenizer; pass the prompt as token ids with --ids 1,2,3")


def test_prompt_file_is_read_as_utf8(capsys, model, tmp_path):
    (tmp_path / "p.txt").write_text("naïve café\n", encoding="utf-8")
    from_file = cli(capsys, "generate", model, "--prompt-file", tmp_path / "p.txt", "--max-new-tokens", "5")
    assert from_file[:2] == cli(capsys, "generate", model, "naïve café", "--max-new-tokens", "5")[:2]


@pytest.mark.parametrize("content, message", [
    (b"caf\xe9 latin-1", "--prompt-file 'p.txt' is not UTF-8 text (byte 0xe9 at offset 3); convert it to UTF-8"),
    (None, "cannot read --prompt-file 'p.txt': No such file or directory"),
])
def test_unreadable_prompt_file(capsys, model, tmp_path, monkeypatch, content, message):
    monkeypatch.chdir(tmp_path)
    if content is not None:
        (tmp_path / "p.txt").write_bytes(content)
    code, _, err = cli(capsys, "generate", model, "--prompt-file", "p.txt")
    assert code == 1
    assert_one_line_error(err, message)


def test_dash_reads_the_prompt_from_stdin(model):
    from_stdin = run("generate", model, "-", "--max-new-tokens", "5", stdin="naïve café\n".encode())
    from_argv = run("generate", model, "naïve café", "--max-new-tokens", "5")
    assert (from_stdin.returncode, from_stdin.stdout) == (0, from_argv.stdout)


def test_stdin_that_is_not_utf8(model):
    result = run("generate", model, "-", stdin=b"abc\xff")
    assert result.returncode == 1
    assert_one_line_error(result.stderr.decode(), "stdin is not UTF-8 text (byte 0xff at offset 3)")


def test_argv_that_is_not_utf8_is_refused_naming_the_position(model):
    result = run("generate", model, b"abc\xff")  # Python decodes it as the lone surrogate '\udcff'
    assert result.returncode == 1
    assert_one_line_error(result.stderr.decode(), r"prompt is not valid Unicode: '\udcff' at character 3")


@pytest.mark.parametrize("args, message", [
    (["PROMPT", "--ids", "1,2"], "give exactly one prompt source (PROMPT, -, --ids or --prompt-file), got PROMPT and"),
    (["--ids", "1,2", "--prompt-file", "p.txt"], "got --ids and --prompt-file"),
    ([], "no prompt: give PROMPT, - (read stdin), --ids 1,2,3 or --prompt-file FILE"),
    (["a", "b"], "generate takes [MODEL_DIR] PROMPT, got 3 arguments; quote the prompt"),
    (["--ids", "1,x"], "argument --ids: expected comma-separated token ids like 1,2,3, got '1,x'"),
    (["hi", "--top-k", "1.5"], "argument --top-k: invalid int value: '1.5'"),
    (["hi", "--no-such-flag"], "unrecognized arguments: --no-such-flag"),
])
def test_usage_errors_exit_2_on_one_line(capsys, model, args, message):
    code, _, err = cli(capsys, "generate", model, *args)
    assert code == 2
    assert_one_line_error(err, message)
    assert "see `fastllm generate --help`" in err


def test_usage_error_from_the_command_line_exits_2(model):
    result = run("generate", model)
    assert result.returncode == 2
    assert_one_line_error(result.stderr.decode(), "no prompt")


def test_errors_that_are_not_usage_exit_1(capsys, model):
    code, _, err = cli(capsys, "generate", model, "hi", "--temperature", "-1")
    assert code == 1
    assert_one_line_error(err, "temperature must be >= 0 (0 = greedy), got -1.0")


# -- flags ------------------------------------------------------------------------------------------------------------
def test_every_generate_flag_has_help_with_its_default(capsys):
    generate = next(a for a in parser()._actions if a.dest == "command").choices["generate"]
    flags = {a.option_strings[-1]: a.help for a in generate._actions if a.option_strings and a.dest != "help"}
    for flag in ("--presence-penalty", "--frequency-penalty", "--stop-token-id", "--ignore-eos", "--max-new-tokens",
                 "--ids", "--prompt-file"):
        assert flag in flags
    assert [f for f, text in flags.items() if "default" not in text and f not in ("--ids", "--prompt-file")] == []
    assert main(["generate", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "--temperature T 0 = greedy (default: the model's generation config, else 0, greedy)" in text


def test_sampling_flags_reach_the_sampler(capsys, ids_only, engine):
    params = fastllm.SamplingParams(max_new_tokens=12, temperature=0.8, top_k=50, top_p=0.95, min_p=0.01,
                                    repetition_penalty=1.1, presence_penalty=0.5, frequency_penalty=0.25, seed=3,
                                    ignore_eos=True)
    full = engine.generate([5, 6, 7], params).token_ids
    stop_id = full[4]
    expected = engine.generate([5, 6, 7], params.replace(stop_token_ids=(stop_id,))).token_ids
    code, out, _ = cli(capsys, "generate", ids_only, "--ids", "5,6,7", "--max-new-tokens", "12", "--temperature",
                       "0.8", "--top-k", "50", "--top-p", "0.95", "--min-p", "0.01", "--repetition-penalty", "1.1",
                       "--presence-penalty", "0.5", "--frequency-penalty", "0.25", "--seed", "3", "--ignore-eos",
                       "--stop-token-id", stop_id)
    assert (code, out) == (0, ids_text(expected) + "\n") and len(expected) < 12


# -- max-new-tokens and the context -----------------------------------------------------------------------------------
def test_max_new_tokens_is_clamped_to_the_context_with_a_note(capsys, ids_only):
    code, out, err = cli(capsys, "generate", ids_only, "--ids", ",".join(["5"] * 216), "--ignore-eos")
    assert (code, err) == (0, "[fastllm] max-new-tokens 128 -> 40: the context is 256 tokens and the prompt has 216\n")
    assert len(out.split(",")) == 40


def test_explicit_max_new_tokens_is_clamped_too(capsys, ids_only):
    code, _, err = cli(capsys, "generate", ids_only, "--ids", "5,6", "--max-new-tokens", "1000", "--ignore-eos")
    assert (code, err) == (0, "[fastllm] max-new-tokens 1000 -> 254: the context is 256 tokens and the prompt has 2\n")


def test_a_prompt_that_leaves_no_room_is_a_context_length_error(capsys, ids_only):
    code, _, err = cli(capsys, "generate", ids_only, "--ids", ",".join(["5"] * 256))
    assert code == 1
    assert_one_line_error(err, "the prompt has 256 tokens but the model's context is 256 tokens, leaving no room to "
                               "generate; shorten it to at most 255 tokens")


# -- defaults from the model's generation config ----------------------------------------------------------------------
def test_cli_samples_with_the_models_generation_config(capsys, sampling_model, engine):
    expected = engine.generate([5, 6], fastllm.SamplingParams(max_new_tokens=10, temperature=1.3, top_k=40, seed=1,
                                                              ignore_eos=True)).token_ids
    code, out, _ = cli(capsys, "generate", sampling_model, "--ids", "5,6", "--max-new-tokens", "10", "--seed", "1",
                       "--ignore-eos")
    assert (code, out) == (0, ids_text(expected) + "\n")


def test_a_flag_overrides_only_its_field_of_the_generation_config(capsys, sampling_model, engine):
    expected = engine.generate([5, 6], fastllm.SamplingParams(max_new_tokens=10, temperature=0.5, top_k=40, seed=1,
                                                              ignore_eos=True)).token_ids
    code, out, _ = cli(capsys, "generate", sampling_model, "--ids", "5,6", "--max-new-tokens", "10", "--seed", "1",
                       "--ignore-eos", "--temperature", "0.5")
    assert (code, out) == (0, ids_text(expected) + "\n")


def test_a_reader_that_goes_away_ends_the_command_quietly(model):
    """`fastllm generate ... | head -c 1`: no BrokenPipeError traceback, the exit status of a closed pipe."""
    argv = [sys.executable, "-m", "fastllm", "generate", str(model), "Return the", "--max-new-tokens", "64",
            "--ignore-eos"]
    with subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE) as p:
        assert p.stdout.read(1)
        p.stdout.close()
        err = p.stderr.read().decode()
        assert p.wait(timeout=120) == 141 and "Traceback" not in err and "Error" not in err, err
