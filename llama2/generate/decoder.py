"""The decode step and the chunked prefill of one model (``Decoder``), compiled once and kept, and the prefill of
a batch of prompts that share rows (``prefill_shared``).

``step`` = forward of one token per row over the static cache + logits + sampling + logprob. It can run eagerly
or through ``torch.compile`` (replayed as CUDA graphs on CUDA); ``compile=None`` decides by measured cost.
"""
from __future__ import annotations

import time
import types
import warnings
import weakref
from typing import Callable, Sequence

import torch

from ..kv_cache import StaticKVCache
from ..model import Transformer
from .forward import forward_cached, logits_of
from .sampler import Sampler, sample_tokens, token_logprob, uniforms

__all__ = ["ATTN_BUCKET", "EAGER_ATTN_BUCKET", "Decoder", "decoder_for", "attn_bucket", "prefill_shared",
           "prefill_groups"]

ATTN_BUCKET = 256
"""Decode steps attend over the first ceil(used / ATTN_BUCKET) * ATTN_BUCKET cache columns: few distinct shapes
(one compiled graph each at most), and no attention over a long empty tail of the cache."""
EAGER_ATTN_BUCKET = 32
"""The bucket of ``generate``'s eager steps on the CPU, where no graph is kept per shape: a short answer after a
short prompt attends over a few dozen columns, not 256."""

_CUDA_EAGER_STEP = 0.02
"""Seconds the compile policy books for one eager CUDA step (a 7B-scale step), where a launch's wall time says
nothing about the work."""


# -- the step, eager or compiled -------------------------------------------------------------------------------------
def _step_impl(model: Transformer, cache_k, cache_v, tok, cols, starts, attn_len: int, s: Sampler, counters,
               mode: str, want_lp: bool):
    """One cached token per row: forward, logits, sampling, logprob. (B,) in, ((B,) tokens, (B,) or None) out."""
    h = forward_cached(model, cache_k, cache_v, tok[:, None], cols[:, None], starts, attn_len)
    logits = logits_of(model, h)  # (B, V)
    nxt = sample_tokens(logits, s, uniforms(s.seeds, counters), mode)
    return nxt, (token_logprob(logits, nxt) if want_lp else None)


def _own_code(fn: Callable) -> Callable:
    """A copy of ``fn`` with its own code object. Dynamo keeps compiled graphs, and its limit of recompiles, per
    code object: each (model structure, sampling mode) gets its own, so two models (a policy and its reference,
    fp32 and int8) never evict each other's graphs or exhaust each other's recompile budget."""
    return types.FunctionType(fn.__code__.replace(), fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)


COMPILE_SPEEDUP_GUESS = {"cpu": 1.4, "cuda": 3.0}
"""Assumed eager/compiled step-time ratio before one is measured on this model (``Decoder.speedup``): on the CPU
the compiled step's saving is the fusion of the one-row products; on CUDA, the launches a CUDA graph removes
(benchmarks/RESULTS.md has the measured ratios these guesses come from)."""


class Decoder:
    """The decode step and the chunked prefill of one model; compiled steps are built once and kept.

    ``step`` = forward of one token per row + logits + sampling + logprob: (next tokens (B,), logprobs (B,)).
    ``compile=True`` runs it through ``torch.compile`` (replayed as CUDA graphs on CUDA), one compiled function per
    (model structure, sampling mode, logprobs); if compiling fails, a warning is issued and the eager step is
    used from then on. ``compile=None`` decides by measured cost, ski-rental style: it compiles once the time
    the eager steps have taken (over all calls on this model) times the expected saving reaches the expected
    compile time, so a short call never waits for a compile and a long job pays at most about twice the optimum.
    """

    def __init__(self, model: Transformer):
        self.model_ref = weakref.ref(model)
        self._compiled: dict[tuple, Callable] = {}
        self.compile_failed = False
        self.eager_seconds = 0.0  # eager step time spent so far while compile=None
        self.compile_seconds: float | None = None  # measured cost of the last compile (first call of a new graph)
        self.step_seconds = {"eager": [0.0, 0], "compiled": [0.0, 0]}  # (total, count) of timed steps
        self.sig: tuple | None = None  # ``signature()`` as of the start of the current call (computed once a call)
        self._caches: dict[tuple, StaticKVCache] = {}  # CUDA: reused caches, see ``cache``

    @property
    def model(self) -> Transformer:
        m = self.model_ref()
        if m is None:  # pragma: no cover
            raise RuntimeError("the model of this decoder was deleted")
        return m

    def signature(self) -> tuple:
        """The model's structure as the compiled steps are keyed by: the linear layers' types and the weights'
        dtype (read from the layers directly, cheaper than a walk over model.modules(); still computed once per
        call, not per step)."""
        m = self.model
        parts = [len(m.layers), type(m.output), m.output.weight.dtype, m.tok_embeddings.weight.dtype]
        for layer in m.layers:
            a, f = layer.attention, layer.feed_forward
            parts += (type(a.wq), type(a.wk), type(a.wv), type(a.wo), type(f.w1), type(f.w2), type(f.w3))
        return tuple(parts)

    def speedup(self, device_type: str) -> float:
        (te, ne), (tc, nc) = self.step_seconds["eager"], self.step_seconds["compiled"]
        if ne and nc:
            return (te / ne) / (tc / nc)
        return COMPILE_SPEEDUP_GUESS.get(device_type, 1.0)

    def _should_compile(self, compile: bool | None, device_type: str) -> bool:
        if compile is not None or self.compile_failed:
            return bool(compile) and not self.compile_failed
        gain = 1.0 - 1.0 / self.speedup(device_type)
        if self._compiled:  # compiled before: keep using it where it measured faster
            return gain > 0.05
        cost = self.compile_seconds or (10.0 + 1.5 * self.model.args.n_layers) * (2.0 if device_type == "cuda" else 1.0)
        return gain > 0.05 and self.eager_seconds * gain >= cost

    def step(self, cache: StaticKVCache, tok, cols, starts, attn_len: int, s: Sampler, counters, mode: str,
             want_lp: bool, compile: bool | None = False):
        dev = tok.device.type
        t0 = time.perf_counter()
        if self._should_compile(compile, dev):
            key = (self.sig or self.signature(), mode, want_lp)
            fn = self._compiled.get(key)
            first = fn is None
            if first:
                import torch._inductor.inductor_prims  # noqa: F401  (registers the prim ``materialize`` uses)

                # Dynamo's guards stay on (they cost a little every step): with guard_filter_fn dropping the
                # module or all non-tensor guards, a second graph (the batch shrunk) was fed the wrong weights
                options = {"triton.cudagraphs": True} if dev == "cuda" else {}  # what mode="reduce-overhead" sets
                fn = self._compiled[key] = torch.compile(_own_code(_step_impl), dynamic=None, options=options)
            try:
                out = fn(self.model, cache.k, cache.v, tok, cols, starts, attn_len, s, counters, mode, want_lp)
                if dev == "cuda":  # a CUDA graph's outputs are overwritten by its next replay
                    out = tuple(None if t is None else t.clone() for t in out)
                if first:
                    self.compile_seconds = time.perf_counter() - t0
                elif dev == "cpu":
                    self._time("compiled", t0)
                return out
            except Exception as e:  # noqa: BLE001 - compilation problems are many; the eager step always works
                self.compile_failed = True
                warnings.warn(f"torch.compile of the decode step failed ({type(e).__name__}: {e}); "
                              "continuing with the eager step", RuntimeWarning, stacklevel=2)
        out = _step_impl(self.model, cache.k, cache.v, tok, cols, starts, attn_len, s, counters, mode, want_lp)
        if dev == "cpu":  # on CUDA the time of a launch says nothing; the policy counts steps there
            dt = self._time("eager", t0)
        else:
            dt = _CUDA_EAGER_STEP  # the policy counts steps there: compile after ~cost / (dt * gain) of them
        if compile is None:
            self.eager_seconds += dt
        return out

    def cache(self, batch_size: int, length: int) -> StaticKVCache:
        """A StaticKVCache for a call. On CUDA one cache per shape is kept and reused across calls, its address
        marked static, so that the compiled step's CUDA graph stays valid; on the CPU a fresh one (no graphs to
        keep, and no memory held between calls)."""
        model = self.model
        if model.tok_embeddings.weight.device.type != "cuda":
            return StaticKVCache.for_model(model, batch_size, length)
        key = (batch_size, length)
        c = self._caches.get(key)
        if c is None:
            c = self._caches[key] = StaticKVCache.for_model(model, batch_size, length)
            c.mark_static()
        return c

    def _time(self, kind: str, t0: float) -> float:
        dt = time.perf_counter() - t0
        acc = self.step_seconds[kind]
        acc[0] += dt
        acc[1] += 1
        return dt

    def prefill(self, cache: StaticKVCache, tokens: torch.Tensor, starts: torch.Tensor, col0: int = 0,
                chunk: int = 512, rows: slice | None = None) -> torch.Tensor:
        """Write the (B, T) ``tokens`` at columns col0..col0+T of cache rows ``rows`` (default 0..B-1), in chunks of
        ``chunk`` tokens (bounded activation and attention memory for long prompts); return the last token's
        logits (B, V). Eager: one call per prompt, its shapes vary."""
        B, T = tokens.shape
        k, v = (cache.k, cache.v) if rows is None else (cache.k[:, rows], cache.v[:, rows])
        h = None
        for c0 in range(0, T, max(1, chunk)):
            c1 = min(T, c0 + chunk)
            cols = torch.arange(col0 + c0, col0 + c1, device=tokens.device).expand(B, -1)
            h = forward_cached(self.model, k, v, tokens[:, c0:c1], cols, starts, col0 + c1)
        return logits_of(self.model, h)


_DECODERS: "weakref.WeakKeyDictionary[Transformer, Decoder]" = weakref.WeakKeyDictionary()


def decoder_for(model: Transformer) -> Decoder:
    """The model's ``Decoder`` (created once per model, so compiled steps are reused across calls)."""
    d = _DECODERS.get(model)
    if d is None:
        d = _DECODERS[model] = Decoder(model)
    return d


def attn_bucket(n: int, limit: int, bucket: int | None = None) -> int:
    """n rounded up to a multiple of ``bucket`` (default ATTN_BUCKET), at most ``limit``."""
    bucket = bucket or ATTN_BUCKET
    return min(limit, -(-n // bucket) * bucket)


def prefill_shared(dec: Decoder, prompts: Sequence[Sequence[int]], P: int, cache_len: int, chunk: int, fresh: bool = False):
    """Prefill each distinct prompt once, left-padded to P, into a cache of len(prompts) rows of ``cache_len``
    (rounded up like the attended length, so that calls of similar lengths share shapes, and a compiled step:
    a new shape costs a recompile); rows that repeat a prompt copy its cache row. The distinct prompts are
    prefilled shortest first, in groups of similar length, each group only over its own columns (a batch's
    prompts differ in length severalfold, and padding to the longest made most of the prefill's work). ``fresh``:
    a new cache even on CUDA (not one kept for the compiled step's graphs). Returns (cache, last logits (B, V),
    start column of each row (B,))."""
    device = dec.model.tok_embeddings.weight.device
    uniq: dict[tuple[int, ...], int] = {}
    row_src = [uniq.setdefault(tuple(p), len(uniq)) for p in prompts]
    distinct = sorted(uniq, key=len)  # cache row r holds distinct[r]
    row_of = {p: r for r, p in enumerate(distinct)}
    tokens = torch.zeros(len(distinct), P, dtype=torch.long, device=device)
    for r, p in enumerate(distinct):
        tokens[r, P - len(p):] = torch.as_tensor(p, dtype=torch.long)
    starts_u = torch.tensor([P - len(p) for p in distinct], device=device)
    cache = StaticKVCache.for_model(dec.model, len(prompts), cache_len) if fresh else dec.cache(len(prompts), cache_len)
    logits = []
    for r0, r1 in prefill_groups([len(p) for p in distinct]):
        n = len(distinct[r1 - 1])  # the group's longest prompt: columns P - n .. P - 1
        logits.append(dec.prefill(cache, tokens[r0:r1, P - n:], starts_u[r0:r1], col0=P - n, chunk=chunk,
                                  rows=slice(r0, r1)))
    logits = torch.cat(logits)  # (U, V), rows 0..U-1 of the cache
    by_row = [row_of[p] for p in uniq]  # distinct prompt (first-seen order) -> its cache row
    index = [by_row[u] for u in row_src]
    index_t = torch.tensor(index, device=device)
    if index != list(range(len(prompts))):
        cache.select(index_t)
    return cache, logits[index_t], starts_u[index_t]


def prefill_groups(lengths: Sequence[int], slack: float = 0.25, least: int = 8) -> list[tuple[int, int]]:
    """Split prompts sorted by length into runs [r0, r1) that are prefilled together: a run grows while its longest
    prompt is at most ``slack`` longer than its shortest (and at least ``least`` tokens), so padding stays a small
    share of the work and a run costs one call per chunk."""
    groups, r0 = [], 0
    for r in range(1, len(lengths) + 1):
        if r == len(lengths) or lengths[r] > lengths[r0] + max(least, int(lengths[r0] * slack)):
            groups.append((r0, r))
            r0 = r
    return groups
