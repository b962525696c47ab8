"""Continuous batching: requests admitted and retired between decode steps over one static cache (what the
server runs)."""
from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass, field
from typing import NamedTuple, Sequence

import torch

from ..kv_cache import StaticKVCache
from ..model import Transformer
from .decoder import attn_bucket, decoder_for
from .params import SamplingParams
from .sampler import Sampler, random_seed, row_seed, sample_tokens, token_logprob, uniforms
from .stops import ends_in_stop

__all__ = ["Engine", "StepOutput"]


class StepOutput(NamedTuple):
    """One token of one request, as ``Engine.step`` reports it."""

    request_id: int
    token: int
    finished: bool
    finish_reason: str | None  # "stop", "length" or "context" when finished, else None
    logprob: float | None


@dataclass
class _Request:
    id: int
    prompt: list[int]
    params: SamplingParams
    seed: int  # 31-bit
    stops: frozenset
    tokens: list[int] = field(default_factory=list)
    length: int = 0  # tokens in the cache (prompt + generated tokens fed back)
    next_token: int = -1  # drawn, not yet in the cache


class Engine:
    """Continuous batching over one ``StaticKVCache`` of ``max_batch`` slots of ``max_seq_len`` positions.

    >>> eng = Engine(model, tokenizer, max_batch=8)
    >>> rid = eng.submit(prompt_ids, SamplingParams(temperature=0, max_new_tokens=32))
    >>> while eng.has_work():
    ...     for out in eng.step():   # StepOutput(request_id, token, finished, finish_reason, logprob)
    ...         ...

    ``submit`` queues a request; ``step`` first admits queued requests into free slots (prefill, which also
    draws their first token), then runs one batched decode step over every running request, and returns the
    tokens drawn (a request admitted in this step reports its first two tokens). A request that finishes, or is
    ``cancel``-ed, leaves at once: its slot is freed (the last running slot is moved into it, so the running
    requests are always slots 0..n-1 and the step computes nothing for empty slots).

    ``compile``: as ``GenerationConfig.compile`` (None: compile once the measured eager steps would have paid
    for it). Guarantees: a request's tokens are a function of its prompt, its ``SamplingParams`` (seed included) and the
    model, not of the other requests: its cache row, rotary positions and attention mask are its own, and its
    random draws are ``uniforms(seed, token index)``. Greedy requests give exactly the tokens they give alone,
    up to the float rounding of a batched matrix product (tested on tiny models).
    """

    def __init__(self, model: Transformer, tokenizer=None, max_batch: int = 8, max_seq_len: int | None = None,
                 compile: bool | None = None, prefill_chunk: int = 512):
        if model.args.head != "lm":
            raise ValueError("the engine needs a model with an LM head")
        self.model, self.tokenizer = model, tokenizer
        self.max_batch = max_batch
        self.max_seq_len = min(max_seq_len or model.args.max_seq_len, model.args.max_seq_len)
        self.compile, self.prefill_chunk = compile, prefill_chunk
        for name, value, least in (("max_batch", max_batch, 1), ("prefill_chunk", prefill_chunk, 1),
                                   ("max_seq_len", self.max_seq_len, 2)):
            if value < least:
                raise ValueError(f"{name} must be >= {least}, got {value}")
        self.cache = StaticKVCache.for_model(model, max_batch, self.max_seq_len)
        if self.cache.k.device.type == "cuda":
            self.cache.mark_static()  # one cache for the engine's life: its compiled step can be a CUDA graph
        self.device = model.tok_embeddings.weight.device
        self.decoder = decoder_for(model)
        self._ids = itertools.count()
        self.waiting: list[_Request] = []
        self.running: list[_Request] = []  # running[i] holds cache slot i

    # -- requests ------------------------------------------------------------------------------------------
    def submit(self, prompt_ids: Sequence[int], params: SamplingParams | None = None, **overrides) -> int:
        """Queue a request; returns its id. ``overrides`` set SamplingParams fields."""
        params = dataclasses.replace(params or SamplingParams(), **overrides)
        if params.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1 for a request, got {params.max_new_tokens}")
        prompt = [int(t) for t in prompt_ids]
        if not prompt:
            raise ValueError("empty prompt: start it with at least BOS")
        if len(prompt) >= self.max_seq_len:
            raise ValueError(f"prompt of {len(prompt)} tokens; the engine's context is {self.max_seq_len}")
        vocab = self.model.args.vocab_size
        if not all(0 <= t < vocab for t in prompt):
            raise ValueError(f"prompt token {next(t for t in prompt if not 0 <= t < vocab)} is outside the "
                             f"vocabulary (0..{vocab - 1})")
        if params.stop_strings and self.tokenizer is None:
            raise ValueError("stop_strings need a tokenizer")
        stops = params.stop_tokens
        if stops is None:
            stops = (self.tokenizer.eos_id,) if self.tokenizer is not None else ()
        rid = next(self._ids)
        seed = params.seed if params.seed is not None else random_seed()
        self.waiting.append(_Request(rid, prompt, params, row_seed(seed, 0), frozenset(stops)))
        return rid

    @torch.inference_mode()
    def cancel(self, request_id: int) -> bool:
        """Drop a queued or running request at once (its slot is free for the next step); False if unknown."""
        for i, r in enumerate(self.waiting):
            if r.id == request_id:
                del self.waiting[i]
                return True
        for i, r in enumerate(self.running):
            if r.id == request_id:
                self._release(i)
                return True
        return False

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    @property
    def free_slots(self) -> int:
        return self.max_batch - len(self.running)

    # -- the loop ------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def step(self) -> list[StepOutput]:
        """Admit what fits, then decode one token for every running request."""
        events: list[StepOutput] = []
        while self.waiting and len(self.running) < self.max_batch:
            self._admit(self.waiting.pop(0), events)
        if not self.running:
            return events
        run = self.running
        n = len(run)
        dev = self.device
        p = [r.params for r in run]
        s, mode = Sampler.of([x.temperature for x in p], [x.top_p for x in p], [x.top_k for x in p],
                             [r.seed for r in run], dev)
        want_lp = any(x.logprobs for x in p)
        tok = torch.tensor([r.next_token for r in run], dtype=torch.long, device=dev)
        cols = torch.tensor([r.length for r in run], dtype=torch.long, device=dev)
        counters = torch.tensor([len(r.tokens) for r in run], dtype=torch.long, device=dev)
        starts = torch.zeros(n, dtype=torch.long, device=dev)
        attn_len = attn_bucket(max(r.length for r in run) + 1, self.max_seq_len)
        if self.compile is not False:
            self.decoder.sig = self.decoder.signature()
        nxt, lp = self.decoder.step(self.cache, tok, cols, starts, attn_len, s, counters, mode, want_lp, self.compile)
        toks = nxt.tolist()
        lps = lp.tolist() if lp is not None else [None] * n
        finished = []
        for i, r in enumerate(run):
            r.length += 1
            if self._emit(r, toks[i], lps[i], events):
                finished.append(i)
        for i in reversed(finished):
            self._release(i)
        return events

    def run(self) -> dict[int, list[int]]:
        """Step until every request is done; the tokens of each request by id (a convenience for tests/batches)."""
        out: dict[int, list[int]] = {}
        while self.has_work():
            for e in self.step():
                out.setdefault(e.request_id, []).append(e.token)
        return out

    # -- internals -----------------------------------------------------------------------------------------
    def _admit(self, r: _Request, events: list[StepOutput]) -> None:
        slot = len(self.running)
        ids = torch.tensor([r.prompt], dtype=torch.long, device=self.device)
        zero = torch.zeros(1, dtype=torch.long, device=self.device)
        logits = self.decoder.prefill(self.cache, ids, zero, chunk=self.prefill_chunk, rows=slice(slot, slot + 1))
        p = r.params
        s, mode = Sampler.of([p.temperature], [p.top_p], [p.top_k], [r.seed], self.device)
        tok = sample_tokens(logits, s, uniforms(s.seeds, zero), mode)
        lp = float(token_logprob(logits, tok)) if p.logprobs else None
        r.length = len(r.prompt)
        self.running.append(r)
        if self._emit(r, int(tok), lp, events):
            self._release(slot)

    def _emit(self, r: _Request, t: int, lp: float | None, events: list[StepOutput]) -> bool:
        """Record token t of request r; True when r is finished."""
        r.tokens.append(t)
        r.next_token = t
        reason = None
        if t in r.stops:
            reason = "stop"
        elif ends_in_stop(self.tokenizer, r.tokens, r.params.stop_strings):
            reason = "stop"
        elif len(r.tokens) >= r.params.max_new_tokens:
            reason = "length"
        elif r.length + 1 >= self.max_seq_len:  # the sequence (prompt + tokens) fills the context
            reason = "context"
        events.append(StepOutput(r.id, t, reason is not None, reason, lp if r.params.logprobs else None))
        return reason is not None

    def _release(self, slot: int) -> None:
        last = len(self.running) - 1
        if slot != last:
            self.cache.move(last, slot)
            self.running[slot] = self.running[last]
        self.running.pop()
