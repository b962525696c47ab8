"""The generation engine: a static KV cache, one fixed-shape decode step with sampling inside it, and a
step-level API for continuous batching.

Why a second path next to the model's own forward (which ``generate(engine="eager")`` keeps as the reference):

* **Fixed shapes.** The cache (``StaticKVCache``) is allocated once per call (or per ``Engine``) and never grows;
  each decode step attends over the first ``attn_len`` columns (rounded up to a multiple of ``ATTN_BUCKET``) under a
  mask, writes the new keys at each row's own column (a tensor, not a Python int) and samples the next token
  from per-row sampling settings (tensors too). The step therefore has the same shapes from one token to the
  next, so ``torch.compile`` compiles it once, and on CUDA the compiled step is replayed as a CUDA graph
  (``mode="reduce-overhead"``; the way gpt-fast and transformers' static cache decode).
* **Matrix-vector products at the machine's bandwidth.** A batch-1 step is ~85 matrix-vector products that
  stream every weight once. On x86 CPUs PyTorch's fp32 ``F.linear`` goes to MKL's sgemm, which on AMD
  processors read the 32000 x 768 output layer at 11-17 GB/s; oneDNN's linear (``torch.ops.mkldnn.
  _linear_pointwise``, the kernel Inductor's own CPU lowering calls) reads the very same tensor, unpacked and
  uncopied, at 45-60 GB/s (benchmarks/RESULTS.md). ``linear`` picks it for fp32 weights on the CPU.
* **No host round trip per token where none is needed.** Sampling (temperature, top-k, top-p, greedy), the
  log-probability and the stop-token test run on the device inside the step. The random numbers come from a
  counter-based hash of (row seed, token index) (``uniforms``), not from a generator's state: a row's samples do
  not depend on which other rows share its batch, on the batch being compacted, or on the step being compiled
  or replayed as a graph.

``generate`` (llama2.generation) runs a whole batch of prompts through ``generate_static``; ``Engine`` admits
and retires requests between decode steps (continuous batching, for a server). Both drive ``forward_cached``.

Shapes in comments: B rows, T new tokens, S attended cache columns, H query heads, KV key/value heads, D head
dim, C model dim, V vocabulary.
"""
from __future__ import annotations

import dataclasses
import itertools
import os
import time
import types
import warnings
import weakref
from dataclasses import dataclass, field
from typing import Callable, NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .config import SamplingConfig
from .kv_cache import StaticKVCache
from .model import Transformer, apply_rope
from .ops import ONEDNN_LINEAR, onednn_linear

__all__ = [
    "ATTN_BUCKET",
    "linear",
    "dense_linear",
    "forward_cached",
    "uniforms",
    "sample_tokens",
    "Sampler",
    "Decoder",
    "decoder_for",
    "generate_static",
    "SamplingParams",
    "StepOutput",
    "Engine",
]

ATTN_BUCKET = 256
"""Decode steps attend over the first ceil(used / ATTN_BUCKET) * ATTN_BUCKET cache columns: few distinct shapes
(one compiled graph each at most), and no attention over a long empty tail of the cache."""
EAGER_ATTN_BUCKET = 32
"""The bucket of ``generate``'s eager steps on the CPU, where no graph is kept per shape: a short answer after a
short prompt attends over a few dozen columns, not 256 (benchmarks/RESULTS.md, the sampling stages)."""


# -- the matrix-vector kernel ---------------------------------------------------------------------------------------


@torch.library.custom_op("llama2::onednn_linear", mutates_args=())
def _onednn_linear_op(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """The oneDNN linear as an opaque op for torch.compile: Inductor's own lowering of ``mkldnn._linear_pointwise``
    expects a prepacked weight, so a compiled step calls the kernel through this wrapper instead."""
    return torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], "")


@_onednn_linear_op.register_fake
def _(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return x.new_empty(x.shape[0], w.shape[0])


def linear(x: torch.Tensor, layer: nn.Module) -> torch.Tensor:
    """``layer(x)`` for an inference step: x (..., in) -> (..., out). A bias-free ``nn.Linear`` goes through
    ``dense_linear``; any other layer (a quantised ``llama2.quant.Int8Linear``) is simply called."""
    if type(layer) is nn.Linear and layer.bias is None:
        return dense_linear(x, layer.weight)
    return layer(x)


def dense_linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x (..., in) @ w (out, in)^T with the fastest kernel for it here.

    fp32 on the CPU: oneDNN's linear on the weight as it is (no copy and no prepacking, so the engine always
    reads the live parameters); inside a compiled step, a one-row product is written as multiply-and-sum, which
    Inductor turns into one vectorised, multi-threaded pass over the weight, the fastest read of it on the CPU
    (benchmarks/RESULTS.md). Anything else: ``F.linear``.
    """
    if w.device.type != "cpu" or w.dtype != torch.float32:
        return F.linear(x, w)
    x2 = x.reshape(-1, x.shape[-1])  # (M, in)
    if torch.compiler.is_compiling() and x2.shape[0] == 1:
        out = (materialize(x2) * w).sum(-1)[None]
    elif ONEDNN_LINEAR and torch.compiler.is_compiling():
        out = _onednn_linear_op(x2, w)
    elif ONEDNN_LINEAR:  # eager: the aten op directly (a custom op's Python dispatch costs ~10 us a call)
        out = onednn_linear(x2, w)
    else:
        out = F.linear(x2, w)
    return out.view(*x.shape[:-1], w.shape[0])


def materialize(x: torch.Tensor) -> torch.Tensor:
    """Inside a compiled step: make Inductor compute ``x`` into a buffer before it is read.

    Without it Inductor inlines a cheap producer into its consumer: the input of a matrix-vector product written
    as multiply-and-sum (RMSNorm's scaling, SwiGLU's silu(a) * b) would be recomputed for every output row,
    768 to 32000 times per element, which made the compiled step slower than the weight stream it exists for.
    ``prims.inductor_force_stride_order`` is Inductor's own "realize with this layout" primitive. Eager: x."""
    if not torch.compiler.is_compiling():
        return x
    x = x.contiguous()
    # the prim is registered by Decoder.step's import; a contiguous layout's strides, as Python ints (under dynamic
    # shapes x.stride() holds SymInts, which Dynamo cannot pass to the prim)
    strides = [1] * x.dim()
    for d in range(x.dim() - 2, -1, -1):
        strides[d] = strides[d + 1] * int(x.shape[d + 1])
    return torch.ops.prims.inductor_force_stride_order(x, strides)


def _rms_norm(x: torch.Tensor, norm: nn.Module) -> torch.Tensor:
    """``RMSNorm.forward`` (model.py) as a function: fp32 statistics, the gain in the input's dtype."""
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + norm.eps)).type_as(x) * norm.weight


# -- the model over a static cache ---------------------------------------------------------------------------------
def forward_cached(
    model: Transformer,
    cache_k: torch.Tensor,
    cache_v: torch.Tensor,
    tokens: torch.Tensor,
    cols: torch.Tensor,
    starts: torch.Tensor,
    attn_len: int,
    last: torch.Tensor | None = None,
) -> torch.Tensor:
    """The transformer over a ``StaticKVCache``: final-normed hidden states of the last new token, (B, C) (or of
    token ``last[b]`` of each row b, given ``last`` (B,): right-padded new tokens).

    tokens (B, T): new tokens; cols (B, T): the cache column each of them is written to (each row its own);
    starts (B,): row b's first real column (left padding before it). A token at column c has the
    rotary position c - starts[b] and attends to the columns starts[b]..c of its row; the first ``attn_len``
    columns are read (attn_len > every column in ``cols``). cache_k/cache_v: (n_layers, >= B, KV, S_cache, D),
    rows 0..B-1 used and written in place.

    The arithmetic is the model's (same rotary tables, ``apply_rope``, RMSNorm in fp32, SDPA with grouped
    heads); only the matrix products may take another kernel (``linear``), so logits agree with
    ``model.forward`` to float rounding, not bit for bit.
    """
    a = model.args
    B, T = tokens.shape
    H, KV, D = a.n_heads, a.n_kv_heads, a.head_dim
    pos = (cols - starts[:, None]).clamp(min=0)  # (B, T) rotary positions
    cos = model.rope_cos[pos][:, :, None, :]  # (B, T, 1, D/2)
    sin = model.rope_sin[pos][:, :, None, :]
    keys = torch.arange(attn_len, device=tokens.device)  # (S,)
    # key s is visible to the query at column c of row b iff starts[b] <= s <= c; a query on a pad column
    # (c < starts[b]) sees itself so that its softmax is never over nothing (its output is never used)
    mask = ((keys >= starts[:, None, None]) & (keys <= cols[:, :, None])) | (keys == cols[:, :, None])  # (B, T, S)
    mask = mask[:, None]  # (B, 1, T, S)
    rows = torch.arange(B, device=tokens.device)[:, None]  # (B, 1), broadcast against cols (B, T)
    layer_ids = torch.arange(len(model.layers), device=tokens.device)

    h = model.tok_embeddings.weight[tokens]  # (B, T, C)
    for i, layer in enumerate(model.layers):
        att = layer.attention
        x = _rms_norm(h, layer.attention_norm)
        q = linear(x, att.wq).view(B, T, H, D)
        k = linear(x, att.wk).view(B, T, KV, D)
        v = linear(x, att.wv).view(B, T, KV, D)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        # row b's token t -> column cols[b, t] of layer i: one index_put_ on the whole cache (not on a view of it),
        # which a compiled step does in place; on a view, Inductor copied every layer's whole cache each step
        li = layer_ids[i : i + 1]  # (1,): a 0-d index would be read as a Python int (a host sync, a graph break)
        cache_k[li, rows, :, cols] = k
        cache_v[li, rows, :, cols] = v
        ck, cv = cache_k[i], cache_v[i]  # (B_cache, KV, S_cache, D)
        if T == 1 and torch.compiler.is_compiling():
            out = _decode_attention(q, ck[:B, :, :attn_len], cv[:B, :, :attn_len], mask)  # (B, 1, H*D)
        else:
            out = F.scaled_dot_product_attention(
                q.transpose(1, 2), ck[:B, :, :attn_len], cv[:B, :, :attn_len], attn_mask=mask, enable_gqa=KV != H
            ).transpose(1, 2).reshape(B, T, H * D)  # (B, T, H*D)
        h = h + linear(out, att.wo)
        x = _rms_norm(h, layer.ffn_norm)
        ff = layer.feed_forward
        h = h + linear(F.silu(linear(x, ff.w1)) * linear(x, ff.w3), ff.w2)
    h = h[:, -1] if last is None else h[torch.arange(B, device=h.device), last]
    return _rms_norm(h, model.norm)  # (B, C)


def _decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Attention of one query per row, written out (scores, masked softmax, weighted sum) for a compiled step:
    Inductor fuses it and reads the cache in place, where the SDPA kernel would get copies of the cache slices.
    q (B, 1, H, D); k, v (B, KV, S, D); mask (B, 1, 1, S) -> (B, 1, H*D). Query head h uses key/value head
    h // (H / KV), as SDPA's enable_gqa does."""
    B, _, H, D = q.shape
    KV = k.shape[1]
    qg = q.view(B, KV, H // KV, D)  # (B, KV, G, D)
    scores = (qg @ k.transpose(-1, -2)).float() * D**-0.5  # (B, KV, G, S)
    scores = scores.masked_fill(~mask.view(B, 1, 1, -1), float("-inf"))
    out = torch.softmax(scores, dim=-1).type_as(v) @ v  # (B, KV, G, D)
    return out.view(B, 1, H * D)


def _logits(model: Transformer, h: torch.Tensor) -> torch.Tensor:
    return linear(h, model.output).float()  # (B, V), fp32 as the model returns them


# -- sampling -------------------------------------------------------------------------------------------------------
_M31 = 0x7FFFFFFF


def _mix31(x: torch.Tensor) -> torch.Tensor:
    """An integer hash of int64 values in [0, 2^31) to [0, 2^31) (the multiply-xorshift finaliser of a common
    32-bit hash, on 31 bits so that no int64 product overflows: x < 2^31 times a 27-bit constant)."""
    x = ((x >> 16) ^ x) * 0x45D9F3B & _M31
    x = ((x >> 16) ^ x) * 0x45D9F3B & _M31
    return (x >> 16) ^ x


def uniforms(seeds: torch.Tensor, counters: torch.Tensor) -> torch.Tensor:
    """One uniform number in (0, 1) per row, a pure function of (seeds[b], counters[b]): (B,) float64.

    seeds: (B,) int64 in [0, 2^31), one per row (request); counters: (B,) int64, the index of the token being
    drawn. A counter-based generator (as Philox is, in spirit): no state to carry, so the draw of row b at token
    t is the same whatever else is in the batch, after the batch is compacted, and inside a compiled step or a
    CUDA graph. Resolution 2^-31: a token whose probability is below ~5e-10 is effectively never drawn.
    """
    x = _mix31((seeds + _mix31(counters & _M31)) & _M31)
    x = _mix31(x ^ seeds)
    return (x.double() + 0.5) / 2.0**31


class Sampler(NamedTuple):
    """Per-row sampling settings as tensors (B,): what one compiled step reads instead of Python numbers."""

    temperature: torch.Tensor  # float32; 0 = greedy
    top_p: torch.Tensor  # float32; 1 = off
    top_k: torch.Tensor  # int64; 0 = off
    seeds: torch.Tensor  # int64 in [0, 2^31)

    def select(self, index: torch.Tensor) -> "Sampler":
        return Sampler(*(t[index] for t in self))


def sampling_mode(temperature: Sequence[float], top_p: Sequence[float], top_k: Sequence[int]) -> str:
    """"greedy" (every row at temperature 0), "filter" (some sampled row has top-k or top-p: needs a sort) or
    "sample" (plain softmax sampling). A Python-side choice, so each mode is its own (compiled) step."""
    sampled = [i for i, t in enumerate(temperature) if t > 0]
    if not sampled:
        return "greedy"
    if any(top_p[i] < 1.0 or top_k[i] > 0 for i in sampled):
        return "filter"
    return "sample"


def sample_tokens(logits: torch.Tensor, s: Sampler, u: torch.Tensor, mode: str) -> torch.Tensor:
    """One token per row from (B, V) fp32 logits by inverse-CDF sampling with the uniforms u (B,).

    The rule is ``generation.sample_next``'s: softmax(logits / T) restricted to the top-k, then to the top-p
    nucleus (a token is dropped when the mass before it, in descending order, already exceeds top_p times the
    mass kept), renormalised; temperature 0 is argmax. Rows carry their own settings (s), so requests with
    different settings share one step. Returns (B,) int64.
    """
    greedy = logits.argmax(dim=-1)  # (B,)
    if mode == "greedy":
        return greedy
    V = logits.shape[-1]
    temp = torch.where(s.temperature > 0, s.temperature, 1.0)
    probs = torch.softmax(logits / temp[:, None], dim=-1)  # (B, V)
    if mode == "filter":
        probs, order = probs.sort(dim=-1, descending=True)
        rank = torch.arange(V, device=logits.device)
        k = torch.where(s.top_k > 0, s.top_k, V)
        probs = probs.masked_fill(rank >= k[:, None], 0.0)
        before = probs.cumsum(-1) - probs
        probs = probs.masked_fill(before > s.top_p[:, None] * probs.sum(-1, keepdim=True), 0.0)
    cdf = probs.double().cumsum(-1)  # (B, V), float64 so that the tail keeps its resolution
    idx = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], right=True).squeeze(-1).clamp(max=V - 1)
    if mode == "filter":
        idx = order.gather(-1, idx[:, None]).squeeze(-1)
    return torch.where(s.temperature > 0, idx, greedy)


def _logprob(logits: torch.Tensor, tok: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[tok] at temperature 1 (what ``Completion.logprobs`` reports): (B,) fp32."""
    return logits.gather(-1, tok[:, None]).squeeze(-1) - torch.logsumexp(logits, dim=-1)


# -- the step, eager or compiled -----------------------------------------------------------------------------------
def _step_impl(model: Transformer, cache_k, cache_v, tok, cols, starts, attn_len: int, s: Sampler, counters,
               mode: str, want_lp: bool):
    """One cached token per row: forward, logits, sampling, logprob. (B,) in, ((B,) tokens, (B,) or None) out."""
    h = forward_cached(model, cache_k, cache_v, tok[:, None], cols[:, None], starts, attn_len)
    logits = _logits(model, h)  # (B, V)
    nxt = sample_tokens(logits, s, uniforms(s.seeds, counters), mode)
    return nxt, (_logprob(logits, nxt) if want_lp else None)


def _own_code(fn: Callable) -> Callable:
    """A copy of ``fn`` with its own code object. Dynamo keeps compiled graphs, and its limit of recompiles, per
    code object: each (model structure, sampling mode) gets its own, so two models (a policy and its reference,
    fp32 and int8) never evict each other's graphs or exhaust each other's recompile budget."""
    return types.FunctionType(fn.__code__.replace(), fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)


COMPILE_SPEEDUP_GUESS = {"cpu": 1.4, "cuda": 3.0}
"""Assumed eager/compiled step-time ratio before one is measured (CPU: 20.7 -> 13.4 ms at bench-100m fp32, 1 thread;
CUDA: CUDA graphs, transformers' static cache measured 3.3x its eager decode on an H200)."""


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
        self.sig: tuple | None = None  # ``signature()`` as of the start of the current call (it costs ~0.15 ms)
        self._caches: dict[tuple, StaticKVCache] = {}  # CUDA: reused caches, see ``cache``

    @property
    def model(self) -> Transformer:
        m = self.model_ref()
        if m is None:  # pragma: no cover
            raise RuntimeError("the model of this decoder was deleted")
        return m

    def signature(self) -> tuple:
        """The model's structure as the compiled steps are keyed by: the linear layers' types and the weights'
        dtype (~0.15 ms, so computed once per call; a walk over model.modules() took 0.85 ms)."""
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

                # Dynamo's guards stay on (~0.4 ms a step at bench-100m): with guard_filter_fn dropping the
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
            dt = 0.02  # a 7B-scale eager step: compile after ~compile time / (0.02 s * gain) steps
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
        return _logits(self.model, h)


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


def row_seed(seed: int, row: int) -> int:
    """A 31-bit seed for row ``row`` of a call seeded with ``seed`` (SplitMix64 of the pair)."""
    z = (seed * 0x9E3779B97F4A7C15 + row * 0xBF58476D1CE4E5B9 + 0x94D049BB133111EB) & (2**64 - 1)
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & (2**64 - 1)
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & (2**64 - 1)
    return (z ^ (z >> 31)) & _M31


def random_seed() -> int:
    return int.from_bytes(os.urandom(8), "little")


# -- stop strings ---------------------------------------------------------------------------------------------------
def find_stop(text: str, stop_strings: Sequence[str]) -> int:
    """Index of the earliest stop string in ``text``, or -1."""
    hits = [text.find(s) for s in stop_strings if s and s in text]
    return min(hits) if hits else -1


def ends_in_stop(tokenizer, tokens: Sequence[int], stop_strings: Sequence[str]) -> bool:
    """Whether the text of the last tokens holds a stop string, checked after every new token. The window is long
    enough for the longest stop string however it is tokenized (a character is at most 4 byte-fallback pieces),
    plus two tokens so that a leading space is not lost at the window's start."""
    if not stop_strings:
        return False
    window = 4 * max(len(s) for s in stop_strings) + 2
    return find_stop(tokenizer.decode(list(tokens[-window:])), stop_strings) >= 0


# -- a whole batch of prompts (what generate() runs) ---------------------------------------------------------------
class Outputs:
    """Per-row tokens, logprobs and finish reasons of a batch being decoded (both generate loops record through it):
    a row ends on a stop token or stop string ("stop"), else it ends "length" (max_new_tokens) or "context" (the
    model's context filled first); ``on_token(row, token)`` is called in row order as tokens are recorded."""

    def __init__(self, B: int, cfg, stop_tokens: Sequence[int], tokenizer, on_token, reason: str):
        self.cfg, self.tokenizer, self.on_token, self.stops = cfg, tokenizer, on_token, set(stop_tokens)
        self.tokens: list[list[int]] = [[] for _ in range(B)]
        self.logprobs: list[list[float]] | None = [[] for _ in range(B)] if cfg.logprobs else None
        self.finish = [reason] * B
        self.done = [False] * B

    def record(self, rows: Sequence[int], toks: list[int], lps: list[float] | None) -> int:
        """Record ``toks[i]`` (and ``lps[i]``) for row ``rows[i]`` unless that row is done; returns how many of
        ``rows`` are done."""
        for i, b in enumerate(rows):
            if self.done[b]:
                continue
            t = toks[i]
            self.tokens[b].append(t)
            if self.logprobs is not None:
                self.logprobs[b].append(lps[i])
            if self.on_token is not None:
                self.on_token(b, t)
            if t in self.stops or ends_in_stop(self.tokenizer, self.tokens[b], self.cfg.stop_strings):
                self.done[b], self.finish[b] = True, "stop"
        return sum(self.done[b] for b in rows)

    def rows(self) -> list[tuple[list[int], list[float] | None, str]]:
        return [(self.tokens[b], self.logprobs[b] if self.logprobs is not None else None, self.finish[b])
                for b in range(len(self.tokens))]


def _prefill_distinct(dec, prompts: Sequence[Sequence[int]], P: int, cache_len: int, chunk: int, fresh: bool = False):
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


def _batch_sampler(cfg, B: int, device: torch.device) -> tuple[Sampler, str]:
    """One Sampler for B rows that all use ``cfg``'s settings, each row with its own seed derived from cfg.seed
    (a random one when None), and the sampling mode those settings need."""
    base = cfg.seed if cfg.seed is not None else random_seed()
    mode = sampling_mode([float(cfg.temperature)] * B, [cfg.top_p] * B, [cfg.top_k] * B)
    s = Sampler(
        torch.full((B,), float(cfg.temperature), device=device),
        torch.full((B,), float(cfg.top_p), device=device),
        torch.full((B,), int(cfg.top_k), dtype=torch.long, device=device),
        torch.tensor([row_seed(base, b) for b in range(B)], dtype=torch.long, device=device),
    )
    return s, mode


_OVERLAP_DEVICES = ("cuda",)  # where generate_static queues the next step before reading this one's tokens


class _Readback:
    """The host's copy of a step's (B,) tokens and log-probabilities, taken without blocking: into pinned buffers
    on CUDA, with an event that ``values`` waits on (so the device can run the next step meanwhile)."""

    def __init__(self, B: int, want_lp: bool, device: torch.device):
        pin = device.type == "cuda"
        self.tok = torch.empty(B, dtype=torch.long, pin_memory=pin)
        self.lp = torch.empty(B, dtype=torch.float32, pin_memory=pin) if want_lp else None
        self.event = torch.cuda.Event() if pin else None
        self.device = device
        self.n = 0

    def start(self, tok: torch.Tensor, lp: torch.Tensor | None) -> None:
        self.n = n = tok.shape[0]
        self.tok[:n].copy_(tok, non_blocking=True)
        if self.lp is not None and lp is not None:
            self.lp[:n].copy_(lp, non_blocking=True)
        if self.event is not None:  # on the stream of the model's device, which copies (not the current device's)
            self.event.record(torch.cuda.current_stream(self.device))

    def values(self) -> tuple[list[int], list[float] | None]:
        if self.event is not None:
            self.event.synchronize()
        n = self.n
        return self.tok[:n].tolist(), (self.lp[:n].tolist() if self.lp is not None else None)


def generate_static(
    model: Transformer,
    prompts: Sequence[Sequence[int]],
    cfg,
    stop_tokens: Sequence[int],
    *,
    tokenizer=None,
    on_token: Callable[[int, int], None] | None = None,
) -> list[tuple[list[int], list[float] | None, str]]:
    """Decode ``prompts`` with the static engine; returns (tokens, logprobs, finish_reason) per prompt.

    Same contract as the eager loop in ``generation.generate`` (left padding, stop tokens kept, stop strings,
    ``on_token`` in row order as tokens are drawn, "length"/"context"/"stop"). On top of it:

    * identical prompts (rejection sampling asks for K samples of each) are prefilled once and their cache rows
      copied;
    * rows that have finished leave the batch: whenever at least a quarter of the rows in the batch are done
      the cache and the per-row state are compacted to the live rows (``cfg.compact``), so a long answer does
      not keep the finished short ones computing;
    * sampled rows draw from ``uniforms(row seed, token index)``: for a given seed the output is reproducible
      and independent of batch composition and compaction, but it is not the eager path's draw (greedy rows are
      the same tokens as the eager path).
    """
    device = model.tok_embeddings.weight.device
    args = model.args
    B = len(prompts)
    lengths = [len(p) for p in prompts]
    P = max(lengths)
    total = min(args.max_seq_len, P + cfg.max_new_tokens)
    n_new = total - P
    outs = Outputs(B, cfg, stop_tokens, tokenizer, on_token, "length" if n_new == cfg.max_new_tokens else "context")
    if n_new <= 0:
        return outs.rows()

    dec = decoder_for(model)
    dec.sig = dec.signature()
    # compiled steps (and CUDA graphs, kept per shape) want few shapes; eager CPU steps want short attention
    bucket = ATTN_BUCKET if (cfg.compile or device.type != "cpu") else EAGER_ATTN_BUCKET
    cache, logits, starts = _prefill_distinct(dec, prompts, P, attn_bucket(total, args.max_seq_len, bucket),
                                              cfg.prefill_chunk)
    s, mode = _batch_sampler(cfg, B, device)
    want_lp = cfg.logprobs
    tok = sample_tokens(logits, s, uniforms(s.seeds, torch.zeros(B, dtype=torch.long, device=device)), mode)
    lp = _logprob(logits, tok) if want_lp else None

    live = list(range(B))  # original row of each batch row
    done = outs.done
    compile_ = cfg.compile
    # On CUDA the next step is queued before this step's tokens are read back (into pinned memory, behind an
    # event), so the host's work per token (recording, stop tests, the step's launch and guards) overlaps the
    # device's; elsewhere the step runs synchronously and there is nothing to overlap.
    overlap = device.type in _OVERLAP_DEVICES
    readback = _Readback(B, want_lp, device) if overlap else None

    def launch(step: int, tok, starts, s):
        col = P + step  # the column this step's token is written to
        cols = torch.full((len(live),), col, dtype=torch.long, device=device)
        counters = torch.full((len(live),), step + 1, dtype=torch.long, device=device)
        return dec.step(cache, tok, cols, starts, attn_bucket(col + 1, cache.max_seq_len, bucket), s, counters, mode,
                        want_lp, compile_)

    for step in range(n_new):
        last = step == n_new - 1
        ahead = None
        if overlap:
            readback.start(tok, lp)
            if not last:
                ahead = launch(step, tok, starts, s)  # may compute one step past the end of every row: discarded
            toks, lps = readback.values()
        else:  # a (B,) copy to the host, the only per-token sync
            toks, lps = tok.tolist(), (lp.tolist() if lp is not None else None)
        n_done = outs.record(live, toks, lps)
        if n_done == len(live) or last:
            break
        # compaction changes the batch size; a CUDA graph is recorded per size, so on CUDA with a compiled step
        # the batch keeps its shape (finished rows ride along) instead
        compact = cfg.compact and n_done and n_done * 4 >= len(live) and not (compile_ and device.type == "cuda")
        if ahead is not None:  # the step already ran on the old batch: compact its outputs with the cache
            tok, lp = ahead
        if compact:
            keep = [i for i, b in enumerate(live) if not done[b]]
            idx = torch.tensor(keep, device=device)
            cache.select(idx)
            tok, starts, s = tok[idx], starts[idx], s.select(idx)
            lp = lp[idx] if (ahead is not None and lp is not None) else lp
            live = [live[i] for i in keep]
        if ahead is None:
            tok, lp = launch(step, tok, starts, s)
    return outs.rows()


# -- continuous batching --------------------------------------------------------------------------------------------
@dataclass
class SamplingParams(SamplingConfig):
    """How one request is sampled: the sampling fields, plus its seed, stops and logprobs (the per-request subset
    of ``GenerationConfig``)."""

    seed: int | None = None
    """Seed of the draws: the same seed, prompt and model give the same tokens (whatever else runs in the batch)."""
    stop_tokens: tuple[int, ...] | None = None
    """Token ids that end a sequence (kept in the output). None means the tokenizer's EOS."""
    stop_strings: tuple[str, ...] = ()
    """Strings that end a sequence; the text is cut before them. Needs a tokenizer."""
    logprobs: bool = False
    """Also return the log-probability of each generated token under the model (temperature 1)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.stop_strings, str):
            self.stop_strings = (self.stop_strings,)


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
        s = Sampler(
            torch.tensor([x.temperature for x in p], dtype=torch.float32, device=dev),
            torch.tensor([x.top_p for x in p], dtype=torch.float32, device=dev),
            torch.tensor([x.top_k for x in p], dtype=torch.long, device=dev),
            torch.tensor([r.seed for r in run], dtype=torch.long, device=dev),
        )
        mode = sampling_mode([x.temperature for x in p], [x.top_p for x in p], [x.top_k for x in p])
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
        s = Sampler(torch.tensor([p.temperature], device=self.device), torch.tensor([p.top_p], device=self.device),
                    torch.tensor([p.top_k], device=self.device), torch.tensor([r.seed], device=self.device))
        mode = sampling_mode([p.temperature], [p.top_p], [p.top_k])
        tok = sample_tokens(logits, s, uniforms(s.seeds, zero), mode)
        lp = float(_logprob(logits, tok)) if p.logprobs else None
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
