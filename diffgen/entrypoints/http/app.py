"""The FastAPI application: lifecycle, authentication, the error envelope, health and metrics.

The HTTP process never runs the model. It holds an Engine (whose worker processes hold the model),
validates requests against the model's spec, submits them and awaits the outcome without blocking
the event loop. It uses only the Engine's public API (``diffgen.engine``).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import re
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from diffgen.engine import (
    Engine,
    GenerationRequest,
    GenerationResult,
    JobError,
    ModelSpec,
    NotReadyError,
    QueueFullError,
    resolve,
)
from diffgen.entrypoints.http.events import ProgressBoard
from diffgen.entrypoints.http.job_store import JobStoreUnavailable, LeaseKeeper, open_job_store
from diffgen.entrypoints.http.jobs import ImageFiles, VideoJobs
from diffgen.entrypoints.http.output_store import OutputStoreUnavailable, open_output_store
from diffgen.entrypoints.http.schemas import MAX_BODY_BYTES, APIError
from diffgen.errors import InvalidRequestError

logger = logging.getLogger(__name__)

# Image content URLs are capability URLs (a random 128-bit id), fetchable without the API key like
# the signed URLs of the OpenAI API: a browser or `requests.get(url)` can download them.
# Always fullmatch: "$" would also match before a final newline ("/content%0A").
_PUBLIC_PATHS = re.compile(r"/v1/images/img_[0-9a-f]{32}/content")
# Paths outside /v1/ that need the API key: they show the model path, worker PIDs, errors.
_PROTECTED_PATHS = {"/server_info"}
# No route has a control character or a space in its path: such paths are refused before routing.
_BAD_PATH = re.compile(r"[\x00-\x20\x7f]")
# HTTP status for each way a job can fail.
_JOB_ERROR_STATUS = {"invalid_request": 400, "cancelled": 409, "out_of_memory": 503, "worker_died": 503,
                     "shutdown": 503, "generation_error": 500}
# Job failures that the same request would meet again. The openai client retries 409 and 5xx twice by
# default (each retry a full run on the GPU) unless the response says `x-should-retry: false`.
_NOT_RETRYABLE = {"invalid_request", "cancelled", "out_of_memory", "worker_died", "generation_error"}
# After --shutdown-timeout: seconds for cancelled jobs to stop and the worker to exit before it is killed.
SHUTDOWN_GRACE_S = 5.0
# The playground page's files (served at / and /playground/<name>); nothing else of the folder is served.
PLAYGROUND_DIR = Path(__file__).parent / "playground"
PLAYGROUND_FILES = {"playground.js": "text/javascript", "playground.css": "text/css"}
# The status nginx logs for a client that closed the connection before the answer (never sent).
CLIENT_CLOSED_REQUEST = 499


@dataclass
class ServerConfig:
    model_path: str
    #: the other model options of ``diffgen generate`` (device, dtype, revision, attention_backend,
    #: compile, quantize, ...), passed as they are to Engine.from_pretrained in the worker.
    engine_options: dict[str, Any] = field(default_factory=dict)
    output_dir: str = "outputs/server"
    max_queue: int = 64
    max_batch_size: int = 4
    batch_wait_cap: float | None = None  # None: the --batch-wait-cap default (diffgen.options)
    api_key: str | None = None
    shutdown_timeout: float = 30.0
    served_model_name: str | None = None
    max_body_bytes: int = MAX_BODY_BYTES  # whole multipart request
    image_ttl: float = 3600.0  # seconds an image made for response_format=url stays downloadable
    #: the base of the URLs of response_format=url images, e.g. https://images.example.com; None: the
    #: address the server is bound to (never the client's Host header)
    public_url: str | None = None
    #: where outputs go: None (the output folder) or s3://bucket/prefix
    output_store: str | None = None
    s3_endpoint_url: str | None = None  # None: AWS_ENDPOINT_URL or AWS itself
    #: the base of public URLs for objects of an S3 output store; None: presigned URLs (valid image_ttl seconds)
    s3_public_url: str | None = None
    #: where video jobs are kept: None (<output_dir>/jobs.sqlite3), sqlite:///path or postgresql://...
    job_store: str | None = None
    job_lease: float = 30.0  # seconds without a heartbeat after which a replica counts as dead

    def build_engine(self) -> Engine:
        """The Engine ``diffgen serve`` runs: the model in worker processes behind a bounded queue."""
        return Engine.with_workers(self.model_path, max_queue=self.max_queue, max_batch_size=self.max_batch_size,
                                   batch_wait_cap=self.batch_wait_cap, **self.engine_options)


class ServerState:
    """Everything the routes share: config, engine, job store, metrics."""

    def __init__(self, config: ServerConfig, engine: Engine | None = None):
        self.config = config
        self.engine = engine or config.build_engine()
        self.metrics = self.engine.metrics
        self.metrics.describe("diffgen_http_requests_total", "counter", "HTTP requests by route and status")
        self.metrics.describe("diffgen_client_disconnects_total", "counter",
                              "Requests whose client left before sending the whole body")
        outputs = open_output_store(config.output_store, config.output_dir, s3_endpoint_url=config.s3_endpoint_url,
                                    url_ttl=config.image_ttl, public_base_url=config.s3_public_url)
        self.store = open_job_store(config.job_store, config.output_dir, lease=config.job_lease)
        self.progress = ProgressBoard()  # live progress of this server's jobs, for the SSE streams
        self.videos = VideoJobs(self.store, outputs, self.engine, self.metrics, staging_dir=config.output_dir,
                                listener=self.progress.on_event)
        self.lease = LeaseKeeper(self.store, on_beat=self.videos.on_beat)
        self.images = ImageFiles(outputs, config.output_dir, ttl=config.image_ttl)
        self.model_id = config.served_model_name or config.model_path
        self._probe: asyncio.Future | None = None  # the /health_generate generation in flight
        #: time.monotonic() of the SIGTERM / Ctrl-C (set by `diffgen serve`); --shutdown-timeout counts from it
        self.shutdown_started: float | None = None

    def start(self) -> None:
        for code, ids in self.videos.recover().items():
            logger.warning("marked %d unfinished video job(s) of a previous run as failed (%s)", len(ids), code)
        self.lease.start()
        self.images.sweep()
        self.engine.start()

    def stop(self) -> None:
        # uvicorn has already spent part of --shutdown-timeout on open requests: the scheduler gets the
        # rest, so that the whole shutdown takes about --shutdown-timeout + SHUTDOWN_GRACE_S.
        started = self.shutdown_started or time.monotonic()
        remaining = max(0.0, started + self.config.shutdown_timeout - time.monotonic())
        self.engine.shutdown(remaining, grace=SHUTDOWN_GRACE_S)
        self.engine.close()
        self.videos.close()  # waits for MP4s of jobs that finished
        self.lease.stop()
        try:
            self.videos.on_beat()  # outcomes the job store missed, if it is back
            left = self.store.release()
            if left:
                logger.warning("marked %d unfinished video job(s) as failed (shutdown)", len(left))
        except JobStoreUnavailable as e:  # other replicas fail this one's unfinished jobs when its lease expires
            logger.error("cannot release this replica's jobs: %s", e)
        self.store.close()
        logger.info("diffgen serve stopped")

    def status(self) -> str:
        status = self.engine.status()
        return "ok" if status.ready else ("failed" if status.failed or status.load_error else "loading")

    async def probe(self) -> float:
        """Run a tiny generation (see probe_request) and return its seconds; concurrent callers share one."""
        if self._probe is None or self._probe.done():
            self._probe = asyncio.ensure_future(self._run_probe())
        return await asyncio.shield(self._probe)

    async def _run_probe(self) -> float:
        spec = self.require_ready()
        start = time.monotonic()
        await self.run(self.resolve(probe_request(spec)), f"health_{uuid.uuid4().hex}")
        return time.monotonic() - start

    def model_names(self) -> set[str]:
        names = {self.model_id, self.config.model_path, Path(self.config.model_path).name}
        if self.spec is not None:
            names.add(self.spec.name)
        return names

    @property
    def spec(self) -> ModelSpec | None:
        """The served model's spec; None before the engine has started."""
        return self.engine.executor.spec

    def require_ready(self) -> ModelSpec:
        status = self.engine.status()
        if self.spec is None or not status.ready:
            raise submission_error(NotReadyError(status.load_error or "the model is still loading"),
                                   final=status.failed)
        return self.spec

    def check_model(self, model: str | None) -> None:
        if model is not None and model not in self.model_names():
            raise APIError(404, f"The model '{model}' is not served here; this server serves '{self.model_id}'.",
                           param="model", code="model_not_found")

    def resolve(self, request: GenerationRequest) -> GenerationRequest:
        """The request with the model's defaults filled in and checked as the pipeline will check it,
        without the weights: bad input is refused here and never reaches the GPU."""
        spec = self.require_ready()
        try:
            return resolve(request, spec)
        except InvalidRequestError as e:
            if e.field in ("width", "height") and request.width is not None and request.height is not None:
                # over HTTP both sides come from the one field a client sends: name that field
                size = f"{request.width}x{request.height}"
                raise APIError(400, f"size: {size}: {e}", param="size", code="invalid_value") from None
            raise APIError(400, str(e), param=e.field, code="invalid_value") from None

    async def run(self, request: GenerationRequest, job_id: str,
                  http_request: Request | None = None) -> GenerationResult:
        """Queue ``request`` and wait for its result; failures become API errors. When the client of
        ``http_request`` (whose body must have been read) disconnects meanwhile, the job is cancelled, so
        that an abandoned request does not hold the GPU."""
        job = self.submit(request, job_id)
        # asyncio.wait does not cancel ``waiter`` (and so job.future) when this task is cancelled: the
        # scheduler alone finishes the job.
        waiter = asyncio.wrap_future(job.future)
        gone = asyncio.ensure_future(_disconnected(http_request)) if http_request is not None else None
        try:
            await asyncio.wait({waiter, gone} if gone else {waiter}, return_when=asyncio.FIRST_COMPLETED)
            if not waiter.done():
                logger.info("the client of %s disconnected: cancelling its job", job_id)
                self.engine.cancel(job.id)  # the job then ends as cancelled (a 409 sent to nobody)
            return await waiter
        except JobError as e:
            status = _JOB_ERROR_STATUS.get(e.code, 500)
            headers = {"x-should-retry": "false"} if e.code in _NOT_RETRYABLE else {}
            raise APIError(status, e.message, param=e.param, code=e.code, headers=headers,
                           type="invalid_request_error" if status < 500 else "server_error") from None
        except asyncio.CancelledError:  # the serving task was cancelled (shutdown): free the worker
            self.engine.cancel(job.id)
            raise
        finally:
            if gone is not None:
                gone.cancel()

    def submit(self, request: GenerationRequest, job_id: str, **kwargs: Any):
        try:
            return self.engine.submit(request, job_id=job_id, **kwargs)
        except (QueueFullError, NotReadyError) as e:
            raise submission_error(e, final=self.engine.status().failed) from None

    async def create_video(self, *args: Any) -> dict[str, Any]:
        """VideoJobs.create off the event loop (SQLite), with refusals answered as by ``submit``."""
        try:
            return await asyncio.to_thread(self.videos.create, *args)
        except (QueueFullError, NotReadyError) as e:
            raise submission_error(e, final=self.engine.status().failed) from None


async def _disconnected(request: Request) -> None:
    """Return once the client has disconnected. Once the body is read, the next ASGI message is
    http.disconnect. (Not Request.is_disconnected: under BaseHTTPMiddleware it never sees it.)"""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def submission_error(error: QueueFullError | NotReadyError, final: bool = False) -> APIError:
    """The API error for a submission the scheduler refused: 429 (retry later) or 503 (not ready);
    ``final``: no worker will ever be ready (load failure, restart limit): retrying is pointless."""
    if isinstance(error, QueueFullError):
        return APIError(429, f"The server is busy: {error}.", code="queue_full", type="rate_limit_error",
                        headers={"Retry-After": str(error.retry_after)})
    if final:
        return APIError(503, f"unavailable: {error}", code="model_not_ready", type="server_error",
                        headers={"x-should-retry": "false"})
    return APIError(503, f"not ready: {error}; retry later", code="model_not_ready", type="server_error",
                    headers={"Retry-After": "5"})


def error_response(error: APIError, request_id: str | None = None) -> JSONResponse:
    headers = dict(error.headers)
    if request_id:
        headers["x-request-id"] = request_id
    return JSONResponse(error.body(), status_code=error.status, headers=headers)


def create_app(config: ServerConfig, engine: Engine | None = None) -> FastAPI:
    """The app over ``engine`` (default: ``config.build_engine()``), started by the app's lifespan."""
    from diffgen.entrypoints.http.lora_routes import router as lora_router
    from diffgen.entrypoints.http.openai_routes import router

    state = ServerState(config, engine)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        state.start()
        yield
        await asyncio.to_thread(state.stop)

    app = FastAPI(title="diffgen", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.diffgen = state

    @app.middleware("http")
    async def request_frame(request: Request, call_next):
        request.state.request_id = f"req_{uuid.uuid4().hex}"
        path = request.scope["path"]  # not request.url.path: urlsplit drops tabs and newlines from it
        if _BAD_PATH.search(path):
            response = error_response(APIError(404, "Not Found", code="not_found"))
        elif needs_key(path) and not _authorized(request, config.api_key):
            response = error_response(APIError(
                401, "Incorrect or missing API key: send the header 'Authorization: Bearer <key>'.",
                code="invalid_api_key", type="authentication_error"))
        else:
            try:
                response = await call_next(request)
            except ClientDisconnect:  # the client went away (or stalled) before sending its whole body
                logger.info("client disconnected during %s %s", request.method, path)
                state.metrics.inc("diffgen_client_disconnects_total")
                response = Response(status_code=CLIENT_CLOSED_REQUEST)  # nobody reads it; for the metrics
            except Exception as error:  # answered here, not by Starlette's outermost handler, so that
                response = internal_error(request, error)  # it is counted and carries x-request-id
        response.headers.setdefault("x-request-id", request.state.request_id)
        route = request.scope.get("route")
        state.metrics.inc("diffgen_http_requests_total", route=getattr(route, "path", "unmatched"),
                          method=request.method, status=str(response.status_code))
        return response

    @app.exception_handler(APIError)
    async def api_error(request: Request, error: APIError):
        return error_response(error)

    @app.exception_handler(OutputStoreUnavailable)
    async def output_store_error(request: Request, error: OutputStoreUnavailable):
        logger.error("%s %s: %s", request.method, request.scope["path"], error)
        return error_response(APIError(503, f"{error}; retry later", code="output_store_unavailable",
                                       type="server_error", headers={"retry-after": "5"}))

    @app.exception_handler(JobStoreUnavailable)
    async def job_store_error(request: Request, error: JobStoreUnavailable):
        logger.error("%s %s: %s", request.method, request.scope["path"], error)
        return error_response(APIError(503, f"{error}; retry later", code="job_store_unavailable",
                                       type="server_error", headers={"retry-after": "5"}))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, error: RequestValidationError):
        first = error.errors()[0] if error.errors() else {"loc": (), "msg": "invalid request"}
        param = ".".join(str(p) for p in first["loc"] if p not in ("body", "query", "path")) or None
        return error_response(APIError(400, f"{param}: {first['msg']}" if param else first["msg"], param=param))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException):
        codes = {404: "not_found", 405: "method_not_allowed"}
        return error_response(APIError(error.status_code, str(error.detail), code=codes.get(error.status_code)))

    @app.exception_handler(Exception)
    async def unexpected_error(request: Request, error: Exception):
        return internal_error(request, error)  # a fallback: request_frame answers route errors

    def needs_key(path: str) -> bool:
        return bool(config.api_key) and ((path.startswith("/v1/") and not _PUBLIC_PATHS.fullmatch(path))
                                         or path in _PROTECTED_PATHS)

    @app.get("/liveness")
    async def liveness():
        """200 as soon as the process answers HTTP, model loaded or not."""
        return {"status": "alive"}

    @app.get("/health")
    async def health():
        """Open to probes, so it says only whether requests can be served; details: /server_info."""
        return JSONResponse({"status": state.status()}, status_code=200 if state.engine.status().ready else 503)

    @app.get("/health_generate")
    async def health_generate():
        """200 only when a tiny generation (see probe_request) succeeds end to end."""
        seconds = await state.probe()
        return {"status": "ok", "seconds": round(seconds, 3)}

    @app.get("/server_info")
    async def server_info():
        """The details /health leaves out (behind the API key when one is set)."""
        status, spec = state.engine.status(), state.spec
        return {"status": state.status(), "model": state.model_id, "model_path": config.model_path,
                "output_kind": spec.output_kind if spec else None, "task_type": spec.task_type if spec else None,
                "device": status.device, "queue_depth": status.queue_depth, "running": status.running,
                "max_queue": config.max_queue, "worker_pids": status.worker_pids,
                "worker_groups": status.worker_groups, "worker_restarts": status.restarts,
                "error": status.load_error, "replica_id": state.store.replica.id, "job_store": state.store.describe()}

    @app.get("/", include_in_schema=False)
    async def playground():
        """The playground page (files in the package, no build step); it calls the public API like any client."""
        return FileResponse(PLAYGROUND_DIR / "index.html", media_type="text/html")

    @app.get("/playground/{name}", include_in_schema=False)
    async def playground_file(name: str):
        if name not in PLAYGROUND_FILES:
            raise APIError(404, f"No playground file '{name}'.", code="not_found")
        return FileResponse(PLAYGROUND_DIR / name, media_type=PLAYGROUND_FILES[name])

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(state.metrics.render(), media_type="text/plain; version=0.0.4")

    app.include_router(router)
    app.include_router(lora_router)
    return app


def probe_request(spec: ModelSpec) -> GenerationRequest:
    """A small request that runs every stage of the model: its fewest steps, ~64 px, one frame, gray input
    images where it needs some."""
    from PIL import Image

    side = -(-64 // spec.size_multiple) * spec.size_multiple
    return GenerationRequest.build(
        "a health check", height=side, width=side, seed=0,
        num_inference_steps=None if spec.distilled_timesteps else spec.min_steps,
        num_frames=1 if spec.output_kind == "video" else None,
        images=[Image.new("RGB", (side, side), (127, 127, 127))] * spec.min_images)


def internal_error(request: Request, error: Exception) -> JSONResponse:
    logger.error("unexpected error on %s %s", request.method, request.url.path, exc_info=error)
    return error_response(APIError(500, f"internal server error: {type(error).__name__}", type="server_error",
                                   code="internal_error"), getattr(request.state, "request_id", None))


def _authorized(request: Request, api_key: str) -> bool:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), api_key.encode())
