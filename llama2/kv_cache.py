"""A preallocated key/value cache for decoding, indexed by absolute position.

Layout (n_layers, B, max_seq_len, n_kv_heads, head_dim) per tensor, as Meta's cache_k/cache_v: a grouped-query
model caches n_kv_heads heads, not n_heads, so its cache is n_kv_heads / n_heads the size of an MHA cache
(the memory saving that motivates GQA, Llama 2 §2.2 and A.2.1).
"""
from __future__ import annotations

import torch

from .model import ModelArgs

__all__ = ["KVCache"]


class KVCache:
    def __init__(
        self,
        args: ModelArgs,
        batch_size: int,
        max_seq_len: int | None = None,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ):
        self.max_seq_len = max_seq_len or args.max_seq_len
        if self.max_seq_len > args.max_seq_len:
            raise ValueError(f"cache length {self.max_seq_len} exceeds the model's max_seq_len {args.max_seq_len}")
        shape = (args.n_layers, batch_size, self.max_seq_len, args.n_kv_heads, args.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.batch_size = batch_size

    @classmethod
    def for_model(cls, model: torch.nn.Module, batch_size: int, max_seq_len: int | None = None) -> "KVCache":
        """A cache in the dtype and device of the model's weights (the keys are computed in that dtype)."""
        w = model.tok_embeddings.weight
        dtype = torch.get_autocast_dtype(w.device.type) if torch.is_autocast_enabled(w.device.type) else w.dtype
        return cls(model.args, batch_size, max_seq_len, dtype=dtype, device=w.device)

    @property
    def nbytes(self) -> int:
        """Bytes held by the cache (keys and values, all layers)."""
        return self.k.numel() * self.k.element_size() * 2

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

    def reorder(self, index: torch.Tensor) -> None:
        """Keep only (and reorder) batch rows, e.g. to drop finished sequences."""
        self.k = self.k[:, index]
        self.v = self.v[:, index]
        self.batch_size = self.k.shape[1]
