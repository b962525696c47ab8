"""The FastAPI app over one ``Llama`` (``create_app``), and running it: ``serve`` (what ``llama2 serve`` runs) and
``running_server`` (a server on a background thread, for tests and benchmarks)."""
from __future__ import annotations

import contextlib
import logging
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..generate import Engine, Llama
from .batching import BatchingLoop
from . import endpoints
from .endpoints import Server
from .protocol import APIError, ChatRequest, CompletionRequest, model_card, validation_error

__all__ = ["create_app", "running_server", "serve"]

log = logging.getLogger("llama2.serve")


def create_app(llama: Llama, model_name: str = "llama2", max_batch: int = 8, max_seq_len: int | None = None,
               compile: bool | None = False) -> FastAPI:
    """The FastAPI app over ``llama`` (a ``Llama`` with a tokenizer): one ``Engine`` of ``max_batch`` slots of
    ``max_seq_len`` positions (default: the model's context), driven by a ``BatchingLoop`` that starts and stops
    with the app (``app.state.batcher``).

    ``compile`` is passed to the engine. The default is False, not the engine's None (compile once eager steps
    would have paid for it): a compile stalls every request in flight for its whole duration, and the batch size
    of a server changes from step to step (one more graph each), so a server compiles only when asked to.
    """
    if llama.tokenizer is None:
        raise ValueError("the checkpoint has no tokenizer; the server needs one to read and write text")
    engine = Engine(llama.model, llama.tokenizer, max_batch=max_batch, max_seq_len=max_seq_len, compile=compile)
    batcher = BatchingLoop(engine)
    server = Server(llama, batcher, model_name)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        batcher.start()
        try:
            yield
        finally:
            batcher.stop()

    app = FastAPI(title="llama2", summary="An OpenAI-compatible server over a Llama 2 checkpoint", lifespan=lifespan)
    app.state.batcher, app.state.server = batcher, server

    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError):
        return e.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, e: RequestValidationError):
        return validation_error(e.errors()).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException):
        return APIError(e.status_code, str(e.detail), code="not_found" if e.status_code == 404 else None).response(
            getattr(e, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, e: Exception):
        log.exception("unexpected error on %s", request.url.path)
        return APIError(500, f"internal error: {type(e).__name__}: {e}", type="server_error").response()

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": model_name, "max_batch": max_batch, "running": batcher.running,
                "waiting": batcher.waiting, "free_slots": batcher.free_slots, "context": server.context}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [model_card(model_name, server.created, server.context)]}

    @app.get("/v1/models/{name:path}")
    async def model(name: str):
        server.check_model(name)
        return model_card(model_name, server.created, server.context)

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatRequest, request: Request):
        return await endpoints.chat(server, req, request)

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request):
        return await endpoints.completions(server, req, request)

    return app


# -- running it ----------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def running_server(app: FastAPI, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning") -> Iterator[str]:
    """Run ``app`` under uvicorn on a background thread for the duration of a ``with`` block; yields the base URL
    (``http://host:port``). Port 0 takes a free port; the socket is bound here, before the thread starts, so the
    URL is valid at once and no other process can take the port in between. For tests and benchmarks."""
    import uvicorn

    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=5))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="uvicorn", daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server did not start")
            time.sleep(0.01)
        yield f"http://{host}:{port}"
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


def serve(ckpt: str | Path, host: str = "127.0.0.1", port: int = 8000, device: str = "cpu", max_batch: int = 8,
          *, dtype: str | None = None, model_name: str | None = None, max_seq_len: int | None = None,
          compile: bool | None = False, quantize: str | None = None, log_level: str = "info") -> None:
    """Load the checkpoint at ``ckpt`` and serve it over HTTP until interrupted (what ``llama2 serve`` runs).

    ``model_name``: the name clients pass as ``model`` (default: the checkpoint directory's name). ``max_batch``
    requests decode together (more wait for a free slot); the KV cache holds ``max_batch`` x ``max_seq_len``
    positions (default: the model's context), so lower either when memory is short. ``dtype``, ``quantize``: as
    ``Llama.from_pretrained``; ``compile``: see ``create_app``.
    """
    import uvicorn

    if max_batch < 1:
        raise ValueError(f"max_batch must be >= 1, got {max_batch}")
    llama = Llama.from_pretrained(ckpt, dtype=dtype, device=device, quantize=quantize)
    name = model_name or Path(ckpt).resolve().name
    app = create_app(llama, name, max_batch=max_batch, max_seq_len=max_seq_len, compile=compile)
    log.info("serving %s as %r on http://%s:%d (max_batch %d)", ckpt, name, host, port, max_batch)
    uvicorn.run(app, host=host, port=port, log_level=log_level)
