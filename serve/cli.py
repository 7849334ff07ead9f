"""`fastllm serve [MODEL_DIR]`: the OpenAI-compatible server on uvicorn. Registering the subcommand imports nothing
of the extra; running it does."""

from __future__ import annotations

import argparse
import logging
import os
import re

from fastllm.errors import FastLLMError

UNITS = {"": 1, "k": 1000, "m": 1000**2, "g": 1000**3, "t": 1000**4,
         "ki": 1024, "mi": 1024**2, "gi": 1024**3, "ti": 1024**4}


def byte_size(text: str) -> int:
    """--kv-memory: bytes, as 2000000000, 2G, 2GB or 1.5GiB."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]i?)?b?\s*", text, re.IGNORECASE)
    if not match:
        raise argparse.ArgumentTypeError(f"expected a size in bytes like 2000000000, 2G or 1.5GiB, got {text!r}")
    return int(float(match[1]) * UNITS[(match[2] or "").lower()])


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "serve", help="serve a model over an OpenAI-compatible HTTP API (extra `serve`)",
        usage="fastllm serve [MODEL_DIR] [--host H] [--port P] [options]",
        description="Serve MODEL_DIR (default: the bundled model) at /v1/completions, /v1/chat/completions, "
                    "/v1/models, /health and /metrics. Requests decode together in the engine's slots; more wait "
                    "in a queue of --max-queue, past which requests get 503 with Retry-After.")
    p.add_argument("model", nargs="?", default=None, metavar="MODEL_DIR",
                   help="model directory written by `fastllm export` (default: the bundled model)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1, this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port to listen on (default: 8000)")
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N (default: cpu)")
    p.add_argument("--threads", type=int, default=None, help="onnxruntime intra-op threads (default: its choice)")
    p.add_argument("--slots", type=int, default=None,
                   help="requests decoding at once (default: from --kv-memory, else the engine's choice)")
    p.add_argument("--context", type=int, default=None,
                   help="positions per slot, prompt + output (default: the model's context)")
    p.add_argument("--kv-memory", type=byte_size, default=None, metavar="BYTES",
                   help="bytes for the KV buffer, e.g. 2G; sizes the slot count instead of --slots")
    p.add_argument("--speculative", action="store_true",
                   help="speculative decoding with prompt-lookup drafts while one request runs alone: the same "
                        "tokens, several per step where the text repeats itself (default: off)")
    p.add_argument("--max-queue", type=int, default=256, metavar="N",
                   help="requests that may wait for a slot; past that, 503 + Retry-After (default: 256)")
    p.add_argument("--api-key", default=os.environ.get("FASTLLM_API_KEY"), metavar="KEY",
                   help="require `Authorization: Bearer KEY` on /v1/* (default: $FASTLLM_API_KEY, else none)")
    p.add_argument("--chat-template", default=None, metavar="FILE",
                   help="Jinja chat template file (or a template name of the model) to use instead of the model's")
    p.add_argument("--served-model-name", default=None, metavar="NAME",
                   help="the model's name in the API (default: the directory's name)")
    p.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"),
                   help="server log level (default: info)")
    p.add_argument("--access-log", action="store_true", help="log every request (default: off)")
    ray = p.add_argument_group("scale-out on Ray Serve (extra `ray`; README: Scale-out on Ray Serve)")
    ray.add_argument("--replicas", type=positive, default=None, metavar="N",
                     help="serve N replicas of the app, each with its own engine, behind one endpoint")
    ray.add_argument("--autoscale", type=replica_range, default=None, metavar="MIN:MAX",
                     help="as --replicas, between MIN and MAX replicas as the ongoing requests per replica ask")
    ray.add_argument("--address", default=None, metavar="ADDR",
                     help="join the Ray cluster at ADDR (e.g. auto, or HEAD_IP:6379) instead of starting a local one")
    ray.add_argument("--num-cpus", type=positive, default=None, metavar="N",
                     help="CPUs Ray reserves for each replica; its engine's threads unless --threads says otherwise "
                          "(default: --threads, else 1)")
    ray.add_argument("--router", default="prefix", choices=("prefix", "round-robin"),
                     help="which replica takes a request: the one holding its prompt's prefix, else the least "
                          "loaded (prefix, the default), or each in turn (round-robin)")
    p.set_defaults(func=run)


def positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number of at least 1, got {text!r}")
    return int(text)


def replica_range(text: str) -> tuple[int, int]:
    """--autoscale: MIN:MAX replicas, 0 <= MIN <= MAX, MAX >= 1."""
    low, _, high = text.partition(":")
    if not (low.isdigit() and high.isdigit()) or int(high) < max(1, int(low)):
        raise argparse.ArgumentTypeError(f"expected MIN:MAX replicas with 0 <= MIN <= MAX and MAX >= 1, like 1:4, "
                                         f"got {text!r}")
    return int(low), int(high)


def run(args) -> int:
    try:
        import uvicorn

        from fastllm.serve.app import Server, create_app
    except ImportError as e:
        raise FastLLMError(f"`fastllm serve` needs the serve extra ({e}); install it with "
                           "pip install 'fastllm[serve]'") from None
    from fastllm.cli import default_model
    from fastllm.manifest import Manifest

    model = args.model or default_model()
    Manifest.read(model)  # a wrong directory fails here, before the server starts
    options = {"device": args.device, "threads": args.threads, "slots": args.slots, "context": args.context,
               "kv_memory": args.kv_memory, "max_queue": args.max_queue, "speculative": args.speculative or None}
    server = Server(model, served_model_name=args.served_model_name, api_key=args.api_key,
                    chat_template=args.chat_template,
                    load_options={k: v for k, v in options.items() if v is not None or k == "max_queue"})
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s:     %(message)s")
    if args.replicas or args.autoscale or args.address:
        return run_ray(args, model, server.load_options)
    config = uvicorn.Config(create_app(server), host=args.host, port=args.port, log_level=args.log_level,
                            access_log=args.access_log, timeout_graceful_shutdown=5)
    http = uvicorn.Server(config)
    server.on_load_error = lambda _e: setattr(http, "should_exit", True)
    http.run()
    if server.load_error is not None:
        error = server.load_error
        raise error if isinstance(error, FastLLMError) else FastLLMError(f"loading {model} failed: {error}")
    return 0


def run_ray(args, model, load_options: dict) -> int:
    """--replicas / --autoscale / --address: the same app on Ray Serve replicas (fastllm.serve.ray_app)."""
    if args.replicas and args.autoscale:
        raise FastLLMError("--replicas and --autoscale exclude each other: a fixed count, or MIN:MAX")
    try:
        from fastllm.serve import ray_app
    except ImportError as e:
        raise FastLLMError(f"--replicas, --autoscale and --address need the ray extra ({e}); install it with "
                           "pip install 'fastllm[ray]'") from None
    from pathlib import Path

    num_cpus = args.num_cpus or args.threads or 1
    load_options = {**load_options, "threads": args.threads or num_cpus}
    template = args.chat_template  # a file is read on each replica: by its absolute path
    if template is not None and Path(template).is_file():
        template = str(Path(template).resolve())
    server_options = {"served_model_name": args.served_model_name, "api_key": args.api_key,
                      "chat_template": template}
    return ray_app.run(str(Path(model).resolve()), address=args.address, host=args.host, port=args.port,
                       num_cpus=num_cpus, replicas=args.replicas, autoscale=args.autoscale,
                       server_options=server_options, load_options=load_options, router=args.router,
                       log_level=args.log_level)
