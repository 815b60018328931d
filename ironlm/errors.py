"""Errors a user can cause and fix. The CLI prints them as one line and exits 2; the server maps them to 400."""


class IronlmError(Exception):
    """Bad input: the message names what is wrong (file, field, value) and what to do."""


class ModelLoadError(IronlmError):
    """A model path, file or config that cannot be loaded."""


class RequestError(IronlmError):
    """A prompt or sampling parameter that cannot be served."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.param = param
        self.code = code
