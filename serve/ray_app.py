"""`fastllm serve --replicas N` (or `--autoscale MIN:MAX`): the same app as `fastllm serve`, one per Ray Serve replica,
behind one HTTP endpoint (the extra `ray`: ray[serve]). `import fastllm` never imports this module.

    client --HTTP--> Ray's proxy --> Ingress (one, no CPU) --handle + PrefixAffinityRouter--> EngineReplica x N
                                     reads the body, picks              each: its own engine (threads = num_cpus) and
                                     the routing prefix, streams        fastllm.serve.app's Starlette app, run in
                                     the replica's ASGI messages back   process on the forwarded request

Ray's proxy hands a replica the request's scope but not its body, so its router cannot see the prompt: the ingress
reads the body and calls the engine deployment through a handle, whose router (serve/ray_router.py) then can.
Every /v1/* route, field and error is the replica's own app. The ingress answers /health (200 while at least one
replica answers, with each replica's state) and /metrics (each replica's engine counts, labelled by replica) itself.
A client that goes away cancels the ingress request, which cancels the handle call, which cancels the app on the
replica: its engine requests are cancelled as in `fastllm serve`. A replica that dies fails its requests with a 503
(or, mid-stream, an SSE error event); Ray starts another in its place.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import threading

import ray
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from ray import serve
from ray.serve.config import AutoscalingConfig, RequestRouterConfig
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from fastllm.errors import FastLLMError
from fastllm.serve import protocol as P
from fastllm.serve.app import RETRY_AFTER_S, Server, create_app, error_response, read_body
from fastllm.serve.metrics import CONTENT_TYPE, COUNTERS, GAUGES

log = logging.getLogger("fastllm.serve")
APP = "fastllm"  # the Ray Serve application's name
ENGINE = "FastLLMEngine"  # the engine deployment's name (its replicas are the actors SERVE_REPLICA::fastllm#FastLLMEngine#ID)
REPLICA_HEADER = "x-fastllm-replica"  # added to every forwarded response: the replica that answered
OBJECT_STORE_BYTES = 200 << 20  # a local Ray's object store: requests and ASGI messages are small
STATS_TIMEOUT_S = 5.0  # /health and /metrics wait this long for each replica
# Autoscaling (--autoscale MIN:MAX): Ray adds replicas while the mean ongoing requests per replica stay above the
# target for UPSCALE_DELAY_S, and removes them after DOWNSCALE_DELAY_S below it.
TARGET_ONGOING = 8
UPSCALE_DELAY_S = 10.0
DOWNSCALE_DELAY_S = 120.0
ROUTERS = {"prefix": "fastllm.serve.ray_router.PrefixAffinityRouter",
           "round-robin": "fastllm.serve.ray_router.RoundRobinRouter"}
SCOPE_KEYS = ("type", "asgi", "http_version", "method", "scheme", "path", "raw_path", "query_string", "root_path",
              "headers", "client", "server")


# -- the engine replica ---------------------------------------------------------------------------------------------
class EngineReplica:
    """One engine and fastllm serve's app. forward() runs the app on a request forwarded by the ingress and yields
    its ASGI messages; record_routing_stats() is the engine's stats with who this replica is."""

    def __init__(self, model_dir: str, server_options: dict, load_options: dict):
        self.server = Server(model_dir, **server_options, load_options=load_options)
        self.server.load()  # the replica is up (and counted by Ray) once its engine has run a token
        if self.server.load_error is not None:
            raise self.server.load_error
        self.app = create_app(self.server)
        self.replica = serve.get_replica_context().replica_id.unique_id
        self.node = ray.get_runtime_context().get_node_id()

    async def forward(self, scope: dict, body: bytes, prefix: str = ""):
        """`prefix` is for the router (PrefixAffinityRouter reads it from the call); the app reads the body."""
        sent: asyncio.Queue = asyncio.Queue()
        gone = asyncio.Event()  # the ingress cancelled this call: the app sees http.disconnect
        delivered = False

        async def receive() -> dict:
            nonlocal delivered
            if not delivered:
                delivered = True
                return {"type": "http.request", "body": body, "more_body": False}
            await gone.wait()
            return {"type": "http.disconnect"}

        async def send(message: dict) -> None:
            sent.put_nowait(message)

        def finished(task: asyncio.Task) -> None:
            if not task.cancelled() and task.exception() is not None:
                log.error("fastllm serve: the app failed: %r", task.exception())
            sent.put_nowait(None)

        task = asyncio.create_task(self.app(dict(scope), receive, send))
        task.add_done_callback(finished)
        try:
            while (message := await sent.get()) is not None:
                if message["type"] == "http.response.start":
                    headers = [*message.get("headers", []), (REPLICA_HEADER.encode(), self.replica.encode())]
                    message = {**message, "headers": headers}
                yield message
                if message["type"] == "http.response.body" and not message.get("more_body", False):
                    return
        finally:  # done, or cancelled by the ingress (its client went away): the app cancels its engine requests
            gone.set()
            if not task.done():
                task.cancel()

    def record_routing_stats(self) -> dict:
        stats = self.server.engine.stats() if self.server.engine is not None else {}
        return {**stats, "replica": self.replica, "pid": os.getpid(), "node": self.node}

    def __del__(self):
        engine = getattr(getattr(self, "server", None), "engine", None)
        if engine is not None:
            engine.close()


# -- the ingress ----------------------------------------------------------------------------------------------------
def routing_prefix(path: str, body: bytes) -> str:
    """The text the router matches prefixes on: the (first) completion prompt, token ids joined by commas, or the
    chat messages as compact JSON. Anything unreadable routes as no prefix (the replica answers with the 400)."""
    try:
        data = json.loads(body)
    except ValueError:
        return ""
    if not isinstance(data, dict):
        return ""
    if path.endswith("/chat/completions"):
        return json.dumps(data.get("messages"), ensure_ascii=False, separators=(",", ":"))
    prompt = data.get("prompt")
    if isinstance(prompt, list) and prompt:
        prompt = prompt[0] if all(isinstance(p, (str, list)) for p in prompt) else prompt
    if isinstance(prompt, list):
        return ",".join(map(str, prompt))
    return prompt if isinstance(prompt, str) else ""


def replica_actors(app: str, deployment: str) -> list:
    """The live replica actors of a deployment (Ray Serve names them SERVE_REPLICA::APP#DEPLOYMENT#ID)."""
    prefix = f"SERVE_REPLICA::{app}#{deployment}#"
    return [ray.get_actor(a["name"], namespace=a["namespace"])
            for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].startswith(prefix)]


class ReplicaCollector:
    """Each replica's engine counts as Prometheus metrics labelled replica, pid and node."""

    def __init__(self, stats: list[dict]):
        self.stats = stats

    def collect(self):
        labels = ["replica", "pid", "node"]
        replicas = GaugeMetricFamily("fastllm_replicas", "Engine replicas that answered this scrape", value=len(
            self.stats))
        yield replicas
        for table, family in ((GAUGES, GaugeMetricFamily), (COUNTERS, CounterMetricFamily)):
            for key, (name, text) in table.items():
                metric = family(name, text, labels=labels)
                for s in self.stats:
                    if key in s:
                        metric.add_metric([s["replica"], str(s["pid"]), s["node"]], s[key])
                yield metric


class Ingress:
    """The endpoint's ASGI app: /health and /metrics over all replicas, every other request forwarded."""

    def __init__(self, engine):
        self.engine = engine.options(stream=True)
        self.app_name = serve.get_replica_context().app_name

    def __serve_build_asgi_app__(self):
        async def app(scope, receive, send):  # a function: servers take a bound method for an ASGI 2 app
            await self.asgi(scope, receive, send)

        return app

    async def asgi(self, scope, receive, send) -> None:
        if scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        if scope["method"] == "GET" and scope["path"] == "/health":
            response = await self.health()
        elif scope["method"] == "GET" and scope["path"] == "/metrics":
            response = await self.metrics()
        else:
            return await self.forward(scope, receive, send)
        await response(scope, receive, send)

    async def replica_stats(self) -> list[dict]:
        async def one(actor):
            try:
                return await asyncio.wait_for(actor.record_routing_stats.remote(), STATS_TIMEOUT_S)
            except Exception:  # noqa: BLE001 -- a replica starting, dying or gone: not counted
                return None

        actors = await asyncio.to_thread(replica_actors, self.app_name, ENGINE)
        return [s for s in await asyncio.gather(*map(one, actors)) if s and "slots" in s]

    async def health(self) -> Response:
        stats = await self.replica_stats()
        body = {"status": "ok" if stats else "loading",
                "replicas": [{k: s[k] for k in ("replica", "pid", "node", "slots", "slots_in_use", "waiting")}
                             for s in stats]}
        if not stats:
            return JSONResponse(body, status_code=503, headers={"Retry-After": str(RETRY_AFTER_S)})
        return JSONResponse(body)

    async def metrics(self) -> Response:
        registry = CollectorRegistry()
        registry.register(ReplicaCollector(sorted(await self.replica_stats(), key=lambda s: s["replica"])))
        return Response(generate_latest(registry), media_type=CONTENT_TYPE)

    async def forward(self, scope, receive, send) -> None:
        try:
            body = await read_body(Request(scope, receive))
        except P.RequestError as e:
            return await error_response(e)(scope, receive, send)
        inner = {k: scope[k] for k in SCOPE_KEYS if k in scope}
        call = self.engine.forward.remote(inner, body, prefix=routing_prefix(scope["path"], body))
        started, done = False, False
        try:
            async for message in call:
                started = started or message["type"] == "http.response.start"
                await send(message)
                done = message["type"] == "http.response.body" and not message.get("more_body", False)
        except Exception as e:  # noqa: BLE001 -- the replica died or failed: the client gets an error, never silence
            log.error("fastllm serve: a replica failed a request to %s: %r", scope["path"], e)
            error = P.RequestError(f"the replica serving this request failed ({type(e).__name__}); retry it",
                                   status=503, type="server_error", code="replica_failed",
                                   headers={"Retry-After": str(RETRY_AFTER_S)})
            if not started:
                await error_response(error)(scope, receive, send)
            else:  # mid-stream: an SSE error event (the openai client raises it), then the end of the body
                await send({"type": "http.response.body", "body": P.sse(error.body()), "more_body": False})
            done = True
        finally:
            if not done:  # the client went away (this task was cancelled): cancel the replica's work
                call.cancel()


# -- deploying ------------------------------------------------------------------------------------------------------
def build(model_dir: str, *, server_options: dict, load_options: dict, num_cpus: float, replicas: int | None = None,
          autoscale: tuple[int, int] | None = None, target_ongoing: int = TARGET_ONGOING, router: str = "prefix",
          max_ongoing: int = 256):
    """The Ray Serve application: the ingress bound to the engine deployment (fixed replicas or autoscaled)."""
    scaling = {"num_replicas": replicas or 1}
    if autoscale is not None:
        scaling = {"autoscaling_config": AutoscalingConfig(
            min_replicas=autoscale[0], max_replicas=autoscale[1], initial_replicas=autoscale[0],
            target_ongoing_requests=target_ongoing, upscale_delay_s=UPSCALE_DELAY_S,
            downscale_delay_s=DOWNSCALE_DELAY_S)}
    engine = serve.deployment(EngineReplica, name=ENGINE).options(
        ray_actor_options={"num_cpus": num_cpus}, max_ongoing_requests=max_ongoing,
        request_router_config=RequestRouterConfig(request_router_class=ROUTERS[router]),
        health_check_period_s=2, graceful_shutdown_timeout_s=5, **scaling)
    ingress = serve.deployment(serve.ingress()(Ingress), name="FastLLMIngress").options(
        ray_actor_options={"num_cpus": 0}, max_ongoing_requests=4 * max_ongoing, num_replicas=1)
    return ingress.bind(engine.bind(str(model_dir), server_options, load_options))


def start_ray(address: str | None, *, need_cpus: float, log_level: str = "info") -> bool:
    """Join the cluster at `address` or start a local Ray; True when this process started it (and so stops it)."""
    if address is None:
        cpus = os.cpu_count() or 1
        if need_cpus > cpus:
            raise FastLLMError(f"the replicas need {need_cpus:g} CPUs (replicas x --num-cpus) and this machine has "
                               f"{cpus}; lower --replicas or --num-cpus, or join a larger cluster with --address")
    ray.init(address=address, include_dashboard=False, configure_logging=True, logging_level=log_level.upper(),
             **({} if address else {"object_store_memory": OBJECT_STORE_BYTES}))
    return address is None


def run(model_dir: str, *, address: str | None, host: str, port: int, num_cpus: float, replicas: int | None,
        autoscale: tuple[int, int] | None, server_options: dict, load_options: dict, router: str = "prefix",
        log_level: str = "info") -> int:
    """Deploy and serve until SIGINT or SIGTERM; then delete the app (and stop the Ray this process started)."""
    need = num_cpus * (autoscale[0] if autoscale else replicas or 1)
    started = start_ray(address, need_cpus=need, log_level=log_level)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        serve.start(http_options={"host": host, "port": port})
        max_ongoing = (load_options.get("slots") or 16) + load_options.get("max_queue", 256)
        app = build(model_dir, server_options=server_options, load_options=load_options, num_cpus=num_cpus,
                    replicas=replicas, autoscale=autoscale, router=router, max_ongoing=max_ongoing)
        try:
            serve.run(app, name=APP, route_prefix="/")
        except RuntimeError as e:
            raise FastLLMError(f"deploying {model_dir} on Ray Serve failed: {e}") from None
        log.info("fastllm serve: %s on http://%s:%d (%s)", model_dir, host, port,
                 f"autoscaling {autoscale[0]}..{autoscale[1]} replicas" if autoscale else f"{replicas} replicas")
        stop.wait()
        return 0
    finally:  # a Ray this process started goes down whole (its replicas with it); on a cluster joined, the app only
        try:
            if not started and ray.is_initialized():
                serve.delete(APP)
        finally:
            ray.shutdown()
