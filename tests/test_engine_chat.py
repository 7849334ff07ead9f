"""Engine.chat: the model's chat template rendered like transformers, encoded without added special tokens, then
generated like any prompt."""

from __future__ import annotations

import shutil

import pytest

import fastllm
from fastllm.errors import NoChatTemplateError

TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s>{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>{% endif %}")
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "def main():"}]


@pytest.fixture(scope="module")
def chat_dir(engines, tmp_path_factory):
    directory = tmp_path_factory.mktemp("chat") / "model"
    shutil.copytree(engines["LlamaForCausalLM"].directory, directory)
    (directory / "chat_template.jinja").write_text(TEMPLATE)
    return directory


def test_chat_generates_from_the_rendered_template(chat_dir):
    engine = fastllm.load(chat_dir, slots=2)
    params = fastllm.SamplingParams(max_new_tokens=8, ignore_eos=True)
    ids = engine.chat_prompt(MESSAGES)
    assert ids == engine.encode(_render(engine, MESSAGES), add_special_tokens=False)
    bos = engine.manifest.bos_token_id
    if bos is not None:  # the template writes BOS itself: encoding must not add a second one
        assert ids[:2] != [bos, bos]
    assert engine.chat(MESSAGES, params).token_ids == engine.generate(ids, params).token_ids
    assert len(engine.chat_prompt(MESSAGES, add_generation_prompt=False)) < len(ids)
    engine.close()


def _render(engine, messages):
    from fastllm.chat import chat_template

    return chat_template(engine.directory).render(messages)


def test_a_model_without_a_template_says_what_to_do(engines):
    with pytest.raises(NoChatTemplateError, match="chat-template"):
        engines["LlamaForCausalLM"].chat(MESSAGES, {"max_new_tokens": 2})


def test_a_template_can_be_given(engines):
    engine = engines["LlamaForCausalLM"]
    ids = engine.chat_prompt(MESSAGES, template="{% for m in messages %}{{ m['content'] }}\n{% endfor %}")
    assert engine.tokenizer.decode(ids) == "Be brief.\ndef main():\n"
