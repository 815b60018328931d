"""What makes a job resumable: a manifest written atomically, durable appends, and repair of a torn last line.

A job appends one JSON line per finished item to its output (or error) file. A crash can leave the last line
half written; `repair_torn_tail` cuts it off so the item is simply done again. Everything before it is whole,
so the set of custom_ids in the files is exactly the set of finished items.
"""
import contextlib
import hashlib
import json
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from ironlm.errors import IronlmError

MANIFEST_VERSION = 1


def manifest_path(output: Path) -> Path:
    return output.with_name(output.name + ".manifest.json")


def default_errors_path(output: Path) -> Path:
    """OUT.errors.jsonl beside OUT.jsonl: where a job's failed items go unless --errors says otherwise."""
    return output.with_name(output.name.removesuffix(".jsonl") + ".errors.jsonl")


def lock_path(output: Path) -> Path:
    return output.with_name(output.name + ".lock")


def job_lock(output: Path):
    """Holds an exclusive lock on `output` for the job's lifetime, or refuses: two jobs appending to one output
    (a nightly job started again while the last one runs, two shards given the same -o) would repeat items and
    interleave their lines."""
    return exclusive_lock(lock_path(output), lambda pid: f"another job (pid {pid}) is writing {output}; wait for it "
                                                         f"to finish, or give this one its own -o")


@contextlib.contextmanager
def exclusive_lock(path: Path, busy: Callable[[str], str]) -> Iterator[None]:
    """An flock on the file `path` (created if need be) while the block runs; where another process holds it,
    IronlmError(busy(its pid)). The kernel drops the lock when the process ends, however it ends, so a killed
    process never leaves a stale one (only its file, which the next holder reuses). The file holds the owner's
    pid, for the message, and is removed on the way out."""
    try:
        import fcntl
    except ImportError:  # not a POSIX system: no lock
        yield
        return
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise IronlmError(f"cannot create the lock file {path}: {exc.strerror}; its folder must be writable"
                              ) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "unknown"
            os.close(fd)
            raise IronlmError(busy(pid)) from None
        if _same_file(fd, path):
            break
        os.close(fd)  # the last holder removed this file between our open and our lock: lock the new one
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode("ascii"), 0)
        yield
    finally:
        with contextlib.suppress(OSError):
            os.unlink(path)  # while still locked, so no one holds a lock on a file no longer there
        os.close(fd)  # releases the lock


def _same_file(fd: int, path: Path) -> bool:
    try:
        on_disk = os.stat(path)
    except FileNotFoundError:
        return False
    held = os.fstat(fd)
    return (held.st_dev, held.st_ino) == (on_disk.st_dev, on_disk.st_ino)


def write_atomic(path: Path, data: bytes) -> None:
    """Replaces `path` with `data` so a crash leaves either the old file or the new one, never a mix."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def hash_files(paths: list[Path], root: Path | None = None) -> str:
    """sha256 over the files' names (relative to root) and contents, in the given order."""
    digest = hashlib.sha256()
    for path in paths:
        name = str(path.relative_to(root)) if root is not None else path.name
        digest.update(name.encode("utf-8") + b"\0")
        with open(path, "rb") as f:
            digest.update(hashlib.file_digest(f, "sha256").digest())
    return digest.hexdigest()


def model_hash(model_path: Path) -> str:
    """sha256 of a GGUF file, or of every regular file in a Hugging Face directory (names and contents)."""
    if model_path.is_dir():
        files = sorted(p for p in model_path.rglob("*") if p.is_file() and not p.name.startswith("."))
        return hash_files(files, model_path)
    return hash_files([model_path])


def recorded_max_model_len(output: Path) -> int | None:
    """The context length a job's manifest beside `output` records, or None (no manifest, or none readable there:
    check_manifest reports an unreadable one)."""
    try:
        value = json.loads(manifest_path(output).read_text(encoding="utf-8"))["params"]["max_model_len"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return value if type(value) is int and value > 0 else None


def check_manifest(output: Path, manifest: dict, force: bool) -> None:
    """Writes the job's manifest next to `output`, or checks it against the one already there.

    A different input, model or parameters is refused unless `force`, which keeps the results already written
    and records the new manifest (delete the output files to start over).
    """
    path = manifest_path(output)
    manifest = {"version": MANIFEST_VERSION, **manifest}
    if path.exists():
        try:
            old = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise IronlmError(f"{path} is unreadable ({exc}); delete it and the output files to start over") from None
        diff = sorted(k for k in set(old) | set(manifest) if old.get(k) != manifest.get(k))
        if not diff:
            return
        if not force:
            raise IronlmError(
                f"{output} was made by a different job ({', '.join(_describe(k, old, manifest) for k in diff)}); "
                f"use --force to continue it anyway, or another output path")
    elif output.exists() and output.stat().st_size > 0 and not force:
        raise IronlmError(f"{output} already exists and has no manifest ({path.name}); "
                          f"use another output path, delete it, or pass --force to add to it")
    write_atomic(path, json.dumps(manifest, indent=1, sort_keys=True).encode("utf-8"))


def _describe(key: str, old: dict, new: dict) -> str:
    if key == "params":
        a, b = old.get(key) or {}, new.get(key) or {}
        names = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
        return "parameters " + ", ".join(f"{n}: {a.get(n)!r} -> {b.get(n)!r}" for n in names)
    return {"input_sha256": "input changed", "model_sha256": "model changed"}.get(key, f"{key} changed")


def repair_torn_tail(path: Path) -> int:
    """Cuts off a last line that was not completely written (no newline, or not JSON); returns bytes removed.

    An unreadable line before the last one means the file was changed by something else: that is refused.
    """
    if not path.exists():
        return 0
    size = path.stat().st_size
    with open(path, "rb") as f:
        data = f.read()
    end = data.rfind(b"\n") + 1  # everything after the last newline is torn
    keep = end
    last_start = data.rfind(b"\n", 0, max(end - 1, 0)) + 1
    if end and not _is_record(data[last_start:end]):
        keep = last_start  # a complete but garbled last line (e.g. zeros after a power cut)
    if keep < size:
        with open(path, "r+b") as f:
            f.truncate(keep)
            f.flush()
            os.fsync(f.fileno())
    return size - keep


def _is_record(line: bytes) -> bool:
    try:
        record = json.loads(line)
    except ValueError:
        return False
    return isinstance(record, dict) and isinstance(record.get("custom_id"), str)


def finished_ids(*paths: Path) -> set[str]:
    """custom_ids of the records in these JSONL files (after repair); a repeated id is refused."""
    done: set[str] = set()
    for path in paths:
        if not path.exists():
            continue
        with open(path, "rb") as f:
            for number, line in enumerate(f, 1):
                try:
                    custom_id = json.loads(line)["custom_id"]
                except (ValueError, KeyError, TypeError):
                    raise IronlmError(f"{path} line {number} is not a job record; it was changed by something "
                                      f"else: fix or delete it") from None
                if custom_id in done:
                    raise IronlmError(f"{path} line {number} repeats custom_id {custom_id!r}; "
                                      f"the output was changed by something else: fix or delete it")
                done.add(custom_id)
    return done


class DurableAppender:
    """Appends JSON lines to a file; every `sync_every` lines or `sync_s` seconds they are flushed and fsynced.

    After SIGKILL or a power cut at most the unsynced lines are lost (and redone), never the ones before them.
    """

    def __init__(self, path: Path, sync_every: int = 8, sync_s: float = 2.0):
        self.path = path
        self.sync_every = sync_every
        self.sync_s = sync_s
        self._file = None
        self._unsynced = 0
        self._last_sync = time.monotonic()

    def append(self, record: dict) -> None:
        if self._file is None:
            self._file = open(self.path, "ab")
        self._file.write(json.dumps(record, ensure_ascii=False).encode("utf-8") + b"\n")
        self._unsynced += 1
        if self._unsynced >= self.sync_every or time.monotonic() - self._last_sync >= self.sync_s:
            self.sync()

    def sync(self) -> None:
        if self._file is not None and self._unsynced:
            self._file.flush()
            os.fsync(self._file.fileno())
        self._unsynced = 0
        self._last_sync = time.monotonic()

    def close(self) -> None:
        if self._file is not None:
            self.sync()
            self._file.close()
            self._file = None

    def __enter__(self) -> "DurableAppender":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
