"""The two completion endpoints, ``/v1/chat/completions`` and ``/v1/completions``, answered whole or streamed as
server-sent events ending with ``data: [DONE]``."""
from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse

from ..generate import Llama
from .batching import BatchingLoop, run_choices
from .choices import Choice, token_text
from .prompts import chat_prompt, completion_prompts, sampling_params
from .protocol import APIError, ChatRequest, CompletionRequest, error_body, sse, usage

__all__ = ["Server", "chat", "completions"]


@dataclass
class Server:
    """What the endpoints share: the model and tokenizer, the engine thread, the served name and context."""

    llama: Llama
    batcher: BatchingLoop
    model_name: str
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def tok(self):
        return self.llama.tokenizer

    @property
    def context(self) -> int:
        return self.batcher.engine.max_seq_len

    def check_model(self, name: str) -> None:
        if name != self.model_name:
            raise APIError(404, f"The model `{name}` does not exist; this server serves `{self.model_name}`",
                           param="model", code="model_not_found")

    def check(self, req: ChatRequest | CompletionRequest) -> None:
        """A request for another model, or with options the engine cannot honour, is refused before any work."""
        self.check_model(req.model)
        req.unsupported()


async def chat(server: Server, req: ChatRequest, request: Request):
    server.check(req)
    tok = server.tok
    prompt = chat_prompt(tok, server.context, req)
    n = req.n or 1
    max_tokens = req.max_completion_tokens or req.max_tokens
    params = [sampling_params(req, max_tokens, bool(req.logprobs), i) for i in range(n)]
    choices = [Choice(i, params[i].stop_strings, True, tok.eos_id) for i in range(n)]
    headers = {"X-Llama2-Dropped-Exchanges": str(prompt.dropped)} if prompt.dropped else None
    meta = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": server.model_name}
    gen = run_choices(server.batcher, [prompt.ids] * n, params, choices)

    def lp(ids: list[int], lps: list) -> dict | None:
        if not req.logprobs:
            return None
        content = []
        for t, x in zip(ids, lps):
            text, b = token_text(tok, t)
            content.append({"token": text, "logprob": x, "bytes": b, "top_logprobs": []})
        return {"content": content}

    if not req.stream:
        await _drain(request, gen)
        body = {**meta, "object": "chat.completion", "choices": [
            {"index": c.index, "message": {"role": "assistant", "content": c.text(tok)[0]},
             "logprobs": lp(c.shown_ids(), c.logprobs), "finish_reason": c.finish_reason} for c in choices],
            "usage": usage(len(prompt.ids), choices), "dropped_exchanges": prompt.dropped}
        return JSONResponse(body, headers=headers)

    def chunk(parts: list[dict], **extra) -> str:
        return sse({**meta, "object": "chat.completion.chunk", "choices": parts, **extra})

    def parts_of(touched: list[Choice]) -> list[dict]:
        parts = []
        for c in touched:
            text, k0, k1 = c.take_new(tok)
            if text or (req.logprobs and k1 > k0):
                parts.append({"index": c.index, "delta": {"content": text},
                              "logprobs": lp(c.ids[k0:k1], c.logprobs[k0:k1]), "finish_reason": None})
            if c.done:
                parts.append({"index": c.index, "delta": {}, "logprobs": None, "finish_reason": c.finish_reason})
        return parts

    first = chunk([{"index": c.index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                    "finish_reason": None} for c in choices], dropped_exchanges=prompt.dropped)
    tail = _usage_chunk(req, chunk, lambda: usage(len(prompt.ids), choices))
    return _event_stream(_events(gen, parts_of, chunk, first, tail), headers)


async def completions(server: Server, req: CompletionRequest, request: Request):
    server.check(req)
    tok = server.tok
    prompts = completion_prompts(tok, server.context, req)
    n = req.n or 1
    want_lp = req.logprobs is not None
    flat = [p.ids for p in prompts for _ in range(n)]  # OpenAI's order: choice = prompt index * n + sample index
    params = [sampling_params(req, req.max_tokens, want_lp, k % n) for k in range(len(flat))]
    choices = [Choice(k, params[k].stop_strings, False, tok.eos_id) for k in range(len(flat))]
    meta = {"id": f"cmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": server.model_name}
    gen = run_choices(server.batcher, flat, params, choices)
    prompt_tokens = sum(len(p.ids) for p in prompts)

    def lp(ids: list[int], lps: list, offset: int) -> dict | None:
        if not want_lp:
            return None
        tokens, offsets = [], []
        for t in ids:
            text, _ = token_text(tok, t)
            tokens.append(text)
            offsets.append(offset)
            offset += len(text)
        return {"tokens": tokens, "token_logprobs": list(lps), "top_logprobs": None, "text_offset": offsets}

    if not req.stream:
        await _drain(request, gen)
        body = {**meta, "object": "text_completion", "choices": [
            {"index": c.index, "text": c.text(tok)[0], "logprobs": lp(c.shown_ids(), c.logprobs, 0),
             "finish_reason": c.finish_reason} for c in choices], "usage": usage(prompt_tokens, choices)}
        return JSONResponse(body)

    def chunk(parts: list[dict], **extra) -> str:
        return sse({**meta, "object": "text_completion", "choices": parts, **extra})

    offset = [0] * len(choices)  # characters of text the reported tokens cover, per choice

    def parts_of(touched: list[Choice]) -> list[dict]:
        parts = []
        for c in touched:
            text, k0, k1 = c.take_new(tok)
            new_lp = lp(c.ids[k0:k1], c.logprobs[k0:k1], offset[c.index])
            if new_lp:
                offset[c.index] += sum(len(t) for t in new_lp["tokens"])
            if text or c.done or (want_lp and k1 > k0):
                parts.append({"index": c.index, "text": text, "logprobs": new_lp, "finish_reason": c.finish_reason})
        return parts

    tail = _usage_chunk(req, chunk, lambda: usage(prompt_tokens, choices))
    return _event_stream(_events(gen, parts_of, chunk, None, tail))


def _usage_chunk(req, chunk: Callable[..., str], usage_now: Callable[[], dict]) -> Callable[[], str | None]:
    """The stream's last chunk before [DONE]: the usage, when the client asked for it (``stream_options``)."""
    return lambda: chunk([], usage=usage_now()) if req.stream_options and req.stream_options.include_usage else None


async def _events(gen: AsyncIterator[list[Choice]], parts_of: Callable[[list[Choice]], list[dict]],
                  chunk: Callable[..., str], first: str | None, tail: Callable[[], str | None]) -> AsyncIterator[str]:
    """A streamed answer: ``first``, a chunk per step that produced something, ``tail()``, then [DONE]; a failure
    mid-stream is sent as an error event (the status line is long gone)."""
    if first is not None:
        yield first
    try:
        async for touched in gen:
            parts = parts_of(touched)
            if parts:
                yield chunk(parts)
        last = tail()
        if last is not None:
            yield last
    except APIError as e:
        yield sse(error_body(e.message, e.type, e.param, e.code))
    finally:
        await gen.aclose()
    yield "data: [DONE]\n\n"


def _event_stream(body: AsyncIterator[str], headers: dict[str, str] | None = None) -> StreamingResponse:
    """Server-sent events. On a client disconnect Starlette cancels the body generator, whose ``finally`` cancels
    the engine requests (they leave the batch before the next step)."""
    return StreamingResponse(body, media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", **(headers or {})})


async def _drain(request: Request, gen: AsyncIterator) -> None:
    """Run ``gen`` to the end for a non-streamed answer, but stop it (and with it the engine requests) if the
    client goes away first: Starlette does not cancel a plain endpoint on disconnect, so a task waits for the
    ASGI ``http.disconnect`` message and cancels the consumer."""
    async with _until_disconnected(request, gen) as events:
        async for _ in events:
            pass


@contextlib.asynccontextmanager
async def _until_disconnected(request: Request, gen: AsyncIterator) -> AsyncIterator[AsyncIterator]:
    consumer = asyncio.current_task()
    disconnected = False

    async def watch() -> None:
        nonlocal disconnected
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                disconnected = True
                consumer.cancel()
                return

    watcher = asyncio.create_task(watch())
    try:
        yield gen
    except asyncio.CancelledError:
        if disconnected:  # nobody to answer; the request's engine work is cancelled by gen's finally
            consumer.uncancel()
            raise APIError(499, "client closed the request") from None
        raise
    finally:
        watcher.cancel()
        await gen.aclose()
