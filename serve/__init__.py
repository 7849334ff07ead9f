"""`fastllm serve`: an OpenAI-compatible HTTP server over Engine.submit (the extra `serve`: Starlette, uvicorn,
prometheus-client). Installed as fastllm.serve; `import fastllm` never imports it.

    cli.py       the `serve` subcommand (registered through the `fastllm.commands` entry point)
    app.py       the ASGI app: endpoints, engine requests, SSE streaming, disconnect -> cancel
    protocol.py  OpenAI request fields -> SamplingParams; response, chunk and error objects
    metrics.py   /metrics in Prometheus text
"""
