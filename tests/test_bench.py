"""The benchmark harness itself, end to end on the tiny shape: real worker processes, eager PyTorch and fastllm,
one run of a few tokens, then the JSON, markdown and plot it writes."""

from __future__ import annotations

import json

import pytest

from fastllm.bench import shapes
from fastllm.bench.runner import BenchOptions
from fastllm.bench.workload import Case, Workload
from fastllm.cli import main
from fastllm.errors import FastLLMError, InvalidParameterError

NEW_TOKENS = 4


@pytest.fixture(scope="module")
def bench_run(tmp_path_factory):
    """One `fastllm bench` run through the CLI: tiny shape, fp32 and int4, prompt lengths 8 and 300 (300 does not
    fit), batch 2."""
    root = tmp_path_factory.mktemp("bench")
    out = root / "out"
    code = main(["bench", "--shape", "tiny", "--engines", "torch-fp32,fastllm,genai", "--prompt-lengths", "8,300",
                 "--new-tokens", str(NEW_TOKENS), "--batch-sizes", "2", "--threads", "1", "--runs", "1",
                 "--precisions", "fp32,int4", "--sampling", "greedy",
                 "--work-dir", str(root / "work"), "--out", str(out)])
    assert code == 0
    return root, out, json.loads((out / "results.json").read_text())


@pytest.fixture(scope="module")
def sampled_run(bench_run):
    """A second run on the models the first one built: eager fp32 and fastllm fused fp32, greedy and sampled."""
    root, _, _ = bench_run
    out = root / "out-sampled"
    code = main(["bench", "--shape", "tiny", "--engines", "torch-fp32,fastllm", "--graphs", "fused",
                 "--prompt-lengths", "8", "--new-tokens", str(NEW_TOKENS), "--batch-sizes", "2", "--threads", "1",
                 "--runs", "1", "--warmup", "0", "--sampling", "greedy,sampled", "--work-dir", str(root / "work"),
                 "--out", str(out)])
    assert code == 0
    return root, out, json.loads((out / "results.json").read_text())


def test_results_json_structure(bench_run):
    _, _, results = bench_run
    assert results["format"] == "fastllm-bench/1"
    assert results["machine"]["cpu"] and results["machine"]["logical_cores"] >= 1
    assert results["machine"]["memory_bytes"] > 0
    assert {"fastllm", "torch", "onnxruntime", "transformers"} <= set(results["versions"])
    assert results["workload"]["new_tokens"] == NEW_TOKENS and results["workload"]["runs"] == 1
    (shape,) = results["shapes"]
    assert shape["name"] == "tiny" and shape["parameters"] > 0
    assert shape["prompt_lengths_dropped"] == [300]
    assert any("300" in note for note in results["notes"])
    labels = [e["label"] for e in shape["engines"]]
    assert labels[:5] == ["torch eager fp32", "fastllm fused fp32", "fastllm fused int4", "fastllm portable fp32",
                          "fastllm portable int4"]
    ran = [e["label"] for e in shape["engines"] if e["skipped"] is None]  # the genai peer runs only when installed
    assert [r["label"] for r in shape["results"]] == ran and ran[:5] == labels[:5]


def test_numbers_are_positive_and_raw_runs_kept(bench_run):
    _, _, results = bench_run
    for row in results["shapes"][0]["results"]:
        assert "error" not in row, row.get("error")
        assert row["prompt_length"] == 8 and row["batch"] == 2
        for key in ("load_s", "cold_start_s", "peak_rss_bytes", "rss_after_load_bytes"):
            assert row[key] > 0, key
        assert row["cold_start_s"] > row["load_s"]
        assert len(row["runs"]) == 1 and len(row["warmup_runs"]) == 1
        (run,) = row["runs"]
        assert len(run["steps_s"]) == NEW_TOKENS - 1 and all(s > 0 for s in run["steps_s"])
        for metric in ("ttft_s", "tpot_p50_s", "tpot_p90_s", "decode_tok_s", "total_s"):
            stat = row["summary"][metric]
            assert 0 < stat["min"] <= stat["median"] <= stat["max"], metric
        assert run["tpot_p50_s"] <= run["tpot_p90_s"]
        assert len(row["tokens"]) == NEW_TOKENS
    sizes = {e["label"]: e["model_size_bytes"] for e in results["shapes"][0]["engines"][:5]}
    assert all(size > 0 for size in sizes.values())
    assert sizes["fastllm fused int4"] < sizes["fastllm fused fp32"]


def test_each_engine_ran_in_its_own_process_with_the_same_weights(bench_run):
    _, _, results = bench_run
    torch_row, *fastllm_rows = [r for r in results["shapes"][0]["results"] if r["engine"] in ("torch-fp32", "fastllm")]
    assert torch_row["details"]["torch_threads"] == 1 and torch_row["details"]["attn_implementation"]
    assert torch_row["torch_imported"] and len(fastllm_rows) == 4
    for fastllm_row in fastllm_rows:
        assert not fastllm_row["torch_imported"]
        assert fastllm_row["peak_rss_bytes"] < torch_row["peak_rss_bytes"]  # no memory inherited from the parent
        details = fastllm_row["details"]
        assert fastllm_row["label"] == f"fastllm {details['graph']} {details['precision']}"
        if details["precision"] == "fp32":
            assert fastllm_row["tokens"] == torch_row["tokens"]  # same weights, same prompt ids, greedy fp32


def test_markdown_has_ratios_against_eager_fp32(bench_run):
    _, out, _ = bench_run
    md = (out / "results.md").read_text()
    assert "| TTFT ratio |" in md and "| TPOT ratio |" in md
    assert "threads" in md and "fp32" in md and "## tiny" in md
    rows = [line for line in md.splitlines() if line.startswith("| torch eager fp32 |")]
    assert len(rows) == 1 and "| 1.00 |" in rows[0]
    assert "onnxruntime-genai fp32" in md  # a row when installed, else a note saying it was skipped


def test_plot_is_written_when_matplotlib_is_installed(bench_run):
    pytest.importorskip("matplotlib")
    _, out, _ = bench_run
    assert (out / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_built_models_are_reused_until_the_exporter_changes(bench_run):
    root, _, _ = bench_run
    lines: list[str] = []
    built = shapes.build(shapes.get("tiny"), root / "work", precisions=("fp32", "int4"), progress=lines.append)
    assert lines == [] and [d.name for d in built.fastllm_dirs] == ["fastllm-fused", "fastllm-fused-int4"]
    (built.fastllm_dirs[1] / shapes.STAMP).write_text("an older exporter")
    shapes.build(shapes.get("tiny"), root / "work", precisions=("fp32", "int4"), progress=lines.append)
    assert any("quantizing fastllm-fused to int4" in line for line in lines)
    assert not any("exporting" in line for line in lines)  # the fp32 export was still current


def test_prompt_ids_are_seeded_and_in_vocabulary():
    w = Workload(prompt_lengths=(16,), batch_sizes=(3,), seed=7)
    a, b = w.prompt_ids(Case(16, 3), 512), w.prompt_ids(Case(16, 3), 512)
    assert a.shape == (3, 16) and (a == b).all() and a.min() >= 0 and a.max() < 512
    assert not (a == Workload(seed=8).prompt_ids(Case(16, 3), 512)).all()


def test_sampled_workload_beside_greedy(sampled_run):
    import fastllm

    _, out, results = sampled_run
    assert results["workload"]["sampling"]["sampled"] == {"name": "sampled", "temperature": 0.8, "top_p": 0.95,
                                                          "repetition_penalty": 1.1}
    rows = results["shapes"][0]["results"]
    assert [(r["label"], r["sampling"]) for r in rows] == [
        ("torch eager fp32", "greedy"), ("fastllm fused fp32", "greedy"),
        ("torch eager fp32", "sampled"), ("fastllm fused fp32", "sampled")]
    for row in rows:
        assert "error" not in row, row.get("error")
        assert len(row["tokens"]) == NEW_TOKENS and len(row["runs"][0]["steps_s"]) == NEW_TOKENS - 1  # EOS ignored
    # the sampled row really sampled with the workload's settings and seed: the same ids as the engine gives here
    path = next(e["model_path"] for e in results["shapes"][0]["engines"] if e["label"] == "fastllm fused fp32")
    engine = fastllm.load(path, threads=1)
    ids = Workload(seed=results["workload"]["seed"]).prompt_ids(Case(8, 2), engine.manifest.vocab_size)
    params = fastllm.SamplingParams(max_new_tokens=NEW_TOKENS, ignore_eos=True, temperature=0.8, top_p=0.95,
                                    repetition_penalty=1.1, seed=results["workload"]["seed"])
    assert list(engine.generate(ids, params)[0].token_ids) == rows[3]["tokens"]
    md = (out / "results.md").read_text()
    assert "sampling: greedy (argmax); sampled (temperature 0.8, top_p 0.95, repetition penalty 1.1)" in md
    assert "| engine | prompt | batch | sampling |" in md
    torch_sampled = [line for line in md.splitlines() if line.startswith("| torch eager fp32 | 8 | 2 | sampled |")]
    assert len(torch_sampled) == 1 and "| 1.00 |" in torch_sampled[0] and torch_sampled[0].endswith("| – |")
    cost = md[md.index("sampled ÷ greedy TPOT"):].splitlines()
    assert cost[2].startswith("| engine | prompt | batch | greedy TPOT p50 ms | sampled TPOT p50 ms | sampled/greedy")
    ratios = {line.split(" | ")[0][2:]: float(line.split(" | ")[-1].rstrip(" |")) for line in cost[4:6]}
    g, s = (r["summary"]["tpot_p50_s"]["median"] for r in (rows[1], rows[3]))
    assert set(ratios) == {"torch eager fp32", "fastllm fused fp32"} and ratios["fastllm fused fp32"] == round(s / g, 2)


@pytest.mark.parametrize("field, value", [("new_tokens", 1), ("runs", 0), ("threads", 0), ("prompt_lengths", ()),
                                          ("batch_sizes", (0,)), ("sampling", ("beam",)), ("sampling", ())])
def test_workload_rejects_bad_values_naming_the_field(field, value):
    with pytest.raises(InvalidParameterError, match=field):
        Workload(**{field: value})


def test_options_reject_unknown_shape_and_engine():
    with pytest.raises(FastLLMError, match="known|one of"):
        BenchOptions(shapes=("gpt5",))
    with pytest.raises(FastLLMError, match="engines"):
        BenchOptions(shapes=("tiny",), engines=("tensorrt",))
    with pytest.raises(FastLLMError, match="precisions must be .* 'int8-dynamic'"):
        BenchOptions(shapes=("tiny",), precisions=("int3",))


def test_cli_error_is_one_line(capsys):
    assert main(["bench", "--shape", "nope"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("fastllm: error: unknown shape 'nope'") and "\n" not in err


def test_an_earlier_runs_results_are_never_replaced(bench_run, capsys):
    _, out, _ = bench_run
    before = (out / "results.json").read_bytes()
    assert main(["bench", "--shape", "tiny", "--engines", "fastllm", "--out", str(out)]) == 1
    assert "already holds results.json" in capsys.readouterr().err
    assert (out / "results.json").read_bytes() == before


@pytest.mark.parametrize("name", sorted(shapes.SHAPES))
def test_every_shape_has_a_transformers_config_of_its_architecture(name):
    """A shape is built at bench time only: its config must at least make a transformers config of its class."""
    shape = shapes.get(name)
    config = shape.hf_config()
    assert config.architectures == [shape.architecture] and config.vocab_size == shape.vocab_size


def test_fastllm_runner_prefills_every_run(exported):
    """The benchmark sends the same prompt in every run: a prefix cache would skip its prefill and make TTFT the
    cost of one token. The runner's engine has none."""
    import numpy as np

    from fastllm.bench.engines import FastLLMRunner, fastllm_spec
    from fastllm.bench.workload import SAMPLINGS

    runner = FastLLMRunner(fastllm_spec(exported["LlamaForCausalLM"][1]), threads=1)
    ids = np.arange(3, 40, dtype=np.int64)[None]
    first = runner.generate(ids, 4, SAMPLINGS["greedy"], seed=0)
    second = runner.generate(ids, 4, SAMPLINGS["greedy"], seed=0)
    assert first.first_row == second.first_row
    stats = runner.engine.stats()
    assert stats["prefix_cache_hits"] == 0 and stats["prompt_tokens"] == 2 * ids.shape[1]
