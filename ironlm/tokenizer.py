"""Tokenizer: the Rust `tokenizers` library behind a small API, chat templates, streaming detokenization."""

import json
from pathlib import Path

from tokenizers import Tokenizer as Backend

from ironlm import chat_template as chat
from ironlm.errors import ModelLoadError, RequestError
from ironlm.gguf_vocab import bos_eos_post_processor, build_backend, token_id_from

# Tokens that end an assistant turn in common chat formats; they stop generation when the model's chat
# template writes them and the vocabulary has them, even if the file names another EOS.
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<|end|>", "<end_of_turn>")
# Tokens of context decoded before the new ones, so a SentencePiece word keeps its leading space.
_DETOKENIZE_CONTEXT = 6


class Tokenizer:
    """Text <-> token ids for one model, with its special tokens and chat template.

    Build it with `from_dir` (a Hugging Face directory) or `from_gguf_metadata`; both give the ids that
    transformers' tokenizer gives for the same files (`encode(add_special_tokens=True)` adds BOS exactly
    when transformers does).
    """

    def __init__(self, backend: Backend, *, bos_token: str | None = None, eos_token: str | None = None,
                 pad_token: str | None = None, unk_token: str | None = None, eos_token_ids=(),
                 chat_template: str | None = None, name: str = "tokenizer"):
        self._backend = backend
        self.name = name
        self.bos_token, self.eos_token, self.pad_token, self.unk_token = bos_token, eos_token, pad_token, unk_token
        self.vocab_size = backend.get_vocab_size(with_added_tokens=True)
        self.bos_token_id = self._id(bos_token)
        self.pad_token_id = self._id(pad_token)
        self.chat_template = chat_template
        self._template = None if chat_template is None else chat.compile_template(chat_template, f"of {name}")
        # what the template reads besides messages: "tools" means it renders tool definitions itself
        self.template_variables = frozenset() if chat_template is None else chat.template_variables(chat_template)
        eos_ids = {self._id(eos_token), *eos_token_ids}
        eos_ids |= {self._id(t) for t in END_OF_TURN_TOKENS if chat_template and t in chat_template}
        self.eos_token_ids = frozenset(i for i in eos_ids if i is not None)
        # What the post-processor adds around a text is what encode(add_special_tokens=True) adds.
        added = backend.encode("", add_special_tokens=True).ids
        eos_token_id = self._id(eos_token)
        self.add_bos = self.bos_token_id is not None and added[:1] == [self.bos_token_id]
        self._add_eos = eos_token_id is not None and len(added) > self.add_bos and added[-1] == eos_token_id

    def with_chat_template(self, chat_template: str, name: str) -> "Tokenizer":
        """This tokenizer with another chat template (its end-of-turn token also ends generation);
        ModelLoadError if the template does not compile."""
        return Tokenizer(self._backend, bos_token=self.bos_token, eos_token=self.eos_token, pad_token=self.pad_token,
                         unk_token=self.unk_token, eos_token_ids=self.eos_token_ids, chat_template=chat_template,
                         name=name)

    def _id(self, token: str | None) -> int | None:
        return None if token is None else self._backend.token_to_id(token)

    @classmethod
    def from_dir(cls, path) -> "Tokenizer":
        """Load tokenizer.json, tokenizer_config.json, chat_template.jinja and generation_config.json from `path`.

        Matches transformers for directories it loads from tokenizer.json as is (PreTrainedTokenizerFast /
        TokenizersBackend); transformers v5 rebuilds a few model-specific classes from the vocabulary instead.
        """
        path = Path(path)
        file = path / "tokenizer.json"
        if not file.is_file():
            raise ModelLoadError(
                f"{path}: no tokenizer.json; ironlm needs the Hugging Face fast-tokenizer file tokenizer.json in the "
                "model directory (transformers' tokenizer.save_pretrained(dir) writes it)"
            )
        try:
            backend = Backend.from_file(str(file))
        except Exception as e:  # the Rust library raises plain Exception on bad files
            raise ModelLoadError(f"{file}: not a tokenizers file ({e}); replace it with a valid tokenizer.json") \
                from None
        config = _read_json(path / "tokenizer_config.json")
        bos, eos, pad, unk = (_token_content(config.get(key), path / "tokenizer_config.json", key)
                              for key in ("bos_token", "eos_token", "pad_token", "unk_token"))
        # tokenizer.json's post-processor decides BOS/EOS; like transformers v5, add_bos_token in the config is ignored.
        template = _pick_template(config.get("chat_template"), path / "tokenizer_config.json")
        if (path / "chat_template.jinja").is_file():  # transformers v5 saves the template here
            template = _read_text(path / "chat_template.jinja")
        elif (path / "chat_template.json").is_file():
            template = _pick_template(_read_json(path / "chat_template.json").get("chat_template"),
                                      path / "chat_template.json")
        eos_ids = _read_json(path / "generation_config.json").get("eos_token_id")
        eos_ids = [eos_ids] if isinstance(eos_ids, int) else [i for i in eos_ids or () if isinstance(i, int)]
        return cls(backend, bos_token=bos, eos_token=eos, pad_token=pad, unk_token=unk, eos_token_ids=eos_ids,
                   chat_template=template, name=str(path))

    @classmethod
    def from_gguf_metadata(cls, metadata: dict, source: str) -> "Tokenizer":
        """Build from a GGUF's `tokenizer.*` metadata (key -> Python value); `source` names the file in errors."""
        backend = build_backend(metadata, source)
        tokens = metadata["tokenizer.ggml.tokens"]
        num_tokens = len(tokens)

        def token(key):
            token_id = token_id_from(metadata, f"tokenizer.ggml.{key}", num_tokens)
            return None if token_id is None else str(tokens[token_id])

        bos, eos = token("bos_token_id"), token("eos_token_id")
        # llama.cpp adds BOS to a SentencePiece vocabulary that does not say otherwise; transformers follows.
        add_bos = metadata.get("tokenizer.ggml.add_bos_token", metadata["tokenizer.ggml.model"] == "llama")
        add_eos = metadata.get("tokenizer.ggml.add_eos_token", False)
        backend.post_processor = bos_eos_post_processor(
            bos, backend.token_to_id(bos) if bos else None, eos, backend.token_to_id(eos) if eos else None,
            bool(add_bos), bool(add_eos),
        )
        eot_ids = [token_id_from(metadata, f"tokenizer.ggml.{key}_token_id", num_tokens) for key in ("eot", "eom")]
        return cls(backend, bos_token=bos, eos_token=eos, pad_token=token("padding_token_id"),
                   unk_token=token("unknown_token_id"), eos_token_ids=[i for i in eot_ids if i is not None],
                   chat_template=_gguf_template(metadata, source), name=source)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`; special-token strings in it become their ids; BOS first when `add_bos`."""
        if not isinstance(text, str):
            raise RequestError(f"prompt must be a string, got {type(text).__name__}", param="prompt")
        return self._backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        """Text of `ids` (invalid UTF-8 shows as U+FFFD)."""
        return self._backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True, **kwargs) -> str:
        """Render `messages` with the model's chat template in a sandbox, as transformers' apply_chat_template does.

        Extra keyword arguments (tools, documents, enable_thinking, ...) are template variables; `chat_template`
        replaces the model's template. Budget: 2 s and 1 MB of output (plus 4x the size of the input), else
        RequestError; malformed messages or a template that raises give RequestError(param="messages").
        A model without a chat template gives RequestError: there is no silent fallback format, because a
        wrong format quietly degrades answers; send a plain prompt instead.
        """
        template, name = self._template, f"of {self.name}"
        if kwargs.get("chat_template") is not None:
            source = kwargs.pop("chat_template")
            if not isinstance(source, str):
                raise RequestError("chat_template must be a string", param="chat_template")
            name = "given in the request"
            template = chat.compile_template(source, name, error=RequestError)
        kwargs.pop("chat_template", None)
        if template is None:
            raise RequestError(
                f"{self.name} has no chat template; send a plain prompt (completions) or pass a chat_template",
                param="messages",
            )
        variables = {
            **{k: v for k, v in (("bos_token", self.bos_token), ("eos_token", self.eos_token),
                                 ("unk_token", self.unk_token), ("pad_token", self.pad_token)) if v is not None},
            "tools": None,
            "documents": None,
            **chat.plain_data(kwargs),
            "messages": chat.plain_messages(messages),
            "add_generation_prompt": bool(add_generation_prompt),
        }
        return chat.render(template, name, variables)

    def detokenizer(self, prompt_ids: list[int] | None = None,
                    skip_special_tokens: bool = True) -> "IncrementalDetokenizer":
        """A streaming decoder for tokens generated after `prompt_ids` (whose tail gives leading-space context)."""
        return IncrementalDetokenizer(self, prompt_ids, skip_special_tokens)

    def save(self, directory) -> None:
        """Write tokenizer.json and tokenizer_config.json so from_dir and transformers' AutoTokenizer load the same."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self._backend.save(str(directory / "tokenizer.json"))
        config = {
            "tokenizer_class": "PreTrainedTokenizerFast",  # load tokenizer.json as is, no model-specific rebuild
            "bos_token": self.bos_token,
            "eos_token": self.eos_token,
            "pad_token": self.pad_token,
            "unk_token": self.unk_token,
            "add_bos_token": self.add_bos,
            "add_eos_token": self._add_eos,
            "clean_up_tokenization_spaces": False,
        }
        if self.chat_template is not None:
            config["chat_template"] = self.chat_template
        config = {k: v for k, v in config.items() if v is not None}
        (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n",
                                                         encoding="utf-8")


class IncrementalDetokenizer:
    """Streaming decode: `add` returns only new, complete text, in O(new tokens) work per call.

    Each call decodes a small window twice (vLLM's prefix/read offsets): the tokens already shown
    (`prefix`) and those plus the new ones; the new text is the difference. A window whose text ends in
    U+FFFD (a character cut between tokens) is held back until a later token completes it or `flush`.
    Decoding a window the same way as the whole sequence keeps SentencePiece spaces right.
    """

    def __init__(self, tokenizer: Tokenizer, prompt_ids: list[int] | None = None, skip_special_tokens: bool = True):
        self._tokenizer = tokenizer
        self._skip_special_tokens = skip_special_tokens
        self._ids = list(prompt_ids[-_DETOKENIZE_CONTEXT:]) if prompt_ids else []
        self._prefix_offset = 0
        self._read_offset = len(self._ids)
        self.text = ""

    def add(self, token_ids: list[int]) -> str:
        """Text completed by `token_ids` (possibly "")."""
        self._ids.extend(token_ids)
        return self._emit(final=False)

    def flush(self) -> str:
        """Text still held back (a cut character shows as U+FFFD)."""
        return self._emit(final=True)

    def _emit(self, final: bool) -> str:
        if self._read_offset == len(self._ids):
            return ""
        decode = self._tokenizer.decode
        prefix_text = decode(self._ids[self._prefix_offset:self._read_offset], self._skip_special_tokens)
        new_text = decode(self._ids[self._prefix_offset:], self._skip_special_tokens)
        if not final and (len(new_text) <= len(prefix_text) or new_text.endswith("\ufffd")):
            return ""
        delta = new_text[len(prefix_text):]
        # The shown tokens become the next prefix; older ones are no longer needed.
        del self._ids[:self._read_offset]
        self._prefix_offset, self._read_offset = 0, len(self._ids)
        self.text += delta
        return delta


def _read_text(file: Path) -> str:
    try:
        return file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ModelLoadError(f"{file}: cannot be read as UTF-8 text ({e}); fix or remove the file") from None


def _read_json(file: Path) -> dict:
    if not file.is_file():
        return {}
    try:
        data = json.loads(_read_text(file))
    except json.JSONDecodeError as e:
        raise ModelLoadError(f"{file}: not valid JSON ({e}); fix or remove the file") from None
    if not isinstance(data, dict):
        raise ModelLoadError(f"{file}: expected a JSON object; fix or remove the file")
    return data


def _gguf_template(metadata: dict, source: str) -> str | None:
    template = metadata.get("tokenizer.chat_template")
    if template is not None and not isinstance(template, str):
        raise ModelLoadError(f"{source}: tokenizer.chat_template must be a string, got {type(template).__name__}")
    return template


def _token_content(value, file: Path, key: str) -> str | None:
    """A special token given as a string or as a serialized AddedToken ({"content": ...})."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    raise ModelLoadError(f"{file}: {key} must be a string or an object with 'content', got {value!r}")


def _pick_template(value, file: Path) -> str | None:
    """`chat_template` as a string, or the one named "default" (else the first) of a list of named templates."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(t, dict) and isinstance(t.get("template"), str) for t in value):
        named = {t.get("name"): t["template"] for t in value}
        return named.get("default", value[0]["template"] if value else None)
    raise ModelLoadError(f"{file}: chat_template must be a string or a list of {{name, template}} objects")
