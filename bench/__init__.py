"""bench: the comparison harness. Eager PyTorch and fastllm (and optional peers) on the same weights, the same
prompt ids and the same number of new tokens, each engine in its own process; results as JSON, markdown and a plot.

    fastllm bench --shape smollm2-135m --shape gpt2 --prompt-lengths 32,128 --new-tokens 64 --runs 3

Modules: shapes (models of real shapes, randomly initialised), workload (what is timed), engines (one adapter per
engine), workers (the per-engine subprocess), metrics, machine, runner (the whole run), report and plot (outputs),
cli (`fastllm bench`). The runtime package `fastllm` never imports this one.
"""
