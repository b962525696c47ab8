"""The engine thread: one background thread owns the continuous-batching ``Engine`` (it is not thread-safe and its
step is long); HTTP handlers post commands to it (``BatchingLoop``) and receive each step's tokens on the event loop
(``run_choices``)."""
from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import AsyncIterator, Callable

from ..generate import Engine, SamplingParams, StepOutput
from .choices import Choice
from .protocol import APIError

__all__ = ["Sink", "Ticket", "BatchingLoop", "run_choices"]

log = logging.getLogger("llama2.serve")

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


# -- the event loop's side ------------------------------------------------------------------------------------------
async def run_choices(batcher: BatchingLoop, prompts: list[list[int]], params: list[SamplingParams],
                      choices: list[Choice]) -> AsyncIterator[list[Choice]]:
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

    tickets = [batcher.submit(ids, sp, sink_for(i)) for i, (ids, sp) in enumerate(zip(prompts, params))]
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
                batcher.cancel(t)
