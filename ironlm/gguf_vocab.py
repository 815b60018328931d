"""Build a `tokenizers.Tokenizer` from the vocabulary a GGUF file stores in its metadata.

A GGUF has no tokenizer.json: it stores tokens, merges or scores, token types and special token ids under
llama.cpp's `tokenizer.ggml.*` keys. We rebuild the same backend transformers builds from those keys
(transformers/integrations/gguf/gguf_tokenizer_mapping.py), so both tokenize alike, with three deliberate
differences, each towards the original model's own tokenizer.json:
- pre-tokenizer types that split digits one by one (smollm, starcoder, ...) get `Digits(individual_digits=True)`
  before the byte-level split; transformers leaves it out. llama.cpp picks `tokenizer.ggml.pre` by hashing the
  original HF tokenizer's output on a text full of digit runs, so the type is the evidence the split is there.
- a SentencePiece vocabulary with `tokenizer.ggml.add_space_prefix = false` gets no "▁" prefix; transformers
  ignores the flag.
- pre-tokenizer type "qwen2" gets Qwen2's NFC normalizer (only changes text that is not already NFC).
"""

from tokenizers import AddedToken, Regex, decoders, normalizers, pre_tokenizers, processors
from tokenizers import Tokenizer as Backend
from tokenizers.models import BPE

from ironlm.errors import ModelLoadError

# llama.cpp token types (tokenizer.ggml.token_type)
TOKEN_TYPE_CONTROL = 3
TOKEN_TYPE_USER_DEFINED = 4

# Split regexes of the HF tokenizers that llama.cpp's `tokenizer.ggml.pre` names stand for.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_TEKKEN_SPLIT = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_GPT4O_SPLIT = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_SPLIT_REGEX = {
    **dict.fromkeys(
        ["llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2", "dbrx",
         "smaug-bpe"],
        _LLAMA3_SPLIT,
    ),
    **dict.fromkeys(["qwen2", "deepseek-r1-qwen", "kormo", "megrez", "stablelm2", "hunyuan"], _QWEN2_SPLIT),
    "tekken": _TEKKEN_SPLIT,
    **dict.fromkeys(["gpt-4o", "llama4", "minimax-m2"], _GPT4O_SPLIT),
}
# GPT-2's regex with each digit split off first (llama.cpp: "\p{N}" then the GPT-2 regex).
_DIGIT_SPLIT = {"starcoder", "refact", "command-r", "smollm", "codeshell", "exaone", "minerva"}


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's printable spelling of each byte, as byte-level BPE vocabularies write tokens."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    spelling = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in spelling:
            spelling[b] = chr(256 + extra)
            extra += 1
    return spelling


def build_backend(metadata: dict, source: str) -> Backend:
    """The tokenizers backend for the `tokenizer.ggml.*` keys in `metadata`; ModelLoadError if unsupported."""
    model = metadata.get("tokenizer.ggml.model")
    tokens = metadata.get("tokenizer.ggml.tokens")
    if tokens is None or model is None:
        raise ModelLoadError(
            f"{source}: no tokenizer.ggml.model/tokens in the GGUF metadata; use a GGUF that includes its vocabulary"
        )
    tokens = [str(t) for t in tokens]
    token_types = [int(t) for t in metadata.get("tokenizer.ggml.token_type") or ()]
    if model == "gpt2":
        backend = _byte_level_backend(metadata, tokens, source)
    elif model == "llama":
        backend = _sentencepiece_backend(metadata, tokens, source)
    else:
        raise ModelLoadError(
            f"{source}: tokenizer.ggml.model={model!r} is not supported; ironlm reads 'gpt2' (byte-level BPE) "
            "and 'llama' (SentencePiece) vocabularies"
        )
    _add_special_tokens(backend, metadata, tokens, token_types, byte_level=model == "gpt2")
    return backend


def _merges(metadata: dict, source: str) -> list[tuple[str, str]]:
    merges = []
    for merge in metadata["tokenizer.ggml.merges"]:
        if isinstance(merge, str):
            left, sep, right = merge.partition(" ")
            if not sep:
                raise ModelLoadError(f"{source}: tokenizer.ggml.merges entry {merge!r} is not 'left right'")
            merges.append((left, right))
        else:
            left, right = merge
            merges.append((str(left), str(right)))
    return merges


def _byte_level_backend(metadata: dict, tokens: list[str], source: str) -> Backend:
    if "tokenizer.ggml.merges" not in metadata:
        raise ModelLoadError(f"{source}: tokenizer.ggml.model='gpt2' needs tokenizer.ggml.merges, which is missing")
    spelling = bytes_to_unicode()
    alphabet = set(spelling.values())
    # A token written outside the byte alphabet (a raw added token) is re-spelled, as transformers does.
    vocab = {
        t if set(t) <= alphabet else "".join(spelling[b] for b in t.encode("utf-8")): i for i, t in enumerate(tokens)
    }
    backend = Backend(BPE(vocab=vocab, merges=_merges(metadata, source), dropout=None, continuing_subword_prefix="",
                          end_of_word_suffix="", fuse_unk=False))
    pre = metadata.get("tokenizer.ggml.pre", "default")
    if pre in _SPLIT_REGEX:
        backend.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(_SPLIT_REGEX[pre]), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
    elif pre in _DIGIT_SPLIT:
        backend.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ])
    else:  # "gpt-2", "default" and types we do not know: GPT-2's own regex, as transformers does
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre in ("qwen2", "deepseek-r1-qwen"):
        backend.normalizer = normalizers.NFC()  # Qwen2's tokenizer.json normalizes to NFC
    backend.decoder = decoders.ByteLevel()
    return backend


def sentencepiece_merges(tokens: list[str], scores: list[float]) -> list[tuple[str, str]]:
    """BPE merges implied by a SentencePiece vocabulary: every split of a token into two tokens, best score first.

    llama.cpp's SentencePiece tokenizer merges the adjacent pair whose joined token scores highest; BPE with
    merges ranked by that score does the same. Ties keep vocabulary order, like transformers' `generate_merges`.
    """
    ids = {t: i for i, t in enumerate(tokens)}
    score_of = {t: float(s) for t, s in zip(tokens, scores)}
    merges = []
    for token, score in score_of.items():
        local = [(token[:k], token[k:], score) for k in range(1, len(token)) if token[:k] in ids and token[k:] in ids]
        local.sort(key=lambda m: (ids[m[0]], ids[m[1]]))
        merges.extend(local)
    merges.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)
    return [(left, right) for left, right, _ in merges]


def _sentencepiece_backend(metadata: dict, tokens: list[str], source: str) -> Backend:
    vocab = {t: i for i, t in enumerate(tokens)}
    if "tokenizer.ggml.merges" in metadata:
        merges = _merges(metadata, source)
    elif "tokenizer.ggml.scores" in metadata:
        merges = sentencepiece_merges(tokens, list(metadata["tokenizer.ggml.scores"]))
    else:
        raise ModelLoadError(f"{source}: tokenizer.ggml.model='llama' needs tokenizer.ggml.scores or merges")
    backend = Backend(BPE(vocab=vocab, merges=merges, fuse_unk=True, byte_fallback=True, dropout=None))
    add_space_prefix = bool(metadata.get("tokenizer.ggml.add_space_prefix", True))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(
        replacement="▁", prepend_scheme="first" if add_space_prefix else "never", split=False
    )
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if add_space_prefix:
        steps.append(decoders.Strip(content=" ", left=1, right=0))
    backend.decoder = decoders.Sequence(steps)
    return backend


def _add_special_tokens(backend: Backend, metadata: dict, tokens: list[str], token_types: list[int],
                        byte_level: bool) -> None:
    """CONTROL tokens and the named bos/eos/unk/pad become special added tokens; USER_DEFINED ones plain added
    tokens. Either way they are matched whole in the text instead of being cut into pieces."""
    alphabet = set(bytes_to_unicode().values()) if byte_level else None
    special = [t for t, kind in zip(tokens, token_types)
               if kind == TOKEN_TYPE_CONTROL and (alphabet is None or set(t) <= alphabet)]
    for key in ("bos", "eos", "unknown", "padding"):
        token_id = token_id_from(metadata, f"tokenizer.ggml.{key}_token_id", len(tokens))
        if token_id is not None and tokens[token_id] not in special:
            special.append(tokens[token_id])
    backend.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in special])
    vocab = backend.get_vocab(with_added_tokens=True)
    user = [t for t, kind in zip(tokens, token_types) if kind == TOKEN_TYPE_USER_DEFINED and t in vocab]
    backend.add_tokens([AddedToken(t, normalized=False, special=False) for t in user])


def token_id_from(metadata: dict, key: str, num_tokens: int) -> int | None:
    """`metadata[key]` as a token id, or None when absent or out of the vocabulary's range."""
    value = metadata.get(key)
    if value is None or not 0 <= int(value) < num_tokens:
        return None
    return int(value)


def bos_eos_post_processor(bos: str | None, bos_id: int | None, eos: str | None, eos_id: int | None,
                           add_bos: bool, add_eos: bool) -> processors.TemplateProcessing:
    """The post-processor transformers installs for `add_bos_token`/`add_eos_token`."""
    add_bos = add_bos and bos is not None and bos_id is not None
    add_eos = add_eos and eos is not None and eos_id is not None
    single = f"{bos + ':0 ' if add_bos else ''}$A:0{' ' + eos + ':0' if add_eos else ''}"
    pair = f"{single}{' ' + bos + ':1' if add_bos else ''} $B:1{' ' + eos + ':1' if add_eos else ''}"
    special = ([(bos, bos_id)] if add_bos else []) + ([(eos, eos_id)] if add_eos else [])
    return processors.TemplateProcessing(single=single, pair=pair, special_tokens=special)
