"""The shipped SmolLM2-135M-Instruct GGUF against transformers' own GGUF loader."""
import pytest
import torch

from ironlm import LLM, SamplingParams

PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "请用一句话介绍一下长城。",
]


@pytest.fixture(scope="module")
def llm(gguf_path):
    return LLM(str(gguf_path), dtype="float32", quant="none", max_num_seqs=4, num_kv_blocks=256)


@pytest.fixture(scope="module")
def hf_model(gguf_path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32).eval()


def test_logits_match_transformers(llm, hf_model):
    tokens = llm.chat_prompt([{"role": "user", "content": PROMPTS[0]}])
    ours = llm.engine.prompt_logits(tokens)  # (T, V)
    with torch.no_grad():
        theirs = hf_model(torch.tensor([tokens])).logits[0].float()
    # Same dequantized weights; only summation order differs across 30 layers.
    torch.testing.assert_close(ours, theirs, atol=2e-3, rtol=1e-3)
    assert torch.equal(ours.argmax(-1), theirs.argmax(-1))


@pytest.mark.parametrize("prompt", PROMPTS)
def test_greedy_chat_matches_transformers(llm, hf_model, prompt):
    tokens = llm.chat_prompt([{"role": "user", "content": prompt}])
    result = llm.generate({"prompt_token_ids": tokens}, SamplingParams(max_tokens=24, temperature=0.0))[0]
    with torch.no_grad():
        expected = hf_model.generate(torch.tensor([tokens]), max_new_tokens=24, do_sample=False,
                                     eos_token_id=sorted(llm.tokenizer.eos_token_ids), pad_token_id=2)
    expected_ids = expected[0, len(tokens):].tolist()
    assert result.token_ids == expected_ids
    assert result.text == llm.tokenizer.decode(result.token_ids)
    assert result.text.strip()


def test_default_model_answers_a_question(llm):
    answer = llm.chat([{"role": "user", "content": "What is the capital of France?"}],
                      SamplingParams(max_tokens=32, temperature=0.0))[0]
    assert "Paris" in answer.text
    assert answer.finish_reason == "stop"


def test_streaming_chinese_never_splits_a_character(llm):
    tokens = llm.chat_prompt([{"role": "user", "content": "Repeat exactly: 你好，世界！春天来了。"}])
    pieces, final = [], None
    for out in llm.stream(tokens, SamplingParams(max_tokens=40, temperature=0.0)):
        pieces.append(out.new_text)
        final = out
    assert all("\ufffd" not in piece for piece in pieces)
    assert "".join(pieces) == final.text == llm.tokenizer.decode(final.token_ids)
    assert any("\u4e00" <= ch <= "\u9fff" for ch in final.text)


# Prompts whose greedy answer is stable under the int8 activations of the native kernels; llama.cpp's Q4_1 path
# quantizes activations the same way and flips near-ties too (e.g. "What is the capital of France?").
NATIVE_PROMPTS = ["What is photosynthesis?", "Give me a tip for staying healthy.", "Explain gravity in one sentence.",
                  "How do bees make honey?", "What is a computer?"]


@pytest.fixture(scope="module")
def native_llm(gguf_path):
    return LLM(str(gguf_path), dtype="float32", quant="auto", max_num_seqs=4, num_kv_blocks=256)


def test_native_q4_1_path_keeps_gguf_blocks(native_llm):
    from ironlm.quant import QuantLinear

    layer = native_llm.engine.model.model.layers[0]
    assert isinstance(layer.self_attn.qkv_proj, QuantLinear) and layer.self_attn.qkv_proj.fmt == "int4"
    assert native_llm.engine.model.lm_head.fmt == "int8"  # tied to the Q8_0 token embedding


# The native path multiplies int8-quantized activations: its logits differ from the dequantized reference's by a
# standard deviation of about 0.14 on these prompts. Where the reference's two best tokens are within about two of
# those, its greedy pick may legitimately differ; anywhere else a difference is a bug.
NEAR_TIE_LOGITS = 0.3


@pytest.mark.parametrize("prompt", NATIVE_PROMPTS)
def test_native_q4_1_greedy_matches_dequantized_reference(llm, native_llm, prompt):
    params = SamplingParams(max_tokens=32, temperature=0.0, ignore_eos=True)
    messages = [{"role": "user", "content": prompt}]
    reference = llm.chat(messages, params)[0].token_ids
    native = native_llm.chat(messages, params)[0].token_ids
    if native == reference:
        return
    first = next(i for i, (a, b) in enumerate(zip(native, reference)) if a != b)
    prefix = llm.chat_prompt(messages) + reference[:first]
    logits = llm.engine.prompt_logits(prefix)[-1]  # (V,) the reference's scores for the diverging position
    gap = float(logits[reference[first]] - logits[native[first]])
    assert gap < NEAR_TIE_LOGITS, (first, gap)


def test_default_model_calls_a_tool_through_the_server(native_llm):
    # SmolLM2's template knows no tools, so this goes through ironlm's own tool prompt; the question's city has
    # to reach the call's arguments, and the tool's result a second turn.
    pytest.importorskip("llguidance")
    import json

    import openai

    from test_server_support import serve

    weather = {"type": "function", "function": {
        "name": "get_weather", "description": "The current weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
    server, _ = serve(native_llm.engine)
    try:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)
        messages = [{"role": "user", "content": "What is the weather like in Paris today?"}]
        r = client.chat.completions.create(model="default", messages=messages, tools=[weather],
                                           tool_choice="required", temperature=0, max_tokens=100)
        call, = r.choices[0].message.tool_calls
        assert call.function.name == "get_weather" and r.choices[0].finish_reason == "tool_calls"
        assert "Paris" in json.loads(call.function.arguments)["city"]
        messages += [r.choices[0].message.model_dump(exclude_none=True),
                     {"role": "tool", "tool_call_id": call.id, "content": '{"celsius": 18, "sky": "clear"}'}]
        r = client.chat.completions.create(model="default", messages=messages, tools=[weather], temperature=0,
                                           max_tokens=40)
        assert r.choices[0].message.content and r.usage.prompt_tokens > 100
    finally:
        server.stop()
