"""No data loss: OUT never overlaps a source, --overwrite replaces only a fastllm model directory holding nothing but
model files, and a replacement is atomic (the old model stays intact and loadable until the new one is complete)."""

from __future__ import annotations

import hashlib
import os
import shutil

import pytest

import fastllm
from fastllm.cli import main
from fastllm.export import staging as staging_module
from fastllm.export.staging import MODEL_FILES, foreign_entries, staging

GPT2, MISTRAL = "GPT2LMHeadModel", "MistralForCausalLM"
GREEDY = fastllm.SamplingParams(max_new_tokens=8)


def snapshot(root) -> dict[str, str]:
    """Every file and directory under root: its path -> the sha256 of its bytes ('dir' for a directory)."""
    root = os.fspath(root)
    found = {}
    for directory, dirs, files in os.walk(root):
        for name in dirs:
            found[os.path.relpath(os.path.join(directory, name), root)] = "dir"
        for name in files:
            with open(os.path.join(directory, name), "rb") as f:
                found[os.path.relpath(os.path.join(directory, name), root)] = hashlib.sha256(f.read()).hexdigest()
    return found


def cli(capsys, *args) -> tuple[int, str]:
    code = main([str(a) for a in args])
    err = capsys.readouterr().err
    return code, err


def leftovers(parent) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if any(s in p.name for s in (".tmp-", ".old-", ".fp32-")))


def refused(code: int, err: str, *needles: str, after_work: bool = False) -> None:
    """Exit 1 and one error line naming the problem (refusals before any work print nothing else)."""
    assert code == 1, err
    line = err.splitlines()[-1] if after_work else err.rstrip("\n")
    assert line.startswith("fastllm: error: ") and "\n" not in line, err
    for needle in needles:
        assert needle in line, err


@pytest.fixture
def src(hf_dirs, tmp_path):
    """A copy of the tiny GPT-2 Hugging Face directory at tmp_path/parent/child/src."""
    path = tmp_path / "parent" / "child" / "src"
    shutil.copytree(hf_dirs[GPT2], path)
    return path


@pytest.fixture
def model(exported, tmp_path):
    """A copy of the exported tiny GPT-2 model (never the session's own)."""
    path = tmp_path / "model"
    shutil.copytree(exported[GPT2][1], path)
    return path


# -- OUT and the source ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_export_onto_its_source_is_refused(src, capsys, precision):
    before = snapshot(src)
    code, err = cli(capsys, "export", src, src, "--overwrite", "--precision", precision)
    refused(code, err, f"OUT '{src}' is the source '{src}'")
    assert snapshot(src) == before and leftovers(src.parent) == []


def test_export_into_a_directory_holding_its_source_is_refused(src, tmp_path, capsys):
    parent = tmp_path / "parent"
    before = snapshot(parent)
    for out in (parent, parent / "child", src / ".." / ".."):
        code, err = cli(capsys, "export", src, out, "--overwrite")
        refused(code, err, "contains the source", str(src))
    assert snapshot(parent) == before and leftovers(tmp_path) == []


def test_export_inside_its_source_is_refused(src, capsys):
    before = snapshot(src)
    code, err = cli(capsys, "export", src, src / "fastllm")
    refused(code, err, "is inside the source")
    assert snapshot(src) == before


def test_symlinks_are_resolved(src, tmp_path, capsys):
    before = snapshot(src)
    (tmp_path / "link").symlink_to(src, target_is_directory=True)
    code, err = cli(capsys, "export", src, tmp_path / "link", "--overwrite")
    refused(code, err, "is the source")
    code, err = cli(capsys, "export", tmp_path / "link", src / "..", "--overwrite")
    refused(code, err, "contains the source")
    assert snapshot(src) == before
    (tmp_path / "empty").mkdir()
    (tmp_path / "elsewhere").symlink_to(tmp_path / "empty", target_is_directory=True)
    code, err = cli(capsys, "export", src, tmp_path / "elsewhere")
    refused(code, err, "is a symbolic link", "pass the directory itself")
    assert list((tmp_path / "empty").iterdir()) == [] and (tmp_path / "elsewhere").is_symlink()


def test_quantize_onto_or_around_its_source_is_refused(model, tmp_path, capsys):
    before = snapshot(model)
    for out, message in ((model, "is the source"), (tmp_path, "contains the source"),
                         (model / "int8", "is inside the source")):
        code, err = cli(capsys, "quantize", model, out, "--precision", "int8", "--overwrite")
        refused(code, err, message, str(model))
    assert snapshot(model) == before and leftovers(tmp_path) == []


# -- what OUT holds -------------------------------------------------------------------------------------------------


def test_files_that_are_not_part_of_a_model_are_never_deleted(hf_dirs, model, capsys):
    (model / "notes.txt").write_text("mine")
    (model / "runs").mkdir()
    (model / "runs" / "log").write_text("also mine")
    before = snapshot(model)
    code, err = cli(capsys, "export", hf_dirs[GPT2], model, "--overwrite")
    refused(code, err, "not part of a fastllm model: notes.txt, runs/", "move them elsewhere")
    assert snapshot(model) == before and leftovers(model.parent) == []


@pytest.mark.parametrize("manifest", [None, "{}", "not json"])
def test_a_directory_that_is_not_a_model_is_never_replaced(hf_dirs, tmp_path, capsys, manifest):
    out = tmp_path / "data"
    out.mkdir()
    (out / "model.onnx").write_text("someone else's")
    if manifest is not None:
        (out / "fastllm.json").write_text(manifest)
    before = snapshot(out)
    code, err = cli(capsys, "export", hf_dirs[GPT2], out, "--overwrite")
    refused(code, err, "is not a fastllm model directory", "choose another path")
    assert snapshot(out) == before


def test_a_model_is_replaced_only_with_overwrite(hf_dirs, model, capsys):
    before = snapshot(model)
    code, err = cli(capsys, "export", hf_dirs[GPT2], model)
    refused(code, err, "(a fastllm model); choose another path or pass --overwrite")
    assert snapshot(model) == before


def test_model_files_are_what_the_exporter_writes(exported):
    from fastllm.export.pipeline import TOKENIZER_FILES
    from fastllm.export.trace import DATA_FILE, GRAPH_FILE, PREFILL_DATA_FILE, PREFILL_FILE
    from fastllm.manifest import MANIFEST_NAME

    assert MODEL_FILES == {GRAPH_FILE, DATA_FILE, PREFILL_FILE, PREFILL_DATA_FILE, MANIFEST_NAME, *TOKENIZER_FILES}
    for key, (_, path) in exported.items():
        assert foreign_entries(path) == [], key


# -- replacing ------------------------------------------------------------------------------------------------------


def test_overwrite_replaces_a_model_and_leaves_nothing_beside_it(hf_dirs, model, capsys):
    code, err = cli(capsys, "export", hf_dirs[GPT2], model, "--overwrite", "--max-context", "64")
    assert code == 0, err
    assert fastllm.load(model).manifest.max_context == 64
    assert sorted(p.name for p in model.parent.iterdir()) == ["model"]
    assert foreign_entries(model) == []


def test_quantize_overwrite_replaces_a_quantized_model(model, tmp_path, capsys):
    (model / "notes.txt").write_text("stays with the fp32 model")
    out, text = tmp_path / "q", tmp_path / "text.txt"
    text.write_text("def add(a, b):\n    return a + b\n" * 20)
    for _ in range(2):
        code, err = cli(capsys, "quantize", model, out, "--precision", "int8", "--overwrite", "--force", "--text", text)
        assert code == 0, err
    assert fastllm.load(out).manifest.precision == "int8" and foreign_entries(out) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model", "q", "text.txt"]


def test_a_failed_overwrite_leaves_the_old_model_loadable(exported, hf_dirs, tmp_path, capsys, monkeypatch):
    out = tmp_path / "model"
    shutil.copytree(exported[MISTRAL][1], out)
    before, tokens = snapshot(out), fastllm.load(out).generate("def", GREEDY).token_ids
    # Work fails inside the staging directory: verification of a broken adapter (Mistral without its window).
    from fastllm.export.architectures import llama

    with monkeypatch.context() as patch:
        patch.setattr(llama, "sliding_windows", lambda *a: ())
        code, err = cli(capsys, "export", hf_dirs[MISTRAL], out, "--overwrite")
    refused(code, err, "verification failed", after_work=True)
    # Work fails before staging: a source whose weights are corrupt.
    corrupt = tmp_path / "corrupt"
    shutil.copytree(hf_dirs[MISTRAL], corrupt)
    with open(corrupt / "model.safetensors", "r+b") as f:
        f.truncate(100)
    code, err = cli(capsys, "export", corrupt, out, "--overwrite")
    refused(code, err, str(corrupt), after_work=True)
    assert snapshot(out) == before and leftovers(tmp_path) == []
    assert fastllm.load(out).generate("def", GREEDY).token_ids == tokens


def test_a_failure_between_the_renames_puts_the_old_model_back(model, tmp_path, monkeypatch):
    before = snapshot(model)
    real_replace = os.replace

    def replace(a, b):
        if ".tmp-" in os.fspath(a):
            raise OSError("disk gone")
        real_replace(a, b)

    monkeypatch.setattr(staging_module.os, "replace", replace)
    with pytest.raises(fastllm.ExportError, match="export failed: OSError: disk gone"):
        with staging(model, "export") as tmp:
            (tmp / "fastllm.json").write_text('{"format_version": 1}')
    assert snapshot(model) == before and leftovers(tmp_path) == []


def test_commit_rechecks_an_out_that_appeared_meanwhile(model, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(fastllm.ExportError, match="pass --overwrite"):
        with staging(out, "export") as tmp:
            (tmp / "fastllm.json").write_text('{"format_version": 1}')
            shutil.copytree(model, out)  # another command wrote OUT while this one worked
    assert snapshot(out) == snapshot(model) and leftovers(tmp_path) == []
    with pytest.raises(fastllm.ExportError, match="not part of a fastllm model: notes.txt"):
        with staging(out, "export") as tmp:
            (out / "notes.txt").write_text("mine")
    assert (out / "notes.txt").read_text() == "mine" and leftovers(tmp_path) == []


def test_bench_never_clears_a_directory_it_did_not_make(tmp_path):
    from fastllm.bench import shapes
    from fastllm.bench.errors import BenchError

    mine = tmp_path / "models" / "tiny"
    mine.mkdir(parents=True)
    (mine / "notes.txt").write_text("mine")
    with pytest.raises(BenchError, match="was not made by fastllm bench"):
        shapes.build(shapes.get("tiny"), tmp_path, progress=lambda line: None)
    assert snapshot(tmp_path) == {"models": "dir", "models/tiny": "dir",
                                  "models/tiny/notes.txt": hashlib.sha256(b"mine").hexdigest()}
