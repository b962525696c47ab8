"""The token sampler: one token per row from its logits, with each row's own settings and its own random numbers.

Sampling (temperature, top-k, top-p, greedy), the log-probability and the draw's random number all run on the
device, inside the decode step, so there is no host round trip per token where none is needed. The random
numbers come from a counter-based hash of (row seed, token index) (``uniforms``), not from a generator's state:
a row's samples do not depend on which other rows share its batch, on the batch being compacted, on the step
being compiled or replayed as a graph, or on whether the static engine or the eager reference loop draws them.
The sampling defaults are Meta's chat defaults (temperature 0.6, top-p 0.9; ``llama2.config.SamplingConfig``).
"""
from __future__ import annotations

import os
from typing import NamedTuple, Sequence

import torch

__all__ = ["Sampler", "sampling_mode", "sample_tokens", "token_logprob", "uniforms", "row_seed", "random_seed"]

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


def row_seed(seed: int, row: int) -> int:
    """A 31-bit seed for row ``row`` of a call seeded with ``seed`` (SplitMix64 of the pair)."""
    z = (seed * 0x9E3779B97F4A7C15 + row * 0xBF58476D1CE4E5B9 + 0x94D049BB133111EB) & (2**64 - 1)
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & (2**64 - 1)
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & (2**64 - 1)
    return (z ^ (z >> 31)) & _M31


def random_seed() -> int:
    return int.from_bytes(os.urandom(8), "little")


class Sampler(NamedTuple):
    """Per-row sampling settings as tensors (B,): what one compiled step reads instead of Python numbers."""

    temperature: torch.Tensor  # float32; 0 = greedy
    top_p: torch.Tensor  # float32; 1 = off
    top_k: torch.Tensor  # int64; 0 = off
    seeds: torch.Tensor  # int64 in [0, 2^31)

    @classmethod
    def of(cls, temperature: Sequence[float], top_p: Sequence[float], top_k: Sequence[int], seeds: Sequence[int],
           device: torch.device) -> tuple["Sampler", str]:
        """A Sampler of one row per entry, and the sampling mode its rows need (``sampling_mode``)."""
        s = cls(torch.tensor([float(t) for t in temperature], dtype=torch.float32, device=device),
                torch.tensor([float(p) for p in top_p], dtype=torch.float32, device=device),
                torch.tensor([int(k) for k in top_k], dtype=torch.long, device=device),
                torch.tensor(list(seeds), dtype=torch.long, device=device))
        return s, sampling_mode(temperature, top_p, top_k)

    @classmethod
    def for_batch(cls, cfg, B: int, device: torch.device) -> tuple["Sampler", str]:
        """B rows that all use ``cfg``'s settings (a ``SamplingParams``), each with its own seed derived from
        cfg.seed (a random one when None)."""
        base = cfg.seed if cfg.seed is not None else random_seed()
        return cls.of([cfg.temperature] * B, [cfg.top_p] * B, [cfg.top_k] * B, [row_seed(base, b) for b in range(B)],
                      device)

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

    softmax(logits / T) restricted to the top-k, then to the top-p nucleus (Holtzman et al., 2020; Meta's
    sample_top_p: a token is dropped when the mass before it, in descending order, already exceeds top_p times
    the mass kept), renormalised; temperature 0 is argmax. Rows carry their own settings (s), so requests with
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


def token_logprob(logits: torch.Tensor, tok: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[tok] at temperature 1 (what ``Completion.logprobs`` reports): (B,) fp32."""
    return logits.gather(-1, tok[:, None]).squeeze(-1) - torch.logsumexp(logits, dim=-1)
