"""Summarising documents: find them, split long ones at paragraph or sentence boundaries, map-reduce.

A document longer than the context is cut into chunks that each fit; every chunk is summarised (map), then
the summaries are combined, in groups that fit, until one is left (reduce). Splitting works on Python strings,
so a cut can never fall inside a UTF-8 character, and the chunks put back together are exactly the text.
"""
import hashlib
import json
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from ironlm.errors import IronlmError
from ironlm.jobs.resume import default_errors_path, manifest_path
from ironlm.jobs.runner import Task
from ironlm.sampling import SamplingParams

SUFFIXES = (".txt", ".md", ".jsonl")
MAX_PROBLEMS = 1000

# A paragraph ends after a blank line; a sentence after . ! ? ; (ASCII or full-width) or 。！？；, with any
# closing quotes or brackets and the spaces after them, or at a line break.
_PARAGRAPH_END = re.compile(r"\n[ \t\r\f\v]*\n\s*")
_SENTENCE_END = re.compile(r"(?:[.!?;]+[\"')\]]*(?:\s+|$)|[。！？；…]+[”’」』）)\"']*\s*|\n\s*)")
_CJK = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]")
_LATIN_WORD = re.compile(r"[A-Za-z]+")

TEMPLATES = {
    "en": {
        "system": "You are a careful assistant who writes faithful, concise summaries.",
        "map": ("Summarize the following text in a few sentences. Keep names, numbers, dates and findings exactly "
                "as written, and add nothing that is not in the text.{part}\n\nText:\n{text}"),
        "part": " This text is part {index} of {count} of a longer document.",
        "reduce": ("These are summaries of consecutive parts of one document. Combine them into one concise "
                   "summary that keeps the key facts, names, numbers and dates, and adds nothing new.\n\n{text}"),
        "item": "Part {index}:\n{text}",
        "json": "\n\nAnswer with one JSON object that matches this JSON schema:\n{schema}",
    },
    "zh": {
        "system": "你是一名严谨的助手，负责撰写忠实、简洁的摘要。",
        "map": "请用简洁的中文概括以下文本的要点。保留原文中的姓名、数字、日期和结论，不要添加原文没有的内容。{part}\n\n文本：\n{text}",
        "part": "（这是一份较长文档的第{index}部分，共{count}部分。）",
        "reduce": "以下是同一份文档各部分的摘要。请将它们合并为一份简洁的中文摘要，保留关键事实、姓名、数字和日期，不要添加新内容。\n\n{text}",
        "item": "第{index}部分：\n{text}",
        "json": "\n\n请只输出一个符合以下 JSON 模式的 JSON 对象：\n{schema}",
    },
}


def detect_language(text: str) -> str:
    """"zh" when the start has at least as many Chinese characters as Latin-script words, else "en"
    (a Chinese character carries about as much as an English word)."""
    sample = text[:4000]
    num_cjk = len(_CJK.findall(sample))
    return "zh" if num_cjk and num_cjk >= len(_LATIN_WORD.findall(sample)) else "en"


# --- finding documents ---------------------------------------------------------------------------------------

@dataclass
class Document:
    custom_id: str
    path: Path
    line_number: int | None = None  # for a record of a .jsonl file


@dataclass
class DocumentScan:
    documents: list[Document] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    num_problems: int = 0
    sha256: str = ""
    skipped: list[Path] = field(default_factory=list)  # job results found in the folders searched

    def problem(self, message: str) -> None:
        self.num_problems += 1
        if len(self.problems) < MAX_PROBLEMS:
            self.problems.append(message)


def scan_documents(paths: list[str], text_field: str = "text", id_field: str = "id",
                   job_files: frozenset[Path] = frozenset()) -> DocumentScan:
    """Every document under `paths` (files, or folders searched recursively for .txt/.md/.jsonl), checked and
    hashed. A .txt/.md file is one document named by its path; a .jsonl line is one document whose text is
    `text_field` and whose id is `id_field` (or PATH:LINE when it has none).

    `job_files` are this job's own output, errors, manifest and lock. A folder search passes over them, over
    other ironlm jobs' results (a .jsonl with a manifest beside it, such as another shard's) and over hidden
    files, so an output written into the documents' folder is not read back as a document on the next run."""
    scan = DocumentScan()
    digest = hashlib.sha256()
    seen: dict[str, str] = {}
    for file in _files(paths, frozenset(p.resolve() for p in job_files), scan):
        digest.update(str(file).encode("utf-8") + b"\0")
        try:
            data = file.read_bytes()
        except OSError as exc:
            scan.problem(f"{file}: cannot read it ({exc.strerror})")
            continue
        digest.update(hashlib.sha256(data).digest())
        if file.suffix == ".jsonl":
            found = _scan_jsonl(file, data, text_field, id_field, scan)
        else:
            try:
                data.decode("utf-8")
            except UnicodeDecodeError as exc:
                scan.problem(f"{file}: not UTF-8 text (byte {exc.start}); convert it to UTF-8")
                continue
            found = [Document(str(file), file)]
        for doc in found:
            where = f"{file}" + (f" line {doc.line_number}" if doc.line_number else "")
            if doc.custom_id in seen:
                scan.problem(f"{where}: duplicate id {doc.custom_id!r} (first at {seen[doc.custom_id]})")
                continue
            seen[doc.custom_id] = where
            scan.documents.append(doc)
    scan.sha256 = digest.hexdigest()
    if not scan.documents and not scan.problems:
        scan.problem(f"no .txt, .md or .jsonl documents found in {', '.join(paths)}")
    return scan


def _files(paths: list[str], job_files: frozenset[Path], scan: DocumentScan) -> Iterator[Path]:
    seen: set[Path] = set()
    for name in paths:
        path = Path(name)
        if path.is_dir():
            found = []
            for file in sorted(path.rglob("*")):
                hidden = any(part.startswith(".") for part in file.relative_to(path).parts)
                if hidden or not file.is_file() or file.suffix not in SUFFIXES:
                    continue
                if file.resolve() in job_files or _is_job_result(file):
                    scan.skipped.append(file)
                else:
                    found.append(file)
        elif path.is_file():
            if path.suffix not in SUFFIXES:
                scan.problem(f"{path}: unsupported file type; give .txt, .md or .jsonl files")
                continue
            if path.resolve() in job_files:
                scan.problem(f"{path}: is this job's own output; give the output (-o, --errors) another name")
                continue
            found = [path]
        else:
            scan.problem(f"{path}: no such file or folder")
            continue
        for file in found:
            if file.resolve() not in seen:
                seen.add(file.resolve())
                yield file


def _is_job_result(file: Path) -> bool:
    """An ironlm job's output (its manifest lies beside it) or its default errors file."""
    output = file.with_name(file.name.removesuffix(".errors.jsonl") + ".jsonl")
    return manifest_path(file).exists() or (default_errors_path(output) == file and manifest_path(output).exists())


def _scan_jsonl(file: Path, data: bytes, text_field: str, id_field: str, scan: DocumentScan) -> list[Document]:
    found = []
    for number, line in enumerate(data.split(b"\n"), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except (ValueError, UnicodeDecodeError) as exc:
            scan.problem(f"{file} line {number}: not valid JSON ({exc})")
            continue
        if not isinstance(field_value(record, text_field), str):
            scan.problem(f"{file} line {number}: no string field {text_field!r}; pick the field with --text-field")
            continue
        doc_id = field_value(record, id_field)
        if isinstance(doc_id, (str, int)) and not isinstance(doc_id, bool) and str(doc_id):
            custom_id = str(doc_id)
        else:
            custom_id = f"{file}:{number}"
        found.append(Document(custom_id, file, number))
    return found


def field_value(record, name: str):
    """record[name], or for a name with dots that is not itself a key, the nested field it names ("note.text" is
    record["note"]["text"]); None where there is none."""
    if not isinstance(record, dict):
        return None
    if name in record:
        return record[name]
    value = record
    for part in name.split("."):
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    return value


def read_document(doc: Document, text_field: str) -> str:
    """The document's text; IronlmError (that document fails) if the input changed since the scan."""
    try:
        if doc.line_number is None:
            return doc.path.read_text(encoding="utf-8")
        with open(doc.path, "rb") as f:
            for number, line in enumerate(f, 1):
                if number == doc.line_number:
                    text = field_value(json.loads(line), text_field)
                    if not isinstance(text, str):
                        raise ValueError(f"line {number} has no string field {text_field!r}")
                    return text
    except (OSError, ValueError) as exc:
        raise IronlmError(f"cannot read {doc.path}: {exc}; the input changed while the job ran") from None
    raise IronlmError(f"{doc.path} line {doc.line_number} has gone; the input changed while the job ran")


# --- splitting -----------------------------------------------------------------------------------------------

def _spans(text: str, pattern: re.Pattern) -> list[str]:
    """`text` cut after each match of `pattern`; the pieces joined are `text`."""
    pieces, start = [], 0
    for match in pattern.finditer(text):
        if match.end() > start:
            pieces.append(text[start:match.end()])
            start = match.end()
    if start < len(text):
        pieces.append(text[start:])
    return pieces


def _hard_split(text: str, max_tokens: int, count: Callable[[str], int]) -> list[str]:
    """A run with no boundary at all, cut at the longest prefixes that fit (whole characters always)."""
    pieces = []
    while text:
        lo, hi = 1, len(text)  # find the longest prefix of <= max_tokens tokens; one character always goes
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if count(text[:mid]) <= max_tokens:
                lo = mid
            else:
                hi = mid - 1
        pieces.append(text[:lo])
        text = text[lo:]
    return pieces


def split_text(text: str, max_tokens: int, count: Callable[[str], int]) -> list[str]:
    """Chunks of at most about `max_tokens` tokens (by `count`), cut at paragraph ends where possible, else at
    sentence ends, else between characters. "".join(chunks) == text."""
    pieces: list[tuple[str, int]] = []
    for paragraph in _spans(text, _PARAGRAPH_END):
        n = count(paragraph)
        if n <= max_tokens:
            pieces.append((paragraph, n))
            continue
        for sentence in _spans(paragraph, _SENTENCE_END):
            n = count(sentence)
            if n <= max_tokens:
                pieces.append((sentence, n))
            else:
                pieces.extend((p, count(p)) for p in _hard_split(sentence, max_tokens, count))
    chunks: list[str] = []
    current, current_tokens = [], 0
    for piece, n in pieces:
        if current and current_tokens + n > max_tokens:
            chunks.append("".join(current))
            current, current_tokens = [], 0
        current.append(piece)
        current_tokens += n
    if current:
        chunks.append("".join(current))
    return chunks


# --- prompts and the map-reduce task ------------------------------------------------------------------------

@dataclass
class SummarySettings:
    lang: str | None = None            # "en" | "zh" | None (detect per document)
    max_summary_tokens: int = 256
    max_chunks: int = 200
    chunk_tokens: int | None = None    # None: as much as the context allows
    text_field: str = "text"
    map_template: str | None = None    # user template with {text}; None: built-in for the language
    json_schema: dict | None = None    # summaries as JSON objects matching it (map and reduce alike)
    params: SamplingParams = field(default_factory=lambda: SamplingParams(temperature=0.0))


class Summarizer:
    """Makes one map-reduce Task per document for a loaded model (its tokenizer and context length)."""

    MARGIN = 16  # tokens kept free: splitting counts pieces apart, and BPE may merge across a cut

    def __init__(self, tokenizer, max_model_len: int, settings: SummarySettings):
        self.tokenizer = tokenizer
        self.max_model_len = max_model_len
        self.settings = settings
        self.params = SamplingParams(**{**vars(settings.params), "max_tokens": settings.max_summary_tokens,
                                        "json_schema": settings.json_schema})
        self.params.validate(tokenizer.vocab_size)
        if settings.map_template is not None and "{text}" not in settings.map_template:
            raise IronlmError("the prompt template has no {text} placeholder; add one where the document goes")
        self.budgets = {}
        for lang in TEMPLATES:
            room = max_model_len - settings.max_summary_tokens - self.MARGIN
            map_room = room - len(self.map_prompt(lang, "", 99, 99))
            reduce_room = room - len(self.reduce_prompt(lang, ["", ""]))
            if settings.chunk_tokens is not None:
                map_room = min(map_room, settings.chunk_tokens)
            if map_room < 32 or reduce_room < 2 * settings.max_summary_tokens:
                raise IronlmError(
                    f"--max-summary-tokens {settings.max_summary_tokens} leaves too little room in this model's "
                    f"context of {max_model_len} tokens to summarise and combine; lower it (or raise "
                    f"--max-model-len)")
            self.budgets[lang] = (map_room, reduce_room)

    def count(self, text: str) -> int:
        return len(self.tokenizer.encode(text, add_special_tokens=False))

    def _render(self, lang: str, user: str) -> list[int]:
        tok = self.tokenizer
        system = TEMPLATES[lang]["system"]
        if self.settings.json_schema is not None:  # say what the grammar will enforce, so the model aims for it
            user += TEMPLATES[lang]["json"].format(schema=json.dumps(self.settings.json_schema, ensure_ascii=False))
        if tok.chat_template is None:
            return tok.encode(f"{system}\n\n{user}\n\n" + ("摘要：" if lang == "zh" else "Summary:"))
        text = tok.apply_chat_template([{"role": "system", "content": system}, {"role": "user", "content": user}],
                                       add_generation_prompt=True)
        return tok.encode(text, add_special_tokens=False)  # the template writes BOS itself

    def map_prompt(self, lang: str, chunk: str, index: int, count: int) -> list[int]:
        t = TEMPLATES[lang]
        if self.settings.map_template is not None:
            return self._render(lang, self.settings.map_template.replace("{text}", chunk.strip()))
        part = t["part"].format(index=index, count=count) if count > 1 else ""
        return self._render(lang, t["map"].format(part=part, text=chunk.strip()))

    def reduce_prompt(self, lang: str, summaries: list[str]) -> list[int]:
        t = TEMPLATES[lang]
        items = "\n\n".join(t["item"].format(index=i + 1, text=s) for i, s in enumerate(summaries))
        return self._render(lang, t["reduce"].format(text=items))

    def _groups(self, summaries: list[str], room: int) -> list[list[str]]:
        groups, current, used = [], [], 0
        for summary in summaries:
            n = self.count(summary) + 8  # the "Part i:" label
            if current and used + n > room:
                groups.append(current)
                current, used = [], 0
            current.append(summary)
            used += n
        groups.append(current)
        return groups

    def task(self, doc: Document) -> Task:
        return Task(doc.custom_id, lambda: self._run(doc))

    def _run(self, doc: Document):
        text = read_document(doc, self.settings.text_field)
        if not text.strip():
            raise IronlmError("the document is empty")
        lang = self.settings.lang or detect_language(text)
        map_room, reduce_room = self.budgets[lang]
        chunks = [c for c in split_text(text, map_room, self.count) if c.strip()]
        if len(chunks) > self.settings.max_chunks:
            raise IronlmError(f"the document needs {len(chunks)} chunks of {map_room} tokens, more than "
                              f"--max-chunks {self.settings.max_chunks}; raise it to summarise this document")
        usage = {"prompt_tokens": 0, "completion_tokens": 0}
        requests = [(self.map_prompt(lang, c, i + 1, len(chunks)), self.params) for i, c in enumerate(chunks)]
        num_reduce_steps = 0
        while True:
            results = yield requests
            usage["prompt_tokens"] += sum(len(p) for p, _ in requests)
            usage["completion_tokens"] += sum(r.num_tokens for r in results)
            if self.settings.json_schema is not None and any(r.finish_reason != "stop" for r in results):
                raise IronlmError(f"a JSON answer did not end within --max-summary-tokens "
                                  f"{self.settings.max_summary_tokens}; raise it (or simplify the schema)")
            summaries = [r.text.strip() for r in results]
            if len(summaries) == 1:
                break
            groups = self._groups(summaries, reduce_room)
            if len(groups) == len(summaries):
                raise IronlmError("the chunk summaries are too long to combine; lower --max-summary-tokens")
            requests = [(self.reduce_prompt(lang, g), self.params) for g in groups]
            num_reduce_steps += 1
        usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
        record = {"custom_id": doc.custom_id, "source": str(doc.path), "line": doc.line_number, "lang": lang,
                  "num_chunks": len(chunks), "num_reduce_steps": num_reduce_steps, "summary": summaries[0],
                  "finish_reason": results[0].finish_reason, "usage": usage}
        if self.settings.json_schema is not None:
            try:
                record["data"] = json.loads(summaries[0])  # the grammar allowed nothing else; checked all the same
            except json.JSONDecodeError as exc:
                raise IronlmError(f"the answer is not valid JSON ({exc})") from None
        return record


def failure_record(doc: Document, exc: BaseException) -> dict:
    code = "context_length_exceeded" if getattr(exc, "code", None) == "context_length_exceeded" else "failed"
    return {"custom_id": doc.custom_id, "source": str(doc.path), "line": doc.line_number,
            "error": {"code": code, "message": str(exc)}}
