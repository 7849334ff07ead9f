"""The OpenAI protocol: request bodies checked field by field into SamplingParams, and the response, chunk and error
objects in OpenAI's exact shapes. No I/O and no engine here: app.py drives the engine with what this returns.

Fields follow OpenAI's API, plus the sampling fields vLLM adds (top_k, min_p, repetition_penalty, stop_token_ids,
ignore_eos, add_generation_prompt). Unknown fields are ignored, as OpenAI and vLLM do; known fields this server
cannot honour (tools, response_format other than text, ...) are refused with a 400 naming them, never
accepted and silently ignored.
"""

from __future__ import annotations

import json
import math
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field

from fastllm.sampler import MAX_LOGPROBS, TokenLogprob

MAX_BODY_BYTES = 16 << 20  # a request body larger than this is refused (413) before it is parsed
MAX_N = 64  # choices per prompt
MIN_LOGPROB = -9999.0  # -inf is not JSON: a logprob below this is reported as this (as vLLM does)
ROLES = ("system", "developer", "user", "assistant", "tool")


class RequestError(Exception):
    """Something the client sent or asked for is wrong: an OpenAI error object with a 4xx status (503 for a full
    queue). `param` names the offending field."""

    def __init__(self, message: str, *, status: int = 400, param: str | None = None,
                 type: str = "invalid_request_error", code: str | None = None, headers: Mapping | None = None):
        super().__init__(message)
        self.message, self.status, self.param, self.type, self.code = message, status, param, type, code
        self.headers = dict(headers or {})

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad(message: str, param: str | None = None) -> RequestError:
    return RequestError(message, param=param)


# -- parsing ------------------------------------------------------------------------------------------------------
def _refuse_constant(name: str):
    raise ValueError(f"{name} is not valid JSON")


def parse_body(body: bytes) -> dict:
    """The request body as a JSON object; anything else is a 400 that says what was wrong."""
    if len(body) > MAX_BODY_BYTES:
        raise RequestError(f"the request body is {len(body)} bytes; the limit is {MAX_BODY_BYTES}", status=413)
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as e:
        raise bad(f"the request body is not UTF-8 (byte 0x{body[e.start]:02x} at offset {e.start})") from None
    try:
        data = json.loads(text, parse_constant=_refuse_constant)
    except RecursionError:
        raise bad("the request body is nested too deeply") from None
    except ValueError as e:  # json.JSONDecodeError included
        raise bad(f"the request body is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise bad(f"the request body must be a JSON object, got {_json_type(data)}")
    return data


def _json_type(value) -> str:
    return {dict: "an object", list: "an array", str: "a string", bool: "a boolean", type(None): "null",
            int: "a number", float: "a number"}.get(type(value), type(value).__name__)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _int(body: Mapping, name: str, *, low: int | None = None, high: int | None = None) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, float) and value.is_integer():  # 16.0 from a client that writes every number as a float
        value = int(value)
    if not _is_int(value) or (low is not None and value < low) or (high is not None and value > high):
        lo = "" if low is None else f" >= {low}"
        hi = "" if high is None else f"{' and' if lo else ''} <= {high}"
        raise bad(f"{name} must be an integer{lo}{hi}, got {json.dumps(value)}", name)
    return value


def _bool(body: Mapping, name: str) -> bool | None:
    value = body.get(name)
    if value is not None and not isinstance(value, bool):
        raise bad(f"{name} must be true or false, got {json.dumps(value)}", name)
    return value


def _check_number(body: Mapping, name: str) -> None:
    value = body.get(name)
    if value is not None and not (_is_number(value) and math.isfinite(value)):
        raise bad(f"{name} must be a number, got {json.dumps(value)}", name)


# Known OpenAI fields this server cannot honour, each refused (400) unless it has a value that asks for nothing.
UNSUPPORTED = {
    "tools": lambda v: v in (None, []),
    "tool_choice": lambda v: v in (None, "none"),
    "functions": lambda v: v in (None, []),
    "function_call": lambda v: v in (None, "none"),
    "response_format": lambda v: v is None or v == {"type": "text"},
    "audio": lambda v: v is None,
    "modalities": lambda v: v in (None, ["text"]),
    "prediction": lambda v: v is None,
    "web_search_options": lambda v: v is None,
    "echo": lambda v: v in (None, False),
    "suffix": lambda v: v in (None, ""),
    "include_stop_str_in_output": lambda v: v in (None, False),
}
# the sampling fields whose names and rules are SamplingParams' own (it checks them and names them in its errors)
SAMPLING = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty",
            "seed", "stop", "stop_token_ids", "ignore_eos", "logit_bias")


def _refuse_unsupported(body: Mapping) -> None:
    refused = [name for name, fine in UNSUPPORTED.items() if name in body and not _safe(fine, body[name])]
    if refused:
        raise bad(f"{', '.join(refused)} {'is' if len(refused) == 1 else 'are'} not supported by this server "
                  f"(fastllm serve generates plain text); remove {'it' if len(refused) == 1 else 'them'}", refused[0])


def _safe(check, value) -> bool:
    try:
        return bool(check(value))
    except TypeError:  # an unhashable or odd value: not the harmless one
        return False


@dataclass(frozen=True)
class GenerationRequest:
    """One /v1/completions or /v1/chat/completions request, checked: what app.py submits, n times per prompt."""

    kind: str  # "completion" | "chat"
    model: str | None
    prompts: tuple = ()  # completions: each a str or a list of token ids
    messages: tuple = ()  # chat: the messages, content flattened to text
    sampling: dict = field(default_factory=dict)  # SamplingParams fields given (the model's defaults for the rest)
    max_tokens: int | None = None  # None: the default (completions 16, chat: what the context leaves)
    n: int = 1
    stream: bool = False
    include_usage: bool = False
    logprobs: int | None = None  # alternatives per token (0 = only the token's own), None = no logprobs
    add_generation_prompt: bool = True
    template_kwargs: dict = field(default_factory=dict)

    @property
    def seed(self) -> int | None:
        return self.sampling.get("seed")


def _common(body: dict, kind: str) -> dict:
    """The fields both endpoints share, checked."""
    _refuse_unsupported(body)
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise bad(f"model must be a string, got {json.dumps(model)}", "model")
    if body.get("user") is not None and not isinstance(body["user"], str):
        raise bad(f"user must be a string, got {json.dumps(body['user'])}", "user")
    sampling = {name: body[name] for name in SAMPLING if body.get(name) is not None}
    for name in ("temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty"):
        _check_number(body, name)
    if sampling.get("top_k") == -1:  # vLLM's "off"
        sampling["top_k"] = 0
    if "seed" in sampling:  # choice j of n samples with seed + j: an integer before anything adds to it
        sampling["seed"] = _int(body, "seed", low=0)
    if "stop" in sampling and not (isinstance(sampling["stop"], str) or isinstance(sampling["stop"], list)
                                   and all(isinstance(s, str) for s in sampling["stop"])):
        raise bad(f"stop must be a string or a list of strings, got {json.dumps(sampling['stop'])}", "stop")
    if "stop_token_ids" in sampling and not (isinstance(sampling["stop_token_ids"], list)
                                             and all(_is_int(t) for t in sampling["stop_token_ids"])):
        raise bad(f"stop_token_ids must be a list of integers, got {json.dumps(sampling['stop_token_ids'])}",
                  "stop_token_ids")
    if "logit_bias" in sampling and not isinstance(sampling["logit_bias"], dict):
        raise bad(f"logit_bias must be an object of token id to bias, got {json.dumps(sampling['logit_bias'])}",
                  "logit_bias")
    n = _int(body, "n", low=1, high=MAX_N) or 1
    best_of = _int(body, "best_of", low=1)
    if best_of is not None and best_of != n:
        raise bad(f"best_of {best_of} is not supported (only best_of == n, here {n}); remove best_of", "best_of")
    stream = _bool(body, "stream") or False
    options = body.get("stream_options")
    if options is not None:
        if not stream:
            raise bad("stream_options is only allowed when stream is true", "stream_options")
        if not isinstance(options, dict):
            raise bad(f"stream_options must be an object, got {json.dumps(options)}", "stream_options")
        include = _bool(options, "include_usage")
        # continuous_usage_stats and other options are unknown to OpenAI's shape: ignored like unknown fields
    else:
        include = None
    return {"kind": kind, "model": model, "sampling": sampling, "n": n, "stream": stream,
            "include_usage": bool(include)}


def completion_request(body: dict) -> GenerationRequest:
    fields = _common(body, "completion")
    prompt = body.get("prompt")
    if prompt is None:
        raise bad("prompt is required: a string, a list of strings, a list of token ids or a list of token-id lists",
                  "prompt")
    fields["prompts"] = _prompts(prompt)
    fields["max_tokens"] = _int(body, "max_tokens", low=1)
    fields["logprobs"] = _int(body, "logprobs", low=0, high=MAX_LOGPROBS)
    return GenerationRequest(**fields)


def _prompts(prompt) -> tuple:
    """The prompts of a completions request: "text", ["a", "b"], [1, 2, 3] or [[1, 2], [3]]."""
    shape = "a string, a list of strings, a list of token ids or a list of token-id lists"
    if isinstance(prompt, str):
        return (prompt,)
    if not isinstance(prompt, list) or not prompt:
        raise bad(f"prompt must be {shape} (not empty), got {json.dumps(prompt)[:200]}", "prompt")
    if all(_is_int(t) for t in prompt):
        return (prompt,)
    if all(isinstance(p, str) for p in prompt):
        return tuple(prompt)
    if all(isinstance(p, list) and p and all(_is_int(t) for t in p) for p in prompt):
        return tuple(prompt)
    raise bad(f"prompt must be {shape}, not a mix (each list non-empty), got {json.dumps(prompt)[:200]}", "prompt")


def chat_request(body: dict) -> GenerationRequest:
    fields = _common(body, "chat")
    fields["messages"] = _messages(body.get("messages"))
    tokens = _int(body, "max_completion_tokens", low=1)
    fields["max_tokens"] = tokens if tokens is not None else _int(body, "max_tokens", low=1)
    logprobs, top = _bool(body, "logprobs"), _int(body, "top_logprobs", low=0, high=MAX_LOGPROBS)
    if top is not None and not logprobs:
        raise bad("top_logprobs needs logprobs set to true", "top_logprobs")
    fields["logprobs"] = (top or 0) if logprobs else None
    generation_prompt = _bool(body, "add_generation_prompt")
    fields["add_generation_prompt"] = True if generation_prompt is None else generation_prompt
    kwargs = body.get("chat_template_kwargs")
    if kwargs is not None and not isinstance(kwargs, dict):
        raise bad(f"chat_template_kwargs must be an object, got {json.dumps(kwargs)}", "chat_template_kwargs")
    fields["template_kwargs"] = dict(kwargs or {})
    return GenerationRequest(**fields)


def _messages(messages) -> tuple:
    """The messages' shape; their content is checked where the template renders them (fastllm.chat)."""
    if not isinstance(messages, list) or not messages:
        raise bad(f"messages must be a non-empty list of {{\"role\", \"content\"}} objects, got "
                  f"{json.dumps(messages)[:200]}", "messages")
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise bad(f"messages[{i}] must be an object with role and content, got {json.dumps(m)[:200]}",
                      "messages")
        if m.get("role") not in ROLES:
            raise bad(f"messages[{i}].role must be one of {', '.join(ROLES)}, got {json.dumps(m.get('role'))[:100]}",
                      "messages")
        if m.get("tool_calls") not in (None, []):
            raise bad(f"messages[{i}].tool_calls is not supported by this server (no tools)", "messages")
    return tuple(messages)


def param_of(message: str, request: GenerationRequest) -> str | None:
    """The request field a SamplingParams error message is about (it starts with the field's name)."""
    name = message.split(" ", 1)[0]
    if name == "max_new_tokens":
        return "max_completion_tokens" if request.kind == "chat" else "max_tokens"
    if name == "logprobs" and request.kind == "chat":
        return "top_logprobs"
    return name if name in SAMPLING else None


# -- responses ----------------------------------------------------------------------------------------------------
def new_id(kind: str) -> str:
    return ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex


def now() -> int:
    return int(time.time())


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens}}


def _logprob(value: float) -> float:
    if not value >= MIN_LOGPROB:  # -inf (and NaN, which max() would keep)
        return MIN_LOGPROB
    return float(value)


def chat_logprobs(items: list[TokenLogprob], token_text) -> dict:
    """OpenAI's chat `logprobs` object for these tokens; token_text(id) is the token as text."""
    def entry(token_id: int, logprob: float) -> dict:
        text = token_text(token_id)
        return {"token": text, "logprob": _logprob(logprob), "bytes": list(text.encode("utf-8"))}

    return {"content": [{**entry(t.token_id, t.logprob), "top_logprobs": [entry(i, lp) for i, lp in t.top]}
                        for t in items], "refusal": None}


def completion_logprobs(items: list[TokenLogprob], token_text, offset: int = 0) -> dict:
    """The legacy completions `logprobs` object: tokens, token_logprobs, top_logprobs, text_offset."""
    tokens = [token_text(t.token_id) for t in items]
    offsets = []
    for text in tokens:
        offsets.append(offset)
        offset += len(text)
    return {"tokens": tokens, "token_logprobs": [_logprob(t.logprob) for t in items],
            "top_logprobs": [_top(t.top, token_text) for t in items],
            "text_offset": offsets}


def _top(top, token_text) -> dict:
    """{token text: logprob}, most likely first; two ids with the same text keep the likelier one's logprob."""
    out = {}
    for token_id, logprob in top:
        out.setdefault(token_text(token_id), _logprob(logprob))
    return out


def completion_choice(index: int, text: str, finish_reason: str | None, logprobs: dict | None) -> dict:
    return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}


def chat_choice(index: int, text: str, finish_reason: str | None, logprobs: dict | None) -> dict:
    return {"index": index, "message": {"role": "assistant", "content": text, "refusal": None},
            "logprobs": logprobs, "finish_reason": finish_reason}


def chat_chunk_choice(index: int, delta: dict, finish_reason: str | None, logprobs: dict | None) -> dict:
    return {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}


def response(kind: str, rid: str, created: int, model: str, choices: list, usage_: dict | None) -> dict:
    obj = "chat.completion" if kind == "chat" else "text_completion"
    return {"id": rid, "object": obj, "created": created, "model": model, "system_fingerprint": None,
            "choices": choices, "usage": usage_}


def chunk(kind: str, rid: str, created: int, model: str, choices: list, include_usage: bool,
          usage_: dict | None = None) -> dict:
    """One streamed chunk. With include_usage every chunk carries `usage` (null but in the last one, whose choices
    are empty), as OpenAI streams it."""
    obj = "chat.completion.chunk" if kind == "chat" else "text_completion"
    out = {"id": rid, "object": obj, "created": created, "model": model, "system_fingerprint": None,
           "choices": choices}
    if include_usage:
        out["usage"] = usage_
    return out


def sse(data: dict | str) -> bytes:
    text = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    return f"data: {text}\n\n".encode()


DONE = sse("[DONE]")
