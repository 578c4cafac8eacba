"""``diffgen serve``: the OpenAI-compatible HTTP server (see docs/server.md)."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import time
from typing import Any

from diffgen.errors import DiffgenError

API_KEY_ENV = "DIFFGEN_API_KEY"
SERVE_DEFAULTS = {"host": "127.0.0.1", "port": 30000, "output_dir": "outputs/server", "max_queue": 64,
                  "max_batch_size": 4, "shutdown_timeout": 30.0, "log_level": "info", "max_upload_mb": 200.0,
                  "image_ttl": 3600.0}


def add_serve_parser(subparsers: Any) -> argparse.ArgumentParser:
    """The ``serve`` command: the model options of ``generate`` plus the server's own."""
    from diffgen.entrypoints.cli import add_model_arguments

    serve = subparsers.add_parser("serve", help="run the OpenAI-compatible HTTP server", argument_default=None)
    add_model_arguments(serve)
    group = serve.add_argument_group("server")
    group.add_argument("--host", help=f"address to listen on (default {SERVE_DEFAULTS['host']}; 0.0.0.0 for all)")
    group.add_argument("--port", type=int, help=f"port (default {SERVE_DEFAULTS['port']})")
    group.add_argument("--output-dir", help="folder for video files, URL images and the job database "
                       f"(default {SERVE_DEFAULTS['output_dir']})")
    group.add_argument("--max-queue", type=int, help="jobs that may wait for the GPU; more get HTTP 429 "
                       f"(default {SERVE_DEFAULTS['max_queue']})")
    group.add_argument("--max-batch-size", type=int, help="compatible waiting jobs dispatched together "
                       f"(default {SERVE_DEFAULTS['max_batch_size']})")
    group.add_argument("--api-key", help=f"require 'Authorization: Bearer <key>' (or set {API_KEY_ENV})")
    group.add_argument("--served-model-name", help="model id reported by /v1/models (default: --model-path)")
    group.add_argument("--shutdown-timeout", type=float, help="seconds to let running jobs finish on SIGTERM "
                       f"(default {SERVE_DEFAULTS['shutdown_timeout']:g})")
    group.add_argument("--max-upload-mb", type=float, help="largest multipart request (all uploaded files "
                       f"and fields) in MiB; larger gets HTTP 413 (default {SERVE_DEFAULTS['max_upload_mb']:g})")
    group.add_argument("--image-ttl", type=float, help="seconds an image made for response_format=url stays "
                       f"downloadable before it is deleted (default {SERVE_DEFAULTS['image_ttl']:g})")
    group.add_argument("--log-level", choices=["critical", "error", "warning", "info", "debug"],
                       help="server log level (default info)")
    return serve


def run_serve(options: dict[str, Any]) -> int:
    """Start the server and block until it is stopped (SIGINT / SIGTERM)."""
    import uvicorn

    from diffgen.entrypoints.cli import MODEL_OPTIONS
    from diffgen.entrypoints.http import ServerConfig, create_app

    values = {**SERVE_DEFAULTS, **{k: v for k, v in options.items() if v is not None}}
    if not values.get("model_path"):
        raise DiffgenError("--model-path is required (a hub id like black-forest-labs/FLUX.1-dev or a folder)")
    for name, low in (("port", 0), ("max_queue", 1), ("max_batch_size", 1)):
        if not isinstance(values[name], int) or values[name] < low or (name == "port" and values[name] > 65535):
            raise DiffgenError(f"--{name.replace('_', '-')}: {values[name]!r} is not a valid value")
    if float(values["shutdown_timeout"]) < 0:
        raise DiffgenError("--shutdown-timeout must not be negative")
    for name in ("max_upload_mb", "image_ttl"):
        if not float(values[name]) > 0:
            raise DiffgenError(f"--{name.replace('_', '-')}: {values[name]!r} must be positive")
    api_key = values.get("api_key") or os.environ.get(API_KEY_ENV) or None
    engine_options = {k: values[k] for k in MODEL_OPTIONS if k != "model_path" and values.get(k) is not None}
    config = ServerConfig(
        model_path=values["model_path"], engine_options=engine_options, output_dir=values["output_dir"],
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
