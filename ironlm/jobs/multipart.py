"""A streaming multipart/form-data parser for file uploads, so an upload never has to fit in memory.

(python-multipart, which FastAPI's UploadFile needs, is not a dependency of ironlm.)
"""
import re
from pathlib import Path

from ironlm.server.protocol import APIError, bad_request

MAX_FIELD_BYTES = 1024
MAX_HEADER_BYTES = 16384


class MultipartParser:
    """Incremental multipart/form-data parser: the part named "file" goes to `data_path`, small fields to
    `fields`. Memory stays bounded by the chunk size, whatever the upload's size."""

    def __init__(self, boundary: bytes, data_path: Path, max_file_bytes: int):
        self.delimiter = b"\r\n--" + boundary
        self.data_path = data_path
        self.max_file_bytes = max_file_bytes
        self.buffer = b"\r\n"  # lets the first boundary match the same pattern as the others
        self.state = "preamble"
        self.fields: dict[str, str] = {}
        self.filename: str | None = None
        self.name: str | None = None
        self.value = bytearray()
        self.sink = None
        self.num_file_bytes = 0

    def feed(self, chunk: bytes) -> None:
        self.buffer += chunk
        while self._step():
            pass

    def _step(self) -> bool:
        buf = self.buffer
        if self.state == "preamble":
            index = buf.find(self.delimiter)
            if index < 0:
                self.buffer = buf[-len(self.delimiter):]
                return False
            self.buffer, self.state = buf[index + len(self.delimiter):], "boundary"
            return True
        if self.state == "boundary":
            if len(buf) < 2:
                return False
            if buf[:2] == b"--":
                self.state = "end"
                return False
            if buf[:2] != b"\r\n":
                raise bad_request("the multipart body is malformed")
            self.buffer, self.state = buf[2:], "headers"
            return True
        if self.state == "headers":
            index = buf.find(b"\r\n\r\n")
            if index < 0:
                if len(buf) > MAX_HEADER_BYTES:
                    raise bad_request("a multipart part's headers are too long")
                return False
            headers = buf[:index].decode("utf-8", "replace")
            self.buffer, self.state = buf[index + 4:], "body"
            name = re.search(r'[; ]name="([^"]*)"', headers)
            filename = re.search(r'filename="([^"]*)"', headers)
            self.name = name.group(1) if name else None
            self.value = bytearray()
            if self.name == "file" and filename is not None:
                self.filename = Path(filename.group(1)).name[:255] or "upload.jsonl"
                self.sink = open(self.data_path, "wb")
            return True
        if self.state == "body":
            index = buf.find(self.delimiter)
            keep = len(self.delimiter) if index < 0 else 0
            data = buf[:index] if index >= 0 else buf[:max(0, len(buf) - keep)]
            self._write(data)
            if index < 0:
                self.buffer = buf[len(data):]
                return False
            self._end_part()
            self.buffer, self.state = buf[index + len(self.delimiter):], "boundary"
            return True
        return False

    def _write(self, data: bytes) -> None:
        if self.sink is not None:
            self.num_file_bytes += len(data)
            if self.num_file_bytes > self.max_file_bytes:
                raise APIError(413, f"the file is larger than {self.max_file_bytes} bytes", "invalid_request_error",
                               "file", "file_too_large")
            self.sink.write(data)
        elif self.name is not None:
            self.value += data
            if len(self.value) > MAX_FIELD_BYTES:
                raise bad_request(f"the form field '{self.name}' is too long", param=self.name)

    def _end_part(self) -> None:
        if self.sink is not None:
            self.sink.close()
            self.sink = None
        elif self.name is not None:
            self.fields[self.name] = self.value.decode("utf-8", "replace")

    def close(self) -> None:
        if self.state != "end":
            raise bad_request("the multipart body ended early")

    def discard(self) -> None:
        if self.sink is not None:
            self.sink.close()
            self.sink = None
        self.data_path.unlink(missing_ok=True)
