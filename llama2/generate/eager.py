"""The eager reference loop: whole-batch decoding over ``Transformer.forward`` and its growing ``KVCache``, the
path the static engine is tested against (identical greedy tokens, logits within float rounding), and the one a
model sharded by FSDP takes (its forward gathers its parameters).

Prompts of different lengths are left-padded into one batch: each row's rotary positions start at 0 at its first
real token, and an attention mask hides the pads, so a row decodes exactly as it would alone. Meta's reference
instead right-pads and overwrites generated tokens with prompt tokens until every prompt is consumed; left padding
does the prefill in one pass and never recomputes. Tokens are drawn by the same sampler as the static engine's,
from the same (row seed, token index) numbers, so both paths draw the same samples up to float rounding.
"""
from __future__ import annotations

from typing import Sequence

import torch

from ..kv_cache import KVCache
from ..model import Transformer, causal_mask
from .sampler import Sampler, sample_tokens, token_logprob, uniforms
from .stops import Outputs

__all__ = ["decode_eager"]


def _left_padded(prompts: Sequence[Sequence[int]], total: int, device: torch.device):
    """(tokens (B, P), positions (B, P), valid (B, total) or None, mask (B, 1, P, P) or None) of left-padded prompts:
    row b's real tokens occupy columns pad[b]..P-1; valid marks the real key columns."""
    lengths = [len(p) for p in prompts]
    B, P = len(prompts), max(lengths)
    pad = torch.tensor([P - n for n in lengths], device=device)
    tokens = torch.zeros(B, P, dtype=torch.long, device=device)
    for b, p in enumerate(prompts):
        tokens[b, P - len(p):] = torch.as_tensor(list(p), dtype=torch.long)
    positions = (torch.arange(P, device=device)[None, :] - pad[:, None]).clamp(min=0)  # (B, P)
    if not bool(pad.any()):
        return tokens, positions, None, None
    valid = torch.arange(total, device=device)[None, :] >= pad[:, None]  # (B, total): key is a real token
    # causal & real key; a pad query sees itself so its softmax is never over nothing (no NaN in the cache)
    mask = (causal_mask(P, P, device)[None] & valid[:, None, :P]) | torch.eye(P, dtype=torch.bool, device=device)
    return tokens, positions, valid, mask[:, None]  # mask (B, 1, P, P)


def decode_eager(model: Transformer, prompts: Sequence[Sequence[int]], cfg, outs: Outputs) -> None:
    """Decode ``prompts`` with ``model.forward`` into ``outs`` (a ``GenerationConfig``'s settings, ``cfg``). Rows
    that hit a stop keep decoding in the batch but record nothing."""
    device = model.tok_embeddings.weight.device
    B, P = len(prompts), max(len(p) for p in prompts)
    total = min(model.args.max_seq_len, P + cfg.max_new_tokens)
    n_new = total - P
    tokens, positions, valid, mask = _left_padded(prompts, total, device)
    ragged = valid is not None
    s, mode = Sampler.for_batch(cfg, B, device)

    cache = KVCache.for_model(model, B, total)
    logits = model(tokens, 0, cache, mask, positions if ragged else None, last_only=True)[:, -1]  # (B, V)
    next_pos = positions[:, -1] + 1  # (B,)
    for step in range(n_new):
        counters = torch.full((B,), step, dtype=torch.long, device=device)
        logits = logits.float()
        nxt = sample_tokens(logits, s, uniforms(s.seeds, counters), mode)  # (B,)
        lp = token_logprob(logits, nxt).tolist() if cfg.logprobs else None
        if outs.record(range(B), nxt.tolist(), lp) == B or step == n_new - 1:
            break
        start = P + step
        step_mask = valid[:, None, None, : start + 1] if ragged else None  # (B, 1, 1, S)
        step_pos = next_pos[:, None] if ragged else None
        logits = model(nxt[:, None], start, cache, step_mask, step_pos, last_only=True)[:, -1]
        next_pos = next_pos + 1
