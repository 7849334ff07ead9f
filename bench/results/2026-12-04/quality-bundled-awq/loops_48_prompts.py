"""Loops and greedy agreement over 48 held-out prompts (the report uses 8): python loops_48_prompts.py QUALITY_TABLE_OUT
(the --out of python -m fastllm.export.quality_table fastllm/data/pydoc-llama)."""
import sys
import fastllm
from fastllm.export.quality import loops, probe_prompts, greedy_agreement
from fastllm.export.corpus import held_out_text
ref = fastllm.load("fastllm/data/pydoc-llama")
ids = ref.encode(held_out_text()[:400000])
prompts = probe_prompts(ref.manifest.vocab_size, ids, count=48, length=24, seed=1)
for name in ["int4", "int4-rtn", "int4-b64", "int8", "int8-rtn", "q4_k", "q4_0"]:
    c = fastllm.load(f"{sys.argv[1]}/pydoc-llama/{name}")
    l = loops(ref, c, prompts); g = greedy_agreement(ref, c, prompts)
    print(name, "loops fp32", l["fp32"], "quant", l["quantized"], "of", l["prompts"], "agree", g["mean_agreeing_prefix"], "identical", g["identical"], flush=True)
