"""Chat templates render exactly as transformers' apply_chat_template(tokenize=False) renders them.

The templates below are written here (not copied from model repositories): each produces one well-known prompt
format with the Jinja features real templates rely on (loop.first/last, namespace(), slicing, bos/eos tokens,
raise_exception, strftime_now, tojson with options, whitespace control, loop controls, {% generation %}). Each is
saved into a model directory beside the bundled model's tokenizer, and both fastllm and transformers' AutoTokenizer
read it from there."""

from __future__ import annotations

import json
import re
import shutil
from datetime import datetime

import pytest

from fastllm.chat import ChatTemplate, chat_template, check_messages
from fastllm.errors import ChatTemplateError, InvalidParameterError, InvalidPromptError, NoChatTemplateError

# <|im_start|>role\n...<|im_end|>\n, a default system prompt, tools as JSON lines inside the system prompt
CHATML = """\
{%- if tools %}
<|im_start|>system
{{ messages[0].content if messages[0].role == 'system' else 'You are a helpful assistant.' }}

# Tools

<tools>
{% for tool in tools %}
{{ tool | tojson }}
{% endfor %}
</tools><|im_end|>
{% elif messages[0].role != 'system' %}
<|im_start|>system
You are a helpful assistant.<|im_end|>
{% endif %}
{% for message in messages %}
    {%- if message.role == 'system' and (loop.first and tools) %}{% continue %}{% endif %}
<|im_start|>{{ message.role }}
{{ message.content }}<|im_end|>
{% endfor %}
{% if add_generation_prompt %}
<|im_start|>assistant
{% endif %}
"""

# BOS, header ids, a system prompt taken off the front by slicing, today's date unless date_string is passed
LLAMA3 = """\
{{- bos_token }}
{%- if messages[0].role == 'system' %}
    {%- set system = messages[0].content | trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system = '' %}
{%- endif %}
{%- if date_string is not defined %}
    {%- set date_string = strftime_now('%d %b %Y') %}
{%- endif %}
<|start_header_id|>system<|end_header_id|>

Today Date: {{ date_string }}
{% if system %}

{{ system }}
{%- endif %}
<|eot_id|>
{%- for message in messages %}
<|start_header_id|>{{ message.role }}<|end_header_id|>

{{ message.content | trim }}<|eot_id|>
{%- endfor %}
{%- if add_generation_prompt %}
<|start_header_id|>assistant<|end_header_id|>

{% endif %}
"""

# [INST] ... [/INST] answer</s>; the system prompt goes into the first user turn; roles must alternate
MISTRAL = """\
{%- set ns = namespace(system='', turns=messages) %}
{%- if messages[0].role == 'system' %}
    {%- set ns.system = messages[0].content + '\\n\\n' %}
    {%- set ns.turns = messages[1:] %}
{%- endif %}
{{- bos_token }}
{%- for message in ns.turns %}
    {%- if (message.role == 'user') != (loop.index0 % 2 == 0) %}
        {{- raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}
    {%- endif %}
    {%- if message.role == 'user' %}
        {{- '[INST] ' + (ns.system if loop.first else '') + message.content + ' [/INST]' }}
    {%- elif message.role == 'assistant' %}
        {{- ' ' + message.content + eos_token }}
    {%- else %}
        {{- raise_exception('Only user and assistant roles are supported after the system message') }}
    {%- endif %}
{%- endfor %}
"""

# <|role|>\n...<|end|>\n; without a generation prompt the text ends with EOS
PHI3 = """\
{% for message in messages %}
{% if message.role in ['system', 'user', 'assistant'] %}
<|{{ message.role }}|>
{{ message.content }}<|end|>
{% endif %}
{% endfor %}
{% if add_generation_prompt %}
<|assistant|>
{% else %}
{{ eos_token }}
{% endif %}
"""

# <|role|>\n...</s>\n with the assistant's text in a {% generation %} block; the generation prompt after the last
ZEPHYR = """\
{% for message in messages %}
<|{{ message.role }}|>
{% if message.role == 'assistant' %}
{% generation %}{{ message.content + eos_token }}{% endgeneration %}

{% else %}
{{ message.content + eos_token }}
{% endif %}
{% if loop.last and add_generation_prompt %}
<|assistant|>
{% endif %}
{% endfor %}
"""

# tools as one indented, sorted JSON document; ASCII escaping and separators chosen by the template; documents
TOOLS_JSON = """\
{% if tools %}Tools: {{ tools | tojson(indent=2, sort_keys=true) }}
Compact: {{ tools | tojson(separators=(',', ':')) }}
Escaped: {{ tools[0].function.description | tojson(ensure_ascii=true) }}
{% endif %}
{% for document in documents or [] %}
Document {{ loop.index }} ({{ document.title }}): {{ document.text }}
{% endfor %}
{% for message in messages %}{{ message.role | upper }}: {{ message.content }}
{% if loop.last and message.role != 'user' %}{% break %}{% endif %}
{% endfor %}
{% if add_generation_prompt %}ASSISTANT:{% endif %}"""

TEMPLATES = {"chatml": CHATML, "llama3": LLAMA3, "mistral": MISTRAL, "phi3": PHI3, "zephyr": ZEPHYR,
             "tools_json": TOOLS_JSON}

SYSTEM = {"role": "system", "content": "You answer in one sentence.  "}
CONVERSATIONS = {
    "one_user": [{"role": "user", "content": "What does list.append do?"}],
    "system_user": [SYSTEM, {"role": "user", "content": " What is a tuple? "}],
    "multi_turn": [SYSTEM, {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello! How can I help?"},
                   {"role": "user", "content": "Explain dict.get in ünïcödé — 短い."}],
    "ends_with_assistant": [{"role": "user", "content": "Say yes"}, {"role": "assistant", "content": "yes"}],
}
TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Weather <now> & \"later\" for a city — ☀",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "unit": {"enum": ["c", "f"]}},
                   "required": ["city"]}}}]
DATE = {"date_string": "26 Jul 2024"}


# -- model directories and transformers -----------------------------------------------------------------------------
def model_dir(root, bundled_dir, *, config: dict | None = None, template=None, files: dict | None = None):
    """A model directory with the bundled model's tokenizer, `config` merged over its tokenizer_config.json
    (template: put there as "chat_template"), and extra files {relative path: text}."""
    root.mkdir(parents=True, exist_ok=True)
    shutil.copy(bundled_dir / "tokenizer.json", root)
    tokenizer_config = json.loads((bundled_dir / "tokenizer_config.json").read_text())
    tokenizer_config.update(config or {})
    if template is not None:
        tokenizer_config["chat_template"] = template
    (root / "tokenizer_config.json").write_text(json.dumps(tokenizer_config), encoding="utf-8")
    for name, text in (files or {}).items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text, encoding="utf-8")
    return root


def hf_tokenizer(directory):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(directory)


def hf_render(tokenizer, messages, **kwargs):
    return tokenizer.apply_chat_template(messages, tokenize=False, **kwargs)


SPECIALS = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<|pad|>"}


@pytest.fixture(scope="module")
def pair(tmp_path_factory, bundled_dir):
    """template name -> (fastllm's ChatTemplate, transformers' tokenizer), both read from the same directory."""
    root = tmp_path_factory.mktemp("chat")
    out = {}
    for name, source in TEMPLATES.items():
        directory = model_dir(root / name, bundled_dir, config=SPECIALS, template=source)
        out[name] = ChatTemplate.from_directory(directory), hf_tokenizer(directory)
    return out


# -- parity ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("generation_prompt", [True, False], ids=["gen", "nogen"])
@pytest.mark.parametrize("conversation", CONVERSATIONS)
@pytest.mark.parametrize("name", TEMPLATES)
def test_render_equals_transformers(pair, name, conversation, generation_prompt):
    ours, theirs = pair[name]
    messages = CONVERSATIONS[conversation]
    expected = hf_render(theirs, messages, add_generation_prompt=generation_prompt, **DATE)
    got = ours.render(messages, add_generation_prompt=generation_prompt, **DATE)
    assert got == expected
    assert len(got) > 20


@pytest.mark.parametrize("name", ["chatml", "tools_json"])
def test_tools_render_through_tojson_as_in_transformers(pair, name):
    ours, theirs = pair[name]
    messages = CONVERSATIONS["multi_turn"]
    got = ours.render(messages, tools=TOOLS)
    assert got == hf_render(theirs, messages, tools=TOOLS, add_generation_prompt=True)
    assert '"description": "Weather <now> & \\"later\\" for a city — ☀"' in got  # not HTML-escaped, not ASCII
    if name == "tools_json":
        assert '\\u2014 \\u2600' in got and '"required":["city"]' in got and '\n  {\n    "function": {' in got


def test_documents_reach_the_template(pair):
    ours, theirs = pair["tools_json"]
    messages, documents = CONVERSATIONS["one_user"], [{"title": "list", "text": "append adds"}, {"title": "t"}]
    got = ours.render(messages, documents=documents)
    assert got == hf_render(theirs, messages, documents=documents, add_generation_prompt=True)
    assert "Document 1 (list): append adds\nDocument 2 (t): \n" in got


def test_text_parts_are_joined_into_one_string(pair):
    ours, theirs = pair["chatml"]
    parts = [{"role": "user", "content": [{"type": "text", "text": "first line"}, {"type": "text", "text": "second"}]}]
    joined = [{"role": "user", "content": "first line\nsecond"}]
    assert ours.render(parts) == hf_render(theirs, joined, add_generation_prompt=True)
    assert check_messages(parts) == joined


def test_none_values_are_dropped_as_transformers_drops_them(pair):
    ours, theirs = pair["chatml"]
    messages = [{"role": "user", "content": "Hi", "name": None},
                {"role": "assistant", "content": None, "tool_calls": [{"id": "1"}]},
                {"role": "user", "content": "again"}]
    assert ours.render(messages) == hf_render(theirs, messages, add_generation_prompt=True)
    assert "name" not in check_messages(messages)[0] and "content" not in check_messages(messages)[1]


def test_reasoning_is_passed_under_the_names_templates_read(tmp_path, bundled_dir):
    source = ("{% for m in messages %}{{ m.role }}: {% if m.reasoning_content is defined %}<think>"
              "{{ m.reasoning_content }}|{{ m.thinking }}</think>{% endif %}{{ m.content }}\n{% endfor %}")
    directory = model_dir(tmp_path, bundled_dir, template=source)
    for field in ("reasoning", "thinking", "reasoning_content"):
        messages = [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4", field: "add them"}]
        got = ChatTemplate.from_directory(directory).render(messages, add_generation_prompt=False)
        assert got == hf_render(hf_tokenizer(directory), messages)
        assert "<think>add them|add them</think>4" in got


def test_strftime_now_renders_today(pair):
    ours, theirs = pair["llama3"]
    messages = CONVERSATIONS["one_user"]
    before = datetime.now().strftime("%d %b %Y")
    got = ours.render(messages)
    expected = hf_render(theirs, messages, add_generation_prompt=True)
    after = datetime.now().strftime("%d %b %Y")
    assert re.search(r"Today Date: \d\d \w{3} \d{4}\n", got)
    assert any(f"Today Date: {day}" in got for day in (before, after))
    assert got == expected or before != after  # the same unless midnight passed between the two renders


def test_raise_exception_is_a_chat_template_error(pair):
    ours, theirs = pair["mistral"]
    messages = [{"role": "user", "content": "one"}, {"role": "user", "content": "two"}]
    with pytest.raises(Exception, match="Conversation roles must alternate"):
        hf_render(theirs, messages)
    with pytest.raises(ChatTemplateError, match=r"tokenizer_config.json chat_template\) refused the messages: "
                                                r"Conversation roles must alternate user/assistant"):
        ours.render(messages)
    with pytest.raises(ChatTemplateError, match="Only user and assistant roles"):
        ours.render([{"role": "user", "content": "6 x 7?"}, {"role": "tool", "content": "42"}])


def test_special_tokens_as_added_token_objects_and_from_the_legacy_map(tmp_path, bundled_dir):
    source = ("{{ bos_token }}|{{ eos_token }}|{{ unk_token }}|{{ pad_token }}|{{ sep_token }}|{{ image_token }}|"
              "{{ boi_token }}{% for m in messages %}{{ m.content }}{% endfor %}")
    added = {"__type": "AddedToken", "content": "<|begin|>", "lstrip": False, "normalized": False, "rstrip": False,
             "single_word": False, "special": True}
    config = {"bos_token": added, "eos_token": "<|end|>", "unk_token": None, "extra_special_tokens": {
        "image_token": "<|image|>"}, "boi_token": "<|boi|>"}
    legacy = {"sep_token": "<|sep|>", "pad_token": {"content": "<|padding|>", "special": True}}
    directory = model_dir(tmp_path, bundled_dir, config=config, template=source,
                          files={"special_tokens_map.json": json.dumps(legacy)})
    ours = ChatTemplate.from_directory(directory)
    messages = CONVERSATIONS["one_user"]
    assert ours.render(messages) == hf_render(hf_tokenizer(directory), messages)
    assert ours.render(messages).startswith("<|begin|>|<|end|>||<|padding|>|<|sep|>|<|image|>|<|boi|>")
    assert ours.bos_token == "<|begin|>" and ours.eos_token == "<|end|>"
    # template variables win over the special tokens, as in transformers
    assert ours.render(messages, bos_token="B").startswith("B|<|end|>")


def test_rendered_chat_is_encoded_without_adding_special_tokens(tmp_path, bundled_dir):
    """The encode rule for Engine.chat: transformers tokenizes the rendered chat with add_special_tokens=False, so a
    template that writes BOS and a tokenizer that adds BOS give one BOS, not two."""
    from tokenizers import Tokenizer

    directory = model_dir(tmp_path, bundled_dir, config={"bos_token": "<|endoftext|>"}, template=MISTRAL)
    spec = json.loads((directory / "tokenizer.json").read_text())
    spec["post_processor"] = {"type": "TemplateProcessing", "single": [
        {"SpecialToken": {"id": "<|endoftext|>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
        "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
        "special_tokens": {"<|endoftext|>": {"id": "<|endoftext|>", "ids": [0], "tokens": ["<|endoftext|>"]}}}
    (directory / "tokenizer.json").write_text(json.dumps(spec))
    messages = CONVERSATIONS["multi_turn"]
    rendered = ChatTemplate.from_directory(directory).render(messages)
    expected = hf_tokenizer(directory).apply_chat_template(messages, add_generation_prompt=True, return_dict=False)
    tokenizer = Tokenizer.from_file(str(directory / "tokenizer.json"))
    assert tokenizer.encode(rendered, add_special_tokens=False).ids == list(expected)
    assert expected[:2] != [0, 0] and tokenizer.encode(rendered, add_special_tokens=True).ids[:2] == [0, 0]


# -- finding the template -------------------------------------------------------------------------------------------
def test_chat_template_jinja_wins_over_the_config(tmp_path, bundled_dir):
    directory = model_dir(tmp_path, bundled_dir, template=PHI3, files={"chat_template.jinja": ZEPHYR})
    ours = ChatTemplate.from_directory(directory)
    assert ours.source == ZEPHYR == hf_tokenizer(directory).chat_template
    assert "chat_template.jinja" in ours.origin


def test_an_exported_directory_keeps_the_template_transformers_saved(tmp_path, bundled_dir):
    """save_pretrained writes the template to chat_template.jinja; the exporter copies it with the tokenizer."""
    from fastllm.export.pipeline import write_tokenizer

    theirs = hf_tokenizer(model_dir(tmp_path / "hub", bundled_dir, config=SPECIALS, template=MISTRAL))
    theirs.save_pretrained(tmp_path / "saved")
    (tmp_path / "exported").mkdir()
    assert write_tokenizer(tmp_path / "saved", tmp_path / "exported") == "tokenizer.json"
    ours = ChatTemplate.from_directory(tmp_path / "exported")
    assert "chat_template.jinja" in ours.origin
    messages = CONVERSATIONS["multi_turn"]
    assert ours.render(messages) == hf_render(theirs, messages, add_generation_prompt=True)


def test_named_templates_in_the_config_use_default(tmp_path, bundled_dir):
    named = [{"name": "tool_use", "template": CHATML}, {"name": "default", "template": PHI3}]
    directory = model_dir(tmp_path, bundled_dir, template=named)
    messages = CONVERSATIONS["system_user"]
    theirs = hf_tokenizer(directory)
    assert ChatTemplate.from_directory(directory).render(messages) == hf_render(theirs, messages,
                                                                                add_generation_prompt=True)
    by_name = ChatTemplate.from_directory(directory, "tool_use")
    assert by_name.render(messages) == hf_render(theirs, messages, chat_template="tool_use",
                                                 add_generation_prompt=True)


def test_additional_template_files(tmp_path, bundled_dir):
    files = {"chat_template.jinja": PHI3, "additional_chat_templates/zephyr.jinja": ZEPHYR}
    directory = model_dir(tmp_path, bundled_dir, template=CHATML, files=files)
    theirs = hf_tokenizer(directory)
    assert ChatTemplate.from_directory(directory).source == PHI3 == theirs.chat_template["default"]
    assert ChatTemplate.from_directory(directory, "zephyr").source == ZEPHYR == theirs.chat_template["zephyr"]


def test_several_templates_without_a_default_must_be_named(tmp_path, bundled_dir):
    directory = model_dir(tmp_path, bundled_dir, template=[{"name": "a", "template": PHI3},
                                                           {"name": "b", "template": ZEPHYR}])
    with pytest.raises(ChatTemplateError, match=r"chat templates \['a', 'b'\] but none named 'default'"):
        ChatTemplate.from_directory(directory)
    assert ChatTemplate.from_directory(directory, "b").source == ZEPHYR


def test_an_override_file_or_text_wins(tmp_path, bundled_dir):
    directory = model_dir(tmp_path / "model", bundled_dir, config=SPECIALS, template=PHI3)
    path = tmp_path / "mine.jinja"
    path.write_text(ZEPHYR, encoding="utf-8")
    for override in (path, str(path), ZEPHYR):
        template = ChatTemplate.from_directory(directory, override)
        assert template.source == ZEPHYR and template.eos_token == "</s>"
    assert str(path) in ChatTemplate.from_directory(directory, path).origin
    with pytest.raises(ChatTemplateError, match=r"chat template file .*missing.jinja does not exist"):
        ChatTemplate.from_directory(directory, tmp_path / "missing.jinja")


def test_a_model_without_a_template(tmp_path, bundled_dir):
    assert ChatTemplate.from_directory(bundled_dir) is None  # the bundled model is a base model: no template
    with pytest.raises(NoChatTemplateError, match=r"has no chat template .*--chat-template FILE.*/v1/completions"):
        chat_template(bundled_dir)
    assert chat_template(bundled_dir, CHATML).render(CONVERSATIONS["one_user"]).endswith("<|im_start|>assistant\n")
    assert ChatTemplate.from_directory(tmp_path) is None  # not even a tokenizer_config.json
    assert issubclass(NoChatTemplateError, InvalidParameterError)


# -- errors ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("messages, message", [
    ("hello", r"messages must be a list of .* got str"),
    ([], "messages is empty"),
    (["hi"], r"messages\[0\] must be an object with 'role' and 'content', got str"),
    ([{"content": "hi"}], r"messages\[0\].role must be a string such as 'user', got None"),
    ([{"role": 1, "content": "hi"}], r"messages\[0\].role must be a string"),
    ([{"role": "user", "content": "a"}, {"role": "user"}], r"messages\[1\] \(user\) has no content"),
    ([{"role": "user", "content": None}], r"messages\[0\] \(user\) has no content"),
    ([{"role": "user", "content": 5}], r"messages\[0\].content must be a string or a list of text parts, got int"),
    ([{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "image_url", "image_url": {"url": "x"}}]}],
     r"messages\[0\].content\[1\] is of type 'image_url': this model takes text only"),
    ([{"role": "user", "content": [{"type": "text"}]}], r"messages\[0\].content\[0\].text must be a string, got None"),
    ([{"role": "user", "content": ["a"]}], r"messages\[0\].content\[0\] must be an object like"),
])
def test_bad_messages_name_what_is_wrong(pair, messages, message):
    with pytest.raises(InvalidPromptError, match=message):
        pair["chatml"][0].render(messages)


def test_bad_tools_and_flags(pair):
    ours = pair["chatml"][0]
    with pytest.raises(InvalidPromptError, match="tools must be a list of objects"):
        ours.render(CONVERSATIONS["one_user"], tools="get_weather")
    with pytest.raises(InvalidPromptError, match="add_generation_prompt must be true or false, got 'yes'"):
        ours.render(CONVERSATIONS["one_user"], add_generation_prompt="yes")


def test_a_template_that_does_not_compile_names_itself_and_the_line(tmp_path, bundled_dir):
    directory = model_dir(tmp_path, bundled_dir, files={"chat_template.jinja": "{% for m in messages %}\n{{ m"})
    with pytest.raises(ChatTemplateError, match=r"chat template of .*chat_template.jinja\) does not compile: line 2"):
        ChatTemplate.from_directory(directory)
    with pytest.raises(ChatTemplateError, match="is empty"):
        ChatTemplate("  ")


def test_errors_while_rendering_name_the_template(pair):
    broken = ChatTemplate("{{ messages[0].content + 1 }}", origin="the chat template x.jinja")
    with pytest.raises(ChatTemplateError, match=r"x.jinja failed on these messages: TypeError"):
        broken.render(CONVERSATIONS["one_user"])
    # the sandbox: no underscore attributes on a namespace, no access to Python internals
    for source in ("{% set ns = namespace(_x=1) %}", "{{ messages.__class__.__mro__ }}x{{ ''.__class__.mro() }}"):
        with pytest.raises(ChatTemplateError):
            ChatTemplate(source).render(CONVERSATIONS["one_user"])


def test_inputs_reach_the_template_as_plain_data():
    class Shouty(str):
        def upper(self):
            return "hijacked"

    template = ChatTemplate("{% for m in messages %}{{ m.content.upper() }} {{ m.extra }}{% endfor %}")
    assert template.render([{"role": "user", "content": Shouty("hi"), "extra": object()}]) == "HI <object>"
