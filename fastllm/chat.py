"""Chat templates: OpenAI-style messages -> the prompt text, rendered the way transformers' `apply_chat_template`
renders it (same Jinja sandbox, options, globals and template variables), without transformers.

    template = ChatTemplate.from_directory("model_dir")      # None when the model has no template
    prompt = template.render([{"role": "user", "content": "Hi"}])  # add_generation_prompt=True by default

The rendered text already holds every special token the model expects (a template that wants BOS writes
`{{ bos_token }}`), so it is encoded WITHOUT the tokenizer's own special tokens (transformers encodes it with
add_special_tokens=False too); adding them again would give e.g. a double BOS.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from datetime import datetime
from pathlib import Path

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.utils
from jinja2.sandbox import ImmutableSandboxedEnvironment

from fastllm.errors import ChatTemplateError, InvalidPromptError, NoChatTemplateError

TEMPLATE_FILE = "chat_template.jinja"  # wins over tokenizer_config.json's "chat_template", as in transformers
TEMPLATES_DIR = "additional_chat_templates"  # NAME.jinja: named templates beside the default one
CONFIG_FILE = "tokenizer_config.json"
SPECIAL_TOKENS_FILE = "special_tokens_map.json"  # legacy: read when tokenizer_config.json has no added_tokens_decoder
# The special tokens transformers always passes to a template (when set); any other "*_token" string in the
# tokenizer config, and the named "extra_special_tokens", are passed too.
SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")  # names of an assistant's reasoning, first wins
NO_TEMPLATE_HINT = "pass a Jinja chat template (--chat-template FILE), or send raw prompts to /v1/completions"


# -- the Jinja environment ----------------------------------------------------------------------------------------
class _Refused(jinja2.TemplateError):
    """raise_exception(message) called by the template."""


def _raise_exception(message):
    raise _Refused(str(message))


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # Jinja's own tojson escapes <, >, & and ' for HTML and takes no options; templates expect plain json.dumps.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt):
    return datetime.now().strftime(fmt)


class _Dict:
    """`dict(...)` in a template, without the class itself (no attribute access to the type from the sandbox)."""

    def __call__(self, *args, **kwargs):
        return dict(*args, **kwargs)

    def fromkeys(self, *args, **kwargs):
        return dict.fromkeys(*args, **kwargs)


class _Namespace(jinja2.utils.Namespace):
    """namespace() that refuses underscore-prefixed attributes (a way towards CPython internals)."""

    def __init__(*args, **kwargs):  # Jinja's signature trick, so that namespace(self=...) still works
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _Namespace._check(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name, value):
        _Namespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name):
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"a namespace attribute may not start with '_', got {name!r}")


class _Generation(jinja2.ext.Extension):
    """{% generation %}...{% endgeneration %} marks the assistant's tokens for training masks; rendering, it is its
    body, in its own scope like transformers' call block (fastllm does not report the masks)."""

    tags = frozenset({"generation"})

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller):
        return caller()


def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_Generation, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now, dict=_Dict(),
                       namespace=_Namespace)
    return env


_ENV = _environment()  # holds no per-template state; compiled templates render concurrently


# -- the template ---------------------------------------------------------------------------------------------------
class ChatTemplate:
    """One compiled chat template and the special-token strings it is rendered with.

    `origin` names the template in errors (a file, or "the chat template of DIR").
    """

    def __init__(self, source: str, *, origin: str = "the chat template", **special_tokens: str):
        if not isinstance(source, str) or not source.strip():
            raise ChatTemplateError(f"{origin} is empty; a chat template is Jinja text")
        for name, value in special_tokens.items():
            if not name.endswith("_token") or not isinstance(value, str):
                raise ChatTemplateError(f"special tokens are passed as NAME_token=str, got {name}={value!r}")
        self.source = source
        self.origin = origin
        self.special_tokens = dict(special_tokens)
        try:
            self._template = _ENV.from_string(source)
        except jinja2.TemplateSyntaxError as e:
            raise ChatTemplateError(f"{origin} does not compile: line {e.lineno}: {e.message}") from None

    def __repr__(self) -> str:
        return f"ChatTemplate({self.origin}, {len(self.source)} characters)"

    @property
    def bos_token(self) -> str | None:
        return self.special_tokens.get("bos_token")

    @property
    def eos_token(self) -> str | None:
        return self.special_tokens.get("eos_token")

    @classmethod
    def from_directory(cls, directory: str | os.PathLike, override: str | os.PathLike | None = None
                       ) -> ChatTemplate | None:
        """The chat template of an exported (or Hugging Face) model directory, with its special tokens; None when it
        has none and no override is given.

        Found as transformers finds it: chat_template.jinja (and additional_chat_templates/*.jinja) if present, else
        tokenizer_config.json's "chat_template" (a string, or a list of {"name", "template"}); of several named
        templates, "default". `override` (the server's --chat-template) wins: a Path or the path of a file, the name
        of one of the directory's templates, or the template text itself (a string holding "{" or a newline).
        """
        directory = Path(directory)
        config = _read_json(directory / CONFIG_FILE)
        tokens = _special_tokens(config, _read_json(directory / SPECIAL_TOKENS_FILE))
        named, where = _directory_templates(directory, config)
        if override is not None:
            source, origin = _override(override, named, directory)
        elif not named:
            return None
        elif "default" in named:
            source, origin = named["default"], f"the chat template of {directory} ({where['default']})"
        else:
            raise ChatTemplateError(f"{directory} has chat templates {sorted(named)} but none named 'default'; "
                                    "pass the name of one (--chat-template NAME)")
        return cls(source, origin=origin, **tokens)

    def render(self, messages, *, add_generation_prompt: bool = True, tools=None, documents=None,
               **template_kwargs) -> str:
        """The prompt for `messages` (a list of {"role": str, "content": str | [{"type": "text", "text": str}]}).

        As transformers' apply_chat_template(..., tokenize=False): keys whose value is None are dropped from each
        message; text parts are joined with "\\n" into one string (as OpenAI-compatible servers do for text-only
        templates); the template sees messages, tools, documents, add_generation_prompt, the special tokens
        (bos_token, eos_token, ...) and template_kwargs (which win over the special tokens). add_generation_prompt
        defaults to True: a server renders a prompt for the assistant's reply.
        """
        if not isinstance(add_generation_prompt, bool):
            raise InvalidPromptError(f"add_generation_prompt must be true or false, got {add_generation_prompt!r}")
        variables = {
            **self.special_tokens,
            **_plain(template_kwargs),
            "messages": check_messages(messages),
            "tools": _plain(_list_of_dicts(tools, "tools")),
            "documents": _plain(_list_of_dicts(documents, "documents")),
            "add_generation_prompt": add_generation_prompt,
        }
        try:
            return self._template.render(**variables)
        except _Refused as e:
            raise ChatTemplateError(f"{self.origin} refused the messages: {e.message}") from None
        except Exception as e:  # a template error caused by what these messages hold (missing keys, types, ...)
            raise ChatTemplateError(f"{self.origin} failed on these messages: {type(e).__name__}: {e}") from e


def chat_template(directory: str | os.PathLike, override: str | os.PathLike | None = None) -> ChatTemplate:
    """ChatTemplate.from_directory, with a NoChatTemplateError that says what to do when there is none."""
    template = ChatTemplate.from_directory(directory, override)
    if template is None:
        raise NoChatTemplateError(f"{directory} has no chat template (no {TEMPLATE_FILE}, no \"chat_template\" in "
                                  f"{CONFIG_FILE}); {NO_TEMPLATE_HINT}")
    return template


# -- messages -----------------------------------------------------------------------------------------------------
def check_messages(messages) -> list[dict]:
    """Messages as the template sees them: plain dicts, None values dropped, text parts joined into one string,
    the reasoning under both "reasoning_content" and "thinking" (as transformers passes it).

    Each message needs a string "role" and a "content" that is a string or a list of text parts (an assistant
    message that carries "tool_calls" may have none). Any other key is passed through to the template.
    """
    if not isinstance(messages, (list, tuple)):
        raise InvalidPromptError(f"messages must be a list of {{'role': ..., 'content': ...}} objects, "
                                 f"got {type(messages).__name__}")
    if not messages:
        raise InvalidPromptError("messages is empty; send at least one {'role': 'user', 'content': ...} message")
    checked = []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, Mapping):
            raise InvalidPromptError(f"{where} must be an object with 'role' and 'content', "
                                     f"got {type(message).__name__}")
        message = {key: value for key, value in _plain(message).items() if value is not None}
        if not isinstance(message.get("role"), str):
            raise InvalidPromptError(f"{where}.role must be a string such as 'user', got {message.get('role')!r}")
        if "content" in message:
            message["content"] = _content_text(message["content"], f"{where}.content")
        elif "tool_calls" not in message:
            raise InvalidPromptError(f"{where} ({message['role']}) has no content")
        reasoning = next((message[key] for key in REASONING_FIELDS if key in message), None)
        if reasoning is not None:  # templates read "reasoning_content" or (gpt-oss) "thinking": give them both
            message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
        checked.append(message)
    return checked


def _content_text(content, where: str) -> str:
    if isinstance(content, str):
        return content
    if not isinstance(content, (list, tuple)):
        raise InvalidPromptError(f"{where} must be a string or a list of text parts, got {type(content).__name__}")
    texts = []
    for j, part in enumerate(content):
        if not isinstance(part, Mapping):
            raise InvalidPromptError(f"{where}[{j}] must be an object like {{'type': 'text', 'text': ...}}, "
                                     f"got {type(part).__name__}")
        if part.get("type") != "text":
            raise InvalidPromptError(f"{where}[{j}] is of type {part.get('type')!r}: this model takes text only, "
                                     "send {'type': 'text', 'text': ...} parts")
        if not isinstance(part.get("text"), str):
            raise InvalidPromptError(f"{where}[{j}].text must be a string, got {part.get('text')!r}")
        texts.append(part["text"])
    return "\n".join(texts)


def _list_of_dicts(value, name: str):
    if value is None:
        return None
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, Mapping) for v in value):
        raise InvalidPromptError(f"{name} must be a list of objects, got {value!r:.200}")
    return list(value)


def _plain(value):
    """Plain JSON-like data (str, int, float, bool, None, dict, list, tuple) rebuilt from what the caller passed:
    the sandbox only knows the methods of these types are safe, so anything else reaches the template as a
    placeholder "<TypeName>" (as transformers does)."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, Mapping):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_plain(v) for v in value)
    item = getattr(value, "item", None)  # numpy scalars
    if callable(item) and getattr(value, "shape", None) == ():
        return _plain(item())
    return f"<{type(value).__name__}>"


# -- reading a model directory ------------------------------------------------------------------------------------
def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ChatTemplateError(f"cannot read {path}: {e}; re-export the model directory") from None
    if not isinstance(data, dict):
        raise ChatTemplateError(f"{path} must hold a JSON object, got {type(data).__name__}")
    return data


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ChatTemplateError(f"cannot read the chat template {path}: {e}") from None


def _directory_templates(directory: Path, config: dict) -> tuple[dict[str, str], dict[str, str]]:
    """name -> template text, and name -> where it came from. Template files, if any, replace the config's."""
    named, where = {}, {}
    if (directory / TEMPLATE_FILE).is_file():
        named["default"], where["default"] = _read_text(directory / TEMPLATE_FILE), TEMPLATE_FILE
    if (directory / TEMPLATES_DIR).is_dir():
        for path in sorted((directory / TEMPLATES_DIR).glob("*.jinja")):
            name = path.name.removesuffix(".jinja")
            named[name], where[name] = _read_text(path), f"{TEMPLATES_DIR}/{path.name}"
    if named:
        return named, where
    found = config.get("chat_template")
    if found is None:
        return {}, {}
    if isinstance(found, str):
        return {"default": found}, {"default": f"{CONFIG_FILE} chat_template"}
    if isinstance(found, list) and all(isinstance(t, Mapping) and isinstance(t.get("name"), str)
                                       and isinstance(t.get("template"), str) for t in found):
        return ({t["name"]: t["template"] for t in found},
                {t["name"]: f"{CONFIG_FILE} chat_template {t['name']!r}" for t in found})
    raise ChatTemplateError(f"{directory / CONFIG_FILE}: chat_template must be a string or a list of "
                            f"{{'name': str, 'template': str}}, got {found!r:.200}")


def _override(override, named: dict[str, str], directory: Path) -> tuple[str, str]:
    if isinstance(override, str) and override in named:
        return named[override], f"the chat template {override!r} of {directory}"
    if isinstance(override, str) and ("{" in override or "\n" in override):
        return override, "the chat template passed as text"
    if not isinstance(override, (str, os.PathLike)):
        raise ChatTemplateError(f"a chat template is a file path or Jinja text, got {type(override).__name__}")
    path = Path(override)
    if not path.is_file():
        raise ChatTemplateError(f"chat template file {path} does not exist; pass a Jinja file, the template text"
                                + (f", or one of {sorted(named)}" if named else ""))
    return _read_text(path), f"the chat template {path}"


def _special_tokens(config: dict, legacy_map: dict) -> dict[str, str]:
    """NAME_token -> string, as transformers' tokenizer.special_tokens_map gives them to templates: values are strings
    or AddedToken objects ({"content": ...}); special_tokens_map.json counts only without added_tokens_decoder."""
    merged = dict(config) if "added_tokens_decoder" in config else {**config, **legacy_map}
    extra = merged.get("extra_special_tokens")
    if isinstance(extra, Mapping):
        merged = {**merged, **extra}
    tokens = {}
    for name, value in merged.items():
        if name.endswith("_token"):
            text = value.get("content") if isinstance(value, Mapping) else value
            if isinstance(text, str):
                tokens[name] = text
    return tokens
