"""A reasoning model's thinking goes to reasoning_content, whole and streamed, through the server and batch bodies."""
import random

import openai
import pytest

from ironlm import reasoning
from ironlm.grammar import GrammarCompiler
from test_server_support import FakeTokenizer, ScriptedEngine, serve

ANSWER = "I should greet them.\n</think>\n\nHello!"


@pytest.mark.parametrize("answer, thinking, expected", [
    ("<think>\nhmm, so\n</think>\n\nThe answer.", False, ("hmm, so\n", "The answer.")),
    ("hmm\n</think>\n\nAnswer", True, ("hmm\n", "Answer")),  # the prompt opened the thinking
    ("Just an answer", False, (None, "Just an answer")),
    ("cut off while thinking", True, ("cut off while thinking", "")),
    ("a </think> b </think> c", True, ("a ", "b </think> c")),  # the first tag ends the thinking
    ("  <thi", False, (None, "<thi")),
    ("", True, ("", "")),
])
def test_split_and_stream_agree(answer, thinking, expected):
    assert reasoning.split(answer, thinking) == expected
    rng = random.Random(0)
    for _ in range(100):  # streamed in pieces of 1-4 characters, as tokens come
        stream, got = reasoning.Stream(thinking), ["", ""]
        i = 0
        while i < len(answer):
            n = rng.randint(1, 4)
            for k, part in enumerate(stream.feed(answer[i:i + n])):
                got[k] += part
            i += n
        for k, part in enumerate(stream.finish()):
            got[k] += part
        assert tuple(got) == (expected[0] or "", expected[1])


def test_templates_and_prompts_that_think():
    assert reasoning.template_thinks("{{ m.content.split('</think>')[-1] }}")
    assert not reasoning.template_thinks("{{ m.content }}") and not reasoning.template_thinks(None)
    assert reasoning.prompt_thinks("<|Assistant|><think>\n") and not reasoning.prompt_thinks("<|Assistant|>")


@pytest.fixture(scope="module")
def thinking_llm(make_tiny_model):
    """A tiny random model under a template whose prompt opens the thinking; its answers never close it."""
    from ironlm import LLM

    directory, _ = make_tiny_model("llama", vocab_size=49152, max_position_embeddings=256)
    template = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content.split('</think>')[-1] }}<|im_end|>\n"
                "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n<think>\n{% endif %}")
    return LLM(str(directory), dtype="float32", threads=1, chat_template=template)


GREEDY = dict(max_tokens=6, temperature=0.0, ignore_eos=True)


def raw_answer(llm, prompt_ids: list[int]) -> str:
    from ironlm import SamplingParams

    text = llm.generate({"prompt_token_ids": prompt_ids}, SamplingParams(**GREEDY))[0].text
    assert "</think>" not in text
    return text


def test_llm_chat_gives_the_thinking_apart(thinking_llm):
    from ironlm import SamplingParams

    result, = thinking_llm.chat([{"role": "user", "content": "hi"}], SamplingParams(**GREEDY))
    assert (result.reasoning, result.text) == (raw_answer(thinking_llm, result.prompt_token_ids).lstrip(), "")


def test_chat_command_shows_thinking_on_stderr(thinking_llm, capsys):
    """`ironlm chat`: the answer on standard output and in the conversation, the thinking on standard error."""
    from ironlm import SamplingParams
    from ironlm.cli import chat_loop

    raw = raw_answer(thinking_llm, thinking_llm.chat_prompt([{"role": "user", "content": "hi"}]))
    lines = iter(["hi", None])
    messages = chat_loop(thinking_llm, lambda: next(lines), SamplingParams(**GREEDY))
    out = capsys.readouterr()
    assert out.err == raw.lstrip() and out.out == "\n" and messages[-1] == {"role": "assistant", "content": ""}


class ThinkingTokenizer(FakeTokenizer):
    chat_template = "{{ m.content.split('</think>')[-1] }} ... <think>"

    def apply_chat_template(self, messages, add_generation_prompt=True, **kwargs) -> str:
        return super().apply_chat_template(messages, add_generation_prompt) + "<think>\n"


@pytest.fixture(scope="module")
def client():
    server, _ = serve(ScriptedEngine(ANSWER, ThinkingTokenizer()))
    with openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=30) as c:
        yield c
    server.stop()


def test_server_splits_thinking_from_the_answer(client):
    messages = [{"role": "user", "content": "hi"}]
    whole = client.chat.completions.create(model="default", messages=messages).choices[0]
    assert whole.message.model_extra["reasoning_content"] == "I should greet them.\n"
    assert whole.message.content == "Hello!" and whole.finish_reason == "stop"

    thought = answer = ""
    for chunk in client.chat.completions.create(model="default", messages=messages, stream=True):
        for choice in chunk.choices:
            thought += choice.delta.model_extra.get("reasoning_content") or ""
            answer += choice.delta.content or ""
            assert not (answer and choice.delta.model_extra.get("reasoning_content"))  # thinking comes first
    assert (thought, answer) == ("I should greet them.\n", "Hello!")

    cut = client.chat.completions.create(model="default", messages=messages, max_tokens=10).choices[0]
    assert cut.message.model_extra["reasoning_content"] == "I should g" and cut.message.content == ""
    assert client.completions.create(model="default", prompt="hi").choices[0].text == ANSWER  # completions: raw


def test_batch_bodies_know_the_thinking():
    from ironlm.jobs.body import prepare_body

    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    for tokenizer, thinking in ((ThinkingTokenizer(), True), (FakeTokenizer(), None)):
        grammar = GrammarCompiler(tokenizer, tokenizer.vocab_size)
        assert prepare_body("/v1/chat/completions", body, tokenizer, 128, "m", grammar).thinking is thinking
    assert prepare_body("/v1/completions", {"prompt": "hi"}, ThinkingTokenizer(), 128, "m",
                        GrammarCompiler(ThinkingTokenizer(), 300)).thinking is None
