"""The serving benchmark end to end on the tiny shape: `fastllm bench --serving` through the CLI, real worker
processes and a real engine, then the JSON, markdown and plot it writes (no timing assertions)."""

from __future__ import annotations

import json

import pytest

from fastllm.bench.serving import ServingWorkload, decode_rate, summarise
from fastllm.cli import main
from fastllm.errors import InvalidParameterError

NEW_TOKENS = 4
PREFIX = 128  # tiny's context is 256: prefix + 64 + new tokens fit
CHUNK = 64  # the engine reuses whole prefill chunks of a cached prefix


@pytest.fixture(scope="module")
def serving_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("serving")
    out = root / "out"
    code = main(["bench", "--serving", "--shape", "tiny", "--precisions", "fp32,int4", "--concurrency", "1,2",
                 "--prompt-lengths", "8", "--new-tokens", str(NEW_TOKENS), "--requests", "2", "--poisson-requests",
                 "3", "--rate", "50", "--prefix-length", str(PREFIX), "--prefill-chunk", str(CHUNK), "--threads", "1", "--work-dir",
                 str(root / "work"), "--out", str(out)])
    assert code == 0
    return out, json.loads((out / "results.json").read_text())


def test_results_name_machine_workload_and_models(serving_run):
    _, results = serving_run
    assert results["format"] == "fastllm-bench-serving/1"
    m = results["machine"]
    assert m["cpu"] and m["usable_cores"] >= 1 and len(m["load_average_start"]) == 3 and len(m["load_average_end"]) == 3
    w = results["workload"]
    assert w["concurrency"] == [1, 2] and w["prompt_length"] == 8 and w["new_tokens"] == NEW_TOKENS
    assert w["threads"] == 1 and w["engine_slots"] == 2 and w["workloads"] == ["together", "poisson"]
    (shape,) = results["shapes"]
    assert shape["name"] == "tiny"
    assert [(r["label"], r["precision"]) for r in shape["results"]] == [("fastllm fused fp32", "fp32"),
                                                                         ("fastllm fused int4", "int4")]


def test_every_level_has_its_requests_and_metrics(serving_run):
    _, results = serving_run
    for row in results["shapes"][0]["results"]:
        assert "error" not in row, row.get("error")
        assert row["api"] in ("submit", "steps") and row["peak_rss_bytes"] > 0 and row["model_size_bytes"] > 0
        if row["api"] == "submit":
            assert row["load_options"]["slots"] == 2 and row["load_options"]["prefill_chunk"] == CHUNK
        for kind, counts in (("together", {1: 2, 2: 4}), ("poisson", {1: 3, 2: 3})):
            assert [e["concurrency"] for e in row[kind]] == [1, 2]
            for entry in row[kind]:
                assert entry["requests"] == counts[entry["concurrency"]] == len(entry["raw"])
                assert entry["generated_tokens"] == NEW_TOKENS * entry["requests"]
                for r in entry["raw"]:  # EOS ignored: every request ran to its length
                    assert r["tokens"] == NEW_TOKENS and r["finish_reason"] == "length"
                    assert 0 < r["ttft_s"] and r["first_s"] <= r["last_s"] and r["tpot_s"] > 0
                assert entry["output_tok_s"] > 0 and entry["load_average"] >= 0
                for metric in ("ttft", "tpot"):
                    assert 0 < entry[f"{metric}_p50_s"] <= entry[f"{metric}_p95_s"]
                assert entry["ttft_p95_vs_1"] > 0
        for entry in row["together"]:
            assert entry["waves"] * entry["concurrency"] == entry["requests"] and len(entry["wave_wall_s"]) == 2
        assert row["together"][0]["decode_vs_1"] == 1.0
        assert 0 <= row["poisson"][0]["queue_p50_s"] <= row["poisson"][0]["queue_p95_s"]


def test_prefix_cache_measurement(serving_run):
    _, results = serving_run
    for row in results["shapes"][0]["results"]:
        p = row["prefix"]
        assert p["prefix_length"] == PREFIX and p["prompt_length"] == PREFIX + 64 and len(p["pairs"]) == 3
        assert p["ratio"] == pytest.approx(p["cached_ttft_s"] / p["uncached_ttft_s"])
        assert row["targets"]["prefix_ttft_ratio"] == p["ratio"]
        if row["api"] == "submit":  # the second prompt of each pair found the first one's prefix in the cache
            assert all(pair["uncached_cached_tokens"] == 0 for pair in p["pairs"])
            assert all(pair["cached_tokens"] == PREFIX for pair in p["pairs"])  # 2 whole chunks
            assert p["stats"]["prefix_cache_hits"] == 4  # the warm-up pair's too
        # no concurrency 8 in this run: the 8-stream targets are not judged
        assert row["targets"]["decode_vs_1"] is None and row["targets"]["decode_vs_1_met"] is None
    fp32, int4 = results["shapes"][0]["results"]
    assert fp32["targets"]["decode_vs_1_target"] == 4.0 and int4["targets"]["decode_vs_1_target"] == 3.0


def test_markdown_and_plot(serving_run):
    out, results = serving_run
    md = (out / "results.md").read_text()
    assert md.startswith("# fastllm bench: serving")
    assert results["machine"]["cpu"] in md and "load average" in md and "1 threads" in md
    for heading in ("together", "poisson (50 requests/s", "prefix cache", "issue 12 targets"):
        assert f"### tiny: {heading}" in md
    rows = [line for line in md.splitlines() if line.startswith("| fastllm fused int4 | 2 |")]
    assert len(rows) == 2  # together and poisson at concurrency 2
    assert "| cached-prefix TTFT ÷ uncached | target |" in md and "≤ 0.15" in md
    pytest.importorskip("matplotlib")
    assert (out / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_decode_rate_counts_steps_while_every_request_decodes():
    # request a: first token at 1.0, then steps at 2, 3, 4, 5; b: first at 2.5, then 3.5, 4.5, 5.5 (times in s)
    a = {"first_s": 1.0, "last_s": 5.0, "stamps_s": [1.0, 2.0, 3.0, 4.0, 5.0]}
    b = {"first_s": 2.5, "last_s": 5.5, "stamps_s": [2.5, 3.5, 4.5, 5.5]}
    # window (2.5, 5.0]: a's 3, 4, 5 and b's 3.5, 4.5 -> 5 steps in 2.5 s
    assert decode_rate([a, b]) == pytest.approx(2.0)
    assert decode_rate([a]) == pytest.approx(1.0)  # one request: its decode tokens/s
    assert decode_rate([{"first_s": 1.0, "last_s": 1.0, "stamps_s": [1.0]}]) is None


def test_summarise_percentiles_over_requests():
    requests = [{"tokens": 4, "ttft_s": t, "tpot_s": t / 10} for t in (0.1, 0.2, 0.3, 0.4, 0.5)]
    s = summarise(requests, 2.0)
    assert s["generated_tokens"] == 20 and s["output_tok_s"] == 10.0
    assert s["ttft_p50_s"] == pytest.approx(0.3) and s["ttft_p95_s"] == pytest.approx(0.48)
    assert s["tpot_p50_s"] == pytest.approx(0.03)


@pytest.mark.parametrize("field, value", [("concurrency", ()), ("concurrency", (0, 2)), ("new_tokens", 1),
                                          ("rate", 0), ("workloads", ("burst",)), ("slots", 0), ("prefill_chunk", 0),
                                          ("prefix_length", -1)])
def test_workload_rejects_bad_values_naming_the_field(field, value):
    with pytest.raises(InvalidParameterError, match=field):
        ServingWorkload(**{field: value})


@pytest.mark.parametrize("args, message", [
    (["--engines", "torch-fp32"], "--serving measures fastllm models only"),
    (["--prompt-lengths", "32,128"], "--serving takes one prompt length"),
    (["--concurrency", "1,x"], "--concurrency takes comma-separated integers"),
])
def test_cli_errors_are_one_line(args, message, capsys, tmp_path):
    assert main(["bench", "--serving", "--shape", "tiny", "--work-dir", str(tmp_path), *args]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("fastllm: error:") and message in err and "\n" not in err
