"""OpenAI's /v1/files and /v1/batches on the server, with every batch's state on disk.

Layout under state_dir: files/<file_id>.json (metadata) + files/<file_id>.data (bytes); batches/<batch_id>.json.
A batch appends its results straight into the data of its (not yet listed) output and error files, durably, so
after a restart it continues where it stopped: the router's startup resumes every batch that was validating,
in progress or finalizing, skipping the custom_ids already in its files. Batches do not expire.
"""
import asyncio
import json
import logging
import re
import time
import uuid
from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse, JSONResponse

from ironlm.jobs.batch_file import URLS, check_batch_file, iter_batch_items, output_line
from ironlm.jobs.body import Completion, failure_line, prepare_body, response_body
from ironlm.jobs.multipart import MultipartParser
from ironlm.jobs.resume import DurableAppender, finished_ids, repair_torn_tail, write_atomic
from ironlm.jobs.runner import ITEM_ERRORS
from ironlm.server import protocol
from ironlm.server.protocol import APIError, bad_request
from ironlm.server.translate import TokenTexts

logger = logging.getLogger(__name__)

_ID = re.compile(r"^(file-|batch_)[0-9a-f]{32}$")
ACTIVE = ("validating", "in_progress", "finalizing", "cancelling")


def _not_found(kind: str, object_id: str) -> APIError:
    return APIError(404, f"No {kind} with id '{object_id[:80]}'", "invalid_request_error", "id", "not_found")


class BatchStore:
    """Files and batches on disk, and the asyncio tasks running batches on an AsyncEngine."""

    def __init__(self, engine, state_dir: Path, model_names: tuple[str, ...], max_in_flight: int,
                 max_file_bytes: int):
        self.engine = engine
        self.files_dir = state_dir / "files"
        self.batches_dir = state_dir / "batches"
        self.model_names = model_names
        self.max_in_flight = max_in_flight
        self.max_file_bytes = max_file_bytes
        self.token_texts = TokenTexts(engine.tokenizer)
        self.workers: dict[str, asyncio.Task] = {}
        self.batches: dict[str, dict] = {}  # batch_id -> {"batch": public object, "output": id, "errors": id}
        self._saved: dict[str, float] = {}

    # --- files ---------------------------------------------------------------------------------------------

    def file_meta(self, file_id: str) -> dict:
        path = self.files_dir / f"{file_id}.json"
        if not _ID.match(file_id) or not path.exists():
            raise _not_found("file", file_id)
        return json.loads(path.read_text(encoding="utf-8"))

    def data_path(self, file_id: str) -> Path:
        return self.files_dir / f"{file_id}.data"

    def register_file(self, file_id: str, filename: str, purpose: str) -> dict:
        meta = {"id": file_id, "object": "file", "bytes": self.data_path(file_id).stat().st_size,
                "created_at": protocol.now(), "filename": filename, "purpose": purpose, "status": "processed",
                "expires_at": None, "status_details": None}
        write_atomic(self.files_dir / f"{file_id}.json", json.dumps(meta).encode("utf-8"))
        return meta

    def list_files(self, purpose: str | None) -> list[dict]:
        metas = [json.loads(p.read_text(encoding="utf-8")) for p in self.files_dir.glob("*.json")]
        metas = [m for m in metas if purpose is None or m["purpose"] == purpose]
        return sorted(metas, key=lambda m: (m["created_at"], m["id"]), reverse=True)

    def delete_file(self, file_id: str) -> None:
        self.file_meta(file_id)
        for record in self.batches.values():
            if record["batch"]["status"] in ACTIVE and file_id in (record["batch"]["input_file_id"],
                                                                  record["output"], record["errors"]):
                raise bad_request(f"file {file_id} is in use by batch {record['batch']['id']}; cancel it first",
                                  param="file_id")
        (self.files_dir / f"{file_id}.json").unlink()
        self.data_path(file_id).unlink(missing_ok=True)

    async def receive_upload(self, request: Request) -> dict:
        """Streams a multipart/form-data upload (fields file, purpose) to disk, within max_file_bytes."""
        match = re.search(r'boundary="?([^";,]+)"?', request.headers.get("content-type", ""))
        if not request.headers.get("content-type", "").startswith("multipart/form-data") or match is None:
            raise bad_request("upload the file as multipart/form-data with the fields 'file' and 'purpose'")
        file_id = f"file-{uuid.uuid4().hex}"
        data_path = self.data_path(file_id)
        parser = MultipartParser(match.group(1).encode("latin-1"), data_path, self.max_file_bytes)
        try:
            async for chunk in request.stream():
                parser.feed(chunk)
            parser.close()
        except BaseException:
            parser.discard()
            raise
        purpose = parser.fields.get("purpose")
        if parser.filename is None or purpose != "batch":
            parser.discard()
            raise bad_request("send the fields 'file' (the JSONL) and 'purpose' set to 'batch'", param="purpose")
        return self.register_file(file_id, parser.filename, purpose)

    # --- batches -------------------------------------------------------------------------------------------

    def get(self, batch_id: str) -> dict:
        record = self.batches.get(batch_id) if _ID.match(batch_id) else None
        if record is None:
            raise _not_found("batch", batch_id)
        return record["batch"]

    def save(self, batch_id: str, throttle_s: float = 0.0) -> None:
        now = time.monotonic()
        if throttle_s and now - self._saved.get(batch_id, 0.0) < throttle_s:
            return
        self._saved[batch_id] = now
        write_atomic(self.batches_dir / f"{batch_id}.json", json.dumps(self.batches[batch_id]).encode("utf-8"))

    def create(self, body: dict) -> dict:
        input_file_id = body.get("input_file_id")
        endpoint = body.get("endpoint")
        if not isinstance(input_file_id, str):
            raise bad_request("'input_file_id' is required", param="input_file_id")
        if endpoint not in URLS:
            raise bad_request(f"'endpoint' must be one of {', '.join(URLS)}", param="endpoint")
        if body.get("completion_window") != "24h":
            raise bad_request("'completion_window' must be '24h'", param="completion_window")
        metadata = body.get("metadata")
        if metadata is not None and not (isinstance(metadata, dict) and len(metadata) <= 16 and all(
                isinstance(k, str) and isinstance(v, str) and len(k) <= 64 and len(v) <= 512
                for k, v in metadata.items())):
            raise bad_request("'metadata' must map at most 16 short strings to strings", param="metadata")
        if self.file_meta(input_file_id)["purpose"] != "batch":
            raise bad_request(f"file {input_file_id} was not uploaded with purpose 'batch'", param="input_file_id")
        batch_id = f"batch_{uuid.uuid4().hex}"
        created = protocol.now()
        batch = {"id": batch_id, "object": "batch", "endpoint": endpoint, "errors": None,
                 "input_file_id": input_file_id, "completion_window": "24h", "status": "validating",
                 "output_file_id": None, "error_file_id": None, "created_at": created, "in_progress_at": None,
                 "expires_at": created + 86400, "finalizing_at": None, "completed_at": None, "failed_at": None,
                 "expired_at": None, "cancelling_at": None, "cancelled_at": None,
                 "request_counts": {"total": 0, "completed": 0, "failed": 0}, "metadata": metadata}
        self.batches[batch_id] = {"batch": batch, "output": f"file-{uuid.uuid4().hex}",
                                  "errors": f"file-{uuid.uuid4().hex}"}
        self.save(batch_id)
        self.start(batch_id)
        return batch

    def start(self, batch_id: str) -> None:
        self.workers[batch_id] = asyncio.create_task(self._work(batch_id), name=f"ironlm-{batch_id}")

    async def cancel(self, batch_id: str) -> dict:
        batch = self.get(batch_id)
        if batch["status"] not in ("validating", "in_progress"):
            raise bad_request(f"batch {batch_id} is {batch['status']}; only a running batch can be cancelled")
        batch["status"] = "cancelling"
        batch["cancelling_at"] = protocol.now()
        self.save(batch_id)
        worker = self.workers.get(batch_id)
        if worker is not None:
            worker.cancel()
        return batch

    def load_all(self) -> None:
        """Reads every batch from disk and restarts the ones a shutdown interrupted."""
        self.files_dir.mkdir(parents=True, exist_ok=True)
        self.batches_dir.mkdir(parents=True, exist_ok=True)
        for path in sorted(self.batches_dir.glob("batch_*.json")):
            record = json.loads(path.read_text(encoding="utf-8"))
            batch_id = record["batch"]["id"]
            self.batches[batch_id] = record
            if record["batch"]["status"] in ACTIVE:
                self.start(batch_id)

    async def stop_all(self) -> None:
        """Stops the workers for a shutdown; their batches stay as they are on disk and resume at the next start."""
        workers = list(self.workers.values())
        for worker in workers:
            worker.cancel()
        await asyncio.gather(*workers, return_exceptions=True)

    # --- running one batch ---------------------------------------------------------------------------------

    async def _work(self, batch_id: str) -> None:
        record = self.batches[batch_id]
        batch = record["batch"]
        out_path, err_path = self.data_path(record["output"]), self.data_path(record["errors"])
        try:
            if batch["status"] == "cancelling":
                return self._finish(batch_id, "cancelled")
            input_path = self.data_path(batch["input_file_id"])
            if not input_path.exists():
                return self._fail(batch_id, [{"code": "missing_file", "message": "the input file was deleted",
                                              "param": "input_file_id", "line": None}])
            check = await asyncio.to_thread(check_batch_file, input_path, self.model_names, batch["endpoint"])
            if check.problems:
                return self._fail(batch_id, [{"code": p.code, "message": p.message, "param": None,
                                              "line": p.line_number or None} for p in check.problems[:100]])
            for path in (out_path, err_path):
                repair_torn_tail(path)
            done_ok, done_failed = finished_ids(out_path), finished_ids(err_path)
            batch["request_counts"] = {"total": check.num_items, "completed": len(done_ok),
                                       "failed": len(done_failed)}
            if batch["status"] == "validating":
                batch["status"] = "in_progress"
                batch["in_progress_at"] = protocol.now()
            self.save(batch_id)
            with DurableAppender(out_path) as out, DurableAppender(err_path) as err:
                await self._run_items(batch_id, input_path, done_ok | done_failed, out, err)
            batch["status"] = "finalizing"
            batch["finalizing_at"] = protocol.now()
            self.save(batch_id)
            self._finish(batch_id, "completed")
        except asyncio.CancelledError:
            if batch["status"] == "cancelling":
                self._finish(batch_id, "cancelled")
            else:
                self.save(batch_id)  # a shutdown: resumes at the next start
                raise
        except Exception:
            logger.exception("batch %s stopped; it resumes when the server restarts", batch_id)
            self.save(batch_id)
        finally:
            self.workers.pop(batch_id, None)

    async def _run_items(self, batch_id: str, input_path: Path, done: set[str], out, err) -> None:
        counts = self.batches[batch_id]["batch"]["request_counts"]
        slots = asyncio.Semaphore(self.max_in_flight)
        running: set[asyncio.Task] = set()
        try:
            for item in iter_batch_items(input_path, done):
                await slots.acquire()
                task = asyncio.create_task(self._run_item(batch_id, item, out, err, counts))
                running.add(task)
                task.add_done_callback(running.discard)
                task.add_done_callback(lambda _: slots.release())
            while running:
                await asyncio.gather(*running)
        finally:
            for task in list(running):
                task.cancel()
            await asyncio.gather(*running, return_exceptions=True)

    async def _run_item(self, batch_id: str, item, out, err, counts: dict) -> None:
        engine = self.engine
        try:
            prepared = await asyncio.to_thread(prepare_body, item.url, item.body, engine.tokenizer,
                                               engine.max_model_len, engine.model_name, engine.grammar)
            prefix = f"{batch_id}-{uuid.uuid4().hex[:8]}-{item.line_number}"  # unique even across restarts
            results = await asyncio.gather(*[self._generate(f"{prefix}-{i}", prompt, params)
                                             for i, (prompt, params) in enumerate(prepared.requests)])
        except ITEM_ERRORS as exc:
            err.append(failure_line(item.custom_id, exc))
            counts["failed"] += 1
        else:
            kind = "chatcmpl" if prepared.kind == "chat" else "cmpl"
            body = response_body(prepared, engine.model_name, results, protocol.new_id(kind), protocol.now(),
                                 self.token_texts)
            out.append(output_line(item.custom_id, body))
            counts["completed"] += 1
        self.save(batch_id, throttle_s=2.0)

    async def _generate(self, request_id: str, prompt: list[int], params) -> Completion:
        completion = Completion()
        async for output in self.engine.generate(request_id, prompt, params):
            completion.add(output)
        return completion

    def _fail(self, batch_id: str, errors: list[dict]) -> None:
        batch = self.batches[batch_id]["batch"]
        batch["errors"] = {"object": "list", "data": errors}
        batch["status"] = "failed"
        batch["failed_at"] = protocol.now()
        self.save(batch_id)

    def _finish(self, batch_id: str, status: str) -> None:
        record = self.batches[batch_id]
        batch = record["batch"]
        for key, field in (("output", "output_file_id"), ("errors", "error_file_id")):
            path = self.data_path(record[key])
            if key == "output" or (path.exists() and path.stat().st_size > 0):
                path.touch()
                suffix = "output" if key == "output" else "errors"
                self.register_file(record[key], f"{batch_id}_{suffix}.jsonl", "batch_output")
                batch[field] = record[key]
        batch["request_counts"]["completed"] = len(finished_ids(self.data_path(record["output"])))
        batch["request_counts"]["failed"] = len(finished_ids(self.data_path(record["errors"])))
        batch["status"] = status
        batch["completed_at" if status == "completed" else "cancelled_at"] = protocol.now()
        self.save(batch_id)


def _page(items: list[dict], after: str | None, limit: int) -> dict:
    if not 1 <= limit <= 10000:
        raise bad_request("'limit' must be between 1 and 10000", param="limit")
    if after is not None:
        ids = [item["id"] for item in items]
        items = items[ids.index(after) + 1:] if after in ids else []
    page = items[:limit]
    return {"object": "list", "data": page, "first_id": page[0]["id"] if page else None,
            "last_id": page[-1]["id"] if page else None, "has_more": len(items) > limit}


def create_batch_router(async_engine, state_dir, model_names, max_in_flight: int = 64,
                        max_file_bytes: int = 512 << 20) -> APIRouter:
    """The /v1/files and /v1/batches routes, running batches on `async_engine` (an AsyncEngine).

    Mount with `app.include_router(router)` on an app that turns APIError into responses (the server's does)
    and starts the engine in its lifespan; the router's own lifespan, nested inside, resumes batches from
    `state_dir` at startup and stops them (resumable) at shutdown. `model_names`: what a body's model may be.
    """
    import contextlib

    store = BatchStore(async_engine, Path(state_dir), tuple(model_names), max_in_flight, max_file_bytes)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        store.load_all()
        try:
            yield
        finally:
            await store.stop_all()

    router = APIRouter(lifespan=lifespan)

    @router.post("/v1/files")
    async def upload_file(request: Request):
        return await store.receive_upload(request)

    @router.get("/v1/files")
    async def list_files(purpose: str | None = None, after: str | None = None, limit: int = 10000):
        return _page(store.list_files(purpose), after, limit)

    @router.get("/v1/files/{file_id}")
    async def retrieve_file(file_id: str):
        return store.file_meta(file_id)

    @router.get("/v1/files/{file_id}/content")
    async def file_content(file_id: str):
        meta = store.file_meta(file_id)
        return FileResponse(store.data_path(file_id), media_type="application/octet-stream",
                            filename=meta["filename"])

    @router.delete("/v1/files/{file_id}")
    async def delete_file(file_id: str):
        store.delete_file(file_id)
        return {"id": file_id, "object": "file", "deleted": True}

    @router.post("/v1/batches")
    async def create_batch(request: Request):
        try:
            body = json.loads(await request.body())
        except ValueError:
            raise bad_request("the request body is not valid JSON", code="invalid_json") from None
        if not isinstance(body, dict):
            raise bad_request("the request body must be a JSON object")
        return JSONResponse(store.create(body))

    @router.get("/v1/batches")
    async def list_batches(after: str | None = None, limit: int = 20):
        batches = sorted((r["batch"] for r in store.batches.values()), key=lambda b: (b["created_at"], b["id"]),
                         reverse=True)
        return _page(batches, after, limit)

    @router.get("/v1/batches/{batch_id}")
    async def retrieve_batch(batch_id: str):
        return store.get(batch_id)

    @router.post("/v1/batches/{batch_id}/cancel")
    async def cancel_batch(batch_id: str):
        return await store.cancel(batch_id)

    return router
