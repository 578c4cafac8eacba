"""``diffgen serve``: the OpenAI-compatible HTTP server (see docs/server.md)."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import time
from typing import Any

API_KEY_ENV = "DIFFGEN_API_KEY"


def add_serve_parser(subparsers: Any) -> argparse.ArgumentParser:
    """The ``serve`` command: the model options of ``generate`` plus the server's own."""
    from diffgen.options import add_arguments

    serve = subparsers.add_parser("serve", help="run the OpenAI-compatible HTTP server",
                                  usage="%(prog)s --model-path PATH [options]", argument_default=None)
    add_arguments(serve, "serve")
    return serve


def run_serve(options: dict[str, Any]) -> int:
    """Start the server and block until it is stopped (SIGINT / SIGTERM)."""
    import uvicorn

    from diffgen.entrypoints.cli import engine_options, require_model_path
    from diffgen.entrypoints.http import ServerConfig, create_app
    from diffgen.options import defaults

    values = {**defaults("server"), "log_level": "info", **{k: v for k, v in options.items() if v is not None}}
    model_path = require_model_path(values)
    api_key = values.get("api_key") or os.environ.get(API_KEY_ENV) or None
    config = ServerConfig(
        model_path=model_path, engine_options=engine_options(values), output_dir=values["output_dir"],
        max_queue=values["max_queue"], max_batch_size=values["max_batch_size"],
        api_key=api_key, shutdown_timeout=float(values["shutdown_timeout"]),
        served_model_name=values.get("served_model_name"), max_body_bytes=int(float(values["max_upload_mb"]) * 2**20),
        image_ttl=float(values["image_ttl"]))
    logging.getLogger("diffgen").setLevel(values["log_level"].upper())
    app = create_app(config)
    state = app.state.diffgen

    class Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: Any) -> None:
            # --shutdown-timeout counts from the signal: uvicorn's wait for open requests and the
            # scheduler's wait for jobs share it instead of adding up.
            state.shutdown_started = state.shutdown_started or time.monotonic()
            super().handle_exit(sig, frame)

    server = Server(uvicorn.Config(app, host=values["host"], port=values["port"], log_level=values["log_level"],
                                   timeout_graceful_shutdown=max(1, int(config.shutdown_timeout))))
    with contextlib.suppress(KeyboardInterrupt):  # as uvicorn.run
        server.run()
    return 0 if server.started else 3  # 3: uvicorn's exit status for a failed startup (port in use, ...)
