"""`ironlm serve`: load a model and serve the OpenAI API with uvicorn until SIGTERM/SIGINT."""
import argparse
import logging
import os
import signal
from pathlib import Path

import uvicorn

from ironlm.cli import add_model_arguments, load_llm
from ironlm.errors import IronlmError


def default_batch_dir() -> Path:
    data_home = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return Path(data_home) / "ironlm" / "batches"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    parser.add_argument("--max-num-seqs", type=int, default=64, help="sequences decoded together (default 64)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1, this machine only)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--api-key", default=os.environ.get("IRONLM_API_KEY"),
                        help="require 'Authorization: Bearer KEY' on every route but /health (default: $IRONLM_API_KEY)")
    parser.add_argument("--served-model-name", help="name the model answers to besides 'default' (default: its own)")
    parser.add_argument("--max-concurrent", type=int, default=64, help="requests generating at once (default 64)")
    parser.add_argument("--max-queue", type=int, default=256,
                        help="requests waiting for a slot; past this, 429 with Retry-After (default 256)")
    parser.add_argument("--max-body-bytes", type=int, default=4 << 20, help="request body limit (default 4 MiB)")
    parser.add_argument("--batch-dir", default=str(default_batch_dir()),
                        help="where /v1/files and /v1/batches keep their state; batches resume after a restart "
                             "(default: %(default)s)")
    parser.add_argument("--max-file-bytes", type=int, default=512 << 20, help="batch file upload limit (default 512 MiB)")
    parser.add_argument("--drain-timeout", type=float, default=30.0,
                        help="seconds to finish in-flight requests after SIGTERM (default 30)")
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])


def run(args: argparse.Namespace) -> int:
    """Serves until SIGTERM or SIGINT; then stops taking requests, drains, and returns 0."""
    from ironlm.server.app import ServerSettings

    settings = ServerSettings(api_key=args.api_key or None, max_concurrent=args.max_concurrent,
                              max_queue=args.max_queue, max_body_bytes=args.max_body_bytes,
                              served_model_name=args.served_model_name)
    settings.validate()
    if not 0 < args.port < 65536:
        raise IronlmError(f"--port {args.port} is not a TCP port; use 1..65535")
    with _batch_dir_lock(Path(args.batch_dir)):  # before the model loads: a refusal comes at once
        return _serve(args, settings)


def _batch_dir_lock(batch_dir: Path):
    """Two servers on one batch folder would both resume its unfinished batches, repeating their items."""
    from ironlm.jobs.resume import exclusive_lock

    try:
        batch_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise IronlmError(f"cannot create the batch folder {batch_dir}: {exc.strerror}; "
                          f"pass another --batch-dir") from None
    return exclusive_lock(batch_dir / "server.lock", lambda pid: f"another ironlm serve (pid {pid}) keeps its batches "
                                                                 f"in {batch_dir}; give this one its own --batch-dir")


def _serve(args: argparse.Namespace, settings) -> int:
    from ironlm.engine.async_engine import AsyncEngine
    from ironlm.jobs.batch_api import create_batch_router
    from ironlm.server.app import create_app

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    engine_settings = {"max_num_seqs": args.max_num_seqs}
    if args.max_num_seqs > 512:
        engine_settings["max_num_batched_tokens"] = args.max_num_seqs
    llm = load_llm(args, **engine_settings)
    async_engine = AsyncEngine(llm.engine)
    app = create_app(async_engine, settings)
    app.include_router(create_batch_router(async_engine, args.batch_dir, (app.state.server.model_name, "default"),
                                           max_file_bytes=args.max_file_bytes))
    # uvicorn's own deadline comes after ours, so open streams end with an error event and [DONE], not a cut
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                            timeout_graceful_shutdown=args.drain_timeout + 5, lifespan="on")
    server = _DrainingServer(config, app.state.server, args.drain_timeout)
    # uvicorn re-raises the signal it caught after shutting down; a no-op handler makes that a clean exit 0.
    signal.signal(signal.SIGTERM, lambda signum, frame: None)
    blocks = llm.engine.block_manager
    logging.getLogger(__name__).info(
        "serving %s on http://%s:%d/v1; the KV cache holds %d tokens in up to %.1f GiB (--kv-cache-memory to change)",
        app.state.server.model_name, args.host, args.port, blocks.num_blocks * blocks.block_size,
        llm.engine.kv_pool.nbytes / 2**30)
    server.run()
    return 0


class _DrainingServer(uvicorn.Server):
    """uvicorn.Server that, on shutdown, has the app refuse new work and end what is still open at the deadline."""

    def __init__(self, config: uvicorn.Config, app_server, drain_timeout_s: float):
        super().__init__(config)
        self.app_server = app_server
        self.drain_timeout_s = drain_timeout_s

    def handle_exit(self, sig, frame):
        if not self.app_server.draining:
            self.app_server.drain(self.drain_timeout_s)
        super().handle_exit(sig, frame)
