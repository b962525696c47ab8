"""An OpenAI-compatible HTTP server over the continuous-batching engine (``llama2 serve``).

Every client library, chat UI and agent framework speaks the OpenAI API, so the server speaks it too:
``GET /health``, ``GET /v1/models``, ``POST /v1/chat/completions`` and ``POST /v1/completions``, with the OpenAI
response shapes (``usage``, ``finish_reason`` "stop" / "length"), server-sent events for ``stream=true`` ending with
``data: [DONE]``, and the OpenAI error shape ``{"error": {"message", "type", "param", "code"}}`` with a 4xx for every
bad request (never a 500 and never a dead server).

How it is put together:

* **One engine, one thread.** ``llama2.engine.Engine`` is not thread-safe and its ``step`` is long (a forward of
  the model), so a single background thread (``BatchingLoop``) owns it. HTTP handlers never touch the engine: they
  post "submit" and "cancel" commands to a queue, which the thread applies *between* decode steps (continuous
  batching: a new request joins the running batch at the next step, a finished or abandoned one leaves at once),
  and they receive each step's tokens on an ``asyncio.Queue`` through ``call_soon_threadsafe``. The event loop
  therefore never waits for a step, and the engine never waits for the network.
* **Chat is rendered exactly as ``llama2 chat`` renders it** (paper §3, Meta's ``chat_completion``): the dialog goes
  through ``llama2.chat.fit_prompt`` (the project's one policy for over-long dialogs: drop the oldest exchanges, keep
  the system message and the last user turn; the reply gets what is left) and then Meta's layout. Dropped exchanges
  are reported in the ``X-Llama2-Dropped-Exchanges`` header and in the body's ``dropped_exchanges`` field; a last
  message that fills the context alone is a 400 ``context_length_exceeded``. Messages holding the template's tags
  ([INST], [/INST], <<SYS>>, <</SYS>>) are refused with Meta's own message (``llama2.chat.UNSAFE_ERROR``): typed
  into a message they would forge an extra turn or system prompt.
* **Text as ``generate`` returns it.** A choice's text is the decoded tokens without the final EOS, cut before the
  first stop string (the engine reports a stop string, the caller cuts: see ``SamplingParams.stop_strings``); chat
  content is stripped as ``Llama.chat_completion`` strips it. Streams release text only when it can no longer change:
  not inside a multi-byte UTF-8 character (SentencePiece byte pieces) and not while the text ends with the start of a
  stop string, so the concatenated deltas equal the non-streamed text.

Defaults where the OpenAI API and the paper differ: sampling is Meta's chat default (temperature 0.6, top-p 0.9, as
``GenerationConfig``) rather than OpenAI's 1.0 / 1.0, since that is what Llama 2-Chat was tuned and evaluated with;
``max_tokens`` defaults to ``GenerationConfig``'s 256 for both endpoints, so a chat request without it is trimmed
exactly as ``llama2 chat`` trims it. The engine reports the sampled token's log-probability only, so
``top_logprobs`` (chat) and ``logprobs`` > 0 (completions) are refused rather than answered with fewer alternatives.

Library code never imports cli.py; ``llama2 serve`` calls ``serve``.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import queue
import re
import socket
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from .chat import UNSAFE_ERROR, fit_prompt, format_dialog, has_special_tags
from .engine import Engine, SamplingParams, StepOutput, find_stop
from .generation import GenerationConfig, Llama

__all__ = ["APIError", "BatchingLoop", "create_app", "running_server", "serve"]

log = logging.getLogger("llama2.serve")

_DEFAULTS = GenerationConfig()  # the project's sampling defaults (Meta's chat defaults) and reply budget


# -- errors in the OpenAI shape ------------------------------------------------------------------------------------
class APIError(Exception):
    """An error answered as OpenAI answers it: ``{"error": {"message", "type", "param", "code"}}``."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type

    def response(self, headers: dict[str, str] | None = None) -> JSONResponse:
        return JSONResponse(status_code=self.status, headers=headers, content=error_body(
            self.message, self.type, self.param, self.code))


def error_body(message: str, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


# -- request bodies ------------------------------------------------------------------------------------------------
class _Body(BaseModel):
    """Strict types (a string is not a number, 5.0 is not an int: a client sending them has a bug worth naming);
    unknown fields are ignored, as clients send fields of newer API versions."""

    model_config = ConfigDict(strict=True, extra="ignore")


class TextPart(_Body):
    type: Literal["text"]
    text: str


class ChatMessage(_Body):
    role: Literal["system", "developer", "user", "assistant"]
    """"developer" is the newer API's name for the system message."""
    content: str | list[TextPart]


class StreamOptions(_Body):
    include_usage: bool = False


class _Sampling(_Body):
    """Fields shared by both endpoints. ``None`` means the default (some clients send explicit nulls)."""

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    n: int | None = Field(None, ge=1, le=16)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None

    def unsupported(self) -> None:
        """Refuse options the engine cannot honour rather than silently ignore them."""
        for name in ("frequency_penalty", "presence_penalty"):
            if getattr(self, name):
                raise APIError(400, f"{name} is not supported by this server (only 0)", param=name,
                               code="unsupported_parameter")

    def stops(self) -> tuple[str, ...]:
        s = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return tuple(x for x in s if x)


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    """The newer name of max_tokens; wins when both are given."""
    logprobs: bool | None = False
    top_logprobs: int | None = Field(None, ge=0, le=20)


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = Field(None, ge=0, le=5)
    echo: bool | None = False
    suffix: str | None = None


# -- the engine thread ---------------------------------------------------------------------------------------------
Sink = Callable[[list[StepOutput] | BaseException], None]
"""Receives, on the engine thread, a request's tokens of one step (or the exception that ended it)."""


class Ticket:
    """A handle on one engine request, valid before the engine thread has even seen it."""

    __slots__ = ("rid",)

    def __init__(self) -> None:
        self.rid: int | None = None  # the engine's request id, set by the engine thread


class BatchingLoop:
    """Drives ``Engine.step`` on one background thread; other threads ``submit`` and ``cancel`` through a queue.

    Commands are applied between steps, so a request posted while a step runs joins the batch at the next step,
    and a cancelled one frees its slot before the next step (``Engine.cancel``). Counters (``submitted``,
    ``finished``, ``cancelled``, ``steps``) and the engine's occupancy (``running``, ``waiting``) are published after
    every step for ``/health`` and for tests; they are plain ints, read without a lock.
    """

    def __init__(self, engine: Engine):
        self.engine = engine
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._wake = threading.Event()
        self._sinks: dict[int, Sink] = {}  # engine request id -> where its tokens go (engine thread only)
        self._stop = False
        self._thread: threading.Thread | None = None
        self.submitted = self.finished = self.cancelled = self.steps = self.errors = 0
        self.running = self.waiting = 0

    # -- any thread ---------------------------------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._stop = False
            self._thread = threading.Thread(target=self._run, name="llama2-engine", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def submit(self, prompt: list[int], params: SamplingParams, sink: Sink) -> Ticket:
        ticket = Ticket()
        self._commands.put(("submit", ticket, prompt, params, sink))
        self._wake.set()
        return ticket

    def cancel(self, ticket: Ticket) -> None:
        self._commands.put(("cancel", ticket))
        self._wake.set()

    @property
    def free_slots(self) -> int:
        return self.engine.max_batch - self.running

    # -- the engine thread --------------------------------------------------------------------------------------
    def _apply_commands(self) -> None:
        while True:
            try:
                cmd = self._commands.get_nowait()
            except queue.Empty:
                return
            if cmd[0] == "submit":
                _, ticket, prompt, params, sink = cmd
                try:
                    ticket.rid = self.engine.submit(prompt, params)
                except Exception as e:  # noqa: BLE001 - a bad request fails alone (the handlers validate first)
                    sink(e)
                    continue
                self._sinks[ticket.rid] = sink
                self.submitted += 1
            else:
                rid = cmd[1].rid
                if rid is not None and rid in self._sinks:  # unknown: finished already, or its submit failed
                    del self._sinks[rid]
                    if self.engine.cancel(rid):
                        self.cancelled += 1

    def _publish(self) -> None:
        self.running, self.waiting = len(self.engine.running), len(self.engine.waiting)

    def _run(self) -> None:
        while not self._stop:
            self._wake.clear()  # before reading the queue: a command posted after this sets it again
            self._apply_commands()
            self._publish()
            if not self.engine.has_work():
                self._wake.wait(timeout=1.0)
                continue
            try:
                events = self.engine.step()
            except Exception as e:  # noqa: BLE001 - fail the requests in flight, keep the server alive
                log.exception("engine step failed; failing the %d request(s) in flight", len(self._sinks))
                self.errors += 1
                for rid, sink in list(self._sinks.items()):
                    self.engine.cancel(rid)
                    sink(e)
                self._sinks.clear()
                continue
            self.steps += 1
            by_request: dict[int, list[StepOutput]] = {}
            for ev in events:
                by_request.setdefault(ev.request_id, []).append(ev)
            for rid, outs in by_request.items():
                sink = self._sinks.get(rid)
                if outs[-1].finished:
                    self._sinks.pop(rid, None)
                    self.finished += 1
                if sink is not None:
                    sink(outs)
            self._publish()
        for sink in self._sinks.values():  # shutting down: nobody is left to produce their tokens
            sink(RuntimeError("the server is shutting down"))
        self._sinks.clear()


# -- one choice's text as its tokens arrive ---------------------------------------------------------------------------
def _held_back(text: str, stops: tuple[str, ...]) -> int:
    """How many trailing characters of ``text`` might be the beginning of a stop string (not safe to send yet)."""
    best = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:k]):
                best = k
                break
    return best


_BYTE_PIECE = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


def token_text(tokenizer, token_id: int) -> tuple[str, list[int]]:
    """A token as the OpenAI logprobs report it: its text (SentencePiece's "▁" as a space) and its UTF-8 bytes.
    A byte-fallback piece ("<0xE2>") is one byte of a character; its text is written "bytes:\\xe2" as OpenAI does."""
    piece = tokenizer.id_to_piece(token_id)
    m = _BYTE_PIECE.match(piece)
    if m:
        b = int(m.group(1), 16)
        return f"bytes:\\x{b:02x}", [b]
    if token_id in (tokenizer.bos_id, tokenizer.eos_id):
        return piece, list(piece.encode())
    text = piece.replace("\u2581", " ")
    return text, list(text.encode())


@dataclass
class _Choice:
    """The state of one choice (one engine request): its tokens, the text already sent, why it finished."""

    index: int
    stops: tuple[str, ...]
    strip: bool  # chat content is stripped, as Llama.chat_completion strips it
    eos_id: int
    ids: list[int] = field(default_factory=list)
    logprobs: list[float | None] = field(default_factory=list)
    sent: str = ""
    finish_reason: str | None = None
    engine_done: bool = False  # the engine finished it (else, once done, it is to be cancelled)

    def add(self, outs: list[StepOutput]) -> None:
        for o in outs:
            self.ids.append(o.token)
            self.logprobs.append(o.logprob)
            if o.finished:
                self.engine_done = True
                # "context": the sequence filled the model's context; OpenAI calls every budget limit "length"
                self.finish_reason = "stop" if o.finish_reason == "stop" else "length"

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def shown_ids(self) -> list[int]:
        """The generated ids whose text is shown: the final EOS is not (``generation._completion``'s rule)."""
        return self.ids[:-1] if self.ids and self.ids[-1] == self.eos_id else self.ids

    def text(self, tokenizer) -> tuple[str, bool]:
        """(the text that can no longer change, whether a stop string was found in it)."""
        text = tokenizer.decode(self.shown_ids())
        cut = find_stop(text, self.stops)
        if cut >= 0:
            text, final = text[:cut], True
        else:
            final = self.done
        if not final:
            text = text.rstrip("\ufffd")  # the start of a multi-byte character whose other bytes are still to come
            text = text[: len(text) - _held_back(text, self.stops)]
        if self.strip:
            text = text.lstrip()
            text = text.strip() if final else text.rstrip()  # trailing spaces wait for what follows them
        return text, cut >= 0

    def delta(self, tokenizer) -> str:
        """The text not sent yet (and mark it sent)."""
        text, _ = self.text(tokenizer)
        if not text.startswith(self.sent):  # cannot happen with SentencePiece: decoding more ids only appends
            return ""
        new, self.sent = text[len(self.sent):], text
        return new

    def new_tokens(self, start: int) -> tuple[int, int]:
        """The range [start, end) of tokens to report logprobs for: all received, less a final EOS."""
        end = len(self.ids) - 1 if self.done and self.ids and self.ids[-1] == self.eos_id else len(self.ids)
        return start, max(start, end)


# -- the HTTP app --------------------------------------------------------------------------------------------------
@dataclass
class _Prompt:
    ids: list[int]
    dropped: int = 0


class _Server:
    """The endpoints' logic over one ``Llama`` and one ``BatchingLoop``."""

    def __init__(self, llama: Llama, batcher: BatchingLoop, model_name: str):
        self.llama, self.tok, self.batcher = llama, llama.tokenizer, batcher
        self.model_name = model_name
        self.context = batcher.engine.max_seq_len
        self.created = int(time.time())

    # -- request checks -----------------------------------------------------------------------------------------
    def check_model(self, name: str) -> None:
        if name != self.model_name:
            raise APIError(404, f"The model `{name}` does not exist; this server serves `{self.model_name}`",
                           param="model", code="model_not_found")

    def params(self, req: _Sampling, max_tokens: int | None, logprobs: bool, seed_offset: int) -> SamplingParams:
        """The engine's sampling parameters of choice ``seed_offset`` (choices of one request get seeds s, s+1, ...
        so that n > 1 samples differ, and choice 0 with seed s equals a single request with seed s)."""
        seed = None if req.seed is None else req.seed + seed_offset
        return SamplingParams(
            max_new_tokens=max_tokens or _DEFAULTS.max_new_tokens,
            temperature=_DEFAULTS.temperature if req.temperature is None else req.temperature,
            top_p=_DEFAULTS.top_p if req.top_p is None else req.top_p,
            seed=seed, stop_strings=req.stops(), logprobs=logprobs)

    def chat_prompt(self, req: ChatRequest) -> _Prompt:
        """The dialog as ``llama2 chat`` renders it: fit_prompt, then Meta's layout (paper §3)."""
        dialog = []
        for m in req.messages:
            content = m.content if isinstance(m.content, str) else "".join(p.text for p in m.content)
            dialog.append({"role": "system" if m.role == "developer" else m.role, "content": content})
        for i, m in enumerate(dialog):
            try:
                m["content"].encode("utf-8")
            except UnicodeEncodeError as e:
                raise APIError(400, f"message {i} is not valid Unicode: a lone surrogate at character {e.start}",
                               param=f"messages.{i}.content") from None
        if has_special_tags(dialog):
            raise APIError(400, UNSAFE_ERROR, param="messages", code="special_tags")
        try:
            format_dialog(dialog)  # the dialog's shape: system?, then user/assistant alternating from user
        except ValueError as e:
            raise APIError(400, str(e), param="messages") from None
        if dialog[-1]["role"] != "user":
            raise APIError(400, f"message {len(dialog) - 1} (role {dialog[-1]['role']!r}): the last message must "
                                "come from the user", param="messages")
        budget = req.max_completion_tokens or req.max_tokens or _DEFAULTS.max_new_tokens
        try:
            _, ids, dropped = fit_prompt(self.tok, dialog, self.context, budget)
        except ValueError as e:
            raise APIError(400, f"This model's maximum context length is {self.context} tokens: {e}",
                           param="messages", code="context_length_exceeded") from None
        return _Prompt(ids, dropped)

    def completion_prompts(self, req: CompletionRequest) -> list[_Prompt]:
        p = req.prompt
        if isinstance(p, str) or (isinstance(p, list) and p and isinstance(p[0], int)):
            p = [p]
        if not p:
            raise APIError(400, "prompt is empty", param="prompt")
        out = []
        for i, item in enumerate(p):
            if isinstance(item, str):
                try:
                    ids = self.tok.encode(item, bos=True)  # as Llama.text_completion encodes
                except ValueError as e:
                    raise APIError(400, f"prompt {i}: {e}", param="prompt") from None
            else:
                ids = list(item)
                bad = [t for t in ids if not 0 <= t < self.tok.vocab_size]
                if not ids or bad:
                    raise APIError(400, f"prompt {i}: token ids must be a non-empty list of ids in "
                                        f"[0, {self.tok.vocab_size})" + (f"; got {bad[0]}" if bad else ""),
                                   param="prompt")
            if len(ids) >= self.context:
                raise APIError(400, f"This model's maximum context length is {self.context} tokens; prompt {i} is "
                                    f"{len(ids)} tokens and leaves no room for a reply", param="prompt",
                               code="context_length_exceeded")
            out.append(_Prompt(ids))
        return out

    # -- running the choices ------------------------------------------------------------------------------------
    async def run(self, prompts: list[_Prompt], params: list[SamplingParams],
                  choices: list[_Choice]) -> AsyncIterator[list[_Choice]]:
        """Submit one engine request per choice and yield the choices that received tokens, step by step, until
        all are done. Leaving early (a disconnect, an exception, the consumer stopping) cancels what still runs."""
        loop = asyncio.get_running_loop()
        inbox: asyncio.Queue = asyncio.Queue()

        def sink_for(i: int) -> Sink:
            def sink(item) -> None:  # engine thread
                try:
                    loop.call_soon_threadsafe(inbox.put_nowait, (i, item))
                except RuntimeError:  # the event loop is closed: the server is gone
                    pass
            return sink

        tickets = [self.batcher.submit(p.ids, sp, sink_for(i)) for i, (p, sp) in enumerate(zip(prompts, params))]
        try:
            while not all(c.done for c in choices):
                i, item = await inbox.get()
                batch = {i: item}
                while not inbox.empty():  # everything this step produced, in one go
                    j, more = inbox.get_nowait()
                    if isinstance(more, BaseException) or isinstance(batch.get(j), BaseException):
                        batch[j] = more
                    else:
                        batch[j] = batch.get(j, []) + more
                touched = []
                for j, item in batch.items():
                    if isinstance(item, BaseException):
                        raise APIError(500, f"generation failed: {type(item).__name__}: {item}", type="server_error")
                    c = choices[j]
                    c.add(item)
                    touched.append(c)
                if touched:
                    yield touched
        finally:  # leaving early: what still runs leaves the engine before its next step
            for c, t in zip(choices, tickets):
                if not c.engine_done:  # (a second cancel of one finished on a stop string here is a no-op)
                    self.batcher.cancel(t)

    # -- endpoints ----------------------------------------------------------------------------------------------
    async def chat(self, req: ChatRequest, request: Request):
        self.check_model(req.model)
        req.unsupported()
        if req.top_logprobs:
            raise APIError(400, "top_logprobs > 0 is not supported: the engine reports the sampled token's "
                                "log-probability only (use logprobs=true, top_logprobs=0)", param="top_logprobs",
                           code="unsupported_parameter")
        prompt = self.chat_prompt(req)
        n = req.n or 1
        max_tokens = req.max_completion_tokens or req.max_tokens
        params = [self.params(req, max_tokens, bool(req.logprobs), i) for i in range(n)]
        choices = [_Choice(i, params[i].stop_strings, True, self.tok.eos_id) for i in range(n)]
        headers = {"X-Llama2-Dropped-Exchanges": str(prompt.dropped)} if prompt.dropped else None
        meta = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": self.model_name}
        gen = self.run([prompt] * n, params, choices)

        def lp(c: _Choice, ids: list[int], lps: list) -> dict | None:
            if not req.logprobs:
                return None
            content = []
            for t, x in zip(ids, lps):
                text, b = token_text(self.tok, t)
                content.append({"token": text, "logprob": x, "bytes": b, "top_logprobs": []})
            return {"content": content}

        if not req.stream:
            async with _until_disconnected(request, gen) as events:
                async for _ in events:
                    pass
            body = {**meta, "object": "chat.completion", "choices": [
                {"index": c.index, "message": {"role": "assistant", "content": c.text(self.tok)[0]},
                 "logprobs": lp(c, c.shown_ids(), c.logprobs), "finish_reason": c.finish_reason} for c in choices],
                "usage": _usage(len(prompt.ids), choices), "dropped_exchanges": prompt.dropped}
            return JSONResponse(body, headers=headers)

        def chunk(choices_: list[dict], **extra) -> str:
            return _sse({**meta, "object": "chat.completion.chunk", "choices": choices_, **extra})

        async def stream() -> AsyncIterator[str]:
            yield chunk([{"index": c.index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                          "finish_reason": None} for c in choices], dropped_exchanges=prompt.dropped)
            seen = [0] * n  # tokens whose logprobs were sent, per choice
            try:
                async for touched in gen:
                    parts = []
                    for c in touched:
                        text = c.delta(self.tok)
                        k0, k1 = c.new_tokens(seen[c.index])
                        seen[c.index] = k1
                        if text or (req.logprobs and k1 > k0):
                            parts.append({"index": c.index, "delta": {"content": text},
                                          "logprobs": lp(c, c.ids[k0:k1], c.logprobs[k0:k1]), "finish_reason": None})
                        if c.done:
                            parts.append({"index": c.index, "delta": {}, "logprobs": None,
                                          "finish_reason": c.finish_reason})
                    if parts:
                        yield chunk(parts)
                if req.stream_options and req.stream_options.include_usage:
                    yield chunk([], usage=_usage(len(prompt.ids), choices))
            except APIError as e:
                yield _sse(error_body(e.message, e.type, e.param, e.code))
            finally:
                await gen.aclose()
            yield "data: [DONE]\n\n"

        return _event_stream(stream(), headers)

    async def completions(self, req: CompletionRequest, request: Request):
        self.check_model(req.model)
        req.unsupported()
        if req.logprobs:
            raise APIError(400, "logprobs > 0 is not supported: the engine reports the sampled token's "
                                "log-probability only (use logprobs=0)", param="logprobs", code="unsupported_parameter")
        if req.echo:
            raise APIError(400, "echo is not supported", param="echo", code="unsupported_parameter")
        if req.suffix:
            raise APIError(400, "suffix is not supported", param="suffix", code="unsupported_parameter")
        prompts = self.completion_prompts(req)
        n = req.n or 1
        want_lp = req.logprobs is not None
        # OpenAI's order: choice index = prompt index * n + sample index
        flat = [p for p in prompts for _ in range(n)]
        params = [self.params(req, req.max_tokens, want_lp, k % n) for k in range(len(flat))]
        choices = [_Choice(k, params[k].stop_strings, False, self.tok.eos_id) for k in range(len(flat))]
        meta = {"id": f"cmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": self.model_name}
        gen = self.run(flat, params, choices)

        def lp(ids: list[int], lps: list, offset: int) -> dict | None:
            if not want_lp:
                return None
            tokens, offsets = [], []
            for t in ids:
                text, _ = token_text(self.tok, t)
                tokens.append(text)
                offsets.append(offset)
                offset += len(text)
            return {"tokens": tokens, "token_logprobs": list(lps), "top_logprobs": None, "text_offset": offsets}

        if not req.stream:
            async with _until_disconnected(request, gen) as events:
                async for _ in events:
                    pass
            body = {**meta, "object": "text_completion", "choices": [
                {"index": c.index, "text": c.text(self.tok)[0], "logprobs": lp(c.shown_ids(), c.logprobs, 0),
                 "finish_reason": c.finish_reason} for c in choices], "usage": _usage(sum(len(p.ids) for p in prompts), choices)}
            return JSONResponse(body)

        def chunk(choices_: list[dict], **extra) -> str:
            return _sse({**meta, "object": "text_completion", "choices": choices_, **extra})

        async def stream() -> AsyncIterator[str]:
            seen = [0] * len(choices)
            offset = [0] * len(choices)
            try:
                async for touched in gen:
                    parts = []
                    for c in touched:
                        text = c.delta(self.tok)
                        k0, k1 = c.new_tokens(seen[c.index])
                        seen[c.index] = k1
                        new_lp = lp(c.ids[k0:k1], c.logprobs[k0:k1], offset[c.index])
                        if new_lp:
                            offset[c.index] += sum(len(t) for t in new_lp["tokens"])
                        if text or c.done or (want_lp and k1 > k0):
                            parts.append({"index": c.index, "text": text, "logprobs": new_lp,
                                          "finish_reason": c.finish_reason})
                    if parts:
                        yield chunk(parts)
                if req.stream_options and req.stream_options.include_usage:
                    yield chunk([], usage=_usage(sum(len(p.ids) for p in prompts), choices))
            except APIError as e:
                yield _sse(error_body(e.message, e.type, e.param, e.code))
            finally:
                await gen.aclose()
            yield "data: [DONE]\n\n"

        return _event_stream(stream())


def _usage(prompt_tokens: int, choices: list[_Choice]) -> dict:
    """OpenAI's usage; completion tokens count every token the model produced, the final EOS included."""
    completion = sum(len(c.ids) for c in choices)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion, "total_tokens": prompt_tokens + completion}


def _sse(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def _event_stream(body: AsyncIterator[str], headers: dict[str, str] | None = None) -> StreamingResponse:
    """Server-sent events. On a client disconnect Starlette cancels the body generator, whose ``finally`` cancels
    the engine requests (they leave the batch before the next step)."""
    return StreamingResponse(body, media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", **(headers or {})})


@contextlib.asynccontextmanager
async def _until_disconnected(request: Request, gen: AsyncIterator) -> AsyncIterator[AsyncIterator]:
    """Run ``gen`` to the end for a non-streamed answer, but stop it (and with it the engine requests) if the
    client goes away first: Starlette does not cancel a plain endpoint on disconnect, so a task waits for the
    ASGI ``http.disconnect`` message and cancels the consumer."""
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


_UNION_TAG = re.compile(r"^(str|int|float|bool|none|list\[.*\]|dict\[.*\]|[A-Z]\w*)$")


def _validation_error(errs: list[dict]) -> APIError:
    """A pydantic/FastAPI validation failure as one OpenAI error naming the field (``messages.0.content``), what
    was wrong and what was sent. Union members' tags (``str``, ``list[TextPart]``) are left out of the field's path."""
    if not errs:
        return APIError(400, "invalid request body")
    first = errs[0]
    kind = first.get("type", "")
    path = [str(x) for x in first.get("loc", ()) if x != "body" and not _UNION_TAG.match(str(x))]
    if kind == "json_invalid":
        why = first.get("ctx", {}).get("error", first.get("msg"))
        return APIError(400, f"the request body is not valid JSON: {why}", code="invalid_json")
    if not path:
        if kind == "missing":
            return APIError(400, "the request needs a JSON body", code="invalid_json")
        return APIError(400, "the request body must be a JSON object (sent with Content-Type: application/json)",
                        code="invalid_json")
    param = ".".join(path)
    sent = "" if kind == "missing" else f"; got {json.dumps(first.get('input'), default=str)[:60]}"
    return APIError(400, f"{param}: {first.get('msg', 'invalid value')}{sent}", param=param,
                    code="missing_field" if kind == "missing" else "invalid_type" if kind.endswith("_type")
                    or kind in ("string_type", "int_type", "float_type", "bool_type") else "invalid_value")


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
    server = _Server(llama, batcher, model_name)

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
        return _validation_error(e.errors()).response()

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
        return {"object": "list", "data": [_model_card(model_name, server.created, server.context)]}

    @app.get("/v1/models/{name:path}")
    async def model(name: str):
        server.check_model(name)
        return _model_card(model_name, server.created, server.context)

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatRequest, request: Request):
        return await server.chat(req, request)

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request):
        return await server.completions(req, request)

    return app


def _model_card(name: str, created: int, context: int) -> dict:
    return {"id": name, "object": "model", "created": created, "owned_by": "llama2", "max_model_len": context}


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
