"""The HTTP app: OpenAI requests in, Engine.submit out, tokens back as JSON or SSE chunks. It owns no generation
logic: sampling, stop strings (held back until they cannot match), logprobs and slots are the engine's.

    server = Server("model_dir", served_model_name="m", api_key=None, chat_template=None, load_options={...})
    app = create_app(server)           # an ASGI app (Starlette); `fastllm serve` runs it under uvicorn

The model loads in a thread after the server starts: /health answers 503 until it is ready, then 200.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

import fastllm
from fastllm.chat import NO_TEMPLATE_HINT, ChatTemplate
from fastllm.errors import (
    ChatTemplateError,
    ContextLengthError,
    FastLLMError,
    InvalidParameterError,
    InvalidPromptError,
    QueueFullError,
)
from fastllm.serve import protocol as P
from fastllm.serve.metrics import CONTENT_TYPE, Metrics

log = logging.getLogger("fastllm.serve")
RETRY_AFTER_S = 1  # what a 503 (queue full, model loading) asks the client to wait
DEFAULT_COMPLETION_TOKENS = 16  # /v1/completions without max_tokens, as OpenAI's default
TEMPLATE_RESERVED = ("messages", "add_generation_prompt", "tools", "documents")  # not chat_template_kwargs


class Server:
    """One model behind the OpenAI API: its engine (loaded by load()), chat template, name and API key."""

    def __init__(self, model_dir, *, served_model_name: str | None = None, api_key: str | None = None,
                 chat_template: str | None = None, load_options: dict | None = None, engine=None):
        self.model_dir = Path(model_dir)
        self.name = served_model_name or self.model_dir.name
        self.api_key = api_key
        self.template = ChatTemplate.from_directory(self.model_dir, chat_template)  # a bad template fails here
        self.load_options = dict(load_options or {})
        self.engine = None
        self.base_params = None  # the model's defaults (its generation config), under every request's fields
        self.created = int(time.time())
        self.metrics = Metrics(lambda: self.engine.stats() if self.engine is not None else None)
        self.load_error: Exception | None = None
        self.on_load_error: Callable[[Exception], None] | None = None
        if engine is not None:
            self._ready(engine)

    # -- loading ------------------------------------------------------------------------------------------------
    def load(self) -> None:
        """Load the engine and run one token through it, so the KV buffer exists before /health says 200."""
        try:
            engine = fastllm.load(self.model_dir, **self.load_options)
            engine.generate([engine.manifest.bos_token_id or 0], {"max_new_tokens": 1})  # allocates the KV buffer
            self._ready(engine)
            log.info("fastllm serve: %s ready as %r (%s slots)", self.model_dir, self.name,
                     engine.stats().get("slots"))
        except Exception as e:  # noqa: BLE001 -- reported by the CLI, which stops the server
            log.error("fastllm serve: loading %s failed: %s", self.model_dir, e)
            self.load_error = e
            if self.on_load_error is not None:
                self.on_load_error(e)

    def _ready(self, engine) -> None:
        try:
            self.base_params = engine.default_params()
        except FastLLMError:  # an unusable generation config: SamplingParams' own defaults
            self.base_params = fastllm.SamplingParams()
        self.engine = engine

    @contextlib.asynccontextmanager
    async def lifespan(self, app):
        if self.engine is None:
            threading.Thread(target=self.load, name="fastllm-serve-load", daemon=True).start()
        try:
            yield
        finally:
            if self.engine is not None:
                self.engine.close()

    def ready_engine(self):
        if self.engine is None:
            raise P.RequestError("the model is still loading; retry shortly", status=503, type="server_error",
                                 code="model_loading", headers={"Retry-After": str(RETRY_AFTER_S)})
        return self.engine

    # -- endpoints ----------------------------------------------------------------------------------------------
    async def health(self, request: Request) -> Response:
        if self.engine is None:
            return JSONResponse({"status": "loading"}, status_code=503, headers={"Retry-After": str(RETRY_AFTER_S)})
        return JSONResponse({"status": "ok"})

    async def metrics_text(self, request: Request) -> Response:
        return Response(self.metrics.text(), media_type=CONTENT_TYPE)

    async def models(self, request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [self.model_card()]})

    async def model(self, request: Request) -> Response:
        if request.path_params["name"] != self.name:
            raise self.unknown_model(request.path_params["name"])
        return JSONResponse(self.model_card())

    def model_card(self) -> dict:
        card = {"id": self.name, "object": "model", "created": self.created, "owned_by": "fastllm",
                "root": str(self.model_dir)}
        if self.engine is not None:
            card["max_model_len"] = self.engine.context
        return card

    def unknown_model(self, name) -> P.RequestError:
        return P.RequestError(f"the model {name!r} is not served here; this server serves {self.name!r} "
                              "(GET /v1/models)", status=404, param="model", code="model_not_found")

    async def completions(self, request: Request) -> Response:
        return await self.generate(request, P.completion_request(P.parse_body(await read_body(request))))

    async def chat(self, request: Request) -> Response:
        return await self.generate(request, P.chat_request(P.parse_body(await read_body(request))))

    # -- generation -------------------------------------------------------------------------------------------
    async def generate(self, request: Request, g: P.GenerationRequest) -> Response:
        if g.model is not None and g.model != self.name:
            raise self.unknown_model(g.model)
        engine = self.ready_engine()
        prompts = self.prompt_ids(engine, g)
        params = [self.params(engine, g, len(ids), j) for ids in prompts for j in range(g.n)]
        requests = self.submit(engine, g, [ids for ids in prompts for _ in range(g.n)], params)
        rid, created = P.new_id(g.kind), P.now()
        if g.stream:
            return StreamingResponse(self.stream(request, g, prompts, requests, rid, created),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        return await self.complete(request, g, prompts, requests, rid, created)

    def prompt_ids(self, engine, g: P.GenerationRequest) -> list[list[int]]:
        if g.kind == "completion":
            out = []
            for prompt in g.prompts:
                try:
                    (ids,), _ = engine.prompt_ids(prompt)
                except InvalidPromptError as e:
                    raise P.bad(str(e), "prompt") from None
                out.append(ids)
            return out
        if self.template is None:
            raise P.bad(f"the model {self.name!r} has no chat template; {NO_TEMPLATE_HINT}", "messages")
        reserved = [k for k in g.template_kwargs if k in TEMPLATE_RESERVED]
        if reserved:
            raise P.bad(f"chat_template_kwargs may not set {', '.join(reserved)}; they are request fields",
                        "chat_template_kwargs")
        try:  # rendered, then encoded without the tokenizer's own special tokens (the template wrote them)
            ids = engine.chat_prompt(list(g.messages), template=self.template,
                                     add_generation_prompt=g.add_generation_prompt, **g.template_kwargs)
        except (ChatTemplateError, InvalidPromptError) as e:
            raise P.bad(str(e), "messages") from None
        if not ids:
            raise P.bad("the chat template rendered these messages to no tokens", "messages")
        return [ids]

    def params(self, engine, g: P.GenerationRequest, prompt_tokens: int, choice: int) -> fastllm.SamplingParams:
        """The SamplingParams of one choice: the request's fields over the model's defaults; choice j of n samples
        with seed + j. Without max_tokens: 16 for completions (OpenAI's default), else what the context leaves."""
        sampling = dict(g.sampling)
        if g.seed is not None:
            sampling["seed"] = g.seed + choice
        room = max(1, engine.context - prompt_tokens)  # no room at all: submit() says so with the numbers
        default = min(room, DEFAULT_COMPLETION_TOKENS) if g.kind == "completion" else room
        sampling["max_new_tokens"] = g.max_tokens if g.max_tokens is not None else default
        sampling["logprobs"] = g.logprobs
        try:
            return self.base_params.replace(**sampling)
        except InvalidParameterError as e:
            raise P.bad(request_terms(str(e), g), P.param_of(str(e), g)) from None

    def submit(self, engine, g: P.GenerationRequest, prompts: list[list[int]], params: list) -> list:
        """Submit every choice, or none: a refusal cancels those already submitted."""
        requests = []
        try:
            for ids, p in zip(prompts, params):
                requests.append(engine.submit(ids, p))
        except FastLLMError as e:
            for r in requests:
                r.cancel()
            raise engine_error(e, g) from None
        return requests

    async def complete(self, request: Request, g: P.GenerationRequest, prompts, requests, rid, created) -> Response:
        watcher = asyncio.create_task(cancel_on_disconnect(request, requests))
        try:
            completions = [await r.wait() for r in requests]
        finally:
            watcher.cancel()
            for r in requests:
                r.cancel()
        if any(c.finish_reason == "cancelled" for c in completions):  # not the client's doing: the engine stopped
            raise P.RequestError("the server is shutting down; retry on another replica", status=503,
                                 type="server_error", code="shutting_down")
        choices = []
        for i, c in enumerate(completions):
            self.metrics.observe(c)
            logprobs = None if g.logprobs is None else self.logprobs(g, list(c.logprobs or ()))
            choose = P.chat_choice if g.kind == "chat" else P.completion_choice
            choices.append(choose(i, c.text, c.finish_reason, logprobs))
        usage = P.usage(sum(map(len, prompts)), sum(c.completion_tokens for c in completions),
                        sum(completions[k * g.n].cached_tokens for k in range(len(prompts))))
        return json_response(P.response(g.kind, rid, created, self.name, choices, usage))

    async def stream(self, request: Request, g: P.GenerationRequest, prompts, requests, rid, created):
        """SSE chunks: per choice (chat) a first delta with the role, then one chunk per step that has text,
        logprobs or the finish reason; with include_usage a last chunk with the usage and no choices; [DONE]."""
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(index: int, r) -> None:
            try:
                async for step in r:
                    queue.put_nowait((index, step))
            except Exception as e:  # noqa: BLE001 -- the engine failed this request: the stream ends (logged)
                queue.put_nowait((index, e))
            finally:
                queue.put_nowait((index, None))

        tasks = [asyncio.create_task(pump(i, r)) for i, r in enumerate(requests)]
        watcher = asyncio.create_task(cancel_on_disconnect(request, requests))
        offsets = [0] * len(requests)  # completions logprobs: text_offset so far, per choice

        def chunk(choices: list, usage: dict | None = None) -> bytes:
            return P.sse(P.chunk(g.kind, rid, created, self.name, choices, g.include_usage, usage))

        try:
            if g.kind == "chat":
                for i in range(len(requests)):
                    yield chunk([P.chat_chunk_choice(i, {"role": "assistant", "content": ""}, None, None)])
            live = len(requests)
            while live:
                i, step = await queue.get()
                if step is None:
                    live -= 1
                    continue
                if isinstance(step, Exception):
                    log.error("fastllm serve: request %s failed: %s", requests[i].id, step)
                    return
                if step.finish_reason == "cancelled" or not (step.text or step.logprob or step.finish_reason):
                    continue
                logprobs = None
                if step.logprob is not None:
                    logprobs = self.logprobs(g, [step.logprob], offsets[i])
                    if g.kind == "completion":
                        offsets[i] += sum(map(len, logprobs["tokens"]))
                if g.kind == "chat":
                    delta = {"content": step.text} if step.text or not step.finish_reason else {}
                    yield chunk([P.chat_chunk_choice(i, delta, step.finish_reason, logprobs)])
                else:
                    yield chunk([P.completion_choice(i, step.text, step.finish_reason, logprobs)])
            completions = [await r.wait() for r in requests]
            for c in completions:
                self.metrics.observe(c)
            if g.include_usage:
                yield chunk([], P.usage(sum(map(len, prompts)), sum(c.completion_tokens for c in completions),
                                        sum(completions[k * g.n].cached_tokens for k in range(len(prompts)))))
            yield P.DONE
        finally:
            watcher.cancel()
            for task in tasks:
                task.cancel()
            for r in requests:
                r.cancel()

    def logprobs(self, g: P.GenerationRequest, items: list, offset: int = 0) -> dict:
        text = self.token_text
        return P.chat_logprobs(items, text) if g.kind == "chat" else P.completion_logprobs(items, text, offset)

    def token_text(self, token_id: int) -> str:
        tokenizer = self.engine.tokenizer
        return tokenizer.decode([token_id]) if tokenizer is not None else str(token_id)


# -- helpers --------------------------------------------------------------------------------------------------------
async def read_body(request: Request) -> bytes:
    """The body, refused (413) as soon as it passes the limit rather than read whole first."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > P.MAX_BODY_BYTES:
        raise P.RequestError(f"the request body is {declared} bytes; the limit is {P.MAX_BODY_BYTES}", status=413)
    chunks, size = [], 0
    async for part in request.stream():
        size += len(part)
        if size > P.MAX_BODY_BYTES:
            raise P.RequestError(f"the request body is over the limit of {P.MAX_BODY_BYTES} bytes", status=413)
        chunks.append(part)
    return b"".join(chunks)


async def cancel_on_disconnect(request: Request, requests: list) -> None:
    """Cancel the engine requests when the client goes away (the ASGI receive channel says http.disconnect), even
    before a first token: their slots are freed at the engine's next step."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            for r in requests:
                r.cancel()
            return


def request_terms(message: str, g: P.GenerationRequest) -> str:
    """An engine message in the request's terms: max_new_tokens is the request's max_tokens."""
    return message.replace("max_new_tokens", "max_completion_tokens" if g.kind == "chat" else "max_tokens")


def engine_error(e: FastLLMError, g: P.GenerationRequest) -> P.RequestError:
    where = "messages" if g.kind == "chat" else "prompt"
    message = request_terms(str(e), g)
    if isinstance(e, QueueFullError):
        return P.RequestError(message, status=503, type="server_error", code="queue_full",
                              headers={"Retry-After": str(RETRY_AFTER_S)})
    if isinstance(e, ContextLengthError):
        return P.RequestError(message, param=where, code="context_length_exceeded")
    if isinstance(e, InvalidPromptError):
        return P.bad(message, where)
    if isinstance(e, InvalidParameterError):
        return P.bad(message, P.param_of(str(e), g))
    return P.RequestError(message, status=503, type="server_error")  # e.g. the engine is closed


def json_response(data: dict, status: int = 200, headers: dict | None = None) -> Response:
    return Response(json.dumps(data, ensure_ascii=False, separators=(",", ":")), status_code=status,
                    headers=headers, media_type="application/json")


def error_response(e: P.RequestError) -> Response:
    # ASCII: an error may quote what the client sent, lone surrogates included
    return Response(json.dumps(e.body()), status_code=e.status, headers=e.headers, media_type="application/json")


def create_app(server: Server) -> Starlette:
    def endpoint(name: str, handler, *, auth: bool):
        async def run(request: Request) -> Response:
            try:
                if auth:
                    authorize(server, request)
                response = await handler(request)
            except P.RequestError as e:
                response = error_response(e)
            server.metrics.requests.labels(name, str(response.status_code)).inc()
            return response

        return run

    routes = [
        Route("/health", endpoint("/health", server.health, auth=False), methods=["GET"]),
        Route("/metrics", endpoint("/metrics", server.metrics_text, auth=False), methods=["GET"]),
        Route("/v1/models", endpoint("/v1/models", server.models, auth=True), methods=["GET"]),
        Route("/v1/models/{name:path}", endpoint("/v1/models", server.model, auth=True), methods=["GET"]),
        Route("/v1/completions", endpoint("/v1/completions", server.completions, auth=True), methods=["POST"]),
        Route("/v1/chat/completions", endpoint("/v1/chat/completions", server.chat, auth=True), methods=["POST"]),
    ]

    async def http_error(request: Request, exc: HTTPException) -> Response:  # 404, 405: OpenAI's shape too
        kind = {404: "not_found_error", 405: "invalid_request_error"}.get(exc.status_code, "invalid_request_error")
        message = f"{request.method} {request.url.path}: {exc.detail}"
        return error_response(P.RequestError(message, status=exc.status_code, type=kind))

    async def internal_error(request: Request, exc: Exception) -> Response:
        log.exception("fastllm serve: internal error on %s", request.url.path, exc_info=exc)
        return error_response(P.RequestError(f"internal error: {type(exc).__name__}", status=500,
                                             type="server_error"))

    return Starlette(routes=routes, lifespan=server.lifespan,
                     exception_handlers={HTTPException: http_error, Exception: internal_error})


def authorize(server: Server, request: Request) -> None:
    if server.api_key is None:
        return
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), server.api_key.encode()):
        raise P.RequestError("missing or wrong API key: send the header `Authorization: Bearer KEY` with the key "
                             "the server was started with (--api-key)", status=401, type="authentication_error",
                             code="invalid_api_key")
