"""OpenAI Batch files: check an input JSONL line by line, read its items, and shape output and error lines.

Input line:  {"custom_id": str, "method": "POST", "url": "/v1/chat/completions" | "/v1/completions", "body": {...}}
Output line: {"id", "custom_id", "response": {"status_code", "request_id", "body"}, "error"}
The file is read twice (check, then run) rather than held in memory, so memory does not grow with its size.
"""
import hashlib
import json
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from ironlm.errors import IronlmError

URLS = ("/v1/chat/completions", "/v1/completions")
MAX_CUSTOM_ID_CHARS = 512
MAX_PROBLEMS = 1000  # keep memory bounded for a file that is wrong everywhere


@dataclass
class BatchItem:
    line_number: int
    custom_id: str
    url: str
    body: dict


@dataclass
class Problem:
    line_number: int
    message: str
    code: str = "invalid_line"

    def __str__(self) -> str:
        return f"line {self.line_number}: {self.message}"


@dataclass
class BatchCheck:
    """What a pass over the input found: its hash, item count, and every bad line."""

    sha256: str
    num_items: int = 0
    problems: list[Problem] = field(default_factory=list)
    num_problems: int = 0


def check_batch_file(path: Path, model_names: tuple[str, ...], endpoint: str | None = None) -> BatchCheck:
    """Checks every line: JSON object, custom_id (present, unique), method POST, url, body, model.

    `model_names` are the names a body's "model" may take (absent is fine too). `endpoint`, when given, is the
    one url every line must use (as /v1/batches requires).
    """
    digest = hashlib.sha256()
    seen: dict[str, int] = {}  # custom_id -> first line
    check = BatchCheck(sha256="")
    try:
        f = open(path, "rb")
    except OSError as exc:
        raise IronlmError(f"cannot read the batch input {path}: {exc.strerror}") from None
    with f:
        for number, raw in enumerate(f, 1):
            digest.update(raw)
            problem = _check_line(raw, number, seen, model_names, endpoint)
            if problem is None:
                check.num_items += 1
                continue
            check.num_problems += 1
            if len(check.problems) < MAX_PROBLEMS:
                check.problems.append(problem)
    check.sha256 = digest.hexdigest()
    if check.num_items == 0 and not check.problems:
        check.problems.append(Problem(0, "the file has no requests"))
        check.num_problems = 1
    return check


def _check_line(raw: bytes, number: int, seen: dict[str, int], model_names: tuple[str, ...],
                endpoint: str | None) -> Problem | None:
    if not raw.strip():
        return Problem(number, "blank line; remove it", "empty_line")
    try:
        record = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        return Problem(number, f"not valid JSON ({exc})", "invalid_json")
    if not isinstance(record, dict):
        return Problem(number, "not a JSON object", "invalid_json")
    custom_id = record.get("custom_id")
    if custom_id is None:
        return Problem(number, "missing custom_id", "missing_custom_id")
    if not isinstance(custom_id, str) or not custom_id or len(custom_id) > MAX_CUSTOM_ID_CHARS:
        return Problem(number, f"custom_id must be a non-empty string of at most {MAX_CUSTOM_ID_CHARS} characters",
                       "invalid_custom_id")
    if custom_id in seen:
        return Problem(number, f"duplicate custom_id {custom_id!r} (first on line {seen[custom_id]})",
                       "duplicate_custom_id")
    seen[custom_id] = number
    if record.get("method") != "POST":
        return Problem(number, f"method must be \"POST\", got {record.get('method')!r}", "invalid_method")
    url = record.get("url")
    if url not in URLS:
        return Problem(number, f"url must be one of {', '.join(URLS)}, got {url!r}", "invalid_url")
    if endpoint is not None and url != endpoint:
        return Problem(number, f"url {url!r} differs from the batch's endpoint {endpoint!r}", "mismatched_url")
    body = record.get("body")
    if not isinstance(body, dict):
        return Problem(number, "body must be a JSON object", "invalid_body")
    model = body.get("model")
    if model is not None and model not in model_names:
        return Problem(number, f"body.model {model!r} is not the loaded model; use one of "
                       f"{', '.join(repr(n) for n in model_names)} or leave it out", "model_not_found")
    return None


def iter_batch_items(path: Path, skip: set[str] | frozenset = frozenset()) -> Iterator[BatchItem]:
    """The items of a file that `check_batch_file` passed, lazily, leaving out custom_ids in `skip`."""
    with open(path, "rb") as f:
        for number, raw in enumerate(f, 1):
            record = json.loads(raw)
            if record["custom_id"] in skip:
                continue
            yield BatchItem(number, record["custom_id"], record["url"], record["body"])


def format_problems(path: Path, check: BatchCheck, limit: int = 20) -> list[str]:
    """One line per bad input line (the first `limit`), then how many more."""
    lines = [f"{path}: {p}" if p.line_number else f"{path}: {p.message}" for p in check.problems[:limit]]
    if check.num_problems > limit:
        lines.append(f"{path}: ... and {check.num_problems - limit} more bad lines")
    return lines


def new_request_id() -> str:
    return f"batch_req_{uuid.uuid4().hex}"


def output_line(custom_id: str, body: dict, request_id: str | None = None) -> dict:
    """A successful item, as the OpenAI Batch output file has it."""
    request_id = request_id or new_request_id()
    return {"id": request_id, "custom_id": custom_id,
            "response": {"status_code": 200, "request_id": request_id, "body": body}, "error": None}


def error_line(custom_id: str, message: str, code: str | None = None, param: str | None = None,
               status_code: int = 400, type: str = "invalid_request_error") -> dict:
    """A failed item: the error response the endpoint would have returned, as OpenAI's error file has it."""
    request_id = new_request_id()
    error = {"message": message, "type": type, "param": param, "code": code}
    return {"id": request_id, "custom_id": custom_id,
            "response": {"status_code": status_code, "request_id": request_id, "body": {"error": error}},
            "error": None}
