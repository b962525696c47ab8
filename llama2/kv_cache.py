"""Preallocated key/value caches for decoding, indexed by absolute position.

``KVCache``: layout (n_layers, B, max_seq_len, n_kv_heads, head_dim) per tensor, as Meta's cache_k/cache_v; the
model's own forward writes it (``Transformer.forward(tokens, start_pos, cache)``), one shared start position for
the whole batch. A grouped-query model caches n_kv_heads heads, not n_heads, so its cache is n_kv_heads / n_heads
the size of an MHA cache (the memory saving that motivates GQA, Llama 2 §2.2 and A.2.1).

``StaticKVCache``: the generation engine's cache (``llama2.generate``), layout (n_layers, B, n_kv_heads, max_seq_len,
head_dim), heads before positions, so that one layer's keys are already in the (B, KV, S, D) layout attention
reads and every row can write at its own position (continuous batching). Its shape never changes while decoding,
which is what lets the decode step be compiled once and replayed as a CUDA graph.
"""
from __future__ import annotations

from typing import Protocol

import torch

__all__ = ["KVCache", "StaticKVCache"]


class ModelShape(Protocol):
    """What a cache needs of a model's shape; ``llama2.model.ModelArgs`` has it (the cache sits below the model, which
    writes it, so it names no model type)."""

    n_layers: int
    n_kv_heads: int
    head_dim: int
    max_seq_len: int


class _Cache:
    """Preallocated keys and values of ``batch_size`` rows of up to ``max_seq_len`` positions, in the dtype and on
    the device given (``for_model``: the model's). Subclasses choose the layout of ``k`` and ``v``."""

    def __init__(self, args: ModelShape, batch_size: int, max_seq_len: int | None = None,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
        self.max_seq_len = max_seq_len or args.max_seq_len
        if self.max_seq_len > args.max_seq_len:
            raise ValueError(f"cache length {self.max_seq_len} exceeds the model's max_seq_len {args.max_seq_len}")
        shape = self._shape(args, batch_size, self.max_seq_len)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)

    @staticmethod
    def _shape(args: ModelShape, batch_size: int, max_seq_len: int) -> tuple[int, ...]:
        raise NotImplementedError

    @property
    def batch_size(self) -> int:
        return self.k.shape[1]

    @classmethod
    def for_model(cls, model: torch.nn.Module, batch_size: int, max_seq_len: int | None = None):
        """A cache in the dtype and device of the model's weights (the keys are computed in that dtype)."""
        w = model.tok_embeddings.weight
        dtype = torch.get_autocast_dtype(w.device.type) if torch.is_autocast_enabled(w.device.type) else w.dtype
        return cls(model.args, batch_size, max_seq_len, dtype=dtype, device=w.device)

    @property
    def nbytes(self) -> int:
        """Bytes held by the cache (keys and values, all layers)."""
        return self.k.numel() * self.k.element_size() * 2


class KVCache(_Cache):
    """k, v: (n_layers, B, S, KV, D), as Meta's cache_k/cache_v; ``update`` writes a chunk at one position for every
    row (the eager generation loop)."""

    @staticmethod
    def _shape(args: ModelShape, batch_size: int, max_seq_len: int) -> tuple[int, ...]:
        return (args.n_layers, batch_size, max_seq_len, args.n_kv_heads, args.head_dim)

    def update(self, layer: int, start_pos: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write (B, T, KV, D) keys/values at positions start_pos..start_pos+T; return views of all keys and
        values up to there, (B, start_pos+T, KV, D)."""
        B, T = k.shape[:2]
        end = start_pos + T
        if end > self.max_seq_len:
            raise ValueError(f"KV cache overflow: position {end} > cache length {self.max_seq_len}")
        if B > self.batch_size:
            raise ValueError(f"batch {B} exceeds the cache's batch size {self.batch_size}")
        self.k[layer, :B, start_pos:end] = k
        self.v[layer, :B, start_pos:end] = v
        return self.k[layer, :B, :end], self.v[layer, :B, :end]


class StaticKVCache(_Cache):
    """Keys and values of ``batch_size`` rows ("slots") of up to ``max_seq_len`` positions each.

    k, v: (n_layers, B, KV, S, D). The engine's ``forward_cached`` writes each row's tokens at their columns (one
    new token per row in a decode step, a chunk of columns in prefill). Columns hold whatever each row put there;
    which of them a query may see is the engine's attention mask.
    """

    @staticmethod
    def _shape(args: ModelShape, batch_size: int, max_seq_len: int) -> tuple[int, ...]:
        return (args.n_layers, batch_size, args.n_kv_heads, max_seq_len, args.head_dim)

    def select(self, index: torch.Tensor) -> None:
        """Row i becomes old row index[i], for i < len(index), in place (rows past that keep stale values): drops,
        reorders or repeats rows (len(index) <= batch_size) without reallocating, so the cache keeps its address,
        which a compiled step replayed as a CUDA graph relies on."""
        n = index.shape[0]
        self.k[:, :n] = self.k.index_select(1, index)
        self.v[:, :n] = self.v.index_select(1, index)

    def mark_static(self) -> None:
        """Tell torch.compile that k and v keep their addresses (as transformers' static cache does), so a
        compiled step that writes them can still be replayed as a CUDA graph."""
        torch._dynamo.mark_static_address(self.k, guard=False)
        torch._dynamo.mark_static_address(self.v, guard=False)

    def move(self, src: int, dst: int) -> None:
        """Copy row ``src`` into row ``dst`` (the engine keeps its live slots contiguous this way)."""
        self.k[:, dst] = self.k[:, src]
        self.v[:, dst] = self.v[:, src]
