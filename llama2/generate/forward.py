"""The transformer over a static KV cache: the arithmetic of ``Transformer.forward`` with fixed shapes.

The cache (``StaticKVCache``) is allocated once and never grows; each step attends over the first ``attn_len``
columns under a mask and writes its new keys at each row's own column (a tensor, not a Python int), so a decode
step has the same shapes from one token to the next and ``torch.compile`` compiles it once (on CUDA it is then
replayed as a CUDA graph, the way gpt-fast and transformers' static cache decode).

Shapes in comments: B rows, T new tokens, S attended cache columns, H query heads, KV key/value heads, D head
dim, C model dim, V vocabulary.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..model import Transformer, apply_rope
from .kernels import linear, rms_norm

__all__ = ["forward_cached", "logits_of"]


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
        x = rms_norm(h, layer.attention_norm)
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
        x = rms_norm(h, layer.ffn_norm)
        ff = layer.feed_forward
        h = h + linear(F.silu(linear(x, ff.w1)) * linear(x, ff.w3), ff.w2)
    h = h[:, -1] if last is None else h[torch.arange(B, device=h.device), last]
    return rms_norm(h, model.norm)  # (B, C)


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


def logits_of(model: Transformer, h: torch.Tensor) -> torch.Tensor:
    """The LM head over final hidden states: (B, C) -> (B, V) fp32, as the model returns them."""
    return linear(h, model.output).float()
