"""``diffgen serve``: the OpenAI-compatible HTTP server (see docs/server.md)."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import threading
import time
from typing import Any

from diffgen.errors import DiffgenError

API_KEY_ENV = "DIFFGEN_API_KEY"
logger = logging.getLogger(__name__)


def add_serve_parser(subparsers: Any) -> argparse.ArgumentParser:
    """The ``serve`` command: the model options of ``generate`` plus the server's own."""
    from diffgen.options import add_arguments

    serve = subparsers.add_parser("serve", help="run the OpenAI-compatible HTTP server",
                                  usage="%(prog)s --model-path PATH [options]", argument_default=None)
    add_arguments(serve, "serve")
    return serve


def check_public_url(url: str) -> str:
    """``--public-url`` without its trailing slash; an http(s) URL without query or fragment."""
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc or parts.query or parts.fragment:
        raise DiffgenError(f"--public-url: {url!r} must be an http:// or https:// URL such as "
                           "https://images.example.com (a path prefix is allowed; no query or fragment)")
    return url.rstrip("/")


def run_serve(options: dict[str, Any]) -> int:
    """Start the server and block until it is stopped (SIGINT / SIGTERM)."""
    import uvicorn

    from diffgen.entrypoints.cli import engine_options, require_model_path
    from diffgen.entrypoints.http import ServerConfig, create_app
    from diffgen.entrypoints.http.protocol import MAX_HEADER_BYTES, GuardedH11Protocol
    from diffgen.options import defaults

    values = {**defaults("server"), "log_level": "info", **{k: v for k, v in options.items() if v is not None}}
    model_path = require_model_path(values)
    api_key = values.get("api_key") or os.environ.get(API_KEY_ENV) or None
    config = ServerConfig(
        model_path=model_path, engine_options=engine_options(values), output_dir=values["output_dir"],
        max_queue=values["max_queue"], max_batch_size=values["max_batch_size"], batch_wait_cap=values["batch_wait_cap"],
        api_key=api_key, shutdown_timeout=float(values["shutdown_timeout"]),
        served_model_name=values.get("served_model_name"), max_body_bytes=int(float(values["max_upload_mb"]) * 2**20),
        image_ttl=float(values["image_ttl"]),
        public_url=check_public_url(values["public_url"]) if values.get("public_url") else None,
        output_store=values.get("output_store"), s3_endpoint_url=values.get("s3_endpoint_url"),
        s3_public_url=values.get("s3_public_url"), job_store=values.get("job_store"),
        job_lease=float(values["job_lease"]))
    logging.getLogger("diffgen").setLevel(values["log_level"].upper())
    engine = config.build_engine()
    # Reads the checkpoint's spec (a bad --model-path fails here, exit 2) and starts the worker; the
    # server answers /health ("loading") while the worker loads the weights.
    engine.start()
    app = create_app(config, engine)
    state = app.state.diffgen
    load_failed = threading.Event()

    class Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: Any) -> None:
            # --shutdown-timeout counts from the signal: uvicorn's wait for open requests and the
            # scheduler's wait for jobs share it instead of adding up.
            state.shutdown_started = state.shutdown_started or time.monotonic()
            super().handle_exit(sig, frame)

    protocol = GuardedH11Protocol.configured(header_timeout=float(values["header_timeout"]),
                                             body_timeout=float(values["body_timeout"]),
                                             max_connections=values["max_connections"])
    server = Server(uvicorn.Config(app, host=values["host"], port=values["port"], log_level=values["log_level"],
                                   timeout_graceful_shutdown=max(1, int(config.shutdown_timeout)), http=protocol,
                                   timeout_keep_alive=float(values["keep_alive_timeout"]),
                                   h11_max_incomplete_event_size=MAX_HEADER_BYTES))

    def stop_if_the_model_cannot_load() -> None:
        # A model that never loads leaves nothing to serve: exit non-zero (as `generate` does) instead
        # of answering 503 forever. A worker that dies after loading is restarted as before.
        if not engine.wait_loaded() and not state.shutdown_started:
            logger.error("the model cannot be loaded: %s", engine.status().load_error)
            load_failed.set()
            server.should_exit = True

    threading.Thread(target=stop_if_the_model_cannot_load, name="load-watch", daemon=True).start()
    with contextlib.suppress(KeyboardInterrupt):  # as uvicorn.run
        server.run()
    if load_failed.is_set():
        return 1
    return 0 if server.started else 3  # 3: uvicorn's exit status for a failed startup (port in use, ...)
